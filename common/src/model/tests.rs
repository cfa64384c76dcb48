use std::sync::Arc;

use super::*;
use crate::data::Shard;
use crate::data::synthetic::SyntheticConfig;

fn mnist_shape() -> DataShape {
    DataShape {
        example_shape: vec![1, 28, 28],
        num_classes: 10,
        vocab_size: 0,
    }
}

#[test]
fn cnn_has_the_keras_parameter_count_and_documented_order() {
    let m = build("cnn", &mnist_shape(), &Device::flex()).unwrap();
    assert_eq!(m.spec().param_count, 93_322);
    let paths: Vec<&str> = m.layout().entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "conv1.weight",
            "conv1.bias",
            "conv2.weight",
            "conv2.bias",
            "conv3.weight",
            "conv3.bias",
            "fc1.weight",
            "fc1.bias",
            "fc2.weight",
            "fc2.bias"
        ]
    );
    assert_eq!(m.layout().entries[0].shape, vec![32, 1, 3, 3]);
    assert_eq!(m.layout().entries[6].shape, vec![576, 64]);
}

#[test]
fn flat_round_trip_is_bit_exact() {
    let device = Device::flex();
    let a = build("cnn", &mnist_shape(), &device).unwrap();
    let mut b = build("cnn", &mnist_shape(), &device).unwrap();
    let pa = a.params();
    assert_ne!(pa, b.params(), "independent inits differ");
    b.set_params(&pa).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&b.params()), bits(&pa));
    // Arbitrary values, including subnormals and negative zero, survive too.
    let odd: Vec<f32> = (0..pa.len())
        .map(|i| match i % 4 {
            0 => -0.0,
            1 => 1.0e-42,
            2 => i as f32,
            _ => -3.5e30,
        })
        .collect();
    b.set_params(&odd).unwrap();
    assert_eq!(bits(&b.params()), bits(&odd));
}

#[test]
fn same_layout_same_signature() {
    let a = build("cnn", &mnist_shape(), &Device::flex()).unwrap();
    let b = build("cnn", &mnist_shape(), &Device::flex()).unwrap();
    assert_eq!(a.spec(), b.spec());
    let other = DataShape {
        example_shape: vec![1, 28, 28],
        num_classes: 5,
        vocab_size: 0,
    };
    let c = build("cnn", &other, &Device::flex()).unwrap();
    assert_ne!(a.spec().shape_signature, c.spec().shape_signature);
}

#[test]
fn wrong_length_and_unknown_names_are_errors() {
    let mut m = build("cnn", &mnist_shape(), &Device::flex()).unwrap();
    assert_eq!(
        m.set_params(&[0.0; 3]),
        Err(ModelError::WrongLength {
            got: 3,
            expected: 93_322
        })
    );
    assert!(matches!(
        build("resnet", &mnist_shape(), &Device::flex()),
        Err(ModelError::Unknown(_))
    ));
    let flat = DataShape {
        example_shape: vec![784],
        num_classes: 10,
        vocab_size: 0,
    };
    assert!(matches!(
        build("cnn", &flat, &Device::flex()),
        Err(ModelError::IncompatibleData { .. })
    ));
}

#[test]
fn training_learns_the_synthetic_task() {
    let split = SyntheticConfig {
        train_examples: 1000,
        test_examples: 200,
        ..Default::default()
    }
    .generate(11);
    let mut m = build("cnn", &mnist_shape(), &Device::flex()).unwrap();
    let test = Shard::whole(Arc::clone(&split.test));
    let before = m.evaluate(&test);
    let stats = m
        .train(
            &Shard::whole(split.train),
            &TrainPlan {
                epochs: 2,
                batch_size: 20,
                learning_rate: 0.1,
                shuffle_seed: 1,
                prox_mu: 0.0,
            },
        )
        .unwrap();
    assert_eq!(stats.steps, 100);
    assert_eq!(stats.examples, 1000);
    let after = m.evaluate(&test);
    assert!(after.loss < before.loss, "{before:?} -> {after:?}");
    assert!(after.accuracy > 0.5, "{after:?}");
    assert_eq!(after.examples, 200);
}

#[test]
fn invalid_plans_are_refused() {
    let split = SyntheticConfig {
        train_examples: 10,
        test_examples: 1,
        ..Default::default()
    }
    .generate(1);
    let mut m = build("cnn", &mnist_shape(), &Device::flex()).unwrap();
    let plan = TrainPlan {
        epochs: 1,
        batch_size: 0,
        learning_rate: 0.1,
        shuffle_seed: 0,
        prox_mu: 0.0,
    };
    assert!(matches!(
        m.train(&Shard::whole(split.train), &plan),
        Err(ModelError::InvalidPlan(_))
    ));
}

#[test]
fn device_specs_parse() {
    assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
    assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
    assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
    assert!("gpu".parse::<DeviceSpec>().is_err());
    assert!("cuda:x".parse::<DeviceSpec>().is_err());
    #[cfg(not(feature = "cuda"))]
    assert!(
        DeviceSpec::Cuda(0)
            .device()
            .unwrap_err()
            .to_string()
            .contains("--features cuda")
    );
}

#[test]
fn the_proximal_term_pulls_the_local_model_towards_the_global_one() {
    let split = SyntheticConfig {
        train_examples: 200,
        test_examples: 1,
        ..Default::default()
    }
    .generate(3);
    let drift = |mu: f64| {
        let device = Device::flex();
        device.seed(5);
        let mut m = build("cnn", &mnist_shape(), &device).unwrap();
        let start = m.params();
        m.train(
            &Shard::whole(Arc::clone(&split.train)),
            &TrainPlan {
                epochs: 1,
                batch_size: 20,
                learning_rate: 0.1,
                shuffle_seed: 2,
                prox_mu: mu,
            },
        )
        .unwrap();
        let end = m.params();
        end.iter()
            .zip(&start)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    let (free, some, strong) = (drift(0.0), drift(1.0), drift(1000.0));
    assert!(free > some && some > strong, "{free} {some} {strong}");
    // lr * mu = 100: each step keeps 1/101 of the move.
    assert!(strong < free / 20.0, "{strong} vs {free}");
}

#[test]
fn safetensors_export_loads_back_bit_for_bit() {
    let device = Device::flex();
    device.seed(9);
    let m = build("cnn", &mnist_shape(), &device).unwrap();
    let path =
        std::env::temp_dir().join(format!("fedveil-export-{}.safetensors", std::process::id()));
    m.save_safetensors(&path).unwrap();
    device.seed(10);
    let mut other = build("cnn", &mnist_shape(), &device).unwrap();
    assert_ne!(other.params(), m.params());
    other.load_safetensors(&path).unwrap();
    let (a, b) = (m.params(), other.params());
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    // The file is plain safetensors: named f32 tensors a PyTorch user loads.
    let bytes = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + header_len]).unwrap();
    assert!(
        header.contains("\"F32\"") && header.contains("fedveil_model"),
        "{header}"
    );
    std::fs::remove_file(&path).unwrap();
}
