use super::*;
use fedveil_proto::dp::PrivacyLedger;

fn temp_db(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fedveil-store-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir.join(STATE_DB_FILE)
}

fn checkpoint(next_round: u64, ledger: Option<PrivacyLedger>) -> Checkpoint {
    Checkpoint {
        next_round,
        rounds_completed: next_round - 1,
        rounds_failed: 0,
        global_model: vec![1.5, -2.25, f32::MIN_POSITIVE, next_round as f32],
        strategy: StrategyState {
            step: next_round - 1,
            buffers: BTreeMap::from([
                ("m".to_owned(), vec![0.1, 0.2, 0.3, 0.4]),
                ("v".to_owned(), vec![1e-6, 2e-6, 3e-6, 4e-6]),
            ]),
        },
        ledger,
        clip_norm: Some(0.75),
        sampling_rng: RngState {
            seed: [7; 32],
            stream: 0,
            word_pos: 12345,
        },
    }
}

fn ledger(rounds: u64) -> PrivacyLedger {
    let orders = vec![2.0, 4.0, 8.0];
    let mut l = PrivacyLedger::new(orders, 1e-5, 100.0);
    for r in 1..=rounds {
        l.charge(r, &[0.01, 0.02, 0.04], 0.0).unwrap();
    }
    l
}

#[test]
fn a_checkpoint_comes_back_exactly() {
    let path = temp_db("roundtrip");
    let mut store = Store::open(&path, "default", "{\"a\":1}").unwrap();
    assert_eq!(
        store.load().unwrap(),
        Saved {
            checkpoint: None,
            ledger: None
        }
    );
    store
        .persist(&Durable::Charged {
            round: 1,
            ledger: ledger(1),
            population: vec![],
            step: vec![],
            gate: 0.0,
        })
        .unwrap();
    let c = checkpoint(2, Some(ledger(1)));
    store
        .persist(&Durable::Checkpoint(Box::new(c.clone())))
        .unwrap();
    drop(store);
    let store = Store::open(&path, "default", "{\"a\":1}").unwrap();
    let saved = store.load().unwrap();
    assert_eq!(saved.checkpoint, Some(c));
    assert_eq!(saved.ledger, Some(ledger(1)));
    assert_eq!(store.charged_rounds().unwrap().len(), 1);
}

#[test]
fn a_round_charged_after_the_checkpoint_is_not_lost() {
    let path = temp_db("ahead");
    let mut store = Store::open(&path, "r", "{}").unwrap();
    store
        .persist(&Durable::Checkpoint(Box::new(checkpoint(
            3,
            Some(ledger(2)),
        ))))
        .unwrap();
    store
        .persist(&Durable::Charged {
            round: 3,
            ledger: ledger(3),
            population: vec![],
            step: vec![],
            gate: 0.0,
        })
        .unwrap();
    let saved = store.load().unwrap();
    assert_eq!(saved.checkpoint.unwrap().next_round, 3);
    assert_eq!(saved.ledger.unwrap().rounds_charged(), 3);
    // One round is charged once: a second charge of round 3 is refused.
    assert!(
        store
            .persist(&Durable::Charged {
                round: 3,
                ledger: ledger(3),
                population: vec![],
                step: vec![],
                gate: 0.0,
            })
            .is_err()
    );
}

#[test]
fn a_run_restarted_with_another_config_is_refused() {
    let path = temp_db("config");
    Store::open(&path, "default", "{\"rounds\":10}").unwrap();
    let err = Store::open(&path, "default", "{\"rounds\":20}")
        .err()
        .unwrap();
    assert!(matches!(err, StoreError::ConfigChanged { .. }), "{err}");
    // Another run name in the same database is a new run.
    Store::open(&path, "second", "{\"rounds\":20}").unwrap();
    assert!(matches!(
        Store::open_existing(&path, "third").err().unwrap(),
        StoreError::NoSuchRun(_)
    ));
}

#[test]
fn the_round_history_keeps_metrics_and_costs() {
    let path = temp_db("history");
    let mut store = Store::open(&path, "default", "{\"a\":1}").unwrap();
    let m = RoundMetrics {
        round: 3,
        accuracy: Some(0.5),
        loss: 1.25,
        bytes_up: 1234,
        bytes_down: 5678,
        round_secs: 2.5,
        cpu_busy: None,
        cohort: 4,
        contributors: 3,
        dropped: 1,
        timed_out: false,
        examples: 90,
        train_loss: Some(0.75),
        secure: true,
        client_accuracy: None,
        client_loss: None,
        epsilon: Some(1.5),
        clip_norm: Some(1.0),
        ..RoundMetrics::default()
    };
    store.record_round(&m).unwrap();
    let json: String = store
        .conn
        .query_row("SELECT metrics FROM rounds WHERE round = 3", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(serde_json::from_str::<RoundMetrics>(&json).unwrap(), m);
}

#[test]
fn strategy_buffers_are_replaced_with_each_checkpoint() {
    let path = temp_db("buffers");
    let mut store = Store::open(&path, "default", "{}").unwrap();
    let mut c = checkpoint(2, None);
    store
        .persist(&Durable::Checkpoint(Box::new(c.clone())))
        .unwrap();
    c.next_round = 3;
    c.strategy.buffers = BTreeMap::from([("control".to_owned(), vec![9.0; 3])]);
    store
        .persist(&Durable::Checkpoint(Box::new(c.clone())))
        .unwrap();
    assert_eq!(store.load().unwrap().checkpoint, Some(c));
}

#[test]
fn moments_saved_before_strategies_are_read_as_buffers() {
    let path = temp_db("legacy");
    let mut store = Store::open(&path, "default", "{}").unwrap();
    let c = checkpoint(2, None);
    store
        .persist(&Durable::Checkpoint(Box::new(c.clone())))
        .unwrap();
    // What an older fedveil wrote: the moments in the checkpoint row.
    store
        .conn
        .execute_batch(
            "DELETE FROM strategy_buffers;
             UPDATE checkpoint SET opt_m = x'0000803f00000040', opt_v = x'0000403f';",
        )
        .unwrap();
    let loaded = store.load().unwrap().checkpoint.unwrap();
    assert_eq!(loaded.strategy.buffers["m"], vec![1.0, 2.0]);
    assert_eq!(loaded.strategy.buffers["v"], vec![0.75]);
    assert_eq!(loaded.strategy.step, c.strategy.step);
}

#[test]
fn a_run_starts_resumes_or_is_already_complete() {
    use fedveil_proto::round::{Coordinator, CoordinatorConfig};
    use fedveil_proto::wire::ModelSpec;

    let spec = ModelSpec {
        name: "m".into(),
        param_count: 4,
        shape_signature: [0; 32],
    };
    let config = CoordinatorConfig {
        rounds: 3,
        ..CoordinatorConfig::default()
    };
    let builder = || Coordinator::builder(config.clone(), spec.clone());
    let path = temp_db("open");
    let mut store = Store::open(&path, "default", "{}").unwrap();
    let Opened::Started(fresh) = store.start_or_resume(builder(), vec![0.5; 4]).unwrap() else {
        panic!("a new run starts")
    };
    assert_eq!(
        (fresh.next_round(), fresh.global_model()),
        (1, &[0.5; 4][..])
    );
    // Two rounds committed: the run continues at round 3 from that model.
    let mut saved = fresh.checkpoint();
    (saved.next_round, saved.rounds_completed) = (3, 2);
    saved.global_model = vec![2.0; 4];
    store
        .persist(&Durable::Checkpoint(Box::new(saved.clone())))
        .unwrap();
    let Opened::Resumed(resumed) = store.start_or_resume(builder(), vec![0.5; 4]).unwrap() else {
        panic!("a started run resumes")
    };
    assert_eq!(resumed.next_round(), 3);
    assert_eq!(resumed.global_model(), &[2.0; 4]);
    // All three done: nothing is left to run.
    (saved.next_round, saved.rounds_completed) = (4, 3);
    store
        .persist(&Durable::Checkpoint(Box::new(saved)))
        .unwrap();
    assert!(matches!(
        store.start_or_resume(builder(), vec![0.5; 4]).unwrap(),
        Opened::Complete {
            rounds_completed: 3
        }
    ));
    // A config the checkpoint does not fit is an error, not a fresh start.
    let wrong = || {
        Coordinator::builder(
            config.clone(),
            ModelSpec {
                param_count: 5,
                ..spec.clone()
            },
        )
    };
    assert!(matches!(
        store.start_or_resume(wrong(), vec![0.5; 5]),
        Err(OpenError::Config(_))
    ));
}

/// Each node's spend is charged with the run's ledger, in one transaction,
/// and carries over to the next run in the same database: a new run name
/// never starts a node afresh. A refused charge changes no spend.
#[test]
fn node_spends_carry_over_runs_and_roll_back_with_their_charge() {
    use fedveil_proto::dp::rdp;
    let path = temp_db("spends");
    let orders = rdp::default_orders();
    let step = rdp::sampled_gaussian(0.5, 1.0, &orders);
    let mut charged = PrivacyLedger::new(orders.clone(), 1e-5, f64::MAX);
    let charge = |store: &mut Store, round: u64, ledger: &PrivacyLedger, who: &[&str]| {
        store.persist(&Durable::Charged {
            round,
            ledger: ledger.clone(),
            population: who.iter().map(|s| s.to_string()).collect(),
            step: step.clone(),
            gate: 0.0,
        })
    };
    let mut a = Store::open(&path, "a", "{}").unwrap();
    charged.charge(1, &step, 0.0).unwrap();
    charge(&mut a, 1, &charged, &["ann", "bob"]).unwrap();
    let mut b = Store::open(&path, "b", "{}").unwrap();
    let mut fresh = PrivacyLedger::new(orders.clone(), 1e-5, f64::MAX);
    fresh.charge(1, &step, 0.0).unwrap();
    charge(&mut b, 1, &fresh, &["ann"]).unwrap();
    // Run a charging its round 1 again is refused, and charges no one.
    assert!(charge(&mut a, 1, &charged, &["ann", "bob"]).is_err());
    let spends = crate::registry::Registry::open(&path)
        .unwrap()
        .spends()
        .unwrap();
    assert_eq!(spends["ann"].rounds, 2);
    assert_eq!(spends["bob"].rounds, 1);
    assert!(spends["ann"].epsilon(1e-5) > fresh.epsilon());
    assert!(spends["bob"].epsilon(1e-5) >= fresh.epsilon() * 0.999);
}
