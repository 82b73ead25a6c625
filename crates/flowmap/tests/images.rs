//! Image data (npy arrays, image folders, MNIST), their bad inputs, the classifier's metrics, a tiny U-Net
//! that learns, and a bit-exact U-Net checkpoint round trip.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::{labels_npy, max_abs, write_npy};
use flowmap::backbone::{Arch, UnetConfig};
use flowmap::checkpoint::{self, Checkpoint, CheckpointMeta, ModelKind};
use flowmap::classifier::Classifier;
use flowmap::cond::Cond;
use flowmap::data::{self, DataSource, Scale};
use flowmap::flow_map::{FlowMap, FlowMapNet};
use flowmap::image_metrics::Reference;
use flowmap::pipeline;
use flowmap::train::{Silent, TrainConfig};
use flowmap::Rng;

/// Twenty 6 × 6 uint8 "images": class 0 bright on the left half, class 1 on the right.
fn two_class_pixels() -> (Vec<u8>, Vec<i64>) {
    let mut px = Vec::new();
    let mut labels = Vec::new();
    for i in 0..20 {
        let class = i % 2;
        for _y in 0..6 {
            for x in 0..6 {
                let lit = (x < 3) == (class == 0);
                px.push(if lit { 200 + (i as u8) } else { 10 });
            }
        }
        labels.push(class as i64);
    }
    (px, labels)
}

#[test]
fn npy_images_with_labels_load_scaled_from_their_range() {
    let dir = tempfile::tempdir().unwrap();
    let (px, labels) = two_class_pixels();
    let images = dir.path().join("x.npy");
    let lab = dir.path().join("y.npy");
    write_npy(&images, "|u1", &[20, 6, 6], &px);
    labels_npy(&lab, &labels);
    let d = DataSource::from_spec(&DataSource::npy_with_labels(&images, &lab)).unwrap();
    assert_eq!(d.state_shape(), vec![1, 6, 6]);
    assert_eq!(d.num_classes(), Some(2));
    assert_eq!(d.scale(), Some(Scale::U8));
    let v = d.heldout(2, 0);
    assert!(v.iter().all(|x| (-1.0..=1.0).contains(x)));
    assert!(
        v.iter().any(|&x| (x - (10.0 / 127.5 - 1.0)).abs() < 1e-12),
        "uint8: x/127.5 − 1"
    );

    // Float images: scaled from their own min and max, and the scale maps back.
    let f: Vec<f32> = (0..20 * 36).map(|i| 3.0 + (i % 7) as f32).collect();
    let body: Vec<u8> = f.iter().flat_map(|v| v.to_le_bytes()).collect();
    let fp = dir.path().join("f.npy");
    write_npy(&fp, "<f4", &[20, 1, 6, 6], &body);
    let d = DataSource::from_spec(fp.to_str().unwrap()).unwrap();
    let s = d.scale().unwrap();
    assert_eq!((s.lo, s.hi), (3.0, 9.0));
    assert_eq!((s.to_model(3.0), s.to_model(9.0), s.to_data(0.0)), (-1.0, 1.0, 6.0));
    assert_eq!(d.num_classes(), None);
}

#[test]
fn bad_image_inputs_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (px, labels) = two_class_pixels();
    let images = dir.path().join("x.npy");
    write_npy(&images, "|u1", &[20, 6, 6], &px);
    let err = |spec: String| DataSource::from_spec(&spec).unwrap_err().to_string();

    let short = dir.path().join("short.npy");
    labels_npy(&short, &labels[..19]);
    let e = err(DataSource::npy_with_labels(&images, &short));
    assert!(e.contains("19 labels for 20 images"), "{e}");

    let neg = dir.path().join("neg.npy");
    let mut l = labels.clone();
    l[3] = -2;
    labels_npy(&neg, &l);
    assert!(err(DataSource::npy_with_labels(&images, &neg)).contains("label -2"));

    let rank5 = dir.path().join("r5.npy");
    write_npy(&rank5, "|u1", &[1, 20, 1, 6, 6], &px);
    assert!(err(rank5.display().to_string()).contains("N × H × W or N × C × H × W"));

    let truncated = dir.path().join("t.npy");
    write_npy(&truncated, "|u1", &[20, 6, 6], &px[..100]);
    assert!(err(truncated.display().to_string()).contains("truncated data"));

    // A label the network was not built for.
    let d = DataSource::from_spec(&DataSource::npy_with_labels(&images, &dir.path().join("y.npy"))).err();
    assert!(d.is_some(), "no such labels file");
    let lab = dir.path().join("y.npy");
    labels_npy(&lab, &labels.iter().map(|&v| v * 5).collect::<Vec<_>>());
    let data = DataSource::from_spec(&DataSource::npy_with_labels(&images, &lab)).unwrap();
    let arch = Arch::Unet(UnetConfig {
        channels: 4,
        channel_mult: vec![1, 1],
        attention_resolutions: vec![3],
        groups: 2,
        num_classes: Some(2),
        ..UnetConfig::new(&[1, 6, 6])
    });
    let one_step = TrainConfig {
        steps: 1,
        ..Default::default()
    };
    let train_err = |arch: &Arch| {
        let r = pipeline::train_teacher(&data, arch, &one_step, &Device::Cpu, &Silent);
        r.err().expect("an error").to_string()
    };
    let e = train_err(&arch);
    assert!(e.contains("6 classes") && e.contains("built for 2"), "{e}");
    // A shape the network was not built for.
    let e = train_err(&Arch::Unet(UnetConfig::new(&[1, 8, 8])));
    assert!(e.contains("does not match data state shape"), "{e}");
}

#[test]
fn image_folders_load_by_class_and_reject_mixed_sizes_and_unreadable_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("set");
    for (k, class) in ["cat", "dog"].iter().enumerate() {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for i in 0..6 {
            let img = image::GrayImage::from_fn(5, 4, |x, _| image::Luma([(x as u8) * 40 + k as u8 + i]));
            img.save(root.join(class).join(format!("{i}.png"))).unwrap();
        }
    }
    let d = DataSource::from_spec(root.to_str().unwrap()).unwrap();
    assert_eq!(d.state_shape(), vec![1, 4, 5]);
    assert_eq!(d.num_classes(), Some(2));
    assert_eq!(d.scale(), Some(Scale::U8));

    // One RGB image makes the set RGB.
    let rgb = image::RgbImage::from_pixel(5, 4, image::Rgb([255, 0, 0]));
    rgb.save(root.join("dog").join("red.png")).unwrap();
    assert_eq!(
        DataSource::from_spec(root.to_str().unwrap()).unwrap().state_shape(),
        vec![3, 4, 5]
    );

    let big = image::GrayImage::new(6, 4);
    big.save(root.join("cat").join("big.png")).unwrap();
    let e = DataSource::from_spec(root.to_str().unwrap()).unwrap_err().to_string();
    assert!(e.contains("6 × 4") && e.contains("same size"), "{e}");
    std::fs::remove_file(root.join("cat").join("big.png")).unwrap();

    std::fs::write(root.join("cat").join("broken.png"), b"not a png").unwrap();
    let e = DataSource::from_spec(root.to_str().unwrap()).unwrap_err().to_string();
    assert!(e.contains("broken.png") && e.contains("unreadable"), "{e}");

    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert!(DataSource::from_spec(empty.to_str().unwrap())
        .unwrap_err()
        .to_string()
        .contains("no class folders"));
}

#[test]
fn mnist_has_labels_and_images_in_range() {
    let d = DataSource::from_spec("mnist").unwrap();
    assert_eq!(d.state_shape(), vec![1, 28, 28]);
    assert_eq!(d.num_classes(), Some(10));
    assert_eq!(d.scale(), Some(Scale::U8));
    let mut rng = Rng::new(0);
    let b = d.sample_batch(64, &mut rng, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(b.x0.dims(), &[64, 1, 28, 28]);
    assert!(max_abs(&b.x0) <= 1.0);
}

/// The shipped classifier: FD of held-out digits against themselves is ~0 and against noise large; its
/// accuracy on them matches the one it records.
#[test]
fn classifier_metrics_see_identity_and_noise() {
    let dev = Device::Cpu;
    let clf = Classifier::embedded_mnist(&dev).unwrap();
    assert!(clf.meta.heldout_accuracy > 0.97, "{}", clf.meta.heldout_accuracy);
    let d = DataSource::from_spec("mnist").unwrap();
    let n = 400;
    let x = data::to_batch(&d.heldout(n, 0), n, &[1, 28, 28], DType::F32, &dev).unwrap();
    let labels = d.heldout_labels(n).unwrap();
    let r = Reference::new(&clf, &x).unwrap();
    let same = r.compare(&clf, &x, Some(&labels)).unwrap();
    assert!(same.fd < 1e-6, "{same:?}");
    assert_eq!((same.precision, same.recall), (1.0, 1.0));
    assert!(same.accuracy.unwrap() > 0.95);
    let noise = Rng::new(1)
        .normal_tensor((n, 1, 28, 28), DType::F32, &dev)
        .unwrap()
        .clamp(-1.0, 1.0)
        .unwrap();
    let far = r.compare(&clf, &noise, Some(&labels)).unwrap();
    assert!(far.fd > 100.0 && far.precision < 0.05, "{far:?}");
    let e = clf
        .features(&Tensor::zeros((2, 1, 8, 8), DType::F32, &dev).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("[1, 8, 8]"), "{e}");
}

fn tiny_unet(shape: &[usize], classes: Option<usize>) -> Arch {
    common::small_unet(shape, 8, 8, classes)
}

/// A tiny class-conditional U-Net's flow-matching loss falls within a few dozen steps on 8 × 8 crops of
/// the digits.
#[test]
fn tiny_unet_teacher_loss_falls() {
    let dir = tempfile::tempdir().unwrap();
    let d = DataSource::from_spec("mnist").unwrap();
    // 8 × 8 mean-pooled digits as a uint8 array with labels.
    let n = 200;
    let x = data::to_batch(&d.heldout(n, 0), n, &[1, 28, 28], DType::F32, &Device::Cpu).unwrap();
    let small = x
        .narrow(2, 2, 24)
        .unwrap()
        .narrow(3, 2, 24)
        .unwrap()
        .avg_pool2d(3)
        .unwrap();
    let px: Vec<u8> = small
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| ((v + 1.0) * 127.5).round() as u8)
        .collect();
    let images = dir.path().join("x.npy");
    let lab = dir.path().join("y.npy");
    write_npy(&images, "|u1", &[n, 8, 8], &px);
    labels_npy(
        &lab,
        &d.heldout_labels(n)
            .unwrap()
            .iter()
            .map(|&v| v as i64)
            .collect::<Vec<_>>(),
    );
    let data = DataSource::from_spec(&DataSource::npy_with_labels(&images, &lab)).unwrap();
    let cfg = TrainConfig {
        steps: 60,
        batch_size: 32,
        lr: 3e-3,
        warmup_steps: 5,
        ..Default::default()
    };
    let t = pipeline::train_teacher(&data, &tiny_unet(&[1, 8, 8], Some(10)), &cfg, &Device::Cpu, &Silent).unwrap();
    let (first, last) = t.log.first_last();
    assert!(last < 0.7 * first, "loss {first} → {last}");
    assert_eq!(t.meta.scale, Some(Scale::U8));
}

/// A U-Net flow map saved and loaded gives the same bits.
#[test]
fn unet_flow_map_checkpoint_round_trip_is_bit_exact() {
    let dev = Device::Cpu;
    let arch = tiny_unet(&[1, 8, 8], Some(3));
    let vm = VarMap::new();
    let net = FlowMapNet::new(&arch, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    let mut rng = Rng::new(3);
    for (_, v) in flowmap::backbone::vars_sorted(&vm) {
        v.set(&(rng.normal_tensor(v.shape(), DType::F32, &dev).unwrap() * 0.2).unwrap())
            .unwrap();
    }
    let meta = CheckpointMeta {
        kind: ModelKind::FlowMap,
        arch: arch.clone(),
        path: "linear".into(),
        data: "mnist".into(),
        mixture: None,
        training: serde_json::json!({}),
        version: "test".into(),
        scale: Some(Scale::U8),
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("map.safetensors");
    checkpoint::save(&path, &vm, &meta).unwrap();
    let ck = Checkpoint::load(&path).unwrap();
    assert_eq!(ck.meta, meta);
    let (loaded, _) = ck.flow_map_net(&dev).unwrap();
    let x = rng.normal_tensor((4, 1, 8, 8), DType::F32, &dev).unwrap();
    let t = Tensor::new(&[[0.9f32], [0.5], [0.3], [1.0]], &dev).unwrap();
    let s = Tensor::new(&[[0.1f32], [0.5], [0.0], [0.25]], &dev).unwrap();
    let c = Cond::from_classes(&[0, 1, 2, 3], 3, &dev).unwrap();
    let a = net
        .map(&x, &t, &s, &c)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let b = loaded
        .map(&x, &t, &s, &c)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(
        a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    checkpoint::save(
        &dir.path().join("again.safetensors"),
        &ck.varmap(&dev).unwrap(),
        &ck.meta,
    )
    .unwrap();
    assert_eq!(
        std::fs::read(&path).unwrap(),
        std::fs::read(dir.path().join("again.safetensors")).unwrap()
    );
}

/// Found by `flowmap bench fuzz`: a JPEG whose header claims 65535 × 65535 pixels made the decoder
/// allocate over a gigabyte for a file of a few hundred bytes. Such a header is now an error before any
/// pixel buffer exists.
#[test]
fn an_image_header_claiming_more_pixels_than_its_file_holds_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let class = dir.path().join("set").join("a");
    std::fs::create_dir_all(&class).unwrap();
    let img = image::GrayImage::from_fn(6, 6, |x, y| image::Luma([(x * 40 + y) as u8]));
    let mut bytes = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageLuma8(img)
        .write_to(&mut bytes, image::ImageOutputFormat::Jpeg(90))
        .unwrap();
    let mut jpeg = bytes.into_inner();
    // The start-of-frame segment: FF C0, length (2), precision (1), height (2), width (2).
    let sof = jpeg
        .windows(2)
        .position(|w| w == [0xff, 0xc0])
        .expect("a baseline JPEG");
    jpeg[sof + 5..sof + 9].copy_from_slice(&[0xff, 0xff, 0xff, 0xff]);
    std::fs::write(class.join("huge.jpg"), &jpeg).unwrap();
    let e = DataSource::from_spec(dir.path().join("set").to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("the header claims 65535 × 65535 pixels"), "{e}");
}
