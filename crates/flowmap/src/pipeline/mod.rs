//! End-to-end jobs over the library: train a teacher, train or distil a flow map, evaluate. They return
//! plain values (trained models, logs, metric rows); reports, plots and progress bars are the
//! application's (the CLI's) business.

mod config;
mod eval;
mod evaluate;
mod generate;
pub mod images;
mod model;
mod train;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

pub use config::{student_defaults, RunConfig};
pub use eval::{
    euler_and_dopri5, eval_map, eval_teacher, exact_map_report, map_errors, semigroup, teacher_solvers, EvalRow,
    EvalSettings, ExactMapReport,
};
pub use evaluate::{check_evaluate, evaluate, Evaluate, Evaluation};
pub use generate::{
    guidance_label, guided, map_at, map_sampler, teacher_solver, to_data_range, to_model_range, Classes, Generation,
    Generator,
};
pub use model::Model;
pub use train::{
    check_guide, plan_budget, plan_budget_on, plan_teacher, plan_teacher_on, train_teacher, train_teacher_controlled,
    BudgetPlan, MapJob, TrainedMap, TrainedTeacher, PROBE_STEPS,
};

use crate::checkpoint::{Checkpoint, CheckpointMeta};
use crate::cond::Cond;
use crate::data::{DataSource, GaussianMixture};
use crate::ode::Solver;
use crate::path::{LinearPath, ProbabilityPath};
use crate::teacher::{GmmVelocity, VelocityField, VelocityNet};
use crate::Result;

/// Dopri5 tolerance for the exact solution operator at a given precision.
pub fn exact_solver(dtype: DType) -> Solver {
    match dtype {
        DType::F64 => Solver::exact(),
        _ => Solver::dopri5(1e-5),
    }
}

/// A teacher: a trained velocity network, or the analytic Gaussian-mixture velocity.
pub enum Teacher {
    Net {
        net: VelocityNet,
        vars: VarMap,
        meta: CheckpointMeta,
    },
    Gmm(GmmVelocity),
}

impl VelocityField for Teacher {
    fn state_shape(&self) -> Vec<usize> {
        match self {
            Teacher::Net { net, .. } => net.state_shape(),
            Teacher::Gmm(g) => g.state_shape(),
        }
    }
    fn velocity(&self, x: &Tensor, t: &Tensor, c: &Cond) -> Result<Tensor> {
        match self {
            Teacher::Net { net, .. } => net.velocity(x, t, c),
            Teacher::Gmm(g) => g.velocity(x, t, c),
        }
    }
}

impl Teacher {
    /// `gmm:SPEC.json` (the analytic teacher) or a teacher checkpoint.
    pub fn load(spec: &str, device: &Device) -> Result<Self> {
        if let Some(path) = spec.strip_prefix("gmm:") {
            return Ok(Teacher::Gmm(GmmVelocity::new(GaussianMixture::from_file(Path::new(
                path,
            ))?)));
        }
        Self::from_checkpoint(Checkpoint::load(Path::new(spec))?, device)
    }

    /// The teacher network of a loaded checkpoint (a flowmap file, or [`Checkpoint::load_foreign`]).
    pub fn from_checkpoint(ck: Checkpoint, device: &Device) -> Result<Self> {
        let (net, vars) = ck.velocity_net(device)?;
        Ok(Teacher::Net {
            net,
            vars,
            meta: ck.meta,
        })
    }

    /// The data the teacher models: its training data, or the mixture itself.
    pub fn data(&self) -> Result<DataSource> {
        match self {
            Teacher::Gmm(g) => Ok(DataSource::Mixture(g.mixture().clone())),
            Teacher::Net { meta, .. } => data_of(meta),
        }
    }

    /// The probability path the teacher's velocity belongs to.
    pub fn path(&self) -> Result<Arc<dyn ProbabilityPath>> {
        match self {
            Teacher::Gmm(g) => Ok(g.path().clone()),
            Teacher::Net { meta, .. } => meta.probability_path(),
        }
    }

    /// The number of classes of a class-conditional teacher (its null class is this index).
    pub fn num_classes(&self) -> Option<usize> {
        match self {
            // The analytic mixture has no class embedding: it is conditional only through the labels a
            // batch brings (class `k` its component `k`), and holds no class count of its own.
            Teacher::Gmm(_) => None,
            Teacher::Net { meta, .. } => meta.arch.num_classes(),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Teacher::Gmm(_) => "analytic gaussian mixture".into(),
            Teacher::Net { meta, .. } => format!("velocity network trained on {}", meta.data),
        }
    }
}

/// Rebuilds the data source recorded in a checkpoint.
pub fn data_of(meta: &CheckpointMeta) -> Result<DataSource> {
    match &meta.mixture {
        Some(m) => Ok(DataSource::Mixture(m.clone())),
        None => DataSource::from_spec(&meta.data),
    }
}

fn mixture_of(data: &DataSource) -> Option<GaussianMixture> {
    match data {
        DataSource::Mixture(m) => Some(m.clone()),
        _ => None,
    }
}

/// The linear path, the default.
pub fn linear() -> Arc<dyn ProbabilityPath> {
    Arc::new(LinearPath)
}

/// Output folder helper: creates it and returns file paths inside it.
pub struct OutDir(pub PathBuf);

impl OutDir {
    pub fn create(path: &Path) -> Result<Self> {
        crate::io::create_dir(path)?;
        Ok(OutDir(path.to_path_buf()))
    }
    pub fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}
