//! The client side of a federated run, as a sans-IO state machine.
//!
//! [`ClientSession`] says hello, checks the welcome, turns each round start
//! into a [`ClientEvent::Train`] for the driver, and turns the driver's
//! result into the evaluation and update messages. It refuses what a server
//! must not send: a round start for an old round (a replay), a model of the
//! wrong size, messages before the welcome.

use std::collections::VecDeque;

use rand_chacha::ChaCha20Rng;

use super::policy::{
    ChargeError, LedgerStore, NodeLedger, NodePolicy, PolicyViolation, RoundCost, round_cost,
};
use crate::dp::{DpRound, PrivatizeError, Privatized};
use crate::secagg::client::{ClientError as SecAggError, SecAggClient};
use crate::wire::{
    DataSpec, Evaluation, Hello, Message, ModelSpec, PROTOCOL_VERSION, ReasonCode, RoundConfig,
    SecAgg, Update,
};

/// What the driver should do or know.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    /// The server admitted us.
    Admitted {
        /// The id the server gave us.
        client_id: u64,
    },
    /// Train on `global_model` and call [`ClientSession::submit`].
    Train {
        /// The round.
        round: u64,
        /// What to do in it.
        config: RoundConfig,
        /// The model to start from.
        global_model: Vec<f32>,
    },
    /// The server refused something we sent (the session may go on).
    ServerError {
        /// Why, as a reason code.
        code: ReasonCode,
        /// The server's explanation.
        detail: String,
    },
    /// We left `round` (and told the server) because of `reason`: a peer
    /// or the server broke secure aggregation, or the round asks what
    /// this node refuses. The session stays in the run.
    RoundLeft {
        /// The round left.
        round: u64,
        /// Why.
        reason: SessionError,
    },
    /// This round's update is leaving the node; its ledger (already saved)
    /// now reads `epsilon`.
    PrivacySpent {
        /// The round.
        round: u64,
        /// The node's epsilon over all its runs, at its policy's delta.
        epsilon: f64,
        /// Updates that left without noise the node can count.
        unprotected_rounds: u64,
    },
    /// The run is over.
    Finished {
        /// Rounds the server completed.
        rounds_completed: u64,
        /// Why the run ended for us.
        reason: String,
    },
}

/// Why the session, or one round of it, cannot go on.
/// [`ClientSession::handle_message`] returns the session-level ones (the
/// server deviates from the protocol: disconnect); the round-level ones
/// (secure aggregation, privacy, local training) arrive as
/// [`ClientEvent::RoundLeft`] and the run goes on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SessionError {
    /// The server refused this client.
    #[error("server refused us: {detail} ({code:?})")]
    Refused {
        /// Why, as a reason code.
        code: ReasonCode,
        /// The server's explanation.
        detail: String,
    },
    /// The server speaks another protocol version.
    #[error("server speaks protocol {0}, this client speaks {PROTOCOL_VERSION}")]
    Version(u16),
    /// The server trains another model than ours.
    #[error("server trains model '{}' ({} parameters), this client has '{}' ({} parameters)",
        .server.name, .server.param_count, .local.name, .local.param_count)]
    ModelMismatch {
        /// The server's model.
        server: Box<ModelSpec>,
        /// Ours.
        local: Box<ModelSpec>,
    },
    /// A message that does not belong at this point of the session.
    #[error("server sent a {0} message out of turn")]
    Unexpected(&'static str),
    /// A round number that is not after the last one.
    #[error("server sent round {got} after round {last} (replayed or out of order)")]
    StaleRound {
        /// The round number sent.
        got: u64,
        /// The last round seen.
        last: u64,
    },
    /// A global model of the wrong length.
    #[error("server's global model has {got} values, expected {expected}")]
    WrongModelLength {
        /// Values sent.
        got: usize,
        /// Values the model has.
        expected: u64,
    },
    /// An update was submitted for a round not being trained.
    #[error("no round {0} is being trained")]
    NotTraining(u64),
    /// The server broke secure aggregation.
    #[error("secure aggregation, round {round}: {source}")]
    SecAgg {
        /// The round.
        round: u64,
        /// What went wrong.
        source: SecAggError,
    },
    /// The update could not be privatized as the round asks.
    #[error("differential privacy, round {round}: {source}")]
    Privacy {
        /// The round.
        round: u64,
        /// What went wrong.
        source: PrivatizeError,
    },
    /// The round asks for something no node should do.
    #[error("round {round} cannot be trained as sent: {source}")]
    InvalidRound {
        /// The round.
        round: u64,
        /// What is wrong with its config.
        source: RoundConfigError,
    },
    /// The round would weaken the node's own privacy policy.
    #[error("round {round} refused: {source}")]
    Policy {
        /// The round.
        round: u64,
        /// The rule it breaks.
        source: PolicyViolation,
    },
    /// The node's ledger could not be saved, so the update stays here.
    #[error(
        "round {round}: the privacy ledger could not be saved ({detail}); the update is not sent"
    )]
    LedgerNotSaved {
        /// The round.
        round: u64,
        /// Why.
        detail: String,
    },
    /// Local training failed.
    #[error("local training failed in round {round}: {detail}")]
    Training {
        /// The round.
        round: u64,
        /// What failed.
        detail: String,
    },
    /// The round asks for distributed DP without secure aggregation.
    #[error(
        "round {0} asks for distributed DP without secure aggregation; refusing to send noised integers in the clear"
    )]
    DistributedDpInTheClear(u64),
}

/// Most local epochs a node accepts in one round.
pub const DEFAULT_MAX_LOCAL_EPOCHS: u32 = 1_000;
/// Largest minibatch a node accepts.
pub const DEFAULT_MAX_BATCH_SIZE: u32 = 1 << 16;

/// What a node accepts in a round config, checked before it trains: a
/// server's typo or malice must become a refused round, not a node that
/// trains for days, allocates without bound or panics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundLimits {
    /// Most local epochs.
    pub max_local_epochs: u32,
    /// Largest minibatch.
    pub max_batch_size: u32,
}

impl Default for RoundLimits {
    fn default() -> Self {
        Self {
            max_local_epochs: DEFAULT_MAX_LOCAL_EPOCHS,
            max_batch_size: DEFAULT_MAX_BATCH_SIZE,
        }
    }
}

/// A round config a node refuses.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RoundConfigError {
    /// Local epochs outside 1 and the node's limit.
    #[error("{got} local epochs, outside 1..={max}")]
    Epochs {
        /// Epochs asked for.
        got: u32,
        /// The node's limit.
        max: u32,
    },
    /// A batch size outside 1 and the node's limit.
    #[error("batch size {got}, outside 1..={max}")]
    BatchSize {
        /// Batch size asked for.
        got: u32,
        /// The node's limit.
        max: u32,
    },
    /// A step cap of zero.
    #[error("a cap of 0 local steps")]
    NoSteps,
    /// A learning rate or proximal weight that is not a finite number in
    /// range.
    #[error("{name} = {value} is not a finite number {range}")]
    OutOfRange {
        /// The field.
        name: &'static str,
        /// Its value.
        value: f32,
        /// What it must be.
        range: &'static str,
    },
    /// The DP step cannot be carried out.
    #[error("differential privacy: {0}")]
    Dp(#[from] crate::dp::DpRoundError),
}

impl RoundLimits {
    /// Checks `config` against these limits and the fields' own ranges.
    pub fn check(&self, config: &RoundConfig) -> Result<(), RoundConfigError> {
        if !(1..=self.max_local_epochs).contains(&config.local_epochs) {
            return Err(RoundConfigError::Epochs {
                got: config.local_epochs,
                max: self.max_local_epochs,
            });
        }
        if !(1..=self.max_batch_size).contains(&config.batch_size) {
            return Err(RoundConfigError::BatchSize {
                got: config.batch_size,
                max: self.max_batch_size,
            });
        }
        if config.max_local_steps == Some(0) {
            return Err(RoundConfigError::NoSteps);
        }
        if !(config.learning_rate.is_finite() && config.learning_rate > 0.0) {
            return Err(RoundConfigError::OutOfRange {
                name: "learning_rate",
                value: config.learning_rate,
                range: "above 0",
            });
        }
        if !(config.prox_mu.is_finite() && config.prox_mu >= 0.0) {
            return Err(RoundConfigError::OutOfRange {
                name: "prox_mu",
                value: config.prox_mu,
                range: "at least 0",
            });
        }
        if let Some(dp) = &config.dp {
            dp.validate()?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitingWelcome,
    Ready,
    /// Secure round: key exchange before training.
    KeyExchange(u64),
    Training(u64),
    /// Secure round: masked input sent, waiting for the unmask request.
    Unmasking(u64),
    Finished,
}

/// A secure round in progress: the protocol state, and the global model
/// and config held until the key exchange is done.
struct SecureRound {
    client: SecAggClient,
    pending_train: Option<(RoundConfig, Vec<f32>)>,
}

/// The client's round protocol.
pub struct ClientSession {
    spec: ModelSpec,
    state: State,
    client_id: Option<u64>,
    last_round: u64,
    outbox: VecDeque<Message>,
    events: VecDeque<ClientEvent>,
    /// Secret keys and seeds for secure aggregation come from here; drivers
    /// seed it from the OS.
    rng: ChaCha20Rng,
    secure: Option<SecureRound>,
    /// Config and model of a secure round whose setup has not arrived yet.
    pending_secure: Option<(RoundConfig, Vec<f32>)>,
    /// The DP step of the round being trained.
    round_dp: Option<DpRound>,
    /// Signs our SecAgg keys and checks our neighbours' (enrolled nodes).
    attestor: Option<std::sync::Arc<dyn crate::secagg::KeyAttestor>>,
    /// Rounds whose update (plain or masked) has been queued.
    updates_sent: u64,
    /// What this node accepts in a round config.
    limits: RoundLimits,
    /// The round this node last left: its remaining SecAgg+ messages,
    /// already in flight, are ignored.
    left: Option<u64>,
    /// The node's own privacy policy and ledger.
    guard: Option<PrivacyGuard>,
    /// What the round being trained costs the node (once known).
    round_cost: Option<RoundCost>,
}

/// A node's policy, its ledger and where the ledger is kept.
#[derive(Debug)]
struct PrivacyGuard {
    policy: NodePolicy,
    ledger: NodeLedger,
    store: Box<dyn LedgerStore>,
}

impl std::fmt::Debug for ClientSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSession")
            .field("state", &self.state)
            .field("client_id", &self.client_id)
            .field("last_round", &self.last_round)
            .finish_non_exhaustive()
    }
}

impl ClientSession {
    /// Starts a session; the hello is queued at once. `rng` must be a
    /// cryptographically secure generator seeded from the OS (see
    /// [`ClientSession::os_rng`]); tests may pass a seeded one.
    pub fn new(node_name: &str, spec: ModelSpec, num_examples: u64, rng: ChaCha20Rng) -> Self {
        let hello = Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            node_name: node_name.to_owned(),
            model: spec.clone(),
            num_examples,
            data: DataSpec::default(),
        });
        Self {
            spec,
            state: State::AwaitingWelcome,
            client_id: None,
            last_round: 0,
            outbox: VecDeque::from([hello]),
            events: VecDeque::new(),
            rng,
            secure: None,
            pending_secure: None,
            round_dp: None,
            attestor: None,
            updates_sent: 0,
            limits: RoundLimits::default(),
            left: None,
            guard: None,
            round_cost: None,
        }
    }

    /// Holds every round to the node's own `policy` and charges what it
    /// spends to `store` before each update leaves (see [`super::policy`]);
    /// `ledger` is the store's ledger now, for the checks before training.
    /// `policy` must be valid ([`NodePolicy::validate`]).
    pub fn with_privacy_policy(
        mut self,
        policy: NodePolicy,
        ledger: NodeLedger,
        store: Box<dyn LedgerStore>,
    ) -> Self {
        self.guard = Some(PrivacyGuard {
            policy,
            ledger,
            store,
        });
        self
    }

    /// The node's ledger, when it keeps one.
    pub fn ledger(&self) -> Option<&NodeLedger> {
        self.guard.as_ref().map(|g| &g.ledger)
    }

    /// Checks `cost` for the round against the policy; on a violation the
    /// round is left and `false` returned.
    fn admit_cost(&mut self, round: u64, cost: Option<RoundCost>, dp: Option<&DpRound>) -> bool {
        let Some(g) = &self.guard else {
            return true;
        };
        if let Some(cost) = &cost
            && let Err(source) = g.policy.check_cost(cost, dp, &g.ledger)
        {
            self.leave_round(round, SessionError::Policy { round, source });
            return false;
        }
        self.round_cost = cost;
        true
    }

    /// Records the round in the ledger and saves it: the update may leave
    /// only after this returns true.
    fn charge(&mut self, round: u64) -> bool {
        let Some(g) = &mut self.guard else {
            return true;
        };
        let Some(cost) = self.round_cost.take() else {
            let detail = "the round's privacy cost is unknown".to_owned();
            self.leave_round(round, SessionError::LedgerNotSaved { round, detail });
            return false;
        };
        match g.store.charge(round, &cost, &g.policy) {
            Ok(ledger) => {
                g.ledger = ledger;
                self.events.push_back(ClientEvent::PrivacySpent {
                    round,
                    epsilon: g.ledger.epsilon(),
                    unprotected_rounds: g.ledger.unprotected_rounds,
                });
                true
            }
            Err(ChargeError::Policy(source)) => {
                self.leave_round(round, SessionError::Policy { round, source });
                false
            }
            Err(ChargeError::Store(e)) => {
                let detail = e.to_string();
                self.leave_round(round, SessionError::LedgerNotSaved { round, detail });
                false
            }
        }
    }

    /// Describes the node's data in its hello, so that the server can
    /// refuse a node whose data does not match its own.
    pub fn with_data(mut self, data: DataSpec) -> Self {
        for m in &mut self.outbox {
            if let Message::Hello(hello) = m {
                hello.data = data.clone();
            }
        }
        self
    }

    /// Binds this session's SecAgg keys to an enrolled identity: ours are
    /// signed, and neighbours' keys without a valid signature from a
    /// distinct enrolled node are refused.
    pub fn with_attestor(
        mut self,
        attestor: std::sync::Arc<dyn crate::secagg::KeyAttestor>,
    ) -> Self {
        self.attestor = Some(attestor);
        self
    }

    /// A ChaCha20 generator seeded from the operating system.
    pub fn os_rng() -> ChaCha20Rng {
        rand::make_rng()
    }

    fn secagg_err(&self, round: u64, source: SecAggError) -> SessionError {
        SessionError::SecAgg { round, source }
    }

    /// Accepts round configs within `limits` only (default:
    /// [`RoundLimits::default`]).
    pub fn with_round_limits(mut self, limits: RoundLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Rounds whose update (plain, or masked under secure aggregation)
    /// this session has queued for the server.
    pub fn updates_sent(&self) -> u64 {
        self.updates_sent
    }

    /// Leaves `round`, whose local training failed: the server is told,
    /// and the session waits for the next round.
    pub fn abandon(&mut self, round: u64, detail: impl Into<String>) -> Result<(), SessionError> {
        if self.state != State::Training(round) {
            return Err(SessionError::NotTraining(round));
        }
        let detail = detail.into();
        self.leave_round(round, SessionError::Training { round, detail });
        Ok(())
    }

    /// The id the server gave us, once admitted.
    pub fn client_id(&self) -> Option<u64> {
        self.client_id
    }

    /// Whether the session is over.
    pub fn is_finished(&self) -> bool {
        self.state == State::Finished
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<Message> {
        self.outbox.pop_front()
    }

    /// The next thing the driver should do or know.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// Feeds one message from the server.
    pub fn handle_message(&mut self, message: Message) -> Result<(), SessionError> {
        match (self.state, message) {
            (_, Message::Goodbye(bye)) => {
                self.state = State::Finished;
                self.events.push_back(ClientEvent::Finished {
                    rounds_completed: bye.rounds_completed,
                    reason: bye.reason,
                });
            }
            (State::AwaitingWelcome, Message::Error(err)) => {
                self.state = State::Finished;
                return Err(SessionError::Refused {
                    code: err.code,
                    detail: err.detail,
                });
            }
            (_, Message::Error(err)) => self.events.push_back(ClientEvent::ServerError {
                code: err.code,
                detail: err.detail,
            }),
            (State::AwaitingWelcome, Message::Welcome(welcome)) => {
                if welcome.version != PROTOCOL_VERSION {
                    return Err(SessionError::Version(welcome.version));
                }
                if welcome.model != self.spec {
                    return Err(SessionError::ModelMismatch {
                        server: Box::new(welcome.model),
                        local: Box::new(self.spec.clone()),
                    });
                }
                self.client_id = Some(welcome.client_id);
                self.state = State::Ready;
                self.events.push_back(ClientEvent::Admitted {
                    client_id: welcome.client_id,
                });
            }
            (
                State::Ready | State::KeyExchange(_) | State::Training(_) | State::Unmasking(_),
                Message::RoundStart(start),
            ) => {
                if start.round <= self.last_round {
                    return Err(SessionError::StaleRound {
                        got: start.round,
                        last: self.last_round,
                    });
                }
                if start.global_model.len() as u64 != self.spec.param_count {
                    return Err(SessionError::WrongModelLength {
                        got: start.global_model.len(),
                        expected: self.spec.param_count,
                    });
                }
                // A newer round supersedes one still in progress (we were late).
                self.last_round = start.round;
                self.secure = None;
                if let Err(source) = self.limits.check(&start.config) {
                    let round = start.round;
                    self.leave_round(round, SessionError::InvalidRound { round, source });
                    return Ok(());
                }
                self.round_cost = None;
                if let Some(g) = &self.guard {
                    let round = start.round;
                    if let Err(source) = g.policy.check_start(&start.config) {
                        self.leave_round(round, SessionError::Policy { round, source });
                        return Ok(());
                    }
                    let len = self.spec.param_count as usize;
                    let cost = round_cost(start.config.dp.as_ref(), None, len);
                    if !self.admit_cost(round, cost, start.config.dp.as_ref()) {
                        return Ok(());
                    }
                }
                self.round_dp = start.config.dp.clone();
                if start.config.secure_aggregation {
                    self.state = State::KeyExchange(start.round);
                    self.pending_secure = Some((start.config, start.global_model));
                } else {
                    self.state = State::Training(start.round);
                    self.events.push_back(ClientEvent::Train {
                        round: start.round,
                        config: start.config,
                        global_model: start.global_model,
                    });
                }
            }
            (State::KeyExchange(round) | State::Unmasking(round), Message::SecAgg(msg))
                if msg.round() == round =>
            {
                self.on_secagg(round, msg)?;
            }
            // The rest of a round we left, sent before the server heard.
            (_, Message::SecAgg(msg)) if Some(msg.round()) == self.left => {}
            (_, other) => return Err(SessionError::Unexpected(other.kind())),
        }
        Ok(())
    }

    fn on_secagg(&mut self, round: u64, msg: SecAgg) -> Result<(), SessionError> {
        let id = self.client_id.unwrap_or_default();
        let result = match msg {
            SecAgg::Setup { setup, .. } if self.secure.is_none() => {
                let Some(pending_train) = self.pending_secure.take() else {
                    return Err(SessionError::Unexpected(
                        SecAgg::Setup { round, setup }.kind(),
                    ));
                };
                if let Some(g) = &self.guard {
                    if let Err(source) = g.policy.check_secagg(&setup.params) {
                        self.leave_round(round, SessionError::Policy { round, source });
                        return Ok(());
                    }
                    if self.round_cost.is_none() {
                        let len = self.spec.param_count as usize;
                        let dp = pending_train.0.dp.clone();
                        let cost = round_cost(dp.as_ref(), Some(&setup.params), len);
                        if !self.admit_cost(round, cost, dp.as_ref()) {
                            return Ok(());
                        }
                    }
                }
                let digest = crate::secagg::round_digest(round, &pending_train.0, &pending_train.1);
                let pending_train = Some(pending_train);
                let attestor = self.attestor.as_deref();
                SecAggClient::new(id, round, &setup, digest, &mut self.rng, attestor).map(
                    |(client, adv)| {
                        self.secure = Some(SecureRound {
                            client,
                            pending_train,
                        });
                        Some(adv)
                    },
                )
            }
            SecAgg::PeerKeys { peers, .. } if self.secure.is_some() => {
                let s = self.secure.as_mut().expect("checked");
                let attestor = self.attestor.as_deref();
                s.client
                    .on_peer_keys(peers, &mut self.rng, attestor)
                    .map(Some)
            }
            SecAgg::PeerShares { shares, .. } if self.secure.is_some() => {
                let s = self.secure.as_mut().expect("checked");
                s.client.on_peer_shares(shares).map(|()| {
                    if let Some((config, global_model)) = s.pending_train.take() {
                        self.state = State::Training(round);
                        self.events.push_back(ClientEvent::Train {
                            round,
                            config,
                            global_model,
                        });
                    }
                    None
                })
            }
            SecAgg::ConsistencyCheck { survivors, .. } if self.secure.is_some() => {
                let s = self.secure.as_mut().expect("checked");
                let attestor = self.attestor.as_deref();
                s.client.on_consistency_check(survivors, attestor).map(Some)
            }
            SecAgg::UnmaskRequest { signatures, .. } if self.secure.is_some() => {
                let s = self.secure.as_mut().expect("checked");
                let attestor = self.attestor.as_deref();
                let reply = s.client.on_unmask_request(&signatures, attestor).map(Some);
                if reply.is_ok() {
                    self.secure = None;
                    self.state = State::Ready;
                }
                reply
            }
            other => return Err(SessionError::Unexpected(other.kind())),
        };
        match result {
            Ok(Some(reply)) => {
                self.outbox.push_back(Message::SecAgg(reply));
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(source) => {
                // A peer's or the server's fault in this round: leave it,
                // and take the next round start afresh.
                self.leave_round(round, self.secagg_err(round, source));
                Ok(())
            }
        }
    }

    /// The driver's result for `round`: applies the round's DP step, then
    /// queues the evaluation and the update (or, in a secure round, the
    /// masked update alone: per-client metrics would leak what secure
    /// aggregation hides). Under DP no evaluation, loss or example count
    /// leaves the device either: each would be an un-noised release.
    ///
    /// A result for a round that was superseded is refused, never sent.
    pub fn submit(
        &mut self,
        mut update: Update,
        mut evaluation: Option<Evaluation>,
    ) -> Result<(), SessionError> {
        if self.state != State::Training(update.round) {
            return Err(SessionError::NotTraining(update.round));
        }
        let round = update.round;
        let len = self.spec.param_count as usize
            + self.round_dp.as_ref().map_or(0, DpRound::extra_values);
        let mut integers = None;
        if let Some(dp) = self.round_dp.clone() {
            let delta = std::mem::take(&mut update.delta);
            match dp.privatize(delta, &mut self.rng) {
                Ok((Privatized::Real(v), _)) => update.delta = v,
                Ok((Privatized::Integers(v), _)) => integers = Some(v),
                Err(source) => {
                    self.leave_round(round, SessionError::Privacy { round, source });
                    return Ok(());
                }
            }
            update.num_examples = 1;
            update.train_loss = f32::NAN;
            evaluation = None;
        }
        if let Some(s) = self.secure.as_mut() {
            let masked = match &integers {
                Some(v) => s.client.mask_integers(v, len),
                None => s.client.mask(&update.delta, update.num_examples, len),
            };
            return match masked {
                Ok(masked) => {
                    if !self.charge(round) {
                        return Ok(());
                    }
                    self.state = State::Unmasking(round);
                    self.outbox.push_back(Message::SecAgg(masked));
                    self.updates_sent += 1;
                    Ok(())
                }
                Err(source) => {
                    self.leave_round(round, self.secagg_err(round, source));
                    Ok(())
                }
            };
        }
        if integers.is_some() {
            self.leave_round(round, SessionError::DistributedDpInTheClear(round));
            return Ok(());
        }
        if !self.charge(round) {
            return Ok(());
        }
        self.state = State::Ready;
        if let Some(eval) = evaluation {
            self.outbox.push_back(Message::Evaluation(eval));
        }
        self.outbox.push_back(Message::Update(update));
        self.updates_sent += 1;
        Ok(())
    }

    /// Leaves `round` over `reason`: nothing more of it is sent, the
    /// server is told (it drops us from the round, as a dropout), and the
    /// driver hears of it. Round-level faults never end the session: one
    /// malicious peer must not be able to push honest nodes out of a run.
    fn leave_round(&mut self, round: u64, reason: SessionError) {
        self.left = Some(round);
        self.secure = None;
        self.pending_secure = None;
        self.round_dp = None;
        self.round_cost = None;
        self.state = State::Ready;
        self.outbox.push_back(Message::error(
            ReasonCode::LeftRound,
            format!("leaving round {round}: {reason}"),
        ));
        self.events
            .push_back(ClientEvent::RoundLeft { round, reason });
    }
}
