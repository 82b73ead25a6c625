//! Data-parallel training (`flowmap::dist`), with ranks as threads ([`Threads`]): every rank ends with the
//! same parameters, EMA and optimiser state, bit for bit, for the teacher and for maps trained with and
//! without exact JVPs; two ranks follow one process to f32 summation order; a run resumed at the same
//! world size continues bit for bit; ranks that disagree are refused.

use candle_core::{Device, Tensor};
use flowmap::backbone::{Arch, MlpConfig};
use flowmap::data::{DataSource, Toy};
use flowmap::dist::{Collective, Threads};
use flowmap::objective::Method;
use flowmap::pipeline::{self, MapJob, Teacher};
use flowmap::train::{RunControl, Silent, TrainConfig, TrainLog, TrainState};

fn data() -> DataSource {
    DataSource::Toy(Toy::Checkerboard)
}

fn arch() -> Arch {
    Arch::Mlp(MlpConfig {
        hidden: 64,
        depth: 2,
        ..MlpConfig::new(2)
    })
}

fn cfg(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        batch_size: 64,
        warmup_steps: 5,
        ..TrainConfig::default()
    }
}

/// What a rank ends with: its loss log, its final training state (parameters, EMA, optimiser) and the
/// states written on the way.
struct Ended {
    log: TrainLog,
    state: TrainState,
    written: Vec<TrainState>,
}

/// Runs `job(ctl)` on `world` ranks (threads; one process without a collective when `world` is 0),
/// capturing each rank's states (every `every` steps, and the final one).
fn on_ranks<F>(world: usize, every: usize, resume: Option<&TrainState>, job: F) -> Vec<flowmap::Result<Ended>>
where
    F: Fn(RunControl<'_>) -> flowmap::Result<TrainLog> + Sync,
{
    let run = |rank: Option<&Threads>| -> flowmap::Result<Ended> {
        let mut written = Vec::new();
        let mut sink = |s: &TrainState| -> flowmap::Result<()> {
            written.push(s.clone());
            Ok(())
        };
        let ctl = RunControl {
            checkpoint_every: Some(every),
            save_state: Some(&mut sink),
            resume: resume.cloned(),
            collective: rank.map(|r| r as &dyn Collective),
            ..RunControl::default()
        };
        let log = job(ctl)?;
        Ok(Ended {
            log,
            state: written.last().expect("the final state is written").clone(),
            written,
        })
    };
    if world == 0 {
        return vec![run(None)];
    }
    let group = Threads::group(world);
    std::thread::scope(|s| {
        let handles: Vec<_> = group.iter().map(|r| s.spawn(|| run(Some(r)))).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a rank panicked"))
            .collect()
    })
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

/// Every tensor of a training state, in order: parameters, EMA, both Adam moments.
fn tensors(s: &TrainState) -> Vec<(String, &Tensor)> {
    let mut out: Vec<(String, &Tensor)> = Vec::new();
    out.extend(s.live.iter().map(|(n, t)| (format!("param {n}"), t)));
    out.extend(s.ema.iter().map(|(n, t)| (format!("ema {n}"), t)));
    for (n, m, v) in &s.adam.moments {
        out.push((format!("adam m {n}"), m));
        out.push((format!("adam v {n}"), v));
    }
    out
}

/// The ranks hold the same state to the bit.
fn assert_ranks_identical(what: &str, ranks: &[Ended]) {
    let first = &ranks[0].state;
    for (r, e) in ranks.iter().enumerate().skip(1) {
        assert_eq!(e.state.meta.step, first.meta.step, "{what}: rank {r}'s step");
        assert_eq!(e.state.adam.step, first.adam.step, "{what}: rank {r}'s optimiser step");
        assert_eq!(e.log.losses, ranks[0].log.losses, "{what}: rank {r}'s loss log");
        assert_eq!(
            serde_json::to_string(&e.state.meta.rng).unwrap(),
            serde_json::to_string(&first.meta.rng).unwrap(),
            "{what}: rank {r}'s random stream"
        );
        for ((name, a), (_, b)) in tensors(&e.state).into_iter().zip(tensors(first)) {
            assert!(bits(a) == bits(b), "{what}: rank {r}'s {name} differs from rank 0's");
        }
    }
}

/// `max |a − b| / max |b|` over every parameter.
fn param_gap(a: &TrainState, b: &TrainState) -> f32 {
    let (mut d, mut m) = (0f32, 0f32);
    for ((_, x), (_, y)) in a.live.iter().zip(&b.live) {
        let (x, y) = (
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        for (p, q) in x.iter().zip(&y) {
            d = d.max((p - q).abs());
            m = m.max(q.abs());
        }
    }
    d / m
}

/// Two and four ranks against one process: the same losses (to `loss_tol`, relative) and parameters (to
/// `param_tol` of the largest).
fn assert_follows_one_process(what: &str, one: &Ended, ranks: &[Ended], loss_tol: f64, param_tol: f32) {
    for ((k, a), (_, b)) in ranks[0].log.losses.iter().zip(&one.log.losses) {
        assert!(
            (a - b).abs() <= loss_tol * b.abs(),
            "{what}: loss at step {k}: {a} on the ranks, {b} in one process"
        );
    }
    let gap = param_gap(&ranks[0].state, &one.state);
    eprintln!("{what}: parameters within {gap:.1e} of one process's");
    assert!(
        gap < param_tol,
        "{what}: the ranks' parameters differ from one process's by {gap}"
    );
}

/// A teacher's training under `ctl`, with the settings `settings(rank)` gives the rank (0 in one process).
fn teacher_with(
    settings: impl Fn(usize) -> TrainConfig + Sync,
) -> impl Fn(RunControl<'_>) -> flowmap::Result<TrainLog> + Sync {
    move |ctl| {
        let c = settings(ctl.collective.map_or(0, |c| c.rank()));
        Ok(pipeline::train_teacher_controlled(&data(), &arch(), &c, &Device::Cpu, &Silent, ctl)?.log)
    }
}

fn teacher_run(steps: usize) -> impl Fn(RunControl<'_>) -> flowmap::Result<TrainLog> + Sync {
    teacher_with(move |_| cfg(steps))
}

#[test]
fn teacher_and_maps_train_identically_on_every_rank_and_as_one_process() {
    let one = on_ranks(0, 1_000_000, None, teacher_run(30)).pop().unwrap().unwrap();
    for world in [2, 4] {
        let ranks: Vec<Ended> = on_ranks(world, 1_000_000, None, teacher_run(30))
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        assert_ranks_identical(&format!("teacher, {world} ranks"), &ranks);
        assert_follows_one_process(&format!("teacher, {world} ranks"), &one, &ranks, 1e-4, 1e-5);
    }

    // Every method's map: the distillations from one teacher (ctm with its ODE steps fixed by the whole
    // batch, the continuous ones through exact JVPs) and the data-only methods (meanflow's exact JVP too).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("teacher.safetensors");
    let t = pipeline::train_teacher(&data(), &arch(), &cfg(30), &Device::Cpu, &Silent).unwrap();
    t.save(&path).unwrap();
    for method in Method::all() {
        let job = |ctl: RunControl<'_>| -> flowmap::Result<TrainLog> {
            let teacher = Teacher::load(path.to_str().unwrap(), &Device::Cpu)?;
            let d = data();
            let job = MapJob {
                teacher: method.needs_teacher().then_some(&teacher),
                train: cfg(20),
                arch: arch(),
                ..MapJob::new(method, &d)
            };
            Ok(job.run_controlled(&Silent, ctl)?.log)
        };
        let one = on_ranks(0, 1_000_000, None, job).pop().unwrap().unwrap();
        let ranks: Vec<Ended> = on_ranks(2, 1_000_000, None, job)
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        assert_ranks_identical(method.name(), &ranks);
        // Direct regression's targets are dopri5 solves whose steps adapt to the rows they are given, so a
        // rank's block gets targets a little different from the whole batch's (to the solver's tolerance),
        // and AdamW's normalised steps carry that into parameters whose gradients are small: 8.9e-3 of the
        // largest after 20 steps. Every other method's targets are the same numbers on any split.
        let (loss_tol, param_tol) = if method == Method::Direct {
            (5e-2, 2e-2)
        } else {
            (1e-4, 1e-5)
        };
        assert_follows_one_process(method.name(), &one, &ranks, loss_tol, param_tol);
    }
}

/// A data-parallel run resumed at the same world size from its state at step 20 ends where the
/// uninterrupted run does, bit for bit.
#[test]
fn a_resumed_data_parallel_run_continues_bit_for_bit() {
    let ended = |r: Vec<flowmap::Result<Ended>>| -> Vec<Ended> { r.into_iter().map(|r| r.unwrap()).collect() };
    let whole = ended(on_ranks(2, 20, None, teacher_run(40)));
    let at_20 = &whole[0].written[0];
    assert_eq!(at_20.meta.step, 20);
    let resumed = ended(on_ranks(2, 20, Some(at_20), teacher_run(40)));
    assert_ranks_identical("resumed", &resumed);
    for ((name, a), (_, b)) in tensors(&resumed[0].state).into_iter().zip(tensors(&whole[0].state)) {
        assert!(
            bits(a) == bits(b),
            "the resumed run's {name} differs from the uninterrupted run's"
        );
    }
    assert_eq!(resumed[0].log.losses, whole[0].log.losses);
}

/// Ranks launched with different settings, or with a batch that does not split evenly, are refused on
/// every rank with the same one-line error before any step.
#[test]
fn ranks_that_disagree_are_refused_on_every_rank() {
    let differ = teacher_with(|rank| TrainConfig {
        lr: if rank == 1 { 1e-3 } else { 2e-3 },
        ..cfg(10)
    });
    for r in on_ranks(2, 1_000_000, None, differ) {
        let e = r.err().expect("refused").to_string();
        assert!(
            e.contains("the ranks disagree on the run's settings: rank 1's differs"),
            "{e}"
        );
    }
    let uneven = teacher_with(|_| TrainConfig {
        batch_size: 63,
        ..cfg(10)
    });
    for r in on_ranks(2, 1_000_000, None, uneven) {
        let e = r.err().expect("refused").to_string();
        assert!(
            e.contains("a batch of 63 rows does not split evenly over 2 ranks"),
            "{e}"
        );
    }
}
