//! The U-Net rows of `flowmap bench speed`: class-conditional U-Nets on the embedded 28 × 28 digits, at the
//! demo's size and larger, beside the PyTorch twin (`bench/peer/torch_unet_peer.py`, the same layers and
//! parameter names, `python/flowmap/torch.py`).
//!
//! - `unet-teacher`, `unet-emd`, `unet-meanflow`: training steps per second (AdamW + EMA, labels dropped
//!   with probability 0.1); MeanFlow from data with its exact JVP along `(x1 − x0, 1, 0)`;
//! - `unet-sample-1nfe`: one flow-map step from noise, images per second; `unet-latency-1nfe`: one image;
//! - `unet-jvp`: the exact JVP of `F` along `(v, 1, 0)` over a forward pass (both without gradients), at
//!   batch 128.
//!
//! Memory: the heap held at the peak of a training row above what was held when it started (the process's
//! allocator counts it); the peer reports its resident-set growth over the row.

use candle_core::Device;

use flowmap::backbone::{Arch, UnetConfig};
use flowmap::data::DataSource;
use flowmap::flow_map::{FlowMap, FlowMapNet, Point, Tangent};
use flowmap::objective::{DistillConfig, Emd, FlowMatching, MeanFlow, MeanFlowVelocity, Method};
use flowmap::sample::{sample_map, TimeGrid};
use flowmap::{Cond, Result};

use super::timing::{nets, rate, steps_per_second, SpeedOptions, SpeedRow};

/// Classes of the benchmark's networks (the digits).
const CLASSES: usize = 10;
/// The batch the JVP-over-forward ratio is measured at.
const JVP_BATCH: usize = 128;

/// The workloads, in report order.
pub const WORKLOADS: [&str; 6] = [
    "unet-teacher",
    "unet-emd",
    "unet-meanflow",
    "unet-sample-1nfe",
    "unet-latency-1nfe",
    "unet-jvp",
];

/// The benchmark's U-Net: the default one at `channels`, class-conditional, on `1 × 28 × 28`.
pub fn arch(channels: usize) -> Arch {
    Arch::Unet(UnetConfig::mnist(channels))
}

/// One round of the U-Net rows (those `opts` wants) at each channel count and batch.
pub fn measure(opts: &SpeedOptions, device: &Device, bar: &indicatif::ProgressBar) -> Result<Vec<SpeedRow>> {
    let (seconds, seed) = (opts.seconds, opts.seed);
    let data = DataSource::from_spec("mnist")?;
    let mut rows = vec![];
    let mut push = |workload: &str, ch: usize, batch: usize, unit: &str, value: f64, mb: Option<f64>| {
        rows.push(SpeedRow {
            workload: workload.into(),
            width: ch,
            batch,
            unit: unit.into(),
            value,
            gflops: None,
            peak_fraction: None,
            peak_rss_mb: mb,
            peer_peak_mb: None,
            peer: None,
            ratio: None,
        });
        bar.inc(1);
    };
    for &ch in &opts.unet_channels {
        let a = arch(ch);
        for &batch in &opts.unet_batches {
            let n = nets(&a, seed, device)?;
            if opts.wants("unet-teacher") {
                bar.set_message(format!("U-Net teacher, {ch} channels, batch {batch}"));
                let trainable = n.teacher_trainable(Some(CLASSES));
                let (r, mb) = steps_per_second(&FlowMatching::new(), &trainable, &data, batch, seconds, device)?;
                push("unet-teacher", ch, batch, "steps/s", r, Some(mb));
            }

            if opts.wants("unet-emd") {
                bar.set_message(format!("U-Net EMD, {ch} channels, batch {batch}"));
                let emd = Emd::new(&n.teacher, DistillConfig::default());
                let (r, mb) = steps_per_second(&emd, &n.map_trainable(Some(CLASSES)), &data, batch, seconds, device)?;
                push("unet-emd", ch, batch, "steps/s", r, Some(mb));
            }

            if opts.wants("unet-meanflow") {
                bar.set_message(format!("U-Net MeanFlow, {ch} channels, batch {batch}"));
                let mut cfg = DistillConfig::for_method(Method::Meanflow);
                cfg.continuous.meanflow_velocity = MeanFlowVelocity::Conditional;
                let trainable = n.map_trainable(Some(CLASSES));
                let (r, mb) = steps_per_second(&MeanFlow { cfg }, &trainable, &data, batch, seconds, device)?;
                push("unet-meanflow", ch, batch, "steps/s", r, Some(mb));
            }

            if opts.wants("unet-sample-1nfe") {
                bar.set_message(format!("U-Net sampling, {ch} channels, batch {batch}"));
                let (noise, cond) = inputs(batch, seed, device)?;
                let one = TimeGrid::uniform(1)?;
                let r = rate(seconds, || sample_map(&n.map, &noise, &one, &cond).map(|_| ()))?;
                push("unet-sample-1nfe", ch, batch, "images/s", r * batch as f64, None);
            }
        }
        let n = nets(&a, seed, device)?;
        if opts.wants("unet-latency-1nfe") {
            let one = TimeGrid::uniform(1)?;
            let (noise, cond) = inputs(1, seed, device)?;
            let r = rate(seconds, || sample_map(&n.map, &noise, &one, &cond).map(|_| ()))?;
            push("unet-latency-1nfe", ch, 1, "ms", 1e3 / r, None);
        }

        if opts.wants("unet-jvp") {
            bar.set_message(format!("U-Net JVP, {ch} channels"));
            push(
                "unet-jvp",
                ch,
                JVP_BATCH,
                "× forward",
                jvp_over_forward(&n.map, seconds, seed, device)?,
                None,
            );
        }
    }
    Ok(rows)
}

/// The exact JVP of `F` along `(v, 1, 0)` over a forward pass (both without gradients), at [`JVP_BATCH`].
fn jvp_over_forward(map: &FlowMapNet, seconds: f64, seed: u64, device: &Device) -> Result<f64> {
    let (x, cond) = inputs(JVP_BATCH, seed, device)?;
    let v = flowmap::sample::noise(JVP_BATCH, &[1, 28, 28], seed + 1, device)?;
    let mut rng = flowmap::Rng::derive(seed, "times");
    let (hi, lo): (Vec<f32>, Vec<f32>) = (0..JVP_BATCH)
        .map(|_| {
            let (a, b) = (rng.uniform() as f32, rng.uniform() as f32);
            (a.max(b), a.min(b))
        })
        .unzip();
    let t = candle_core::Tensor::from_vec(hi, (JVP_BATCH, 1), device)?;
    let s = candle_core::Tensor::from_vec(lo, (JVP_BATCH, 1), device)?;
    let at = Point {
        x: &x,
        t: &t,
        s: &s,
        cond: &cond,
    };
    let along = Tangent::along_start(&v, &at)?;
    let tangent = map.as_tangent().expect("the U-Net has a tangent rule");
    let forward = rate(seconds, || {
        flowmap::no_grad(|| map.average_velocity(&x, &t, &s, &cond)).map(|_| ())
    })?;
    let jvp = rate(seconds, || tangent.average_velocity_jvp(&at, &along).map(|_| ()))?;
    Ok(forward / jvp)
}

/// Noise images and labels `i mod 10` for a batch.
fn inputs(batch: usize, seed: u64, device: &Device) -> Result<(candle_core::Tensor, Cond)> {
    let noise = flowmap::sample::noise(batch, &[1, 28, 28], seed, device)?;
    let labels: Vec<u32> = (0..batch).map(|i| (i % CLASSES) as u32).collect();
    Ok((noise, Cond::from_classes(&labels, CLASSES, device)?))
}
