//! The simulator end to end: data loading and fallback, and a short real
//! MNIST run when `FEDVEIL_DATA` points at the data.

use std::path::PathBuf;

use fedveil_sim::{QuietObserver, SimConfig, load_data};

fn empty_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fedveil-sim-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Download attempts go to a closed loopback port, so the test is fast and
/// offline-safe (no public mirror is contacted).
fn no_mirrors() {
    // SAFETY: set before any thread of this test reads the environment.
    unsafe { std::env::set_var("FEDVEIL_OFFLINE", "1") };
}

#[test]
fn default_dataset_falls_back_to_synthetic_but_explicit_never_does() {
    no_mirrors();
    let cfg = SimConfig {
        data_dir: Some(empty_dir("fallback")),
        ..SimConfig::default()
    };
    let loaded = load_data(&cfg, false).unwrap();
    assert_eq!(loaded.dataset, "synthetic");
    let note = loaded.fallback_note.unwrap();
    assert!(
        note.contains("train-images-idx3-ubyte.gz") && note.contains("synthetic"),
        "{note}"
    );

    let err = load_data(&cfg, true).unwrap_err().to_string();
    assert!(
        err.contains("mnist") && err.contains("FEDVEIL_DATA"),
        "{err}"
    );
}

/// A short real MNIST run, once with SecAgg+ (the default) and once in the
/// clear, same seed: accuracy rises, and the two runs end at the same model
/// up to fixed-point rounding (issue 3's end-to-end check on real data).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_real_mnist_run_secure_matches_plain() {
    let Some(dir) = std::env::var_os("FEDVEIL_DATA") else {
        eprintln!("FEDVEIL_DATA not set; skipping the real MNIST run");
        return;
    };
    let cfg = |secagg| SimConfig {
        dataset: "mnist".into(),
        data_dir: Some(dir.clone().into()),
        clients: 4,
        fraction: 1.0,
        rounds: 3,
        local_epochs: 1,
        batch_size: 10,
        lr: 0.05,
        train_limit: 4000,
        max_concurrent_training: Some(1),
        secagg,
        ..SimConfig::default()
    };
    let loaded = load_data(&cfg(true), true).unwrap();
    assert_eq!(loaded.split.test.len(), 10_000);
    let mut accuracies = Vec::new();
    let mut models = Vec::new();
    for secagg in [true, false] {
        let report = fedveil_sim::run(&cfg(secagg), &loaded.split, &mut QuietObserver)
            .await
            .unwrap();
        assert!(
            report.clients.iter().all(|c| c.is_ok()),
            "{:?}",
            report.clients
        );
        assert!(report.server.metrics.iter().all(|m| m.secure == secagg));
        let acc: Vec<f32> = report.server.metrics.iter().map(|m| m.accuracy).collect();
        assert_eq!(acc.len(), 3);
        assert!(
            acc[2] > acc[0] && acc[2] > 0.7,
            "MNIST accuracy should rise past 0.7 (secagg {secagg}): {acc:?}"
        );
        accuracies.push(acc[2]);
        models.push(report.server.final_model);
    }
    let max_diff = models[0]
        .iter()
        .zip(&models[1])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        max_diff < 1e-2,
        "secure and plain models differ by {max_diff}"
    );
    assert!(
        (accuracies[0] - accuracies[1]).abs() <= 0.01,
        "accuracy secure {} vs plain {}",
        accuracies[0],
        accuracies[1]
    );
}
