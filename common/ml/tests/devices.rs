//! The GPU code path, checked without a GPU: every built-in model trains on
//! Burn's wgpu backend (on Mesa's lavapipe, a CPU Vulkan driver, in CI) to
//! the same parameters as on flex, within float rounding.
//!
//! Without a wgpu adapter the test says so and passes, unless
//! `FEDVEIL_REQUIRE_WGPU` is set, as `.ci/run` sets it after installing
//! lavapipe: there a missing adapter fails the run.
#![cfg(feature = "wgpu")]

use std::sync::Arc;

use burn::prelude::Device;
use fedveil_ml::data::synthetic::SyntheticConfig;
use fedveil_ml::data::{Dataset, Shard};
use fedveil_ml::device::{DeviceError, DeviceSpec, WgpuAdapter};
use fedveil_ml::model::{self, DataShape, TrainPlan};
use fedveil_proto::wire::LocalOptimizer;

/// Largest difference allowed between a parameter trained on wgpu and on
/// flex, relative to the parameter's size (at least 1). GPU kernels sum in a
/// different order, so results agree to float rounding, not bit for bit;
/// measured on lavapipe after these steps: at most 2.4e-7.
const TOLERANCE: f32 = 1e-5;

fn lavapipe() -> Option<Device> {
    match DeviceSpec::Wgpu(WgpuAdapter::Cpu).device() {
        Ok(device) => Some(device),
        Err(e) if std::env::var_os("FEDVEIL_REQUIRE_WGPU").is_none() => {
            eprintln!("no wgpu CPU adapter, not checking the wgpu backend: {e}");
            None
        }
        Err(e) => panic!("FEDVEIL_REQUIRE_WGPU is set and {e}"),
    }
}

fn tokens(n: usize, seq_len: usize, vocab: usize, classes: usize) -> Dataset {
    Dataset {
        features: (0..n * seq_len)
            .map(|i| (2 + (i * 7 + i / seq_len) % (vocab - 2)) as f32)
            .collect(),
        example_shape: vec![seq_len],
        labels: (0..n).map(|i| (i % classes) as u32).collect(),
        num_classes: classes,
        targets: Vec::new(),
        class_names: Vec::new(),
        owners: Vec::new(),
        vocab_size: vocab,
    }
}

/// Trains `name` from the same start on both devices; returns the largest
/// relative parameter difference and the two losses.
fn train_on_both(name: &str, data: Dataset, gpu: &Device) -> (f32, f32, f32) {
    let data = Arc::new(data);
    let shape = DataShape::of(&data);
    let mut on_flex = model::build(name, &shape, &Device::flex()).unwrap();
    let mut on_gpu = model::build(name, &shape, gpu).unwrap();
    on_gpu.set_params(&on_flex.params()).unwrap();
    let plan = TrainPlan {
        epochs: 1,
        batch_size: 8,
        max_steps: Some(3),
        learning_rate: 0.05,
        shuffle_seed: 5,
        prox_mu: 0.0,
        optimizer: LocalOptimizer::Sgd,
    };
    let shard = Shard::whole(data);
    let flex_stats = on_flex.train(&shard, &plan).unwrap();
    let gpu_stats = on_gpu.train(&shard, &plan).unwrap();
    assert_eq!(flex_stats.steps, 3);
    assert_eq!(gpu_stats.steps, 3);
    let worst = on_flex
        .params()
        .iter()
        .zip(on_gpu.params())
        .map(|(a, b)| (a - b).abs() / a.abs().max(1.0))
        .fold(0.0f32, f32::max);
    (worst, flex_stats.last_epoch_loss, gpu_stats.last_epoch_loss)
}

#[test]
fn every_builtin_model_trains_on_wgpu_as_on_flex() {
    let Some(gpu) = lavapipe() else { return };
    let images = || {
        SyntheticConfig {
            train_examples: 24,
            test_examples: 1,
            ..Default::default()
        }
        .generate(3)
        .train
        .as_ref()
        .clone()
    };
    let cases = [
        ("cnn", images()),
        ("mlp", images()),
        (
            "transformer-cls:d_model=32,n_layers=1,n_heads=2,d_ff=64",
            tokens(24, 16, 50, 3),
        ),
        (
            "transformer-lm:d_model=32,n_layers=1,n_heads=2,d_ff=64",
            tokens(24, 16, 50, 50),
        ),
    ];
    for (name, data) in cases {
        let (worst, flex_loss, gpu_loss) = train_on_both(name, data, &gpu);
        eprintln!("{name}: largest parameter difference {worst:e}, loss {flex_loss} vs {gpu_loss}");
        assert!(worst <= TOLERANCE, "{name}: parameters differ by {worst}");
        assert!(
            (flex_loss - gpu_loss).abs() <= TOLERANCE * flex_loss.abs().max(1.0),
            "{name}: loss {flex_loss} on flex, {gpu_loss} on wgpu"
        );
    }
}

#[test]
fn a_missing_adapter_is_an_error_not_a_panic() {
    // No machine of this project has 1,000 discrete GPUs.
    let err = DeviceSpec::Wgpu(WgpuAdapter::Discrete(999))
        .device()
        .unwrap_err();
    assert!(matches!(err, DeviceError::NoSuchDevice { .. }), "{err}");
    assert!(err.to_string().contains("wgpu:999"), "{err}");
}
