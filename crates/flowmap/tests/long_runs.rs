//! Long runs lose nothing: a run stopped at any step and resumed from its saved state ends with the same
//! bits as the run never stopped (for teachers and maps, MLPs and U-Nets with dropout, objectives with
//! their own state); a resumed run with other settings is refused by name; a non-finite loss rolls back
//! and the run goes on, and repeated ones stop it with its last good state saved.

mod common;

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{Device, Tensor, Var};
use candle_nn::ParamsAdamW;
use common::{labels_npy, teacher, write_npy};
use flowmap::backbone::{vars_sorted, Arch, MlpConfig, UnetConfig};
use flowmap::data::{DataSource, Toy};
use flowmap::objective::{DistillConfig, Method};
use flowmap::optim::AdamW;
use flowmap::pipeline::{self, MapJob, Teacher};
use flowmap::train::{Progress, Recovery, RunControl, TrainConfig, TrainState};
use flowmap::Error;

fn small_mlp() -> Arch {
    Arch::Mlp(MlpConfig {
        hidden: 32,
        depth: 2,
        ..MlpConfig::new(2)
    })
}

fn tc(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        batch_size: 64,
        warmup_steps: 5,
        seed: 3,
        ..TrainConfig::default()
    }
}

/// A run's result: its parameters' bits and its loss log.
type Bits = (Vec<(String, Vec<u32>)>, Vec<(usize, f64)>);

fn bits(vars: &candle_nn::VarMap, log: &flowmap::train::TrainLog) -> Bits {
    let p = vars_sorted(vars)
        .into_iter()
        .map(|(n, v)| {
            let f = v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (n, f.iter().map(|x| x.to_bits()).collect())
        })
        .collect();
    (p, log.losses.clone())
}

/// Runs `job` straight through, then again stopped after `stop_at` steps (the stop flag raised from the
/// progress callback, as a signal handler raises it), its state written to a file, read back and resumed:
/// the two results must be the same bits.
fn assert_resume_is_exact(stop_at: usize, job: impl Fn(&dyn Progress, RunControl<'_>) -> flowmap::Result<Bits>) {
    let straight = job(&flowmap::train::Silent, RunControl::default()).unwrap();

    let stop = AtomicBool::new(false);
    let saved: RefCell<Option<TrainState>> = RefCell::new(None);
    let mut save = |s: &TrainState| {
        *saved.borrow_mut() = Some(s.clone());
        Ok(())
    };
    let progress = |step: usize, _: Option<f64>| {
        if step == stop_at {
            stop.store(true, Ordering::SeqCst);
        }
    };
    let ctl = RunControl {
        save_state: Some(&mut save),
        stop: Some(&stop),
        ..RunControl::default()
    };
    match job(&progress, ctl) {
        Err(Error::Interrupted { step }) => assert_eq!(step, stop_at),
        other => panic!("expected an interrupt, got {:?}", other.map(|_| ())),
    }
    let state = saved.borrow_mut().take().expect("the state was saved");
    assert_eq!(state.meta.step, stop_at);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.state.safetensors");
    state.save(&path).unwrap();
    let state = TrainState::load(&path).unwrap();
    let resumed = job(
        &flowmap::train::Silent,
        RunControl {
            resume: Some(state),
            ..RunControl::default()
        },
    )
    .unwrap();
    assert!(straight.0 == resumed.0, "the resumed run's parameters differ");
    assert_eq!(straight.1, resumed.1, "the resumed run's loss log differs");
}

#[test]
fn an_mlp_teacher_resumed_is_the_same_run() {
    let data = DataSource::Toy(Toy::Moons);
    assert_resume_is_exact(13, |p, ctl| {
        let t = pipeline::train_teacher_controlled(&data, &small_mlp(), &tc(30), &Device::Cpu, p, ctl)?;
        Ok(bits(&t.vars, &t.log))
    });
}

#[test]
fn progressive_distillation_resumed_mid_stage_is_the_same_run() {
    // Stages of 8 steps: the run stops in stage 1 and its frozen snapshot (the objective's own state) must
    // come back with it.
    let data = DataSource::Mixture(common::mixture());
    let teacher = Teacher::Gmm(teacher());
    let mut objective = DistillConfig::for_method(Method::Progressive);
    objective.continuous.progressive_stage_steps = 8;
    assert_resume_is_exact(11, |p, ctl| {
        let m = MapJob {
            teacher: Some(&teacher),
            objective,
            train: tc(24),
            arch: small_mlp(),
            ..MapJob::new(Method::Progressive, &data)
        }
        .run_controlled(p, ctl)?;
        Ok(bits(&m.vars, &m.log))
    });
}

#[test]
fn meanflow_from_data_resumed_is_the_same_run() {
    let data = DataSource::Toy(Toy::Checkerboard);
    assert_resume_is_exact(7, |p, ctl| {
        let m = MapJob {
            train: tc(20),
            arch: small_mlp(),
            ..MapJob::new(Method::Meanflow, &data)
        }
        .run_controlled(p, ctl)?;
        Ok(bits(&m.vars, &m.log))
    });
}

#[test]
fn a_unet_with_dropout_and_label_dropout_resumed_is_the_same_run() {
    let dir = tempfile::tempdir().unwrap();
    let (images, labels) = (dir.path().join("x.npy"), dir.path().join("y.npy"));
    let px: Vec<u8> = (0..24 * 36).map(|i| ((i * 37) % 251) as u8).collect();
    write_npy(&images, "|u1", &[24, 6, 6], &px);
    labels_npy(&labels, &(0..24).map(|i| i % 3).collect::<Vec<i64>>());
    let data = DataSource::from_spec(&DataSource::npy_with_labels(&images, &labels)).unwrap();
    let arch = Arch::Unet(UnetConfig {
        channels: 8,
        channel_mult: vec![1, 2],
        attention_resolutions: vec![3],
        groups: 4,
        time_features: 4,
        dropout: 0.2,
        num_classes: Some(3),
        ..UnetConfig::new(&[1, 6, 6])
    });
    let cfg = TrainConfig {
        batch_size: 8,
        label_dropout: 0.3,
        ..tc(9)
    };
    assert_resume_is_exact(4, |p, ctl| {
        let t = pipeline::train_teacher_controlled(&data, &arch, &cfg, &Device::Cpu, p, ctl)?;
        Ok(bits(&t.vars, &t.log))
    });
}

/// The state of a teacher run stopped after `k` of `steps` steps.
fn stopped_state(data: &DataSource, cfg: &TrainConfig, k: usize) -> TrainState {
    let stop = AtomicBool::new(false);
    let saved = RefCell::new(None);
    let mut save = |s: &TrainState| {
        *saved.borrow_mut() = Some(s.clone());
        Ok(())
    };
    let progress = |step: usize, _: Option<f64>| stop.store(step == k, Ordering::SeqCst);
    let ctl = RunControl {
        save_state: Some(&mut save),
        stop: Some(&stop),
        ..RunControl::default()
    };
    let r = pipeline::train_teacher_controlled(data, &small_mlp(), cfg, &Device::Cpu, &progress, ctl);
    assert!(matches!(r, Err(Error::Interrupted { .. })));
    saved.into_inner().unwrap()
}

#[test]
fn resuming_with_other_settings_is_refused_by_name_and_more_steps_are_allowed() {
    let data = DataSource::Toy(Toy::Moons);
    let state = stopped_state(&data, &tc(20), 10);
    let resume = |cfg: TrainConfig| {
        pipeline::train_teacher_controlled(
            &data,
            &small_mlp(),
            &cfg,
            &Device::Cpu,
            &flowmap::train::Silent,
            RunControl {
                resume: Some(state.clone()),
                ..RunControl::default()
            },
        )
        .map(|t| t.log.steps)
    };
    let e = resume(TrainConfig { lr: 1e-3, ..tc(20) }).unwrap_err().to_string();
    assert!(e.contains("train.lr (state 0.002, now 0.001)"), "{e}");
    let e = resume(TrainConfig {
        batch_size: 32,
        seed: 9,
        ..tc(20)
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("train.batch_size") && e.contains("train.seed"), "{e}");
    let e = resume(tc(5)).unwrap_err().to_string();
    assert!(e.contains("has done 10 steps"), "{e}");
    assert_eq!(resume(tc(30)).unwrap(), 30, "a run can be lengthened");
    // Another architecture is refused before a step is taken.
    let e = pipeline::train_teacher_controlled(
        &data,
        &Arch::Mlp(MlpConfig::new(2)),
        &tc(20),
        &Device::Cpu,
        &flowmap::train::Silent,
        RunControl {
            resume: Some(state),
            ..RunControl::default()
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("arch.hidden"), "{e}");
}

#[test]
fn a_nan_rolls_back_halves_the_learning_rate_and_the_run_goes_on() {
    let data = DataSource::Toy(Toy::Moons);
    // The loss of step 25 made NaN the first time it runs, through the loop's loss hook.
    let nan_once_at_25 = || {
        let mut fired = false;
        move |step: usize, loss: f64| {
            if step == 25 && !fired {
                fired = true;
                return f64::NAN;
            }
            loss
        }
    };
    let run = |fault: bool, recovery| {
        let mut hook = nan_once_at_25();
        pipeline::train_teacher_controlled(
            &data,
            &small_mlp(),
            &tc(40),
            &Device::Cpu,
            &flowmap::train::Silent,
            RunControl {
                loss_hook: fault.then_some(&mut hook as &mut dyn FnMut(usize, f64) -> f64),
                recovery,
                ..RunControl::default()
            },
        )
    };
    let every10 = Recovery {
        keep_every: 10,
        ..Recovery::default()
    };
    let t = run(true, every10).unwrap();
    assert_eq!(t.log.steps, 40);
    assert_eq!(t.log.events.len(), 1, "{:?}", t.log.events);
    let e = &t.log.events[0];
    assert_eq!(e.step, 25);
    assert!(
        e.what.contains("rolled back to step 20") && e.what.contains("×0.5"),
        "{}",
        e.what
    );
    let clean = run(false, every10).unwrap();
    assert!(
        bits(&t.vars, &t.log).0 != bits(&clean.vars, &clean.log).0,
        "the rolled-back run drew fresh batches"
    );
    for (_, v) in vars_sorted(&t.vars) {
        let f = v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(f.iter().all(|x| x.is_finite()));
    }
    // Without recovery the first NaN ends the run.
    let off = Recovery {
        keep_every: 0,
        ..Recovery::default()
    };
    match run(true, off) {
        Err(Error::Diverged { step, reason }) => assert_eq!((step, reason.as_str()), (25, "the loss is NaN")),
        other => panic!("expected divergence, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn repeated_nans_stop_the_run_and_save_its_last_good_state() {
    let data = DataSource::Toy(Toy::Moons);
    let saved = RefCell::new(None);
    let mut save = |s: &TrainState| {
        *saved.borrow_mut() = Some(s.clone());
        Ok(())
    };
    let r = pipeline::train_teacher_controlled(
        &data,
        &small_mlp(),
        &tc(40),
        &Device::Cpu,
        &flowmap::train::Silent,
        RunControl {
            save_state: Some(&mut save),
            loss_hook: Some(&mut |step: usize, loss: f64| if step >= 25 { f64::NAN } else { loss }),
            recovery: Recovery {
                keep_every: 10,
                ..Recovery::default()
            },
            ..RunControl::default()
        },
    );
    match r {
        Err(Error::Diverged { step, reason }) => {
            assert_eq!(step, 25);
            assert!(reason.contains("after 3 rollbacks"), "{reason}");
        }
        other => panic!("expected divergence, got {:?}", other.map(|_| ())),
    }
    let good = saved.into_inner().expect("the last good state was saved");
    assert_eq!(good.meta.step, 20);
    assert_eq!(good.meta.lr_scale, 0.125, "the state keeps the reduced learning rate");
}

#[test]
fn a_non_finite_gradient_is_caught_before_any_parameter_moves() {
    // d√x/dx at x = 0 is infinite while the loss √0 = 0 is finite.
    let x = Var::from_tensor(&Tensor::new(&[0.0f32, 1.0], &Device::Cpu).unwrap()).unwrap();
    let opt = AdamW::new(vec![("x".into(), x.clone())], ParamsAdamW::default()).unwrap();
    let loss = x.as_tensor().sqrt().unwrap().sum_all().unwrap();
    assert_eq!(loss.to_scalar::<f32>().unwrap(), 1.0);
    let grads = loss.backward().unwrap();
    assert!(!opt.grads_finite(&grads).unwrap());
    let fine = x.as_tensor().sqr().unwrap().sum_all().unwrap().backward().unwrap();
    assert!(opt.grads_finite(&fine).unwrap());
}

#[test]
fn state_files_round_trip_exactly_and_other_files_are_refused() {
    let data = DataSource::Toy(Toy::Moons);
    let state = stopped_state(&data, &tc(20), 10);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.state.safetensors");
    state.save(&path).unwrap();
    let back = TrainState::load(&path).unwrap();
    let flat = |v: &[(String, Tensor)]| -> Vec<(String, Vec<f32>)> {
        v.iter()
            .map(|(n, t)| (n.clone(), t.flatten_all().unwrap().to_vec1().unwrap()))
            .collect()
    };
    assert_eq!(flat(&state.live), flat(&back.live));
    assert_eq!(flat(&state.ema), flat(&back.ema));
    assert_eq!(state.adam.step, back.adam.step);
    assert_eq!(
        serde_json::to_string(&state.meta).unwrap(),
        serde_json::to_string(&back.meta).unwrap()
    );
    // A model checkpoint is not a training state.
    let t = pipeline::train_teacher(&data, &small_mlp(), &tc(2), &Device::Cpu, &flowmap::train::Silent).unwrap();
    let ck = dir.path().join("t.safetensors");
    t.save(&ck).unwrap();
    let e = TrainState::load(&ck).unwrap_err().to_string();
    assert!(e.contains("not a training state"), "{e}");
    // A truncated state is an error, not a panic.
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert!(TrainState::load(&path).is_err());
}

#[test]
fn a_batch_that_cannot_fit_is_refused_before_allocating_with_its_estimate() {
    if flowmap::train::available_memory().is_none() {
        return; // not Linux: nothing is checked
    }
    let data = DataSource::from_spec("mnist").unwrap();
    let arch = Arch::Unet(UnetConfig {
        num_classes: Some(10),
        ..UnetConfig::new(&[1, 28, 28])
    });
    let cfg = TrainConfig {
        batch_size: 10_000_000,
        ..tc(1)
    };
    let e = pipeline::train_teacher(&data, &arch, &cfg, &Device::Cpu, &flowmap::train::Silent)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("a training batch of 10000000 needs at least") && e.contains("GiB (estimated)"),
        "{e}"
    );
}
