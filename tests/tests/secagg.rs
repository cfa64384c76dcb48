//! Secure aggregation over real QUIC: the same run with and without SecAgg+
//! ends at the same model, up to fixed-point rounding.

use fedveil_ml::data::synthetic::SyntheticConfig;
use fedveil_settings::{DataSettings, Settings, Simulation};
use fedveil_sim::{QuietObserver, SimConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secagg_matches_plain_fedavg_over_quic() {
    let split = SyntheticConfig {
        train_examples: 1000,
        test_examples: 300,
        ..Default::default()
    }
    .generate(8);
    let cfg = |secagg| SimConfig {
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
            secagg,
            ..Settings::default()
        },
    };
    let plain = fedveil_sim::run(&cfg(false), &split, &mut QuietObserver)
        .await
        .unwrap();
    let secure = fedveil_sim::run(&cfg(true), &split, &mut QuietObserver)
        .await
        .unwrap();
    for r in [&plain, &secure] {
        assert_eq!(r.server.rounds_completed, 2);
        assert!(r.clients.iter().all(|c| c.is_ok()), "{:?}", r.clients);
    }
    assert!(
        secure
            .server
            .metrics
            .iter()
            .all(|m| m.secure && m.contributors == 5 && m.train_loss.is_none())
    );
    assert!(plain.server.metrics.iter().all(|m| !m.secure));
    let max_diff = plain
        .server
        .final_model
        .iter()
        .zip(&secure.server.final_model)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        max_diff < 1e-3,
        "secure and plain models differ by {max_diff}"
    );
    let (a, b) = (
        plain.server.metrics[1].accuracy.unwrap(),
        secure.server.metrics[1].accuracy.unwrap(),
    );
    assert!((a - b).abs() <= 0.02, "accuracy plain {a} vs secure {b}");
    // Masked traffic: each client sends about one model of u32s plus keys and shares.
    let up = secure.server.metrics[1].bytes_up as f64 / 5.0;
    let model_bytes = 4.0 * secure.server.final_model.len() as f64;
    assert!(
        up > model_bytes && up < 1.1 * model_bytes,
        "bytes up per client {up} vs model {model_bytes}"
    );
}
