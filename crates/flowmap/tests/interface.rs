//! The model interface: checkpoints written before it still load and give the same numbers; a condition
//! and a non-vector state go through a backbone, its tangent and a sampler; another probability path trains
//! and samples end to end.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use flowmap::backbone::{Arch, MlpConfig};
use flowmap::checkpoint::{Checkpoint, ModelKind};
use flowmap::data::{read_npy, DataSource, Toy};
use flowmap::flow_map::{FiniteDifference, FlowMap, FlowMapNet, Point, Tangent, TangentMap};
use flowmap::objective::{DistillConfig, MeanFlowVelocity, Method};
use flowmap::ode::{Scheme, Solver};
use flowmap::path::CosinePath;
use flowmap::pipeline::MapJob;
use flowmap::sample::{self, SampleContext, Sampler, TimeGrid};
use flowmap::train::{Silent, TrainConfig};
use flowmap::Cond;

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn values(x: &Tensor) -> Vec<f64> {
    x.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The fixtures were written by flowmap before this interface (`flowmap teacher --data checkerboard --steps
/// 300 --batch 256 --hidden 64 --depth 2`, `flowmap distill --method cm --steps 60 --batch 128`), with the
/// samples `flowmap sample --nfe 8 --solver heun --n 500` and `--nfe 2 --n 500` of the same binary.
#[test]
fn checkpoints_of_the_earlier_format_load_and_reproduce_their_samples() {
    let dev = Device::Cpu;
    let teacher = Checkpoint::load(&fixture("legacy-teacher.safetensors")).unwrap();
    assert_eq!(teacher.meta.kind, ModelKind::Teacher);
    let Arch::Mlp(cfg) = &teacher.meta.arch else {
        panic!("the legacy teacher is an MLP")
    };
    assert_eq!((cfg.dim, cfg.hidden, cfg.depth), (2, 64, 2));
    let (net, _) = teacher.velocity_net(&dev).unwrap();
    let z = sample::noise(500, &[2], 0, &dev).unwrap();
    let x = sample::sample_ode(&net, &z, Solver::fixed(Scheme::Heun, 4), &Cond::none()).unwrap();
    assert_eq!(x.nfe, 8);
    assert_eq!(
        values(&x.x),
        read_npy(&fixture("legacy-teacher-heun8.npy")).unwrap().data
    );

    // A consistency model was a flow map trained by `cm`; it loads as what it is.
    let cm = Checkpoint::load(&fixture("legacy-cm.safetensors")).unwrap();
    assert_eq!(cm.meta.kind, ModelKind::ConsistencyModel);
    assert!(cm.meta.kind.boundary_only());
    let (map, _) = cm.flow_map_net(&dev).unwrap();
    let grid = TimeGrid::uniform(2).unwrap();
    let y = sample::sample_with(&map, &z, &grid, Sampler::Consistency, &SampleContext::new(0)).unwrap();
    assert_eq!(values(&y.x), read_npy(&fixture("legacy-cm-2step.npy")).unwrap().data);
    // And it is no teacher.
    let err = cm.velocity_net(&dev).err().expect("not a teacher").to_string();
    assert!(err.contains("consistency model"), "{err}");
}

#[test]
fn a_class_conditional_backbone_on_image_shaped_states() {
    let dev = Device::Cpu;
    let cfg = MlpConfig {
        hidden: 32,
        depth: 2,
        num_classes: Some(3),
        ..MlpConfig::for_shape(&[1, 4, 4])
    };
    let vm = VarMap::new();
    let net = FlowMapNet::new(&cfg, VarBuilder::from_varmap(&vm, DType::F64, &dev)).unwrap();
    Arch::Mlp(cfg.clone()).seed_params(&vm, 3).unwrap();
    assert_eq!(net.state_shape(), vec![1, 4, 4]);
    let b = 5;
    let x = flowmap::Rng::new(1)
        .normal_tensor((b, 1, 4, 4), DType::F64, &dev)
        .unwrap();
    let t = Tensor::full(0.8f64, (b, 1), &dev).unwrap();
    let s = Tensor::full(0.3f64, (b, 1), &dev).unwrap();
    let labels = Cond::from_classes(&[0, 1, 2, 3, 1], 3, &dev).unwrap();
    let f = net.map(&x, &t, &s, &labels).unwrap();
    assert_eq!(f.dims(), &[b, 1, 4, 4]);
    // f(x, t, t) = x exactly, whatever the class.
    let same = net.map(&x, &t, &t, &labels).unwrap();
    assert_eq!(values(&same), values(&x));
    // The label changes the map; a missing label is the null class (3).
    let rows = |c: &Cond| values(&net.average_velocity(&x, &t, &s, c).unwrap());
    let (by_label, nulls) = (rows(&labels), rows(&Cond::null(b, 3, &dev).unwrap()));
    let per = 16;
    assert_ne!(by_label[..per], by_label[per..2 * per]);
    assert_eq!(by_label[3 * per..4 * per], nulls[3 * per..4 * per]);
    assert_eq!(rows(&Cond::none()), nulls);
    // Labels out of range and label counts that do not match the batch are errors.
    assert!(Cond::from_classes(&[4], 3, &dev).is_err());
    let short = Cond::from_classes(&[0, 1], 3, &dev).unwrap();
    assert!(net
        .average_velocity(&x, &t, &s, &short)
        .unwrap_err()
        .to_string()
        .contains("2 class labels"));
    // The exact tangent through the class embedding matches central differences in f64.
    let at = Point {
        x: &x,
        t: &t,
        s: &s,
        cond: &labels,
    };
    let dx = flowmap::Rng::new(2)
        .normal_tensor((b, 1, 4, 4), DType::F64, &dev)
        .unwrap();
    let along = Tangent {
        x: dx,
        t: Tensor::full(0.7f64, (b, 1), &dev).unwrap(),
        s: Tensor::full(-0.4f64, (b, 1), &dev).unwrap(),
    };
    let (_, exact) = net.average_velocity_jvp(&at, &along).unwrap();
    let (_, fd) = FiniteDifference { map: &net, h: 1e-5 }
        .average_velocity_jvp(&at, &along)
        .unwrap();
    let (e, d) = (values(&exact), values(&fd));
    let scale = e.iter().map(|v| v.abs()).fold(0.0, f64::max);
    let err = e.iter().zip(&d).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(err < 1e-6 * scale.max(1.0), "tangent error {err} (scale {scale})");
}

#[test]
fn another_path_trains_and_samples_end_to_end() {
    let dev = Device::Cpu;
    let data = DataSource::Toy(Toy::Moons);
    let mut objective = DistillConfig::for_method(Method::Meanflow);
    // The batch velocity is the linear path's; on another path MeanFlow refuses it and says so.
    let job = |objective: DistillConfig| MapJob {
        objective,
        train: TrainConfig {
            steps: 40,
            batch_size: 64,
            ..TrainConfig::default()
        },
        arch: Arch::Mlp(MlpConfig {
            hidden: 32,
            depth: 2,
            ..MlpConfig::new(2)
        }),
        path: std::sync::Arc::new(CosinePath),
        ..MapJob::new(Method::Meanflow, &data)
    };
    let err = job(objective)
        .run(&Silent)
        .err()
        .expect("batch velocity off the linear path")
        .to_string();
    assert!(err.contains("linear path"), "{err}");
    objective.continuous.meanflow_velocity = MeanFlowVelocity::Conditional;
    let trained = job(objective).run(&Silent).unwrap();
    assert_eq!(trained.meta.path, "cosine");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.safetensors");
    trained.save(&file).unwrap();
    let ck = Checkpoint::load(&file).unwrap();
    let path = ck.meta.probability_path().unwrap();
    assert_eq!(path.name(), "cosine");
    let (net, _) = ck.flow_map_net(&dev).unwrap();
    let z = sample::noise(256, &[2], 0, &dev).unwrap();
    let cx = SampleContext::new(0).with_path(&*path);
    let grid = TimeGrid::uniform(3).unwrap();
    let out = sample::sample_with(&net, &z, &grid, Sampler::Gamma { gamma: 0.5 }, &cx).unwrap();
    assert_eq!(out.nfe, 3);
    let v = values(&out.x);
    assert!(v.iter().all(|x| x.is_finite() && x.abs() < 10.0));
    // The cosine path's re-noising differs from the linear one's.
    let linear = sample::sample_with(&net, &z, &grid, Sampler::Gamma { gamma: 0.5 }, &SampleContext::new(0)).unwrap();
    assert_ne!(v, values(&linear.x));
}
