//! `flowmap sample`: samples from a flow map (k steps on a grid) or a teacher (an ODE solver), streamed to `.npy`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use clap::Args;
use flowmap::data;
use flowmap::io;
use flowmap::pipeline::{to_data_range, Classes, Generation, Model};
use flowmap::sample::{self, Sampler, TimeGrid};

use super::common::check_output;
use super::guidance::{generator, GuidanceFlags};
use super::model::{class_cond, parse_class};
use super::Ctx;
use crate::grid;

#[derive(Args)]
pub struct SampleArgs {
    /// Flow-map or teacher checkpoint, or gmm:SPEC.json.
    #[arg(long)]
    pub model: String,
    /// Network evaluations: steps of the flow map, or the teacher solver's evaluation budget.
    #[arg(long, default_value_t = 1)]
    pub nfe: usize,
    /// Custom descending time grid from 1 to 0 for a flow map, e.g. 1,0.6,0 (overrides --nfe).
    #[arg(long, conflicts_with = "grid_power")]
    pub grid: Option<String>,
    /// A flow map's --nfe steps on the grid t_i = (1 − i/k)^ρ: 1 is uniform, larger ρ steps finer near the data.
    #[arg(long, default_value_t = 1.0)]
    pub grid_power: f64,
    /// Teacher solver: euler, heun, midpoint, rk4 or dopri5.
    #[arg(long, default_value = "euler")]
    pub solver: String,
    /// Flow-map sampler: deterministic, consistency or gamma:G (default: deterministic; consistency for a
    /// consistency model).
    #[arg(long)]
    pub sampler: Option<String>,
    /// Number of samples.
    #[arg(long, default_value_t = 10_000)]
    pub n: usize,
    /// Class of a class-conditional model's samples: K, all (sample i gets class i mod C, the default) or
    /// null (the unconditional model).
    #[arg(long)]
    pub class: Option<String>,
    /// Output .npy (n × state shape, float32; images in the data's own value range).
    #[arg(long)]
    pub out: PathBuf,
    /// Also write the images as a PNG grid (one row per class with --class all).
    #[arg(long)]
    pub png: Option<PathBuf>,
    #[command(flatten)]
    pub guide: GuidanceFlags,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Precision of the networks' matrix products: f32, or bf16 operands with f32 sums (on a CPU without
    /// AVX-512 BF16 the products stay f32, said in one line).
    #[arg(long, value_name = "f32|bf16", default_value = "f32")]
    pub precision: flowmap::kernels::Precision,
}

pub fn run(a: SampleArgs, cx: &Ctx) -> Result<()> {
    let device = &cx.device;
    check_output(&a.out, "npy")?;
    if let Some(p) = &a.png {
        check_output(p, "png")?;
    }
    if a.n == 0 {
        bail!("--n must be at least 1");
    }
    if a.nfe == 0 {
        bail!("--nfe must be at least 1");
    }
    let model = Model::load(&a.model, device)?;
    let shape = model.state_shape();
    if a.png.is_some() && shape.len() != 3 {
        bail!("--png writes image grids; this model's states have shape {shape:?}");
    }
    let classes = parse_class(a.class.as_deref())?;
    class_cond(a.class.as_deref(), 1, model.num_classes(), device)?;
    if matches!(model, Model::Teacher(_)) && (a.grid.is_some() || a.grid_power != 1.0) {
        bail!("--grid and --grid-power apply to flow maps; teachers take --solver and --nfe");
    }
    let g = Generation {
        nfe: a.nfe,
        grid: a.grid.as_deref().map(str::parse::<TimeGrid>).transpose()?,
        grid_power: a.grid_power,
        solver: a.solver.clone(),
        sampler: a.sampler.as_deref().map(Sampler::parse).transpose()?,
        classes: classes.clone(),
        guidance: a.guide.guidance,
        seed: a.seed,
        precision: a.precision,
    };
    if a.precision != flowmap::kernels::Precision::F32 {
        eprintln!("precision: {}", a.precision.describe_on(&cx.device));
    }
    if a.guide.guidance.is_some() && a.guide.guide_model.is_none() && a.class.as_deref() == Some("null") {
        bail!("--guidance needs classes to guide towards; --class null is the unconditional model (guide it with --guide-model)");
    }
    let weak = a.guide.load(device)?;
    let generator = generator(&model, &g, weak.as_ref(), &a.guide)?;
    let rows = Classes::grid_rows(classes.as_ref(), model.num_classes());
    let what = generator.describe();
    // Samples stream to the file chunk by chunk (256 images or 65,536 points at a time), so memory stays
    // bounded for any --n; the grid keeps the first GRID_MAX.
    const GRID_MAX: usize = 4096;
    let chunk = sample::chunk_rows(&shape).min(65_536);
    let scale = model.scale();
    let mut kept: Vec<Tensor> = Vec::new();
    let mut kept_rows = 0;
    let mut nfe = 0;
    let header = data::npy::npy_f32_header(&flowmap::state::batch_shape(a.n, &shape));
    io::write_atomic(&a.out, |w| {
        w.write_all(&header)?;
        let sink = |x: &Tensor| -> flowmap::Result<()> {
            if a.png.is_some() && kept_rows < GRID_MAX {
                let take = x.dim(0)?.min(GRID_MAX - kept_rows);
                kept.push(x.narrow(0, 0, take)?);
                kept_rows += take;
            }
            let v = to_data_range(x, scale)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
            w.write_all(&bytes).map_err(|e| flowmap::Error::io(&a.out, e))
        };
        nfe = generator
            .stream(a.n, chunk, device, sink)
            .map_err(std::io::Error::other)?;
        Ok(())
    })?;
    if let Some(p) = &a.png {
        let x = Tensor::cat(&kept, 0)?;
        let rows = if rows > 0 {
            rows
        } else {
            (x.dim(0)? as f64).sqrt().ceil() as usize
        };
        grid::write_grid(p, &x, rows)?;
    }
    eprintln!("{} samples ({what}), NFE {nfe}; wrote {}", a.n, a.out.display());
    Ok(())
}
