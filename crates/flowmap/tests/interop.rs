//! PyTorch interop, against a fixture the PyTorch twin of the U-Net wrote
//! (`bench/peer/make_interop_fixture.py`; CI has no torch): a plain `state_dict` teacher with its `[arch]`
//! table, a flow map with flowmap's metadata, their inputs and the twin's outputs.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use flowmap::backbone::{vars_sorted, Arch, UnetConfig};
use flowmap::checkpoint::{Checkpoint, Foreign, ModelKind};
use flowmap::data::npy::read_npy_nd;
use flowmap::flow_map::{FlowMap, FlowMapNet};
use flowmap::pipeline::RunConfig;
use flowmap::teacher::VelocityField;
use flowmap::Cond;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/torch-unet")
        .join(name)
}

fn array(name: &str) -> Tensor {
    let a = read_npy_nd(&fixture(name)).unwrap();
    let data: Vec<f32> = a.data.iter().map(|&v| v as f32).collect();
    Tensor::from_vec(data, a.shape, &Device::Cpu).unwrap()
}

fn labels() -> Cond {
    let a = read_npy_nd(&fixture("labels.npy")).unwrap();
    let l: Vec<u32> = a.data.iter().map(|&v| v as u32).collect();
    Cond::from_classes(&l, 3, &Device::Cpu).unwrap()
}

/// The architecture of the plain state dict, from its `[arch]` table over the U-Net's defaults.
fn fixture_arch() -> Arch {
    let file = RunConfig::from_file(&fixture("arch.toml")).unwrap();
    file.arch_over(Arch::Unet(UnetConfig::new(&[1, 8, 8]))).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    common::max_abs(&(a - b).unwrap())
}

#[test]
fn a_pytorch_state_dict_teacher_computes_the_twins_velocity() {
    let path = fixture("teacher.safetensors");
    assert!(
        !Checkpoint::has_metadata(&path).unwrap(),
        "the fixture is a plain state dict"
    );
    let foreign = Foreign {
        kind: ModelKind::Teacher,
        arch: fixture_arch(),
        data: "interop-fixture".into(),
        scale: None,
    };
    let (net, _) = Checkpoint::load_foreign(&path, foreign)
        .unwrap()
        .velocity_net(&Device::Cpu)
        .unwrap();
    let v = net.velocity(&array("x.npy"), &array("t.npy"), &labels()).unwrap();
    let want = array("teacher_v.npy");
    let err = max_diff(&v, &want);
    assert!(err <= 1e-5, "teacher: flowmap and PyTorch differ by {err}");
    assert!(
        want.abs().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap() > 0.1,
        "a non-trivial output"
    );
}

#[test]
fn a_flow_map_the_twin_wrote_with_metadata_computes_its_map() {
    let ck = Checkpoint::load(&fixture("flow_map.safetensors")).unwrap();
    assert_eq!(
        ck.meta.arch,
        fixture_arch(),
        "the twin's metadata is the [arch] table's architecture"
    );
    let (net, _) = ck.flow_map_net(&Device::Cpu).unwrap();
    let f = net
        .map(&array("x.npy"), &array("t.npy"), &array("s.npy"), &labels())
        .unwrap();
    let err = max_diff(&f, &array("map_f.npy"));
    assert!(err <= 1e-5, "flow map: flowmap and PyTorch differ by {err}");
}

/// The other direction: a flow map flowmap builds has exactly the twin's tensor names and shapes, so its
/// checkpoint loads into the twin's `load_state_dict` (strict).
#[test]
fn flowmaps_u_net_has_the_twins_parameter_names_and_shapes() {
    let twin = Checkpoint::load(&fixture("flow_map.safetensors")).unwrap();
    let vars = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&vars, candle_core::DType::F32, &Device::Cpu);
    FlowMapNet::new(fixture_arch(), vb).unwrap();
    let ours: Vec<(String, Vec<usize>)> = vars_sorted(&vars)
        .into_iter()
        .map(|(n, v)| (n, v.dims().to_vec()))
        .collect();
    let mut theirs: Vec<(String, Vec<usize>)> = twin
        .tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.dims().to_vec()))
        .collect();
    theirs.sort();
    assert_eq!(ours, theirs);
}

#[test]
fn a_state_dict_that_does_not_match_the_architecture_is_refused_by_name() {
    let mut arch = fixture_arch();
    if let Arch::Unet(u) = &mut arch {
        u.channels = 16;
    }
    let foreign = Foreign {
        kind: ModelKind::Teacher,
        arch,
        data: "interop-fixture".into(),
        scale: None,
    };
    let ck = Checkpoint::load_foreign(&fixture("teacher.safetensors"), foreign).unwrap();
    let Err(err) = ck.velocity_net(&Device::Cpu) else {
        panic!("a 16-channel architecture accepted 8-channel tensors");
    };
    let err = err.to_string();
    assert!(err.contains("does not match its architecture"), "{err}");
}
