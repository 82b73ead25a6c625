//! `flowmap bench fuzz`: a mutation fuzzer, on stable Rust, for every loader that reads a user's file.
//!
//! Each loader starts from valid files of its format, made here, and loads mutants of them: bit flips,
//! bytes set to boundary values, truncations, deleted, duplicated and inserted runs, and edits of the
//! header fields the format trusts (sizes and shapes set to huge values). A load must return (an error is
//! fine), never panic, and never hold more memory than the file's size justifies: the allocator watch
//! ([`crate::alloc`]) measures the peak of each load, and refuses a single allocation beyond a cap, so a
//! header claiming 10¹² elements aborts the run here instead of exhausting the machine. The case being
//! loaded is always on disk (`OUT/case/`), so an abort leaves its reproducer; panics are copied to
//! `OUT/crashes/`.

use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use serde::Serialize;

use flowmap::backbone::{Arch, MlpConfig};
use flowmap::checkpoint::{Checkpoint, CheckpointMeta, ModelKind};
use flowmap::data::{self, DataSource, GaussianMixture};
use flowmap::pipeline::RunConfig;
use flowmap::train::TrainState;
use flowmap::Rng;

/// One loader under test: its name, the file name a case is written to, its seeds and the load.
struct Target {
    name: &'static str,
    /// The case's file name (its extension selects the format) inside the case folder.
    file: &'static str,
    /// How many times its size a case's content may legitimately expand to: 1 for plain files, about
    /// 1100 for gzip (deflate's limit), 2048 pixels a byte for compressed images.
    expansion: usize,
    seeds: Vec<Vec<u8>>,
    load: fn(&Path) -> std::result::Result<(), String>,
}

/// The outcome of one loader's run.
#[derive(Serialize)]
pub struct LoaderRow {
    pub loader: String,
    pub cases: u64,
    /// Loads that returned a value (the mutant was still a valid file).
    pub loaded: u64,
    /// Loads that returned an error.
    pub errors: u64,
    pub panics: u64,
    /// Loads that held more memory than the file's size justifies.
    pub over_memory: u64,
    /// The largest peak held by one load, against the file's size.
    pub max_peak_bytes: usize,
    pub max_peak_ratio: f64,
    pub seconds: f64,
    /// A few distinct error messages, to show what the loader says.
    pub sample_errors: Vec<String>,
    /// The first panics, with the case file kept under `crashes/`.
    pub findings: Vec<String>,
}

/// Memory a load of `len` bytes may hold at once: its decoded values (up to 8 bytes per byte of input for
/// `u8` data widened to f64, twice over while converting), plus a fixed allowance for the loader itself.
/// No single allocation above this while fuzzing: a larger one fails and the process aborts, leaving the
/// case in `OUT/case/` as its reproducer.
const HARD_CAP: usize = 1 << 30;

fn allowance(len: usize, expansion: usize) -> usize {
    let expanded = len.saturating_mul(expansion);
    expanded.saturating_mul(40).saturating_add(32 << 20)
}

/// Runs every loader named in `only` (all if empty) for `seconds` each, from `seed`, writing cases under
/// `out`; returns one row per loader.
pub fn run(out: &Path, only: &[String], seconds: f64, seed: u64, progress: &dyn Fn(&str)) -> Result<Vec<LoaderRow>> {
    let case_dir = out.join("case");
    let crash_dir = out.join("crashes");
    std::fs::create_dir_all(&case_dir)?;
    let targets = targets(&case_dir)?;
    let unknown: Vec<&String> = only
        .iter()
        .filter(|n| !targets.iter().any(|t| t.name == n.as_str()))
        .collect();
    if !unknown.is_empty() {
        let names: Vec<&str> = targets.iter().map(|t| t.name).collect();
        anyhow::bail!("unknown loader {}: the loaders are {}", unknown[0], names.join(", "));
    }
    // Panics are counted, not printed.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut rows = Vec::new();
    for target in targets
        .iter()
        .filter(|t| only.is_empty() || only.iter().any(|n| n == t.name))
    {
        progress(target.name);
        rows.push(fuzz_one(target, &case_dir, &crash_dir, seconds, seed)?);
    }
    std::panic::set_hook(hook);
    Ok(rows)
}

fn fuzz_one(t: &Target, case_dir: &Path, crash_dir: &Path, seconds: f64, seed: u64) -> Result<LoaderRow> {
    let mut rng = Rng::derive(seed, t.name);
    let path = case_dir.join(t.file);
    let mut row = LoaderRow {
        loader: t.name.into(),
        cases: 0,
        loaded: 0,
        errors: 0,
        panics: 0,
        over_memory: 0,
        max_peak_bytes: 0,
        max_peak_ratio: 0.0,
        seconds: 0.0,
        sample_errors: Vec::new(),
        findings: Vec::new(),
    };
    let start = Instant::now();
    // The seeds themselves first (they must load), then mutants until the time is up.
    let mut k = 0usize;
    while k < t.seeds.len() || start.elapsed().as_secs_f64() < seconds {
        let case = if k < t.seeds.len() {
            t.seeds[k].clone()
        } else {
            let base = &t.seeds[rng.below(t.seeds.len())];
            mutate(base, &mut rng)
        };
        write_case(&path, &case)?;
        let cap = allowance(case.len(), t.expansion);
        // The hard cap guards the machine; the allowance is what the load should stay within.
        let (outcome, peak) =
            crate::alloc::watch(cap.max(HARD_CAP), || catch_unwind(AssertUnwindSafe(|| (t.load)(&path))));
        row.cases += 1;
        if peak > row.max_peak_bytes {
            // The case that held the most memory so far is kept, to look at.
            std::fs::write(case_dir.join(format!("max-peak-{}", t.file)), &case)?;
        }
        row.max_peak_bytes = row.max_peak_bytes.max(peak);
        row.max_peak_ratio = row.max_peak_ratio.max(peak as f64 / case.len().max(1) as f64);
        if peak > cap {
            row.over_memory += 1;
        }
        match outcome {
            Ok(Ok(())) => row.loaded += 1,
            Ok(Err(msg)) => {
                if k < t.seeds.len() {
                    anyhow::bail!("fuzz seed {k} of {} does not load: {msg}", t.name);
                }
                row.errors += 1;
                if row.sample_errors.len() < 6 && !row.sample_errors.contains(&msg) {
                    row.sample_errors.push(msg);
                }
            }
            Err(panic) => {
                row.panics += 1;
                if row.findings.len() < 10 {
                    std::fs::create_dir_all(crash_dir)?;
                    let keep = crash_dir.join(format!("{}-{}-{}", t.name, row.cases, t.file));
                    std::fs::write(&keep, &case)?;
                    let what = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "panic".into());
                    row.findings.push(format!("{}: {what}", keep.display()));
                }
            }
        }
        k += 1;
    }
    row.seconds = start.elapsed().as_secs_f64();
    Ok(row)
}

/// Writes the case where its loader reads it: a file, or for image folders `DIR/CLASS/FILE` beside a
/// fixed valid image of another class.
fn write_case(path: &Path, case: &[u8]) -> Result<()> {
    if let Some(folder) = image_folder_of(path) {
        let a = folder.join("a");
        let b = folder.join("b");
        std::fs::create_dir_all(&a)?;
        std::fs::create_dir_all(&b)?;
        // The other class's valid image, written once per folder.
        if !b.join("ok.png").exists() {
            std::fs::write(b.join("ok.png"), png(6, 6, 1, 40))?;
        }
        std::fs::write(a.join(path.file_name().unwrap()), case)?;
        return Ok(());
    }
    let mut f = std::fs::File::create(path)?;
    f.write_all(case)?;
    Ok(())
}

/// The folder an image case lives in (`case/images-PNG/…`), or none for other formats.
fn image_folder_of(path: &Path) -> Option<PathBuf> {
    let ext = path.extension()?.to_str()?;
    matches!(ext, "png" | "jpg").then(|| path.with_extension("").with_file_name(format!("images-{ext}")))
}

/// One random mutation (sometimes two) of `base`.
fn mutate(base: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut v = base.to_vec();
    let rounds = 1 + rng.below(3);
    for _ in 0..rounds {
        let n = v.len().max(1);
        // Header bytes are hit more often than the payload: that is where the trusted fields are.
        let at = |rng: &mut Rng| {
            if rng.uniform() < 0.6 {
                rng.below(n.min(160))
            } else {
                rng.below(n)
            }
        };
        match rng.below(9) {
            0 => {
                let i = at(rng);
                if let Some(b) = v.get_mut(i) {
                    *b ^= 1 << rng.below(8);
                }
            }
            1 => {
                let i = at(rng);
                if let Some(b) = v.get_mut(i) {
                    *b = [0u8, 0xff, 0x7f, 0x80, b'9', b'-', b',', b'('][rng.below(8)];
                }
            }
            2 => v.truncate(rng.below(n)),
            3 => {
                let i = at(rng);
                let len = (1 + rng.below(16)).min(v.len().saturating_sub(i));
                v.drain(i..i + len);
            }
            4 => {
                let i = at(rng).min(v.len());
                let len = (1 + rng.below(64)).min(v.len() - i);
                let chunk: Vec<u8> = v[i..i + len].to_vec();
                v.splice(i..i, chunk);
            }
            5 => {
                // A 4- or 8-byte size field (little- or big-endian) set to a huge value.
                let i = at(rng);
                let huge: [u8; 8] = [0xff, 0xff, 0xff, 0x7f, 0x00, 0x00, 0x00, 0x10];
                let w = if rng.below(2) == 0 { 4 } else { 8 };
                for (j, &h) in huge.iter().enumerate().take(w) {
                    if let Some(b) = v.get_mut(i + j) {
                        *b = h;
                    }
                }
            }
            6 => {
                // A decimal number in a text header made enormous (npy shapes, JSON sizes, TOML values).
                if let Some(i) = (0..v.len().min(4096))
                    .filter(|&i| v[i].is_ascii_digit())
                    .nth(rng.below(32))
                {
                    let big = [
                        "999999999999",
                        "4294967296",
                        "18446744073709551616",
                        "0",
                        "-1",
                        "1e308",
                        "NaN",
                    ][rng.below(7)];
                    v.splice(i..i + 1, big.bytes());
                }
            }
            7 => {
                let i = at(rng).min(v.len());
                let junk: Vec<u8> = (0..1 + rng.below(8)).map(|_| rng.below(256) as u8).collect();
                v.splice(i..i, junk);
            }
            _ => {
                // Swap two runs.
                if v.len() > 8 {
                    let (i, j) = (rng.below(v.len() - 4), rng.below(v.len() - 4));
                    for k in 0..4 {
                        v.swap(i + k, j + k);
                    }
                }
            }
        }
    }
    v
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Every loader with its seeds; the seed files it has to write go to `dir`.
fn targets(dir: &Path) -> Result<Vec<Target>> {
    let mut rng = Rng::new(0);
    let f32s = |n: usize, rng: &mut Rng| -> Vec<f32> { (0..n).map(|_| rng.normal() as f32).collect() };
    let digits = data::mnist::Mnist::embedded()?;
    let idx = |count: usize| -> Vec<u8> {
        let mut b = vec![0, 0, 8, 3];
        for d in [count, 28, 28] {
            b.extend_from_slice(&(d as u32).to_be_bytes());
        }
        b.extend_from_slice(&digits.pixels[..count * 784]);
        b
    };
    let gz = |b: &[u8]| -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    };
    // A tiny teacher checkpoint and the training state of a two-step run.
    let ck = dir.join("seed-teacher.safetensors");
    let arch = Arch::Mlp(MlpConfig {
        hidden: 8,
        depth: 1,
        ..MlpConfig::new(2)
    });
    {
        let vm = VarMap::new();
        let _net = flowmap::teacher::VelocityNet::new(&arch, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
        arch.seed_params(&vm, 0)?;
        let meta = CheckpointMeta {
            kind: ModelKind::Teacher,
            arch: arch.clone(),
            path: "linear".into(),
            data: "moons".into(),
            mixture: None,
            training: serde_json::json!({ "objective": "fm" }),
            version: env!("CARGO_PKG_VERSION").into(),
            scale: None,
        };
        flowmap::checkpoint::save(&ck, &vm, &meta)?;
    }
    let state = dir.join("seed.state.safetensors");
    {
        let saved = std::cell::RefCell::new(None);
        let mut save = |s: &TrainState| {
            *saved.borrow_mut() = Some(s.clone());
            Ok(())
        };
        let stop = std::sync::atomic::AtomicBool::new(true);
        let cfg = flowmap::train::TrainConfig {
            steps: 4,
            batch_size: 8,
            ..Default::default()
        };
        let ctl = flowmap::train::RunControl {
            save_state: Some(&mut save),
            stop: Some(&stop),
            ..Default::default()
        };
        let _ = flowmap::pipeline::train_teacher_controlled(
            &DataSource::Toy(data::Toy::Moons),
            &arch,
            &cfg,
            &Device::Cpu,
            &flowmap::train::Silent,
            ctl,
        );
        let s = saved
            .into_inner()
            .ok_or_else(|| anyhow::anyhow!("no training state to fuzz"))?;
        s.save(&state)?;
    }
    let labels: Vec<u8> = {
        let body: Vec<u8> = (0..12i64).flat_map(|v| (v % 3).to_le_bytes()).collect();
        npy_bytes("<i8", &[12], &body)
    };
    Ok(vec![
        Target {
            name: "npy",
            file: "case.npy",
            expansion: 1,
            seeds: vec![
                data::npy::encode_npy_f32(16, 2, &f32s(32, &mut rng)),
                data::npy::encode_npy_f32_shape(&[12, 1, 4, 4], &f32s(192, &mut rng)),
                npy_bytes("|u1", &[12, 5, 5], &(0..300).map(|i| i as u8).collect::<Vec<_>>()),
                npy_bytes("<f8", &[12, 3], &(0..36).flat_map(|i| (i as f64).sin().to_le_bytes()).collect::<Vec<_>>()),
            ],
            load: |p| {
                data::npy::read_npy_nd(p).map_err(err)?;
                DataSource::from_spec(p.to_str().unwrap()).map(|_| ()).map_err(err)
            },
        },
        Target {
            name: "npy-labels",
            file: "labels.npy",
            expansion: 1,
            seeds: vec![labels],
            load: |p| {
                let images = p.with_file_name("images-for-labels.npy");
                if !images.exists() {
                    let px: Vec<u8> = (0..12 * 16).map(|i| i as u8).collect();
                    std::fs::write(&images, npy_bytes("|u1", &[12, 4, 4], &px)).map_err(err)?;
                }
                DataSource::from_spec(&DataSource::npy_with_labels(&images, p))
                    .map(|_| ())
                    .map_err(err)
            },
        },
        Target {
            name: "idx",
            file: "t10k-images-idx3-ubyte",
            expansion: 1,
            seeds: vec![idx(3)],
            load: |p| data::mnist::Mnist::from_file(p).map(|_| ()).map_err(err),
        },
        Target {
            name: "idx-gzip",
            file: "t10k-images-idx3-ubyte.gz",
            expansion: 1100,
            seeds: vec![gz(&idx(3))],
            load: |p| data::mnist::Mnist::from_file(p).map(|_| ()).map_err(err),
        },
        Target {
            name: "checkpoint",
            file: "case.safetensors",
            expansion: 1,
            seeds: vec![std::fs::read(&ck)?],
            load: |p| {
                let ck = Checkpoint::load(p).map_err(err)?;
                ck.velocity_net(&Device::Cpu).map(|_| ()).map_err(err)
            },
        },
        Target {
            name: "train-state",
            file: "case.state.safetensors",
            expansion: 1,
            seeds: vec![std::fs::read(&state)?],
            load: |p| TrainState::load(p).map(|_| ()).map_err(err),
        },
        Target {
            name: "csv",
            file: "case.csv",
            expansion: 1,
            seeds: vec![
                b"x,y\n0.5,1.0\n-1,2e-3\n3,4\n1,1\n2,2\n3,3\n4,4\n5,5\n6,6\n7,7\n".to_vec(),
                (0..12).map(|i| format!("{i}.5,{}.25,-{i}\n", i * 2)).collect::<String>().into_bytes(),
            ],
            load: |p| data::read_csv(p).map(|_| ()).map_err(err),
        },
        Target {
            name: "toml",
            file: "case.toml",
            expansion: 1,
            seeds: vec![
                b"[train]\nsteps = 100\nbatch_size = 64\nlr = 0.001\n\n[distill.times]\ndiagonal_fraction = 0.25\n\n[arch]\nkind = \"unet\"\nchannels = 16\nchannel_mult = [1, 2, 2]\n".to_vec(),
                b"[arch]\nkind = \"mlp\"\nhidden = 64\ndepth = 2\n".to_vec(),
            ],
            load: |p| {
                let c = RunConfig::from_file(p).map_err(err)?;
                c.train_config().map_err(err)?.validate().map_err(err)?;
                c.distill_config(flowmap::objective::Method::Emd).map_err(err)?;
                let shape = [1usize, 28, 28];
                let base = match c.arch_kind().map_err(err)?.as_deref() {
                    Some("unet") => Arch::Unet(flowmap::backbone::UnetConfig::new(&shape)),
                    _ => Arch::Mlp(MlpConfig::new(2)),
                };
                c.arch_over(base).map(|_| ()).map_err(err)
            },
        },
        Target {
            name: "gmm-json",
            file: "case.json",
            expansion: 1,
            seeds: vec![br#"{"means": [[-1, 0], [1, 0.5]], "stds": [0.2, 0.4], "weights": [1, 2]}"#.to_vec()],
            load: |p| GaussianMixture::from_file(p).map(|_| ()).map_err(err),
        },
        Target {
            name: "image-png",
            file: "case.png",
            expansion: 2048,
            seeds: vec![png(6, 6, 1, 200), png(6, 6, 3, 90)],
            load: |p| {
                let folder = image_folder_of(p).unwrap();
                data::images::read_folder(&folder).map(|_| ()).map_err(err)
            },
        },
        Target {
            name: "image-jpeg",
            file: "case.jpg",
            expansion: 2048,
            seeds: vec![jpeg(6, 6)],
            load: |p| {
                let folder = image_folder_of(p).unwrap();
                data::images::read_folder(&folder).map(|_| ()).map_err(err)
            },
        },
    ])
}

/// A `.npy` file of `descr` with `shape` and raw little-endian `body`.
fn npy_bytes(descr: &str, shape: &[usize], body: &[u8]) -> Vec<u8> {
    let mut out = data::npy::npy_header(descr, shape);
    out.extend_from_slice(body);
    out
}

fn png(w: u32, h: u32, channels: u8, level: u8) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    let img = if channels == 1 {
        image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(w, h, |x, y| {
            image::Luma([level ^ (x * 7 + y) as u8])
        }))
    } else {
        image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([level, (x * 30) as u8, (y * 30) as u8])
        }))
    };
    img.write_to(&mut out, image::ImageOutputFormat::Png).unwrap();
    out.into_inner()
}

fn jpeg(w: u32, h: u32) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    let img = image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(w, h, |x, y| {
        image::Luma([(x * 40 + y) as u8])
    }));
    img.write_to(&mut out, image::ImageOutputFormat::Jpeg(90)).unwrap();
    out.into_inner()
}

/// The Markdown report.
/// [`run`] into `out`, then its rows written as `fuzz.json` and `fuzz.md`; returns the rows and the table.
pub fn report(
    out: &Path,
    only: &[String],
    seconds: f64,
    seed: u64,
    progress: &dyn Fn(&str),
) -> Result<(Vec<LoaderRow>, String)> {
    flowmap::io::create_dir(out)?;
    let rows = run(out, only, seconds, seed, progress)?;
    let json = serde_json::json!({ "seconds_per_loader": seconds, "seed": seed, "loaders": rows });
    let text = serde_json::to_string_pretty(&json).map_err(|e| flowmap::Error::data(e.to_string()))?;
    flowmap::io::write_text(&out.join("fuzz.json"), &text)?;
    let md = table(&rows);
    flowmap::io::write_text(&out.join("fuzz.md"), &md)?;
    Ok((rows, md))
}

pub fn table(rows: &[LoaderRow]) -> String {
    let mut s = String::from(
        "| loader | cases | loaded | errors | panics | over memory | max peak | peak / file size | seconds |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        s += &format!(
            "| {} | {} | {} | {} | {} | {} | {:.1} MB | {:.0} | {:.0} |\n",
            r.loader,
            r.cases,
            r.loaded,
            r.errors,
            r.panics,
            r.over_memory,
            r.max_peak_bytes as f64 / 1e6,
            r.max_peak_ratio,
            r.seconds
        );
    }
    s
}
