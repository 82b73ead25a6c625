//! `flowmap sample`: samples from a flow map (k steps on a grid) or a teacher (an ODE solver), streamed to `.npy`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use clap::Args;
use flowmap::data;
use flowmap::io;
use flowmap::pipeline::Model;
use flowmap::sample::{self, SampleContext, TimeGrid};

use super::common::check_output;
use super::guidance::{guidance_label, guided, map_at, GuidanceFlags};
use super::model::{class_cond, class_cond_from, map_sampler, teacher_solver, to_data_range};
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
    // Checked once up front: the rows of a grid, and a bad --class before anything is written.
    let (_, rows) = class_cond(a.class.as_deref(), 1, model.num_classes(), device)?;
    // Samples stream to the file chunk by chunk (256 images or 65,536 points at a time), so memory stays
    // bounded for any --n; the grid keeps the first GRID_MAX.
    const GRID_MAX: usize = 4096;
    let chunk = sample::chunk_rows(&shape).min(65_536);
    let map_setup = match &model {
        Model::Map(_, ck) => {
            let grid = match &a.grid {
                Some(g) => g.parse::<TimeGrid>()?,
                None => TimeGrid::power(a.nfe, a.grid_power)?,
            };
            let sampler = map_sampler(a.sampler.as_deref(), ck, grid.steps() > 1)?;
            Some((grid, sampler, ck.meta.probability_path()?))
        }
        Model::Teacher(_) => {
            if a.grid.is_some() || a.grid_power != 1.0 {
                bail!("--grid and --grid-power apply to flow maps; teachers take --solver and --nfe");
            }
            None
        }
    };
    let solver = match &model {
        Model::Teacher(_) => Some(teacher_solver(&a.solver, a.nfe)?),
        Model::Map(..) => None,
    };
    let weak = a.guide.load(device)?;
    let field = match &model {
        Model::Teacher(t) => Some(guided(t, a.guide.guidance, weak.as_ref(), model.num_classes())?),
        Model::Map(..) => None,
    };
    let map = match &model {
        Model::Map(net, ck) => Some(map_at(net, ck, &a.guide)?),
        Model::Teacher(_) => None,
    };
    if a.guide.guidance.is_some() && a.guide.guide_model.is_none() && a.class.as_deref() == Some("null") {
        bail!("--guidance needs classes to guide towards; --class null is the unconditional model (guide it with --guide-model)");
    }
    let what = match (&map_setup, solver) {
        (Some((grid, sampler, _)), _) => match guidance_label(&a.guide) {
            Some(g) => format!("flow map on grid {grid}, {sampler:?} sampler, {g}"),
            None => format!("flow map on grid {grid}, {sampler:?} sampler"),
        },
        (None, Some(solver)) => match guidance_label(&a.guide) {
            Some(g) => format!("teacher, {solver}, {g}"),
            None => format!("teacher, {solver}"),
        },
        (None, None) => unreachable!("a model is a map or a teacher"),
    };
    let scale = model.scale();
    let mut kept: Vec<Tensor> = Vec::new();
    let mut kept_rows = 0;
    let mut nfe = 0;
    let header = data::npy::npy_f32_header(&flowmap::state::batch_shape(a.n, &shape));
    io::write_atomic(&a.out, |w| {
        w.write_all(&header)?;
        let run = |z: &Tensor, seed: u64, start: usize| -> flowmap::Result<sample::Sampled> {
            let (cond, _) = class_cond_from(a.class.as_deref(), start, z.dim(0)?, model.num_classes(), device)
                .map_err(|e| flowmap::Error::arg(e.to_string()))?;
            match (&model, &map_setup, solver) {
                (Model::Map(..), Some((grid, sampler, path)), _) => {
                    let cx = SampleContext::new(seed).with_path(&**path).with_cond(&cond);
                    sample::sample_with(&**map.as_ref().expect("a map"), z, grid, *sampler, &cx)
                }
                (Model::Teacher(_), _, Some(solver)) => {
                    sample::sample_ode(field.as_deref().expect("a teacher's field"), z, solver, &cond)
                }
                _ => unreachable!("set up above"),
            }
        };
        let sink = |x: &Tensor| -> flowmap::Result<()> {
            if a.png.is_some() && kept_rows < GRID_MAX {
                let take = x.dim(0)?.min(GRID_MAX - kept_rows);
                kept.push(x.narrow(0, 0, take)?);
                kept_rows += take;
            }
            let v = to_data_range(x, scale)
                .map_err(|e| flowmap::Error::arg(e.to_string()))?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
            w.write_all(&bytes).map_err(|e| flowmap::Error::io(&a.out, e))
        };
        nfe = sample::stream(a.n, &shape, a.seed, chunk, device, run, sink).map_err(std::io::Error::other)?;
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
