use candle_core::{DType, Device};
use flowmap::checkpoint::Checkpoint;
use flowmap::data::{DataSource, Toy};
use flowmap::sample::{self, Sampler, TimeGrid, GRID_POWERS};

fn main() -> flowmap::Result<()> {
    let dev = Device::Cpu;
    let data = DataSource::Toy(Toy::Checkerboard);
    let args: Vec<String> = std::env::args().collect();
    let path = &args[1];
    let sampler = if args[2] == "cm" {
        Sampler::Consistency
    } else {
        Sampler::Deterministic
    };
    let ck = Checkpoint::load(std::path::Path::new(path))?;
    let (net, _v) = ck.flow_map_net(&dev)?;
    let score = |k: usize, rho: f64, n: usize, zseed: u64, vseed: u64| -> flowmap::Result<f64> {
        let z = sample::noise(n, 2, zseed, &dev)?;
        let g = TimeGrid::power(k, rho)?;
        let x = sample::sample_with(&net, &z, &g, sampler, zseed)?.x;
        let x = x.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        Ok(flowmap::metrics::energy_distance(&x, &data.heldout(n, vseed), 2))
    };
    for k in [2usize, 8] {
        for &rho in GRID_POWERS.iter() {
            let truth = score(k, rho, 200_000, 100, 12345)?;
            let mut v50 = vec![];
            for s in 0..4u64 {
                v50.push(score(k, rho, 50_000, s, 1000 + s)?);
            }
            let mut v200 = vec![];
            for s in 0..2u64 {
                v200.push(score(k, rho, 200_000, 10 + s, 2000 + s)?);
            }
            println!(
                "{{\"map\":\"{path}\",\"k\":{k},\"rho\":{rho},\"truth\":{truth},\"v50\":{v50:?},\"v200\":{v200:?}}}"
            );
        }
    }
    Ok(())
}
