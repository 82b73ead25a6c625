//! `flowmap bench speed`: throughput and latency of the three things flowmap does all day — the teacher's
//! flow-matching training step, the discrete EMD distillation step, and sampling — at several batch sizes
//! and widths, with the achieved GFLOP/s against the sgemm peak measured in the same run, and optionally
//! the same workloads in PyTorch (`bench/peer/torch_peer.py`) side by side.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

pub use super::timing::SpeedRow;
use super::timing::{nets, rate, steps_per_second, SpeedOptions};
use flowmap::backbone::{Arch, MlpConfig};
use flowmap::data::{DataSource, Toy};
use flowmap::kernels::{with_precision, Precision};
use flowmap::objective::{DistillConfig, Emd, FlowMatching};
use flowmap::ode::{Scheme, Solver};
use flowmap::pipeline::OutDir;
use flowmap::Cond;

use crate::report::progress_bar;
use flowmap::sample::{sample_map, sample_ode, TimeGrid};
use flowmap::{Error, Result};

/// The PyTorch peers, embedded so that the benchmark runs from any directory: the MLP workloads, and the
/// U-Net workloads with the U-Net twin they import.
pub const TORCH_PEER: &str = include_str!("../../../../bench/peer/torch_peer.py");
pub const TORCH_UNET_PEER: &str = include_str!("../../../../bench/peer/torch_unet_peer.py");
pub const TORCH_UNET: &str = include_str!("../../../../python/flowmap/torch.py");

/// The workloads, as named in the report and by the peer.
pub const WORKLOADS: [&str; 5] = ["teacher", "emd", "sample-1nfe", "sample-euler32", "latency-1nfe"];

impl SpeedReport {
    /// One line per row, with PyTorch's figure and the ratio where the peer ran.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        for r in &self.rows {
            let peer = match (r.peer, r.ratio) {
                (Some(p), Some(x)) => format!("  PyTorch {p:10.1}  ratio {x:5.2}"),
                _ => String::new(),
            };
            s += &format!(
                "{:15} width {:4} batch {:5}: {:10.1} {}{peer}\n",
                r.workload, r.width, r.batch, r.value, r.unit
            );
        }
        s
    }
}

/// The whole report, as written to `speed.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SpeedReport {
    pub cpu: String,
    /// The device the rows ran on (`cpu`, `cuda:0`); the peer runs there too.
    #[serde(default = "cpu_spec")]
    pub device: String,
    pub threads: usize,
    pub options: SpeedOptions,
    /// sgemm GFLOP/s by shape `MxKxN`, as flowmap's layers run it: an identity dense layer `x·Wᵀ + 0` on
    /// the CPU fast path (its GEMM, by blocks of rows across threads, plus one bias pass).
    pub sgemm_gflops: BTreeMap<String, f64>,
    pub sgemm_peak: f64,
    pub rows: Vec<SpeedRow>,
    /// What happened with the peer: its version and sgemm, or why it did not run.
    pub peer_status: String,
    pub peer_sgemm_gflops: Option<BTreeMap<String, f64>>,
}

/// Multiply–add FLOPs of one forward pass of the MLP on `batch` rows: `2·B·Σ fan_in·fan_out`.
fn forward_flops(batch: usize, arch: &MlpConfig, with_gap: bool) -> f64 {
    let in0 = arch.dim + if with_gap { 4 } else { 2 } * arch.time_features;
    let (w, d) = (arch.hidden, arch.depth);
    2.0 * batch as f64 * (in0 * w + (d - 1) * w * w + w * arch.dim) as f64
}

/// A training pass: forward, then the two backward GEMMs per layer, less the first layer's input gradient
/// (the input needs none).
fn train_flops(batch: usize, arch: &MlpConfig, with_gap: bool) -> f64 {
    let in0 = arch.dim + if with_gap { 4 } else { 2 } * arch.time_features;
    3.0 * forward_flops(batch, arch, with_gap) - 2.0 * (batch * in0 * arch.hidden) as f64
}

/// Resets the process's peak-RSS counter (Linux; elsewhere a no-op).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The process's peak resident set since the last reset, in MB (Linux).
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The processor's model name and its vector units that the kernels can use (`AMD EPYC, AVX-512, AVX-512
/// BF16`): hosts of one model name differ in them, and the figures with them. AMX is named where the CPU
/// has it, though no flowmap kernel uses it yet.
fn cpu_name() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        info.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split(':').nth(1))
            .map(|m| m.trim().to_string())
    };
    let name = field("model name").unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let flags = field("flags").unwrap_or_default();
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let widest = if has("avx512f") {
        Some("AVX-512")
    } else if has("avx2") {
        Some("AVX2")
    } else {
        None
    };
    let units: Vec<&str> = widest
        .into_iter()
        .chain(has("avx512_bf16").then_some("AVX-512 BF16"))
        .chain(has("amx_bf16").then_some("AMX (unused)"))
        .collect();
    if units.is_empty() {
        name
    } else {
        format!("{name}, {}", units.join(", "))
    }
}

/// sgemm GFLOP/s for `m × k` times `k × n` as flowmap's layers run it: an identity [`flowmap::kernels::dense`]
/// layer with a zero bias (on the CPU, the fast path's GEMM by blocks of rows plus one bias pass).
fn sgemm(m: usize, k: usize, n: usize, seconds: f64, device: &Device) -> Result<f64> {
    let mut rng = flowmap::Rng::new(0);
    let a = rng.normal_tensor((m, k), DType::F32, device)?;
    let w = rng.normal_tensor((n, k), DType::F32, device)?;
    let zero = Tensor::zeros(n, DType::F32, device)?;
    let per_s = rate(seconds, || {
        flowmap::kernels::dense(&a, &w, &zero, flowmap::kernels::Activation::Identity)?;
        Ok(())
    })?;
    Ok(2.0 * (m * k * n) as f64 * per_s / 1e9)
}

fn arch(width: usize) -> MlpConfig {
    MlpConfig {
        hidden: width,
        ..MlpConfig::new(2)
    }
}

/// Runs the benchmark, writes `speed.json` and `speed.md` into `out`, and returns the report.
pub fn speed(out: &Path, opts: &SpeedOptions, device: &Device, show: bool) -> Result<SpeedReport> {
    let sizes_ok = |v: &[usize]| !v.is_empty() && !v.contains(&0);
    let (mlp, unet) = (
        opts.nets.iter().any(|n| n == "mlp"),
        opts.nets.iter().any(|n| n == "unet"),
    );
    if let Some(bad) = opts.nets.iter().find(|n| *n != "mlp" && *n != "unet") {
        return Err(Error::arg(format!("speed: unknown network '{bad}' (mlp or unet)")));
    }
    if !(mlp || unet) {
        return Err(Error::arg("speed: name at least one network (mlp, unet)"));
    }
    if (mlp && !(sizes_ok(&opts.widths) && sizes_ok(&opts.batches)))
        || (unet && !(sizes_ok(&opts.unet_channels) && sizes_ok(&opts.unet_batches)))
    {
        return Err(Error::arg(
            "speed: widths, channels and batches must be non-empty lists of positive sizes",
        ));
    }
    let known: Vec<&str> = WORKLOADS.iter().chain(&super::speed_unet::WORKLOADS).copied().collect();
    if let Some(bad) = opts.rows.iter().find(|r| !known.contains(&r.as_str())) {
        return Err(Error::arg(format!(
            "speed: unknown row '{bad}' (one of {})",
            known.join(", ")
        )));
    }
    if !opts.rows.is_empty() && opts.peer {
        return Err(Error::arg(
            "speed: choosing rows is for profiling flowmap's own loops; run the peer on every row (drop the row list or the peer)",
        ));
    }
    let out = OutDir::create(out)?;
    let threads = flowmap::kernels::threads();
    let spec = device_spec(device);
    let mut sgemm_gflops: BTreeMap<String, f64> = BTreeMap::new();
    let (per_batch, per_width) = WORKLOADS.split_at(4);
    let per_round = if mlp {
        opts.widths.len() * (opts.batches.len() * opts.count(per_batch) + opts.count(per_width))
    } else {
        0
    } + if unet {
        let (per_batch, per_channels) = super::speed_unet::WORKLOADS.split_at(4);
        opts.unet_channels.len() * (opts.unet_batches.len() * opts.count(per_batch) + opts.count(per_channels))
    } else {
        0
    };
    let bar = progress_bar((opts.rounds.max(1) * per_round) as u64, "speed", show);
    let mut rows: Vec<SpeedRow> = vec![];
    let mut peer: Option<std::result::Result<PeerReport, String>> = None;
    for round in 0..opts.rounds.max(1) {
        if opts.peer {
            bar.set_message(format!("PyTorch peer, round {}", round + 1));
            match (run_peers(opts, threads, mlp, unet, &spec), &mut peer) {
                (Ok(p), Some(Ok(prev))) => prev.keep_best(p),
                (r, slot) => {
                    if !matches!(slot, Some(Ok(_))) {
                        *slot = Some(r);
                    }
                }
            }
        }
        // sgemm before and after every round's rows: each shape keeps its best. A whole 4096-row product
        // streams its operands through the L3 cache that this VM shares with its neighbours, and reads up
        // to a third low while they are busy; the training rows work in per-core blocks and suffer less.
        let mut peak = || -> Result<()> {
            for (m, k, n) in [(4096, 256, 256), (4096, 512, 512)] {
                let g = sgemm(m, k, n, opts.seconds.min(1.0), device)?;
                let e = sgemm_gflops.entry(format!("{m}x{k}x{n}")).or_insert(g);
                *e = e.max(g);
            }
            Ok(())
        };
        // Every figure (the GEMM peak too) in the run's precision.
        let r = with_precision(opts.precision, || -> Result<Vec<SpeedRow>> {
            peak()?;
            let mut r = if mlp { measure(opts, device, &bar)? } else { vec![] };
            if unet {
                r.extend(super::speed_unet::measure(opts, device, &bar)?);
            }
            peak()?;
            Ok(r)
        })?;
        if rows.is_empty() {
            rows = r;
        } else {
            best(&mut rows, &r);
        }
    }
    bar.finish_and_clear();

    let (peer_status, peer_sgemm_gflops) = if opts.peer {
        match peer.expect("the peer ran in every round") {
            Ok(peer) => {
                for row in rows.iter_mut() {
                    if let Some(v) = peer.value(&row.workload, row.width, row.batch) {
                        row.peer = Some(v);
                        row.ratio = Some(row.value / v);
                    }
                    row.peer_peak_mb = peer.memory(&row.workload, row.width, row.batch);
                }
                let failed = if peer.failures.is_empty() {
                    String::new()
                } else {
                    format!("; PyTorch failed on {}", peer.failures.join("; "))
                };
                (
                    format!("PyTorch {} at {} threads{failed}", peer.torch, peer.threads),
                    (!peer.sgemm_gflops.is_empty()).then_some(peer.sgemm_gflops),
                )
            }
            Err(why) => (format!("not run: {why}"), None),
        }
    } else {
        ("not requested (pass --peer)".to_string(), None)
    };
    // The machine's peak: the best sgemm either library reached in this run.
    let sgemm_peak = sgemm_gflops
        .values()
        .chain(peer_sgemm_gflops.iter().flat_map(|p| p.values()))
        .cloned()
        .fold(0.0, f64::max);
    for row in rows.iter_mut() {
        row.peak_fraction = row.gflops.map(|g| g / sgemm_peak);
    }
    let report = SpeedReport {
        cpu: cpu_name(),
        device: spec,
        threads,
        options: opts.clone(),
        sgemm_gflops,
        sgemm_peak,
        rows,
        peer_status,
        peer_sgemm_gflops,
    };
    flowmap::io::write_text(
        &out.file("speed.json"),
        &serde_json::to_string_pretty(&report).expect("report serialises"),
    )?;
    flowmap::io::write_text(&out.file("speed.md"), &speed_markdown(&report))?;
    Ok(report)
}

/// One round of flowmap's rows.
fn measure(opts: &SpeedOptions, device: &Device, bar: &indicatif::ProgressBar) -> Result<Vec<SpeedRow>> {
    let data = DataSource::Toy(Toy::Checkerboard);
    let mut rows = vec![];
    let mut push = |workload: &str, width: usize, batch: usize, unit: &str, value: f64, flops: Option<f64>| {
        let gflops = flops.map(|f| f * value / 1e9);
        rows.push(SpeedRow {
            workload: workload.into(),
            width,
            batch,
            unit: unit.into(),
            value,
            gflops,
            peak_fraction: None,
            peak_rss_mb: peak_rss_mb(),
            peer_peak_mb: None,
            peer: None,
            ratio: None,
        });
        bar.inc(1);
    };
    for &width in &opts.widths {
        let a = arch(width);
        for &batch in &opts.batches {
            let n = nets(&Arch::Mlp(a.clone()), opts.seed, device)?;
            if opts.wants("teacher") {
                bar.set_message(format!("teacher, width {width}, batch {batch}"));
                reset_peak_rss();
                let (r, _) = steps_per_second(
                    &FlowMatching::new(),
                    &n.teacher_trainable(None),
                    &data,
                    batch,
                    opts.seconds,
                    device,
                )?;
                push(
                    "teacher",
                    width,
                    batch,
                    "steps/s",
                    r,
                    Some(train_flops(batch, &a, false)),
                );
            }

            if opts.wants("emd") {
                bar.set_message(format!("emd, width {width}, batch {batch}"));
                reset_peak_rss();
                let dcfg = DistillConfig::default();
                let emd = Emd::new(&n.teacher, dcfg);
                let (r, _) = steps_per_second(&emd, &n.map_trainable(None), &data, batch, opts.seconds, device)?;
                let n_diag = ((batch as f64) * dcfg.times.diagonal_fraction).round() as usize;
                let flops = forward_flops(batch, &a, false) // the teacher on every row
                    + forward_flops(batch - n_diag, &a, true) // the stop-gradient target
                    + train_flops(batch, &a, true);
                push("emd", width, batch, "steps/s", r, Some(flops));
            }

            let noise = flowmap::sample::noise(batch, &[2], opts.seed, device)?;
            let none = Cond::none();
            let one = TimeGrid::uniform(1)?;
            if opts.wants("sample-1nfe") {
                bar.set_message(format!("sampling, width {width}, batch {batch}"));
                reset_peak_rss();
                let r = rate(opts.seconds, || sample_map(&n.map, &noise, &one, &none).map(|_| ()))?;
                push("sample-1nfe", width, batch, "samples/s", r * batch as f64, None);
            }
            if opts.wants("sample-euler32") {
                reset_peak_rss();
                let euler = Solver::fixed(Scheme::Euler, 32);
                let r = rate(opts.seconds, || {
                    sample_ode(&n.teacher, &noise, euler, &none).map(|_| ())
                })?;
                push("sample-euler32", width, batch, "samples/s", r * batch as f64, None);
            }
        }
        if opts.wants("latency-1nfe") {
            let n = nets(&Arch::Mlp(a.clone()), opts.seed, device)?;
            let noise = flowmap::sample::noise(1, &[2], opts.seed, device)?;
            let one = TimeGrid::uniform(1)?;
            reset_peak_rss();
            let r = rate(opts.seconds, || {
                sample_map(&n.map, &noise, &one, &Cond::none()).map(|_| ())
            })?;
            push("latency-1nfe", width, 1, "ms", 1e3 / r, None);
        }
    }
    Ok(rows)
}

/// Keeps, per row, the better of two rounds (higher rate, lower latency).
fn best(a: &mut [SpeedRow], b: &[SpeedRow]) {
    debug_assert!(a.len() == b.len());
    for (x, y) in a.iter_mut().zip(b) {
        let better = if lower_is_better(&x.unit) {
            y.value < x.value
        } else {
            y.value > x.value
        };
        if better {
            *x = y.clone();
        }
    }
}

/// Latencies (`ms`) and cost ratios (`× forward`) are better low; rates high.
fn lower_is_better(unit: &str) -> bool {
    unit == "ms" || unit == "× forward"
}

#[derive(Deserialize)]
struct PeerRow {
    workload: String,
    width: usize,
    batch: usize,
    per_second: Option<f64>,
    seconds: Option<f64>,
    /// A cost ratio (the JVP over a forward pass).
    #[serde(default)]
    ratio: Option<f64>,
    /// Resident-set growth over the row, MB.
    #[serde(default)]
    peak_rss_mb: Option<f64>,
}

#[derive(Deserialize)]
struct PeerReport {
    torch: String,
    threads: usize,
    #[serde(default)]
    sgemm_gflops: BTreeMap<String, f64>,
    rows: Vec<PeerRow>,
    /// Rows PyTorch could not run, `workload channels batch: error` (bf16 autocast under
    /// `torch.func.jvp`, for one).
    #[serde(default)]
    failures: Vec<String>,
}

fn min_of(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

impl PeerReport {
    /// Keeps, per row and per sgemm shape, the better of this report and `other`.
    fn keep_best(&mut self, other: PeerReport) {
        for (a, b) in self.rows.iter_mut().zip(other.rows) {
            a.per_second = match (a.per_second, b.per_second) {
                (Some(x), Some(y)) => Some(x.max(y)),
                (x, y) => x.or(y),
            };
            a.seconds = min_of(a.seconds, b.seconds);
            a.ratio = min_of(a.ratio, b.ratio);
            a.peak_rss_mb = min_of(a.peak_rss_mb, b.peak_rss_mb);
        }
        for (k, v) in other.sgemm_gflops {
            let e = self.sgemm_gflops.entry(k).or_insert(v);
            *e = e.max(v);
        }
    }

    /// The peer's figure in flowmap's unit for the same row.
    fn value(&self, workload: &str, width: usize, batch: usize) -> Option<f64> {
        let r = self
            .rows
            .iter()
            .find(|r| r.workload == workload && r.width == width && r.batch == batch)?;
        match workload {
            "latency-1nfe" | "unet-latency-1nfe" => r.seconds.map(|s| s * 1e3),
            "unet-jvp" => r.ratio,
            _ => r.per_second,
        }
    }

    /// The peer's memory for the same row (U-Net training rows).
    fn memory(&self, workload: &str, width: usize, batch: usize) -> Option<f64> {
        self.rows
            .iter()
            .find(|r| r.workload == workload && r.width == width && r.batch == batch)?
            .peak_rss_mb
            .filter(|_| workload.starts_with("unet-"))
    }

    /// The rows of both peer scripts in one report.
    fn join(mut self, other: PeerReport) -> PeerReport {
        self.rows.extend(other.rows);
        self.sgemm_gflops.extend(other.sgemm_gflops);
        self.failures.extend(other.failures);
        self
    }
}

/// Runs the embedded PyTorch scripts for the networks asked for, with the same sizes and thread count.
fn run_peers(
    opts: &SpeedOptions,
    threads: usize,
    mlp: bool,
    unet: bool,
    device: &str,
) -> std::result::Result<PeerReport, String> {
    let probe = Command::new(&opts.python).args(["-c", "import torch"]).output();
    match probe {
        Err(e) => return Err(format!("cannot start '{}': {e}", opts.python)),
        Ok(o) if !o.status.success() => {
            return Err(format!(
                "'{}' cannot import torch (install the peer's dependency with `pip install torch`)",
                opts.python
            ))
        }
        Ok(_) => {}
    }
    let dir = tempfile_dir().map_err(|e| e.to_string())?;
    let join = |v: &[usize]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",");
    let run = |script: &str, args: Vec<String>| -> std::result::Result<PeerReport, String> {
        let path = dir.join(script);
        let output = Command::new(&opts.python)
            .arg(&path)
            .args(["--threads", &threads.to_string()])
            .args(["--seconds", &opts.seconds.to_string()])
            .args(["--seed", &opts.seed.to_string()])
            .args(["--device", &device.replacen("metal", "mps", 1)])
            .args([
                "--autocast",
                if opts.precision == Precision::Bf16 {
                    "bf16"
                } else {
                    "none"
                },
            ])
            .args(args)
            .output()
            .map_err(|e| format!("peer failed to start: {e}"))?;
        if !output.status.success() {
            let err = String::from_utf8_lossy(&output.stderr);
            let last = err.lines().last().unwrap_or("no message");
            return Err(format!("peer {script} exited with {}: {last}", output.status));
        }
        serde_json::from_slice(&output.stdout).map_err(|e| format!("peer {script} printed unreadable JSON: {e}"))
    };
    let result = (|| {
        for (name, text) in [
            ("torch_peer.py", TORCH_PEER),
            ("torch_unet_peer.py", TORCH_UNET_PEER),
            ("flowmap_unet.py", TORCH_UNET),
        ] {
            std::fs::write(dir.join(name), text).map_err(|e| e.to_string())?;
        }
        let mut report: Option<PeerReport> = None;
        if mlp {
            let arch = MlpConfig::new(2);
            report = Some(run(
                "torch_peer.py",
                vec![
                    format!("--widths={}", join(&opts.widths)),
                    format!("--batches={}", join(&opts.batches)),
                    format!("--depth={}", arch.depth),
                    format!("--time-features={}", arch.time_features),
                    format!("--max-frequency={}", arch.max_frequency),
                ],
            )?);
        }
        if unet {
            let u = run(
                "torch_unet_peer.py",
                vec![
                    format!("--channels={}", join(&opts.unet_channels)),
                    format!("--batches={}", join(&opts.unet_batches)),
                ],
            )?;
            report = Some(match report {
                Some(r) => r.join(u),
                None => u,
            });
        }
        report.ok_or_else(|| "no network to run".to_string())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// A device as `--device` names it: `cpu`, `cuda:N`, `metal:N` (PyTorch's names but for Metal, its `mps`).
fn device_spec(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => cpu_spec(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

fn cpu_spec() -> String {
    "cpu".into()
}

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("flowmap-peer-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A table cell: `f(v)`, or a dash for no value.
fn cell(v: Option<f64>, f: &dyn Fn(f64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "–".into())
}

fn speed_markdown(r: &SpeedReport) -> String {
    let mut md = format!(
        "# Speed\n\nProduced by `flowmap{} bench speed{}`. CPU: {} ({} threads). Precision: {}{}. Peer: {}.\n\n",
        if r.device == "cpu" {
            String::new()
        } else {
            format!(" --device {}", r.device)
        },
        if r.options.precision == Precision::F32 {
            ""
        } else {
            " --precision bf16"
        },
        r.cpu,
        r.threads,
        r.options.precision.describe(),
        if r.options.precision == Precision::F32 {
            ""
        } else {
            " (PyTorch under `torch.autocast(device, dtype=torch.bfloat16)`)"
        },
        r.peer_status
    );
    md += if r.options.precision == Precision::F32 {
        "sgemm"
    } else {
        "GEMM in the run's precision"
    };
    md += ", GFLOP/s (flowmap's GEMM";
    if r.peer_sgemm_gflops.is_some() {
        md += " / PyTorch's";
    }
    md += "): ";
    let parts: Vec<String> = r
        .sgemm_gflops
        .iter()
        .map(|(k, v)| {
            let peer = r
                .peer_sgemm_gflops
                .as_ref()
                .and_then(|p| p.get(k))
                .map(|p| format!(" / {p:.0}"))
                .unwrap_or_default();
            format!("{k}: {v:.0}{peer}")
        })
        .collect();
    md += &parts.join("; ");
    md += &format!(
        ". Peak used below: {:.0} GFLOP/s, the best either library reached in this run.\n\n",
        r.sgemm_peak
    );
    md += "Workloads: `teacher` = one flow-matching training step (AdamW + EMA); `emd` = one discrete EMD \
           distillation step (teacher and target forward passes, student forward and backward, AdamW + EMA); \
           `sample-1nfe` = one flow-map step from noise; `sample-euler32` = the teacher's 32-step Euler sampler; \
           `latency-1nfe` = one single-sample 1-NFE generation. MLP: 3 hidden SiLU layers of the given width, \
           16 time frequencies. Ratios are flowmap / PyTorch (above 1 is faster for rates; below 1 is faster for \
           latency).\n\n";
    md += "| workload | width | batch | flowmap | PyTorch | flowmap / PyTorch | GFLOP/s | % of sgemm peak | peak RSS MB |\n";
    md += "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for w in WORKLOADS {
        for row in r.rows.iter().filter(|x| x.workload == w) {
            let fmt = |v: f64| {
                if row.unit == "ms" {
                    format!("{v:.3} ms")
                } else {
                    format!("{v:.1} {}", row.unit)
                }
            };
            md += &format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                row.workload,
                row.width,
                row.batch,
                fmt(row.value),
                cell(row.peer, &fmt),
                cell(row.ratio, &|x| format!("{x:.2}")),
                cell(row.gflops, &|x| format!("{x:.0}")),
                cell(row.peak_fraction, &|x| format!("{:.0}%", 100.0 * x)),
                cell(row.peak_rss_mb, &|x| format!("{x:.0}")),
            );
        }
    }
    if r.rows.iter().any(|x| x.workload.starts_with("unet-")) {
        md += &unet_markdown(r);
    }
    if !r.rows.iter().any(|x| x.workload == "sample-1nfe") {
        return md;
    }
    md += "\nFlow-map speed-up over the teacher's 32-step sampler (samples/s ratio, same batch):\n\n";
    md += "| width | batch | 1-NFE / Euler-32 |\n|---:|---:|---:|\n";
    for one in r.rows.iter().filter(|x| x.workload == "sample-1nfe") {
        if let Some(e) = r
            .rows
            .iter()
            .find(|x| x.workload == "sample-euler32" && x.width == one.width && x.batch == one.batch)
        {
            md += &format!("| {} | {} | {:.1}× |\n", one.width, one.batch, one.value / e.value);
        }
    }
    md
}

/// The U-Net table: rates and their ratios, and each side's memory for the training rows.
fn unet_markdown(r: &SpeedReport) -> String {
    let mut md = String::from(
        "\n## U-Net\n\nClass-conditional U-Nets (`flowmap::backbone::UnetConfig` defaults: channel multipliers 1, 2, \
         2, one block per level, attention at 7 × 7) on 1 × 28 × 28 digits, beside the PyTorch twin \
         (`python/flowmap/torch.py`, the same layers and parameter names). `unet-teacher` = one flow-matching \
         step; `unet-emd` = one EMD step from a frozen teacher; `unet-meanflow` = one MeanFlow step from data with \
         its exact JVP (PyTorch: `torch.func.jvp`); `unet-sample-1nfe` = one flow-map step from noise; \
         `unet-latency-1nfe` = one image; `unet-jvp` = the JVP's time over a forward pass's at batch 128. Memory: \
         flowmap's heap at the row's peak above its start, PyTorch's resident-set growth over the row.\n\n\
         | workload | channels | batch | flowmap | PyTorch | flowmap / PyTorch | flowmap MB | PyTorch MB |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for w in super::speed_unet::WORKLOADS {
        for row in r.rows.iter().filter(|x| x.workload == w) {
            let fmt = |v: f64| match row.unit.as_str() {
                "× forward" => format!("{v:.2}× forward"),
                u => format!("{v:.2} {u}"),
            };
            md += &format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
                row.workload,
                row.width,
                row.batch,
                fmt(row.value),
                cell(row.peer, &fmt),
                cell(row.ratio, &|x| format!("{x:.2}")),
                cell(row.peak_rss_mb.filter(|_| row.unit == "steps/s"), &|x| format!(
                    "{x:.0}"
                )),
                cell(row.peer_peak_mb.filter(|_| row.unit == "steps/s"), &|x| format!(
                    "{x:.0}"
                )),
            );
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn training_flops_count_three_gemms_per_layer_but_the_first_input_gradient() {
        let a = MlpConfig {
            hidden: 4,
            depth: 2,
            time_features: 1,
            ..MlpConfig::new(2)
        };
        // Layers 4→4 (x + sin + cos), 4→4, 4→2 on one row: forward 2·(16 + 16 + 8) = 80.
        assert_eq!(forward_flops(1, &a, false), 80.0);
        assert_eq!(train_flops(1, &a, false), 240.0 - 32.0);
    }

    #[test]
    fn peer_rows_are_matched_in_flowmaps_units() {
        let p: PeerReport = serde_json::from_str(
            r#"{"torch": "x", "threads": 2, "sgemm_gflops": {},
                "rows": [{"workload": "teacher", "width": 256, "batch": 256, "per_second": 10.0},
                         {"workload": "latency-1nfe", "width": 256, "batch": 1, "seconds": 0.002}]}"#,
        )
        .unwrap();
        assert_eq!(p.value("teacher", 256, 256), Some(10.0));
        assert_eq!(p.value("latency-1nfe", 256, 1), Some(2.0));
        assert_eq!(p.value("emd", 256, 256), None);
    }
}
