//! The client side of a federated run, as a sans-IO state machine.
//!
//! [`ClientSession`] says hello, checks the welcome, turns each round start
//! into a [`ClientEvent::Train`] for the driver, and turns the driver's
//! result into the evaluation and update messages. It refuses what a server
//! must not send: a round start for an old round (a replay), a model of the
//! wrong size, messages before the welcome.

use std::collections::VecDeque;

use rand_chacha::ChaCha20Rng;

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
    /// The run is over.
    Finished {
        /// Rounds the server completed.
        rounds_completed: u64,
        /// Why the run ended for us.
        reason: String,
    },
}

/// A protocol violation by the server; the driver should disconnect.
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
    /// The round asks for distributed DP without secure aggregation.
    #[error(
        "round {0} asks for distributed DP without secure aggregation; refusing to send noised integers in the clear"
    )]
    DistributedDpInTheClear(u64),
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
            (_, other) => return Err(SessionError::Unexpected(other.kind())),
        }
        Ok(())
    }

    fn on_secagg(&mut self, round: u64, msg: SecAgg) -> Result<(), SessionError> {
        let id = self.client_id.unwrap_or_default();
        let result = match msg {
            SecAgg::Setup { setup, .. } if self.secure.is_none() => {
                let pending_train = self.pending_secure.take();
                let attestor = self.attestor.as_deref();
                SecAggClient::new(id, round, &setup, &mut self.rng, attestor).map(
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
            SecAgg::UnmaskRequest {
                survivors, dropped, ..
            } if self.secure.is_some() => {
                let s = self.secure.as_mut().expect("checked");
                let reply = s.client.on_unmask_request(&survivors, &dropped).map(Some);
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
                // Leave the round; the next round start begins afresh.
                self.secure = None;
                self.state = State::Ready;
                Err(self.secagg_err(round, source))
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
                    self.abandon_round();
                    return Err(SessionError::Privacy { round, source });
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
                    self.state = State::Unmasking(round);
                    self.outbox.push_back(Message::SecAgg(masked));
                    Ok(())
                }
                Err(source) => {
                    self.abandon_round();
                    Err(self.secagg_err(round, source))
                }
            };
        }
        if integers.is_some() {
            self.abandon_round();
            return Err(SessionError::DistributedDpInTheClear(round));
        }
        self.state = State::Ready;
        if let Some(eval) = evaluation {
            self.outbox.push_back(Message::Evaluation(eval));
        }
        self.outbox.push_back(Message::Update(update));
        Ok(())
    }

    /// Leaves the current round without sending anything more.
    fn abandon_round(&mut self) {
        self.secure = None;
        self.state = State::Ready;
    }
}
