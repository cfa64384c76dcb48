//! The simulator end to end: data loading and fallback, and a short real
//! MNIST run when `FEDVEIL_DATA` points at the data.

use std::path::PathBuf;

use fedveil_settings::{DataSettings, Settings, Simulation};
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
        run: Settings {
            data: DataSettings {
                data_dir: Some(empty_dir("fallback")),
                ..DataSettings::default()
            },
            ..Settings::default()
        },
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
        sim: Simulation {
            clients: 4,
            max_concurrent_training: Some(1),
            ..Simulation::default()
        },
        run: Settings {
            data: DataSettings {
                dataset: "mnist".into(),
                data_dir: Some(dir.clone().into()),
                train_limit: 4000,
                ..DataSettings::default()
            },
            fraction: 1.0,
            rounds: 3,
            local_epochs: 1,
            batch_size: 10,
            lr: 0.05,
            secagg,
            ..Settings::default()
        },
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
        let acc: Vec<f32> = report
            .server
            .metrics
            .iter()
            .map(|m| m.accuracy.unwrap())
            .collect();
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

/// Injected faults over real QUIC under SecAgg+: clients vanish at the
/// stages their seeded fates say, the protocol recovers from every stage,
/// vanished clients rejoin, and stragglers' updates arrive late but count.
/// Every client is sampled each round (C = 1 and the server waits for all
/// of them), so the faults that happen are exactly the planned ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_vanish_at_every_secagg_stage_and_rounds_still_complete() {
    use fedveil_proto::round::server::SecAggConfig;
    use fedveil_sim::faults::Stage;

    let (clients, rounds) = (10u64, 4u64);
    let cfg = |seed| SimConfig {
        sim: Simulation {
            clients: clients as usize,
            max_concurrent_training: Some(2),
            dropout: 0.3,
            straggler_delay: Some("fixed:50ms".into()),
            ..Simulation::default()
        },
        run: Settings {
            data: DataSettings {
                dataset: "synthetic".into(),
                train_limit: 600,
                ..DataSettings::default()
            },
            fraction: 1.0,
            rounds,
            secagg: true,
            seed,
            ..Settings::default()
        },
    };
    let threshold = SecAggConfig {
        expected_dropout: 0.3,
        ..SecAggConfig::default()
    }
    .params(clients as usize)
    .threshold as usize;
    // The planned faults of a seed: vanishings by stage, and each round's
    // contributors (only clients gone before their masked input are
    // missing from the sum).
    let planned = |seed| {
        let plan = cfg(seed).fault_plan().unwrap();
        let mut by_stage = std::collections::BTreeMap::<Stage, u64>::new();
        let mut contributors = Vec::new();
        for round in 1..=rounds {
            let fates: Vec<_> = (0..clients).map(|c| plan.fate(c, round, true)).collect();
            for stage in fates.iter().filter_map(|f| f.vanish_at) {
                *by_stage.entry(stage).or_default() += 1;
            }
            let missing = fates
                .iter()
                .filter(|f| matches!(f.vanish_at, Some(s) if s != Stage::Unmasking))
                .count();
            contributors.push(clients as usize - missing);
        }
        (by_stage, contributors)
    };
    // The first seed whose faults hit every stage and leave every round
    // enough survivors (fewer than the threshold fails the round, by design).
    let seed = (0..)
        .find(|&s| {
            let (by_stage, contributors) = planned(s);
            by_stage.len() == 4 && contributors.iter().all(|&c| c > threshold)
        })
        .unwrap();
    let (expected, contributors) = planned(seed);

    let loaded = load_data(&cfg(seed), true).unwrap();
    let report = fedveil_sim::run(&cfg(seed), &loaded.split, &mut QuietObserver)
        .await
        .unwrap();
    eprintln!(
        "seed {seed}: {:?}, rounds took {:?} s, wall {:?}",
        report.faults,
        report
            .server
            .metrics
            .iter()
            .map(|m| m.round_secs)
            .collect::<Vec<_>>(),
        report.wall
    );
    assert!(
        report.clients.iter().all(|c| c.is_ok()),
        "{:?}",
        report.clients
    );
    assert_eq!(report.server.rounds_completed, rounds);
    assert_eq!(report.server.rounds_failed, 0);
    assert_eq!(report.faults.vanished, expected, "seed {seed}");
    assert_eq!(report.faults.rejoined, report.faults.vanished_total());
    let got: Vec<usize> = report
        .server
        .metrics
        .iter()
        .map(|m| m.contributors)
        .collect();
    assert_eq!(got, contributors, "seed {seed}");
    // Every update that left was late; a client gone before its masked
    // input sends none.
    let sent: usize = contributors.iter().sum();
    assert_eq!(report.faults.delayed, sent as u64);
    let trained: u64 = report
        .clients
        .iter()
        .map(|c| c.as_ref().unwrap().rounds_trained)
        .sum();
    assert_eq!(trained, sent as u64, "rounds trained add up over rejoins");
    assert!(
        report
            .server
            .metrics
            .iter()
            .all(|m| m.accuracy.is_some_and(f32::is_finite))
    );
}

/// The same seed and config give the same metrics files, byte for byte:
/// once under SecAgg+ with distributed DP and clients vanishing, once in
/// the clear with central DP and random straggler delays that shuffle the
/// order in which updates arrive. A different seed gives different files,
/// so the comparison can tell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_seed_reproduces_the_metrics_files_exactly() {
    use fedveil_server::setup::{MetricsFiles, ServerObserver};

    let secure = |seed| SimConfig {
        sim: Simulation {
            clients: 8,
            max_concurrent_training: Some(2),
            dropout: 0.25,
            ..Simulation::default()
        },
        run: Settings {
            data: DataSettings {
                dataset: "synthetic".into(),
                train_limit: 480,
                ..DataSettings::default()
            },
            // Everyone sampled: with 8 clients at a lower rate, whether a
            // round of at least 3 runs would hinge on one client too often
            // for DP (see dp::gate), and the plan is refused.
            fraction: 1.0,
            rounds: 3,
            secagg: true,
            noise_multiplier: Some(0.5),
            dp_min_contributors: Some(3),
            seed,
            ..Settings::default()
        },
    };
    let plain = |seed| SimConfig {
        sim: Simulation {
            dropout: 0.0,
            straggler_delay: Some("uniform:0ms..300ms".into()),
            ..secure(seed).sim
        },
        run: Settings {
            secagg: false,
            fraction: 0.8,
            dp_min_contributors: None,
            ..secure(seed).run
        },
    };
    let root = empty_dir("reproducible");
    let run = async |cfg: SimConfig, tag: &str| {
        let dir = root.join(tag);
        let loaded = load_data(&cfg, true).unwrap();
        let mut observer = ServerObserver::logging(Some(MetricsFiles::create(&dir).unwrap()));
        let report = fedveil_sim::run(&cfg, &loaded.split, &mut observer)
            .await
            .unwrap();
        assert!(report.server.rounds_completed > 0, "{tag}: {report:?}");
        // Eight clients, two trainings at a time: two model instances.
        assert!(
            (1..=2).contains(&report.model_instances),
            "{tag}: {} model instances",
            report.model_instances
        );
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        (read("metrics.jsonl"), read("metrics.csv"), report)
    };
    for (kind, cfg) in [
        ("secure", &secure as &dyn Fn(u64) -> SimConfig),
        ("plain", &plain),
    ] {
        let (jsonl, csv, report) = run(cfg(11), &format!("{kind}-a")).await;
        let (jsonl_again, csv_again, _) = run(cfg(11), &format!("{kind}-b")).await;
        assert_eq!(jsonl, jsonl_again, "{kind}: metrics.jsonl differs");
        assert_eq!(csv, csv_again, "{kind}: metrics.csv differs");
        assert!(jsonl.contains("\"epsilon\":"), "{jsonl}");
        if kind == "secure" {
            assert!(report.faults.vanished_total() > 0, "{:?}", report.faults);
        } else {
            assert!(report.faults.delayed > 0, "{:?}", report.faults);
            let (other, _, _) = run(cfg(12), &format!("{kind}-c")).await;
            assert_ne!(jsonl, other, "another seed should change the run");
        }
    }
    std::fs::remove_dir_all(&root).unwrap();
}

/// A table of the user's own, end to end: a CSV with named classes, loaded
/// by `--dataset csv:PATH`, standardised with shared statistics, split
/// over clients and learned by the built-in MLP through SecAgg+. The two
/// classes are Gaussian blobs on very different scales, so without the
/// standardisation the features would not be comparable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_csv_table_trains_the_mlp_through_secagg() {
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};

    let dir = empty_dir("csv");
    let path = dir.join("patients.csv");
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
    let noise = Normal::new(0.0f64, 1.0).unwrap();
    let mut text = String::from("weight,age,marker,outcome\n");
    for i in 0..400 {
        let sick = i % 2 == 0;
        let shift = if sick { 1.5 } else { -1.5 };
        let row = [
            700.0 + 100.0 * (shift + noise.sample(&mut rng)),
            50.0 + 10.0 * noise.sample(&mut rng),
            0.01 * (shift + noise.sample(&mut rng)),
        ];
        let label = if sick { "sick" } else { "healthy" };
        text.push_str(&format!("{},{},{},{label}\n", row[0], row[1], row[2]));
    }
    std::fs::write(&path, text).unwrap();
    let classes = vec!["healthy".to_owned(), "sick".to_owned()];
    let table = fedveil_ml::data::load_csv(
        &path,
        &fedveil_ml::data::CsvSpec {
            label: "outcome".into(),
            classes: Some(classes.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let stats = fedveil_ml::data::FeatureStats::of(&table);
    let cfg = SimConfig {
        sim: Simulation {
            clients: 4,
            max_concurrent_training: Some(2),
            ..Simulation::default()
        },
        run: Settings {
            data: DataSettings {
                dataset: format!("csv:{}", path.display()),
                label: Some("outcome".into()),
                classes: Some(classes),
                feature_mean: Some(stats.mean),
                feature_std: Some(stats.std),
                model: "mlp".into(),
                ..DataSettings::default()
            },
            rounds: 5,
            lr: 0.1,
            seed: 3,
            ..Settings::default()
        },
    };
    let loaded = load_data(&cfg, true).unwrap();
    assert_eq!(
        (loaded.split.train.len(), loaded.split.test.len()),
        (320, 80)
    );
    let report = fedveil_sim::run(&cfg, &loaded.split, &mut QuietObserver)
        .await
        .unwrap();
    assert!(
        report.clients.iter().all(|c| c.is_ok()),
        "{:?}",
        report.clients
    );
    assert_eq!(report.server.rounds_completed, 5);
    let last = report.server.metrics.last().unwrap();
    assert!(last.secure, "aggregated through SecAgg+");
    let accuracy = last.accuracy.unwrap();
    assert!(accuracy > 0.9, "test accuracy {accuracy}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A regression on the user's own table: a numeric label column
/// (`--task regression`), the MLP's one output trained on squared error
/// through SecAgg+, and the task's metrics (MSE, MAE) reported instead of
/// accuracy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regression_table_trains_through_secagg_and_reports_mse_and_mae() {
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};

    let dir = empty_dir("regression");
    let path = dir.join("homes.csv");
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(11);
    let normal = Normal::new(0.0f64, 1.0).unwrap();
    let mut text = String::from("rooms,age,price\n");
    for _ in 0..400 {
        let (rooms, age) = (normal.sample(&mut rng), normal.sample(&mut rng));
        let price = 50.0 + 20.0 * rooms - 10.0 * age + 2.0 * normal.sample(&mut rng);
        text.push_str(&format!("{rooms},{age},{price}\n"));
    }
    std::fs::write(&path, text).unwrap();
    let cfg = SimConfig {
        sim: Simulation {
            clients: 4,
            max_concurrent_training: Some(2),
            ..Simulation::default()
        },
        run: Settings {
            data: DataSettings {
                dataset: format!("csv:{}", path.display()),
                label: Some("price".into()),
                task: fedveil_ml::data::Task::Regression,
                model: "mlp".into(),
                ..DataSettings::default()
            },
            rounds: 8,
            lr: 0.01,
            local_optimizer: fedveil_proto::wire::LocalOptimizer::Adam,
            seed: 5,
            ..Settings::default()
        },
    };
    let loaded = load_data(&cfg, true).unwrap();
    let report = fedveil_sim::run(&cfg, &loaded.split, &mut QuietObserver)
        .await
        .unwrap();
    assert!(
        report.clients.iter().all(|c| c.is_ok()),
        "{:?}",
        report.clients
    );
    let metrics = &report.server.metrics;
    assert_eq!(metrics.len(), 8);
    let (first, last) = (&metrics[0], metrics.last().unwrap());
    assert!(last.secure && last.accuracy.is_none());
    let (mse, mae) = (last.mse.unwrap(), last.mae.unwrap());
    assert_eq!(mse, last.loss, "the loss of a regression is its MSE");
    // The targets vary by about 500 (squared units); the noise is 4.
    assert!(
        mse < 0.1 * first.mse.unwrap(),
        "MSE {} -> {mse}",
        first.mse.unwrap()
    );
    assert!(
        mae > 0.0 && mae * mae <= mse * 1.0001,
        "MAE {mae}, MSE {mse}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Images of the user's own, end to end: PNG files in one folder per class
/// (written here from the synthetic image task), loaded by `--dataset
/// image-folder:PATH`, resized, split over clients and learned by the CNN
/// through SecAgg+.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_image_folder_trains_the_cnn_through_secagg() {
    let source = fedveil_ml::data::synthetic::SyntheticConfig {
        train_examples: 600,
        test_examples: 1,
        ..Default::default()
    }
    .generate(5)
    .train;
    let root = empty_dir("images");
    let classes: Vec<String> = (0..source.num_classes)
        .map(|c| format!("class-{c}"))
        .collect();
    for class in &classes {
        std::fs::create_dir_all(root.join(class)).unwrap();
    }
    for i in 0..source.len() {
        let pixels: Vec<u8> = source
            .example(i)
            .iter()
            .map(|&p| (p * 255.0).round() as u8)
            .collect();
        // 28x28 stored at 32x32, so the loader's resize is exercised.
        let image = image::GrayImage::from_raw(28, 28, pixels).unwrap();
        let image = image::imageops::resize(&image, 32, 32, image::imageops::FilterType::Triangle);
        let class = &classes[source.labels[i] as usize];
        image
            .save(root.join(class).join(format!("{i:04}.png")))
            .unwrap();
    }
    let cfg = SimConfig {
        sim: Simulation {
            clients: 4,
            max_concurrent_training: Some(2),
            ..Simulation::default()
        },
        run: Settings {
            data: DataSettings {
                dataset: format!("image-folder:{}", root.display()),
                classes: Some(classes),
                image_size: 28,
                ..DataSettings::default()
            },
            rounds: 8,
            lr: 0.1,
            seed: 3,
            ..Settings::default()
        },
    };
    let loaded = load_data(&cfg, true).unwrap();
    assert_eq!(loaded.split.train.example_shape, vec![1, 28, 28]);
    assert_eq!(loaded.split.train.len() + loaded.split.test.len(), 600);
    let report = fedveil_sim::run(&cfg, &loaded.split, &mut QuietObserver)
        .await
        .unwrap();
    assert!(
        report.clients.iter().all(|c| c.is_ok()),
        "{:?}",
        report.clients
    );
    let last = report.server.metrics.last().unwrap();
    assert!(last.secure);
    let accuracy = last.accuracy.unwrap();
    assert!(accuracy > 0.5, "test accuracy {accuracy} (chance 0.1)");
    std::fs::remove_dir_all(&root).unwrap();
}
