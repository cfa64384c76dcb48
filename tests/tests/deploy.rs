//! The library's server and node, as an embedded deployment uses them: a
//! durable server that starts, completes and refuses changed settings, and
//! a node that enrols into a directory, comes back from it and renews.

use std::sync::Arc;

use fedveil_client::{Node, NodeError};
use fedveil_ml::model::builtin;
use fedveil_server::deploy::{DeployError, sha256_hex};
use fedveil_server::store::StoreError;
use fedveil_server::{RunStatus, Server, ServerBuilder};
use fedveil_settings::Settings;
use fedveil_tests::{synthetic, trainer};

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fedveil-deploy-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A one-node plaintext server for `rounds` CNN rounds, its identity and
/// state in `dir`.
fn ward_server(dir: &std::path::Path, rounds: u64) -> ServerBuilder {
    let settings = Settings {
        rounds,
        secagg: false,
        lr: 0.1,
        seed: 1,
        ..Settings::default()
    };
    Server::builder(settings)
        .model(builtin("cnn").unwrap(), Arc::clone(&synthetic().test))
        .min_clients(1)
        .identity_dir(dir.join("server"))
        .state(dir.join("server/state.db"), "ward")
        .listen("127.0.0.1:0".parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_enrolled_into_a_directory_trains_comes_back_and_renews() {
    let dir = temp_dir("node");
    let server = ward_server(&dir, 1).build().unwrap();
    assert_eq!(server.status(), &RunStatus::Started);
    let invitation = server.invite("ward-7").unwrap();
    assert_eq!(invitation.node.as_deref(), Some("ward-7"));
    let running = tokio::spawn(server.run(std::future::pending()));

    let home = dir.join("ward-7");
    let node = Node::enrol_into(&home, &invitation).await.unwrap();
    assert_eq!(node.name(), "ward-7");
    // One identity per directory; the token was single use anyway.
    assert!(matches!(
        Node::enrol_into(&home, &invitation).await,
        Err(NodeError::AlreadyEnrolled(_))
    ));
    // Renewal is saved: the directory reopens with the new certificate.
    let mut node = Node::open(&home).await.unwrap();
    let enrolled_serial = node.identity().info().serial.clone();
    node.renew().await.unwrap();
    let mut reopened = Node::open(&home).await.unwrap();
    assert_ne!(reopened.identity().info().serial, enrolled_serial);
    assert_eq!(reopened.server(), invitation.server);
    let split = synthetic();
    let report = reopened.run(trainer(&split, 0)).await.unwrap();
    assert_eq!(report.rounds_trained, 1);
    let run = running.await.unwrap();
    assert_eq!(run.rounds_completed, 1);

    // A directory without an identity says to enrol first.
    assert!(matches!(
        Node::open(dir.join("nobody")).await,
        Err(NodeError::NotEnrolled { .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_server_completes_once_and_refuses_changed_settings() {
    let dir = temp_dir("complete");
    let server = ward_server(&dir, 1).build().unwrap();
    let invitation = server.invite("ward-1").unwrap();
    let running = tokio::spawn(server.run(std::future::pending()));
    let mut node = Node::enrol(&invitation).await.unwrap();
    let split = synthetic();
    node.run(trainer(&split, 0)).await.unwrap();
    let first = running.await.unwrap();
    assert_eq!(first.rounds_completed, 1);

    // Started again, the run is complete: it returns at once with the
    // committed model, and the identity in the directory is kept.
    let again = ward_server(&dir, 1).build().unwrap();
    let RunStatus::Complete {
        rounds_completed,
        global_model,
        epsilon,
    } = again.status().clone()
    else {
        panic!("the run is complete: {:?}", again.status())
    };
    assert_eq!((rounds_completed, epsilon), (1, None));
    assert_eq!(sha256_hex(&global_model), sha256_hex(&first.final_model));
    let report = again.run(std::future::pending()).await;
    assert_eq!(report.final_model, first.final_model);
    assert!(report.metrics.is_empty() && report.rounds_completed == 0);

    // Other settings under the same run name are refused, not mixed in.
    match ward_server(&dir, 2).build() {
        Err(DeployError::State(StoreError::ConfigChanged { run, .. })) => assert_eq!(run, "ward"),
        Err(other) => panic!("expected a changed-config refusal, got {other}"),
        Ok(_) => panic!("expected a changed-config refusal"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
