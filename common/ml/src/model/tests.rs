use std::sync::Arc;

use super::*;
use crate::data::Shard;
use crate::data::synthetic::SyntheticConfig;
use fedveil_proto::wire::LocalOptimizer;

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
    let before = m.evaluate(&test).unwrap();
    let stats = m
        .train(
            &Shard::whole(split.train),
            &TrainPlan {
                epochs: 2,
                batch_size: 20,
                max_steps: None,
                learning_rate: 0.1,
                shuffle_seed: 1,
                prox_mu: 0.0,
                optimizer: LocalOptimizer::Sgd,
            },
        )
        .unwrap();
    assert_eq!(stats.steps, 100);
    assert_eq!(stats.examples, 1000);
    let after = m.evaluate(&test).unwrap();
    assert!(after.loss < before.loss, "{before:?} -> {after:?}");
    assert!(after.accuracy().unwrap() > 0.5, "{after:?}");
    assert_eq!(after.examples, 200);
}

/// Adam's first step is lr * m / sqrt(v) = lr * sign(g) after bias
/// correction: every parameter with a gradient moves by the learning rate,
/// whatever the gradient's size. SGD moves each by lr * |g| instead.
#[test]
fn the_adam_plan_takes_adam_steps() {
    let split = SyntheticConfig {
        train_examples: 40,
        test_examples: 1,
        ..Default::default()
    }
    .generate(5);
    let lr = 1e-3;
    let step = |optimizer| {
        let mut m = build("cnn", &mnist_shape(), &Device::flex()).unwrap();
        let before = m.params();
        let plan = TrainPlan {
            epochs: 1,
            batch_size: 40,
            max_steps: None,
            learning_rate: lr,
            shuffle_seed: 0,
            prox_mu: 0.0,
            optimizer,
        };
        m.train(&Shard::whole(Arc::clone(&split.train)), &plan)
            .unwrap();
        let moved: Vec<f64> = m
            .params()
            .iter()
            .zip(&before)
            .map(|(a, b)| f64::from((a - b).abs()))
            .filter(|&d| d > 0.0)
            .collect();
        assert!(
            moved.len() > before.len() / 2,
            "{} of {}",
            moved.len(),
            before.len()
        );
        moved
    };
    let adam = step(LocalOptimizer::Adam);
    let near_lr = adam.iter().filter(|&&d| (d - lr).abs() < 0.05 * lr).count();
    assert!(adam.iter().all(|&d| d < 1.01 * lr));
    assert!(near_lr > adam.len() * 9 / 10, "{near_lr} of {}", adam.len());
    let sgd = step(LocalOptimizer::Sgd);
    let sgd_near_lr = sgd.iter().filter(|&&d| (d - lr).abs() < 0.05 * lr).count();
    assert!(
        sgd_near_lr < sgd.len() / 10,
        "{sgd_near_lr} of {}",
        sgd.len()
    );
}

#[test]
fn max_steps_caps_local_training_across_epochs() {
    let split = SyntheticConfig {
        train_examples: 100,
        test_examples: 1,
        ..Default::default()
    }
    .generate(3);
    let shard = Shard::whole(split.train);
    let init = build("cnn", &mnist_shape(), &Device::flex())
        .unwrap()
        .params();
    let run = |epochs, max_steps| {
        let mut m = build("cnn", &mnist_shape(), &Device::flex()).unwrap();
        m.set_params(&init).unwrap();
        let plan = TrainPlan {
            epochs,
            batch_size: 10,
            max_steps,
            learning_rate: 0.05,
            shuffle_seed: 2,
            prox_mu: 0.0,
            optimizer: LocalOptimizer::Sgd,
        };
        let stats = m.train(&shard, &plan).unwrap();
        (stats, m.params())
    };
    // 10 steps per epoch: a cap of 4 stops inside the first epoch, 13
    // inside the second; no cap runs all 30.
    assert_eq!(run(3, Some(4)).0.steps, 4);
    assert_eq!(run(3, Some(13)).0.steps, 13);
    assert_eq!(run(3, None).0.steps, 30);
    // The capped run is the uncapped one stopped early: same batches.
    assert!(run(1, Some(10)).1 == run(1, None).1);
    assert!(run(3, Some(30)).1 == run(3, None).1);
    assert!(run(3, Some(13)).1 != run(3, None).1);
    assert_eq!(run(1, Some(4)).0.examples, 100);
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
        max_steps: None,
        learning_rate: 0.1,
        shuffle_seed: 0,
        prox_mu: 0.0,
        optimizer: LocalOptimizer::Sgd,
    };
    assert!(matches!(
        m.train(&Shard::whole(Arc::clone(&split.train)), &plan),
        Err(ModelError::InvalidPlan(_))
    ));
    let plan = TrainPlan {
        batch_size: 1,
        max_steps: Some(0),
        ..plan
    };
    assert!(matches!(
        m.train(&Shard::whole(split.train), &plan),
        Err(ModelError::InvalidPlan(_))
    ));
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
                max_steps: None,
                learning_rate: 0.1,
                shuffle_seed: 2,
                prox_mu: mu,
                optimizer: LocalOptimizer::Sgd,
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
