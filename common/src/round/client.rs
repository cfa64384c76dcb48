//! The client side of a federated run, as a sans-IO state machine.
//!
//! [`ClientSession`] says hello, checks the welcome, turns each round start
//! into a [`ClientEvent::Train`] for the driver, and turns the driver's
//! result into the evaluation and update messages. It refuses what a server
//! must not send: a round start for an old round (a replay), a model of the
//! wrong size, messages before the welcome.

use std::collections::VecDeque;

use crate::wire::{
    Evaluation, Hello, Message, ModelSpec, PROTOCOL_VERSION, ReasonCode, RoundConfig, Update,
};

/// What the driver should do or know.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    /// The server admitted us.
    Admitted { client_id: u64 },
    /// Train on `global_model` and call [`ClientSession::submit`].
    Train {
        round: u64,
        config: RoundConfig,
        global_model: Vec<f32>,
    },
    /// The server refused something we sent (the session may go on).
    ServerError { code: ReasonCode, detail: String },
    /// The run is over.
    Finished {
        rounds_completed: u64,
        reason: String,
    },
}

/// A protocol violation by the server; the driver should disconnect.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SessionError {
    #[error("server refused us: {detail} ({code:?})")]
    Refused { code: ReasonCode, detail: String },
    #[error("server speaks protocol {0}, this client speaks {PROTOCOL_VERSION}")]
    Version(u16),
    #[error("server trains model '{}' ({} parameters), this client has '{}' ({} parameters)",
        .server.name, .server.param_count, .local.name, .local.param_count)]
    ModelMismatch {
        server: Box<ModelSpec>,
        local: Box<ModelSpec>,
    },
    #[error("server sent a {0} message out of turn")]
    Unexpected(&'static str),
    #[error("server sent round {got} after round {last} (replayed or out of order)")]
    StaleRound { got: u64, last: u64 },
    #[error("server's global model has {got} values, expected {expected}")]
    WrongModelLength { got: usize, expected: u64 },
    #[error("no round {0} is being trained")]
    NotTraining(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitingWelcome,
    Ready,
    Training(u64),
    Finished,
}

/// The client's round protocol.
#[derive(Debug)]
pub struct ClientSession {
    spec: ModelSpec,
    state: State,
    client_id: Option<u64>,
    last_round: u64,
    outbox: VecDeque<Message>,
    events: VecDeque<ClientEvent>,
}

impl ClientSession {
    /// Starts a session; the hello is queued at once.
    pub fn new(node_name: &str, spec: ModelSpec, num_examples: u64) -> Self {
        let hello = Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            node_name: node_name.to_owned(),
            model: spec.clone(),
            num_examples,
        });
        Self {
            spec,
            state: State::AwaitingWelcome,
            client_id: None,
            last_round: 0,
            outbox: VecDeque::from([hello]),
            events: VecDeque::new(),
        }
    }

    pub fn client_id(&self) -> Option<u64> {
        self.client_id
    }

    pub fn is_finished(&self) -> bool {
        self.state == State::Finished
    }

    pub fn poll_transmit(&mut self) -> Option<Message> {
        self.outbox.pop_front()
    }

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
            (State::Ready | State::Training(_), Message::RoundStart(start)) => {
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
                // A newer round supersedes one still in training (we were late).
                self.last_round = start.round;
                self.state = State::Training(start.round);
                self.events.push_back(ClientEvent::Train {
                    round: start.round,
                    config: start.config,
                    global_model: start.global_model,
                });
            }
            (_, other) => return Err(SessionError::Unexpected(other.kind())),
        }
        Ok(())
    }

    /// The driver's result for `round`: queues the evaluation and the update.
    ///
    /// A result for a round that was superseded is refused, never sent.
    pub fn submit(
        &mut self,
        update: Update,
        evaluation: Option<Evaluation>,
    ) -> Result<(), SessionError> {
        if self.state != State::Training(update.round) {
            return Err(SessionError::NotTraining(update.round));
        }
        self.state = State::Ready;
        if let Some(eval) = evaluation {
            self.outbox.push_back(Message::Evaluation(eval));
        }
        self.outbox.push_back(Message::Update(update));
        Ok(())
    }
}
