//! Guidance at sampling time: `--guidance w` and `--guide-model`, for teachers and guidance-distilled maps.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use candle_core::Device;
use clap::Args;
use flowmap::checkpoint::Checkpoint;
use flowmap::pipeline::{self, Teacher};
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
/// loaded `--guide-model`), or as it is.
pub fn guided<'a>(
    t: &'a Teacher,
    w: Option<f64>,
    weak: Option<&'a Teacher>,
    classes: Option<usize>,
) -> Result<Box<dyn VelocityField + 'a>> {
    let Some(w) = w else { return Ok(Box::new(t)) };
    if let Some(weak) = weak {
        pipeline::check_guide(t, weak)?;
        return Ok(Box::new(flowmap::teacher::Autoguided::new(t, weak, w)?));
    }
    let Some(c) = classes else {
        bail!("--guidance {w}: the model is unconditional; classifier-free guidance needs a class-conditional teacher (trained on labelled data), or guide it by a weaker model with --guide-model");
    };
    Ok(Box::new(flowmap::teacher::Guided::new(t, w, c)?))
}

/// A flow map as it is evaluated: a guidance-distilled one at `--guidance w` (which it needs), any other
/// as it is (it has no guidance input, so `--guidance` is an error).
pub fn map_at<'a>(
    net: &'a flowmap::flow_map::FlowMapNet,
    ck: &Checkpoint,
    g: &GuidanceFlags,
) -> Result<Box<dyn flowmap::flow_map::FlowMap + 'a>> {
    if g.guide_model.is_some() {
        bail!(
            "--guide-model guides a teacher; a flow map has its guidance distilled in (distil it with --guide-model)"
        );
    }
    match (ck.meta.arch.guidance(), g.guidance) {
        (None, None) => Ok(Box::new(net)),
        (None, Some(w)) => bail!(
            "--guidance {w}: this flow map was distilled without guidance, so it has no guidance input; guide its teacher instead, or distil with --guidance-range"
        ),
        (Some([lo, hi]), None) => {
            bail!("this flow map has guidance distilled into it (w in [{lo}, {hi}]): pass --guidance w")
        }
        (Some(_), Some(w)) => Ok(Box::new(flowmap::flow_map::AtGuidance::new(net, w)?)),
    }
}

/// What `--guidance` names in reports: `guidance w = …` or `autoguidance w = …`.
pub fn guidance_label(g: &GuidanceFlags) -> Option<String> {
    let kind = if g.guide_model.is_some() {
        "autoguidance"
    } else {
        "guidance"
    };
    g.guidance.map(|w| format!("{kind} w = {w}"))
}
