//! Differential privacy end to end over real QUIC: distributed DP under
//! SecAgg+, and the budget stopping a run.

use fedveil_ml::data::synthetic::SyntheticConfig;
use fedveil_proto::dp::{Mechanism, rdp};
use fedveil_settings::{DataSettings, Settings, Simulation};
use fedveil_sim::{QuietObserver, SimConfig};

/// Burn seeds its backend RNG process-wide, so two simulations building
/// models at once in one test process perturb each other's initial models;
/// the runs in this file compare models, so they take turns.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn split() -> fedveil_ml::data::Split {
    SyntheticConfig {
        train_examples: 1000,
        test_examples: 300,
        ..Default::default()
    }
    .generate(8)
}

fn base() -> SimConfig {
    SimConfig {
        sim: Simulation {
            clients: 5,
            max_concurrent_training: Some(1),
            ..Simulation::default()
        },
        run: Settings {
            data: DataSettings {
                dataset: "synthetic".into(),
                ..DataSettings::default()
            },
            fraction: 1.0,
            rounds: 2,
            local_epochs: 2,
            batch_size: 20,
            lr: 0.1,
            seed: 4,
            round_timeout: 60.0,
            ..Settings::default()
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_dp_under_secagg_spends_epsilon_and_tiny_noise_keeps_the_model() {
    let _turn = SERIAL.lock().await;
    let split = split();
    let plain = fedveil_sim::run(&base(), &split, &mut QuietObserver)
        .await
        .unwrap();
    // Same run with distributed DP: a clip too large to bind and almost no
    // noise, so the model must match the plain one up to rounding and noise.
    let dp_cfg = SimConfig {
        run: Settings {
            dp: Some(Mechanism::Distributed),
            noise_multiplier: Some(1e-6),
            clip_norm: 100.0,
            dp_min_contributors: Some(4),
            ..base().run
        },
        ..base()
    };
    let dp = fedveil_sim::run(&dp_cfg, &split, &mut QuietObserver)
        .await
        .unwrap();
    assert_eq!(dp.server.rounds_completed, 2);
    assert!(dp.clients.iter().all(|c| c.is_ok()), "{:?}", dp.clients);
    let eps: Vec<f64> = dp
        .server
        .metrics
        .iter()
        .map(|m| m.epsilon.unwrap())
        .collect();
    assert!(eps[0] > 0.0 && eps[1] > eps[0], "{eps:?}");
    assert!(
        dp.server
            .metrics
            .iter()
            .all(|m| m.secure && m.train_loss.is_none())
    );
    let max_diff = plain
        .server
        .final_model
        .iter()
        .zip(&dp.server.final_model)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    // Noise std per value: z * C / n = 1e-6 * 100 / 5 = 2e-5 per round.
    let contributors = |r: &fedveil_sim::SimReport| {
        r.server
            .metrics
            .iter()
            .map(|m| (m.contributors, m.accuracy.unwrap()))
            .collect::<Vec<_>>()
    };
    assert!(
        max_diff < 0.05,
        "DP and plain models differ by {max_diff}; dp {:?} plain {:?} dp clients {:?}",
        contributors(&dp),
        contributors(&plain),
        dp.clients
    );
    assert!(max_diff > 0.0, "noise was added");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_ends_a_run_early_with_every_client_told() {
    let _turn = SERIAL.lock().await;
    let budget = rdp::gaussian_epsilon(1.0, 1.0, 2, 1e-5).unwrap() * 1.0001;
    let cfg = SimConfig {
        run: Settings {
            secagg: false,
            rounds: 5,
            dp: Some(Mechanism::Central),
            noise_multiplier: Some(1.0),
            dp_budget: Some(budget),
            ..base().run
        },
        ..base()
    };
    let report = fedveil_sim::run(&cfg, &split(), &mut QuietObserver)
        .await
        .unwrap();
    // Two rounds fit the budget and are started (with z = 1 and 5 clients
    // the noisy model can make every client diverge in round 2, failing it:
    // it is charged all the same); round 3 never starts.
    assert_eq!(
        report.server.rounds_completed + report.server.rounds_failed,
        2,
        "stopped before round 3: {} completed, {} failed",
        report.server.rounds_completed,
        report.server.rounds_failed
    );
    assert!(report.server.rounds_completed >= 1);
    assert!(
        report.clients.iter().all(|c| c.is_ok()),
        "{:?}",
        report.clients
    );
    let last = report.server.metrics.last().unwrap().epsilon.unwrap();
    assert!(last <= budget, "{last} > {budget}");
    // The run's total counts every started round, failed ones too.
    assert!(report.server.epsilon.unwrap() >= last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_dp_configs_fail_before_any_round() {
    let _turn = SERIAL.lock().await;
    for (cfg, needle) in [
        (
            SimConfig {
                run: Settings {
                    noise_multiplier: Some(-1.0),
                    ..base().run
                },
                ..base()
            },
            "noise multiplier",
        ),
        (
            SimConfig {
                run: Settings {
                    target_epsilon: Some(0.0),
                    ..base().run
                },
                ..base()
            },
            "epsilon",
        ),
        (
            SimConfig {
                run: Settings {
                    target_epsilon: Some(3.0),
                    delta: 1.0,
                    ..base().run
                },
                ..base()
            },
            "delta",
        ),
        (
            SimConfig {
                run: Settings {
                    noise_multiplier: Some(1.0),
                    clip_norm: 0.0,
                    ..base().run
                },
                ..base()
            },
            "clip norm",
        ),
        (
            SimConfig {
                run: Settings {
                    noise_multiplier: Some(1.0),
                    dp_budget: Some(-1.0),
                    ..base().run
                },
                ..base()
            },
            "budget",
        ),
        (
            SimConfig {
                run: Settings {
                    secagg: false,
                    dp: Some(Mechanism::Distributed),
                    noise_multiplier: Some(1.0),
                    ..base().run
                },
                ..base()
            },
            "secure aggregation",
        ),
    ] {
        let err = fedveil_sim::run(&cfg, &split(), &mut QuietObserver)
            .await
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_clipping_under_secagg_moves_the_bound_towards_the_median() {
    let _turn = SERIAL.lock().await;
    // A bound far below every update norm: all clients are clipped, the
    // noisy unclipped fraction is near 0, and each round multiplies the
    // bound by about exp(0.2 * 0.5) = 1.105, never by more.
    let cfg = SimConfig {
        run: Settings {
            rounds: 3,
            dp: Some(Mechanism::Distributed),
            noise_multiplier: Some(0.5),
            clip_norm: 1e-3,
            dp_min_contributors: Some(4),
            adaptive_clip: true,
            clip_count_noise: Some(0.05),
            ..base().run
        },
        ..base()
    };
    let report = fedveil_sim::run(&cfg, &split(), &mut QuietObserver)
        .await
        .unwrap();
    assert_eq!(report.server.rounds_completed, 3);
    assert!(
        report.clients.iter().all(|c| c.is_ok()),
        "{:?}",
        report.clients
    );
    let bounds: Vec<f64> = report
        .server
        .metrics
        .iter()
        .map(|m| m.clip_norm.unwrap())
        .collect();
    assert_eq!(bounds[0], 1e-3);
    for w in bounds.windows(2) {
        let step = w[1] / w[0];
        assert!(step > 1.08 && step <= 0.1f64.exp() + 1e-12, "{bounds:?}");
    }
    // Local DP has no aggregate to read the indicators from.
    let local = SimConfig {
        run: Settings {
            secagg: false,
            dp: Some(Mechanism::Local),
            ..cfg.run
        },
        ..cfg
    };
    let err = fedveil_sim::run(&local, &split(), &mut QuietObserver)
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("adaptive clipping"), "{err:#}");
}
