//! The server side of a federated run, as a sans-IO state machine.
//!
//! Like `quinn_proto::Connection`, the [`Coordinator`] does no I/O and reads
//! no clock: the driver feeds it connections, messages and the current time,
//! and polls it for messages to send ([`Coordinator::poll_transmit`]),
//! things that happened ([`Coordinator::poll_event`]) and when it next needs
//! a timeout ([`Coordinator::poll_timeout`]). Every path (joins, dropouts,
//! replays, bad updates, timeouts) is therefore testable without a socket.
//!
//! A round: wait until `min_clients` are admitted, sample a cohort of
//! `max(1, round(fraction * admitted))`, send each the global model and round
//! config, fold each valid update into a streaming weighted mean, and finish
//! when every cohort member has answered, dropped out, or the round timed out.
//! The driver then evaluates and persists, and calls
//! [`Coordinator::start_next_round`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::aggregate::{AggregateError, ExactSum, MAX_WEIGHTED_MAGNITUDE, WeightedMean};
use crate::dp::{self, DpPlan, Mechanism, NodeSpend, PrivacyLedger};
use crate::secagg::server::{Outcome, SecAggServer, Stage as SecAggStage};
use crate::secagg::{
    DEFAULT_BITS, DEFAULT_CLIP, DEFAULT_EXPECTED_DROPOUT, DEFAULT_MAX_WEIGHT, SignatureCheck,
};
use crate::server_opt::ServerOptimizerConfig;
use crate::strategy::{
    AggregationInput, AggregationRule, Candidate, ClientEvalSummary, ClientEvaluation,
    ClientUpdate, RoundUpdates, Strategy, StrategyError, StrategyState,
};
use crate::wire::{
    CodecError, DataSpec, Evaluation, Goodbye, Hello, Message, ModelSpec, PROTOCOL_VERSION,
    ReasonCode, RoundConfig, RoundStart, SecAgg, SecAggParams, Update, Welcome,
};

/// A connection's identity within one server run.
pub type ClientId = u64;

/// Default: give up on stragglers after this long.
pub const DEFAULT_ROUND_TIMEOUT: Duration = Duration::from_secs(600);
/// Default cap on admitted clients.
pub const DEFAULT_MAX_CLIENTS: usize = 10_000;
/// Default cap on the weight one update may claim.
pub const DEFAULT_MAX_EXAMPLES_PER_UPDATE: u64 = 10_000_000;
/// Default number of failed rounds after which the run gives up.
pub const DEFAULT_MAX_FAILED_ROUNDS: u64 = 10;
/// Refusals an admitted client may draw in one round; the last one closes
/// its connection, so a node that keeps sending junk stops costing work.
pub const DEFAULT_MAX_REFUSALS_PER_ROUND: u32 = 3;
/// Smallest cohort secure aggregation runs with.
pub const MIN_SECAGG_COHORT: usize = 3;
/// Default time for each secure-aggregation stage other than training.
pub const DEFAULT_SECAGG_STAGE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default cap on the values a round may hold when its strategy needs every
/// update on its own (cohort × model length): 2^28 `f32`s, 1 GiB.
pub const DEFAULT_MAX_BUFFERED_VALUES: usize = 1 << 28;

/// Secure aggregation settings. Unset degree and threshold are derived per
/// round from the cohort size and the expected dropout rate.
#[derive(Debug, Clone, PartialEq)]
pub struct SecAggConfig {
    /// Neighbours per client (default: from the cohort size and dropout).
    pub degree: Option<u32>,
    /// Shares needed to reconstruct a secret (default: from the degree and dropout).
    pub threshold: Option<u32>,
    /// Bits of the modulus values are summed in.
    pub bits: u32,
    /// Update values are clamped to plus or minus this before encoding.
    pub clip: f32,
    /// Largest example count an update may be weighted by.
    pub max_weight: u64,
    /// Dropout rate the threshold must tolerate.
    pub expected_dropout: f64,
    /// Deadline of each stage except the masked input (which includes
    /// training and uses the round timeout).
    pub stage_timeout: Duration,
}

impl Default for SecAggConfig {
    fn default() -> Self {
        Self {
            degree: None,
            threshold: None,
            bits: DEFAULT_BITS,
            clip: DEFAULT_CLIP,
            max_weight: DEFAULT_MAX_WEIGHT,
            expected_dropout: DEFAULT_EXPECTED_DROPOUT,
            stage_timeout: DEFAULT_SECAGG_STAGE_TIMEOUT,
        }
    }
}

impl SecAggConfig {
    /// The parameters for a cohort of `n`.
    pub fn params(&self, n: usize) -> SecAggParams {
        let mut p = SecAggParams::recommended(n, self.expected_dropout);
        if let Some(k) = self.degree {
            p.degree = k;
            if self.threshold.is_none() {
                p.threshold =
                    (p.effective_degree(n) / 2 + 1).max(p.threshold.min(p.effective_degree(n)));
            }
        }
        if let Some(t) = self.threshold {
            p.threshold = t;
        }
        p.bits = self.bits;
        p.clip = self.clip;
        p.max_weight = self.max_weight;
        p
    }
}

/// How the server runs rounds.
#[derive(Debug, Clone, PartialEq)]
pub struct CoordinatorConfig {
    /// Rounds to run before saying goodbye.
    pub rounds: u64,
    /// Admitted clients needed before a round starts.
    pub min_clients: usize,
    /// Fraction C of admitted clients sampled into each round's cohort.
    pub fraction: f64,
    /// Time after which a round completes with the updates that arrived.
    pub round_timeout: Duration,
    /// Clients beyond this are refused with [`ReasonCode::ServerFull`].
    pub max_clients: usize,
    /// Largest `num_examples` an update may claim.
    pub max_examples_per_update: u64,
    /// Seeds cohort sampling.
    pub seed: u64,
    /// Sent to every cohort member.
    pub round: RoundConfig,
    /// Aggregate through SecAgg+ (the server sees only the sum).
    pub secagg: Option<SecAggConfig>,
    /// The run ends after this many failed rounds (no valid update, or a
    /// secure-aggregation abort), so a broken setup does not loop forever.
    pub max_failed_rounds: u64,
    /// Refusals an admitted client may draw in one round before its
    /// connection is closed (it may connect again).
    pub max_refusals_per_round: u32,
    /// Differential privacy: cohorts are then Poisson-sampled (each client
    /// independently with probability `fraction`, from OS randomness),
    /// updates unweighted, and every round charged to the privacy ledger.
    pub dp: Option<DpPlan>,
    /// How the round's updates are combined (the built-in strategies; a
    /// user strategy replaces this and `server_optimizer`, see
    /// [`CoordinatorBuilder::strategy`]).
    pub aggregation: AggregationRule,
    /// How the round's aggregate moves the global model.
    pub server_optimizer: ServerOptimizerConfig,
    /// Most values a round holds for a strategy that needs every update
    /// (cohort size × update length); a larger round fails, naming this.
    pub max_buffered_values: usize,
}

impl Default for CoordinatorConfig {
    /// Five plaintext FedAvg rounds of 3 or more clients, all sampled.
    fn default() -> Self {
        Self {
            rounds: 5,
            min_clients: MIN_SECAGG_COHORT,
            fraction: 1.0,
            round_timeout: DEFAULT_ROUND_TIMEOUT,
            max_clients: DEFAULT_MAX_CLIENTS,
            max_examples_per_update: DEFAULT_MAX_EXAMPLES_PER_UPDATE,
            seed: 0,
            round: RoundConfig::default(),
            secagg: None,
            max_failed_rounds: DEFAULT_MAX_FAILED_ROUNDS,
            max_refusals_per_round: DEFAULT_MAX_REFUSALS_PER_ROUND,
            dp: None,
            aggregation: AggregationRule::Mean,
            server_optimizer: ServerOptimizerConfig::default(),
            max_buffered_values: DEFAULT_MAX_BUFFERED_VALUES,
        }
    }
}

impl CoordinatorConfig {
    /// Checks the settings fit together (cohort sizes, secure aggregation, DP).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server_optimizer
            .validate()
            .map_err(ConfigError::strategy)?;
        self.aggregation.validate().map_err(ConfigError::strategy)?;
        self.check_strategy(self.aggregation.name(), self.aggregation.input())?;
        if self.min_clients == 0 {
            return Err(ConfigError("min_clients must be at least 1".into()));
        }
        if self.max_refusals_per_round == 0 {
            return Err(ConfigError(
                "max_refusals_per_round must be at least 1".into(),
            ));
        }
        if !(self.fraction > 0.0 && self.fraction <= 1.0) {
            return Err(ConfigError(format!(
                "fraction {} must be in (0, 1]",
                self.fraction
            )));
        }
        if self.round_timeout.is_zero() {
            return Err(ConfigError("round timeout must be positive".into()));
        }
        if self.max_clients < self.min_clients {
            return Err(ConfigError(format!(
                "max_clients {} is below min_clients {}",
                self.max_clients, self.min_clients
            )));
        }
        let r = &self.round;
        if r.local_epochs == 0 || r.batch_size == 0 || r.max_local_steps == Some(0) {
            return Err(ConfigError(
                "local epochs, batch size and max local steps must be at least 1".into(),
            ));
        }
        if !(r.learning_rate > 0.0 && r.learning_rate.is_finite()) {
            return Err(ConfigError(format!(
                "learning rate {} must be positive",
                r.learning_rate
            )));
        }
        if !(r.prox_mu >= 0.0 && r.prox_mu.is_finite()) {
            return Err(ConfigError(format!(
                "proximal weight mu {} must be non-negative",
                r.prox_mu
            )));
        }
        if r.secure_aggregation != self.secagg.is_some() {
            return Err(ConfigError(
                "round.secure_aggregation must match the secagg setting".into(),
            ));
        }
        if let Some(plan) = &self.dp {
            if (plan.sampling_rate - self.fraction).abs() > 1e-12 {
                return Err(ConfigError(format!(
                    "the DP plan assumes sampling rate {}, the server samples {}",
                    plan.sampling_rate, self.fraction
                )));
            }
            if plan.config.mechanism == Mechanism::Distributed {
                match &self.secagg {
                    None => {
                        return Err(ConfigError(
                            dp::DpConfigError::DistributedWithoutSecAgg.to_string(),
                        ));
                    }
                    Some(sa) if sa.bits != dp::DEFAULT_DP_BITS => {
                        return Err(ConfigError(format!(
                            "distributed DP is calibrated for {} secure-aggregation bits, not {}",
                            dp::DEFAULT_DP_BITS,
                            sa.bits
                        )));
                    }
                    Some(_) => {}
                }
            }
        }
        if let Some(sa) = &self.secagg {
            // Check the settings for the cohort this config expects.
            let n = self.cohort_size(self.min_clients);
            if n < MIN_SECAGG_COHORT {
                return Err(ConfigError(format!(
                    "secure aggregation needs cohorts of at least {MIN_SECAGG_COHORT} (with 2, each client could subtract its own input from the sum); this config samples {n}"
                )));
            }
            sa.params(n)
                .validate(n)
                .map_err(|e| ConfigError(format!("secure aggregation: {e}")))?;
            if sa.stage_timeout.is_zero() {
                return Err(ConfigError(
                    "secure-aggregation stage timeout must be positive".into(),
                ));
            }
        }
        Ok(())
    }

    /// Refuses a strategy this run's privacy settings rule out.
    fn check_strategy(&self, name: &str, input: AggregationInput) -> Result<(), ConfigError> {
        crate::strategy::check_fits(
            name,
            input,
            self.secagg.is_some(),
            self.dp.as_ref().map(|p| p.config.mechanism),
        )
        .map_err(|e| ConfigError(e.to_string()))
    }

    /// Cohort size for `admitted` clients.
    pub fn cohort_size(&self, admitted: usize) -> usize {
        ((self.fraction * admitted as f64).round() as usize).clamp(1, admitted.max(1))
    }
}

/// A configuration that cannot run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid server configuration: {0}")]
pub struct ConfigError(pub String);

impl ConfigError {
    fn strategy(err: StrategyError) -> Self {
        Self(err.to_string())
    }
}

/// A message for the driver to send, then optionally close the connection.
#[derive(Debug, Clone)]
pub struct Transmit {
    /// The client to send to.
    pub to: ClientId,
    /// Shared, so the global model is held once however large the cohort.
    pub message: Arc<Message>,
    /// Close the connection after sending (the peer is refused).
    pub close: bool,
}

/// What one completed round did.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundSummary {
    /// The round number.
    pub round: u64,
    /// The clients sampled for it.
    pub cohort: Vec<ClientId>,
    /// Clients whose update was folded in.
    pub contributors: Vec<ClientId>,
    /// Cohort members that left, timed out or sent a refused update.
    pub dropped: Vec<ClientId>,
    /// Sum of the FedAvg weights (with secure aggregation: decoded from the
    /// masked sum, in examples, capped per client at `max_weight`).
    pub total_examples: u64,
    /// Example-weighted mean of the contributors' last-epoch training loss
    /// (not known under secure aggregation).
    pub train_loss: Option<f32>,
    /// Whether the round ran through secure aggregation.
    pub secure: bool,
    /// Epsilon spent after this round (with DP on).
    pub epsilon: Option<f64>,
    /// The clip bound this round used (with DP on).
    pub clip_norm: Option<f64>,
    /// Example-weighted evaluation of the incoming global model on the
    /// clients' own data, if any client reported one.
    pub client_eval: Option<ClientEvalSummary>,
    /// Whether the round ended at its deadline.
    pub timed_out: bool,
    /// When the round started.
    pub started_at: Instant,
    /// When it finished.
    pub finished_at: Instant,
}

/// Things the driver may want to log or act on.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A client was admitted.
    Joined {
        /// Its id.
        id: ClientId,
        /// Its node name.
        node_name: String,
    },
    /// A client disconnected.
    Left {
        /// Its id.
        id: ClientId,
    },
    /// A round started.
    RoundStarted {
        /// The round.
        round: u64,
        /// The clients sampled for it.
        cohort: Vec<ClientId>,
    },
    /// A client's update was accepted.
    UpdateAccepted {
        /// The round.
        round: u64,
        /// The client.
        id: ClientId,
        /// The examples it trained on.
        num_examples: u64,
    },
    /// A client's message was refused (and told so).
    Rejected {
        /// The client.
        id: ClientId,
        /// Why, as a reason code.
        code: ReasonCode,
        /// The explanation it was given.
        detail: String,
    },
    /// Secure aggregation moved on to `stage`, waiting on `pending`
    /// clients (those who did not answer the last stage are out).
    SecAggStage {
        /// The round.
        round: u64,
        /// The stage now running.
        stage: SecAggStage,
        /// Clients it waits on.
        pending: usize,
    },
    /// The global model now includes this round's mean update.
    RoundCompleted(RoundSummary),
    /// No valid update arrived: the global model is unchanged.
    RoundFailed {
        /// The round.
        round: u64,
        /// Why it failed.
        reason: String,
    },
    /// The next round would exceed the privacy budget: the run ends.
    BudgetExhausted(dp::BudgetExceeded),
    /// All rounds are done; goodbyes are queued.
    Finished {
        /// Rounds completed.
        rounds_completed: u64,
    },
}

#[derive(Debug)]
struct ClientEntry {
    /// `None` until the client's hello is accepted.
    node_name: Option<String>,
    /// The enrolled identity the transport authenticated, if any.
    identity: Option<PeerIdentity>,
    /// Refusals drawn in the current round.
    refusals: u32,
    /// Whether it reported an error this round (one is heard; more count
    /// as refusals, so a node cannot flood the server's log).
    reported_error: bool,
}

/// Who a connection is, as mutual TLS proved it: the node name from its
/// client certificate and the certificate itself (DER).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The node name in the certificate.
    pub name: String,
    /// The certificate, DER (for SecAgg key signatures).
    pub certificate: Vec<u8>,
}

/// How a round's updates are combined.
enum Aggregation {
    /// Updates arrive in the clear and are folded into a weighted mean;
    /// kept as well when the strategy needs each one.
    Plain {
        mean: WeightedMean,
        kept: Option<Vec<KeptUpdate>>,
    },
    /// SecAgg+: the server sees only the masked sum.
    Secure(Box<SecAggServer>),
}

/// An accepted update, held for a strategy that aggregates individually.
struct KeptUpdate {
    client: ClientId,
    values: Vec<f32>,
    weight: f64,
}

struct RoundState {
    round: u64,
    cohort: Vec<ClientId>,
    pending: BTreeSet<ClientId>,
    contributors: Vec<ClientId>,
    dropped: Vec<ClientId>,
    /// Federated evaluation reports, one per cohort member at most.
    evaluations: BTreeMap<ClientId, ClientEvaluation>,
    agg: Aggregation,
    /// Example-weighted training loss, exact so that arrival order cannot
    /// change it.
    loss_sum: ExactSum,
    started_at: Instant,
    deadline: Instant,
    /// Some stage ended by timeout rather than by everyone answering.
    timed_out: bool,
}

impl std::fmt::Debug for RoundState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoundState")
            .field("round", &self.round)
            .field("cohort", &self.cohort.len())
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
enum Phase {
    /// Waiting for `min_clients` admitted clients.
    Waiting,
    Collecting(Box<RoundState>),
    /// A round finished; the driver calls `start_next_round`.
    BetweenRounds,
    Finished,
}

/// What the driver must make durable *before* it sends the transmits queued
/// with it: drain [`Coordinator::poll_durable`] first, then
/// [`Coordinator::poll_transmit`].
#[derive(Debug, Clone, PartialEq)]
pub enum Durable {
    /// A round was charged to the privacy ledger and is about to start
    /// (write-ahead: a crash after its cohort saw it must not un-spend it).
    Charged {
        /// The round.
        round: u64,
        /// The ledger with the round charged.
        ledger: PrivacyLedger,
        /// The nodes the round was sampled from, each charged `step` (at
        /// the ledger's orders) in its spend over all runs.
        population: Vec<String>,
        /// The round's RDP at the ledger's orders.
        step: Vec<f64>,
        /// The probability that whether it ran hinged on one node (see
        /// [`crate::dp::gate`]), charged to each of them too.
        gate: f64,
    },
    /// A round ended (completed or failed): the state to continue from.
    Checkpoint(Box<Checkpoint>),
}

/// Everything a run needs to continue after a restart exactly as it would
/// have: a crash between two checkpoints loses only the round in flight.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    /// The round the run continues with.
    pub next_round: u64,
    /// Rounds completed so far.
    pub rounds_completed: u64,
    /// Rounds failed so far.
    pub rounds_failed: u64,
    /// The global model.
    pub global_model: Vec<f32>,
    /// What the strategy keeps between rounds (optimizer moments...).
    pub strategy: StrategyState,
    /// The privacy ledger (with DP on).
    pub ledger: Option<PrivacyLedger>,
    /// The clip bound in force (with DP; it moves under adaptive clipping).
    pub clip_norm: Option<f64>,
    /// The cohort-sampling generator, so cohorts continue the same sequence.
    pub sampling_rng: RngState,
}

/// A ChaCha20 generator's position.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RngState {
    /// The generator's seed.
    pub seed: [u8; 32],
    /// Its stream.
    pub stream: u64,
    /// Its position in the stream, in 32-bit words.
    pub word_pos: u128,
}

impl RngState {
    fn of(rng: &ChaCha20Rng) -> Self {
        Self {
            seed: rng.get_seed(),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos(),
        }
    }

    fn rng(&self) -> ChaCha20Rng {
        let mut rng = ChaCha20Rng::from_seed(self.seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(self.word_pos);
        rng
    }
}

/// The server's round protocol.
#[derive(Debug)]
pub struct Coordinator {
    cfg: CoordinatorConfig,
    spec: ModelSpec,
    /// The data nodes must have, when the driver said.
    data: Option<DataSpec>,
    global: Vec<f32>,
    rounds_completed: u64,
    rounds_failed: u64,
    next_round: u64,
    clients: BTreeMap<ClientId, ClientEntry>,
    next_id: ClientId,
    rng: ChaCha20Rng,
    /// OS-seeded: DP cohort sampling and server noise must be unpredictable.
    secret_rng: ChaCha20Rng,
    ledger: Option<PrivacyLedger>,
    /// What each node has spent over all runs, and the most it may.
    population: Population,
    /// Checks nodes' signatures on arrival (enrolled deployments).
    signatures: Option<Arc<dyn SignatureCheck>>,
    /// The clip bound in force (with DP on; it moves under adaptive clipping).
    clip_norm: Option<f64>,
    strategy: Box<dyn Strategy>,
    durable: VecDeque<Durable>,
    phase: Phase,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
}

/// Sets up a [`Coordinator`]: the run's config and model spec, optionally
/// a user strategy, then a fresh start or a resume.
///
/// ```
/// use fedveil_proto::round::{CoordinatorConfig, Coordinator};
/// use fedveil_proto::strategy::{Strategy, AggregationInput};
/// use fedveil_proto::wire::ModelSpec;
///
/// /// Moves the model halfway to the clients' mean.
/// #[derive(Debug)]
/// struct Half;
/// impl Strategy for Half {
///     fn name(&self) -> String { "half".into() }
///     fn step(&mut self, _: u64, global: &mut [f32], mean: &[f32]) {
///         for (x, d) in global.iter_mut().zip(mean) { *x += d / 2.0; }
///     }
/// }
///
/// let spec = ModelSpec { name: "linear".into(), param_count: 3, shape_signature: [0; 32] };
/// let coordinator = Coordinator::builder(CoordinatorConfig::default(), spec)
///     .strategy(Box::new(Half))
///     .start(vec![0.0; 3])
///     .unwrap();
/// assert_eq!(coordinator.strategy_name(), "half");
/// ```
#[derive(Debug)]
pub struct CoordinatorBuilder {
    cfg: CoordinatorConfig,
    spec: ModelSpec,
    strategy: Option<Box<dyn Strategy>>,
    secret_seed: Option<u64>,
    data: Option<DataSpec>,
    population: Population,
    signatures: Option<Arc<dyn SignatureCheck>>,
}

/// The nodes' privacy over all runs: what each has spent (from the
/// server's registry) and the population budget no node may pass.
#[derive(Debug, Clone, Default)]
struct Population {
    spends: BTreeMap<String, NodeSpend>,
    budget: Option<f64>,
}

impl CoordinatorBuilder {
    /// Runs `strategy` instead of the config's built-in aggregation and
    /// server optimizer. It is checked against the privacy settings when
    /// the coordinator is built.
    pub fn strategy(mut self, strategy: Box<dyn Strategy>) -> Self {
        self.strategy = Some(strategy);
        self
    }

    /// Admits only nodes whose hello describes this data (shape, task,
    /// classes in order); others are refused with
    /// [`ReasonCode::DataMismatch`], naming both sides. Without it, any
    /// data the model fits is admitted.
    pub fn expect_data(mut self, data: DataSpec) -> Self {
        self.data = Some(data);
        self
    }

    /// What each node has spent over all earlier runs (the server's
    /// registry keeps it), and the most epsilon (at this run's delta) any
    /// node may reach over all runs. A node whose next round would take it
    /// past `budget` is not sampled: it is told
    /// ([`ReasonCode::BudgetSpent`]) and disconnected. Needs DP.
    pub fn population(mut self, spends: BTreeMap<String, NodeSpend>, budget: Option<f64>) -> Self {
        self.population = Population { spends, budget };
        self
    }

    /// Verifies each enrolled node's SecAgg key and survivor-set
    /// signatures with `check` as they arrive, so a node that signs badly
    /// is dropped alone (see [`SecAggServer::with_signature_check`]).
    /// Without it, only the nodes' neighbours check them.
    pub fn verify_signatures(mut self, check: Arc<dyn SignatureCheck>) -> Self {
        self.signatures = Some(check);
        self
    }

    /// See [`Coordinator::with_secret_seed`]: simulations only.
    pub fn secret_seed(mut self, seed: u64) -> Self {
        self.secret_seed = Some(seed);
        self
    }

    /// A new run from `global_model`, at round 1.
    pub fn start(self, global_model: Vec<f32>) -> Result<Coordinator, ConfigError> {
        self.start_at(global_model, 1)
    }

    /// A run that starts at round `first_round` with `global_model`.
    pub fn start_at(
        self,
        global_model: Vec<f32>,
        first_round: u64,
    ) -> Result<Coordinator, ConfigError> {
        let Self {
            mut cfg,
            spec,
            strategy,
            secret_seed,
            data,
            population,
            signatures,
        } = self;
        cfg.validate()?;
        // SecAgg+ needs a few clients, whatever the plan was made for: a
        // smaller cohort is skipped, and accounted as such (`dp::gate`).
        if let (Some(plan), Some(_)) = (cfg.dp.as_mut(), &cfg.secagg) {
            plan.min_cohort = plan.min_cohort.max(MIN_SECAGG_COHORT);
        }
        if let Some(budget) = population.budget {
            if cfg.dp.is_none() {
                return Err(ConfigError(
                    "a population budget needs DP: without it a run's epsilon is unbounded".into(),
                ));
            }
            if !(budget > 0.0 && budget.is_finite()) {
                return Err(ConfigError(format!(
                    "the population budget must be a positive number, got {budget}"
                )));
            }
        }
        cfg.round.dp = cfg.dp.as_ref().map(|p| p.round.clone());
        let ledger = cfg.dp.as_ref().map(DpPlan::ledger);
        let clip_norm = cfg.dp.as_ref().map(|p| p.config.clip_norm);
        if global_model.len() as u64 != spec.param_count {
            return Err(ConfigError(format!(
                "initial model has {} values, the model spec says {}",
                global_model.len(),
                spec.param_count
            )));
        }
        let strategy = match strategy {
            Some(s) => {
                cfg.check_strategy(&s.name(), s.input())?;
                s
            }
            None => cfg
                .aggregation
                .strategy(cfg.server_optimizer, global_model.len()),
        };
        let rng = ChaCha20Rng::seed_from_u64(cfg.seed);
        let secret_rng = match secret_seed {
            Some(seed) => ChaCha20Rng::seed_from_u64(seed),
            None => rand::make_rng(),
        };
        Ok(Coordinator {
            cfg,
            spec,
            data,
            global: global_model,
            rounds_completed: first_round.saturating_sub(1),
            rounds_failed: 0,
            next_round: first_round.max(1),
            clients: BTreeMap::new(),
            next_id: 1,
            rng,
            secret_rng,
            ledger,
            population,
            signatures,
            clip_norm,
            strategy,
            durable: VecDeque::new(),
            phase: Phase::Waiting,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        })
    }

    /// Continues a run from `checkpoint` (after a restart). `ledger` is the
    /// latest one made durable, which may hold rounds charged after the
    /// checkpoint (started, then lost in a crash): the run continues after
    /// them, so no round number is charged twice.
    pub fn resume(
        self,
        checkpoint: Checkpoint,
        ledger: Option<PrivacyLedger>,
    ) -> Result<Coordinator, ConfigError> {
        let Checkpoint {
            next_round,
            rounds_completed,
            rounds_failed,
            global_model,
            strategy,
            ledger: checkpoint_ledger,
            clip_norm,
            sampling_rng,
        } = checkpoint;
        let mut c = self.start_at(global_model, next_round)?;
        c.rounds_completed = rounds_completed;
        c.rounds_failed = rounds_failed;
        c.strategy
            .restore(strategy)
            .map_err(ConfigError::strategy)?;
        c.rng = sampling_rng.rng();
        if c.cfg.dp.is_some() {
            c.clip_norm = clip_norm.or(c.clip_norm);
        }
        let newest = match (ledger, checkpoint_ledger) {
            (Some(a), Some(b)) => Some(if a.rounds_charged() >= b.rounds_charged() {
                a
            } else {
                b
            }),
            (a, b) => a.or(b),
        };
        if let Some(ledger) = newest {
            c.continue_after(ledger)?;
        }
        Ok(c)
    }

    /// A run that charged rounds to `ledger` but crashed before its first
    /// checkpoint: it starts from `global_model`, after those rounds, so
    /// none is charged twice.
    pub fn start_after(
        self,
        global_model: Vec<f32>,
        ledger: PrivacyLedger,
    ) -> Result<Coordinator, ConfigError> {
        let mut c = self.start_at(global_model, 1)?;
        c.continue_after(ledger)?;
        Ok(c)
    }
}

impl Coordinator {
    /// Takes over `ledger` and moves the next round past its last charge.
    fn continue_after(&mut self, ledger: PrivacyLedger) -> Result<(), ConfigError> {
        let last = ledger.entries.last().map_or(0, |e| e.round);
        self.restore_ledger(ledger)?;
        self.next_round = self.next_round.max(last + 1);
        Ok(())
    }

    /// Sets up a coordinator; see [`CoordinatorBuilder`].
    pub fn builder(cfg: CoordinatorConfig, spec: ModelSpec) -> CoordinatorBuilder {
        CoordinatorBuilder {
            cfg,
            spec,
            strategy: None,
            secret_seed: None,
            data: None,
            population: Population::default(),
            signatures: None,
        }
    }

    /// A coordinator with the config's built-in strategy that starts at
    /// round `first_round` (1 for a new run) with `global_model` as the
    /// current global model.
    pub fn new(
        cfg: CoordinatorConfig,
        spec: ModelSpec,
        global_model: Vec<f32>,
        first_round: u64,
    ) -> Result<Self, ConfigError> {
        Self::builder(cfg, spec).start_at(global_model, first_round)
    }

    /// Continues a run with the config's built-in strategy; see
    /// [`CoordinatorBuilder::resume`].
    pub fn resume(
        cfg: CoordinatorConfig,
        spec: ModelSpec,
        checkpoint: Checkpoint,
        ledger: Option<PrivacyLedger>,
    ) -> Result<Self, ConfigError> {
        Self::builder(cfg, spec).resume(checkpoint, ledger)
    }

    /// Seeds the generator behind DP noise and Poisson cohort sampling,
    /// which is otherwise drawn from the operating system. Simulations only:
    /// it makes a seeded run reproducible, and it makes the noise
    /// predictable to anyone who knows the seed, so no deployment sets it.
    pub fn with_secret_seed(mut self, seed: u64) -> Self {
        self.secret_rng = ChaCha20Rng::seed_from_u64(seed);
        self
    }

    /// The strategy's name, for logs.
    pub fn strategy_name(&self) -> String {
        self.strategy.name()
    }

    /// The run's configuration.
    pub fn config(&self) -> &CoordinatorConfig {
        &self.cfg
    }

    /// The model being trained.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The current global model.
    pub fn global_model(&self) -> &[f32] {
        &self.global
    }

    /// Rounds completed so far.
    pub fn rounds_completed(&self) -> u64 {
        self.rounds_completed
    }

    /// The privacy ledger (with DP on).
    pub fn ledger(&self) -> Option<&PrivacyLedger> {
        self.ledger.as_ref()
    }

    /// The clip bound the next round uses (with DP on).
    pub fn clip_norm(&self) -> Option<f64> {
        self.clip_norm
    }

    /// The config sent to this round's cohort: the run's, with the clip
    /// bound in force.
    fn round_config(&self) -> RoundConfig {
        let mut config = self.cfg.round.clone();
        if let (Some(dp), Some(c)) = (&mut config.dp, self.clip_norm) {
            *dp = dp.with_clip_norm(c);
        }
        config
    }

    /// Length of the vectors aggregated: the model, then what DP appends.
    fn aggregate_len(&self) -> usize {
        self.global.len()
            + self
                .cfg
                .round
                .dp
                .as_ref()
                .map_or(0, dp::DpRound::extra_values)
    }

    /// The state a restart continues from.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            next_round: self.next_round,
            rounds_completed: self.rounds_completed,
            rounds_failed: self.rounds_failed,
            global_model: self.global.clone(),
            strategy: self.strategy.state(),
            ledger: self.ledger.clone(),
            clip_norm: self.clip_norm,
            sampling_rng: RngState::of(&self.rng),
        }
    }

    /// The next thing to make durable (before sending any transmit).
    pub fn poll_durable(&mut self) -> Option<Durable> {
        self.durable.pop_front()
    }

    /// The round that would start next.
    pub fn next_round(&self) -> u64 {
        self.next_round
    }

    /// Queues a checkpoint after a round ends.
    fn commit(&mut self) {
        self.durable
            .push_back(Durable::Checkpoint(Box::new(self.checkpoint())));
    }

    /// Continues a run with the ledger it had spent so far (after a
    /// restart); refused if it was kept for another delta or order grid, or
    /// if it has already spent this run's budget.
    pub fn restore_ledger(&mut self, ledger: PrivacyLedger) -> Result<(), ConfigError> {
        match &self.ledger {
            Some(fresh) if fresh.compatible_with(&ledger) => {
                let budget = fresh.budget;
                let spent = ledger.epsilon();
                if spent >= budget {
                    return Err(ConfigError(
                        dp::DpConfigError::BudgetSpent { spent, budget }.to_string(),
                    ));
                }
                let mut ledger = ledger;
                ledger.budget = budget;
                self.ledger = Some(ledger);
                Ok(())
            }
            Some(_) => Err(ConfigError(
                "the saved privacy ledger uses another delta or order grid".into(),
            )),
            None => Err(ConfigError(
                "a privacy ledger was saved but DP is off for this run".into(),
            )),
        }
    }

    /// Admitted clients.
    pub fn admitted(&self) -> usize {
        self.clients
            .values()
            .filter(|c| c.node_name.is_some())
            .count()
    }

    /// Whether the run is over.
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Finished)
    }

    /// The round being collected, if any.
    pub fn current_round(&self) -> Option<u64> {
        match &self.phase {
            Phase::Collecting(r) => Some(r.round),
            _ => None,
        }
    }

    /// A new connection; it must say hello before anything else.
    pub fn connect(&mut self) -> ClientId {
        self.connect_as(None)
    }

    /// A new connection authenticated as `identity`: its hello must use
    /// the same node name, only one connection per node is admitted, and
    /// its SecAgg keys must be signed with that certificate.
    pub fn connect_as(&mut self, identity: Option<PeerIdentity>) -> ClientId {
        let id = self.next_id;
        self.next_id += 1;
        self.clients.insert(
            id,
            ClientEntry {
                node_name: None,
                identity,
                refusals: 0,
                reported_error: false,
            },
        );
        id
    }

    /// The connection is gone (closed, lost or refused).
    pub fn disconnect(&mut self, id: ClientId, now: Instant) {
        let Some(entry) = self.clients.remove(&id) else {
            return;
        };
        if entry.node_name.is_some() {
            self.events.push_back(Event::Left { id });
        }
        self.withdraw(id, now);
    }

    /// `id` will not contribute to the current round (it left, or said it
    /// cannot): the round goes on without it instead of waiting for the
    /// timeout.
    fn withdraw(&mut self, id: ClientId, now: Instant) {
        if let Phase::Collecting(r) = &mut self.phase {
            match &mut r.agg {
                Aggregation::Secure(sa) => {
                    sa.drop_client(id);
                    self.maybe_advance_secagg(now);
                }
                Aggregation::Plain { .. } => {
                    if r.pending.remove(&id) {
                        r.dropped.push(id);
                        self.maybe_finish(now);
                    }
                }
            }
        }
    }

    /// The connection's bytes could not be decoded: tell it and close it.
    pub fn codec_error(&mut self, id: ClientId, err: &CodecError, now: Instant) {
        self.refuse(id, err.reason(), err.to_string(), true);
        self.disconnect(id, now);
    }

    /// Feeds one decoded message from `id`.
    pub fn handle_message(&mut self, id: ClientId, message: Message, now: Instant) {
        let Some(entry) = self.clients.get(&id) else {
            return;
        };
        let admitted = entry.node_name.is_some();
        match message {
            Message::Hello(hello) if !admitted => self.on_hello(id, hello, now),
            Message::Update(update) if admitted => self.on_update(id, update, now),
            Message::Evaluation(eval) if admitted => self.on_evaluation(id, eval),
            Message::SecAgg(msg) if admitted => self.on_secagg(id, msg, now),
            Message::Error(err) if admitted => {
                let first = self
                    .clients
                    .get_mut(&id)
                    .is_some_and(|c| !std::mem::replace(&mut c.reported_error, true));
                if first {
                    tracing::warn!(client = id, code = ?err.code, detail = %err.detail, "client reported an error");
                    self.withdraw(id, now);
                } else {
                    let detail = "an error was already reported this round".to_owned();
                    self.refuse(id, ReasonCode::UnexpectedMessage, detail, false);
                }
            }
            other => {
                let detail = format!(
                    "a {} message is not expected {}",
                    other.kind(),
                    if admitted { "now" } else { "before hello" }
                );
                self.refuse(id, ReasonCode::UnexpectedMessage, detail, !admitted);
                if !admitted {
                    self.disconnect(id, now);
                }
            }
        }
    }

    /// Call when `poll_timeout` has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Phase::Collecting(r) = &mut self.phase else {
            return;
        };
        if now < r.deadline {
            return;
        }
        r.timed_out = true;
        if matches!(r.agg, Aggregation::Secure(_)) {
            // The stage ends without those who did not answer.
            self.advance_secagg(now, true);
        } else {
            self.finish_round(now, true);
        }
    }

    /// When the driver must call `handle_timeout` next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Collecting(r) => Some(r.deadline),
            _ => None,
        }
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event to log or act on.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// After a round completed or failed: start the next one (or finish).
    pub fn start_next_round(&mut self, now: Instant) {
        if matches!(self.phase, Phase::BetweenRounds) {
            self.phase = Phase::Waiting;
            self.maybe_start(now);
        }
    }

    /// Ends the run early (operator shutdown): the current round is abandoned.
    pub fn shutdown(&mut self, reason: &str) {
        self.phase = Phase::Finished;
        self.say_goodbye(reason);
    }

    fn on_hello(&mut self, id: ClientId, hello: Hello, now: Instant) {
        let identity = self.clients.get(&id).and_then(|c| c.identity.as_ref());
        let already = identity.is_some_and(|me| {
            self.clients.iter().any(|(&other, c)| {
                other != id
                    && c.node_name.is_some()
                    && c.identity.as_ref().is_some_and(|i| i.name == me.name)
            })
        });
        let refusal = if let Some(me) = identity.filter(|i| i.name != hello.node_name) {
            Some((
                ReasonCode::IdentityMismatch,
                format!(
                    "hello names node '{}' but the client certificate is for '{}'",
                    hello.node_name, me.name
                ),
            ))
        } else if already {
            Some((
                ReasonCode::AlreadyConnected,
                format!("node '{}' is already connected", hello.node_name),
            ))
        } else if hello.version != PROTOCOL_VERSION {
            Some((
                ReasonCode::VersionMismatch,
                format!(
                    "client speaks protocol {}, server speaks {PROTOCOL_VERSION}",
                    hello.version
                ),
            ))
        } else if let Some(expected) = self.data.as_ref().filter(|d| **d != hello.data) {
            Some((
                ReasonCode::DataMismatch,
                format!(
                    "node '{}' has {}; the server's model is for {expected}",
                    hello.node_name, hello.data
                ),
            ))
        } else if hello.model != self.spec {
            Some((
                ReasonCode::ModelMismatch,
                format!(
                    "client model '{}' ({} parameters) differs from the server's '{}' ({} parameters)",
                    hello.model.name,
                    hello.model.param_count,
                    self.spec.name,
                    self.spec.param_count
                ),
            ))
        } else if self.admitted() >= self.cfg.max_clients {
            Some((
                ReasonCode::ServerFull,
                format!("server is full ({} clients)", self.cfg.max_clients),
            ))
        } else if matches!(self.phase, Phase::Finished) {
            Some((ReasonCode::Shutdown, "the run is over".into()))
        } else {
            None
        };
        if let Some((code, detail)) = refusal {
            self.refuse(id, code, detail, true);
            self.disconnect(id, now);
            return;
        }
        if let Some(entry) = self.clients.get_mut(&id) {
            entry.node_name = Some(hello.node_name.clone());
        }
        self.send(
            id,
            Message::Welcome(Welcome {
                version: PROTOCOL_VERSION,
                client_id: id,
                model: self.spec.clone(),
            }),
        );
        self.events.push_back(Event::Joined {
            id,
            node_name: hello.node_name,
        });
        self.maybe_start(now);
    }

    fn on_update(&mut self, id: ClientId, update: Update, now: Instant) {
        let max_examples = self.cfg.max_examples_per_update;
        let Phase::Collecting(r) = &mut self.phase else {
            let detail = format!(
                "update for round {} arrived when no round is open",
                update.round
            );
            return self.refuse(id, ReasonCode::StaleRound, detail, false);
        };
        if update.round != r.round {
            let detail = format!(
                "update for round {}, current round is {}",
                update.round, r.round
            );
            return self.refuse(id, ReasonCode::StaleRound, detail, false);
        }
        if !r.cohort.contains(&id) {
            let detail = format!("client {id} was not sampled for round {}", r.round);
            return self.refuse(id, ReasonCode::NotInCohort, detail, false);
        }
        let Aggregation::Plain { mean: sum, kept } = &mut r.agg else {
            let detail = "this round uses secure aggregation; plain updates are refused".to_owned();
            return self.refuse(id, ReasonCode::UnexpectedMessage, detail, false);
        };
        if !r.pending.contains(&id) {
            let detail = format!(
                "round {} already has this client's update or it was dropped",
                r.round
            );
            return self.refuse(id, ReasonCode::DuplicateUpdate, detail, false);
        }
        let checked = if update.num_examples == 0 || update.num_examples > max_examples {
            Err((
                ReasonCode::BadWeight,
                format!(
                    "num_examples {} outside 1..={max_examples}",
                    update.num_examples
                ),
            ))
        } else {
            // Under DP updates are unweighted; a trusted (central-DP) server
            // also enforces the clip itself.
            let mut delta = update.delta;
            let weight = match &self.cfg.dp {
                None => update.num_examples as f64,
                Some(plan) => {
                    if plan.config.mechanism == Mechanism::Central
                        && delta.iter().all(|v| v.is_finite())
                    {
                        let model_len = self.global.len().min(delta.len());
                        let (model, indicator) = delta.split_at_mut(model_len);
                        dp::clip::clip_l2(model, self.clip_norm.unwrap_or(plan.config.clip_norm));
                        // An indicator is +-1/2; a larger one would buy one
                        // client extra sway over the bound.
                        for v in indicator {
                            *v = v.clamp(-0.5, 0.5);
                        }
                    }
                    1.0
                }
            };
            sum.add(&delta, weight)
                .map(|()| {
                    if let Some(kept) = kept {
                        kept.push(KeptUpdate {
                            client: id,
                            values: delta,
                            weight,
                        });
                    }
                })
                .map_err(|e| (reason_for(&e), e.to_string()))
        };
        r.pending.remove(&id);
        match checked {
            Ok(()) => {
                r.contributors.push(id);
                let loss = if update.train_loss.is_finite() {
                    update.train_loss
                } else {
                    0.0
                };
                // An absurd loss is left out of the mean rather than
                // refusing a valid update over a reported statistic.
                r.loss_sum.add(f64::from(loss) * update.num_examples as f64);
                self.events.push_back(Event::UpdateAccepted {
                    round: r.round,
                    id,
                    num_examples: update.num_examples,
                });
            }
            Err((code, detail)) => {
                r.dropped.push(id);
                self.refuse(id, code, detail, false);
            }
        }
        self.maybe_finish(now);
    }

    fn on_secagg(&mut self, id: ClientId, msg: SecAgg, now: Instant) {
        let Phase::Collecting(r) = &mut self.phase else {
            let detail = format!("{} arrived when no round is open", msg.kind());
            return self.refuse(id, ReasonCode::StaleRound, detail, false);
        };
        let Aggregation::Secure(sa) = &mut r.agg else {
            let detail = format!("round {} does not use secure aggregation", r.round);
            return self.refuse(id, ReasonCode::UnexpectedMessage, detail, false);
        };
        let certificate = self
            .clients
            .get(&id)
            .and_then(|c| c.identity.as_ref())
            .map(|i| &i.certificate);
        if let (Some(cert), SecAgg::AdvertiseKeys { keys, .. }) = (certificate, &msg)
            && keys.attestation.as_ref().map(|a| &a.certificate) != Some(cert)
        {
            // Peers would refuse these keys anyway; refusing here names the
            // culprit and keeps the round going without it.
            sa.drop_client(id);
            let detail = format!(
                "client {id} advertised SecAgg keys not signed with its own client certificate"
            );
            self.refuse(id, ReasonCode::SecAggViolation, detail, false);
        } else if let Err(rej) = sa.handle(id, msg) {
            self.refuse(id, rej.code, rej.detail, false);
        }
        self.maybe_advance_secagg(now);
    }

    /// Advances the secure-aggregation stage once nobody is pending.
    fn maybe_advance_secagg(&mut self, now: Instant) {
        if let Phase::Collecting(r) = &self.phase
            && let Aggregation::Secure(sa) = &r.agg
            && sa.pending().is_empty()
        {
            self.advance_secagg(now, false);
        }
    }

    /// Ends the current stage and sends the next stage's messages, or ends
    /// the round with the unmasked sum or an abort.
    fn advance_secagg(&mut self, now: Instant, timed_out: bool) {
        loop {
            let Phase::Collecting(r) = &mut self.phase else {
                return;
            };
            let Aggregation::Secure(sa) = &mut r.agg else {
                return;
            };
            match sa.advance() {
                Ok(None) => {
                    let mut out = Vec::new();
                    while let Some((to, msg)) = sa.poll_transmit() {
                        out.push((to, msg));
                    }
                    let stage_timeout = self
                        .cfg
                        .secagg
                        .as_ref()
                        .map_or(DEFAULT_SECAGG_STAGE_TIMEOUT, |c| c.stage_timeout);
                    r.deadline = now
                        + if sa.stage() == SecAggStage::MaskedInput {
                            self.cfg.round_timeout
                        } else {
                            stage_timeout
                        };
                    let idle = sa.pending().is_empty();
                    self.events.push_back(Event::SecAggStage {
                        round: r.round,
                        stage: sa.stage(),
                        pending: sa.pending().len(),
                    });
                    for (to, msg) in out {
                        self.send(to, Message::SecAgg(msg));
                    }
                    if !idle {
                        return;
                    }
                }
                Ok(Some(outcome)) => return self.finish_secure(now, outcome, timed_out),
                Err(abort) => {
                    let round = r.round;
                    return self.fail_round(round, format!("secure aggregation aborted: {abort}"));
                }
            }
        }
    }

    fn finish_secure(&mut self, now: Instant, outcome: Outcome, timed_out: bool) {
        let Phase::Collecting(r) = std::mem::replace(&mut self.phase, Phase::BetweenRounds) else {
            return;
        };
        if let Some(reason) = self.implausible_sum(&outcome, r.cohort.len()) {
            return self.fail_round(
                r.round,
                format!("the unmasked sum is impossible ({reason}); the model is left as it was"),
            );
        }
        let clip_norm = self.clip_norm;
        let contributors = outcome.survivors.len();
        let mean = self.dp_update(outcome.mean, Some(&outcome.sum), contributors);
        let updates = RoundUpdates::Mean {
            mean: &mean,
            contributors,
            total_weight: outcome.total_weight,
        };
        if let Err(err) = self.apply_strategy(r.round, updates) {
            return self.fail_round(r.round, err.to_string());
        }
        self.rounds_completed += 1;
        self.next_round = r.round + 1;
        let epsilon = self.epsilon();
        let survivors: BTreeSet<ClientId> = outcome.survivors.iter().copied().collect();
        let dropped = r
            .cohort
            .iter()
            .copied()
            .filter(|c| !survivors.contains(c))
            .collect();
        self.commit();
        self.events.push_back(Event::RoundCompleted(RoundSummary {
            round: r.round,
            cohort: r.cohort,
            contributors: outcome.survivors,
            dropped,
            total_examples: outcome.total_weight.round() as u64,
            train_loss: None,
            secure: true,
            epsilon,
            clip_norm,
            client_eval: None,
            timed_out: timed_out || r.timed_out,
            started_at: r.started_at,
            finished_at: now,
        }));
    }

    /// What an unmasked sum cannot be, given who contributed: a count slot
    /// other than the survivors (distributed DP, where each adds 1), a
    /// total weight outside what that many clients can claim, or a
    /// non-finite mean. One malicious client can send any integers, so these
    /// are checked before anything takes the sum.
    fn implausible_sum(&self, outcome: &Outcome, cohort: usize) -> Option<String> {
        let n = outcome.survivors.len();
        let distributed = self
            .cfg
            .dp
            .as_ref()
            .is_some_and(|p| p.config.mechanism == Mechanism::Distributed);
        if distributed {
            let count = outcome.sum.last().copied().unwrap_or_default();
            if count as usize != n {
                return Some(format!(
                    "its count slot says {count} contributors, {n} sent masked inputs"
                ));
            }
        } else if let Some(sa) = &self.cfg.secagg {
            let params = sa.params(cohort);
            let resolution = params.encoders().map_or(0.0, |(_, w)| w.resolution());
            let slack = n as f64 * resolution * params.max_weight as f64;
            let (low, high) = (
                n as f64 - slack,
                n as f64 * params.max_weight as f64 + slack,
            );
            if !(low..=high).contains(&outcome.total_weight) {
                return Some(format!(
                    "a total weight of {:.1} examples, outside the {low:.1}..={high:.1} that {n} contributors can claim",
                    outcome.total_weight
                ));
            }
        }
        outcome
            .mean
            .iter()
            .position(|v| !v.is_finite())
            .map(|i| format!("a non-finite value at index {i}"))
    }

    fn on_evaluation(&mut self, id: ClientId, eval: Evaluation) {
        let Phase::Collecting(r) = &mut self.phase else {
            return;
        };
        let valid = eval.round == r.round
            && r.cohort.contains(&id)
            && eval.loss.is_finite()
            && eval.scores.is_valid()
            && self
                .data
                .as_ref()
                .is_none_or(|d| scores_fit(d, &eval.scores))
            && eval.num_examples <= self.cfg.max_examples_per_update
            && (f64::from(eval.loss) * eval.num_examples as f64).abs() < MAX_WEIGHTED_MAGNITUDE;
        if valid && !r.evaluations.contains_key(&id) {
            r.evaluations.insert(
                id,
                ClientEvaluation {
                    client: id,
                    num_examples: eval.num_examples,
                    loss: eval.loss,
                    scores: eval.scores,
                },
            );
        } else {
            tracing::debug!(
                client = id,
                round = eval.round,
                "ignoring evaluation report"
            );
        }
    }

    fn maybe_start(&mut self, now: Instant) {
        if !matches!(self.phase, Phase::Waiting) {
            return;
        }
        let failed_out = self.rounds_failed >= self.cfg.max_failed_rounds;
        if self.rounds_completed >= self.cfg.rounds || failed_out {
            self.phase = Phase::Finished;
            let reason = if failed_out {
                format!("stopping after {} failed rounds", self.rounds_failed)
            } else {
                "all rounds completed".to_owned()
            };
            self.say_goodbye(&reason);
            self.events.push_back(Event::Finished {
                rounds_completed: self.rounds_completed,
            });
            return;
        }
        if self.admitted() < self.cfg.min_clients {
            return;
        }
        // Sample over node names (then ids), so the cohort depends on who is
        // connected and the seed, not on connection order.
        let mut population: Vec<(String, ClientId)> = self
            .clients
            .iter()
            .filter_map(|(&id, c)| c.node_name.clone().map(|n| (n, id)))
            .collect();
        population.sort_unstable();
        // Local DP protects each update on its own (its accounting claims no
        // amplification by sampling), so whether a round runs leaks nothing
        // it accounts for.
        let gate_of = |plan: &DpPlan, n: usize| match plan.config.mechanism {
            Mechanism::Local => 0.0,
            _ => dp::gate::per_round(n, plan.sampling_rate, plan.min_cohort),
        };
        if let Some(plan) = &self.cfg.dp {
            let gate = gate_of(plan, population.len());
            self.exclude_spent(&mut population, gate);
        }
        let candidates: Vec<(&str, ClientId)> =
            population.iter().map(|(n, id)| (n.as_str(), *id)).collect();
        let mut cohort: Vec<ClientId> = match &self.cfg.dp {
            // Poisson sampling, as the accountant assumes.
            Some(plan) => {
                let q = plan.sampling_rate;
                candidates
                    .iter()
                    .filter(|_| self.secret_rng.random::<f64>() < q)
                    .map(|&(_, id)| id)
                    .collect()
            }
            None => {
                let k = self.cfg.cohort_size(candidates.len());
                let offered: Vec<Candidate<'_>> = candidates
                    .iter()
                    .map(|&(node_name, id)| Candidate { id, node_name })
                    .collect();
                let chosen =
                    self.strategy
                        .select_cohort(self.next_round, &offered, k, &mut self.rng);
                // Only admitted clients, each once.
                let admitted: BTreeSet<ClientId> = offered.iter().map(|c| c.id).collect();
                let chosen: BTreeSet<ClientId> = chosen
                    .into_iter()
                    .filter(|id| admitted.contains(id))
                    .collect();
                chosen.into_iter().collect()
            }
        };
        cohort.sort_unstable();
        let round = self.next_round;
        if cohort.is_empty() && self.cfg.dp.is_none() {
            // Only a strategy's selection can be empty here; waiting out the
            // round timeout for nobody would only delay the failure.
            return self.fail_round(
                round,
                format!(
                    "strategy {} selected none of the {} admitted clients",
                    self.strategy.name(),
                    self.admitted()
                ),
            );
        }
        // Charge every sampled round before any client sees it, to the run
        // and to every node it was sampled from: a round skipped for too
        // small a cohort too, since whether it runs can hinge on one node
        // (see `dp::gate`; skipping rounds uncharged would raise the
        // sampling rate the accountant assumes).
        if let (Some(ledger), Some(plan)) = (&mut self.ledger, &self.cfg.dp) {
            let gate = gate_of(plan, population.len());
            match ledger.charge(round, &plan.rdp_per_round, gate) {
                Ok(eps) => {
                    tracing::info!(
                        round,
                        epsilon = eps,
                        delta = plan.config.delta,
                        "privacy spent"
                    );
                    let population: Vec<String> = population.into_iter().map(|(n, _)| n).collect();
                    for name in &population {
                        self.population.spends.entry(name.clone()).or_default().add(
                            &plan.orders,
                            &plan.rdp_per_round,
                            gate,
                        );
                    }
                    self.durable.push_back(Durable::Charged {
                        round,
                        ledger: ledger.clone(),
                        population,
                        step: plan.rdp_per_round.clone(),
                        gate,
                    });
                }
                Err(exceeded) => {
                    tracing::warn!(%exceeded, "privacy budget reached");
                    self.phase = Phase::Finished;
                    self.say_goodbye(&exceeded.to_string());
                    self.events.push_back(Event::BudgetExhausted(exceeded));
                    self.events.push_back(Event::Finished {
                        rounds_completed: self.rounds_completed,
                    });
                    return;
                }
            }
            let needed = plan.min_cohort;
            if cohort.len() < needed {
                return self.fail_round(
                    round,
                    format!(
                        "Poisson sampling drew {} clients, fewer than the {needed} a round runs with; skipped (and charged, like every sampled round)",
                        cohort.len()
                    ),
                );
            }
        }
        let individual = self.strategy.input() == AggregationInput::Individual;
        let buffered = cohort.len().saturating_mul(self.aggregate_len());
        if individual && self.cfg.secagg.is_none() && buffered > self.cfg.max_buffered_values {
            return self.fail_round(
                round,
                format!(
                    "{} needs each of the cohort's {} updates of {} values, {buffered} in all, over the limit of {} (max_buffered_values)",
                    self.strategy.name(),
                    cohort.len(),
                    self.aggregate_len(),
                    self.cfg.max_buffered_values
                ),
            );
        }
        let (agg, setups) = match &self.cfg.secagg {
            None => (
                Aggregation::Plain {
                    mean: WeightedMean::new(self.aggregate_len()),
                    kept: individual.then(Vec::new),
                },
                Vec::new(),
            ),
            Some(sa) => {
                // The neighbour graph comes from the secret generator: with
                // the run's public seed, anyone could predict who masks with
                // whom and place colluding nodes as one client's neighbours.
                let graph_seed = rand::Rng::next_u64(&mut self.secret_rng);
                let built = if cohort.len() < MIN_SECAGG_COHORT {
                    Err(format!(
                        "a cohort of {} is below the minimum of {MIN_SECAGG_COHORT}",
                        cohort.len()
                    ))
                } else {
                    let mut params = sa.params(cohort.len());
                    if let Some(plan) = &self.cfg.dp
                        && plan.config.mechanism == Mechanism::Distributed
                    {
                        params.min_survivors = plan.min_contributors as u32;
                    }
                    let digest =
                        crate::secagg::round_digest(round, &self.round_config(), &self.global);
                    SecAggServer::new(
                        round,
                        params,
                        &cohort,
                        self.aggregate_len(),
                        graph_seed,
                        digest,
                    )
                    .map(|(server, setups)| match &self.signatures {
                        Some(check) => (server.with_signature_check(Arc::clone(check)), setups),
                        None => (server, setups),
                    })
                    .map_err(|e| e.to_string())
                };
                match built {
                    Ok((server, setups)) => (Aggregation::Secure(Box::new(server)), setups),
                    Err(err) => {
                        let reason = format!(
                            "cannot run secure aggregation for a cohort of {}: {err}",
                            cohort.len()
                        );
                        return self.fail_round(round, reason);
                    }
                }
            }
        };
        let start = Arc::new(Message::RoundStart(RoundStart {
            round,
            config: self.round_config(),
            global_model: self.global.clone(),
        }));
        for &id in &cohort {
            self.transmits.push_back(Transmit {
                to: id,
                message: Arc::clone(&start),
                close: false,
            });
        }
        for (id, setup) in setups {
            self.send(id, Message::SecAgg(SecAgg::Setup { round, setup }));
        }
        let secure = matches!(agg, Aggregation::Secure(_));
        let deadline = now
            + match &self.cfg.secagg {
                Some(sa) if secure => sa.stage_timeout,
                _ => self.cfg.round_timeout,
            };
        for entry in self.clients.values_mut() {
            entry.refusals = 0;
            entry.reported_error = false;
        }
        self.events.push_back(Event::RoundStarted {
            round,
            cohort: cohort.clone(),
        });
        let nobody = cohort.is_empty();
        self.phase = Phase::Collecting(Box::new(RoundState {
            round,
            pending: cohort.iter().copied().collect(),
            cohort,
            contributors: Vec::new(),
            dropped: Vec::new(),
            evaluations: BTreeMap::new(),
            agg,
            loss_sum: ExactSum::default(),
            started_at: now,
            deadline,
            timed_out: false,
        }));
        if nobody {
            // Central DP: an empty Poisson cohort still releases the
            // server's noise, as the accountant assumes.
            self.maybe_finish(now);
        }
    }

    /// The round ends without touching the global model.
    fn fail_round(&mut self, round: u64, reason: String) {
        self.next_round = round + 1;
        self.phase = Phase::BetweenRounds;
        self.rounds_failed += 1;
        self.commit();
        self.events.push_back(Event::RoundFailed { round, reason });
    }

    /// The update to add to the global model, from the contributors' mean
    /// (or, for distributed DP, the unmasked integer sum): central DP adds
    /// the server's noise to the sum; central and distributed DP divide the
    /// noisy sum by the expected cohort size (a data-independent divisor).
    /// Under adaptive clipping the appended indicator sum, noised the same
    /// way, moves the clip bound for the next round.
    fn dp_update(&mut self, mean: Vec<f32>, integer_sum: Option<&[u32]>, count: usize) -> Vec<f32> {
        let Some(plan) = &self.cfg.dp else {
            return mean;
        };
        let dim = self.global.len();
        let clip_norm = self.clip_norm.unwrap_or(plan.config.clip_norm);
        let denominator = plan.denominator.unwrap_or(count as f64).max(1.0);
        // Noisy sums: the model's, then the indicators' (in clients).
        let (sum, indicator_sum): (Vec<f64>, Option<f64>) = match (&plan.round, integer_sum) {
            (dp::DpRound::Distributed { granularity, .. }, Some(sum)) => {
                let bits = dp::DEFAULT_DP_BITS;
                let granularity = granularity * clip_norm / plan.config.clip_norm;
                let model = sum[..dim]
                    .iter()
                    .map(|&s| dp::centered(s, bits) as f64 * granularity)
                    .collect();
                let indicator = plan
                    .adaptive
                    .map(|_| dp::centered(sum[dim], bits) as f64 / 2.0);
                (model, indicator)
            }
            (dp::DpRound::Central { .. }, _) => {
                let mut sum: Vec<f64> = mean.iter().map(|&m| f64::from(m) * count as f64).collect();
                let noise_std = plan.server_noise_std * clip_norm / plan.config.clip_norm;
                dp::noise::add_gaussian_to_sum(&mut sum[..dim], noise_std, &mut self.secret_rng);
                let indicator = plan.adaptive.map(|(_, count_std)| {
                    let mut s = [sum[dim]];
                    dp::noise::add_gaussian_to_sum(&mut s, count_std, &mut self.secret_rng);
                    s[0]
                });
                sum.truncate(dim);
                (sum, indicator)
            }
            _ => return mean,
        };
        if let (Some((adaptive, _)), Some(indicators)) = (plan.adaptive, indicator_sum) {
            let unclipped = indicators / denominator + 0.5;
            // Whatever the indicators say over many rounds, the bound (and
            // with it the noise) stays near the operator's choice.
            let next = dp::adaptive::within_span(
                plan.config.clip_norm,
                adaptive.next_clip_norm(clip_norm, unclipped),
            );
            tracing::debug!(clip_norm, unclipped, next, "adaptive clipping");
            self.clip_norm = Some(next);
        }
        sum.iter().map(|&s| (s / denominator) as f32).collect()
    }

    /// The strategy combines the round's updates and takes its step. A
    /// result of the wrong length, or one that would make the model
    /// non-finite, leaves the model as it was.
    fn apply_strategy(
        &mut self,
        round: u64,
        updates: RoundUpdates<'_>,
    ) -> Result<(), StrategyError> {
        let aggregate = self.strategy.aggregate(round, updates)?;
        let expected = self.global.len();
        if aggregate.len() != expected {
            return Err(StrategyError::WrongLength {
                got: aggregate.len(),
                expected,
            });
        }
        if let Some(index) = aggregate.iter().position(|v| !v.is_finite()) {
            return Err(StrategyError::NonFinite { index });
        }
        let before = self.global.clone();
        self.strategy.step(round, &mut self.global, &aggregate);
        if let Some(index) = self.global.iter().position(|v| !v.is_finite()) {
            self.global = before;
            return Err(StrategyError::StepNonFinite { index });
        }
        Ok(())
    }

    fn epsilon(&self) -> Option<f64> {
        self.ledger.as_ref().map(PrivacyLedger::epsilon)
    }

    fn maybe_finish(&mut self, now: Instant) {
        if let Phase::Collecting(r) = &self.phase
            && r.pending.is_empty()
        {
            self.finish_round(now, false);
        }
    }

    fn finish_round(&mut self, now: Instant, timed_out: bool) {
        let Phase::Collecting(r) = std::mem::replace(&mut self.phase, Phase::BetweenRounds) else {
            return;
        };
        let mut r = *r;
        r.dropped.extend(r.pending.iter().copied());
        let Aggregation::Plain { mean: sum, kept } = &mut r.agg else {
            unreachable!("secure rounds finish through finish_secure")
        };
        let central_dp = self
            .cfg
            .dp
            .as_ref()
            .is_some_and(|p| matches!(p.round, dp::DpRound::Central { .. }));
        let mean = match sum.mean() {
            Some(mean) => Some(mean),
            // Central DP releases the noised sum whoever contributed, so
            // that whether a round runs never hinges on one client.
            None if central_dp && kept.is_none() => Some(vec![0.0; self.aggregate_len()]),
            None => None,
        };
        let Some(mean) = mean else {
            let reason = format!(
                "no valid update from a cohort of {}{}",
                r.cohort.len(),
                if timed_out {
                    " before the round timeout"
                } else {
                    ""
                }
            );
            return self.fail_round(r.round, reason);
        };
        let total = sum.total_weight();
        let clip_norm = self.clip_norm;
        let applied = match kept.take() {
            Some(mut kept) => {
                kept.sort_unstable_by_key(|k| k.client);
                let updates: Vec<ClientUpdate<'_>> = kept
                    .iter()
                    .map(|k| ClientUpdate {
                        client: k.client,
                        values: &k.values,
                        weight: k.weight,
                    })
                    .collect();
                self.apply_strategy(r.round, RoundUpdates::Individual(&updates))
            }
            None => {
                let contributors = r.contributors.len();
                let mean = self.dp_update(mean, None, contributors);
                let updates = RoundUpdates::Mean {
                    mean: &mean,
                    contributors,
                    total_weight: total,
                };
                self.apply_strategy(r.round, updates)
            }
        };
        if let Err(err) = applied {
            return self.fail_round(r.round, err.to_string());
        }
        self.rounds_completed += 1;
        self.next_round = r.round + 1;
        let epsilon = self.epsilon();
        let reports: Vec<ClientEvaluation> = r.evaluations.values().copied().collect();
        let client_eval: Option<ClientEvalSummary> = self.strategy.aggregate_evaluations(&reports);
        r.dropped.sort_unstable();
        self.commit();
        self.events.push_back(Event::RoundCompleted(RoundSummary {
            round: r.round,
            cohort: r.cohort,
            contributors: r.contributors,
            dropped: r.dropped,
            total_examples: total as u64,
            train_loss: self
                .cfg
                .dp
                .is_none()
                .then(|| (r.loss_sum.value() / total) as f32),
            secure: false,
            epsilon,
            clip_norm,
            client_eval,
            timed_out,
            started_at: r.started_at,
            finished_at: now,
        }));
    }

    fn say_goodbye(&mut self, reason: &str) {
        let bye = Arc::new(Message::Goodbye(Goodbye {
            rounds_completed: self.rounds_completed,
            reason: reason.to_owned(),
        }));
        let ids: Vec<ClientId> = self.clients.keys().copied().collect();
        for id in ids {
            self.transmits.push_back(Transmit {
                to: id,
                message: Arc::clone(&bye),
                close: true,
            });
        }
    }

    fn send(&mut self, to: ClientId, message: Message) {
        self.transmits.push_back(Transmit {
            to,
            message: Arc::new(message),
            close: false,
        });
    }

    /// Tells `id` why its message was refused (the driver logs the
    /// `Rejected` event, once). An admitted client's last allowed refusal
    /// in a round also closes its connection.
    /// Takes out of `population` (and disconnects) every node whose next
    /// round would take its epsilon over all runs past the population
    /// budget.
    fn exclude_spent(&mut self, population: &mut Vec<(String, ClientId)>, gate: f64) {
        let (Some(plan), Some(budget)) = (&self.cfg.dp, self.population.budget) else {
            return;
        };
        let delta = plan.config.delta;
        let mut spent = Vec::new();
        population.retain(|(name, id)| {
            let spend = self
                .population
                .spends
                .get(name)
                .cloned()
                .unwrap_or_default();
            let would_be = spend.epsilon_with(&plan.orders, &plan.rdp_per_round, gate, delta);
            let keep = would_be <= budget;
            if !keep {
                spent.push((*id, name.clone(), spend.epsilon(delta), would_be));
            }
            keep
        });
        for (id, name, before, after) in spent {
            let detail = format!(
                "node '{name}' has spent epsilon {before:.4} over all runs of this server (delta {delta:e}); one more round would take it to {after:.4}, past the population budget {budget}"
            );
            self.refuse(id, ReasonCode::BudgetSpent, detail, true);
        }
    }

    /// What `name` has spent over all runs of this server (this one included).
    pub fn node_spend(&self, name: &str) -> Option<&NodeSpend> {
        self.population.spends.get(name)
    }

    fn refuse(&mut self, id: ClientId, code: ReasonCode, mut detail: String, mut close: bool) {
        let limit = self.cfg.max_refusals_per_round;
        if !close
            && let Some(entry) = self.clients.get_mut(&id)
            && entry.node_name.is_some()
        {
            entry.refusals += 1;
            if entry.refusals >= limit {
                close = true;
                detail.push_str(&format!(
                    " (refusal {} this round: closing the connection)",
                    entry.refusals
                ));
            }
        }
        self.transmits.push_back(Transmit {
            to: id,
            message: Arc::new(Message::error(code, detail.clone())),
            close,
        });
        self.events.push_back(Event::Rejected { id, code, detail });
    }
}

/// Whether a report's scores are the ones the data's task has: accuracy
/// for a classification, errors for a regression (`num_classes` 0).
fn scores_fit(data: &DataSpec, scores: &crate::metrics::TaskScores) -> bool {
    if data.num_classes == 0 {
        scores.accuracy.is_none()
    } else {
        scores.mse.is_none() && scores.mae.is_none()
    }
}

fn reason_for(err: &AggregateError) -> ReasonCode {
    match err {
        AggregateError::WrongLength { .. } => ReasonCode::WrongLength,
        AggregateError::NonFinite { .. } | AggregateError::OutOfRange { .. } => {
            ReasonCode::NonFinite
        }
        AggregateError::BadWeight(_) => ReasonCode::BadWeight,
    }
}
