//! Guidance at sampling time: `--guidance w` and `--guide-model`, for teachers and guidance-distilled maps.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use candle_core::Device;
use clap::Args;
use flowmap::flow_map::{FlowMap, FlowMapNet};
use flowmap::pipeline::{self, Generation, Generator, Model, Teacher};
use flowmap::teacher::VelocityField;

/// Guidance at sampling time.
#[derive(Args, Clone)]
pub struct GuidanceFlags {
    /// Guidance scale w ≥ 0. A class-conditional teacher: classifier-free guidance
    /// v(x, t, ∅) + w·(v(x, t, c) − v(x, t, ∅)), two evaluations per step in one batch (1: the conditional
    /// model); with --guide-model, autoguidance. A guidance-distilled map: its input w, one evaluation.
    #[arg(long, allow_negative_numbers = true)]
    pub guidance: Option<f64>,
    /// Autoguidance (Karras et al. 2024): guide the teacher by this weaker model of the same data (an
    /// earlier or smaller checkpoint), v_weak + w·(v − v_weak); conditional or unconditional.
    #[arg(long)]
    pub guide_model: Option<PathBuf>,
}

impl GuidanceFlags {
    /// The guiding model, loaded.
    pub fn load(&self, device: &Device) -> Result<Option<Teacher>> {
        let Some(p) = &self.guide_model else { return Ok(None) };
        if self.guidance.is_none() {
            bail!("--guide-model guides at a scale: give it with --guidance w");
        }
        load_guide(p, device).map(Some)
    }
}

/// The model `--guide-model` names.
pub fn load_guide(path: &Path, device: &Device) -> Result<Teacher> {
    Teacher::load(&path.to_string_lossy(), device).map_err(|e| anyhow::anyhow!("--guide-model: {e}"))
}

/// The teacher `t` as `--guidance` asks: classifier-free guidance at `w`, autoguidance by `weak` (the
/// loaded `--guide-model`), or as it is ([`pipeline::guided`]).
pub fn guided<'a>(t: &'a Teacher, w: Option<f64>, weak: Option<&'a Teacher>) -> Result<Box<dyn VelocityField + 'a>> {
    Ok(pipeline::guided(t, w, weak)?)
}

/// A flow map as it is evaluated: a guidance-distilled one at `--guidance w` (which it needs), any other
/// as it is ([`pipeline::map_at`]); `--guide-model` is for teachers.
pub fn map_at<'a>(net: &'a FlowMapNet, g: &GuidanceFlags) -> Result<Box<dyn FlowMap + 'a>> {
    if g.guide_model.is_some() {
        bail!(
            "--guide-model guides a teacher; a flow map has its guidance distilled in (distil it with --guide-model)"
        );
    }
    match (net.arch().guidance(), g.guidance) {
        (None, Some(w)) => bail!(
            "--guidance {w}: this flow map was distilled without guidance, so it has no guidance input; guide its teacher instead, or distil with --guidance-range"
        ),
        (Some([lo, hi]), None) => {
            bail!("this flow map has guidance distilled into it (w in [{lo}, {hi}]): pass --guidance w")
        }
        _ => Ok(pipeline::map_at(net, g.guidance)?),
    }
}

/// `model` set up to generate as `g` asks, under the guidance flags.
pub fn generator<'a>(
    model: &'a Model,
    g: &Generation,
    weak: Option<&'a Teacher>,
    flags: &GuidanceFlags,
) -> Result<Generator<'a>> {
    if let Model::Map(net, _) = model {
        drop(map_at(net, flags)?);
    }
    Ok(model.generator(g, weak)?)
}
