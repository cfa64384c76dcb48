//! End to end over real QUIC + TLS 1.3 on loopback: a real server driver,
//! real client drivers, real Burn training. These tests exercise the round
//! protocol with anonymous clients (server-authenticated TLS only);
//! `enrolment.rs` covers mutual TLS, and every simulation uses it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use burn::prelude::Device;
use fedveil_client::{ClientOptions, LocalTrainer, Trainer};
use fedveil_ml::data::synthetic::SyntheticConfig;
use fedveil_ml::data::{Partition, Shard, Split};
use fedveil_ml::model::{DataShape, ModelError, ModelSpec};
use fedveil_net::quic::{self, MessageReader, ServerIdentity};
use fedveil_proto::metrics::RoundMetrics;
use fedveil_proto::round::{Coordinator, CoordinatorConfig, Event};
use fedveil_proto::wire::{
    self, Evaluation, FrameLimits, Hello, LocalOptimizer, Message, PROTOCOL_VERSION, ReasonCode,
    RoundConfig, Update,
};
use fedveil_server::setup::{ModelEvaluator, initial_model};
use fedveil_server::{Observer, RunReport};

fn synthetic() -> Split {
    SyntheticConfig {
        train_examples: 1200,
        test_examples: 300,
        ..Default::default()
    }
    .generate(5)
}

fn round_config() -> RoundConfig {
    RoundConfig {
        local_epochs: 2,
        batch_size: 20,
        max_local_steps: None,
        learning_rate: 0.1,
        seed: 3,
        secure_aggregation: false,
        dp: None,
        prox_mu: 0.0,
        local_optimizer: LocalOptimizer::Sgd,
    }
}

/// Records the global model after each round.
#[derive(Default)]
struct Recorder {
    models: Vec<Vec<f32>>,
    metrics: Vec<RoundMetrics>,
    events: Vec<Event>,
}

impl Observer for Recorder {
    fn on_event(&mut self, event: &Event) {
        self.events.push(event.clone());
    }
    fn on_round(&mut self, m: &RoundMetrics, global: &[f32]) {
        self.metrics.push(m.clone());
        self.models.push(global.to_vec());
    }
}

struct Server {
    addr: SocketAddr,
    ca_pem: String,
    spec: ModelSpec,
    initial: Vec<f32>,
    run: tokio::task::JoinHandle<(RunReport, Recorder)>,
}

fn start_server(split: &Split, rounds: u64, min_clients: usize, timeout: Duration) -> Server {
    let identity = ServerIdentity::generate(&["localhost".into()]).unwrap();
    let bind = "127.0.0.1:0".parse().unwrap();
    start_server_on(split, rounds, min_clients, timeout, identity, bind)
}

fn start_server_on(
    split: &Split,
    rounds: u64,
    min_clients: usize,
    timeout: Duration,
    identity: ServerIdentity,
    bind: SocketAddr,
) -> Server {
    let device = Device::flex();
    let shape = DataShape::of(&split.train);
    let (spec, initial) = initial_model(
        &fedveil_ml::model::builtin("cnn").unwrap(),
        &shape,
        &device,
        1,
    )
    .unwrap();
    let config = CoordinatorConfig {
        rounds,
        min_clients,
        fraction: 1.0,
        round_timeout: timeout,
        max_clients: 100,
        max_examples_per_update: 100_000,
        seed: 1,
        round: round_config(),
        max_failed_rounds: 3,
        ..CoordinatorConfig::default()
    };
    let coordinator = Coordinator::new(config, spec.clone(), initial.clone(), 1).unwrap();
    let evaluator = ModelEvaluator::new("cnn", Arc::clone(&split.test), &device).unwrap();
    let endpoint =
        quinn::Endpoint::server(quic::server_config(&identity, None).unwrap(), bind).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let limits = FrameLimits::for_model(spec.param_count);
    let run = tokio::spawn(async move {
        let mut rec = Recorder::default();
        let report = fedveil_server::serve(
            endpoint,
            coordinator,
            evaluator,
            fedveil_server::ServeOptions {
                limits,
                observer: &mut rec,
                state: None,
                nodes: None,
                connections: Default::default(),
                faults: None,
            },
            std::future::pending(),
        )
        .await;
        (report, rec)
    });
    Server {
        addr,
        ca_pem: identity.ca_cert_pem,
        spec,
        initial,
        run,
    }
}

fn client_endpoint(ca_pem: &str) -> quinn::Endpoint {
    let mut e = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    e.set_default_client_config(quic::client_config(ca_pem, None).unwrap());
    e
}

/// Wraps the real trainer and records every update it produces.
struct Recording {
    inner: Trainer,
    updates: Mutex<Vec<Update>>,
}

impl LocalTrainer for Recording {
    fn spec(&self) -> &ModelSpec {
        self.inner.spec()
    }
    fn num_examples(&self) -> usize {
        self.inner.num_examples()
    }
    fn train_round(
        &self,
        round: u64,
        config: &RoundConfig,
        global: &[f32],
    ) -> Result<(Update, Evaluation), ModelError> {
        let out = self.inner.train_round(round, config, global)?;
        self.updates.lock().unwrap().push(out.0.clone());
        Ok(out)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fedavg_over_quic_is_the_weighted_mean_and_accuracy_rises() {
    let split = synthetic();
    let rounds = 3;
    let server = start_server(&split, rounds, 3, Duration::from_secs(300));
    // Unequal shards, so the weighting matters: 200, 400 and 600 examples.
    let bounds = [0usize, 200, 600, 1200];
    let mut trainers = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..3 {
        let shard = Shard {
            data: Arc::clone(&split.train),
            indices: (bounds[i]..bounds[i + 1]).collect(),
        };
        let t = Arc::new(Recording {
            inner: Trainer::new("cnn", shard, Device::flex(), i as u64).unwrap(),
            updates: Mutex::new(Vec::new()),
        });
        trainers.push(Arc::clone(&t));
        let endpoint = client_endpoint(&server.ca_pem);
        let opts = ClientOptions::new(server.addr, "localhost", format!("node-{i}"));
        tasks.push(tokio::spawn(async move {
            fedveil_client::run(&endpoint, &opts, t).await
        }));
    }
    let (report, rec) = server.run.await.unwrap();
    for t in tasks {
        let r = t.await.unwrap().unwrap();
        assert_eq!(r.rounds_trained, rounds);
        assert_eq!(r.server_rounds_completed, rounds);
    }
    assert_eq!(report.rounds_completed, rounds);
    assert_eq!(rec.models.len() as u64, rounds);

    // Recompute every round's aggregate from the recorded client updates.
    let mut previous = server.initial.clone();
    for (r, after) in rec.models.iter().enumerate() {
        let updates: Vec<Update> = trainers
            .iter()
            .map(|t| t.updates.lock().unwrap()[r].clone())
            .collect();
        assert_eq!(
            updates.iter().map(|u| u.num_examples).collect::<Vec<_>>(),
            vec![200, 400, 600]
        );
        let total: f64 = updates.iter().map(|u| u.num_examples as f64).sum();
        let mut max_err = 0.0f64;
        for j in 0..previous.len() {
            let mean: f64 = updates
                .iter()
                .map(|u| u.num_examples as f64 * f64::from(u.delta[j]))
                .sum::<f64>()
                / total;
            let expected = previous[j] + mean as f32;
            max_err = max_err.max(f64::from((after[j] - expected).abs()));
        }
        assert!(
            max_err <= 1e-6,
            "round {}: global model deviates from the weighted mean by {max_err}",
            r + 1
        );
        // The plain (unweighted) mean would differ: weighting is really applied.
        let unweighted_gap = (0..previous.len())
            .map(|j| {
                let plain = updates.iter().map(|u| f64::from(u.delta[j])).sum::<f64>() / 3.0;
                (f64::from(after[j]) - (f64::from(previous[j]) + plain)).abs()
            })
            .fold(0.0, f64::max);
        assert!(
            unweighted_gap > 1e-4,
            "weights had no effect ({unweighted_gap})"
        );
        previous = after.clone();
    }
    assert_eq!(previous, report.final_model);

    let acc: Vec<f32> = rec.metrics.iter().map(|m| m.accuracy.unwrap()).collect();
    assert!(
        acc[2] > acc[0] + 0.1 && acc[2] > 0.4,
        "accuracy should rise: {acc:?}"
    );
    assert!(
        rec.metrics
            .iter()
            .all(|m| m.bytes_up > 3 * 4 * server.spec.param_count && m.bytes_down > 0)
    );
}

/// A hand-driven client: hello, then whatever the test sends.
async fn rogue(
    server: &Server,
    name: &str,
) -> (quinn::Connection, quinn::SendStream, MessageReader) {
    let endpoint = client_endpoint(&server.ca_pem);
    let conn = endpoint
        .connect(server.addr, "localhost")
        .unwrap()
        .await
        .unwrap();
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let hello = Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        node_name: name.into(),
        model: server.spec.clone(),
        num_examples: 10,
        data: Default::default(),
    });
    quic::write_message(&mut send, &hello).await.unwrap();
    let mut reader = MessageReader::new(recv, FrameLimits::for_model(server.spec.param_count));
    assert!(matches!(
        reader.next().await.unwrap(),
        Some(Message::Welcome(_))
    ));
    (conn, send, reader)
}

async fn next_round_start(reader: &mut MessageReader) -> u64 {
    loop {
        match reader.next().await.unwrap() {
            Some(Message::RoundStart(s)) => return s.round,
            Some(_) => continue,
            None => panic!("stream ended"),
        }
    }
}

async fn next_error(reader: &mut MessageReader) -> ReasonCode {
    loop {
        match reader.next().await {
            Ok(Some(Message::Error(e))) => return e.code,
            Ok(Some(_)) => continue,
            other => panic!("expected an error message, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_updates_are_rejected_and_the_round_completes_with_the_others() {
    let split = synthetic();
    let server = start_server(&split, 1, 4, Duration::from_secs(300));
    let d = server.spec.param_count as usize;
    let parts = Partition::Iid.split(&split.train.labels, 10, 2, 0).unwrap();
    let mut rogues = Vec::new();
    for name in ["rogue-length", "rogue-nan", "rogue-garbage"] {
        rogues.push(rogue(&server, name).await);
    }
    // One honest client joins last, which starts the round.
    let shard = Shard {
        data: Arc::clone(&split.train),
        indices: parts[0].clone(),
    };
    let honest: Arc<dyn LocalTrainer> =
        Arc::new(Trainer::new("cnn", shard, Device::flex(), 9).unwrap());
    let endpoint = client_endpoint(&server.ca_pem);
    let opts = ClientOptions::new(server.addr, "localhost", "honest");
    let honest_task =
        tokio::spawn(async move { fedveil_client::run(&endpoint, &opts, honest).await });

    let update = |delta: Vec<f32>| {
        Message::Update(Update {
            round: 1,
            num_examples: 10,
            train_loss: 0.1,
            delta,
        })
    };
    let (_, send, reader) = &mut rogues[0];
    assert_eq!(next_round_start(reader).await, 1);
    quic::write_message(send, &update(vec![0.0; d - 1]))
        .await
        .unwrap();
    assert_eq!(next_error(reader).await, ReasonCode::WrongLength);

    let (_, send, reader) = &mut rogues[1];
    next_round_start(reader).await;
    let mut nan = vec![0.0; d];
    nan[d / 2] = f32::NAN;
    quic::write_message(send, &update(nan)).await.unwrap();
    assert_eq!(next_error(reader).await, ReasonCode::NonFinite);

    let (conn, send, reader) = &mut rogues[2];
    next_round_start(reader).await;
    send.write_all(b"\x00\x01garbage that is not a frame at all")
        .await
        .unwrap();
    assert_eq!(next_error(reader).await, ReasonCode::MalformedFrame);
    // ... and the server closes that connection.
    assert!(
        tokio::time::timeout(Duration::from_secs(10), conn.closed())
            .await
            .is_ok()
    );

    let (report, rec) = server.run.await.unwrap();
    honest_task.await.unwrap().unwrap();
    assert_eq!(report.rounds_completed, 1);
    let m = &rec.metrics[0];
    assert_eq!((m.cohort, m.contributors, m.dropped), (4, 1, 3));
    let rejected: Vec<ReasonCode> = rec
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Rejected { code, .. } => Some(*code),
            _ => None,
        })
        .collect();
    assert_eq!(
        rejected,
        vec![
            ReasonCode::WrongLength,
            ReasonCode::NonFinite,
            ReasonCode::MalformedFrame
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_over_the_limit_is_refused_before_it_is_read() {
    let split = synthetic();
    let server = start_server(&split, 1, 2, Duration::from_secs(5));
    let (conn, mut send, mut reader) = rogue(&server, "too-big").await;
    // Claim a payload 4 bytes larger than the largest allowed (a masked update).
    let mut head = Vec::from(wire::codec::FRAME_MAGIC);
    head.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    head.extend_from_slice(&1u32.to_le_bytes());
    let largest = server.spec.param_count + wire::codec::MAX_APPENDED_VALUES;
    head.extend_from_slice(&((largest + 1) * 4).to_le_bytes());
    send.write_all(&head).await.unwrap();
    assert_eq!(next_error(&mut reader).await, ReasonCode::FrameTooLarge);
    assert!(
        tokio::time::timeout(Duration::from_secs(10), conn.closed())
            .await
            .is_ok()
    );
    server.run.abort();
}

fn impatient() -> fedveil_client::driver::RetryPolicy {
    fedveil_client::driver::RetryPolicy {
        attempts: 30,
        timeout: Duration::from_millis(500),
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(300),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_started_before_the_server_retries_until_it_is_up() {
    let split = synthetic();
    let identity = ServerIdentity::generate(&["localhost".into()]).unwrap();
    // A free port with nobody listening yet.
    let addr = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let shard = Shard {
        data: Arc::clone(&split.train),
        indices: (0..300).collect(),
    };
    let trainer: Arc<dyn LocalTrainer> =
        Arc::new(Trainer::new("cnn", shard, Device::flex(), 1).unwrap());
    let endpoint = client_endpoint(&identity.ca_cert_pem);
    let mut opts = ClientOptions::new(addr, "localhost", "early");
    opts.retry = impatient();
    let client = tokio::spawn(async move { fedveil_client::run(&endpoint, &opts, trainer).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !client.is_finished(),
        "the client gave up while the server was down"
    );
    let server = start_server_on(&split, 1, 1, Duration::from_secs(120), identity, addr);
    let (report, _) = server.run.await.unwrap();
    assert_eq!(report.rounds_completed, 1);
    let r = client
        .await
        .unwrap()
        .expect("the client joined once the server was up");
    assert_eq!(r.rounds_trained, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_failure_is_not_retried() {
    let split = synthetic();
    let server = start_server(&split, 1, 1, Duration::from_secs(30));
    let stranger = ServerIdentity::generate(&["localhost".into()]).unwrap();
    let shard = Shard {
        data: Arc::clone(&split.train),
        indices: (0..100).collect(),
    };
    let trainer: Arc<dyn LocalTrainer> =
        Arc::new(Trainer::new("cnn", shard, Device::flex(), 1).unwrap());
    let endpoint = client_endpoint(&stranger.ca_cert_pem);
    let mut opts = ClientOptions::new(server.addr, "localhost", "wrong-ca");
    opts.retry = impatient();
    let err = fedveil_client::run(&endpoint, &opts, trainer)
        .await
        .unwrap_err();
    // A retried failure would end as `Unreachable` after 30 attempts.
    assert!(
        matches!(
            err,
            fedveil_client::ClientError::Rejected(quic::Rejection::ServerUntrusted(_))
        ),
        "expected an immediate TLS failure, got {err}"
    );
    server.run.abort();
}
