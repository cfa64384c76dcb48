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
async fn a_node_enrolled_into_a_directory_trains_comes_back_and_is_told_when_to_renew() {
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
    // Renewal opens in the last third of the certificate's life: a fresh
    // node asking now is told when, and keeps its certificate.
    let mut node = Node::open(&home).await.unwrap();
    let enrolled_serial = node.identity().info().serial.clone();
    let err = node.renew().await.unwrap_err().to_string();
    assert!(err.contains("may renew its certificate from"), "{err}");
    let mut reopened = Node::open(&home).await.unwrap();
    assert_eq!(reopened.identity().info().serial, enrolled_serial);
    assert_eq!(reopened.server(), invitation.server);
    let split = synthetic();
    let report = reopened.run(trainer(&split, 0)).await.unwrap();
    assert_eq!(report.rounds_trained, 1);
    let run = running.await.unwrap();
    assert_eq!(run.rounds_completed, 1);

    // A key others may read is refused, saying how to fix it (not to enrol
    // again).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let key = home.join(fedveil_net::pki::NODE_IDENTITY_FILE);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Node::open(&home).await.unwrap_err();
        assert!(
            matches!(
                err,
                NodeError::Pki(fedveil_net::pki::PkiError::KeyReadableByOthers { .. })
            ),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
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

/// A private server: SecAgg+ with local DP at noise multiplier 2, for
/// three nodes; its identity in `dir`, its state under run name `run`.
fn private_server(dir: &std::path::Path, run: &str, rounds: u64) -> ServerBuilder {
    private_server_with(dir, run, rounds, None)
}

/// [`private_server`] with a population budget.
fn private_server_with(
    dir: &std::path::Path,
    run: &str,
    rounds: u64,
    population_budget: Option<f64>,
) -> ServerBuilder {
    let settings = Settings {
        population_budget,
        rounds,
        secagg: true,
        dp: Some(fedveil_proto::dp::Mechanism::Local),
        noise_multiplier: Some(2.0),
        // Small updates, so that three nodes' local noise cannot blow the
        // model up.
        clip_norm: 0.01,
        fraction: 1.0,
        max_failed_rounds: 1,
        lr: 0.1,
        seed: 1,
        ..Settings::default()
    };
    Server::builder(settings)
        .model(builtin("cnn").unwrap(), Arc::clone(&synthetic().test))
        .min_clients(3)
        .identity_dir(dir.join("server"))
        .state(dir.join("server/state.db"), run)
        .listen("127.0.0.1:0".parse().unwrap())
}

/// A node holds every server to the policy in its own client.toml, and
/// what it spends is kept in its directory across runs: a server in the
/// clear gets nothing from it; a new run name restarts the server's
/// ledger, never the node's, which stops the node at its own budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_holds_every_server_to_its_own_policy_and_budget() {
    use fedveil_proto::dp::{DpRound, rdp::gaussian_epsilon};
    use fedveil_proto::round::policy::{NodeLedger, round_cost};
    let dir = temp_dir("policy");
    let split = synthetic();
    let home = dir.join("clinic");
    // What three rounds of the private server cost the node: its noise
    // multiplier of 2, unamplified.
    let round = DpRound::Local {
        clip_norm: 0.01,
        noise_std: 2.0 * 2.0 * 0.01,
    };
    let cost = round_cost(Some(&round), None, 1).unwrap();
    let mut expected = NodeLedger::new(1e-5);
    for r in 1..=3 {
        expected.record(r, &cost);
    }
    let three_rounds = expected.epsilon();
    let reference = gaussian_epsilon(1.0, 2.0, 3, 1e-5).unwrap();
    assert!((three_rounds - reference).abs() < 0.02 * reference);

    // Enrolled with a plaintext server, which it refuses by policy.
    let clear = ward_server(&dir.join("clear"), 1).build().unwrap();
    let invitation = clear.invite("clinic").unwrap();
    let running = tokio::spawn(clear.run(std::future::pending()));
    Node::enrol_into(&home, &invitation).await.unwrap();
    let settings = std::fs::read_to_string(home.join("client.toml")).unwrap();
    std::fs::write(
        home.join("client.toml"),
        format!(
            "{settings}\n[privacy]\nrequire_secure_aggregation = true\nrequire_dp = \"local\"\n\
             min_noise_multiplier = 1.5\nmax_epsilon = {}\n",
            three_rounds * 1.01
        ),
    )
    .unwrap();
    let mut node = Node::open(&home).await.unwrap();
    assert_eq!(node.policy().max_epsilon, Some(three_rounds * 1.01));
    let report = node.run(trainer(&split, 0)).await.unwrap();
    assert_eq!(report.rounds_trained, 0, "nothing goes in the clear");
    assert_eq!(running.await.unwrap().rounds_completed, 0);
    assert_eq!(node.ledger().privacy.rounds_charged(), 0);

    // A private server, run "a": two rounds, charged to the node's ledger
    // without amplification by sampling.
    let join = |server: &Server, name: &str| server.invite(name).unwrap();
    for (run, rounds, trained) in [("a", 2, 2), ("b", 2, 1)] {
        let server = private_server(&dir, run, rounds).build().unwrap();
        let others = [
            join(&server, &format!("{run}-1")),
            join(&server, &format!("{run}-2")),
        ];
        let clinic = join(&server, &format!("clinic-{run}"));
        let running = tokio::spawn(server.run(std::future::pending()));
        let mut helpers = Vec::new();
        for (i, invitation) in others.into_iter().enumerate() {
            let t = trainer(&split, i as u64 + 1);
            helpers.push(tokio::spawn(async move {
                let mut n = Node::enrol(&invitation).await.unwrap();
                n.run(t).await
            }));
        }
        // The clinic's enrolment with this server lives in a directory of
        // its own, naming the same ledger file.
        let home2 = dir.join(format!("clinic-{run}"));
        Node::enrol_into(&home2, &clinic).await.unwrap();
        let saved = std::fs::read_to_string(home.join("client.toml")).unwrap();
        let privacy = &saved[saved.find("[privacy]").unwrap()..];
        let server_line = std::fs::read_to_string(home2.join("client.toml")).unwrap();
        std::fs::write(
            home2.join("client.toml"),
            format!(
                "{}ledger = {:?}\n{privacy}",
                server_line,
                home.join("privacy-ledger.json")
            ),
        )
        .unwrap();
        let mut node = Node::open(&home2).await.unwrap();
        let report = node.run(trainer(&split, 0)).await.unwrap();
        running.await.unwrap();
        assert_eq!(report.rounds_trained, trained, "run {run}");
        for h in helpers {
            let _ = h.await.unwrap();
        }
    }
    let ledger = Node::open(&home).await.unwrap().ledger();
    assert_eq!(ledger.privacy.rounds_charged(), 3);
    assert!((ledger.epsilon() - three_rounds).abs() < 1e-9);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// What each node spends lives in the server's registry, over all its
/// runs: a second run under a new name continues it (where a per-run
/// ledger would start again at 0), and the population budget stops every
/// node there, each told why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_run_name_continues_each_nodes_spend_up_to_the_population_budget() {
    use fedveil_proto::dp::NodeSpend;
    use fedveil_server::registry::Registry;
    let dir = temp_dir("spend");
    let split = synthetic();
    let names = ["ann", "bob", "cat"];
    let mut step = None;
    let mut spends_after_a = None;
    for (run, budget) in [("a", None), ("b", Some(()))] {
        // Run b allows each node one round more than run a spent.
        let budget = budget.map(|()| {
            let plan_step: &(Vec<f64>, Vec<f64>) = step.as_ref().unwrap();
            let mut three = NodeSpend::default();
            for _ in 0..3 {
                three.add(&plan_step.0, &plan_step.1, 0.0);
            }
            three.epsilon(1e-5) * 1.001
        });
        let server = private_server_with(&dir, run, 2, budget).build().unwrap();
        let address = server.invite("probe").unwrap().server;
        let invitations: Vec<_> = names
            .iter()
            .map(|n| (run == "a").then(|| server.invite(n).unwrap()))
            .collect();
        let running = tokio::spawn(server.run(std::future::pending()));
        let mut nodes = Vec::new();
        for (i, (name, invitation)) in names.iter().zip(invitations).enumerate() {
            let home = dir.join(name);
            let t = trainer(&split, i as u64);
            let address = address.clone();
            nodes.push(tokio::spawn(async move {
                if let Some(invitation) = invitation {
                    Node::enrol_into(&home, &invitation).await.unwrap();
                }
                let mut node = Node::open_at(&home, Some(&address)).await.unwrap();
                node.run(t).await.map(|r| r.rounds_trained)
            }));
        }
        let report = running.await.unwrap();
        let mut trained = Vec::new();
        for n in nodes {
            trained.push(n.await.unwrap());
        }
        let spends = Registry::open(&dir.join("server/state.db"))
            .unwrap()
            .spends()
            .unwrap();
        if run == "a" {
            assert_eq!(report.rounds_completed, 2);
            assert!(names.iter().all(|n| spends[*n].rounds == 2), "{spends:?}");
            // One round's step, as the run charged it.
            let plan = fedveil_proto::dp::DpConfig {
                mechanism: fedveil_proto::dp::Mechanism::Local,
                clip_norm: 0.01,
                noise: fedveil_proto::dp::NoiseLevel::NoiseMultiplier(2.0),
                delta: 1e-5,
                planned_rounds: 2,
                budget: None,
                min_contributors: None,
                adaptive: None,
            }
            .plan(1.0, 3, 10, 3, true)
            .unwrap();
            let mut two = NodeSpend::default();
            two.add(&plan.orders, &plan.rdp_per_round, 0.0);
            two.add(&plan.orders, &plan.rdp_per_round, 0.0);
            assert!((spends["ann"].epsilon(1e-5) - two.epsilon(1e-5)).abs() < 1e-9);
            step = Some((plan.orders, plan.rdp_per_round));
            spends_after_a = Some(spends);
        } else {
            // One more round each, then every node is out of budget.
            assert_eq!(report.rounds_completed, 1, "{trained:?}");
            let before = spends_after_a.as_ref().unwrap();
            for n in names {
                assert_eq!(spends[n].rounds, 3, "{n}");
                assert!(spends[n].epsilon(1e-5) > before[n].epsilon(1e-5));
                assert!(spends[n].epsilon(1e-5) <= budget.unwrap());
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A renewal supersedes the node's previous certificate after a grace
/// period, and the server then closes the connection made with it; a node
/// whose certificate was renewed meanwhile (here by another process, as
/// `fedveil-client renew` from cron) reconnects with the new one and
/// trains on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_certificate_was_superseded_reconnects_with_the_new_one() {
    use fedveil_server::registry::Registry;
    let dir = temp_dir("superseded");
    let registry = Arc::new(
        Registry::open(&dir.join("server/state.db"))
            .unwrap()
            .with_renewal_policy(1.0, std::time::Duration::from_secs(1)),
    );
    // Enough rounds to outlast the renewal 2 s in, its 1 s grace and the
    // server's 1 s revocation poll: a round takes 0.1-0.2 s here.
    let settings = Settings {
        rounds: 60,
        secagg: false,
        lr: 0.1,
        seed: 1,
        ..Settings::default()
    };
    let server = Server::builder(settings)
        .model(builtin("cnn").unwrap(), Arc::clone(&synthetic().test))
        .min_clients(1)
        .identity_dir(dir.join("server"))
        .registry(Arc::clone(&registry))
        .listen("127.0.0.1:0".parse().unwrap())
        .build()
        .unwrap();
    let invitation = server.invite("ward").unwrap();
    let running = tokio::spawn(server.run(std::future::pending()));
    let home = dir.join("ward");
    let mut node = Node::enrol_into(&home, &invitation).await.unwrap();
    let first = node.identity().info().serial.clone();
    let split = synthetic();
    let t = trainer(&split, 0);
    let training = tokio::spawn(async move {
        let report = node.run(t).await;
        (report, node.identity().info().serial.clone())
    });
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let mut cron = Node::open(&home).await.unwrap();
    cron.renew().await.unwrap();
    let renewed = cron.identity().info().serial.clone();
    assert_ne!(renewed, first);
    let (report, serial) = training.await.unwrap();
    let report = report.unwrap();
    assert_eq!(report.server_rounds_completed, 60);
    assert_eq!(serial, renewed, "the node ends on the renewed certificate");
    assert!(running.await.unwrap().rounds_completed == 60);
    assert!(!registry.is_live(&first, "ward").unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}
