//! The thin async driver around [`ClientSession`]: one QUIC connection, one
//! stream, training on a blocking thread.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fedveil_ml::model::ModelError;
use fedveil_net::quic::{self, CLOSE_OK, MessageReader, NetError, Rejection};
use fedveil_proto::round::{ClientEvent, ClientSession, SessionError};
use fedveil_proto::wire::{FrameLimits, Message};
use tokio::sync::Semaphore;

use fedveil_ml::train::LocalTrainer;

/// How many times to try connecting before giving up.
pub const DEFAULT_CONNECT_ATTEMPTS: u32 = 8;
/// How long one connection attempt (QUIC + TLS handshake) may take.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// The wait before the second attempt; it doubles after each failure.
pub const DEFAULT_CONNECT_BACKOFF: Duration = Duration::from_millis(500);
/// The longest wait between two attempts.
pub const MAX_CONNECT_BACKOFF: Duration = Duration::from_secs(30);

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The server's address.
    pub server: SocketAddr,
    /// Name checked against the server certificate (a DNS name or an IP).
    pub server_name: String,
    /// This node's name (from its certificate when enrolled).
    pub node_name: String,
    /// Bounds concurrent local training (simulations share one pool).
    pub training_slots: Option<Arc<Semaphore>>,
    /// Bounds concurrent handshakes (simulations: no connection storm).
    pub connect_slots: Option<Arc<Semaphore>>,
    /// How connecting is retried.
    pub retry: RetryPolicy,
    /// TLS config for this client (its own client certificate); `None`
    /// uses the endpoint's default.
    pub tls: Option<quinn::ClientConfig>,
    /// Signs this node's SecAgg keys and checks its neighbours' (set for
    /// enrolled nodes).
    pub attestor: Option<Arc<dyn fedveil_proto::secagg::KeyAttestor>>,
    /// Injected faults (simulations): consulted before each message leaves.
    pub faults: Option<Arc<dyn FaultHook>>,
    /// Seeds this session's secrets (SecAgg keys and masks, DP noise).
    /// `None`, as on every real node, draws them from the operating system;
    /// simulations set it so that a seed reproduces a run.
    pub session_seed: Option<u64>,
    /// The node's own privacy policy and ledger (every enrolled node has
    /// one; `None` holds rounds to nothing and keeps no ledger).
    pub privacy: Option<NodePrivacy>,
}

/// A node's privacy policy and the ledger it is held to.
#[derive(Debug, Clone)]
pub struct NodePrivacy {
    /// What every round must promise.
    pub policy: fedveil_proto::round::policy::NodePolicy,
    /// What the node has spent, over all its runs.
    pub ledger: crate::ledger::SharedLedger,
}

/// Fault injection for simulations: decides, before each message this node
/// sends, whether it goes out now, late, or never (the node vanishes).
pub trait FaultHook: Send + Sync + std::fmt::Debug {
    /// What happens to `message`, which is about to be sent.
    fn before_send(&self, message: &Message) -> Fault;
}

/// What a [`FaultHook`] does to one outgoing message.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Send it now.
    Send,
    /// Send after this delay (a straggler).
    Delay(Duration),
    /// Drop the connection instead of sending (a client that vanishes).
    Vanish,
    /// Send this instead (a malicious node: forged shares, keys, updates).
    Replace(Box<Message>),
}

impl ClientOptions {
    /// Options with the default retry policy and no shared slots.
    pub fn new(
        server: SocketAddr,
        server_name: impl Into<String>,
        node_name: impl Into<String>,
    ) -> Self {
        Self {
            server,
            server_name: server_name.into(),
            node_name: node_name.into(),
            training_slots: None,
            connect_slots: None,
            retry: RetryPolicy::default(),
            tls: None,
            attestor: None,
            faults: None,
            session_seed: None,
            privacy: None,
        }
    }

    /// Options for an enrolled node: mutual TLS with its certificate, and
    /// SecAgg keys bound to it. The node name comes from the certificate.
    pub fn enrolled(
        server: SocketAddr,
        server_name: impl Into<String>,
        identity: &fedveil_net::pki::NodeIdentity,
    ) -> Result<Self, NetError> {
        let mut opts = Self::new(server, server_name, identity.name());
        opts.tls = Some(quic::client_config(&identity.ca_pem(), Some(identity))?);
        opts.attestor = Some(Arc::new(fedveil_net::pki::NodeAttestor::new(
            identity.clone(),
        )));
        Ok(opts)
    }
}

/// Connection retries: a fleet that restarts together, or a server that is
/// briefly down or overloaded, must not turn into failed nodes. Waits grow
/// exponentially with full jitter, so retries spread out instead of
/// arriving as a second storm.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Connection attempts before giving up.
    pub attempts: u32,
    /// How long one attempt (QUIC and TLS handshake) may take.
    pub timeout: Duration,
    /// The longest wait before the first retry.
    pub initial_backoff: Duration,
    /// The longest wait between any two attempts.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: DEFAULT_CONNECT_ATTEMPTS,
            timeout: DEFAULT_CONNECT_TIMEOUT,
            initial_backoff: DEFAULT_CONNECT_BACKOFF,
            max_backoff: MAX_CONNECT_BACKOFF,
        }
    }
}

impl RetryPolicy {
    /// The longest wait before attempt `attempt + 1` (the first retry is
    /// attempt 1); the actual wait is uniform below it.
    pub fn backoff_cap(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(16);
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

/// What a client did in a run.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientReport {
    /// The id the server gave this client, once it joined.
    pub client_id: Option<u64>,
    /// Rounds whose update this client sent.
    pub rounds_trained: u64,
    /// Rounds the server completed, from its goodbye.
    pub server_rounds_completed: u64,
    /// Bytes written to the server.
    pub bytes_sent: u64,
    /// Bytes read from the server.
    pub bytes_received: u64,
}

/// Why a client's run ended early.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection failed.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The server broke the protocol, or asked what this node refuses.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// Local training or evaluation failed.
    #[error("local model: {0}")]
    Model(#[from] ModelError),
    /// The server closed the connection before saying goodbye.
    #[error("the server closed the connection before the run ended")]
    ServerClosed,
    /// No connection could be made.
    #[error("could not connect after {attempts} attempts: {last}")]
    Unreachable {
        /// Attempts made.
        attempts: u32,
        /// The last attempt's error.
        last: String,
    },
    /// The server refused this node (its certificate, revocation, or data).
    #[error("{0}")]
    Rejected(Rejection),
    /// A [`FaultHook`] made this node vanish in `round`.
    #[error("vanished in round {round} (injected fault)")]
    Vanished {
        /// The round it vanished in.
        round: u64,
        /// Rounds whose update this connection had sent before.
        rounds_trained: u64,
    },
}

impl ClientError {
    /// Promotes a transport failure that is really a refusal of this node
    /// (a TLS alert about its certificate, an unauthorized close) to
    /// [`ClientError::Rejected`], so the user reads what to do about it.
    fn explain(self) -> Self {
        let rejection = match &self {
            ClientError::Net(e) => e.rejection(),
            _ => None,
        };
        rejection.map_or(self, ClientError::Rejected)
    }
}

impl From<quinn::ConnectionError> for ClientError {
    fn from(e: quinn::ConnectionError) -> Self {
        ClientError::Net(NetError::Connection(e))
    }
}

/// Joins the server at `opts.server` and trains until the run ends.
pub async fn run(
    endpoint: &quinn::Endpoint,
    opts: &ClientOptions,
    trainer: Arc<dyn LocalTrainer>,
) -> Result<ClientReport, ClientError> {
    let connection = connect(endpoint, opts)
        .await
        .map_err(ClientError::explain)?;
    let (mut send, recv) = connection
        .open_bi()
        .await
        .map_err(|e| ClientError::from(e).explain())?;
    let mut reader = MessageReader::new(recv, FrameLimits::for_model(trainer.spec().param_count));
    let mut session = ClientSession::new(
        &opts.node_name,
        trainer.spec().clone(),
        trainer.num_examples() as u64,
        opts.session_seed
            .map_or_else(ClientSession::os_rng, |seed| {
                <rand_chacha::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(seed)
            }),
    );
    session = session.with_data(trainer.data_spec());
    if let Some(attestor) = &opts.attestor {
        session = session.with_attestor(Arc::clone(attestor));
    }
    if let Some(p) = &opts.privacy {
        let store = Box::new(p.ledger.clone());
        session = session.with_privacy_policy(p.policy.clone(), p.ledger.current(), store);
    }
    let mut report = ClientReport {
        client_id: None,
        rounds_trained: 0,
        server_rounds_completed: 0,
        bytes_sent: 0,
        bytes_received: 0,
    };
    let result = async {
        loop {
            while let Some(mut msg) = session.poll_transmit() {
                match opts.faults.as_ref().map_or(Fault::Send, |f| f.before_send(&msg)) {
                    Fault::Send => {}
                    Fault::Delay(delay) => tokio::time::sleep(delay).await,
                    Fault::Replace(forged) => msg = *forged,
                    Fault::Vanish => {
                        let round = msg.round().unwrap_or_default();
                        tracing::info!(node = %opts.node_name, round, "vanishing (injected fault)");
                        // The update counted at submit never left.
                        let unsent = u64::from(msg.payload().is_some());
                        return Err(ClientError::Vanished {
                            round,
                            rounds_trained: session.updates_sent() - unsent,
                        });
                    }
                }
                report.bytes_sent += quic::write_message(&mut send, &msg).await?;
            }
            let msg = match reader.next().await {
                Ok(Some(msg)) => msg,
                Ok(None) => return Err(ClientError::ServerClosed),
                // The server closes with CLOSE_OK only when the run is
                // over; its goodbye can be lost in that close.
                Err(err) if err.is_normal_close() => {
                    tracing::info!(node = %opts.node_name, "the server ended the run");
                    return Ok(());
                }
                Err(err) => return Err(err.into()),
            };
            report.bytes_received = reader.bytes_read();
            session.handle_message(msg)?;
            while let Some(event) = session.poll_event() {
                match event {
                    ClientEvent::Admitted { client_id } => {
                        report.client_id = Some(client_id);
                        tracing::info!(node = %opts.node_name, client_id, "admitted");
                    }
                    ClientEvent::Train { round, config, global_model } => {
                        let _permit = match &opts.training_slots {
                            Some(slots) => Some(slots.clone().acquire_owned().await.expect("semaphore open")),
                            None => None,
                        };
                        let t = Arc::clone(&trainer);
                        let trained = tokio::task::spawn_blocking(move || t.train_round(round, &config, &global_model))
                            .await
                            .expect("training does not panic");
                        match trained {
                            Ok((update, eval)) => {
                                tracing::debug!(node = %opts.node_name, round, loss = update.train_loss, "trained");
                                session.submit(update, Some(eval))?;
                            }
                            Err(err) => session.abandon(round, err.to_string())?,
                        }
                    }
                    ClientEvent::RoundLeft { round, reason } => {
                        tracing::warn!(node = %opts.node_name, round, %reason, "left the round; staying in the run");
                    }
                    ClientEvent::PrivacySpent { round, epsilon, unprotected_rounds } => {
                        tracing::info!(node = %opts.node_name, round, epsilon, unprotected_rounds, "node ledger charged");
                    }
                    ClientEvent::ServerError { code, detail } => {
                        tracing::warn!(node = %opts.node_name, ?code, %detail, "server refused a message");
                    }
                    ClientEvent::Finished { rounds_completed, reason } => {
                        tracing::info!(node = %opts.node_name, rounds_completed, %reason, "run finished");
                        report.server_rounds_completed = rounds_completed;
                        return Ok(());
                    }
                }
            }
        }
    }
    .await;
    report.client_id = session.client_id();
    report.rounds_trained = session.updates_sent();
    let _ = send.finish();
    connection.close(CLOSE_OK.into(), b"bye");
    result.map(|()| report).map_err(ClientError::explain)
}

/// Connects with retries (see [`RetryPolicy`]). Only failures that another
/// try can fix are retried: timeouts, resets and refusals; a certificate or
/// protocol failure fails at once.
pub(crate) async fn connect(
    endpoint: &quinn::Endpoint,
    opts: &ClientOptions,
) -> Result<quinn::Connection, ClientError> {
    let policy = opts.retry;
    let mut last = String::new();
    for attempt in 0..policy.attempts.max(1) {
        if attempt > 0 {
            let cap = policy.backoff_cap(attempt);
            let wait = cap.mul_f64(rand::random::<f64>());
            tracing::info!(node = %opts.node_name, attempt, wait_ms = wait.as_millis() as u64, %last, "retrying connection");
            tokio::time::sleep(wait).await;
        }
        let _permit = match &opts.connect_slots {
            Some(slots) => Some(slots.clone().acquire_owned().await.expect("semaphore open")),
            None => None,
        };
        let connecting = match &opts.tls {
            Some(tls) => endpoint.connect_with(tls.clone(), opts.server, &opts.server_name),
            None => endpoint.connect(opts.server, &opts.server_name),
        }
        .map_err(NetError::from)?;
        match tokio::time::timeout(policy.timeout, connecting).await {
            Ok(Ok(connection)) => return Ok(connection),
            Ok(Err(err)) if is_transient(&err) => last = err.to_string(),
            Ok(Err(err)) => return Err(err.into()),
            Err(_) => last = format!("no handshake within {:?}", policy.timeout),
        }
    }
    Err(ClientError::Unreachable {
        attempts: policy.attempts.max(1),
        last,
    })
}

fn is_transient(err: &quinn::ConnectionError) -> bool {
    use quinn::ConnectionError as E;
    match err {
        E::TimedOut | E::Reset => true,
        // A server that is full or restarting refuses politely.
        E::ApplicationClosed(close) => {
            close.error_code == quinn::VarInt::from_u32(quic::CLOSE_REFUSED)
        }
        _ => false,
    }
}
