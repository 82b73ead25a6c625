//! `flowmap bench convergence`: every method's error against the exact solution operator Φ of an analytic
//! Gaussian mixture, as a function of its training budget. Each budget is a separate run with its own full
//! schedule (warm-up and decay over that many steps), so a point is what a user gets for that budget, not a
//! snapshot of a longer run. The error is `E‖f − Φ‖² / E‖Φ − x‖²` on held-out states `x_t`, `(t, s)` uniform
//! on the triangle (a consistency model at `s = 0`, the only target it has). The slope of its least-squares
//! line in log–log coordinates is the empirical rate: error ∝ steps^rate.

use std::path::Path;
use std::time::Instant;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::plot;
use crate::report::{progress_bar, Bar};
use flowmap::backbone::{Arch, MlpConfig};
use flowmap::metrics;
use flowmap::objective::Method;
use flowmap::pipeline::{MapJob, OutDir, RunConfig};
use flowmap::train::TrainConfig;
use flowmap::Result;

/// One run: a method at one budget.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConvergenceRow {
    pub method: String,
    pub steps: usize,
    pub relative_error: f64,
    /// Whether the error is at `s = 0` only (a consistency model).
    pub to_data_only: bool,
    pub seconds: f64,
}

/// A method's fitted rate: `ln error ≈ intercept + rate · ln steps` over its budgets.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConvergenceFit {
    pub method: String,
    pub rate: f64,
    pub intercept: f64,
    /// The error at the largest budget.
    pub final_error: f64,
}

/// Least squares of `ln y` on `ln x`: `(slope, intercept)`.
pub fn loglog_fit(points: &[(f64, f64)]) -> (f64, f64) {
    let pts: Vec<(f64, f64)> = points
        .iter()
        .filter(|(x, y)| *x > 0.0 && *y > 0.0)
        .map(|(x, y)| (x.ln(), y.ln()))
        .collect();
    let n = pts.len() as f64;
    if pts.len() < 2 {
        return (f64::NAN, pts.first().map_or(f64::NAN, |p| p.1));
    }
    let (mx, my) = (
        pts.iter().map(|p| p.0).sum::<f64>() / n,
        pts.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let sxy: f64 = pts.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let sxx: f64 = pts.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    let slope = sxy / sxx;
    (slope, my - slope * mx)
}

/// What `flowmap bench convergence` trains: each method at each budget, at one batch size and seed, with
/// the `[train]`, `[distill]` and `[arch]` tables of `config` laid over the defaults (the budget, batch and
/// seed are the options').
#[derive(Clone, Debug)]
pub struct ConvergenceOptions {
    pub methods: Vec<Method>,
    pub budgets: Vec<usize>,
    pub batch: usize,
    pub seed: u64,
    /// The run configuration and the file it came from (named in the report).
    pub config: Option<(RunConfig, String)>,
}

/// Trains every method of `opts` at every budget on the analytic mixture (teacher-based methods distil its
/// exact velocity; the others train from its samples) and writes `convergence.json`, `convergence.md` and
/// `convergence.png` to `out`.
pub fn convergence(
    out: &Path,
    opts: &ConvergenceOptions,
    device: &Device,
    show: bool,
) -> Result<(Vec<ConvergenceRow>, Vec<ConvergenceFit>)> {
    let (methods, budgets, batch, seed) = (&opts.methods[..], &opts.budgets[..], opts.batch, opts.seed);
    let config = opts.config.as_ref().map(|(c, _)| c.clone()).unwrap_or_default();
    let probe = super::MixtureProbe::new(seed, device)?;
    let (teacher, data, points) = (&probe.teacher, &probe.data, probe.points());
    let exact = probe.exact();
    let n = 2000;
    // Every student is fresh (the analytic teacher has no weights to start from), with the CLI's defaults
    // for one: an MLP 256×3 whose time embedding has 8 frequencies up to 4; then the `[arch]` table.
    let mut student = Arch::Mlp(MlpConfig::new(2));
    if let Some((_, table)) = flowmap::pipeline::student_defaults()
        .iter()
        .find(|(k, _)| *k == student.name())
    {
        student = student.with_settings(table, "student defaults")?;
    }
    let student = config.arch_over(student)?;
    let Arch::Mlp(mlp) = &student else {
        return Err(flowmap::Error::Config(
            "[arch]: the convergence bench trains an MLP".into(),
        ));
    };
    let (hidden, depth) = (mlp.hidden, mlp.depth);
    let train = config.train_config()?;
    let out = OutDir::create(out)?;
    let mut rows = vec![];
    for &method in methods {
        for &steps in budgets {
            let pb = progress_bar(steps as u64, &format!("{method} {steps}"), show);
            let start = Instant::now();
            let base = MapJob::new(method, data);
            let job = MapJob {
                teacher: method.needs_teacher().then_some(teacher),
                train: TrainConfig {
                    steps,
                    batch_size: batch,
                    seed,
                    ..train.clone()
                },
                objective: config.distill_config_over(base.objective)?,
                arch: student.clone(),
                device: device.clone(),
                ..base
            };
            let m = job.run(&Bar(&pb))?;
            pb.finish_and_clear();
            let to_data_only = method.boundary_only();
            let relative_error = if to_data_only {
                metrics::relative_error_to_data(&m.net, &exact, &points, seed)?
            } else {
                metrics::relative_error_uniform(&m.net, &exact, &points, seed)?
            };
            rows.push(ConvergenceRow {
                method: method.name().into(),
                steps,
                relative_error,
                to_data_only,
                seconds: start.elapsed().as_secs_f64(),
            });
        }
    }
    let fits: Vec<ConvergenceFit> = methods
        .iter()
        .map(|m| {
            let pts: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r.method == m.name())
                .map(|r| (r.steps as f64, r.relative_error))
                .collect();
            let (rate, intercept) = loglog_fit(&pts);
            ConvergenceFit {
                method: m.name().into(),
                rate,
                intercept,
                final_error: pts.last().map_or(f64::NAN, |p| p.1),
            }
        })
        .collect();
    let series: Vec<plot::Series> = fits
        .iter()
        .map(|f| plot::Series {
            name: format!("{} (rate {:.2})", f.method, f.rate),
            points: rows
                .iter()
                .filter(|r| r.method == f.method)
                .map(|r| (r.steps as f64, r.relative_error))
                .collect(),
        })
        .collect();
    plot::loglog_lines(
        &out.file("convergence.png"),
        "flow-map error against the exact Φ (analytic mixture)",
        "training steps (each a full run)",
        "E‖f − Φ‖² / E‖Φ − x‖²",
        &series,
    )?;
    let budgets_text: Vec<String> = budgets.iter().map(|b| b.to_string()).collect();
    // The configuration's flag in the command line, and the file's tables printed below it.
    let (config_flag, config_text) = match &opts.config {
        Some((c, file)) => (
            format!(" --config {file}"),
            format!(
                "`{file}`:\n\n```toml\n{}```\n\n",
                toml::to_string(c).expect("a run configuration serialises")
            ),
        ),
        None => (String::new(), String::new()),
    };
    let mut md = format!(
        "# Convergence to the exact flow map\n\nProduced by `flowmap bench convergence --methods {} --steps {} --batch {batch} --seed {seed}{}`. The analytic three-component Gaussian mixture (`GaussianMixture::three_widths`): teacher-based methods distil its exact velocity, the others train from its samples; a fresh MLP {hidden}×{depth} student (time embedding: 8 frequencies up to 4, the CLI's for a fresh student), batch {batch}, each budget a separate run with its full schedule. Error: `E‖f − Φ‖²/E‖Φ − x‖²` against dopri5 (tolerance 1e-6) on {n} held-out states, `(t, s)` uniform on the triangle (`cm`, which maps only to `s = 0`, at `s = 0`). Rate: the slope of the least-squares line through `(ln steps, ln error)`.\n\n{}![convergence](convergence.png)\n\n| method | {} | rate | error at {} steps |\n|---|{}---:|---:|\n",
        methods.iter().map(|m| m.name()).collect::<Vec<_>>().join(","),
        budgets_text.join(","),
        config_flag,
        config_text,
        budgets_text.iter().map(|b| format!("{b} steps")).collect::<Vec<_>>().join(" | "),
        budgets.last().copied().unwrap_or(0),
        "---:|".repeat(budgets.len()),
    );
    for f in &fits {
        let cells: Vec<String> = budgets
            .iter()
            .map(|&b| {
                rows.iter()
                    .find(|r| r.method == f.method && r.steps == b)
                    .map_or("–".into(), |r| format!("{:.2e}", r.relative_error))
            })
            .collect();
        let name = if rows.iter().any(|r| r.method == f.method && r.to_data_only) {
            format!("{} (s = 0)", f.method)
        } else {
            f.method.clone()
        };
        md += &format!(
            "| {name} | {} | {:.2} | {:.2e} |\n",
            cells.join(" | "),
            f.rate,
            f.final_error
        );
    }
    let total: f64 = rows.iter().map(|r| r.seconds).sum();
    md += &format!("\nWall time of all runs: {total:.0} s.\n");
    flowmap::io::write_text(
        &out.file("convergence.json"),
        &serde_json::to_string_pretty(&serde_json::json!({ "rows": rows, "fits": fits, "batch": batch, "seed": seed, "config": config, "hidden": hidden, "depth": depth }))
            .expect("rows serialise"),
    )?;
    flowmap::io::write_text(&out.file("convergence.md"), &md)?;
    Ok((rows, fits))
}

#[cfg(test)]
mod tests {
    use super::loglog_fit;

    #[test]
    fn the_fit_recovers_a_power_law() {
        let pts: Vec<(f64, f64)> = [100.0, 200.0, 400.0, 800.0]
            .iter()
            .map(|&x| (x, 3.0 * f64::powf(x, -1.5)))
            .collect();
        let (rate, intercept) = loglog_fit(&pts);
        assert!((rate + 1.5).abs() < 1e-12 && (intercept - 3f64.ln()).abs() < 1e-10);
    }
}
