//! The command line: a happy path through every command, and one clear error line, a non-zero exit and no
//! output file for each kind of bad input.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_flowmap"));
    c.arg("--quiet").arg("--threads").arg("2");
    c
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

/// A tiny teacher and flow map, trained once for all tests.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        ok(bin()
            .args([
                "teacher",
                "--data",
                "checkerboard",
                "--steps",
                "20",
                "--batch",
                "64",
                "--hidden",
                "16",
                "--depth",
                "1",
            ])
            .arg("--out")
            .arg(root.join("t.safetensors")));
        ok(bin()
            .args(["distill", "--method", "emd", "--steps", "10", "--batch", "64"])
            .arg("--teacher")
            .arg(root.join("t.safetensors"))
            .arg("--out")
            .arg(root.join("m.safetensors")));
        std::fs::write(
            root.join("gmm.json"),
            r#"{"means": [[-1, 0], [1, 0.5]], "stds": [0.2, 0.4], "weights": [1, 2]}"#,
        )
        .unwrap();
        std::fs::write(
            root.join("x.npy"),
            flowmap::data::npy::encode_npy_f32(3, 2, &[0.1, 0.2, -0.5, 1.0, 0.0, 0.0]),
        )
        .unwrap();
        Fixture { _dir: dir, root }
    })
}

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command that must fail: one line on stderr containing `needle`, non-zero exit, `out` not created.
fn fails(cmd: &mut Command, needle: &str, out: &Path) {
    let res = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success(), "expected failure for '{needle}'");
    assert_eq!(err.trim_end().lines().count(), 1, "error is not one line: {err}");
    assert!(
        err.starts_with("error"),
        "error line does not start with 'error': {err}"
    );
    assert!(
        err.contains(needle),
        "error '{}' does not mention '{needle}'",
        err.trim_end()
    );
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(!out.exists(), "{} was written despite the error", out.display());
    let leftovers: Vec<_> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind: {leftovers:?}");
}

#[test]
fn every_command_works_end_to_end() {
    let f = fixture();
    let r = &f.root;
    ok(bin()
        .args(["sample", "--nfe", "2", "--n", "100"])
        .arg("--model")
        .arg(r.join("m.safetensors"))
        .arg("--out")
        .arg(r.join("s.npy")));
    let m = flowmap::data::read_npy(&r.join("s.npy")).unwrap();
    assert_eq!((m.rows, m.cols), (100, 2));
    ok(bin()
        .args(["sample", "--grid", "1,0.7,0", "--n", "10"])
        .arg("--model")
        .arg(r.join("m.safetensors"))
        .arg("--out")
        .arg(r.join("g.npy")));
    for solver in ["euler", "heun", "midpoint", "rk4", "dopri5"] {
        ok(bin()
            .args(["sample", "--nfe", "8", "--n", "50", "--solver", solver])
            .arg("--model")
            .arg(r.join("t.safetensors"))
            .arg("--out")
            .arg(r.join("st.npy")));
    }
    ok(bin()
        .args(["apply", "--t", "0.9", "--s", "0.2"])
        .arg("--model")
        .arg(r.join("m.safetensors"))
        .arg("--input")
        .arg(r.join("x.npy"))
        .arg("--out")
        .arg(r.join("y.npy")));
    // Φ of the analytic teacher by dopri5, and f(x, t, t) = x for a map.
    let gmm = format!("gmm:{}", r.join("gmm.json").display());
    ok(bin()
        .args(["apply", "--t", "1", "--s", "0", "--model", &gmm])
        .arg("--input")
        .arg(r.join("x.npy"))
        .arg("--out")
        .arg(r.join("phi.npy")));
    ok(bin()
        .args(["apply", "--t", "0.5", "--s", "0.5"])
        .arg("--model")
        .arg(r.join("m.safetensors"))
        .arg("--input")
        .arg(r.join("x.npy"))
        .arg("--out")
        .arg(r.join("id.npy")));
    let x = flowmap::data::read_npy(&r.join("x.npy")).unwrap();
    assert_eq!(flowmap::data::read_npy(&r.join("id.npy")).unwrap(), x);
    let table = ok(bin()
        .args(["eval", "--nfe", "1,2", "--n", "300"])
        .arg("--model")
        .arg(r.join("m.safetensors"))
        .arg("--out")
        .arg(r.join("ev")));
    assert!(table.contains("| flow map | 2-step map | 2 |"), "{table}");
    for file in ["metrics.json", "metrics.md", "samples.png"] {
        assert!(r.join("ev").join(file).exists(), "eval did not write {file}");
    }
    ok(bin()
        .args([
            "distill",
            "--method",
            "lmd",
            "--steps",
            "5",
            "--batch",
            "32",
            "--hidden",
            "16",
            "--depth",
            "1",
            "--teacher",
            &gmm,
        ])
        .arg("--out")
        .arg(r.join("g.safetensors")));
}

#[test]
fn bad_inputs_get_one_clear_line() {
    let f = fixture();
    let r = &f.root;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("y.npy");
    let m = r.join("m.safetensors");
    let t = r.join("t.safetensors");

    // Malformed and truncated .npy, NaN/Inf data, wrong dimension.
    std::fs::write(d.join("junk.npy"), b"this is not an npy file").unwrap();
    fails(
        bin()
            .args(["apply", "--t", "1", "--s", "0"])
            .arg("--model")
            .arg(&m)
            .arg("--input")
            .arg(d.join("junk.npy"))
            .arg("--out")
            .arg(&out),
        "malformed .npy",
        &out,
    );
    let good = flowmap::data::npy::encode_npy_f32(3, 2, &[0.0; 6]);
    std::fs::write(d.join("trunc.npy"), &good[..good.len() - 5]).unwrap();
    fails(
        bin()
            .args(["apply", "--t", "1", "--s", "0"])
            .arg("--model")
            .arg(&m)
            .arg("--input")
            .arg(d.join("trunc.npy"))
            .arg("--out")
            .arg(&out),
        "truncated data",
        &out,
    );
    std::fs::write(
        d.join("nan.npy"),
        flowmap::data::npy::encode_npy_f32(2, 2, &[0.0, f32::NAN, 1.0, 2.0]),
    )
    .unwrap();
    fails(
        bin()
            .args(["apply", "--t", "1", "--s", "0"])
            .arg("--model")
            .arg(&m)
            .arg("--input")
            .arg(d.join("nan.npy"))
            .arg("--out")
            .arg(&out),
        "not finite",
        &out,
    );
    std::fs::write(d.join("inf.csv"), "x,y\n1,2\n3,inf\n").unwrap();
    fails(
        bin()
            .args(["apply", "--t", "1", "--s", "0"])
            .arg("--model")
            .arg(&m)
            .arg("--input")
            .arg(d.join("inf.csv"))
            .arg("--out")
            .arg(&out),
        "not finite",
        &out,
    );
    std::fs::write(d.join("d3.npy"), flowmap::data::npy::encode_npy_f32(2, 3, &[0.0; 6])).unwrap();
    fails(
        bin()
            .args(["apply", "--t", "1", "--s", "0"])
            .arg("--model")
            .arg(&m)
            .arg("--input")
            .arg(d.join("d3.npy"))
            .arg("--out")
            .arg(&out),
        "dimension 3",
        &out,
    );
    let x = r.join("x.npy");

    // Times: s > t, outside [0, 1].
    fails(
        bin()
            .args(["apply", "--t", "0.2", "--s", "0.5"])
            .arg("--model")
            .arg(&m)
            .arg("--input")
            .arg(&x)
            .arg("--out")
            .arg(&out),
        "greater than --t",
        &out,
    );
    fails(
        bin()
            .args(["apply", "--t", "1.5", "--s", "0"])
            .arg("--model")
            .arg(&m)
            .arg("--input")
            .arg(&x)
            .arg("--out")
            .arg(&out),
        "outside [0, 1]",
        &out,
    );
    fails(
        bin()
            .args(["apply", "--t", "0.5", "--s=-0.1"])
            .arg("--model")
            .arg(&m)
            .arg("--input")
            .arg(&x)
            .arg("--out")
            .arg(&out),
        "outside [0, 1]",
        &out,
    );

    // NFE 0, bad grids, unknown method, unknown data, unknown solver.
    let s_out = d.join("s.npy");
    fails(
        bin()
            .args(["sample", "--nfe", "0"])
            .arg("--model")
            .arg(&m)
            .arg("--out")
            .arg(&s_out),
        "--nfe must be at least 1",
        &s_out,
    );
    fails(
        bin()
            .args(["sample", "--grid", "0,0.5,1"])
            .arg("--model")
            .arg(&m)
            .arg("--out")
            .arg(&s_out),
        "strictly decrease",
        &s_out,
    );
    fails(
        bin()
            .args(["eval", "--nfe", "0,2"])
            .arg("--model")
            .arg(&m)
            .arg("--out")
            .arg(d.join("ev")),
        "at least 1",
        &d.join("ev"),
    );
    let c_out = d.join("c.safetensors");
    fails(
        bin()
            .args(["distill", "--method", "xyz"])
            .arg("--teacher")
            .arg(&t)
            .arg("--out")
            .arg(&c_out),
        "unknown method 'xyz'",
        &c_out,
    );
    fails(
        bin().args(["teacher", "--data", "checkers"]).arg("--out").arg(&c_out),
        "unknown data spec 'checkers'",
        &c_out,
    );
    fails(
        bin()
            .args(["sample", "--solver", "rk5"])
            .arg("--model")
            .arg(&t)
            .arg("--out")
            .arg(&s_out),
        "unknown solver 'rk5'",
        &s_out,
    );

    // Missing files, wrong kinds of checkpoint, a checkpoint that is not one.
    fails(
        bin()
            .args(["sample"])
            .arg("--model")
            .arg(d.join("nope.safetensors"))
            .arg("--out")
            .arg(&s_out),
        "nope.safetensors",
        &s_out,
    );
    fails(
        bin()
            .args(["distill", "--method", "emd"])
            .arg("--teacher")
            .arg(&m)
            .arg("--out")
            .arg(&c_out),
        "holds a flow map",
        &c_out,
    );
    std::fs::write(d.join("fake.safetensors"), b"garbage").unwrap();
    fails(
        bin()
            .args(["sample"])
            .arg("--model")
            .arg(d.join("fake.safetensors"))
            .arg("--out")
            .arg(&s_out),
        "not a safetensors file",
        &s_out,
    );
    fails(
        bin()
            .args(["teacher", "--data", "checkerboard", "--steps", "0"])
            .arg("--out")
            .arg(&c_out),
        "training needs at least 1 step",
        &c_out,
    );
    std::fs::write(
        d.join("bad.json"),
        r#"{"means": [[0, 0]], "stds": [0], "weights": [1]}"#,
    )
    .unwrap();
    let spec = format!("gmm:{}", d.join("bad.json").display());
    fails(
        bin()
            .args(["distill", "--method", "emd", "--teacher", &spec])
            .arg("--out")
            .arg(&c_out),
        "std 0 must be positive",
        &c_out,
    );
    // A grid's power must be positive, and teachers take solvers, not grids.
    fails(
        bin()
            .args(["sample", "--nfe", "2", "--grid-power", "0"])
            .arg("--model")
            .arg(&m)
            .arg("--out")
            .arg(&out),
        "power ρ must be positive",
        &out,
    );
    let ev_out = d.join("ev");
    fails(
        bin()
            .args(["eval", "--grid-power", "2"])
            .arg("--model")
            .arg(&t)
            .arg("--out")
            .arg(&ev_out),
        "--grid-power applies to flow maps",
        &ev_out,
    );
    fails(
        bin()
            .args(["eval", "--sampler", "bogus"])
            .arg("--model")
            .arg(&m)
            .arg("--out")
            .arg(&ev_out),
        "unknown sampler 'bogus'",
        &ev_out,
    );
    // A misspelt key in a config file is named, not ignored.
    std::fs::write(d.join("typo.toml"), "[distill.continuous]\ncm_interval = 128\n").unwrap();
    fails(
        bin()
            .args(["distill", "--method", "cm", "--teacher"])
            .arg(&t)
            .arg("--config")
            .arg(d.join("typo.toml"))
            .arg("--out")
            .arg(&c_out),
        "unknown field `cm_interval`",
        &c_out,
    );
    // Missing arguments are one line too.
    fails(bin().args(["sample"]).arg("--out").arg(&s_out), "--model", &s_out);
}

#[test]
fn every_method_trains_and_samples_through_the_cli() {
    let f = fixture();
    let r = &f.root;
    let t = r.join("t.safetensors");
    for method in ["emd-cont", "lmd-cont", "cm", "ctm", "progressive", "direct"] {
        let out = r.join(format!("{method}.safetensors"));
        ok(bin()
            .args(["distill", "--steps", "4", "--batch", "32", "--method", method])
            .arg("--teacher")
            .arg(&t)
            .arg("--out")
            .arg(&out));
        ok(bin()
            .args(["sample", "--nfe", "2", "--n", "20"])
            .arg("--model")
            .arg(&out)
            .arg("--out")
            .arg(r.join(format!("{method}.npy"))));
    }
    for method in ["meanflow", "self-lmd", "shortcut"] {
        let out = r.join(format!("{method}.safetensors"));
        ok(bin()
            .args([
                "train", "--data", "moons", "--steps", "4", "--batch", "32", "--hidden", "16", "--depth", "1",
                "--method", method,
            ])
            .arg("--out")
            .arg(&out));
        ok(bin()
            .args(["sample", "--nfe", "2", "--n", "20", "--sampler", "gamma:0.5"])
            .arg("--model")
            .arg(&out)
            .arg("--out")
            .arg(r.join(format!("{method}.npy"))));
    }
    // The finite-difference tangent is selectable.
    ok(bin()
        .args([
            "distill", "--steps", "3", "--batch", "32", "--method", "emd-cont", "--jvp", "fd",
        ])
        .arg("--teacher")
        .arg(&t)
        .arg("--out")
        .arg(r.join("fd.safetensors")));
}

#[test]
fn inapplicable_method_combinations_are_clear_errors() {
    let f = fixture();
    let r = &f.root;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.safetensors");
    fails(
        bin()
            .args(["distill", "--method", "meanflow"])
            .arg("--teacher")
            .arg(r.join("t.safetensors"))
            .arg("--out")
            .arg(&out),
        "trains from data without a teacher",
        &out,
    );
    fails(
        bin()
            .args(["train", "--method", "emd", "--data", "moons"])
            .arg("--out")
            .arg(&out),
        "distils a teacher",
        &out,
    );
    fails(
        bin()
            .args(["train", "--method", "flow", "--data", "moons"])
            .arg("--out")
            .arg(&out),
        "unknown method 'flow'",
        &out,
    );
    fails(
        bin()
            .args([
                "train",
                "--method",
                "meanflow",
                "--data",
                "moons",
                "--meanflow-velocity",
                "marginal",
            ])
            .arg("--out")
            .arg(&out),
        "invalid value 'marginal' for '--meanflow-velocity",
        &out,
    );
    fails(
        bin()
            .args([
                "train",
                "--method",
                "shortcut",
                "--data",
                "moons",
                "--meanflow-velocity",
                "batch",
            ])
            .arg("--out")
            .arg(&out),
        "--meanflow-velocity applies to --method meanflow only",
        &out,
    );
    // A consistency model maps only to s = 0.
    let cm = dir.path().join("cm.safetensors");
    ok(bin()
        .args(["distill", "--steps", "3", "--batch", "32", "--method", "cm"])
        .arg("--teacher")
        .arg(r.join("t.safetensors"))
        .arg("--out")
        .arg(&cm));
    let y = dir.path().join("y.npy");
    fails(
        bin()
            .args(["apply", "--t", "0.9", "--s", "0.3"])
            .arg("--model")
            .arg(&cm)
            .arg("--input")
            .arg(r.join("x.npy"))
            .arg("--out")
            .arg(&y),
        "maps only to s = 0",
        &y,
    );
    ok(bin()
        .args(["apply", "--t", "0.9", "--s", "0"])
        .arg("--model")
        .arg(&cm)
        .arg("--input")
        .arg(r.join("x.npy"))
        .arg("--out")
        .arg(&y));
    let s = dir.path().join("s.npy");
    fails(
        bin()
            .args(["sample", "--nfe", "4", "--sampler", "deterministic"])
            .arg("--model")
            .arg(&cm)
            .arg("--out")
            .arg(&s),
        "maps only to s = 0",
        &s,
    );
    fails(
        bin()
            .args(["sample", "--sampler", "gamma:2"])
            .arg("--model")
            .arg(r.join("m.safetensors"))
            .arg("--out")
            .arg(&s),
        "unknown sampler",
        &s,
    );
}

/// `train` on images takes the image recipe of its method (`DistillConfig::for_data`): MeanFlow the paper's
/// conditional velocity and adaptive weight, self-LMD 90% of the batch on the diagonal; on points the
/// method's own defaults; a flag still overrides either.
#[test]
fn train_takes_the_image_defaults_on_images_and_flags_override_them() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = [
        "--channels",
        "4",
        "--channel-mult",
        "1,2",
        "--attention",
        "none",
        "--groups",
        "2",
    ];
    let distill = |method: &str, data: &str, extra: &[&str]| {
        let out = dir.path().join(format!("{method}-{data}.safetensors"));
        let mut cmd = bin();
        cmd.args([
            "train", "--method", method, "--data", data, "--steps", "1", "--batch", "4",
        ])
        .args(extra)
        .arg("--out")
        .arg(&out);
        if data == "mnist" {
            cmd.args(tiny);
        }
        ok(&mut cmd);
        flowmap::checkpoint::Checkpoint::load(&out).unwrap().meta.training["distill"].clone()
    };
    let mf = distill("meanflow", "mnist", &[]);
    assert_eq!(mf["weighting"]["kind"], "adaptive", "{mf}");
    assert_eq!(mf["continuous"]["meanflow_velocity"], "conditional", "{mf}");
    let points = distill("meanflow", "moons", &[]);
    assert_eq!(points["weighting"]["kind"], "constant", "{points}");
    assert_eq!(points["continuous"]["meanflow_velocity"], "batch", "{points}");
    let flagged = distill(
        "meanflow",
        "mnist",
        &["--weighting", "constant", "--diagonal-fraction", "0.5"],
    );
    assert_eq!(flagged["weighting"]["kind"], "constant", "{flagged}");
    assert_eq!(flagged["times"]["diagonal_fraction"], 0.5, "{flagged}");
    assert_eq!(distill("self-lmd", "mnist", &[])["times"]["diagonal_fraction"], 0.9);
    assert_eq!(distill("shortcut", "mnist", &[])["times"]["diagonal_fraction"], 0.75);
    assert_eq!(distill("self-lmd", "moons", &[])["times"]["diagonal_fraction"], 0.25);
}

/// Images end to end on a tiny U-Net: teacher on the embedded digits, an EMD map from it, class-conditional
/// samples as `.npy` in the data's range and as a PNG grid, and an image evaluation; then the image errors.
#[test]
fn images_end_to_end_and_their_errors() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let tiny = [
        "--channels",
        "8",
        "--channel-mult",
        "1,2",
        "--attention",
        "14",
        "--groups",
        "4",
    ];
    ok(bin()
        .args(["teacher", "--data", "mnist", "--steps", "2", "--batch", "8"])
        .args(tiny)
        .arg("--out")
        .arg(root.join("t.safetensors")));
    ok(bin()
        .args(["distill", "--method", "emd", "--steps", "2", "--batch", "8"])
        .arg("--teacher")
        .arg(root.join("t.safetensors"))
        .arg("--out")
        .arg(root.join("m.safetensors")));
    ok(bin()
        .args(["sample", "--nfe", "1", "--n", "20", "--class", "all"])
        .arg("--model")
        .arg(root.join("m.safetensors"))
        .arg("--out")
        .arg(root.join("s.npy"))
        .arg("--png")
        .arg(root.join("s.png")));
    let png = image::open(root.join("s.png")).unwrap();
    assert_eq!(
        (png.width(), png.height()),
        (2 * 29 + 1, 10 * 29 + 1),
        "10 rows (one per class), 2 columns"
    );
    let s = flowmap::data::npy::read_npy_nd(&root.join("s.npy")).unwrap();
    assert_eq!(s.shape, vec![20, 1, 28, 28]);
    assert!(
        s.data.iter().any(|&v| v > 1.5),
        "written in the data's range (0..255), not [-1, 1]"
    );
    let table = ok(bin()
        .args(["eval", "--nfe", "1", "--n", "20"])
        .arg("--model")
        .arg(root.join("m.safetensors"))
        .arg("--out")
        .arg(root.join("eval")));
    assert!(
        table.contains("class accuracy") && table.contains("data (training images)"),
        "{table}"
    );
    assert!(root.join("eval").join("grid-0-nfe1.png").exists());
    // `--grid-power` walks a flow map's images on the power grid too (it once fell back to the uniform one).
    // A map seeded from the shipped teacher is one Euler step of it, so the grid shows in its samples.
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/mnist-teacher.safetensors");
    ok(bin()
        .args(["distill", "--method", "emd", "--steps", "1", "--batch", "4"])
        .arg("--teacher")
        .arg(&shipped)
        .arg("--out")
        .arg(root.join("euler.safetensors")));
    let map_row = |extra: &[&str], dir: &str| -> String {
        let table = ok(bin()
            .args(["eval", "--nfe", "2", "--n", "20"])
            .args(extra)
            .arg("--model")
            .arg(root.join("euler.safetensors"))
            .arg("--out")
            .arg(root.join(dir)));
        let row = table.lines().find(|l| l.starts_with("| flow map")).unwrap_or_default();
        row.to_string()
    };
    let (uniform, power) = (
        map_row(&[], "eval-uniform"),
        map_row(&["--grid-power", "2"], "eval-rho"),
    );
    assert!(
        uniform.contains("| 2-step |") && power.contains("| 2-step, ρ=2 |"),
        "{uniform}\n{power}"
    );
    let fd = |row: &str| row.split('|').nth(4).map(str::trim).map(str::to_string);
    assert_ne!(
        fd(&uniform),
        fd(&power),
        "the grid through t = 0.25 gives other samples than through 0.5"
    );

    let out = root.join("bad.npy");
    let model = root.join("m.safetensors");
    let sample = |extra: &[&str]| {
        let mut c = bin();
        c.args(["sample", "--nfe", "1", "--n", "4"])
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(&out)
            .args(extra);
        c
    };
    fails(
        &mut sample(&["--class", "10"]),
        "--class: class 10 is out of range",
        &out,
    );
    fails(&mut sample(&["--class", "seven"]), "not a class number", &out);
    let m2d = fixture().root.join("m.safetensors");
    fails(
        bin()
            .args(["sample", "--nfe", "1", "--n", "4", "--class", "3"])
            .arg("--model")
            .arg(&m2d)
            .arg("--out")
            .arg(&out),
        "unconditional",
        &out,
    );
    fails(
        bin()
            .args(["sample", "--nfe", "1", "--n", "4"])
            .arg("--model")
            .arg(&m2d)
            .arg("--out")
            .arg(&out)
            .arg("--png")
            .arg(root.join("g.png")),
        "image grids",
        &out,
    );
    let t = root.join("t2.safetensors");
    fails(
        bin()
            .args(["teacher", "--data", "mnist", "--steps", "1", "--hidden", "8"])
            .arg("--out")
            .arg(&t),
        "--hidden does not apply to the unet backbone",
        &t,
    );
    fails(
        bin()
            .args([
                "teacher",
                "--data",
                "mnist",
                "--steps",
                "1",
                "--channel-mult",
                "1,2,2,2",
            ])
            .arg("--out")
            .arg(&t),
        "do not divide",
        &t,
    );
    fails(
        bin()
            .args(["teacher", "--data", "mnist", "--steps", "1", "--arch", "resnet"])
            .arg("--out")
            .arg(&t),
        "unknown architecture 'resnet'",
        &t,
    );
}

/// Long runs: a run killed by SIGKILL and resumed from its last state ends with a byte-identical
/// checkpoint; resuming with other settings names them; SIGINT saves the state, prints the command that
/// resumes it and exits with 130; repeated NaNs stop the run with its last good state saved.
#[test]
fn long_runs_survive_kill_interrupt_and_nan() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let run = |out: &str, steps: &str| {
        let mut c = bin();
        c.args([
            "teacher",
            "--data",
            "checkerboard",
            "--steps",
            steps,
            "--batch",
            "64",
            "--hidden",
            "16",
            "--depth",
            "1",
            "--checkpoint-every",
            "40",
        ])
        .arg("--out")
        .arg(root.join(out));
        c
    };
    let args = |out: &str| run(out, "3000");
    ok(&mut args("a.safetensors"));
    assert!(
        root.join("a.state.safetensors").exists(),
        "a run writing states ends with one"
    );

    // Killed without warning as soon as its first state is on disk.
    let mut child = args("b.safetensors").spawn().unwrap();
    let state = root.join("b.state.safetensors");
    while !state.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before its first state"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!root.join("b.safetensors").exists(), "the killed run did not finish");
    ok(args("b.safetensors").arg("--resume").arg(&state));
    assert!(
        std::fs::read(root.join("a.safetensors")).unwrap() == std::fs::read(root.join("b.safetensors")).unwrap(),
        "the resumed run's checkpoint differs from the uninterrupted run's"
    );
    fails(
        args("c.safetensors")
            .args(["--lr", "0.001"])
            .arg("--resume")
            .arg(&state),
        "train.lr (state 0.002, now 0.001)",
        &root.join("c.safetensors"),
    );

    // SIGINT: finish the step, save, say how to resume, exit 130.
    let mut child = run("d.safetensors", "1000000")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    while !root.join("d.state.safetensors").exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before its first state"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted after step"), "{err}");
    let resume = err
        .lines()
        .find(|l| l.starts_with("resume with: "))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        resume.contains("teacher")
            && resume.ends_with(&format!("--resume {}", root.join("d.state.safetensors").display())),
        "{resume}"
    );
    assert!(!root.join("d.safetensors").exists());
    let tmp: Vec<_> = std::fs::read_dir(root)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(tmp.is_empty(), "{tmp:?}");

    // NaN from step 35 on: three rollbacks to step 30, each announced, then an error naming the saved state.
    let out = args("e.safetensors")
        .args(["--inject-nan-from", "35", "--rollback-every", "10"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.trim_end().lines().collect();
    assert_eq!(lines.len(), 4, "{err}");
    assert!(
        lines[2].ends_with("rolled back to step 30, learning rate ×0.125"),
        "{err}"
    );
    assert!(
        lines[3].starts_with("error: training diverged at step 35: the loss is NaN, after 3 rollbacks")
            && lines[3].contains("the last good state (step 30) is in"),
        "{err}"
    );
    assert!(root.join("e.state.safetensors").exists() && !root.join("e.safetensors").exists());
}

/// Every loader survives a short seeded mutation run: no panic, no load holding more memory than its file
/// justifies (`flowmap bench fuzz` gives each ten minutes).
#[test]
fn loaders_survive_a_short_fuzz_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = ok(bin()
        .args(["bench", "fuzz", "--seconds", "1", "--seed", "7", "--out"])
        .arg(dir.path()));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("fuzz.json")).unwrap()).unwrap();
    let loaders = json["loaders"].as_array().unwrap();
    assert_eq!(loaders.len(), 11, "{out}");
    for l in loaders {
        assert_eq!(l["panics"], 0, "{l}");
        assert_eq!(l["over_memory"], 0, "{l}");
        assert!(l["cases"].as_u64().unwrap() > 50, "{l}");
        assert!(l["errors"].as_u64().unwrap() > 0, "mutants must be refused: {l}");
    }
    fails(
        bin()
            .args(["bench", "fuzz", "--seconds", "1", "--loader", "nope", "--out"])
            .arg(dir.path().join("x")),
        "unknown loader nope",
        &dir.path().join("x").join("fuzz.json"),
    );
}

/// `flowmap bench mnist` at a toy budget: a report with every chosen method's training, the acceptance
/// checks and the budget behind the data-only map; bad methods and budgets are one-line errors.
#[test]
fn bench_mnist_reports_its_budget_and_checks() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mnist");
    ok(bin()
        .args(["bench", "mnist", "--shipped-teacher", "--data-only", "finetune"])
        .args([
            "--methods",
            "emd,meanflow",
            "--map-steps",
            "2",
            "--batch",
            "8",
            "--n-eval",
            "10",
            "--out",
        ])
        .arg(&out));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let training = json["training"].as_array().unwrap();
    let models: Vec<&str> = training.iter().map(|t| t["model"].as_str().unwrap()).collect();
    assert_eq!(models, ["teacher", "emd", "meanflow"]);
    assert_eq!(training[2]["init"], "teacher");
    assert_eq!(
        training[2]["total_steps"], 3002,
        "the teacher's 3000 steps and the map's 2"
    );
    // The data floor, the teacher's Euler at 1, 2, 4, 8 and dopri5, and each map at four NFE.
    assert_eq!(json["rows"].as_array().unwrap().len(), 1 + 5 + 2 * 4);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for needle in [
        "# flowmap bench mnist",
        "## Acceptance",
        "Euler-8 FD",
        "within 1.5×",
        "3002 steps of data",
    ] {
        assert!(md.contains(needle), "report.md lacks '{needle}'");
    }
    assert!(out.join("fd-vs-nfe.png").exists() && out.join("meanflow.safetensors").exists());
    let bad = dir.path().join("bad");
    fails(
        bin()
            .args(["bench", "mnist", "--methods", "emd,nope", "--out"])
            .arg(&bad),
        "unknown method 'nope'",
        &bad,
    );
    fails(
        bin().args(["bench", "mnist", "--map-steps", "0", "--out"]).arg(&bad),
        "budgets must be positive",
        &bad,
    );
}

/// `bench guidance` at a toy budget with a consistency model as the guidance-distilled map: its rows, its
/// acceptance table and its 2-step rows on the consistency sampler; a data-only method is refused.
#[test]
fn bench_guidance_distils_with_the_method_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("guidance");
    ok(bin()
        .args(["bench", "guidance", "--method", "cm", "--scales", "1,2"])
        .args([
            "--map-steps",
            "2",
            "--batch",
            "4",
            "--weak-steps",
            "2",
            "--n-eval",
            "10",
            "--out",
        ])
        .arg(&out));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("guidance.json")).unwrap()).unwrap();
    assert_eq!(json["config"]["method"], "cm");
    assert_eq!(json["config"]["batch_size"], 4);
    let rows = json["rows"].as_array().unwrap();
    let cm: Vec<&serde_json::Value> = rows
        .iter()
        .filter(|r| r["model"] == "CM map (guidance distilled)")
        .collect();
    // 1 and 2 NFE at each of the two scales, each row with one `sampler`: how it sampled.
    let samplers: Vec<&str> = cm.iter().map(|r| r["sampler"].as_str().unwrap()).collect();
    assert_eq!(samplers, ["1-step", "2-step", "1-step", "2-step"]);
    assert_eq!(json["acceptance"].as_array().unwrap().len(), 2);
    let md = std::fs::read_to_string(out.join("guidance.md")).unwrap();
    assert!(md.contains("the CM map distils the guided teacher (at `s = 0`"), "{md}");
    assert!(out.join("cm-guided.safetensors").exists());
    let bad = dir.path().join("bad");
    fails(
        bin()
            .args(["bench", "guidance", "--method", "meanflow", "--out"])
            .arg(&bad),
        "trains from data",
        &bad,
    );
}

/// Classifier-free guidance of a class-conditional teacher: two evaluations per step, `w = 1` the plain
/// conditional model, and one-line errors for bad scales and models it does not apply to.
#[test]
fn guidance_on_the_command_line() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let teacher = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/mnist-teacher.safetensors");
    let run = |extra: &[&str], out: &str| {
        let mut c = bin();
        c.args(["sample", "--model"])
            .arg(&teacher)
            .args(["--solver", "euler", "--nfe", "2", "--n", "20"])
            .args(extra)
            .arg("--out")
            .arg(dir.path().join(out));
        c
    };
    let out = bin_stderr(&mut run(&["--guidance", "2.5", "--class", "all"], "g.npy"));
    assert!(out.contains("guidance w = 2.5), NFE 4"), "{out}");
    ok(&mut run(&["--guidance", "1"], "g1.npy"));
    ok(&mut run(&[], "plain.npy"));
    assert!(
        std::fs::read(dir.path().join("g1.npy")).unwrap() == std::fs::read(dir.path().join("plain.npy")).unwrap(),
        "w = 1 is the conditional model"
    );
    for (w, needle) in [
        ("-1", "finite number ≥ 0, got -1"),
        ("inf", "finite number ≥ 0, got inf"),
    ] {
        fails(
            &mut run(&["--guidance", w], "bad.npy"),
            needle,
            &dir.path().join("bad.npy"),
        );
    }
    fails(
        &mut run(&["--guidance", "2", "--class", "null"], "bad.npy"),
        "--class null is the unconditional model",
        &dir.path().join("bad.npy"),
    );
    let other = |model: &str| {
        let mut c = bin();
        c.args(["sample", "--n", "4", "--guidance", "2", "--model"])
            .arg(f.root.join(model))
            .arg("--out")
            .arg(dir.path().join("bad.npy"));
        c
    };
    fails(
        &mut other("t.safetensors"),
        "the model is unconditional",
        &dir.path().join("bad.npy"),
    );
    fails(
        &mut other("m.safetensors"),
        "distilled without guidance",
        &dir.path().join("bad.npy"),
    );

    // Guidance distilled into a map: one map, sampled at any w of its range, one NFE a step.
    let map = dir.path().join("guided.safetensors");
    let distill = |teacher: &Path, range: &str, out: &Path| {
        let mut c = bin();
        c.args([
            "distill",
            "--method",
            "emd",
            "--steps",
            "2",
            "--batch",
            "8",
            "--teacher",
        ])
        .arg(teacher)
        .args(["--guidance-range", range, "--out"])
        .arg(out);
        c
    };
    ok(&mut distill(&teacher, "1,3", &map));
    let sample_map = |extra: &[&str], out: &str| {
        let mut c = bin();
        c.args(["sample", "--n", "10", "--class", "all", "--model"])
            .arg(&map)
            .args(extra)
            .arg("--out")
            .arg(dir.path().join(out));
        c
    };
    let a = bin_stderr(&mut sample_map(&["--guidance", "1.5"], "w15.npy"));
    assert!(a.contains("guidance w = 1.5), NFE 1"), "{a}");
    ok(&mut sample_map(&["--guidance", "3"], "w3.npy"));
    assert!(
        std::fs::read(dir.path().join("w15.npy")).unwrap() != std::fs::read(dir.path().join("w3.npy")).unwrap(),
        "the scale is an input of the map"
    );
    fails(
        &mut sample_map(&[], "bad.npy"),
        "pass --guidance w",
        &dir.path().join("bad.npy"),
    );
    fails(
        &mut sample_map(&["--guidance", "-2"], "bad.npy"),
        "finite number ≥ 0",
        &dir.path().join("bad.npy"),
    );
    let bad_map = dir.path().join("bad.safetensors");
    for (range, needle) in [("3,1", "lo > hi"), ("-1,2", "≥ 0"), ("1,x", "not a number")] {
        fails(&mut distill(&teacher, range, &bad_map), needle, &bad_map);
    }
    let mut unconditional = distill(&f.root.join("t.safetensors"), "1,2", &bad_map);
    fails(&mut unconditional, "class-conditional teacher", &bad_map);

    // Guidance learned from data (MeanFlow's guided field): the map takes ω as an input with no teacher.
    let train = |data: &str, range: &str, out: &Path| {
        let mut c = bin();
        c.args(["train", "--method", "meanflow", "--steps", "2", "--batch", "8"])
            .args(["--data", data, "--guidance-range", range, "--out"])
            .arg(out);
        c
    };
    let mf = dir.path().join("mf.safetensors");
    ok(train("mnist", "1,4", &mf).args(["--channels", "8"]));
    let sampled = bin_stderr(
        bin()
            .args(["sample", "--n", "10", "--class", "all", "--guidance", "2.5", "--model"])
            .arg(&mf)
            .arg("--out")
            .arg(dir.path().join("mf.npy")),
    );
    assert!(sampled.contains("guidance w = 2.5), NFE 1"), "{sampled}");
    fails(
        &mut train("checkerboard", "1,2", &bad_map),
        "needs labelled data",
        &bad_map,
    );
}

/// Runs a command that must succeed and returns its stderr.
fn bin_stderr(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "command failed: {err}");
    err
}

/// Every registered method, data spec and backbone is in the help a user reads (`distill`/`train --help`,
/// `--data`'s and `--arch`'s help) and in the README: the lists are generated from the registries, or checked
/// against them here.
#[test]
fn every_registered_method_data_spec_and_backbone_is_in_the_help_and_the_readme() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md")).unwrap();
    let help = |cmd: &str| ok(bin().args([cmd, "--help"]));
    let (distill, train, teacher) = (help("distill"), help("train"), help("teacher"));
    for method in flowmap::objective::Method::all() {
        let name = method.name();
        let listed = if method.needs_teacher() { &distill } else { &train };
        assert!(
            listed.contains(&format!("  {name} ")),
            "`{name}` is missing from its command's --help"
        );
        assert!(
            readme.contains(&format!("| `{name}` |")),
            "`{name}` is missing from the README's method table"
        );
    }
    for form in flowmap::data::specs() {
        assert!(
            teacher.contains(&form.syntax),
            "`{}` is missing from --data's help",
            form.syntax
        );
        for syntax in form.syntax.split(", ") {
            assert!(
                readme.contains(&format!("`{syntax}`")),
                "`{syntax}` is missing from the README's data table"
            );
        }
    }
    for name in flowmap::backbone::Arch::NAMES {
        assert!(
            teacher.contains(name),
            "backbone `{name}` is missing from --arch's help"
        );
        assert!(
            readme.contains(&format!("`{name}`")),
            "backbone `{name}` is missing from the README"
        );
    }
    // An unknown spec's error names every form too.
    let e = bin()
        .args(["teacher", "--data", "nope", "--out"])
        .arg(std::env::temp_dir().join("x.safetensors"))
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&e.stderr);
    for form in flowmap::data::specs() {
        assert!(
            e.contains(&form.syntax),
            "the unknown-spec error omits `{}`: {e}",
            form.syntax
        );
    }
}

/// `--minutes` plans the steps that fit and says how many; `--steps` that many gives the same bytes.
/// `distill` without `--method` takes the recommended recipe, says so first and records it.
#[test]
fn time_budgets_and_the_recommended_recipe() {
    let f = fixture();
    let d = tempfile::tempdir().unwrap();
    let teacher = |out: &Path, budget: &[&str]| {
        let o = bin()
            .args([
                "teacher", "--data", "moons", "--batch", "32", "--hidden", "16", "--depth", "1",
            ])
            .args(budget)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let said = teacher(&d.path().join("a.safetensors"), &["--minutes", "0.02"]);
    let steps: usize = said
        .split(" plan ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no plan in: {said}"));
    assert!(steps >= 1 && said.contains(&format!("--steps {steps} reproduces the run")));
    teacher(&d.path().join("b.safetensors"), &["--steps", &steps.to_string()]);
    assert_eq!(
        std::fs::read(d.path().join("a.safetensors")).unwrap(),
        std::fs::read(d.path().join("b.safetensors")).unwrap()
    );
    fails(
        bin()
            .args(["teacher", "--data", "moons", "--minutes", "1", "--steps", "5"])
            .arg("--out")
            .arg(d.path().join("c.safetensors")),
        "cannot be used with",
        &d.path().join("c.safetensors"),
    );
    let out = d.path().join("r.safetensors");
    let o = bin()
        .args(["distill", "--steps", "5", "--batch", "32"])
        .arg("--teacher")
        .arg(f.root.join("t.safetensors"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.lines()
            .next()
            .unwrap()
            .contains("recommended one-step recipe for points, cm"),
        "{err}"
    );
    let ck = flowmap::checkpoint::Checkpoint::load(&out).unwrap();
    assert_eq!(ck.meta.training["objective"], "cm");
    assert!(ck.meta.training["recommended"]
        .as_str()
        .unwrap()
        .contains("bench compare"));
    // On images the recipe brings its training settings (batch 64, learning rate 5e-4, EMA decay 0.99,
    // where the general defaults are 1,024, 2e-3 and 0.999); a flag still overrides one of them.
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/mnist-teacher.safetensors");
    let image = d.path().join("i.safetensors");
    let o = bin()
        .args(["distill", "--steps", "1", "--ema", "0.5", "--quiet"])
        .arg("--teacher")
        .arg(&shipped)
        .arg("--out")
        .arg(&image)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("recommended one-step recipe for images, cm"), "{err}");
    let train = &flowmap::checkpoint::Checkpoint::load(&image).unwrap().meta.training["train"];
    assert_eq!(
        (&train["batch_size"], &train["lr"], &train["ema_decay"]),
        (
            &serde_json::json!(64),
            &serde_json::json!(5e-4),
            &serde_json::json!(0.5)
        )
    );
}

#[test]
fn plain_ops_and_bf16_on_them_and_one_bench_row() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let teacher = |out: &Path, extra: &[&str]| {
        let o = bin()
            .args([
                "teacher",
                "--data",
                "checkerboard",
                "--steps",
                "30",
                "--batch",
                "64",
                "--hidden",
                "32",
            ])
            .args(extra)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    teacher(&p("fast.safetensors"), &[]);
    teacher(&p("plain.safetensors"), &["--plain-ops"]);
    let said = teacher(&p("plain-bf16.safetensors"), &["--plain-ops", "--precision", "bf16"]);
    assert!(said.contains("bf16 operands, f32 sums"), "{said}");
    let weights = |name: &str| {
        let ck = flowmap::checkpoint::Checkpoint::load(&p(name)).unwrap();
        let mut names: Vec<&String> = ck.tensors.keys().collect();
        names.sort();
        let mut all = vec![];
        for name in names {
            all.extend(ck.tensors[name].flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        all
    };
    let (fast, plain, bf16) = (
        weights("fast.safetensors"),
        weights("plain.safetensors"),
        weights("plain-bf16.safetensors"),
    );
    let gap = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    // The fused kernels and candle's ops differ by f32 summation order only; bf16 operands move the weights more.
    assert!(
        gap(&fast, &plain) < 1e-4,
        "fast path against plain ops: {}",
        gap(&fast, &plain)
    );
    assert!(
        gap(&plain, &bf16) > 1e-5,
        "bf16 on plain ops rounded nothing: {}",
        gap(&plain, &bf16)
    );

    let out = p("speed");
    ok(bin()
        .args([
            "bench",
            "speed",
            "--nets",
            "mlp",
            "--rows",
            "latency-1nfe",
            "--widths",
            "32",
        ])
        .args(["--batches", "64", "--seconds", "0.05", "--rounds", "1"])
        .arg("--out")
        .arg(&out));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("speed.json")).unwrap()).unwrap();
    let rows: Vec<&str> = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["workload"].as_str().unwrap())
        .collect();
    assert_eq!(rows, ["latency-1nfe"]);
    let out = p("speed-bad");
    fails(
        bin()
            .args(["bench", "speed", "--rows", "unet-teachr"])
            .arg("--out")
            .arg(&out),
        "unknown row 'unet-teachr'",
        &out,
    );
}

#[test]
fn bench_convergence_takes_a_run_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(&config, "[arch]\nhidden = 16\ndepth = 1\n[train]\nlr = 1e-3\n").unwrap();
    let out = dir.path().join("conv");
    ok(bin()
        .args([
            "bench",
            "convergence",
            "--methods",
            "emd",
            "--steps",
            "10,20",
            "--batch",
            "64",
        ])
        .arg("--config")
        .arg(&config)
        .arg("--out")
        .arg(&out));
    let md = std::fs::read_to_string(out.join("convergence.md")).unwrap();
    assert!(md.contains("a fresh MLP 16×1 student"), "{md}");
    assert!(md.contains("lr = 0.001"), "{md}");
    std::fs::write(&config, "[arch]\nkind = \"unet\"\n").unwrap();
    let out = dir.path().join("conv-bad");
    fails(
        bin()
            .args(["bench", "convergence", "--methods", "emd", "--steps", "10"])
            .arg("--config")
            .arg(&config)
            .arg("--out")
            .arg(&out),
        "[arch]: kind 'unet'",
        &out,
    );
}
