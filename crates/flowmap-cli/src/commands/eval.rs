//! `flowmap eval`: score samples against held-out data at several NFE; writes metrics JSON, a Markdown table
//! and figures.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use flowmap::classifier::Classifier;
use flowmap::data::DataSource;
use flowmap::io;
use flowmap::pipeline::images::ImageRow;
use flowmap::pipeline::{self, EvalRow, Evaluate, Evaluation, ExactMapReport, Model, OutDir};
use flowmap::sample::Sampler;

use super::common::{data_help, open_data, parse_nfes};
use super::guidance::{guided, map_at, GuidanceFlags};
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
    if let Model::Teacher(_) = &model {
        if a.sampler.is_some() {
            bail!("--sampler applies to flow maps; a teacher is scored with Euler and dopri5");
        }
        if a.grid_power != 1.0 {
            bail!("--grid-power applies to flow maps; a teacher is scored with Euler and dopri5");
        }
    }
    let images = model.state_shape().len() == 3;
    if a.classifier.is_some() && !images {
        bail!("--classifier applies to image models");
    }
    let clf = images
        .then(|| load_classifier(a.classifier.as_deref(), device))
        .transpose()?;
    let e = Evaluate {
        nfes,
        n: a.n,
        seed: a.seed,
        sampler: a.sampler.as_deref().map(Sampler::parse).transpose()?,
        grid_power: a.grid_power,
        guidance: a.guide.guidance,
        guide: weak.as_ref(),
        classifier: clf.as_ref(),
    };
    // `evaluate` checks every setting before it computes; the output folder is made after it.
    let result = pipeline::evaluate(&model, &data, &e, device)?;
    let out = OutDir::create(&a.out)?;
    match result {
        Evaluation::Images { rows, samples } => {
            write_images(&a, &model, &data, clf.as_ref().expect("images"), rows, &samples, &out)
        }
        Evaluation::Points {
            rows,
            samples,
            reference,
            exact,
        } => write_points(&a, &data, rows, &samples, &reference, exact, &out),
    }
}

/// The report of a points evaluation: `metrics.json`, `metrics.md` and the samples beside the data.
fn write_points(
    a: &EvalArgs,
    data: &DataSource,
    rows: Vec<EvalRow>,
    samples: &[Vec<f64>],
    reference: &[f64],
    exact: Option<ExactMapReport>,
    out: &OutDir,
) -> Result<()> {
    let dim = data.dim();
    let n_ref = reference.len() / dim;
    let mut md = format!(
        "# flowmap eval: {}\n\n{} samples per row against {n_ref} held-out points of '{}'.\n\n",
        a.model,
        a.n,
        data.name()
    );
    md += &eval_table(&rows);
    // Where the data is a Gaussian mixture its exact flow map is known: the map against it.
    if let Some(r) = &exact {
        md += &format!(
            "\nAgainst the mixture's exact flow map Φ: relative error E‖f − Φ‖²/E‖Φ − x‖² = {:.3e} with (t, s) uniform, {:.3e} averaged over an 11-point grid; semigroup error {:.3e}.\n",
            r.relative_error_uniform, r.relative_error_grid, r.semigroup
        );
        eprintln!(
            "exact-map relative error {:.3e} (uniform pairs), semigroup error {:.3e}",
            r.relative_error_uniform, r.semigroup
        );
    }
    let json = serde_json::json!({ "rows": rows, "exact_map": exact });
    io::write_text(&out.file("metrics.json"), &serde_json::to_string_pretty(&json)?)?;
    if dim >= 2 {
        let mut panels = vec![plot::Panel {
            title: "data (held out)".into(),
            points: reference,
            dim,
        }];
        for (r, s) in rows.iter().zip(samples) {
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

/// The report of an image evaluation: FD, precision, recall and class accuracy at each NFE beside the
/// data's floor, and a grid per row.
fn write_images(
    a: &EvalArgs,
    model: &Model,
    data: &DataSource,
    clf: &Classifier,
    rows: Vec<ImageRow>,
    samples: &[Tensor],
    out: &OutDir,
) -> Result<()> {
    let classes = model.num_classes();
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
    for (i, (row, x)) in rows[1..].iter().zip(samples).enumerate() {
        let name = format!("grid-{i}-nfe{}.png", row.nfe);
        let shown = x.narrow(0, 0, x.dim(0)?.min(grid_rows * 10))?;
        grid::write_grid(&out.file(&name), &shown, grid_rows)?;
        md += &format!("![{} NFE {}]({name}) ", row.sampler, row.nfe);
    }
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
