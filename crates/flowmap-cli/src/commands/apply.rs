//! `flowmap apply`: `f(x, t, s)` of a flow map, or `Φ_{t→s}(x)` of a teacher by an ODE solver.

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use clap::Args;
use flowmap::data;
use flowmap::flow_map::SolverMap;
use flowmap::ode;
use flowmap::pipeline::Model;

use super::common::check_output;
use super::guidance::{guided, map_at, GuidanceFlags};
use super::model::{class_cond, write_tensor};
use super::Ctx;
use flowmap::pipeline::to_data_range;

#[derive(Args)]
pub struct ApplyArgs {
    /// Flow-map or teacher checkpoint, or gmm:SPEC.json.
    #[arg(long)]
    pub model: String,
    /// Start time t.
    #[arg(long)]
    pub t: f64,
    /// End time s ≤ t.
    #[arg(long)]
    pub s: f64,
    /// Input points (.npy or .csv, N × D), or images (.npy, N × C × H × W in the data's own range).
    #[arg(long)]
    pub input: PathBuf,
    /// Class of a class-conditional model: K, all (row i gets class i mod C, the default) or null.
    #[arg(long)]
    pub class: Option<String>,
    #[command(flatten)]
    pub guide: GuidanceFlags,
    /// Output .npy.
    #[arg(long)]
    pub out: PathBuf,
    /// Solver for teachers: euler, heun, midpoint, rk4 or dopri5.
    #[arg(long, default_value = "dopri5")]
    pub solver: String,
    /// Steps of a fixed-step solver.
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    /// Tolerance of dopri5.
    #[arg(long, default_value_t = 1e-5)]
    pub tol: f64,
}

pub fn run(a: ApplyArgs, cx: &Ctx) -> Result<()> {
    let device = &cx.device;
    check_output(&a.out, "npy")?;
    for (name, v) in [("t", a.t), ("s", a.s)] {
        if !(0.0..=1.0).contains(&v) {
            bail!("--{name} {v} is outside [0, 1]");
        }
    }
    if a.s > a.t {
        bail!(
            "--s {} is greater than --t {}: flow maps go down in time (0 ≤ s ≤ t ≤ 1)",
            a.s,
            a.t
        );
    }
    let model = Model::load(&a.model, device)?;
    let shape = model.state_shape();
    let (rows, x) = if shape.len() == 3 {
        // Images come in the data's own value range, as `sample` writes them.
        let nd = data::npy::read_npy_nd(&a.input)?;
        if nd.shape.len() != 4 || nd.shape[1..] != shape[..] {
            bail!(
                "{} holds an array of shape {:?}, but the model takes N × {:?} images",
                a.input.display(),
                nd.shape,
                shape
            );
        }
        let scale = model.scale();
        let v: Vec<f64> = nd.data.iter().map(|&v| scale.map_or(v, |s| s.to_model(v))).collect();
        (
            nd.shape[0],
            data::to_batch(&v, nd.shape[0], &shape, DType::F32, device)?,
        )
    } else {
        let pts = data::read_points(&a.input)?;
        let dim = flowmap::state::numel(&shape);
        if pts.cols != dim {
            bail!(
                "{} has dimension {}, but the model expects {dim}",
                a.input.display(),
                pts.cols
            );
        }
        (
            pts.rows,
            data::to_batch(&pts.data, pts.rows, &shape, DType::F32, device)?,
        )
    };
    let c = class_cond(a.class.as_deref(), rows, model.num_classes(), device)?;
    let col = |v: f64| Tensor::full(v as f32, (rows, 1), device);
    let (t, s) = (col(a.t)?, col(a.s)?);
    let y = match &model {
        Model::Map(net, ck) => {
            if ck.meta.kind.boundary_only() && a.s != 0.0 {
                bail!(
                    "a consistency model maps only to s = 0 (got --s {}): it was trained on the boundary",
                    a.s
                );
            }
            flowmap::flow_map::FlowMap::map(&*map_at(net, &a.guide)?, &x, &t, &s, &c)?
        }
        Model::Teacher(tch) => {
            let solver = ode::parse_solver(&a.solver, a.steps, a.tol)?;
            let weak = a.guide.load(device)?;
            let field = guided(tch, a.guide.guidance, weak.as_ref())?;
            flowmap::flow_map::FlowMap::map(&SolverMap::new(&*field, solver), &x, &t, &s, &c)?
        }
    };
    write_tensor(&a.out, &to_data_range(&y, model.scale())?)?;
    eprintln!(
        "applied f(x, {}, {}) to {rows} states; wrote {}",
        a.t,
        a.s,
        a.out.display()
    );
    Ok(())
}
