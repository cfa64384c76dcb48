//! Both state machines driven in memory: no sockets, explicit time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::server::{MIN_SECAGG_COHORT, SecAggConfig};
use super::*;
use crate::wire::{
    Evaluation, LocalOptimizer, Message, ModelSpec, ReasonCode, RoundConfig, Update,
};

const D: usize = 4;

fn spec() -> ModelSpec {
    ModelSpec {
        name: "toy".into(),
        param_count: D as u64,
        shape_signature: [1; 32],
    }
}

fn cfg(rounds: u64, min_clients: usize, fraction: f64) -> CoordinatorConfig {
    CoordinatorConfig {
        rounds,
        min_clients,
        fraction,
        round_timeout: Duration::from_secs(30),
        max_clients: 100,
        max_examples_per_update: 1000,
        seed: 7,
        round: RoundConfig {
            local_epochs: 1,
            batch_size: 10,
            max_local_steps: None,
            learning_rate: 0.1,
            seed: 1,
            secure_aggregation: false,
            dp: None,
            prox_mu: 0.0,
            local_optimizer: LocalOptimizer::Sgd,
        },
        secagg: None,
        max_failed_rounds: 5,
        ..CoordinatorConfig::default()
    }
}

fn rng() -> rand_chacha::ChaCha20Rng {
    rand::SeedableRng::seed_from_u64(0)
}

/// A coordinator plus client sessions, with messages routed by hand.
struct Harness {
    server: Coordinator,
    clients: BTreeMap<ClientId, ClientSession>,
    events: Vec<Event>,
    closed: Vec<ClientId>,
    errors_to: Vec<(ClientId, ReasonCode)>,
    now: Instant,
}

impl Harness {
    fn new(cfg: CoordinatorConfig, n: usize) -> Self {
        Self::with_server(Coordinator::new(cfg, spec(), vec![0.0; D], 1).unwrap(), n)
    }

    fn with_server(server: Coordinator, n: usize) -> Self {
        let mut h = Harness {
            server,
            clients: BTreeMap::new(),
            events: Vec::new(),
            closed: Vec::new(),
            errors_to: Vec::new(),
            now: Instant::now(),
        };
        for i in 0..n {
            h.join(&format!("node-{i}"));
        }
        h
    }

    fn join(&mut self, name: &str) -> ClientId {
        let id = self.server.connect();
        let mut session = ClientSession::new(name, spec(), 10, rng());
        while let Some(m) = session.poll_transmit() {
            self.server.handle_message(id, m, self.now);
        }
        self.clients.insert(id, session);
        self.pump();
        id
    }

    /// Delivers everything the server wants to send.
    fn pump(&mut self) {
        while let Some(t) = self.server.poll_transmit() {
            if let Message::Error(e) = &*t.message {
                self.errors_to.push((t.to, e.code));
            }
            if let Some(c) = self.clients.get_mut(&t.to) {
                let _ = c.handle_message((*t.message).clone());
            }
            if t.close {
                self.closed.push(t.to);
            }
        }
        while let Some(e) = self.server.poll_event() {
            self.events.push(e);
        }
    }

    /// Rounds each client has been asked to train: (client, round, model).
    fn train_requests(&mut self) -> Vec<(ClientId, u64, Vec<f32>)> {
        let mut out = Vec::new();
        for (&id, c) in &mut self.clients {
            while let Some(ev) = c.poll_event() {
                if let ClientEvent::Train {
                    round,
                    global_model,
                    ..
                } = ev
                {
                    out.push((id, round, global_model));
                }
            }
        }
        out
    }

    fn send_raw(&mut self, id: ClientId, m: Message) {
        self.server.handle_message(id, m, self.now);
        self.pump();
    }

    /// The client submits through its session (as a real client does).
    fn submit(&mut self, id: ClientId, round: u64, delta: Vec<f32>, n: u64) {
        let c = self.clients.get_mut(&id).unwrap();
        c.submit(
            Update {
                round,
                num_examples: n,
                train_loss: 0.5,
                delta,
            },
            Some(Evaluation {
                round,
                num_examples: n,
                loss: 1.0,
                scores: TaskScores::classification(0.5),
            }),
        )
        .unwrap();
        let msgs: Vec<Message> = std::iter::from_fn(|| c.poll_transmit()).collect();
        for m in msgs {
            self.server.handle_message(id, m, self.now);
        }
        self.pump();
    }

    fn completed(&self) -> Vec<&RoundSummary> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::RoundCompleted(s) => Some(s),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn fedavg_is_the_example_weighted_mean() {
    let mut h = Harness::new(cfg(2, 3, 1.0), 3);
    let reqs = h.train_requests();
    assert_eq!(reqs.len(), 3);
    let weights = [1u64, 2, 5];
    for (i, (id, round, model)) in reqs.into_iter().enumerate() {
        assert_eq!((round, model), (1, vec![0.0; D]));
        h.submit(id, 1, vec![i as f32; D], weights[i]);
    }
    let expected = (0.0 * 1.0 + 1.0 * 2.0 + 2.0 * 5.0) / 8.0;
    assert_eq!(h.server.global_model(), &[expected as f32; D]);
    let s = h.completed()[0];
    assert_eq!(s.total_examples, 8);
    assert_eq!(s.contributors.len(), 3);
    assert!(!s.timed_out);
    let eval = s.client_eval.unwrap();
    assert_eq!((eval.examples, eval.scores.accuracy), (8, Some(0.5)));

    // Round 2 starts only when the driver says so, from the new model.
    assert!(h.train_requests().is_empty());
    h.server.start_next_round(h.now);
    h.pump();
    let reqs = h.train_requests();
    assert!(
        reqs.iter()
            .all(|(_, r, m)| *r == 2 && m == &vec![expected as f32; D])
    );
    for (id, _, _) in reqs {
        h.submit(id, 2, vec![1.0; D], 1);
    }
    assert_eq!(h.server.rounds_completed(), 2);
    h.server.start_next_round(h.now);
    h.pump();
    assert!(h.server.is_finished());
    assert!(h.events.contains(&Event::Finished {
        rounds_completed: 2
    }));
    assert!(h.clients.values().all(|c| c.is_finished()));
}

#[test]
fn waits_for_min_clients() {
    let mut h = Harness::new(cfg(1, 3, 1.0), 2);
    assert!(h.train_requests().is_empty());
    assert_eq!(h.server.current_round(), None);
    h.join("late");
    assert_eq!(h.train_requests().len(), 3);
}

#[test]
fn bad_updates_are_refused_and_the_round_completes_with_the_rest() {
    let mut h = Harness::new(cfg(1, 4, 1.0), 4);
    let ids: Vec<ClientId> = h.train_requests().iter().map(|r| r.0).collect();
    h.submit(ids[0], 1, vec![1.0; D - 1], 5); // wrong length
    h.submit(ids[1], 1, vec![f32::NAN, 0.0, 0.0, 0.0], 5); // NaN
    h.submit(ids[2], 1, vec![f32::INFINITY; D], 5); // Inf
    assert_eq!(
        h.server.current_round(),
        Some(1),
        "still waiting for the good one"
    );
    h.submit(ids[3], 1, vec![2.0; D], 5);
    assert_eq!(
        h.errors_to,
        vec![
            (ids[0], ReasonCode::WrongLength),
            (ids[1], ReasonCode::NonFinite),
            (ids[2], ReasonCode::NonFinite)
        ]
    );
    let s = h.completed()[0];
    assert_eq!(s.contributors, vec![ids[3]]);
    assert_eq!(s.dropped, ids[..3].to_vec());
    assert_eq!(h.server.global_model(), &[2.0; D]);
    assert!(
        h.closed.is_empty(),
        "a bad update drops the client from the round, not the connection"
    );
}

#[test]
fn zero_or_huge_weights_are_refused() {
    let mut h = Harness::new(cfg(1, 2, 1.0), 2);
    let ids: Vec<ClientId> = h.train_requests().iter().map(|r| r.0).collect();
    h.send_raw(
        ids[0],
        Message::Update(Update {
            round: 1,
            num_examples: 0,
            train_loss: 0.0,
            delta: vec![1.0; D],
        }),
    );
    h.send_raw(
        ids[1],
        Message::Update(Update {
            round: 1,
            num_examples: 1001,
            train_loss: 0.0,
            delta: vec![1.0; D],
        }),
    );
    assert_eq!(
        h.errors_to,
        vec![
            (ids[0], ReasonCode::BadWeight),
            (ids[1], ReasonCode::BadWeight)
        ]
    );
    assert!(matches!(
        h.events.last(),
        Some(Event::RoundFailed { round: 1, .. })
    ));
    assert_eq!(
        h.server.global_model(),
        &[0.0; D],
        "a failed round leaves the model unchanged"
    );
}

#[test]
fn replayed_late_and_duplicate_updates_are_refused() {
    let mut h = Harness::new(cfg(3, 2, 1.0), 2);
    let ids: Vec<ClientId> = h.train_requests().iter().map(|r| r.0).collect();
    let update = |round| {
        Message::Update(Update {
            round,
            num_examples: 1,
            train_loss: 0.0,
            delta: vec![1.0; D],
        })
    };
    h.send_raw(ids[0], update(1));
    h.send_raw(ids[0], update(1)); // duplicate
    h.send_raw(ids[1], update(2)); // future round
    h.send_raw(ids[1], update(1));
    assert_eq!(h.server.rounds_completed(), 1);
    h.server.start_next_round(h.now);
    h.pump();
    h.send_raw(ids[0], update(1)); // replay of round 1 in round 2
    assert_eq!(
        h.errors_to,
        vec![
            (ids[0], ReasonCode::DuplicateUpdate),
            (ids[1], ReasonCode::StaleRound),
            (ids[0], ReasonCode::StaleRound)
        ]
    );
    assert_eq!(h.server.global_model(), &[1.0; D], "round 1 counted once");
}

#[test]
fn stragglers_time_out_and_late_updates_are_stale() {
    let mut h = Harness::new(cfg(2, 2, 1.0), 2);
    let ids: Vec<ClientId> = h.train_requests().iter().map(|r| r.0).collect();
    h.submit(ids[0], 1, vec![3.0; D], 1);
    let deadline = h.server.poll_timeout().unwrap();
    h.server.handle_timeout(deadline - Duration::from_millis(1));
    h.pump();
    assert!(h.completed().is_empty(), "not before the deadline");
    h.server.handle_timeout(deadline);
    h.pump();
    let s = h.completed()[0];
    assert!(s.timed_out);
    assert_eq!(s.dropped, vec![ids[1]]);
    assert_eq!(h.server.global_model(), &[3.0; D]);
    h.submit(ids[1], 1, vec![9.0; D], 1);
    assert_eq!(h.errors_to, vec![(ids[1], ReasonCode::StaleRound)]);
}

#[test]
fn a_client_that_leaves_mid_round_is_dropped() {
    let mut h = Harness::new(cfg(1, 2, 1.0), 2);
    let ids: Vec<ClientId> = h.train_requests().iter().map(|r| r.0).collect();
    h.submit(ids[0], 1, vec![1.0; D], 1);
    h.server.disconnect(ids[1], h.now);
    h.pump();
    let s = h.completed()[0];
    assert_eq!(
        (s.contributors.clone(), s.dropped.clone()),
        (vec![ids[0]], vec![ids[1]])
    );
}

#[test]
fn hello_is_checked_and_required_first() {
    let mut h = Harness::new(cfg(1, 5, 1.0), 0);
    // Another model.
    let id = h.server.connect();
    let mut other = spec();
    other.param_count = 5;
    h.send_raw(
        id,
        ClientSession::new("x", other, 1, rng())
            .poll_transmit()
            .unwrap(),
    );
    // An update before hello.
    let id2 = h.server.connect();
    h.send_raw(
        id2,
        Message::Update(Update {
            round: 1,
            num_examples: 1,
            train_loss: 0.0,
            delta: vec![0.0; D],
        }),
    );
    assert_eq!(
        h.errors_to,
        vec![
            (id, ReasonCode::ModelMismatch),
            (id2, ReasonCode::UnexpectedMessage)
        ]
    );
    assert_eq!(h.closed, vec![id, id2]);
    assert_eq!(h.server.admitted(), 0);
}

#[test]
fn an_authenticated_connection_must_say_its_own_name_and_only_once() {
    let mut h = Harness::new(cfg(1, 5, 1.0), 0);
    let who = |name: &str| {
        Some(super::PeerIdentity {
            name: name.into(),
            certificate: name.as_bytes().to_vec(),
        })
    };
    let hello = |name: &str| {
        ClientSession::new(name, spec(), 1, rng())
            .poll_transmit()
            .unwrap()
    };
    let liar = h.server.connect_as(who("alice"));
    h.send_raw(liar, hello("bob"));
    let first = h.server.connect_as(who("alice"));
    h.send_raw(first, hello("alice"));
    let second = h.server.connect_as(who("alice"));
    h.send_raw(second, hello("alice"));
    assert_eq!(
        h.errors_to,
        vec![
            (liar, ReasonCode::IdentityMismatch),
            (second, ReasonCode::AlreadyConnected)
        ]
    );
    assert_eq!(h.server.admitted(), 1);
    // Once the first connection is gone, the node may come back.
    h.server.disconnect(first, h.now);
    let again = h.server.connect_as(who("alice"));
    h.send_raw(again, hello("alice"));
    assert_eq!(h.server.admitted(), 1);
    assert_eq!(h.errors_to.len(), 2);
}

#[test]
fn server_full_is_refused() {
    let mut c = cfg(1, 1, 1.0);
    c.max_clients = 1;
    c.rounds = 0;
    let mut h = Harness::new(c, 0);
    h.join("a");
    h.join("b");
    assert!(
        h.errors_to
            .iter()
            .any(|&(_, code)| code == ReasonCode::ServerFull)
    );
}

#[test]
fn cohort_sampling_is_a_seeded_fraction() {
    let run = |seed| {
        let mut c = cfg(1, 10, 0.3);
        c.seed = seed;
        let mut h = Harness::new(c, 10);
        let mut ids: Vec<ClientId> = h.train_requests().iter().map(|r| r.0).collect();
        ids.sort();
        ids
    };
    let a = run(1);
    assert_eq!(a.len(), 3);
    assert_eq!(a, run(1));
    assert!(
        (2..20).any(|s| run(s) != a),
        "different seeds sample differently"
    );
    assert_eq!(cfg(1, 1, 0.1).cohort_size(100), 10);
    assert_eq!(cfg(1, 1, 0.1).cohort_size(3), 1);
}

#[test]
fn invalid_configs_are_refused() {
    let bad = [
        CoordinatorConfig {
            min_clients: 0,
            ..cfg(1, 1, 1.0)
        },
        CoordinatorConfig {
            fraction: 0.0,
            ..cfg(1, 1, 1.0)
        },
        CoordinatorConfig {
            fraction: 1.5,
            ..cfg(1, 1, 1.0)
        },
        CoordinatorConfig {
            round_timeout: Duration::ZERO,
            ..cfg(1, 1, 1.0)
        },
    ];
    for c in bad {
        assert!(Coordinator::new(c, spec(), vec![0.0; D], 1).is_err());
    }
    assert!(Coordinator::new(cfg(1, 1, 1.0), spec(), vec![0.0; 3], 1).is_err());
}

#[test]
fn client_refuses_replayed_rounds_and_wrong_models() {
    let mut c = ClientSession::new("n", spec(), 1, rng());
    c.poll_transmit();
    let start = |round, len| {
        Message::RoundStart(crate::wire::RoundStart {
            round,
            config: cfg(1, 1, 1.0).round,
            global_model: vec![0.0; len],
        })
    };
    assert_eq!(
        c.handle_message(start(1, D)),
        Err(SessionError::Unexpected("round-start"))
    );
    c.handle_message(Message::Welcome(crate::wire::Welcome {
        version: crate::wire::PROTOCOL_VERSION,
        client_id: 3,
        model: spec(),
    }))
    .unwrap();
    c.handle_message(start(2, D)).unwrap();
    assert_eq!(
        c.handle_message(start(2, D)),
        Err(SessionError::StaleRound { got: 2, last: 2 })
    );
    assert!(matches!(
        c.handle_message(start(3, D + 1)),
        Err(SessionError::WrongModelLength { .. })
    ));
    // Round 3 supersedes round 2: a late result for round 2 is not sent.
    c.handle_message(start(3, D)).unwrap();
    let update = |round| Update {
        round,
        num_examples: 1,
        train_loss: 0.0,
        delta: vec![0.0; D],
    };
    assert_eq!(c.submit(update(2), None), Err(SessionError::NotTraining(2)));
    c.submit(update(3), None).unwrap();
    assert!(matches!(c.poll_transmit(), Some(Message::Update(u)) if u.round == 3));
}

#[test]
fn client_reports_refusal_before_welcome() {
    let mut c = ClientSession::new("n", spec(), 1, rng());
    let err = c
        .handle_message(Message::error(ReasonCode::ModelMismatch, "other model"))
        .unwrap_err();
    assert!(matches!(
        err,
        SessionError::Refused {
            code: ReasonCode::ModelMismatch,
            ..
        }
    ));
    assert!(c.is_finished());
}

/// Routes messages both ways until nothing moves; collects train requests.
fn settle(h: &mut Harness) -> Vec<(ClientId, u64, Vec<f32>)> {
    let mut trains = Vec::new();
    loop {
        h.pump();
        trains.extend(h.train_requests());
        let mut moved = false;
        let ids: Vec<ClientId> = h.clients.keys().copied().collect();
        for id in ids {
            let msgs: Vec<Message> =
                std::iter::from_fn(|| h.clients.get_mut(&id).unwrap().poll_transmit()).collect();
            for m in msgs {
                moved = true;
                h.server.handle_message(id, m, h.now);
            }
        }
        if !moved {
            h.pump();
            trains.extend(h.train_requests());
            return trains;
        }
    }
}

fn secure_cfg(n: usize) -> CoordinatorConfig {
    let mut c = cfg(1, n, 1.0);
    c.round.secure_aggregation = true;
    c.secagg = Some(SecAggConfig {
        clip: 4.0,
        ..SecAggConfig::default()
    });
    c
}

fn submit_secure(h: &mut Harness, id: ClientId, round: u64, delta: Vec<f32>, n: u64) {
    h.clients
        .get_mut(&id)
        .unwrap()
        .submit(
            Update {
                round,
                num_examples: n,
                train_loss: 0.5,
                delta,
            },
            None,
        )
        .unwrap();
}

#[test]
fn secure_round_yields_the_weighted_mean_without_plain_updates() {
    let mut h = Harness::new(secure_cfg(5), 5);
    let trains = settle(&mut h);
    assert_eq!(trains.len(), 5, "training starts after the key exchange");
    let mut expected = [0.0f64; D];
    let mut total = 0.0;
    for (i, (id, round, _)) in trains.iter().enumerate() {
        let delta: Vec<f32> = (0..D)
            .map(|j| (i as f32 - 2.0) * 0.3 + j as f32 * 0.1)
            .collect();
        let n = 100 * (i as u64 + 1);
        for (e, d) in expected.iter_mut().zip(&delta) {
            *e += n as f64 * f64::from(*d);
        }
        total += n as f64;
        submit_secure(&mut h, *id, *round, delta, n);
    }
    settle(&mut h);
    let s = h.completed()[0].clone();
    assert!(s.secure);
    assert_eq!(s.contributors.len(), 5);
    assert_eq!(s.total_examples, 1500);
    assert!(s.train_loss.is_none() && s.client_eval.is_none());
    for (j, (sum, got)) in expected.iter().zip(h.server.global_model()).enumerate() {
        let want = sum / total;
        assert!((f64::from(*got) - want).abs() < 1e-5, "{j}");
    }
    assert!(
        !h.events
            .iter()
            .any(|e| matches!(e, Event::UpdateAccepted { .. })),
        "no plain update reached the server"
    );
}

#[test]
fn secure_round_survives_a_client_that_leaves_before_its_masked_input() {
    let mut h = Harness::new(secure_cfg(6), 6);
    let trains = settle(&mut h);
    let gone = trains[0].0;
    h.server.disconnect(gone, h.now);
    h.clients.remove(&gone);
    for (id, round, _) in &trains[1..] {
        submit_secure(&mut h, *id, *round, vec![1.0; D], 10);
    }
    settle(&mut h);
    let s = h.completed()[0].clone();
    assert_eq!((s.contributors.len(), s.dropped.clone()), (5, vec![gone]));
    for v in h.server.global_model() {
        assert!((v - 1.0).abs() < 1e-5, "{v}");
    }
    // Each stage is reported as it opens, with who it waits on.
    let stages: Vec<(&str, usize)> = h
        .events
        .iter()
        .filter_map(|e| match e {
            Event::SecAggStage { stage, pending, .. } => Some((stage.name(), *pending)),
            _ => None,
        })
        .collect();
    assert_eq!(
        stages,
        [
            ("share-keys", 6),
            ("masked-input", 6),
            ("consistency-check", 5),
            ("unmask", 5)
        ]
    );
}

#[test]
fn secure_round_aborts_cleanly_when_too_few_stay() {
    let mut h = Harness::new(secure_cfg(4), 4);
    let trains = settle(&mut h);
    for (id, _, _) in &trains[..2] {
        h.server.disconnect(*id, h.now);
        h.clients.remove(id);
    }
    for (id, round, _) in &trains[2..] {
        submit_secure(&mut h, *id, *round, vec![1.0; D], 10);
    }
    settle(&mut h);
    assert!(h.completed().is_empty());
    assert!(h.events.iter().any(|e| matches!(e, Event::RoundFailed { reason, .. } if reason.contains("secure aggregation aborted"))));
    assert_eq!(h.server.global_model(), &[0.0; D], "model unchanged");
}

#[test]
fn secure_stage_timeout_drops_the_silent() {
    let mut h = Harness::new(secure_cfg(6), 6);
    let trains = settle(&mut h);
    // One client never sends its masked input.
    for (id, round, _) in &trains[1..] {
        submit_secure(&mut h, *id, *round, vec![2.0; D], 10);
    }
    settle(&mut h);
    assert!(h.completed().is_empty());
    let deadline = h.server.poll_timeout().unwrap();
    h.server.handle_timeout(deadline);
    settle(&mut h);
    let s = h.completed()[0].clone();
    assert_eq!(s.contributors.len(), 5);
    assert!(s.timed_out);
}

use crate::secagg::tests::TagAttestor;

#[test]
fn secagg_keys_signed_with_another_nodes_certificate_are_refused() {
    let n = 6;
    let mut h = Harness::new(secure_cfg(n), 0);
    let mut ids = Vec::new();
    for i in 0..n {
        let name = format!("node-{i}");
        let id = h.server.connect_as(Some(super::PeerIdentity {
            name: name.clone(),
            certificate: name.as_bytes().to_vec(),
        }));
        // The last node signs its keys with node-0's certificate.
        let certificate = if i == n - 1 {
            b"node-0".to_vec()
        } else {
            name.as_bytes().to_vec()
        };
        let attestor = std::sync::Arc::new(TagAttestor {
            name: name.clone(),
            certificate,
        });
        let mut session = ClientSession::new(&name, spec(), 10, rng()).with_attestor(attestor);
        while let Some(m) = session.poll_transmit() {
            h.server.handle_message(id, m, h.now);
        }
        h.clients.insert(id, session);
        h.pump();
        ids.push(id);
    }
    let trains = settle(&mut h);
    assert!(
        h.errors_to
            .contains(&(ids[n - 1], ReasonCode::SecAggViolation))
    );
    assert_eq!(trains.len(), n - 1, "the others go on");
    for (id, round, _) in &trains {
        submit_secure(&mut h, *id, *round, vec![1.0; D], 10);
    }
    settle(&mut h);
    let s = h.completed()[0];
    assert_eq!(s.contributors.len(), n - 1);
    assert!(!s.contributors.contains(&ids[n - 1]));
}

/// An attestor that signs like `inner` but spoils its key signature, its
/// survivor-set signature, or both: a node whose signatures do not verify.
#[derive(Debug)]
struct SpoiledSigner {
    inner: TagAttestor,
    keys: bool,
    survivors: bool,
}

impl crate::secagg::KeyAttestor for SpoiledSigner {
    fn attest(&self, round: u64, keys: &crate::wire::PeerKeys) -> crate::wire::KeyAttestation {
        let mut a = self.inner.attest(round, keys);
        if self.keys {
            a.signature[0] ^= 1;
        }
        a
    }
    fn verify(
        &self,
        round: u64,
        keys: &crate::wire::PeerKeys,
    ) -> Result<String, crate::secagg::AttestationError> {
        self.inner.verify(round, keys)
    }
    fn sign_survivors(&self, message: &[u8]) -> Vec<u8> {
        let mut s = self.inner.sign_survivors(message);
        if self.survivors {
            s[0] ^= 1;
        }
        s
    }
    fn verify_survivors(
        &self,
        certificate: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), crate::secagg::AttestationError> {
        self.inner.verify_survivors(certificate, message, signature)
    }
    fn identity(&self) -> &str {
        self.inner.identity()
    }
}

/// Enrolled nodes, the last of which signs through `last`.
fn signed_harness(
    n: usize,
    last: impl FnOnce(TagAttestor) -> Arc<dyn crate::secagg::KeyAttestor>,
) -> (Harness, Vec<ClientId>) {
    let server = Coordinator::builder(secure_cfg(n), spec())
        .verify_signatures(Arc::new(crate::secagg::tests::TagCheck))
        .start(vec![0.0; D])
        .unwrap();
    let mut h = Harness::with_server(server, 0);
    let mut last = Some(last);
    let mut ids = Vec::new();
    for i in 0..n {
        let name = format!("node-{i}");
        let id = h.server.connect_as(Some(super::PeerIdentity {
            name: name.clone(),
            certificate: name.as_bytes().to_vec(),
        }));
        let honest = TagAttestor {
            name: name.clone(),
            certificate: name.as_bytes().to_vec(),
        };
        let attestor: Arc<dyn crate::secagg::KeyAttestor> = if i == n - 1 {
            (last.take().unwrap())(honest)
        } else {
            Arc::new(honest)
        };
        let mut session = ClientSession::new(&name, spec(), 10, rng()).with_attestor(attestor);
        while let Some(m) = session.poll_transmit() {
            h.server.handle_message(id, m, h.now);
        }
        h.clients.insert(id, session);
        h.pump();
        ids.push(id);
    }
    (h, ids)
}

/// The server checks each key signature itself: a node whose signature
/// does not verify is dropped at once, and the round completes with the
/// others (before, each neighbour refused its keys and left the round).
#[test]
fn keys_whose_signature_does_not_verify_cost_only_their_node() {
    let n = 6;
    let (mut h, ids) = signed_harness(n, |inner| {
        Arc::new(SpoiledSigner {
            inner,
            keys: true,
            survivors: false,
        })
    });
    let trains = settle(&mut h);
    assert!(
        h.errors_to
            .contains(&(ids[n - 1], ReasonCode::SecAggViolation))
    );
    assert_eq!(trains.len(), n - 1, "the others go on");
    for (id, round, _) in &trains {
        submit_secure(&mut h, *id, *round, vec![1.0; D], 10);
    }
    settle(&mut h);
    let completed = h.completed();
    assert_eq!(completed.len(), 1, "{:?}", failures(&h));
    assert_eq!(completed[0].contributors.len(), n - 1);
    assert!(!completed[0].contributors.contains(&ids[n - 1]));
}

/// A survivor whose consistency-check signature does not verify is left
/// out of the unmask requests by the server: its neighbours still count t
/// valid signatures, and the round completes with its input in the sum.
#[test]
fn a_bad_survivor_signature_is_left_out_by_the_server() {
    let n = 6;
    let (mut h, ids) = signed_harness(n, |inner| {
        Arc::new(SpoiledSigner {
            inner,
            keys: false,
            survivors: true,
        })
    });
    let trains = settle(&mut h);
    assert_eq!(trains.len(), n);
    for (id, round, _) in &trains {
        submit_secure(&mut h, *id, *round, vec![1.0; D], 10);
    }
    settle(&mut h);
    assert!(
        h.errors_to
            .contains(&(ids[n - 1], ReasonCode::SecAggViolation))
    );
    let completed = h.completed();
    assert_eq!(completed.len(), 1, "{:?}", failures(&h));
    for v in h.server.global_model() {
        assert!((v - 1.0).abs() < 1e-5, "{v}");
    }
}

#[test]
fn plain_updates_are_refused_in_secure_rounds() {
    let mut h = Harness::new(secure_cfg(3), 3);
    let trains = settle(&mut h);
    h.send_raw(
        trains[0].0,
        Message::Update(Update {
            round: trains[0].1,
            num_examples: 1,
            train_loss: 0.0,
            delta: vec![0.0; D],
        }),
    );
    assert_eq!(
        h.errors_to,
        vec![(trains[0].0, ReasonCode::UnexpectedMessage)]
    );
}

// ---- Differential privacy -------------------------------------------------

use crate::dp::{DpConfig, DpPlan, DpRound, Mechanism, NoiseLevel};

fn dp_plan(
    mechanism: Mechanism,
    z: f64,
    population: usize,
    q: f64,
    rounds: u64,
    budget: Option<f64>,
    min_contributors: Option<usize>,
) -> DpPlan {
    DpConfig {
        mechanism,
        clip_norm: 1.0,
        noise: NoiseLevel::NoiseMultiplier(z),
        delta: 1e-5,
        planned_rounds: rounds,
        budget,
        min_contributors,
        adaptive: None,
    }
    .plan(
        q,
        population,
        D,
        population,
        mechanism == Mechanism::Distributed,
    )
    .unwrap()
}

#[test]
fn central_dp_clips_unweights_noises_and_divides_by_the_expected_cohort() {
    let mut c = cfg(1, 4, 1.0);
    c.dp = Some(dp_plan(Mechanism::Central, 1e-4, 4, 1.0, 1, None, None));
    let mut h = Harness::new(c, 4);
    let reqs = h.train_requests();
    assert_eq!(reqs.len(), 4);
    // One client bypasses its session: the server clips it anyway.
    let (rogue, _, _) = reqs[0];
    h.send_raw(
        rogue,
        Message::Update(Update {
            round: 1,
            num_examples: 1000,
            train_loss: 0.1,
            delta: vec![3.0, 4.0, 0.0, 0.0],
        }),
    );
    for (id, round, _) in &reqs[1..] {
        h.submit(*id, *round, vec![0.1, 0.0, 0.0, 0.0], 500);
    }
    let s = h.completed()[0].clone();
    assert_eq!(s.contributors.len(), 4);
    assert_eq!(s.total_examples, 4, "unweighted under DP");
    assert!(
        s.train_loss.is_none() && s.client_eval.is_none(),
        "no un-noised per-client release"
    );
    assert!(s.epsilon.unwrap() > 0.0);
    let want = [(0.6 + 0.3) / 4.0, 0.8 / 4.0, 0.0, 0.0];
    for (g, w) in h.server.global_model().iter().zip(want) {
        assert!((f64::from(*g) - w).abs() < 1e-3, "{g} vs {w}");
    }
    assert_ne!(h.server.global_model()[2], 0.0, "the server added noise");
}

#[test]
fn the_budget_stops_the_run_before_a_round_that_would_exceed_it() {
    let probe = dp_plan(Mechanism::Central, 2.0, 3, 1.0, 10, None, None);
    let budget = probe.epsilon_after(2) * 1.000_001;
    let mut c = cfg(10, 3, 1.0);
    c.dp = Some(dp_plan(
        Mechanism::Central,
        2.0,
        3,
        1.0,
        10,
        Some(budget),
        None,
    ));
    let mut h = Harness::new(c, 3);
    for _ in 0..10 {
        let reqs = h.train_requests();
        if reqs.is_empty() {
            break;
        }
        for (id, round, _) in reqs {
            h.submit(id, round, vec![0.0; D], 1);
        }
        h.server.start_next_round(h.now);
        h.pump();
    }
    assert_eq!(h.server.rounds_completed(), 2);
    assert!(h.server.is_finished());
    let exhausted = h
        .events
        .iter()
        .find_map(|e| match e {
            Event::BudgetExhausted(x) => Some(x.clone()),
            _ => None,
        })
        .expect("budget event");
    assert_eq!(exhausted.round, 3);
    assert!(exhausted.would_be > budget && exhausted.spent <= budget);
    let ledger = h.server.ledger().unwrap();
    assert_eq!(ledger.rounds_charged(), 2);
    assert!(ledger.epsilon() <= budget);
    assert!(h.clients.values().all(|c| c.is_finished()), "goodbye sent");
}

#[test]
fn dp_cohorts_are_poisson_sampled() {
    let mut c = cfg(40, 40, 0.5);
    c.dp = Some(dp_plan(
        Mechanism::Central,
        1.0,
        40,
        0.5,
        40,
        Some(1e6),
        None,
    ));
    let mut h = Harness::new(c, 40);
    let mut sizes = Vec::new();
    for _ in 0..40 {
        let reqs = h.train_requests();
        sizes.push(reqs.len());
        for (id, round, _) in reqs {
            h.submit(id, round, vec![0.0; D], 1);
        }
        h.server.start_next_round(h.now);
        h.pump();
    }
    let mean = sizes.iter().sum::<usize>() as f64 / sizes.len() as f64;
    // Binomial(40, 0.5): mean 20, sd 3.2; the mean of 40 rounds has sd 0.5.
    assert!((mean - 20.0).abs() < 2.5, "mean cohort {mean}: {sizes:?}");
    assert!(
        sizes.iter().any(|&s| s != sizes[0]),
        "cohort sizes vary: {sizes:?}"
    );
}

/// Central DP without secure aggregation runs every sampled round, an
/// empty Poisson cohort too: the server's noise alone moves the model, the
/// round is charged, and whether a round runs never hinges on one client
/// (before, an empty cohort was skipped uncharged).
#[test]
fn central_dp_runs_and_charges_an_empty_poisson_cohort() {
    let mut c = cfg(3, 3, 0.01);
    c.dp = Some(dp_plan(
        Mechanism::Central,
        1.0,
        10_000,
        0.01,
        3,
        Some(100.0),
        None,
    ));
    assert_eq!(c.dp.as_ref().unwrap().min_cohort, 0);
    // Three clients at 1%: the first cohort is empty for most seeds.
    for seed in 0..16 {
        let server = Coordinator::builder(c.clone(), spec())
            .secret_seed(seed)
            .start(vec![0.0; D])
            .unwrap();
        let mut h = Harness::with_server(server, 3);
        settle(&mut h);
        let Some(s) = h.completed().first().map(|s| (*s).clone()) else {
            continue;
        };
        assert!(s.contributors.is_empty(), "{s:?}");
        assert!(failures(&h).is_empty());
        assert!(
            h.server.global_model().iter().any(|v| *v != 0.0),
            "noise applied"
        );
        let ledger = h.server.ledger().unwrap();
        assert_eq!(ledger.rounds_charged(), 1);
        assert_eq!(ledger.gate, 0.0);
        return;
    }
    panic!("no seed drew an empty first cohort");
}

/// Rounds that need a cohort of some size (here SecAgg+'s three) skip a
/// smaller Poisson cohort, and the skip is charged, with the probability
/// that one client decided it (before, skipped rounds were not charged,
/// which raised the sampling rate the accountant assumed).
#[test]
fn a_skipped_round_is_charged_with_its_gate() {
    // 300 clients sampled at 1%: a cohort under three (skipped) about
    // two times in five; seeds are tried until the first round skips.
    let n = 300;
    let mut c = secure_cfg(n);
    c.fraction = 0.01;
    c.max_clients = n;
    // Whether a round of 300 at 1% runs hinges on one client with
    // probability 2e-3: a delta of 0.1 absorbs it, 1e-5 would not (the run
    // would stop at its budget instead).
    c.dp = Some(
        DpConfig {
            mechanism: Mechanism::Central,
            clip_norm: 1.0,
            noise: NoiseLevel::NoiseMultiplier(1.0),
            delta: 0.1,
            planned_rounds: 3,
            budget: Some(100.0),
            min_contributors: None,
            adaptive: None,
        }
        .plan(0.01, 10_000, D, n, true)
        .unwrap(),
    );
    let plan = c.dp.clone().unwrap();
    for seed in 0..64 {
        let server = Coordinator::builder(c.clone(), spec())
            .secret_seed(seed)
            .start(vec![0.0; D])
            .unwrap();
        let mut h = Harness::with_server(server, n);
        settle(&mut h);
        if !failures(&h)
            .iter()
            .any(|r| r.contains("skipped (and charged"))
        {
            continue;
        }
        let ledger = h.server.ledger().unwrap();
        assert_eq!(ledger.rounds_charged(), 1);
        let gate = crate::dp::gate::per_round(n, 0.01, MIN_SECAGG_COHORT);
        assert!(
            gate > 0.0 && (ledger.gate - gate).abs() < 1e-18,
            "{}",
            ledger.gate
        );
        // The epsilon reported takes the gate out of delta.
        let gated = crate::dp::gate::epsilon(&plan.orders, &plan.rdp_per_round, 0.1, gate);
        assert_eq!(ledger.epsilon(), gated);
        return;
    }
    panic!("no seed skipped the first round");
}

#[test]
fn local_dp_noise_is_added_on_the_client() {
    let mut c = cfg(1, 3, 1.0);
    c.dp = Some(dp_plan(Mechanism::Local, 1.0, 3, 1.0, 1, None, None));
    let mut h = Harness::new(c, 3);
    for (id, round, _) in h.train_requests() {
        h.submit(id, round, vec![0.0; D], 50);
    }
    let s = h.completed()[0].clone();
    assert_eq!(s.total_examples, 3);
    // Each client added N(0, (2 z C)^2) = N(0, 4): the mean is far from 0.
    assert!(h.server.global_model().iter().any(|v| v.abs() > 1e-3));
}

#[test]
fn distributed_dp_sums_noised_integers_under_secagg() {
    let n = 5;
    let mut c = secure_cfg(n);
    c.dp = Some(dp_plan(
        Mechanism::Distributed,
        1e-3,
        n,
        1.0,
        1,
        None,
        Some(3),
    ));
    let mut h = Harness::new(c, n);
    let trains = settle(&mut h);
    assert_eq!(trains.len(), n);
    let mut sum = [0.0f64; D];
    for (i, (id, round, _)) in trains.iter().enumerate() {
        let delta = vec![0.1 * i as f32, -0.2, 0.3, 0.0];
        for (s, d) in sum.iter_mut().zip(&delta) {
            *s += f64::from(*d);
        }
        submit_secure(&mut h, *id, *round, delta, 1000);
    }
    settle(&mut h);
    let s = h.completed()[0].clone();
    assert!(s.secure && s.epsilon.is_some());
    for (g, want) in h
        .server
        .global_model()
        .iter()
        .zip(sum.map(|x| x / n as f64))
    {
        // Noise std z * C / n = 2e-4 per value; rounding is ~1e-8.
        assert!((f64::from(*g) - want).abs() < 2e-3, "{g} vs {want}");
    }
}

#[test]
fn distributed_dp_aborts_before_unmasking_too_few_contributors() {
    // Six sampled, five needed: no single node decides whether it runs.
    let n = 6;
    let mut c = secure_cfg(n);
    c.dp = Some(dp_plan(
        Mechanism::Distributed,
        1.0,
        n,
        1.0,
        1,
        None,
        Some(5),
    ));
    let mut h = Harness::new(c, n);
    let trains = settle(&mut h);
    // Two leave before masking: 4 inputs would satisfy SecAgg's own t + 1,
    // but not the 5 the noise is calibrated to.
    for (id, _, _) in &trains[..2] {
        h.server.disconnect(*id, h.now);
        h.clients.remove(id);
    }
    for (id, round, _) in &trains[2..] {
        submit_secure(&mut h, *id, *round, vec![0.5; D], 10);
    }
    settle(&mut h);
    assert!(h.completed().is_empty());
    assert!(
        h.events.iter().any(
            |e| matches!(e, Event::RoundFailed { reason, .. } if reason.contains("at least 5"))
        ),
        "{:?}",
        h.events
    );
    assert_eq!(h.server.global_model(), &[0.0; D], "model unchanged");
}

/// A client session the server has admitted as client 1, its hello sent
/// and its admission event taken.
fn welcomed_session() -> ClientSession {
    let mut c = ClientSession::new("n", spec(), 10, rng());
    c.poll_transmit();
    c.handle_message(Message::Welcome(crate::wire::Welcome {
        version: crate::wire::PROTOCOL_VERSION,
        client_id: 1,
        model: spec(),
    }))
    .unwrap();
    c.poll_event();
    c
}

#[test]
fn client_refuses_distributed_dp_without_secure_aggregation() {
    let mut c = welcomed_session();
    let plan = dp_plan(Mechanism::Distributed, 1.0, 5, 1.0, 1, None, None);
    let mut config = cfg(1, 1, 1.0).round;
    config.dp = Some(plan.round.clone());
    assert!(matches!(plan.round, DpRound::Distributed { .. }));
    c.handle_message(Message::RoundStart(crate::wire::RoundStart {
        round: 1,
        config,
        global_model: vec![0.0; D],
    }))
    .unwrap();
    c.submit(
        Update {
            round: 1,
            num_examples: 1,
            train_loss: 0.0,
            delta: vec![0.1; D],
        },
        None,
    )
    .unwrap();
    // The node leaves the round, says so, and sends nothing of the update.
    assert_eq!(
        std::iter::from_fn(|| c.poll_event()).last(),
        Some(ClientEvent::RoundLeft {
            round: 1,
            reason: SessionError::DistributedDpInTheClear(1)
        })
    );
    assert!(matches!(
        c.poll_transmit(),
        Some(Message::Error(e)) if e.code == ReasonCode::LeftRound
    ));
    assert!(c.poll_transmit().is_none(), "no update sent");
    assert_eq!(c.updates_sent(), 0);
}

/// A fault in one round (here, a setup from the server that would not
/// protect the node) makes the node leave that round and tell the server;
/// the session is not ended, and the next round trains as usual.
#[test]
fn a_round_level_fault_leaves_the_round_and_the_run_goes_on() {
    use crate::secagg::client::{ClientError as SecAggError, SetupError};
    use crate::wire::{SecAgg, SecAggParams, SecAggSetup};
    let mut c = welcomed_session();
    let mut config = cfg(1, 1, 1.0).round;
    config.secure_aggregation = true;
    let start = |round, config| {
        Message::RoundStart(crate::wire::RoundStart {
            round,
            config,
            global_model: vec![0.0; D],
        })
    };
    c.handle_message(start(1, config.clone())).unwrap();
    let setup = SecAggSetup {
        params: SecAggParams {
            threshold: 1,
            degree: 2,
            bits: 32,
            clip: 1.0,
            max_weight: 100,
            max_cohort: 3,
            min_survivors: 0,
        },
        neighbours: vec![2, 3],
    };
    c.handle_message(Message::SecAgg(SecAgg::Setup { round: 1, setup }))
        .expect("a round-level fault does not end the session");
    assert_eq!(
        c.poll_event(),
        Some(ClientEvent::RoundLeft {
            round: 1,
            reason: SessionError::SecAgg {
                round: 1,
                source: SecAggError::UnsafeSetup(SetupError::ThresholdBelowMinimum(1)),
            },
        })
    );
    let Some(Message::Error(told)) = c.poll_transmit() else {
        panic!("the server is told")
    };
    assert_eq!(told.code, ReasonCode::LeftRound);
    assert!(told.detail.contains("round 1"), "{}", told.detail);
    assert!(c.poll_transmit().is_none(), "no keys advertised");
    // Round 2, in the clear: the node trains and sends its update.
    config.secure_aggregation = false;
    c.handle_message(start(2, config)).unwrap();
    assert!(matches!(
        c.poll_event(),
        Some(ClientEvent::Train { round: 2, .. })
    ));
    c.submit(
        Update {
            round: 2,
            num_examples: 1,
            train_loss: 0.0,
            delta: vec![0.1; D],
        },
        None,
    )
    .unwrap();
    assert!(matches!(c.poll_transmit(), Some(Message::Update(u)) if u.round == 2));
    assert_eq!(c.updates_sent(), 1);
    // Local training can fail too: the node leaves that round the same way.
    c.handle_message(start(3, cfg(1, 1, 1.0).round)).unwrap();
    c.poll_event();
    c.abandon(3, "out of memory").unwrap();
    assert!(matches!(
        c.poll_event(),
        Some(ClientEvent::RoundLeft {
            round: 3,
            reason: SessionError::Training { .. }
        })
    ));
    assert_eq!(c.abandon(3, "again"), Err(SessionError::NotTraining(3)));
}

#[test]
fn a_restored_ledger_continues_and_a_spent_one_is_refused() {
    let plan = dp_plan(Mechanism::Central, 1.0, 3, 1.0, 10, None, None);
    let mut c = cfg(10, 3, 1.0);
    c.dp = Some(plan.clone());
    let mut spent = plan.ledger();
    for round in 1..=3 {
        spent.charge(round, &plan.rdp_per_round, 0.0).unwrap();
    }
    let mut server = Coordinator::new(c.clone(), spec(), vec![0.0; D], 4).unwrap();
    server.restore_ledger(spent.clone()).unwrap();
    assert_eq!(server.ledger().unwrap().rounds_charged(), 3);
    // A ledger that already reached this run's budget: refused up front.
    let mut tight = c.clone();
    tight.dp = Some(dp_plan(
        Mechanism::Central,
        1.0,
        3,
        1.0,
        10,
        Some(spent.epsilon()),
        None,
    ));
    let mut server = Coordinator::new(tight, spec(), vec![0.0; D], 4).unwrap();
    let err = server.restore_ledger(spent.clone()).unwrap_err();
    assert!(err.to_string().contains("already spent"), "{err}");
    // Another delta: refused.
    let mut other = c;
    let mut cfg_other = plan.config.clone();
    cfg_other.delta = 1e-6;
    other.dp = Some(cfg_other.plan(1.0, 3, D, 3, false).unwrap());
    let mut server = Coordinator::new(other, spec(), vec![0.0; D], 4).unwrap();
    assert!(server.restore_ledger(spent).is_err());
}

#[test]
fn a_client_that_reports_an_error_leaves_the_round_without_a_timeout() {
    let mut h = Harness::new(cfg(1, 3, 1.0), 3);
    let reqs = h.train_requests();
    let (failing, _, _) = reqs[0];
    h.send_raw(
        failing,
        Message::error(ReasonCode::Internal, "round 1: training diverged"),
    );
    for (id, round, _) in &reqs[1..] {
        h.submit(*id, *round, vec![1.0; D], 10);
    }
    // Completed at once, not at the round timeout.
    let s = h.completed()[0].clone();
    assert_eq!(
        (s.contributors.len(), s.dropped.clone()),
        (2, vec![failing])
    );
    assert!(!s.timed_out);
    // The same in a secure round: the failing client is dropped from its stage.
    let mut h = Harness::new(secure_cfg(4), 4);
    let trains = settle(&mut h);
    let (failing, _, _) = trains[0];
    h.clients.remove(&failing);
    h.send_raw(
        failing,
        Message::error(ReasonCode::Internal, "round 1: training diverged"),
    );
    for (id, round, _) in &trains[1..] {
        submit_secure(&mut h, *id, *round, vec![1.0; D], 10);
    }
    settle(&mut h);
    let s = h.completed()[0].clone();
    assert_eq!(s.contributors.len(), 3);
    assert!(!s.timed_out);
}

fn adaptive_plan(
    mechanism: Mechanism,
    n: usize,
    rounds: u64,
    min_contributors: Option<usize>,
) -> DpPlan {
    DpConfig {
        mechanism,
        clip_norm: 1.0,
        noise: NoiseLevel::NoiseMultiplier(1e-3),
        delta: 1e-5,
        planned_rounds: rounds,
        budget: Some(1e12),
        min_contributors,
        adaptive: Some(crate::dp::AdaptiveClipping {
            count_noise_std: Some(1e-3),
            ..Default::default()
        }),
    }
    .plan(1.0, n, D, n, mechanism == Mechanism::Distributed)
    .unwrap()
}

/// Runs one round in which clients `0..clipped` send norm-5 updates (clipped
/// at a bound of 1) and the rest norm-0.5 ones.
fn adaptive_round(h: &mut Harness, clipped: usize, secure: bool) {
    let trains = if secure {
        settle(h)
    } else {
        h.train_requests()
    };
    for (i, (id, round, _)) in trains.iter().enumerate() {
        let delta = if i < clipped {
            vec![3.0, 4.0, 0.0, 0.0]
        } else {
            vec![0.3, 0.4, 0.0, 0.0]
        };
        if secure {
            submit_secure(h, *id, *round, delta, 1);
        } else {
            h.submit(*id, *round, delta, 1);
        }
    }
    if secure {
        settle(h);
    }
}

#[test]
fn adaptive_clipping_moves_the_bound_by_the_noised_indicator_sum() {
    // Central DP, plain aggregation: 3 of 4 clipped, so b = 0.25 and the
    // bound grows by exp(-0.2 * (0.25 - 0.5)) = exp(0.05).
    let mut c = cfg(3, 4, 1.0);
    c.dp = Some(adaptive_plan(Mechanism::Central, 4, 3, None));
    let mut h = Harness::new(c, 4);
    adaptive_round(&mut h, 3, false);
    let after_one = h.server.clip_norm().unwrap();
    assert!((after_one - 0.05f64.exp()).abs() < 1e-3, "{after_one}");
    h.server.start_next_round(h.now);
    h.pump();
    // All within the bound: b = 1, the bound shrinks by exp(-0.1).
    adaptive_round(&mut h, 0, false);
    let after_two = h.server.clip_norm().unwrap();
    assert!(
        (after_two - after_one * (-0.1f64).exp()).abs() < 1e-3,
        "{after_two}"
    );
    let bounds: Vec<f64> = h.completed().iter().map(|s| s.clip_norm.unwrap()).collect();
    assert_eq!(bounds[0], 1.0);
    assert_eq!(bounds[1], after_one, "round 2 used the moved bound");
    // The global model holds the clipped updates' mean: round 1 has three
    // (0.6, 0.8) and one (0.3, 0.4), over 4.
    let g = h.server.global_model();
    let first = (3.0 * 0.6 + 0.3) / 4.0;
    let second = 0.3;
    assert!((f64::from(g[0]) - first - second).abs() < 1e-2, "{g:?}");
}

#[test]
fn adaptive_clipping_under_distributed_dp_reads_the_indicator_from_the_masked_sum() {
    let n = 5;
    let mut c = secure_cfg(n);
    c.dp = Some(adaptive_plan(Mechanism::Distributed, n, 1, Some(3)));
    let mut h = Harness::new(c, n);
    // 4 of 5 clipped: b = 0.2, the bound grows by exp(0.06).
    adaptive_round(&mut h, 4, true);
    let s = h.completed()[0].clone();
    assert!(s.secure && s.contributors.len() == n);
    let next = h.server.clip_norm().unwrap();
    assert!((next - 0.06f64.exp()).abs() < 1e-2, "{next}");
    let mean0 = (4.0 * 0.6 + 0.3) / 5.0;
    assert!((f64::from(h.server.global_model()[0]) - mean0).abs() < 1e-2);
}

// ---- Durable state ----------------------------------------------------------

use crate::round::server::{Checkpoint, Durable};
use crate::server_opt::{ServerOptimizerConfig, ServerOptimizerKind};

fn checkpoints(h: &mut Harness) -> Vec<Checkpoint> {
    std::iter::from_fn(|| h.server.poll_durable())
        .filter_map(|d| match d {
            Durable::Checkpoint(c) => Some(*c),
            Durable::Charged { .. } => None,
        })
        .collect()
}

fn play_round(h: &mut Harness, r: u64) {
    for (i, (id, round, _)) in h.train_requests().into_iter().enumerate() {
        let v = 0.1 * (i as f32 + 1.0) * r as f32;
        h.submit(id, round, vec![v, -v, 0.5 * v, 0.0], 10 + i as u64);
    }
    h.server.start_next_round(h.now);
    h.pump();
}

#[test]
fn a_resumed_coordinator_continues_bit_for_bit() {
    let mut c = cfg(4, 3, 0.67);
    c.server_optimizer = ServerOptimizerConfig::new(ServerOptimizerKind::FedAdam);
    // Uninterrupted: four rounds.
    let mut whole = Harness::new(c.clone(), 3);
    for r in 1..=4 {
        play_round(&mut whole, r);
    }
    // Interrupted after round 2, resumed from its checkpoint.
    let mut first = Harness::new(c.clone(), 3);
    for r in 1..=2 {
        play_round(&mut first, r);
    }
    let saved = checkpoints(&mut first).pop().unwrap();
    assert_eq!((saved.next_round, saved.rounds_completed), (3, 2));
    assert_eq!(saved.strategy.step, 2);
    assert_eq!(saved.strategy.buffers.len(), 2, "FedAdam keeps m and v");
    assert_eq!(saved.global_model, first.server.global_model());
    let resumed = Coordinator::resume(c, spec(), saved, None).unwrap();
    let mut second = Harness::with_server(resumed, 3);
    for r in 3..=4 {
        play_round(&mut second, r);
    }
    // Same cohorts (the sampling generator was restored), same model and moments.
    let cohorts =
        |h: &Harness| -> Vec<usize> { h.completed().iter().map(|s| s.cohort.len()).collect() };
    assert_eq!(cohorts(&whole)[2..], cohorts(&second)[..]);
    assert_eq!(whole.server.global_model(), second.server.global_model());
    assert_eq!(
        whole.server.checkpoint().strategy,
        second.server.checkpoint().strategy
    );
    assert_eq!(second.server.rounds_completed(), 4);
}

#[test]
fn a_round_is_charged_durably_before_its_cohort_hears_of_it() {
    let mut c = cfg(3, 3, 1.0);
    c.dp = Some(dp_plan(Mechanism::Central, 1.0, 3, 1.0, 3, None, None));
    let mut server = Coordinator::new(c.clone(), spec(), vec![0.0; D], 1).unwrap();
    // Three clients say hello; the third starts round 1. Nothing is pumped.
    for i in 0..3 {
        let id = server.connect();
        let mut session = ClientSession::new(&format!("node-{i}"), spec(), 10, rng());
        while let Some(m) = session.poll_transmit() {
            server.handle_message(id, m, Instant::now());
        }
    }
    let durable: Vec<Durable> = std::iter::from_fn(|| server.poll_durable()).collect();
    assert!(
        matches!(&durable[..], [Durable::Charged { round: 1, .. }]),
        "{durable:?}"
    );
    // Queued together with the round starts: the driver saves the charge
    // before it sends them.
    let starts = std::iter::from_fn(|| server.poll_transmit())
        .filter(|t| matches!(&*t.message, Message::RoundStart(_)))
        .count();
    assert_eq!(starts, 3);
    let Durable::Charged { ledger, .. } = &durable[0] else {
        unreachable!()
    };
    // A crash now: the checkpoint says round 1, the durable ledger has
    // round 1 charged. The restart continues at round 2, charging it once.
    let before = Coordinator::new(c.clone(), spec(), vec![0.0; D], 1)
        .unwrap()
        .checkpoint();
    let mut resumed = Coordinator::resume(c, spec(), before, Some(ledger.clone())).unwrap();
    assert_eq!(resumed.next_round(), 2);
    assert_eq!(resumed.ledger().unwrap().rounds_charged(), 1);
    let mut h = Harness::with_server(resumed, 3);
    play_round(&mut h, 2);
    let rounds: Vec<u64> = h
        .server
        .ledger()
        .unwrap()
        .entries
        .iter()
        .map(|e| e.round)
        .collect();
    assert_eq!(rounds[..2], [1, 2]);
    resumed = h.server;
    assert!(resumed.ledger().unwrap().epsilon() > ledger.epsilon());
}

// ---- Strategies -------------------------------------------------------------

use crate::metrics::TaskScores;
use crate::strategy::{
    AggregationRule, Candidate, ClientEvalSummary, ClientEvaluation, RoundUpdates, SamplingRng,
    Strategy, StrategyError, StrategyState,
};

/// Plays round `round`: every cohort member sends `delta(i)` (in client id
/// order) with weight 1, the last one through `send_raw` when `rogue` is
/// given, so no session shapes it.
fn play_with(
    h: &mut Harness,
    round: u64,
    delta: impl Fn(usize) -> Vec<f32>,
    rogue: Option<Vec<f32>>,
) {
    let mut reqs = h.train_requests();
    reqs.sort_by_key(|r| r.0);
    let last = reqs.len() - 1;
    for (i, (id, r, _)) in reqs.into_iter().enumerate() {
        assert_eq!(r, round);
        match &rogue {
            Some(poison) if i == last => h.send_raw(
                id,
                Message::Update(Update {
                    round,
                    num_examples: 1,
                    train_loss: 0.5,
                    delta: poison.clone(),
                }),
            ),
            _ => h.submit(id, round, delta(i), 1),
        }
    }
}

fn failures(h: &Harness) -> Vec<String> {
    h.events
        .iter()
        .filter_map(|e| match e {
            Event::RoundFailed { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn robust_rules_resist_a_poisoned_update_that_moves_the_mean() {
    let honest = |i: usize| vec![1.0 + 0.01 * i as f32; D];
    let poison = vec![1000.0; D];
    let run = |rule: AggregationRule| {
        let mut c = cfg(1, 5, 1.0);
        c.aggregation = rule;
        let mut h = Harness::new(c, 5);
        play_with(&mut h, 1, honest, Some(poison.clone()));
        assert_eq!(h.completed().len(), 1, "{rule:?}: {:?}", failures(&h));
        h.server.global_model().to_vec()
    };
    let mean = run(AggregationRule::Mean);
    assert!(mean[0] > 200.0, "the mean follows the attacker: {mean:?}");
    for rule in [
        AggregationRule::Median,
        AggregationRule::TrimmedMean { trim_fraction: 0.2 },
        AggregationRule::Krum { byzantine: 1 },
        AggregationRule::MultiKrum {
            byzantine: 1,
            keep: None,
        },
    ] {
        let model = run(rule);
        assert!(
            model.iter().all(|&v| (1.0..=1.04).contains(&v)),
            "{rule:?} let the attacker through: {model:?}"
        );
    }
    // Median of 1.00, 1.01, 1.02, 1.03 and 1000: 1.02.
    assert_eq!(run(AggregationRule::Median), vec![1.02; D]);
}

#[test]
fn strategies_that_see_each_update_are_refused_where_the_server_sees_only_the_sum() {
    let mut c = secure_cfg(3);
    c.aggregation = AggregationRule::Median;
    let err = Coordinator::new(c, spec(), vec![0.0; D], 1).unwrap_err();
    assert!(err.0.contains("only sees their sum"), "{err}");
    for mechanism in [Mechanism::Central, Mechanism::Distributed] {
        let mut c = if mechanism == Mechanism::Distributed {
            let mut c = secure_cfg(3);
            c.secagg.as_mut().unwrap().bits = crate::dp::DEFAULT_DP_BITS;
            c
        } else {
            cfg(1, 3, 1.0)
        };
        c.dp = Some(dp_plan(mechanism, 1.0, 4, 1.0, 1, None, None));
        c.aggregation = AggregationRule::Krum { byzantine: 0 };
        let err = Coordinator::new(c, spec(), vec![0.0; D], 1).unwrap_err();
        assert!(
            err.0.contains("only sees their sum") || err.0.contains("calibrate their noise"),
            "{mechanism:?}: {err}"
        );
    }
    // Local DP noises every update on its node: robust rules may run.
    let mut c = cfg(1, 3, 1.0);
    c.dp = Some(dp_plan(Mechanism::Local, 1.0, 3, 1.0, 1, None, None));
    c.aggregation = AggregationRule::Median;
    assert!(Coordinator::new(c, spec(), vec![0.0; D], 1).is_ok());
    // A user strategy is held to the same rule.
    #[derive(Debug)]
    struct Sees;
    impl Strategy for Sees {
        fn name(&self) -> String {
            "sees-all".into()
        }
        fn input(&self) -> crate::strategy::AggregationInput {
            crate::strategy::AggregationInput::Individual
        }
        fn step(&mut self, _: u64, _: &mut [f32], _: &[f32]) {}
    }
    let err = Coordinator::builder(secure_cfg(3), spec())
        .strategy(Box::new(Sees))
        .start(vec![0.0; D])
        .unwrap_err();
    assert!(
        err.0.contains("sees-all aggregates each client's update"),
        "{err}"
    );
}

#[test]
fn krum_without_enough_updates_fails_the_round_and_keeps_the_model() {
    let mut c = cfg(1, 3, 1.0);
    c.aggregation = AggregationRule::Krum { byzantine: 1 };
    let mut h = Harness::new(c, 3);
    play_with(&mut h, 1, |_| vec![1.0; D], None);
    assert!(h.completed().is_empty());
    let reasons = failures(&h);
    assert!(
        reasons[0].contains("needs at least 5 updates, the round has 3"),
        "{reasons:?}"
    );
    assert_eq!(h.server.global_model(), &[0.0; D]);
}

#[test]
fn rounds_over_the_buffer_limit_fail_naming_it() {
    let mut c = cfg(1, 3, 1.0);
    c.aggregation = AggregationRule::Median;
    c.max_buffered_values = 3 * D - 1;
    let h = Harness::new(c, 3);
    let reasons = failures(&h);
    assert!(reasons[0].contains("max_buffered_values"), "{reasons:?}");
}

/// A user strategy: picks the first `target` candidates by node name, moves
/// the model by twice the median, reports the worst client accuracy, and
/// counts its steps in its state.
#[derive(Debug, Default)]
struct Custom {
    steps: u64,
    seen: Vec<usize>,
}

impl Strategy for Custom {
    fn name(&self) -> String {
        "custom".into()
    }
    fn input(&self) -> crate::strategy::AggregationInput {
        crate::strategy::AggregationInput::Individual
    }
    fn select_cohort(
        &mut self,
        _: u64,
        candidates: &[Candidate<'_>],
        target: usize,
        _: &mut SamplingRng,
    ) -> Vec<ClientId> {
        let mut ids: Vec<ClientId> = candidates.iter().take(target).map(|c| c.id).collect();
        ids.push(999); // not a candidate: ignored
        ids.push(ids[0]); // a repeat: ignored
        ids
    }
    fn aggregate(&mut self, _: u64, updates: RoundUpdates<'_>) -> Result<Vec<f32>, StrategyError> {
        let RoundUpdates::Individual(updates) = updates else {
            unreachable!("asked for individual updates")
        };
        self.seen.push(updates.len());
        let values: Vec<&[f32]> = updates.iter().map(|u| u.values).collect();
        Ok(crate::strategy::robust::median(&values))
    }
    fn step(&mut self, _: u64, global: &mut [f32], aggregate: &[f32]) {
        for (x, d) in global.iter_mut().zip(aggregate) {
            *x += 2.0 * d;
        }
        self.steps += 1;
    }
    fn aggregate_evaluations(&self, reports: &[ClientEvaluation]) -> Option<ClientEvalSummary> {
        reports
            .iter()
            .filter_map(|r| r.scores.accuracy)
            .reduce(f32::min)
            .map(|accuracy| ClientEvalSummary {
                examples: reports.iter().map(|r| r.num_examples).sum(),
                loss: 0.0,
                scores: TaskScores::classification(accuracy),
            })
    }
    fn state(&self) -> StrategyState {
        StrategyState {
            step: self.steps,
            ..Default::default()
        }
    }
    fn restore(&mut self, state: StrategyState) -> Result<(), StrategyError> {
        self.steps = state.step;
        Ok(())
    }
}

#[test]
fn a_user_strategy_selects_aggregates_steps_and_resumes() {
    let c = cfg(2, 4, 0.5);
    let server = Coordinator::builder(c.clone(), spec())
        .strategy(Box::new(Custom::default()))
        .start(vec![0.0; D])
        .unwrap();
    let mut h = Harness::with_server(server, 4);
    // node-0 and node-1 come first by name; the stray ids were dropped.
    let mut cohort: Vec<ClientId> = h.train_requests().iter().map(|r| r.0).collect();
    cohort.sort_unstable();
    assert_eq!(cohort, vec![1, 2]);
    for id in cohort {
        h.submit(id, 1, vec![id as f32; D], 1);
    }
    // Median of 1 and 2 is 1.5, doubled.
    assert_eq!(h.server.global_model(), &[3.0; D]);
    let s = h.completed()[0];
    assert_eq!(s.client_eval.unwrap().scores.accuracy, Some(0.5));
    let saved = checkpoints(&mut h).pop().unwrap();
    assert_eq!(saved.strategy.step, 1);
    // A restart with the same strategy continues its count.
    let resumed = Coordinator::builder(c, spec())
        .strategy(Box::new(Custom::default()))
        .resume(saved, None)
        .unwrap();
    assert_eq!(resumed.checkpoint().strategy.step, 1);
    assert_eq!(resumed.strategy_name(), "custom");
}

#[test]
fn a_strategy_that_breaks_the_model_fails_the_round_instead() {
    #[derive(Debug)]
    struct Broken(usize);
    impl Strategy for Broken {
        fn name(&self) -> String {
            "broken".into()
        }
        fn aggregate(&mut self, _: u64, _: RoundUpdates<'_>) -> Result<Vec<f32>, StrategyError> {
            Ok(vec![1.0; self.0])
        }
        fn step(&mut self, _: u64, global: &mut [f32], _: &[f32]) {
            global[1] = f32::NAN;
        }
    }
    for (len, expected) in [
        (D + 1, "has 5 values, the model has 4"),
        (D, "parameter 1 non-finite"),
    ] {
        let server = Coordinator::builder(cfg(1, 3, 1.0), spec())
            .strategy(Box::new(Broken(len)))
            .start(vec![0.0; D])
            .unwrap();
        let mut h = Harness::with_server(server, 3);
        play_with(&mut h, 1, |_| vec![1.0; D], None);
        let reasons = failures(&h);
        assert!(reasons[0].contains(expected), "{reasons:?}");
        assert_eq!(h.server.global_model(), &[0.0; D], "the model is untouched");
    }
}

// ---- Data check at join -----------------------------------------------------

use crate::wire::{ClassName, DataSpec};

#[test]
fn a_node_whose_data_differs_is_refused_naming_both_sides() {
    let server_data = DataSpec {
        example_shape: vec![30],
        num_classes: 2,
        class_names: vec![ClassName("malignant".into()), ClassName("benign".into())],
        vocab_size: 0,
    };
    let server = Coordinator::builder(cfg(1, 3, 1.0), spec())
        .expect_data(server_data.clone())
        .start(vec![0.0; D])
        .unwrap();
    let mut h = Harness::with_server(server, 0);
    let try_join = |h: &mut Harness, name: &str, data: DataSpec| {
        let id = h.server.connect();
        let mut session = ClientSession::new(name, spec(), 10, rng()).with_data(data);
        while let Some(m) = session.poll_transmit() {
            h.server.handle_message(id, m, h.now);
        }
        h.pump();
        id
    };
    // The classes in the other order: the same shape, another meaning.
    let mut swapped = server_data.clone();
    swapped.class_names.reverse();
    let regression = DataSpec {
        example_shape: vec![10],
        num_classes: 0,
        class_names: Vec::new(),
        vocab_size: 0,
    };
    for (name, data, node_side) in [
        ("swapped", swapped, "2 classes (benign, malignant)"),
        ("regression", regression, "examples [10], regression"),
        ("silent", DataSpec::default(), "unspecified data"),
    ] {
        let id = try_join(&mut h, name, data);
        let detail = h
            .events
            .iter()
            .find_map(|e| match e {
                Event::Rejected {
                    id: r,
                    code,
                    detail,
                } if *r == id => Some((*code, detail.clone())),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{name} was admitted"));
        assert_eq!(detail.0, ReasonCode::DataMismatch);
        assert!(detail.1.contains(node_side), "{}", detail.1);
        assert!(
            detail
                .1
                .contains("examples [30], 2 classes (malignant, benign)"),
            "{}",
            detail.1
        );
        assert!(h.closed.contains(&id));
    }
    assert_eq!(h.server.admitted(), 0);
    let id = try_join(&mut h, "same", server_data);
    assert!(!h.closed.contains(&id));
    assert_eq!(h.server.admitted(), 1);
}

#[test]
fn a_strategy_that_selects_nobody_fails_the_round_at_once() {
    #[derive(Debug)]
    struct Nobody;
    impl Strategy for Nobody {
        fn name(&self) -> String {
            "nobody".into()
        }
        fn select_cohort(
            &mut self,
            _: u64,
            _: &[Candidate<'_>],
            _: usize,
            _: &mut SamplingRng,
        ) -> Vec<ClientId> {
            vec![12345] // not a candidate: ignored, leaving no one
        }
        fn step(&mut self, _: u64, _: &mut [f32], _: &[f32]) {}
    }
    let server = Coordinator::builder(cfg(1, 3, 1.0), spec())
        .strategy(Box::new(Nobody))
        .start(vec![0.0; D])
        .unwrap();
    let mut h = Harness::with_server(server, 3);
    assert!(h.train_requests().is_empty(), "nobody is asked to train");
    let reasons = failures(&h);
    assert!(
        reasons[0].contains("strategy nobody selected none of the 3 admitted clients"),
        "{reasons:?}"
    );
    assert_eq!(
        h.server.poll_timeout(),
        None,
        "no round waits for a timeout"
    );
}

#[test]
fn evaluations_with_another_tasks_scores_are_left_out() {
    let regression = DataSpec {
        example_shape: vec![10],
        ..DataSpec::default()
    };
    let server = Coordinator::builder(cfg(1, 3, 1.0), spec())
        .expect_data(regression.clone())
        .start(vec![0.0; D])
        .unwrap();
    let mut h = Harness::with_server(server, 0);
    for i in 0..3 {
        let id = h.server.connect();
        let mut session = ClientSession::new(&format!("node-{i}"), spec(), 10, rng())
            .with_data(regression.clone());
        while let Some(m) = session.poll_transmit() {
            h.server.handle_message(id, m, h.now);
        }
        h.clients.insert(id, session);
        h.pump();
    }
    let reqs = h.train_requests();
    assert_eq!(reqs.len(), 3);
    for (i, (id, round, _)) in reqs.into_iter().enumerate() {
        // Two report a regression's errors; one claims an accuracy.
        let scores = if i == 0 {
            TaskScores::classification(0.99)
        } else {
            TaskScores::regression(4.0, 2.0)
        };
        h.send_raw(
            id,
            Message::Evaluation(Evaluation {
                round,
                num_examples: 5,
                loss: 4.0,
                scores,
            }),
        );
        h.send_raw(
            id,
            Message::Update(Update {
                round,
                num_examples: 5,
                train_loss: 1.0,
                delta: vec![0.1; D],
            }),
        );
    }
    let eval = h.completed()[0].client_eval.unwrap();
    assert_eq!(eval.examples, 10, "the accuracy report is not counted");
    assert_eq!(eval.scores, TaskScores::regression(4.0, 2.0));
}

/// One client adds to the weight slot of its masked input (masks cancel,
/// so the forged value survives into the unmasked sum): the total weight
/// is then more than the cohort can claim, and the round fails before the
/// strategy, the model or a checkpoint sees the sum.
#[test]
fn an_impossible_secure_sum_fails_the_round_and_leaves_the_model() {
    use crate::wire::SecAgg;
    let mut h = Harness::new(secure_cfg(5), 5);
    let trains = settle(&mut h);
    for (i, (id, round, _)) in trains.iter().enumerate() {
        submit_secure(&mut h, *id, *round, vec![0.5; D], 100);
        if i == 0 {
            let c = h.clients.get_mut(id).unwrap();
            let Some(Message::SecAgg(SecAgg::MaskedInput { round, mut masked })) =
                c.poll_transmit()
            else {
                panic!("expected the masked input")
            };
            let last = masked.len() - 1;
            masked[last] = masked[last].wrapping_sub(1 << 30);
            h.server.handle_message(
                *id,
                Message::SecAgg(SecAgg::MaskedInput { round, masked }),
                h.now,
            );
        }
    }
    settle(&mut h);
    assert!(h.completed().is_empty(), "no round may complete on it");
    assert!(
        h.events.iter().any(|e| matches!(
            e,
            Event::RoundFailed { reason, .. } if reason.contains("total weight")
        )),
        "{:?}",
        h.events
    );
    assert_eq!(h.server.global_model(), &[0.0; D], "model unchanged");
}

/// A round config no node should train (a zero batch, absurd epochs, a
/// NaN learning rate, DP parameters the noise cannot be drawn from) is a
/// refused round, never a panic or a session ended; SecAgg+ messages of the
/// refused round that were already on their way are ignored.
#[test]
fn a_round_config_out_of_range_is_refused_round_by_round() {
    use super::client::RoundConfigError;
    use crate::dp::DpRoundError;
    use crate::wire::{SecAgg, SecAggParams, SecAggSetup};
    let mut c = welcomed_session();
    let start = |round, config| {
        Message::RoundStart(crate::wire::RoundStart {
            round,
            config,
            global_model: vec![0.0; D],
        })
    };
    let good = cfg(1, 1, 1.0).round;
    let mut refused = |round: u64, bad: RoundConfig| -> RoundConfigError {
        c.handle_message(start(round, bad)).unwrap();
        assert!(matches!(
            c.poll_transmit(),
            Some(Message::Error(e)) if e.code == ReasonCode::LeftRound
        ));
        match c.poll_event() {
            Some(ClientEvent::RoundLeft {
                reason: SessionError::InvalidRound { source, .. },
                ..
            }) => source,
            other => panic!("expected a refused round, got {other:?}"),
        }
    };
    let mut bad = good.clone();
    bad.batch_size = 0;
    assert!(matches!(
        refused(1, bad),
        RoundConfigError::BatchSize { got: 0, .. }
    ));
    let mut bad = good.clone();
    bad.local_epochs = 1_000_000;
    assert!(matches!(refused(2, bad), RoundConfigError::Epochs { .. }));
    let mut bad = good.clone();
    bad.learning_rate = f32::NAN;
    assert!(matches!(
        refused(3, bad),
        RoundConfigError::OutOfRange {
            name: "learning_rate",
            ..
        }
    ));
    let mut bad = good.clone();
    bad.max_local_steps = Some(0);
    assert_eq!(refused(4, bad), RoundConfigError::NoSteps);
    let mut bad = good.clone();
    bad.dp = Some(DpRound::Local {
        clip_norm: 1.0,
        noise_std: f64::NAN,
    });
    assert!(matches!(
        refused(5, bad),
        RoundConfigError::Dp(DpRoundError::OutOfRange {
            name: "noise_std",
            ..
        })
    ));
    let mut bad = good.clone();
    bad.secure_aggregation = true;
    bad.dp = Some(DpRound::Distributed {
        clip_norm: 1.0,
        granularity: 0.01,
        rounded_norm: 100.0,
        skellam_mu: f64::INFINITY,
        indicator_mu: None,
    });
    assert!(matches!(
        refused(6, bad),
        RoundConfigError::Dp(DpRoundError::OutOfRange {
            name: "skellam_mu",
            ..
        })
    ));
    // The refused secure round's setup arrives anyway: ignored.
    let setup = SecAggSetup {
        params: SecAggParams {
            threshold: 2,
            degree: 2,
            bits: 32,
            clip: 1.0,
            max_weight: 100,
            max_cohort: 3,
            min_survivors: 0,
        },
        neighbours: vec![2, 3],
    };
    c.handle_message(Message::SecAgg(SecAgg::Setup { round: 6, setup }))
        .unwrap();
    assert!(c.poll_transmit().is_none() && c.poll_event().is_none());
    // A sound round trains.
    c.handle_message(start(7, good)).unwrap();
    assert!(matches!(
        c.poll_event(),
        Some(ClientEvent::Train { round: 7, .. })
    ));
}

/// A client that keeps sending what is refused loses its connection at its
/// last allowed refusal of the round (`max_refusals_per_round`), not
/// before; the count starts afresh each round.
#[test]
fn a_client_refused_too_often_in_a_round_is_disconnected() {
    let mut config = cfg(3, 2, 1.0);
    config.max_refusals_per_round = 3;
    let mut h = Harness::new(config, 2);
    let junk = |round| {
        Message::Update(Update {
            round,
            num_examples: 1,
            train_loss: 0.0,
            delta: vec![0.0; D + 1],
        })
    };
    let trains = settle(&mut h);
    let a = trains[0].0;
    // Round 1: two refusals (the first drops it from the round), and the
    // other client completes the round.
    h.send_raw(a, junk(trains[0].1));
    h.send_raw(a, junk(trains[0].1));
    let (b, round, _) = trains[1].clone();
    h.submit(b, round, vec![0.1; D], 10);
    settle(&mut h);
    assert_eq!(h.completed().len(), 1);
    assert!(h.closed.is_empty(), "two refusals are tolerated");
    // Round 2: the count restarted, so two more are tolerated too.
    h.server.start_next_round(h.now);
    h.pump();
    let round = 2;
    h.send_raw(a, junk(round));
    h.send_raw(a, junk(round));
    assert!(h.closed.is_empty(), "the count starts afresh each round");
    h.send_raw(a, junk(round));
    assert_eq!(h.closed, vec![a], "the third in one round closes it");
    assert_eq!(h.errors_to.len(), 5, "each refusal is sent once");
}

/// A node may report one error a round (it leaves the round); a stream of
/// them counts as refusals, so it is closed instead of filling the log.
#[test]
fn a_node_flooding_error_reports_is_disconnected() {
    let mut config = cfg(3, 2, 1.0);
    config.max_refusals_per_round = 3;
    let mut h = Harness::new(config, 2);
    let trains = settle(&mut h);
    let a = trains[0].0;
    let report = || Message::error(ReasonCode::LeftRound, "cannot train".to_owned());
    h.send_raw(a, report());
    assert!(
        h.errors_to.is_empty(),
        "the first report is heard, not refused"
    );
    for _ in 0..2 {
        h.send_raw(a, report());
    }
    assert!(h.closed.is_empty());
    h.send_raw(a, report());
    assert_eq!(h.closed, vec![a], "the third extra report closes it");
    assert_eq!(h.errors_to.len(), 3);
}

/// A deviating server, scripted by hand around real client sessions with
/// identities: it sends one node another global model (Pasquini et al.'s
/// model-inconsistency attack) and forwards every key as it came. The
/// signed round digests give it away: every neighbour of that node leaves
/// the round before sharing a single secret, and so does the node.
#[test]
fn a_server_sending_one_node_another_model_gets_no_shares() {
    use crate::wire::{RoundStart, SecAgg, SecAggParams, SecAggSetup};
    let n = 5u64;
    let victim = 5u64;
    let mut sessions: BTreeMap<u64, ClientSession> = (1..=n)
        .map(|id| {
            let attestor = std::sync::Arc::new(TagAttestor {
                name: format!("node-{id}"),
                certificate: format!("node-{id}").into_bytes(),
            });
            let mut s = ClientSession::new(&format!("node-{id}"), spec(), 10, rng())
                .with_attestor(attestor);
            s.poll_transmit(); // hello
            s.handle_message(Message::Welcome(crate::wire::Welcome {
                version: crate::wire::PROTOCOL_VERSION,
                client_id: id,
                model: spec(),
            }))
            .unwrap();
            (id, s)
        })
        .collect();
    let mut config = cfg(1, 1, 1.0).round;
    config.secure_aggregation = true;
    let params = SecAggParams {
        threshold: 3,
        degree: 4,
        bits: 32,
        clip: 1.0,
        max_weight: 100,
        max_cohort: 5,
        min_survivors: 0,
    };
    let mut keys = Vec::new();
    for (&id, s) in &mut sessions {
        let mut global_model = vec![0.0; D];
        if id == victim {
            global_model[0] = 0.5;
        }
        s.handle_message(Message::RoundStart(RoundStart {
            round: 1,
            config: config.clone(),
            global_model,
        }))
        .unwrap();
        let neighbours = (1..=n).filter(|&p| p != id).collect();
        s.handle_message(Message::SecAgg(SecAgg::Setup {
            round: 1,
            setup: SecAggSetup {
                params: params.clone(),
                neighbours,
            },
        }))
        .unwrap();
        let Some(Message::SecAgg(SecAgg::AdvertiseKeys { keys: k, .. })) = s.poll_transmit() else {
            panic!("expected keys")
        };
        keys.push(k);
    }
    for (&id, s) in &mut sessions {
        let peers = keys.iter().filter(|k| k.id != id).cloned().collect();
        s.handle_message(Message::SecAgg(SecAgg::PeerKeys { round: 1, peers }))
            .unwrap();
        match s.poll_transmit() {
            Some(Message::Error(e)) => assert_eq!(e.code, ReasonCode::LeftRound),
            other => panic!("node {id} answered {other:?}"),
        }
        let reason = std::iter::from_fn(|| s.poll_event())
            .find_map(|e| match e {
                ClientEvent::RoundLeft { reason, .. } => Some(reason),
                _ => None,
            })
            .unwrap_or_else(|| panic!("node {id} did not leave the round"));
        let expected = if id == victim { 1 } else { victim };
        assert_eq!(
            reason,
            SessionError::SecAgg {
                round: 1,
                source: crate::secagg::client::ClientError::RoundMismatch(expected)
            },
            "node {id}"
        );
        assert!(!s.is_finished(), "node {id} stays in the run");
    }
}

// ---- The node's own privacy policy ----------------------------------------

use super::policy::{ChargeError, LedgerStore, NodeLedger, NodePolicy, PolicyViolation, RoundCost};

/// A ledger store that records what it saved, or refuses to.
#[derive(Debug, Clone, Default)]
struct Saved {
    ledgers: std::sync::Arc<std::sync::Mutex<Vec<NodeLedger>>>,
    fail: bool,
}

impl LedgerStore for Saved {
    fn charge(
        &mut self,
        round: u64,
        cost: &RoundCost,
        policy: &NodePolicy,
    ) -> Result<NodeLedger, ChargeError> {
        if self.fail {
            return Err(ChargeError::Store("disk full".into()));
        }
        let mut saved = self.ledgers.lock().unwrap();
        let mut ledger = saved
            .last()
            .cloned()
            .unwrap_or_else(|| NodeLedger::new(policy.delta));
        ledger.charge(round, cost, policy)?;
        saved.push(ledger.clone());
        Ok(ledger)
    }
}

fn guarded_session(policy: NodePolicy, store: Saved) -> ClientSession {
    let ledger = NodeLedger::new(policy.delta);
    welcomed_session().with_privacy_policy(policy, ledger, Box::new(store))
}

fn start_round(c: &mut ClientSession, round: u64, config: RoundConfig) {
    c.handle_message(Message::RoundStart(crate::wire::RoundStart {
        round,
        config,
        global_model: vec![0.0; D],
    }))
    .unwrap();
}

/// Takes the round's train request and submits a small update for it.
fn train_and_submit(c: &mut ClientSession, round: u64) {
    assert!(matches!(c.poll_event(), Some(ClientEvent::Train { .. })));
    c.submit(
        Update {
            round,
            num_examples: 10,
            train_loss: 0.5,
            delta: vec![0.1; D],
        },
        None,
    )
    .unwrap();
}

/// The rule a refused round broke (the session must have left it).
fn refused_rule(c: &mut ClientSession) -> PolicyViolation {
    assert!(matches!(
        c.poll_transmit(),
        Some(Message::Error(e)) if e.code == ReasonCode::LeftRound
    ));
    match std::iter::from_fn(|| c.poll_event()).last() {
        Some(ClientEvent::RoundLeft {
            reason: SessionError::Policy { source, .. },
            ..
        }) => source,
        other => panic!("expected a refused round, got {other:?}"),
    }
}

/// Each rule of the node's policy refuses the round that breaks it, with
/// a message naming the rule, before the node trains; the session stays.
#[test]
fn rounds_that_weaken_the_nodes_policy_are_refused_by_name() {
    use crate::wire::{SecAgg, SecAggParams, SecAggSetup};
    let policy = NodePolicy {
        require_secure_aggregation: true,
        require_dp: Some(Mechanism::Distributed),
        min_cohort: Some(8),
        min_threshold: Some(4),
        ..NodePolicy::default()
    };
    let mut c = guarded_session(policy, Saved::default());
    let plain = cfg(1, 1, 1.0).round;
    start_round(&mut c, 1, plain.clone());
    let rule = refused_rule(&mut c);
    assert_eq!(rule, PolicyViolation::SecureAggregationRequired);
    assert!(
        rule.to_string().contains("require_secure_aggregation"),
        "{rule}"
    );

    let mut central = plain.clone();
    central.secure_aggregation = true;
    central.dp = Some(dp_plan(Mechanism::Central, 1.0, 10, 1.0, 1, None, None).round);
    start_round(&mut c, 2, central);
    let rule = refused_rule(&mut c);
    assert!(
        matches!(&rule, PolicyViolation::MechanismRequired { got, .. } if got == "central DP"),
        "{rule}"
    );
    assert!(rule.to_string().contains("require_dp"), "{rule}");

    let mut distributed = plain.clone();
    distributed.secure_aggregation = true;
    distributed.dp = Some(dp_plan(Mechanism::Distributed, 1.0, 10, 1.0, 1, None, Some(5)).round);
    let setup = |threshold, min_survivors| {
        Message::SecAgg(SecAgg::Setup {
            round: 0,
            setup: SecAggSetup {
                params: SecAggParams {
                    threshold,
                    degree: 8,
                    bits: 32,
                    clip: 1.0,
                    max_weight: 1,
                    max_cohort: 10,
                    min_survivors,
                },
                neighbours: (2..=9).collect(),
            },
        })
    };
    let with_round = |m: Message, round: u64| match m {
        Message::SecAgg(SecAgg::Setup { setup, .. }) => {
            Message::SecAgg(SecAgg::Setup { round, setup })
        }
        m => m,
    };
    // A threshold of 3 is below the policy's 4.
    start_round(&mut c, 3, distributed.clone());
    c.handle_message(with_round(setup(3, 5), 3)).unwrap();
    let rule = refused_rule(&mut c);
    assert_eq!(
        rule,
        PolicyViolation::ThresholdBelowMinimum {
            required: 4,
            got: 3
        }
    );
    // t = 5 allows unmasking 6 inputs together (min_survivors 5): below 8.
    start_round(&mut c, 4, distributed.clone());
    c.handle_message(with_round(setup(5, 5), 4)).unwrap();
    let rule = refused_rule(&mut c);
    assert_eq!(
        rule,
        PolicyViolation::CohortBelowMinimum {
            required: 8,
            got: 6
        }
    );
    assert!(rule.to_string().contains("min_cohort"), "{rule}");
    // A setup that keeps the policy goes on to the key exchange.
    start_round(&mut c, 5, distributed);
    c.handle_message(with_round(setup(5, 8), 5)).unwrap();
    assert!(matches!(
        c.poll_transmit(),
        Some(Message::SecAgg(SecAgg::AdvertiseKeys { .. }))
    ));
    assert!(!c.is_finished());
}

/// The node accounts its own local noise (no amplification by sampling it
/// cannot check), saves the ledger before each update leaves, and refuses
/// the round that would cross its budget before training it.
#[test]
fn the_node_ledger_counts_its_own_noise_and_stops_at_its_budget() {
    let z = 2.0;
    let two_rounds = crate::dp::rdp::gaussian_epsilon(1.0, z, 2, 1e-5).unwrap();
    let policy = NodePolicy {
        require_dp: Some(Mechanism::Local),
        min_noise_multiplier: Some(1.5),
        max_epsilon: Some(two_rounds * 1.02),
        ..NodePolicy::default()
    };
    let store = Saved::default();
    let mut c = guarded_session(policy, store.clone());
    let mut config = cfg(1, 1, 1.0).round;
    config.dp = Some(DpRound::Local {
        clip_norm: 1.0,
        noise_std: 2.0 * z,
    });
    for round in 1..=2 {
        start_round(&mut c, round, config.clone());
        train_and_submit(&mut c, round);
        assert!(matches!(c.poll_transmit(), Some(Message::Update(_))));
        let Some(ClientEvent::PrivacySpent { epsilon, .. }) = c.poll_event() else {
            panic!("round {round}: no ledger charge")
        };
        // Saved before the update was queued.
        assert_eq!(store.ledgers.lock().unwrap().len() as u64, round);
        assert!(epsilon > 0.0);
    }
    let spent = c.ledger().unwrap().epsilon();
    assert!(
        (spent - two_rounds).abs() < 0.02 * two_rounds,
        "{spent} vs {two_rounds}"
    );
    start_round(&mut c, 3, config.clone());
    let rule = refused_rule(&mut c);
    assert!(
        matches!(rule, PolicyViolation::BudgetExhausted { .. }),
        "{rule}"
    );
    assert!(rule.to_string().contains("max_epsilon"), "{rule}");
    // Less noise than the floor.
    config.dp = Some(DpRound::Local {
        clip_norm: 1.0,
        noise_std: 2.0,
    });
    start_round(&mut c, 4, config);
    assert_eq!(
        refused_rule(&mut c),
        PolicyViolation::NoiseBelowFloor {
            required: 1.5,
            got: 1.0
        }
    );
}

/// An update never leaves without its ledger entry on disk; rounds with
/// no noise of the node's own are counted apart, and refused under a budget.
#[test]
fn no_update_leaves_without_its_ledger_entry_saved() {
    let failing = Saved {
        fail: true,
        ..Saved::default()
    };
    let mut c = guarded_session(NodePolicy::default(), failing);
    start_round(&mut c, 1, cfg(1, 1, 1.0).round);
    train_and_submit(&mut c, 1);
    let sent: Vec<Message> = std::iter::from_fn(|| c.poll_transmit()).collect();
    assert!(
        sent.iter().all(|m| !matches!(m, Message::Update(_))),
        "{sent:?}"
    );
    assert!(matches!(
        c.poll_event(),
        Some(ClientEvent::RoundLeft {
            reason: SessionError::LedgerNotSaved { .. },
            ..
        })
    ));

    let store = Saved::default();
    let mut c = guarded_session(NodePolicy::default(), store.clone());
    start_round(&mut c, 1, cfg(1, 1, 1.0).round);
    train_and_submit(&mut c, 1);
    assert_eq!(c.ledger().unwrap().unprotected_rounds, 1);
    assert_eq!(c.ledger().unwrap().epsilon(), 0.0);

    let budgeted = NodePolicy {
        max_epsilon: Some(10.0),
        ..NodePolicy::default()
    };
    let mut c = guarded_session(budgeted, Saved::default());
    start_round(&mut c, 1, cfg(1, 1, 1.0).round);
    assert!(matches!(
        refused_rule(&mut c),
        PolicyViolation::Unaccountable { .. }
    ));
}

/// The population budget: what each node spent in earlier runs carries
/// into this one. A node whose next round would pass the budget is not
/// sampled (it is told why and disconnected); every node the round is
/// sampled from is charged, and the charge says whom.
#[test]
fn a_node_past_the_population_budget_is_not_sampled_again() {
    use crate::dp::NodeSpend;
    let plan = dp_plan(Mechanism::Central, 2.0, 3, 1.0, 10, None, None);
    let mut spent = NodeSpend::default();
    for _ in 0..9 {
        spent.add(&plan.orders, &plan.rdp_per_round, 0.0);
    }
    let budget = spent.epsilon(1e-5) * 1.01;
    let mut c = cfg(10, 3, 1.0);
    c.dp = Some(plan);
    let spends = BTreeMap::from([("node-0".to_string(), spent)]);
    let server = Coordinator::builder(c, spec())
        .population(spends, Some(budget))
        .start(vec![0.0; D])
        .unwrap();
    let mut h = Harness::with_server(server, 0);
    let ids: Vec<ClientId> = (0..3).map(|i| h.join(&format!("node-{i}"))).collect();
    let durable: Vec<Durable> = std::iter::from_fn(|| h.server.poll_durable()).collect();
    let Some(Durable::Charged { population, .. }) = durable.first() else {
        panic!("round 1 is charged: {durable:?}")
    };
    assert_eq!(population, &["node-1", "node-2"]);
    assert!(h.errors_to.contains(&(ids[0], ReasonCode::BudgetSpent)));
    assert!(h.closed.contains(&ids[0]));
    assert_eq!(h.server.node_spend("node-1").unwrap().rounds, 1);
    assert_eq!(h.server.node_spend("node-0").unwrap().rounds, 9);

    // A population budget without DP, or one that is no number, is refused.
    let no_dp = Coordinator::builder(cfg(1, 1, 1.0), spec())
        .population(BTreeMap::new(), Some(1.0))
        .start(vec![0.0; D]);
    assert!(no_dp.is_err());
}
