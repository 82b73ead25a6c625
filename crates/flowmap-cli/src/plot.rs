//! PNG figures: sample scatter panels, quality-versus-NFE curves and the flow-map error heat map.
//! Text uses the embedded DejaVu Sans, so figures render the same on any machine.

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

use flowmap::{Error, Result};

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

fn init_font() {
    REGISTER.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

fn perr(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Plot {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

/// Renders into a temporary PNG beside `path`, then renames it into place.
fn render(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend, Shift>) -> Result<()>,
) -> Result<()> {
    init_font();
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.{}.tmp.png",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("plot"),
        std::process::id()
    ));
    let result = (|| {
        let root = BitMapBackend::new(&tmp, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| perr(path, e))?;
        draw(&root)?;
        root.present().map_err(|e| perr(path, e))?;
        drop(root);
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// One scatter panel: a title and row-major points (the first two coordinates are drawn).
pub struct Panel<'a> {
    pub title: String,
    pub points: &'a [f64],
    pub dim: usize,
}

/// Points drawn per scatter panel.
pub const SCATTER_POINTS: usize = 10_000;

/// A grid of scatter panels over the square `[-lim, lim]²`, each showing at most [`SCATTER_POINTS`] points.
pub fn scatter_panels(path: &Path, panels: &[Panel<'_>], cols: usize, lim: f64) -> Result<()> {
    let cols = cols.max(1).min(panels.len().max(1));
    let rows_n = panels.len().div_ceil(cols);
    let cell = 300u32;
    render(path, (cell * cols as u32, (cell + 10) * rows_n as u32), |root| {
        let areas = root.split_evenly((rows_n, cols));
        for (panel, area) in panels.iter().zip(areas) {
            let mut chart = ChartBuilder::on(&area)
                .caption(&panel.title, ("sans-serif", 16))
                .margin(6)
                .build_cartesian_2d(-lim..lim, -lim..lim)
                .map_err(|e| perr(path, e))?;
            chart
                .configure_mesh()
                .disable_mesh()
                .x_labels(0)
                .y_labels(0)
                .draw()
                .map_err(|e| perr(path, e))?;
            let color = RGBColor(31, 90, 160).mix(0.35);
            // Beyond a few thousand points a scatter saturates: the few stray samples fill the gaps and every
            // panel looks alike. The first SCATTER_POINTS are drawn (samples are i.i.d., so any prefix is a sample).
            chart
                .draw_series(
                    panel
                        .points
                        .chunks_exact(panel.dim)
                        .take(SCATTER_POINTS)
                        .filter(|p| p[0].abs() < lim && p[1].abs() < lim)
                        .map(|p| Circle::new((p[0], p[1]), 1, color.filled())),
                )
                .map_err(|e| perr(path, e))?;
        }
        Ok(())
    })
}

/// A named curve of `(x, y)` points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Curves on a linear x axis and a logarithmic y axis, each point tagged with its label (e.g. FD against
/// class accuracy, one curve per sampler, one point per guidance scale). `labels[i][j]` tags point `j` of
/// curve `i`.
pub fn lin_log_tagged_lines(
    path: &Path,
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[Series],
    labels: &[Vec<String>],
) -> Result<()> {
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|p| p.0.is_finite() && p.1 > 0.0)
        .collect();
    if all.is_empty() {
        return Err(perr(path, "nothing to plot"));
    }
    let ((x0, x1), (y0, y1)) = extent(&all);
    let pad = ((x1 - x0) * 0.08).max(0.5);
    render(path, (820, 560), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(x0 - pad..x1 + pad, (y0 / 1.3..y1 * 1.3).log_scale())
            .map_err(|e| perr(path, e))?;
        chart
            .configure_mesh()
            .x_desc(xlabel)
            .y_desc(ylabel)
            .label_style(("sans-serif", 14))
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()
            .map_err(|e| perr(path, e))?;
        draw_curves(&mut chart, series, labels, |p| p.0.is_finite() && p.1 > 0.0, path)?;
        draw_legend(&mut chart, SeriesLabelPosition::UpperLeft, path)
    })
}

/// Each series as a line in palette order with its points marked, its legend entry, and, where `tags` has
/// them, each point's label beside it; points failing `keep` (outside the axes' domain) are left out
/// together with their labels.
fn draw_curves<'a, X, Y>(
    chart: &mut ChartContext<'a, BitMapBackend<'a>, Cartesian2d<X, Y>>,
    series: &[Series],
    tags: &[Vec<String>],
    keep: fn(&(f64, f64)) -> bool,
    path: &Path,
) -> Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    for (i, s) in series.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        let no_tags = Vec::new();
        let labels = tags.get(i).unwrap_or(&no_tags);
        let kept: Vec<((f64, f64), Option<&String>)> = s
            .points
            .iter()
            .enumerate()
            .filter(|(_, p)| keep(p))
            .map(|(j, &p)| (p, labels.get(j)))
            .collect();
        chart
            .draw_series(LineSeries::new(kept.iter().map(|k| k.0), c.stroke_width(2)))
            .map_err(|e| perr(path, e))?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        chart
            .draw_series(kept.iter().map(|k| Circle::new(k.0, 4, c.filled())))
            .map_err(|e| perr(path, e))?;
        chart
            .draw_series(
                kept.iter().filter_map(|(p, tag)| {
                    tag.map(|t| Text::new(t.clone(), *p, ("sans-serif", 12).into_font().color(&c)))
                }),
            )
            .map_err(|e| perr(path, e))?;
    }
    Ok(())
}

/// The series' legend, boxed, at `position`.
fn draw_legend<'a, X, Y>(
    chart: &mut ChartContext<'a, BitMapBackend<'a>, Cartesian2d<X, Y>>,
    position: SeriesLabelPosition,
    path: &Path,
) -> Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(position)
        .draw()
        .map_err(|e| perr(path, e))
}

/// The ranges `((x min, x max), (y min, y max))` of `points`.
fn extent(points: &[(f64, f64)]) -> ((f64, f64), (f64, f64)) {
    let (mut x, mut y) = ((f64::MAX, f64::MIN), (f64::MAX, f64::MIN));
    for &(a, b) in points {
        x = (x.0.min(a), x.1.max(a));
        y = (y.0.min(b), y.1.max(b));
    }
    (x, y)
}

/// Curve colours, in order (no grey: levels are drawn black, then grey).
const PALETTE: [RGBColor; 12] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(150, 30, 90),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
    RGBColor(20, 40, 110),
    RGBColor(174, 199, 232),
];

/// Curves on log–log axes (e.g. energy distance against NFE).
pub fn loglog_lines(path: &Path, title: &str, xlabel: &str, ylabel: &str, series: &[Series]) -> Result<()> {
    loglog_lines_with_levels(path, title, xlabel, ylabel, series, &[])
}

/// [`loglog_lines`] with named reference levels drawn as dashed horizontal lines across the plot (black,
/// then grey), e.g. the teacher's best sampler and the metric's floor. Levels at or below zero are left out.
pub fn loglog_lines_with_levels(
    path: &Path,
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[Series],
    levels: &[(String, f64)],
) -> Result<()> {
    let levels: Vec<&(String, f64)> = levels.iter().filter(|l| l.1 > 0.0 && l.1.is_finite()).collect();
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|p| p.0 > 0.0 && p.1 > 0.0)
        .collect();
    let all: Vec<(f64, f64)> = match all.first() {
        Some(&(x, _)) => all.iter().copied().chain(levels.iter().map(|l| (x, l.1))).collect(),
        None => all,
    };
    if all.is_empty() {
        return Err(perr(path, "nothing to plot"));
    }
    let ((x0, x1), (y0, y1)) = extent(&all);
    render(path, (820, 560), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d((x0 / 1.3..x1 * 1.3).log_scale(), (y0 / 1.5..y1 * 1.5).log_scale())
            .map_err(|e| perr(path, e))?;
        chart
            .configure_mesh()
            .x_desc(xlabel)
            .y_desc(ylabel)
            .label_style(("sans-serif", 14))
            .y_label_formatter(&|v| format!("{v:.0e}"))
            .x_label_formatter(&|v| one_two_five(*v))
            .draw()
            .map_err(|e| perr(path, e))?;
        draw_curves(&mut chart, series, &[], |p| p.0 > 0.0 && p.1 > 0.0, path)?;
        for (i, (name, v)) in levels.iter().map(|l| (&l.0, l.1)).enumerate() {
            let c = if i == 0 { BLACK } else { RGBColor(150, 150, 150) };
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(x0 / 1.3, v), (x1 * 1.3, v)],
                    8,
                    5,
                    c.stroke_width(2),
                ))
                .map_err(|e| perr(path, e))?
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        }
        draw_legend(&mut chart, SeriesLabelPosition::UpperRight, path)
    })
}

/// A log axis's label at 1, 2 and 5 times a power of ten, none elsewhere (all of them crowd a decade).
fn one_two_five(v: f64) -> String {
    let mantissa = v / 10f64.powf(v.log10().floor());
    if [1.0, 2.0, 5.0, 10.0].iter().any(|m| (mantissa - m).abs() < 1e-6) {
        format!("{v:.0}")
    } else {
        String::new()
    }
}

/// A heat map of `log10(value)` over `(t, s)` cells of an `n`-point grid (`t` across, `s` up; `s < t` only).
pub fn triangle_heatmap(path: &Path, title: &str, cells: &[(f64, f64, f64)], n: usize) -> Result<()> {
    let logs: Vec<f64> = cells.iter().map(|c| c.2.max(1e-12).log10()).collect();
    let (lo, hi) = logs.iter().fold((f64::MAX, f64::MIN), |a, &v| (a.0.min(v), a.1.max(v)));
    let span = (hi - lo).max(1e-6);
    let h = 1.0 / (n - 1) as f64;
    render(path, (700, 600), |root| {
        let (main, bar) = root.split_horizontally(600);
        let mut chart = ChartBuilder::on(&main)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(50)
            .build_cartesian_2d(-h / 2.0..1.0 + h / 2.0, -h / 2.0..1.0 + h / 2.0)
            .map_err(|e| perr(path, e))?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("t (start)")
            .y_desc("s (end)")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| perr(path, e))?;
        chart
            .draw_series(cells.iter().zip(&logs).map(|(&(t, s, _), &l)| {
                let c = ViridisRGB::get_color_normalized(l, lo, lo + span);
                Rectangle::new([(t - h / 2.0, s - h / 2.0), (t + h / 2.0, s + h / 2.0)], c.filled())
            }))
            .map_err(|e| perr(path, e))?;
        // Colour bar with its log10 scale.
        let mut cb = ChartBuilder::on(&bar)
            .margin_top(40)
            .margin_bottom(55)
            .y_label_area_size(40)
            .build_cartesian_2d(0.0..1.0, lo..lo + span)
            .map_err(|e| perr(path, e))?;
        cb.configure_mesh()
            .disable_mesh()
            .x_labels(0)
            .y_desc("log10")
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(|e| perr(path, e))?;
        let steps = 50;
        cb.draw_series((0..steps).map(|i| {
            let a = lo + span * i as f64 / steps as f64;
            let b = lo + span * (i + 1) as f64 / steps as f64;
            Rectangle::new(
                [(0.0, a), (1.0, b)],
                ViridisRGB::get_color_normalized(a, lo, lo + span).filled(),
            )
        }))
        .map_err(|e| perr(path, e))?;
        Ok(())
    })
}
