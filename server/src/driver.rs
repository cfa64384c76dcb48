//! The thin async driver around [`Coordinator`]: accepts QUIC connections,
//! moves frames between streams and the state machine, fires its timer,
//! evaluates each new global model, and reports metrics.
//!
//! One task per connection reads (frames → coordinator) and one writes
//! (coordinator → frames); the central loop owns the coordinator, so no
//! protocol state is shared or locked.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fedveil_ml::model::EvalStats;
use fedveil_net::pki::{self, CertInfo};
use fedveil_net::quic::{
    self, CLOSE_CERT_ENDED, CLOSE_OK, CLOSE_REFUSED, CLOSE_UNAUTHORIZED, MessageReader, NetError,
};
use fedveil_proto::metrics::RoundMetrics;
use fedveil_proto::round::server::Durable;
use fedveil_proto::round::{ClientId, Coordinator, Event, PeerIdentity, RoundSummary};
use fedveil_proto::wire::{FrameLimits, Message};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How long to wait for a closing peer to acknowledge our last frames.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub use fedveil_settings::connections::{
    ConnectionLimits, DEFAULT_MAX_HANDSHAKES, DEFAULT_MAX_OUTBOUND_QUEUED,
    DEFAULT_MAX_QUEUED_PER_CONNECTION, DEFAULT_MAX_UNADMITTED, DEFAULT_MAX_UNADMITTED_PER_NODE,
    DEFAULT_RETRY_ABOVE_HANDSHAKES, HELLO_TIMEOUT,
};

/// How often the registry is checked for revocations made by another
/// process (`fedveil-server revoke`); live connections of a revoked node
/// are dropped within this interval.
pub const REVOCATION_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Every this many polls each live connection's certificate is looked up
/// even when no other process wrote to the registry: renewals made by this
/// server supersede certificates when a grace period ends, not on a write.
pub const REGISTRY_RECHECK_POLLS: u64 = 5;

use crate::enrol::NodeService;

/// Evaluates a global model on the server's held-out data.
pub trait Evaluator: Send + 'static {
    /// Test loss and scores of `global_model`.
    fn evaluate(&mut self, global_model: &[f32]) -> EvalStats;
}

impl<F: FnMut(&[f32]) -> EvalStats + Send + 'static> Evaluator for F {
    fn evaluate(&mut self, global_model: &[f32]) -> EvalStats {
        self(global_model)
    }
}

/// Fault injection for tests and attack studies: a server that deviates
/// from the protocol. Called with every message the coordinator sends;
/// `Some` replaces it (a forged survivor set, another model for one node,
/// stripped signatures...), `None` sends it as it is.
pub trait ServerFaultHook: Send + Sync + std::fmt::Debug {
    /// What goes to client `to` instead of `message`, if anything else.
    fn before_send(&self, to: ClientId, message: &Message) -> Option<Message>;
}

/// Told what happens during a run (logging, metrics files, progress bars).
pub trait Observer: Send {
    /// A coordinator event (a join, a round's start, a rejection...).
    fn on_event(&mut self, _event: &Event) {}
    /// A completed round, with the new global model.
    fn on_round(&mut self, _metrics: &RoundMetrics, _global_model: &[f32]) {}
}

/// Where the run's durable state goes (the server's [`crate::store::Store`];
/// simulations keep none).
pub trait StateSink: Send {
    /// Returns once `d` is on disk; an error stops the run.
    fn persist(&mut self, d: &Durable) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;
    /// Round history (best effort).
    fn record_round(&mut self, _metrics: &RoundMetrics) {}
}

impl StateSink for crate::store::Store {
    fn persist(&mut self, d: &Durable) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Ok(crate::store::Store::persist(self, d)?)
    }

    fn record_round(&mut self, metrics: &RoundMetrics) {
        if let Err(err) = crate::store::Store::record_round(self, metrics) {
            tracing::warn!(%err, round = metrics.round, "cannot record the round's metrics");
        }
    }
}

/// Logs events through `tracing`.
pub struct LogObserver;

impl Observer for LogObserver {
    fn on_event(&mut self, event: &Event) {
        log_event(event);
    }

    fn on_round(&mut self, m: &RoundMetrics, _global_model: &[f32]) {
        tracing::info!(
            round = m.round,
            scores = %m.score_text(),
            loss = format_args!("{:.4}", m.loss),
            contributors = m.contributors,
            dropped = m.dropped,
            secs = format_args!("{:.2}", m.round_secs),
            epsilon = ?m.epsilon,
            clip_norm = ?m.clip_norm,
            "round complete"
        );
    }
}

/// Logs one coordinator event at a fitting level.
pub fn log_event(event: &Event) {
    match event {
        Event::Joined { id, node_name } => {
            tracing::info!(client = id, node = %node_name, "client joined")
        }
        Event::Left { id } => tracing::info!(client = id, "client left"),
        Event::RoundStarted { round, cohort } => {
            tracing::info!(round, cohort = cohort.len(), "round started")
        }
        Event::UpdateAccepted {
            round,
            id,
            num_examples,
        } => {
            tracing::debug!(round, client = id, num_examples, "update accepted")
        }
        Event::Rejected { id, code, detail } => {
            tracing::warn!(client = id, ?code, %detail, "client message rejected")
        }
        Event::SecAggStage {
            round,
            stage,
            pending,
        } => tracing::debug!(
            round,
            stage = stage.name(),
            pending,
            "secure aggregation stage"
        ),
        Event::RoundCompleted(_) => {}
        Event::RoundFailed { round, reason } => {
            tracing::warn!(round, %reason, "round failed; global model unchanged")
        }
        Event::BudgetExhausted(exceeded) => {
            tracing::warn!(%exceeded, "privacy budget exhausted; the run ends")
        }
        Event::Finished { rounds_completed } => tracing::info!(rounds_completed, "run finished"),
    }
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// Rounds completed by this start of the server.
    pub rounds_completed: u64,
    /// Rounds that failed and were retried.
    pub rounds_failed: u64,
    /// The global model at the end.
    pub final_model: Vec<f32>,
    /// Each completed round's metrics.
    pub metrics: Vec<RoundMetrics>,
    /// True if the run ended because of a shutdown request.
    pub interrupted: bool,
    /// Privacy spent by the whole run, failed rounds included (with DP on).
    pub epsilon: Option<f64>,
}

/// A training connection whose handshake and stream are ready.
struct NewConnection {
    connection: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    /// The client certificate (DER) and what it says, under mutual TLS.
    identity: Option<(Vec<u8>, CertInfo)>,
}

enum Inbound {
    Connected(Box<NewConnection>),
    /// The permit bounds the connection's unhandled messages; dropping it
    /// lets its reader read on.
    Message(ClientId, Message, tokio::sync::OwnedSemaphorePermit),
    Failed(ClientId, NetError),
    Closed(ClientId),
    /// A registry check finished (run off the async workers): the
    /// registry's version then, and the connections to close.
    CertsChecked(Option<i64>, Vec<EndedCert>),
}

/// A connection whose certificate no longer admits it.
struct EndedCert {
    id: ClientId,
    name: String,
    code: u32,
    why: &'static str,
}

struct Outbound {
    message: Arc<Message>,
    close: bool,
}

struct Peer {
    out: mpsc::Sender<Outbound>,
    connection: quinn::Connection,
    identity: Option<CertInfo>,
}

#[derive(Default)]
struct Traffic {
    up: AtomicU64,
    down: AtomicU64,
}

/// What a run is served with besides the coordinator.
pub struct ServeOptions<'a> {
    /// Frame size limits (sized for the model).
    pub limits: FrameLimits,
    /// Told what happens.
    pub observer: &'a mut dyn Observer,
    /// Where durable state goes (none in simulations).
    pub state: Option<&'a mut dyn StateSink>,
    /// Enrolment and the node registry. With it, training connections must
    /// present an enrolled client certificate (the endpoint's TLS config
    /// must check them against the same registry: see
    /// [`quic::server_config`]); without it, clients are anonymous.
    pub nodes: Option<Arc<NodeService>>,
    /// What early connections may hold.
    pub connections: ConnectionLimits,
    /// A deviating server, for tests: see [`ServerFaultHook`].
    pub faults: Option<Arc<dyn ServerFaultHook>>,
}

/// Runs `coordinator` on `endpoint` until all rounds are done or `shutdown`
/// resolves. With `state`, everything the coordinator marks durable is
/// saved before the messages that depend on it are sent.
pub async fn serve(
    endpoint: quinn::Endpoint,
    coordinator: Coordinator,
    evaluator: impl Evaluator,
    options: ServeOptions<'_>,
    shutdown: impl Future<Output = ()>,
) -> RunReport {
    let ServeOptions {
        limits,
        observer,
        state,
        nodes,
        connections,
        faults,
    } = options;
    let handshakes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut driver = Driver {
        state,
        nodes: nodes.clone(),
        registry_version: None,
        polls: 0,
        checking: false,
        connections,
        faults,
        unadmitted: HashMap::new(),
        coordinator,
        evaluator: Some(Box::new(evaluator)),
        limits,
        peers: HashMap::new(),
        writers: Vec::new(),
        traffic: Arc::new(Traffic::default()),
        report: RunReport {
            rounds_completed: 0,
            rounds_failed: 0,
            final_model: Vec::new(),
            metrics: Vec::new(),
            interrupted: false,
            epsilon: None,
        },
        last_traffic: (0, 0),
        cpu: crate::cpu::CpuMeter::start(),
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::pin!(shutdown);
    let mut revocation_poll = tokio::time::interval(REVOCATION_POLL_INTERVAL);
    revocation_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if driver.process(observer).await {
            break;
        }
        let deadline = driver.coordinator.poll_timeout();
        let timer = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => admit_handshake(incoming, &handshakes, connections, &tx, &nodes),
                None => break,
            },
            _ = revocation_poll.tick() => {
                driver.drop_silent(Instant::now());
                if nodes.is_some() {
                    driver.check_certs(&tx);
                }
            }
            Some(inbound) = rx.recv() => driver.on_inbound(inbound, &tx),
            () = timer => driver.coordinator.handle_timeout(Instant::now()),
            () = &mut shutdown => {
                tracing::info!("shutdown requested; abandoning the current round");
                driver.coordinator.shutdown("the server is shutting down");
                driver.report.interrupted = true;
                driver.process(observer).await;
                break;
            }
        }
    }
    driver.finish(&endpoint).await
}

struct Driver<'s> {
    state: Option<&'s mut dyn StateSink>,
    nodes: Option<Arc<NodeService>>,
    /// The registry's `data_version` when last checked for revocations.
    registry_version: Option<i64>,
    /// Revocation polls so far.
    polls: u64,
    /// Whether a registry check is under way.
    checking: bool,
    connections: ConnectionLimits,
    faults: Option<Arc<dyn ServerFaultHook>>,
    /// Connections that have not been admitted yet: when their hello is
    /// due, and their certificate's node name.
    unadmitted: HashMap<ClientId, (Instant, Option<String>)>,
    coordinator: Coordinator,
    evaluator: Option<Box<dyn Evaluator>>,
    limits: FrameLimits,
    peers: HashMap<ClientId, Peer>,
    writers: Vec<JoinHandle<()>>,
    traffic: Arc<Traffic>,
    report: RunReport,
    last_traffic: (u64, u64),
    /// The cores' business from one round's end to the next.
    cpu: crate::cpu::CpuMeter,
}

impl Driver<'_> {
    fn on_inbound(&mut self, inbound: Inbound, tx: &mpsc::UnboundedSender<Inbound>) {
        let now = Instant::now();
        match inbound {
            Inbound::Connected(new) => {
                let NewConnection {
                    connection,
                    send,
                    recv,
                    identity,
                } = *new;
                let name = identity.as_ref().map(|(_, info)| info.name.clone());
                let limits = self.connections;
                let of_node = |n: &String| {
                    self.unadmitted
                        .values()
                        .filter(|(_, m)| m.as_ref() == Some(n))
                        .count()
                };
                let refusal = if self.unadmitted.len() >= limits.max_unadmitted {
                    Some("too many connections are waiting to say hello; try again later")
                } else if name
                    .as_ref()
                    .is_some_and(|n| of_node(n) >= limits.max_unadmitted_per_node)
                {
                    Some("this node already has connections waiting to say hello")
                } else {
                    None
                };
                if let Some(why) = refusal {
                    tracing::warn!(remote = %connection.remote_address(), node = ?name, why, "connection refused");
                    connection.close(CLOSE_REFUSED.into(), why.as_bytes());
                    return;
                }
                let id = self
                    .coordinator
                    .connect_as(identity.as_ref().map(|(der, info)| PeerIdentity {
                        name: info.name.clone(),
                        certificate: der.clone(),
                    }));
                if let (Some(nodes), Some((_, info))) = (&self.nodes, &identity) {
                    // SQLite may wait on another process's lock: never on
                    // an async worker.
                    let (nodes, name) = (Arc::clone(nodes), info.name.clone());
                    tokio::task::spawn_blocking(move || {
                        if let Err(err) = nodes.registry.touch(&name, pki::unix_now()) {
                            tracing::warn!(%err, node = %name, "cannot record last-seen time");
                        }
                    });
                }
                self.unadmitted
                    .insert(id, (now + limits.hello_timeout, name));
                let (out_tx, out_rx) = mpsc::channel(limits.max_outbound_queued.max(1));
                tokio::spawn(read_loop(
                    id,
                    recv,
                    self.limits,
                    Arc::new(tokio::sync::Semaphore::new(
                        limits.max_queued_per_connection,
                    )),
                    tx.clone(),
                    Arc::clone(&self.traffic),
                ));
                self.writers.push(tokio::spawn(write_loop(
                    send,
                    connection.clone(),
                    out_rx,
                    Arc::clone(&self.traffic),
                )));
                tracing::debug!(client = id, remote = %connection.remote_address(), "connection accepted");
                self.peers.insert(
                    id,
                    Peer {
                        out: out_tx,
                        connection,
                        identity: identity.map(|(_, info)| info),
                    },
                );
            }
            Inbound::Message(id, message, _permit) => {
                self.coordinator.handle_message(id, message, now)
            }
            Inbound::Failed(id, NetError::Codec(err)) => {
                tracing::warn!(client = id, %err, "undecodable frame; dropping connection");
                self.coordinator.codec_error(id, &err, now);
            }
            Inbound::Failed(id, err) => {
                tracing::info!(client = id, %err, "connection lost");
                self.drop_peer(id, now);
            }
            Inbound::Closed(id) => self.drop_peer(id, now),
            Inbound::CertsChecked(version, ended) => {
                self.checking = false;
                if version.is_some() {
                    self.registry_version = version;
                }
                for EndedCert {
                    id,
                    name,
                    code,
                    why,
                } in ended
                {
                    let Some(peer) = self.peers.get(&id) else {
                        continue;
                    };
                    tracing::warn!(client = id, node = %name, reason = why, "closing the connection");
                    peer.connection.close(code.into(), why.as_bytes());
                    self.drop_peer(id, now);
                }
            }
        }
    }

    fn drop_peer(&mut self, id: ClientId, now: Instant) {
        self.coordinator.disconnect(id, now);
        self.peers.remove(&id);
        self.unadmitted.remove(&id);
    }

    /// Closes the connections that did not say hello in time.
    fn drop_silent(&mut self, now: Instant) {
        let late: Vec<ClientId> = self
            .unadmitted
            .iter()
            .filter(|(_, (due, _))| *due <= now)
            .map(|(&id, _)| id)
            .collect();
        for id in late {
            tracing::warn!(client = id, "no hello in time; closing");
            if let Some(peer) = self.peers.get(&id) {
                peer.connection
                    .close(CLOSE_REFUSED.into(), b"no hello in time");
            }
            self.drop_peer(id, now);
        }
    }

    /// Starts a check, off the async workers, of the connections of nodes
    /// revoked since the last one (by `fedveil-server revoke`, from another
    /// process), and of those whose certificate expired or was superseded
    /// by a renewal (the node reconnects with its current one); the
    /// driver closes them when the answer comes. Their rounds go on
    /// without them, as after any dropout.
    fn check_certs(&mut self, tx: &mpsc::UnboundedSender<Inbound>) {
        let Some(nodes) = &self.nodes else { return };
        if self.checking {
            return;
        }
        self.checking = true;
        self.polls += 1;
        let live: Vec<(ClientId, CertInfo)> = self
            .peers
            .iter()
            .filter_map(|(&id, p)| Some((id, p.identity.clone()?)))
            .collect();
        let (nodes, tx) = (Arc::clone(nodes), tx.clone());
        let (last, polls) = (self.registry_version, self.polls);
        tokio::task::spawn_blocking(move || {
            let (version, ended) = ended_certs(&nodes.registry, &live, last, polls);
            let _ = tx.send(Inbound::CertsChecked(version, ended));
        });
    }

    /// Sends what the coordinator queued and handles its events; returns
    /// true when the run is over.
    async fn process(&mut self, observer: &mut dyn Observer) -> bool {
        let mut finished = false;
        loop {
            let mut progressed = false;
            // Durable first: a transmit may depend on it (a charged round).
            while let Some(d) = self.coordinator.poll_durable() {
                progressed = true;
                if let Some(state) = self.state.as_deref_mut()
                    && let Err(err) = state.persist(&d)
                {
                    tracing::error!(%err, "cannot save the run's state; stopping");
                    // Nothing queued after this point may go out.
                    while self.coordinator.poll_transmit().is_some() {}
                    while self.coordinator.poll_durable().is_some() {}
                    self.coordinator
                        .shutdown("the server cannot save its state");
                    self.report.interrupted = true;
                    break;
                }
            }
            let mut not_reading = Vec::new();
            while let Some(t) = self.coordinator.poll_transmit() {
                progressed = true;
                let message = match &self.faults {
                    Some(hook) => match hook.before_send(t.to, &t.message) {
                        Some(replaced) => Arc::new(replaced),
                        None => t.message,
                    },
                    None => t.message,
                };
                if let Some(peer) = self.peers.get(&t.to) {
                    let queued = peer.out.try_send(Outbound {
                        message,
                        close: t.close,
                    });
                    if let Err(mpsc::error::TrySendError::Full(_)) = queued {
                        not_reading.push(t.to);
                    }
                }
                if t.close {
                    self.peers.remove(&t.to);
                    self.unadmitted.remove(&t.to);
                }
            }
            for id in not_reading {
                if let Some(peer) = self.peers.get(&id) {
                    tracing::warn!(
                        client = id,
                        queued = self.connections.max_outbound_queued,
                        "the client does not read its messages; closing"
                    );
                    peer.connection.close(
                        CLOSE_REFUSED.into(),
                        b"this connection does not read its messages",
                    );
                }
                self.drop_peer(id, Instant::now());
            }
            while let Some(event) = self.coordinator.poll_event() {
                progressed = true;
                observer.on_event(&event);
                match event {
                    Event::Joined { id, .. } => {
                        self.unadmitted.remove(&id);
                    }
                    Event::RoundCompleted(summary) => {
                        let metrics = self.round_metrics(&summary).await;
                        if let Some(state) = self.state.as_deref_mut() {
                            state.record_round(&metrics);
                        }
                        observer.on_round(&metrics, self.coordinator.global_model());
                        self.report.rounds_completed += 1;
                        self.report.metrics.push(metrics);
                        self.coordinator.start_next_round(Instant::now());
                    }
                    Event::RoundFailed { .. } => {
                        self.report.rounds_failed += 1;
                        self.coordinator.start_next_round(Instant::now());
                    }
                    Event::Finished { .. } => finished = true,
                    _ => {}
                }
            }
            if !progressed {
                return finished || self.coordinator.is_finished();
            }
        }
    }

    async fn round_metrics(&mut self, s: &RoundSummary) -> RoundMetrics {
        let model = self.coordinator.global_model().to_vec();
        let mut evaluator = self
            .evaluator
            .take()
            .expect("evaluator present between rounds");
        let (evaluator, stats) = tokio::task::spawn_blocking(move || {
            let stats = evaluator.evaluate(&model);
            (evaluator, stats)
        })
        .await
        .expect("evaluation does not panic");
        self.evaluator = Some(evaluator);
        let (up, down) = (
            self.traffic.up.load(Ordering::Relaxed),
            self.traffic.down.load(Ordering::Relaxed),
        );
        let (last_up, last_down) = std::mem::replace(&mut self.last_traffic, (up, down));
        let client = s.client_eval.map(|e| e.scores).unwrap_or_default();
        RoundMetrics {
            round: s.round,
            accuracy: stats.scores.accuracy,
            loss: stats.loss,
            mse: stats.scores.mse,
            mae: stats.scores.mae,
            bytes_up: up - last_up,
            bytes_down: down - last_down,
            round_secs: s.started_at.elapsed().as_secs_f64(),
            cpu_busy: self.cpu.lap(),
            cohort: s.cohort.len(),
            contributors: s.contributors.len(),
            dropped: s.dropped.len(),
            timed_out: s.timed_out,
            examples: s.total_examples,
            train_loss: s.train_loss,
            secure: s.secure,
            client_accuracy: client.accuracy,
            client_loss: s.client_eval.map(|e| e.loss),
            client_mse: client.mse,
            client_mae: client.mae,
            epsilon: s.epsilon,
            clip_norm: s.clip_norm,
        }
    }

    async fn finish(mut self, endpoint: &quinn::Endpoint) -> RunReport {
        // Dropping the senders lets each writer flush, finish and close.
        self.peers.clear();
        for writer in self.writers.drain(..) {
            let _ = tokio::time::timeout(CLOSE_GRACE * 2, writer).await;
        }
        endpoint.close(CLOSE_OK.into(), b"run finished");
        self.report.final_model = self.coordinator.global_model().to_vec();
        self.report.epsilon = self.coordinator.ledger().map(|l| l.epsilon());
        self.report
    }
}

/// Which of `live` must close: expired certificates always, and, when the
/// registry changed since version `last` or every
/// [`REGISTRY_RECHECK_POLLS`] polls, those revoked or superseded. Fails
/// closed: an unreadable registry keeps nobody in.
fn ended_certs(
    registry: &crate::registry::Registry,
    live: &[(ClientId, CertInfo)],
    last: Option<i64>,
    polls: u64,
) -> (Option<i64>, Vec<EndedCert>) {
    use crate::registry::CertState;
    let wall = pki::unix_now();
    let version = match registry.data_version() {
        Ok(v) => Some(v),
        Err(err) => {
            tracing::warn!(%err, "cannot poll the node registry");
            None
        }
    };
    let recheck =
        version.is_some() && (version != last || polls.is_multiple_of(REGISTRY_RECHECK_POLLS));
    let ended = live
        .iter()
        .filter_map(|(id, info)| {
            let ended = |code, why| {
                Some(EndedCert {
                    id: *id,
                    name: info.name.clone(),
                    code,
                    why,
                })
            };
            if info.not_after <= wall {
                return ended(CLOSE_CERT_ENDED, "this connection's certificate expired; reconnect with the renewed one");
            }
            if !recheck {
                return None;
            }
            match registry.cert_state(&info.serial, &info.name, wall) {
                Ok(CertState::Live) => None,
                Ok(CertState::Superseded) => ended(CLOSE_CERT_ENDED, "this connection's certificate was superseded by a renewal; reconnect with the new one"),
                Ok(_) | Err(_) => ended(CLOSE_UNAUTHORIZED, "this node's certificate was revoked by the server's operator"),
            }
        })
        .collect();
    (version, ended)
}

/// Starts the handshake of `incoming`, unless too many are under way:
/// beyond `retry_above_handshakes` the peer must first prove its address
/// (a QUIC retry: one round trip, no TLS work for a spoofed source), and
/// beyond `max_handshakes` it is refused.
fn admit_handshake(
    incoming: quinn::Incoming,
    handshakes: &Arc<std::sync::atomic::AtomicUsize>,
    limits: ConnectionLimits,
    tx: &mpsc::UnboundedSender<Inbound>,
    nodes: &Option<Arc<NodeService>>,
) {
    let under_way = handshakes.load(Ordering::Relaxed);
    if under_way >= limits.max_handshakes {
        tracing::warn!(remote = %incoming.remote_address(), under_way, "too many handshakes; refusing");
        return incoming.refuse();
    }
    if under_way >= limits.retry_above_handshakes && !incoming.remote_address_validated() {
        if incoming.may_retry() {
            let _ = incoming.retry();
        } else {
            incoming.refuse();
        }
        return;
    }
    handshakes.fetch_add(1, Ordering::Relaxed);
    let handshakes = Arc::clone(handshakes);
    let (tx, nodes) = (tx.clone(), nodes.clone());
    tokio::spawn(async move {
        handshake(incoming, tx, nodes, limits.hello_timeout, &handshakes).await;
    });
}

async fn handshake(
    incoming: quinn::Incoming,
    tx: mpsc::UnboundedSender<Inbound>,
    nodes: Option<Arc<NodeService>>,
    hello_timeout: Duration,
    handshakes: &std::sync::atomic::AtomicUsize,
) {
    let done = || handshakes.fetch_sub(1, Ordering::Relaxed);
    let remote = incoming.remote_address();
    let connection = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(err)) => {
            done();
            return tracing::warn!(%remote, %err, "handshake failed");
        }
        Err(_) => {
            done();
            return tracing::warn!(%remote, "handshake timed out");
        }
    };
    done();
    let identity = quic::peer_certificate(&connection);
    if quic::negotiated_alpn(&connection).as_deref() == Some(quic::ENROL_ALPN) {
        return match nodes {
            Some(service) => crate::enrol::serve_enrolment(connection, service).await,
            None => connection.close(
                CLOSE_UNAUTHORIZED.into(),
                b"this server does not enrol nodes",
            ),
        };
    }
    if nodes.is_some() && identity.is_none() {
        tracing::warn!(%remote, "training connection without a client certificate; closing");
        return connection.close(
            CLOSE_UNAUTHORIZED.into(),
            b"no client certificate: this node is not enrolled (run `fedveil-client enroll`)",
        );
    }
    match tokio::time::timeout(hello_timeout, connection.accept_bi()).await {
        Ok(Ok((send, recv))) => {
            let _ = tx.send(Inbound::Connected(Box::new(NewConnection {
                connection,
                send,
                recv,
                identity,
            })));
        }
        Ok(Err(err)) => {
            tracing::info!(%remote, %err, "connection closed before opening its stream")
        }
        Err(_) => {
            tracing::warn!(%remote, "no stream opened in time; closing");
            connection.close(CLOSE_REFUSED.into(), b"no stream opened");
        }
    }
}

async fn read_loop(
    id: ClientId,
    recv: quinn::RecvStream,
    limits: FrameLimits,
    queued: Arc<tokio::sync::Semaphore>,
    tx: mpsc::UnboundedSender<Inbound>,
    traffic: Arc<Traffic>,
) {
    // A hello carries no payload: an unadmitted peer cannot make the
    // server buffer a model-sized frame.
    let mut reader = MessageReader::with_first_frame(recv, FrameLimits::hello(), limits);
    let mut counted = 0;
    loop {
        // Wait for room before reading on: a peer that floods stalls in
        // its own flow-control window, not in the server's memory.
        let Ok(permit) = Arc::clone(&queued).acquire_owned().await else {
            return;
        };
        let next = reader.next().await;
        traffic
            .up
            .fetch_add(reader.bytes_read() - counted, Ordering::Relaxed);
        counted = reader.bytes_read();
        let inbound = match next {
            Ok(Some(message)) => Inbound::Message(id, message, permit),
            Ok(None) => Inbound::Closed(id),
            Err(err) => Inbound::Failed(id, err),
        };
        let done = !matches!(inbound, Inbound::Message(..));
        if tx.send(inbound).is_err() || done {
            return;
        }
    }
}

async fn write_loop(
    mut send: quinn::SendStream,
    connection: quinn::Connection,
    mut out: mpsc::Receiver<Outbound>,
    traffic: Arc<Traffic>,
) {
    let mut close_code = CLOSE_OK;
    while let Some(Outbound { message, close }) = out.recv().await {
        match quic::write_message(&mut send, &message).await {
            Ok(n) => {
                traffic.down.fetch_add(n, Ordering::Relaxed);
            }
            Err(err) => {
                tracing::debug!(%err, "write failed");
                return;
            }
        }
        if close {
            if !matches!(&*message, Message::Goodbye(_)) {
                close_code = CLOSE_REFUSED;
            }
            break;
        }
    }
    let _ = send.finish();
    let _ = tokio::time::timeout(CLOSE_GRACE, send.stopped()).await;
    connection.close(close_code.into(), b"");
}
