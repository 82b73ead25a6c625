//! The `flowmap` command-line tool: the application over the `flowmap` library — its commands
//! (`commands/`, one file each), reports, plots, the demo and the benchmarks.

mod alloc;
mod arch;
mod bench;
mod commands;
mod demo;
mod demo_mnist;
mod grid;
mod plot;
mod ranks;
mod report;
mod supervise;

use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

use commands::Ctx;

#[global_allocator]
static GLOBAL: alloc::Watched = alloc::Watched;

#[derive(Parser)]
#[command(
    name = "flowmap",
    version,
    about = "Flow map learning: few-step generators distilled from flow-matching teachers"
)]
struct Cli {
    /// Worker threads for tensor kernels and metrics (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Hide progress bars.
    #[arg(long, global = true)]
    quiet: bool,
    /// Device: cpu, cuda, cuda:N, metal or metal:N (CUDA needs a build with `--features cuda`).
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
    /// Run every layer on candle's own ops instead of flowmap's fused CPU kernels: the path every other
    /// device takes (slower; for checking the kernels, and for bf16 rounding on CPUs without AVX-512 BF16).
    #[arg(long, global = true)]
    plain_ops: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a velocity network (the teacher) by conditional flow matching.
    Teacher(commands::teacher::TeacherArgs),
    /// Distil a flow map from a teacher checkpoint or an analytic `gmm:SPEC.json` teacher.
    Distill(commands::distill::DistillArgs),
    /// Train a flow map from data alone (MeanFlow, Lagrangian self-distillation, shortcut).
    Train(commands::train::TrainArgs),
    /// Generate samples from a flow map (k-step) or a teacher (ODE solver).
    Sample(commands::sample::SampleArgs),
    /// Evaluate f(x, t, s) on points: a flow map, or Φ_{t→s} of a teacher by an ODE solver.
    Apply(commands::apply::ApplyArgs),
    /// Score samples against held-out data at several NFE (a teacher: Euler at each NFE and dopri5); writes metrics JSON, a Markdown table and plots.
    Eval(commands::eval::EvalArgs),
    /// Train the image classifier whose features the image metrics (FD, precision, recall, accuracy) use.
    Classifier(commands::classifier::ClassifierArgs),
    /// The end-to-end demo on embedded data: teacher → EMD and LMD maps → report with figures.
    Demo(commands::demo::DemoArgs),
    /// Benchmarks that train for real and write JSON and Markdown.
    #[command(subcommand)]
    Bench(commands::bench::BenchCommand),
}

fn main() -> ExitCode {
    alloc::keep_freed_memory();
    // Output piped into a reader that stops early (`| head`) ends the program quietly, as in any Unix tool,
    // instead of a panic on the failed write.
    #[cfg(unix)]
    // SAFETY: restores the default disposition of SIGPIPE before any other thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind::*;
            if matches!(
                e.kind(),
                DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line: clap's first line names the problem; a list that follows a colon is folded in.
            let text = e.render().to_string();
            let mut lines = text.lines();
            let mut line = lines.next().unwrap_or("error: bad arguments").to_string();
            if line.ends_with(':') {
                let items: Vec<&str> = lines.map(str::trim).take_while(|l| !l.is_empty()).collect();
                line = format!("{} {}", line, items.join(", "));
            }
            eprintln!("{line}");
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<ranks::Quiet>() => ExitCode::FAILURE,
        Err(e) if e.is::<supervise::Interrupted>() => {
            eprintln!("{e}");
            ExitCode::from(supervise::INTERRUPTED)
        }
        Err(e) => {
            // The library's messages already name their cause; the chain would repeat it.
            let msg = e.to_string();
            eprintln!("error: {}", msg.lines().next().unwrap_or(""));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let n = match cli.threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    flowmap::set_compute_threads(n);
    if cli.plain_ops {
        flowmap::kernels::set_enabled(false);
    }
    // Everything runs on one rayon pool of n workers, the caller included: the fused kernels' parallel
    // regions then start on a worker that is already awake instead of waking the pool from outside.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(n).build()?;
    pool.install(|| run_command(cli))
}

fn run_command(cli: Cli) -> Result<()> {
    // Under `mpirun -np N`, this process is one rank of a data-parallel run (MPI is initialised on this
    // thread, which makes every MPI call of the run).
    let mut ranks = ranks::Ranks::from_launch()?;
    let rank = ranks::rank_of(ranks.as_ref());
    // Under ranks, each takes its own device (a GPU by its place on its machine), or every rank refuses.
    let device = match &mut ranks {
        None => Ok(flowmap::parse_device(&cli.device)?),
        Some(_)
            if !matches!(
                cli.command,
                Command::Teacher(_) | Command::Distill(_) | Command::Train(_)
            ) =>
        {
            Err(flowmap::Error::Ranks(
                "only teacher, distill and train run data-parallel; run `flowmap` as one process for the others".into(),
            )
            .into())
        }
        Some(r) => r.device(&cli.device),
    };
    let (device, ranks) = match (device, ranks) {
        (Ok(device), ranks) => (device, ranks),
        (Err(e), None) => return Err(e),
        (Err(e), Some(r)) => return Err(rank_error(e, &r)),
    };
    let cx = Ctx {
        device,
        show: !cli.quiet && rank == 0,
        ranks,
    };
    match (dispatch(cli.command, &cx), &cx.ranks) {
        (Err(e), Some(r)) => Err(rank_error(e, r)),
        (result, _) => result,
    }
}

/// The error a rank of a data-parallel run ends with: where every rank failed at the same point, rank 0's
/// message is the job's and the others end quietly; where this rank alone failed, its message, and every
/// rank ends (the others may be waiting for it).
fn rank_error(e: anyhow::Error, r: &ranks::Ranks) -> anyhow::Error {
    let rank = r.rank();
    if ranks::is_collective(&e) {
        return if rank == 0 { e } else { ranks::Quiet.into() };
    }
    let msg = e.to_string();
    eprintln!("error: rank {rank}: {}", msg.lines().next().unwrap_or(""));
    r.abort(1)
}

fn dispatch(command: Command, cx: &Ctx) -> Result<()> {
    match command {
        Command::Teacher(a) => commands::teacher::run(a, cx),
        Command::Distill(a) => commands::distill::run(a, cx),
        Command::Train(a) => commands::train::run(a, cx),
        Command::Sample(a) => commands::sample::run(a, cx),
        Command::Apply(a) => commands::apply::run(a, cx),
        Command::Eval(a) => commands::eval::run(a, cx),
        Command::Classifier(a) => commands::classifier::run(a, cx),
        Command::Demo(a) => commands::demo::run(a, cx),
        Command::Bench(b) => b.run(cx),
    }
}
