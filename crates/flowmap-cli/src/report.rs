//! What the command line shows and writes: progress bars and Markdown tables.

use flowmap::pipeline::EvalRow;
use flowmap::train::{Progress, TrainEvent};
use indicatif::{ProgressBar, ProgressStyle};

/// A progress bar for `n` steps (hidden when `show` is false or stderr is not a terminal); `n = 0` is a
/// spinner, for runs bounded by time.
pub fn progress_bar(n: u64, label: &str, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    if n == 0 {
        let pb = ProgressBar::new_spinner();
        pb.set_style(
            ProgressStyle::with_template("{prefix:>12} {spinner} {pos} steps {elapsed_precise} {msg}")
                .expect("valid template"),
        );
        pb.set_prefix(label.to_string());
        return pb;
    }
    let pb = ProgressBar::new(n);
    pb.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_prefix(label.to_string());
    pb
}

/// A training run's progress on a bar: one tick per step, the smoothed loss as its message.
pub struct Bar<'a>(pub &'a ProgressBar);

impl Progress for Bar<'_> {
    fn step(&self, step: usize, loss: Option<f64>) {
        if let Some(l) = loss {
            self.0.set_message(format!("loss {l:.4}"));
        }
        self.0.set_position(step as u64);
    }
    fn event(&self, e: &TrainEvent) {
        announce(self.0, e);
    }
}

/// A rollback (or another event) printed above the bar, shown even when the bar is hidden.
fn announce(pb: &ProgressBar, e: &TrainEvent) {
    pb.suspend(|| eprintln!("step {}: {}", e.step, e.what));
}

/// [`Bar`] for image batches: the message also shows images per second (of this process's steps: a
/// resumed run counts from where it resumed).
pub struct ImageBar<'a> {
    pub bar: &'a ProgressBar,
    pub batch: usize,
    first: std::cell::Cell<Option<(u64, std::time::Instant)>>,
}

impl<'a> ImageBar<'a> {
    pub fn new(bar: &'a ProgressBar, batch: usize) -> Self {
        ImageBar {
            bar,
            batch,
            first: std::cell::Cell::new(None),
        }
    }
}

impl Progress for ImageBar<'_> {
    fn step(&self, step: usize, loss: Option<f64>) {
        let (first, since) = match self.first.get() {
            Some(f) => f,
            None => {
                let f = (step.saturating_sub(1) as u64, std::time::Instant::now());
                self.first.set(Some(f));
                f
            }
        };
        self.bar.set_position(step as u64);
        if let Some(l) = loss {
            let secs = since.elapsed().as_secs_f64().max(1e-9);
            let rate = (step as u64).saturating_sub(first) as f64 * self.batch as f64 / secs;
            self.bar.set_message(format!("loss {l:.4}, {rate:.0} img/s"));
        }
    }
    fn event(&self, e: &TrainEvent) {
        announce(self.bar, e);
    }
}

/// The progress reporter of a run on states of `shape` with batches of `batch`: images per second for
/// images, the loss alone otherwise.
pub fn bar_for<'a>(pb: &'a ProgressBar, shape: &[usize], batch: usize) -> Box<dyn Progress + 'a> {
    if shape.len() == 3 {
        Box::new(ImageBar::new(pb, batch))
    } else {
        Box::new(Bar(pb))
    }
}

/// A Markdown table of evaluation rows.
pub fn eval_table(rows: &[EvalRow]) -> String {
    let kl = rows.iter().any(|r| r.distances.kl.is_some());
    let mut s = String::from("| model | sampler | NFE | energy distance | sliced W2 | MMD² |");
    s += if kl { " KL (histogram) |\n" } else { "\n" };
    s += "|---|---|---:|---:|---:|---:|";
    s += if kl { "---:|\n" } else { "\n" };
    for r in rows {
        s += &format!(
            "| {} | {} | {} | {:.5} | {:.4} | {:.5} |",
            r.model, r.sampler, r.nfe, r.distances.energy, r.distances.sliced_w2, r.distances.mmd2
        );
        if kl {
            s += &r
                .distances
                .kl
                .map(|v| format!(" {v:.4} |"))
                .unwrap_or_else(|| " – |".into());
        }
        s += "\n";
    }
    s
}

/// A Markdown table of image rows.
pub fn image_table(rows: &[flowmap::pipeline::images::ImageRow]) -> String {
    let mut s = String::from("| model | sampler | NFE | FD | precision | recall | class accuracy | seconds |\n");
    s.push_str("|---|---|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        let acc = r
            .metrics
            .accuracy
            .map_or("-".to_string(), |a| format!("{:.1}%", 100.0 * a));
        s.push_str(&format!(
            "| {} | {} | {} | {:.3} | {:.3} | {:.3} | {} | {:.1} |\n",
            r.model, r.sampler, r.nfe, r.metrics.fd, r.metrics.precision, r.metrics.recall, acc, r.seconds
        ));
    }
    s
}
