//! `flowmap eval`: score samples against held-out data at several NFE; writes metrics JSON, a Markdown table
//! and figures.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use candle_core::Device;
use clap::Args;
use flowmap::data::{DataSource, Toy};
use flowmap::io;
use flowmap::pipeline::{self, EvalSettings, Model, OutDir, Teacher};
use flowmap::sample::{SampleContext, Sampler, TimeGrid};
use flowmap::Cond;

use super::common::{data_help, open_data, parse_nfes};
use super::guidance::{guidance_label, guided, map_at, GuidanceFlags};
use super::model::map_sampler;
use super::Ctx;
use crate::report::{self, eval_table};
use crate::{grid, plot};

#[derive(Args)]
pub struct EvalArgs {
    /// Flow-map or teacher checkpoint.
    #[arg(long)]
    pub model: String,
    /// Held-out data (default: the model's training data).
    #[arg(long, long_help = data_help("Held-out data (default: the model's training data)"))]
    pub data: Option<String>,
    /// Labels of an .npy image array: a 1-D .npy of N integers (class-conditional training).
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Comma-separated NFE values.
    #[arg(long, default_value = "1,2,4,8")]
    pub nfe: String,
    /// Samples per row.
    #[arg(long, default_value_t = 10_000)]
    pub n: usize,
    /// How a flow map walks its grid: deterministic, consistency or gamma:G (default: consistency for a
    /// consistency model, deterministic otherwise).
    #[arg(long)]
    pub sampler: Option<String>,
    /// A flow map's k-step grid t_i = (1 − i/k)^ρ: 1 is uniform, larger ρ steps finer near the data.
    #[arg(long, default_value_t = 1.0)]
    pub grid_power: f64,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Images: the classifier whose features FD, precision and recall are measured in (default: the
    /// shipped MNIST classifier).
    #[arg(long)]
    pub classifier: Option<PathBuf>,
    #[command(flatten)]
    pub guide: GuidanceFlags,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(a: EvalArgs, cx: &Ctx) -> Result<()> {
    let device = &cx.device;
    let nfes = parse_nfes(&a.nfe)?;
    if a.n < 2 {
        bail!("--n must be at least 2");
    }
    let model = Model::load(&a.model, device)?;
    // The guidance flags are checked before the output folder exists.
    let weak = a.guide.load(device)?;
    match &model {
        Model::Map(net, _) => drop(map_at(net, &a.guide)?),
        Model::Teacher(t) => drop(guided(t, a.guide.guidance, weak.as_ref())?),
    }
    let data = match (&a.data, &model) {
        (Some(spec), _) => open_data(spec, &a.labels)?,
        (None, _) if a.labels.is_some() => bail!("--labels goes with --data"),
        (None, Model::Map(_, ck)) => pipeline::data_of(&ck.meta)?,
        (None, Model::Teacher(t)) => t.data()?,
    };
    let dim = flowmap::state::numel(&model.state_shape());
    if data.dim() != dim {
        bail!(
            "data '{}' has dimension {}, but the model expects {dim}",
            data.name(),
            data.dim()
        );
    }
    // Every flag is checked before the output folder exists: a flow map's sampler and grid, and that a
    // teacher was given neither.
    TimeGrid::power(1, a.grid_power)?;
    let sampler = match &model {
        Model::Map(_, ck) => Some(map_sampler(a.sampler.as_deref(), ck, nfes.iter().any(|&k| k > 1))?),
        Model::Teacher(_) if a.sampler.is_some() => {
            bail!("--sampler applies to flow maps; a teacher is scored with Euler and dopri5")
        }
        Model::Teacher(_) if a.grid_power != 1.0 => {
            bail!("--grid-power applies to flow maps; a teacher is scored with Euler and dopri5")
        }
        Model::Teacher(_) => None,
    };
    if model.state_shape().len() == 3 {
        return eval_images(&a, &model, weak.as_ref(), &data, &nfes, sampler, device);
    }
    if a.classifier.is_some() {
        bail!("--classifier applies to image models");
    }
    let out = OutDir::create(&a.out)?;
    let reference = data.heldout(a.n, a.seed);
    let n_ref = reference.len() / dim;
    let settings = EvalSettings {
        n: a.n,
        seed: a.seed,
        max_points: if dim <= 16 { 10_000 } else { 2000 },
        grid_power: a.grid_power,
    };
    let checker = matches!(data, DataSource::Toy(Toy::Checkerboard));
    let (rows, samples) = match (&model, sampler) {
        (Model::Map(net, ck), Some(sampler)) => {
            let path = ck.meta.probability_path()?;
            let cx = SampleContext::new(a.seed).with_path(&*path);
            pipeline::eval_map(
                "flow map", net, &nfes, sampler, &cx, &reference, checker, &settings, device,
            )?
        }
        (Model::Map(..), None) => unreachable!("a flow map's sampler is resolved above"),
        (Model::Teacher(t), _) => {
            // Euler at each NFE, then the adaptive solver: the teacher's own best.
            let solvers = pipeline::euler_and_dopri5(nfes.as_ref(), 1e-5);
            pipeline::eval_teacher(
                "teacher",
                t,
                &solvers,
                &Cond::none(),
                &reference,
                checker,
                &settings,
                device,
            )?
        }
    };
    let mut md = format!(
        "# flowmap eval: {}\n\n{} samples per row against {n_ref} held-out points of '{}'.\n\n",
        a.model,
        a.n,
        data.name()
    );
    md += &eval_table(&rows);
    // Where the data is a Gaussian mixture its exact flow map is known: measure the map against it.
    let exact_report = match (&model, &data) {
        (Model::Map(net, ck), DataSource::Mixture(mix)) if !ck.meta.kind.boundary_only() => {
            let r = pipeline::exact_map_report(net, mix, 2000, a.seed, device)?;
            md += &format!(
                "\nAgainst the mixture's exact flow map Φ: relative error E‖f − Φ‖²/E‖Φ − x‖² = {:.3e} with (t, s) uniform, {:.3e} averaged over an 11-point grid; semigroup error {:.3e}.\n",
                r.relative_error_uniform, r.relative_error_grid, r.semigroup
            );
            eprintln!(
                "exact-map relative error {:.3e} (uniform pairs), semigroup error {:.3e}",
                r.relative_error_uniform, r.semigroup
            );
            Some(r)
        }
        _ => None,
    };
    let json = serde_json::json!({ "rows": rows, "exact_map": exact_report });
    io::write_text(&out.file("metrics.json"), &serde_json::to_string_pretty(&json)?)?;
    if dim >= 2 {
        let mut panels = vec![plot::Panel {
            title: "data (held out)".into(),
            points: &reference,
            dim,
        }];
        for (r, s) in rows.iter().zip(&samples) {
            panels.push(plot::Panel {
                title: format!("NFE {}", r.nfe),
                points: s,
                dim,
            });
        }
        plot::scatter_panels(&out.file("samples.png"), &panels, 5, 3.0)?;
        md += "\n![samples](samples.png)\n";
    }
    io::write_text(&out.file("metrics.md"), &md)?;
    print!("{}", eval_table(&rows));
    Ok(())
}

/// The classifier named by `--classifier`, or the shipped MNIST one.
pub fn load_classifier(path: Option<&Path>, device: &Device) -> Result<flowmap::classifier::Classifier> {
    Ok(match path {
        Some(p) => flowmap::classifier::Classifier::load(p, device)?,
        None => flowmap::classifier::Classifier::embedded_mnist(device)?,
    })
}

/// `eval` on images: FD, precision, recall and class accuracy at each NFE beside the data's floor, and a
/// grid per row.
pub fn eval_images(
    a: &EvalArgs,
    model: &Model,
    weak: Option<&Teacher>,
    data: &DataSource,
    nfes: &[usize],
    sampler: Option<Sampler>,
    device: &Device,
) -> Result<()> {
    let clf = load_classifier(a.classifier.as_deref(), device)?;
    let ev = pipeline::images::ImageEval::new(&clf, data, a.n, a.seed, device)?.with_grid_power(a.grid_power)?;
    let out = OutDir::create(&a.out)?;
    let classes = model.num_classes();
    let mut rows = vec![ev.floor(data, device)?];
    let (r, samples) = match (model, sampler) {
        (Model::Map(net, ck), Some(sampler)) => {
            let path = ck.meta.probability_path()?;
            let name = match guidance_label(&a.guide) {
                Some(g) => format!("flow map ({g})"),
                None => "flow map".into(),
            };
            ev.map(
                &name,
                &*map_at(net, &a.guide)?,
                classes,
                nfes,
                sampler,
                &*path,
                device,
            )?
        }
        (Model::Map(..), None) => unreachable!("a flow map's sampler is resolved before"),
        (Model::Teacher(t), _) => {
            let solvers = pipeline::euler_and_dopri5(nfes.as_ref(), 1e-5);
            let name = match guidance_label(&a.guide) {
                Some(g) => format!("teacher ({g})"),
                None => "teacher".into(),
            };
            let field = guided(t, a.guide.guidance, weak)?;
            ev.teacher(&name, &*field, classes, &solvers, device)?
        }
    };
    let mut md = format!(
        "# flowmap eval: {}

{} samples per row against held-out images of '{}', in the features of the classifier trained on '{}' (held-out accuracy {:.2}%).

",
        a.model,
        a.n,
        data.name(),
        clf.meta.data,
        100.0 * clf.meta.heldout_accuracy
    );
    let grid_rows = classes.unwrap_or(10);
    for (i, (row, x)) in r.iter().zip(&samples).enumerate() {
        let name = format!("grid-{i}-nfe{}.png", row.nfe);
        let shown = x.narrow(0, 0, x.dim(0)?.min(grid_rows * 10))?;
        grid::write_grid(&out.file(&name), &shown, grid_rows)?;
        md += &format!("![{} NFE {}]({name}) ", row.sampler, row.nfe);
    }
    rows.extend(r);
    let table = report::image_table(&rows);
    md = format!("{md}\n\n{table}");
    io::write_text(
        &out.file("metrics.json"),
        &serde_json::to_string_pretty(&serde_json::json!({ "rows": rows }))?,
    )?;
    io::write_text(&out.file("metrics.md"), &md)?;
    print!("{table}");
    Ok(())
}
