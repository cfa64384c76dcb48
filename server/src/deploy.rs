//! A whole server from one builder: [`ServerBuilder`] assembles the TLS
//! identity and its CA, the node registry, the durable state (started or
//! resumed), the global model and its evaluator, and the QUIC endpoint;
//! [`Server::run`] then serves rounds until the run ends. `fedveil-server
//! run`, the simulator and embedded deployments all start a server this
//! way, so they cannot drift apart.
//!
//! ```no_run
//! use fedveil_server::deploy::Server;
//! use fedveil_settings::Settings;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let settings = Settings { rounds: 3, ..Settings::default() };
//! // Identity and state in ./server: a restart resumes the run.
//! let server = Server::builder(settings)
//!     .identity_dir("server")
//!     .state("server/state.db", "demo")
//!     .listen("127.0.0.1:4433".parse()?)
//!     .build()?;
//! let invitation = server.invite("clinic-1")?; // hand it to the node
//! # let _ = invitation;
//! let report = server.run(std::future::pending()).await;
//! println!("{} rounds", report.rounds_completed);
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use burn::data::dataset::Dataset as BurnDataset;
use burn::prelude::Device;
use fedveil_ml::data::{Dataset, Shard};
use fedveil_ml::model::{self, DataShape, Example, ModelError, ModelFactory};
use fedveil_net::pki::{self, Invitation};
use fedveil_net::quic::{self, NetError, NodeRegistry, ServerIdentity};
use fedveil_proto::round::{ConfigError, Coordinator, CoordinatorConfig};
use fedveil_proto::strategy::Strategy;
use fedveil_proto::wire::{DataSpec, FrameLimits, ModelSpec};
use fedveil_settings::{Deployment, Population, Settings, SettingsError};

use crate::config_file::DEFAULT_PORT;
use crate::driver::{
    ConnectionLimits, Evaluator, LogObserver, Observer, RunReport, ServeOptions, ServerFaultHook,
    serve,
};
use crate::enrol::NodeService;
use crate::registry::{EnrolError, Registry};
use crate::setup::{MetricsFiles, ModelEvaluator, ServerObserver, initial_model};
use crate::store::{OpenError, Opened, Store, StoreError};

/// Why a server could not be assembled.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeployError {
    /// A setting is invalid, or the data it names cannot be loaded.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// The model cannot be built for the data.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The TLS identity cannot be loaded, created or turned into a config.
    #[error("server identity: {0}")]
    Identity(#[from] NetError),
    /// The state database or the registry cannot be opened.
    #[error(transparent)]
    State(#[from] StoreError),
    /// The run cannot start or resume from its state.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// The coordinator refuses the configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The UDP socket cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The socket error.
        source: std::io::Error,
    },
    /// The metrics directory cannot be written.
    #[error("metrics files in {dir}: {source}")]
    Metrics {
        /// The directory.
        dir: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The model a server trains and evaluates, made once the device is known.
struct Served {
    spec: ModelSpec,
    initial: Vec<f32>,
    shape: DataShape,
    data: DataSpec,
    evaluator: Box<dyn Evaluator>,
    /// The user's model's name (built-ins are named by the settings).
    custom_name: Option<String>,
}

type ServedBuild = Box<dyn FnOnce(&Device, u64) -> Result<Served, DeployError> + Send>;
type ConfigTuner = Box<dyn FnOnce(&mut CoordinatorConfig) + Send>;

/// Assembles a [`Server`]; see the [module docs](self). Everything but the
/// settings has a default: the built-in model and test split the settings
/// name, an in-memory CA for `localhost`, an in-memory registry, no
/// durable state, and `127.0.0.1:4433`.
pub struct ServerBuilder {
    settings: Settings,
    population: Option<Population>,
    min_clients: usize,
    tune: Option<ConfigTuner>,
    model: Option<ServedBuild>,
    identity: Option<ServerIdentity>,
    identity_dir: Option<PathBuf>,
    names: Vec<String>,
    listen: SocketAddr,
    state: Option<(PathBuf, String)>,
    registry: Option<Arc<Registry>>,
    client_cert_ttl: Duration,
    strategy: Option<Box<dyn Strategy>>,
    secret_seed: Option<u64>,
    observer: Option<Box<dyn Observer>>,
    metrics_dir: Option<PathBuf>,
    connections: ConnectionLimits,
    faults: Option<Arc<dyn ServerFaultHook>>,
}

impl ServerBuilder {
    /// Makes this a deviating server, for tests and attack studies: every
    /// message goes through `hook` (see [`ServerFaultHook`]).
    pub fn faults(mut self, hook: Arc<dyn ServerFaultHook>) -> Self {
        self.faults = Some(hook);
        self
    }

    /// What early connections (in the handshake, before their hello) may
    /// hold [default: [`ConnectionLimits::default`]].
    pub fn connection_limits(mut self, limits: ConnectionLimits) -> Self {
        self.connections = limits;
        self
    }

    /// Enrolled nodes connected before the first round starts [default:
    /// [`Deployment::default`]'s, the smallest secure-aggregation cohort].
    pub fn min_clients(mut self, n: usize) -> Self {
        self.min_clients = n;
        self
    }

    /// Who takes part, in full (simulations know their clients); replaces
    /// what [`Self::min_clients`] and the settings would give.
    pub fn population(mut self, population: Population) -> Self {
        self.population = Some(population);
        self
    }

    /// Adjusts the coordinator's configuration after the settings made it,
    /// for what they do not name.
    pub fn tune(mut self, tune: impl FnOnce(&mut CoordinatorConfig) + Send + 'static) -> Self {
        self.tune = Some(Box::new(tune));
        self
    }

    /// Trains `factory`'s model, evaluated on the dense test set `test`
    /// (nodes must hold data like it).
    pub fn model(self, factory: ModelFactory<Example>, test: Arc<Dataset>) -> Self {
        let shape = DataShape::of(&test);
        let data = test.spec();
        self.model_on(factory, shape, data, Arc::new(Shard::whole(test)))
    }

    /// Trains `factory`'s model on any Burn dataset type: `shape` is what
    /// the model is built for, `data` what nodes must describe at join.
    pub fn model_on<I: Send + Sync + 'static>(
        mut self,
        factory: ModelFactory<I>,
        shape: DataShape,
        data: DataSpec,
        test: Arc<dyn BurnDataset<I>>,
    ) -> Self {
        self.model = Some(Box::new(move |device: &Device, seed| {
            let (spec, initial) = initial_model(&factory, &shape, device, seed)?;
            let evaluator = ModelEvaluator::of(&factory, &shape, test, device)?;
            Ok(Served {
                spec,
                initial,
                shape,
                data,
                evaluator: Box::new(evaluator),
                custom_name: Some(factory.name().to_owned()),
            })
        }));
        self
    }

    /// Keeps the CA and server certificate in `dir`, creating them for
    /// [`Self::names`] on first use: nodes enrolled once stay enrolled
    /// across restarts.
    pub fn identity_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.identity_dir = Some(dir.into());
        self
    }

    /// Uses this identity (for example one made with
    /// [`ServerIdentity::generate`] whose CA the caller also keeps).
    pub fn identity(mut self, identity: ServerIdentity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// DNS names and IP addresses nodes reach the server by (a created
    /// certificate carries them; invitations name the first) [default:
    /// `localhost`].
    pub fn names(mut self, names: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.names = names.into_iter().map(Into::into).collect();
        self
    }

    /// The UDP address to listen on (port 0: any free port).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// Keeps model, strategy state, privacy ledger and node registry in
    /// the database at `path`, as run `run`: a new run records its
    /// settings, a restart resumes it (and refuses other settings).
    pub fn state(mut self, path: impl Into<PathBuf>, run: impl Into<String>) -> Self {
        self.state = Some((path.into(), run.into()));
        self
    }

    /// Admits nodes from this registry (default: the state database's,
    /// else one in memory).
    pub fn registry(mut self, registry: Arc<Registry>) -> Self {
        self.registry = Some(registry);
        self
    }

    /// Lifetime of the client certificates enrolment issues.
    pub fn client_cert_ttl(mut self, ttl: Duration) -> Self {
        self.client_cert_ttl = ttl;
        self
    }

    /// Runs `strategy` instead of the settings' aggregation and server
    /// optimizer (checked against the privacy settings at build).
    pub fn strategy(mut self, strategy: Box<dyn Strategy>) -> Self {
        self.strategy = Some(strategy);
        self
    }

    /// Seeds the server's secrets (DP noise, Poisson sampling) so a seed
    /// replays a run: simulations only, never a deployment.
    pub fn secret_seed(mut self, seed: u64) -> Self {
        self.secret_seed = Some(seed);
        self
    }

    /// Told what happens (default: logs every event through `tracing`).
    pub fn observer(mut self, observer: Box<dyn Observer>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Also writes `metrics.jsonl`/`.csv` and `costs.jsonl`/`.csv` in
    /// `dir`, a line per round.
    pub fn metrics_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.metrics_dir = Some(dir.into());
        self
    }

    /// Builds the model, opens (starts or resumes) the run and binds the
    /// endpoint. Call it inside a Tokio runtime.
    pub fn build(self) -> Result<Server, DeployError> {
        let settings = self.settings;
        let device = settings.data.device()?.device().map_err(ModelError::from)?;
        let served = match self.model {
            Some(build) => build(&device, settings.seed)?,
            None => builtin(&settings, &device)?,
        };
        let population = self.population.unwrap_or_else(|| {
            Population::deployment(
                &settings,
                &Deployment {
                    min_clients: self.min_clients,
                    ..Deployment::default()
                },
            )
        });
        let mut config =
            settings.coordinator_config(&population, served.spec.param_count as usize)?;
        if let Some(tune) = self.tune {
            tune(&mut config);
        }
        if let Some(plan) = &config.dp {
            plan.log();
        }
        let registry = match (self.registry, &self.state) {
            (Some(registry), _) => registry,
            (None, Some((path, _))) => Arc::new(Registry::open(path)?),
            (None, None) => Arc::new(Registry::in_memory()?),
        };
        // Each node's spend over all earlier runs: a new run name never
        // starts the population afresh.
        let mut coordinator = Coordinator::builder(config, served.spec.clone())
            .expect_data(served.data.clone())
            .population(registry.spends()?, settings.population_budget)
            .verify_signatures(Arc::new(pki::NodeSignatures));
        if let Some(strategy) = self.strategy {
            coordinator = coordinator.strategy(strategy);
        }
        if let Some(seed) = self.secret_seed {
            coordinator = coordinator.secret_seed(seed);
        }
        let (store, status, coordinator) = match &self.state {
            None => (
                None,
                RunStatus::Started,
                Some(coordinator.start(served.initial)?),
            ),
            Some((path, run)) => {
                let record = run_record(&settings, &served, population.min_clients);
                let store = Store::open(path, run, &record)?;
                let (status, coordinator) =
                    match store.start_or_resume(coordinator, served.initial)? {
                        Opened::Started(c) => (RunStatus::Started, Some(c)),
                        Opened::Resumed(c) => (RunStatus::resumed(&c), Some(c)),
                        Opened::Complete { rounds_completed } => (
                            RunStatus::Complete {
                                rounds_completed,
                                global_model: store.global_model()?,
                                epsilon: store.load()?.ledger.map(|l| l.epsilon()),
                            },
                            None,
                        ),
                    };
                (Some(store), status, coordinator)
            }
        };
        let identity = match (self.identity, &self.identity_dir) {
            (Some(identity), _) => identity,
            (None, Some(dir)) => ServerIdentity::load_or_create(dir, &self.names)?,
            (None, None) => ServerIdentity::generate(&self.names)?,
        };
        if self.state.is_some() && self.identity_dir.is_none() {
            tracing::warn!(
                "durable state with an identity in memory: after a restart the server has a new CA, and enrolled nodes must enrol again (use identity_dir)"
            );
        }
        if identity.ca.is_none() {
            tracing::warn!("no CA key in the server directory: nodes cannot enrol or renew here");
        }
        let tls = quic::server_config(
            &identity,
            Some(Arc::clone(&registry) as Arc<dyn NodeRegistry>),
        )?;
        let ca_fingerprint = identity.ca_fingerprint();
        let endpoint =
            quinn::Endpoint::server(tls, self.listen).map_err(|source| DeployError::Listen {
                addr: self.listen,
                source,
            })?;
        let mut observer = self.observer.unwrap_or_else(|| Box::new(LogObserver));
        if let Some(dir) = self.metrics_dir {
            let files = MetricsFiles::create(&dir)
                .map_err(|source| DeployError::Metrics { dir, source })?;
            observer = Box::new(ServerObserver {
                files: Some(files),
                inner: observer,
            });
        }
        Ok(Server {
            endpoint,
            coordinator,
            status,
            evaluator: served.evaluator,
            nodes: Arc::new(NodeService {
                registry,
                ca: identity.ca,
                cert_ttl: self.client_cert_ttl,
            }),
            store,
            limits: FrameLimits::for_model(served.spec.param_count),
            connections: self.connections,
            faults: self.faults,
            observer,
            ca_fingerprint,
            name: self.names.first().cloned().unwrap_or_default(),
            spec: served.spec,
        })
    }
}

/// The built-in model the settings name, on their dataset's test split.
fn builtin(settings: &Settings, device: &Device) -> Result<Served, DeployError> {
    let test = settings.data.load(settings.seed)?.test;
    let factory = model::builtin(&settings.data.model)?;
    let shape = DataShape::of(&test);
    let (spec, initial) = initial_model(&factory, &shape, device, settings.seed)?;
    Ok(Served {
        spec,
        initial,
        shape,
        data: test.spec(),
        evaluator: Box::new(ModelEvaluator::new(&settings.data.model, test, device)?),
        custom_name: None,
    })
}

/// The run's identity in its state database: what must not change
/// between restarts (see [`Settings::run_identity`]), plus the data and
/// the model it fixes.
fn run_record(settings: &Settings, served: &Served, min_clients: usize) -> String {
    use serde_json::json;
    let mut record = settings.run_identity();
    if let Some(name) = &served.custom_name {
        record.insert("model".to_owned(), json!(name));
    }
    record.extend([
        (
            "example_shape".to_owned(),
            json!(served.shape.example_shape),
        ),
        ("num_classes".to_owned(), json!(served.shape.num_classes)),
        ("vocab_size".to_owned(), json!(served.shape.vocab_size)),
        ("param_count".to_owned(), json!(served.spec.param_count)),
        ("min_clients".to_owned(), json!(min_clients)),
    ]);
    serde_json::Value::Object(record).to_string()
}

/// How a run opened from its durable state.
#[derive(Debug, Clone, PartialEq)]
pub enum RunStatus {
    /// A new run, at round 1.
    Started,
    /// A run continued where its committed state left it.
    Resumed {
        /// The round the run continues with.
        next_round: u64,
        /// Rounds completed before the restart.
        rounds_completed: u64,
        /// Rounds failed before the restart.
        rounds_failed: u64,
        /// SHA-256 of the resumed global model (see [`sha256_hex`]).
        model_sha256: String,
        /// SHA-256 of the strategy's buffers (optimizer moments), in name
        /// order.
        strategy_sha256: String,
        /// Privacy spent so far, with DP on.
        epsilon: Option<f64>,
    },
    /// The run had completed all its rounds: [`Server::run`] returns at
    /// once, with this model and no new round.
    Complete {
        /// Rounds the run completed.
        rounds_completed: u64,
        /// The final global model.
        global_model: Vec<f32>,
        /// Privacy the run spent, with DP on.
        epsilon: Option<f64>,
    },
}

impl RunStatus {
    fn resumed(c: &Coordinator) -> Self {
        let checkpoint = c.checkpoint();
        let buffers: Vec<f32> = checkpoint
            .strategy
            .buffers
            .values()
            .flatten()
            .copied()
            .collect();
        Self::Resumed {
            next_round: c.next_round(),
            rounds_completed: checkpoint.rounds_completed,
            rounds_failed: checkpoint.rounds_failed,
            model_sha256: sha256_hex(&checkpoint.global_model),
            strategy_sha256: sha256_hex(&buffers),
            epsilon: checkpoint.ledger.as_ref().map(|l| l.epsilon()),
        }
    }
}

/// SHA-256 of `values`' little-endian bytes, in hex: compares models and
/// states across restarts and machines.
pub fn sha256_hex(values: &[f32]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for v in values {
        h.update(v.to_le_bytes());
    }
    hex::encode(h.finalize())
}

/// A server ready to run: listening, with its run started or resumed.
pub struct Server {
    endpoint: quinn::Endpoint,
    /// `None` when the run was already complete.
    coordinator: Option<Coordinator>,
    status: RunStatus,
    evaluator: Box<dyn Evaluator>,
    nodes: Arc<NodeService>,
    store: Option<Store>,
    limits: FrameLimits,
    connections: ConnectionLimits,
    faults: Option<Arc<dyn ServerFaultHook>>,
    observer: Box<dyn Observer>,
    ca_fingerprint: String,
    /// The name invitations tell nodes to dial.
    name: String,
    spec: ModelSpec,
}

impl Server {
    /// Starts assembling a server for a run with these settings.
    pub fn builder(settings: Settings) -> ServerBuilder {
        ServerBuilder {
            settings,
            population: None,
            min_clients: Deployment::default().min_clients,
            tune: None,
            model: None,
            identity: None,
            identity_dir: None,
            names: vec!["localhost".to_owned()],
            listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)),
            state: None,
            registry: None,
            client_cert_ttl: pki::DEFAULT_CLIENT_CERT_TTL,
            strategy: None,
            secret_seed: None,
            observer: None,
            metrics_dir: None,
            connections: ConnectionLimits::default(),
            faults: None,
        }
    }

    /// How the run opened.
    pub fn status(&self) -> &RunStatus {
        &self.status
    }

    /// The address the endpoint is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .expect("a bound endpoint has an address")
    }

    /// HOST:PORT nodes dial: the first of the server's names, and the
    /// bound port.
    pub fn address(&self) -> String {
        format!("{}:{}", self.name, self.local_addr().port())
    }

    /// The fingerprint nodes pin when they enrol.
    pub fn ca_fingerprint(&self) -> &str {
        &self.ca_fingerprint
    }

    /// The node registry (tokens, revocation, the node list).
    pub fn registry(&self) -> &Arc<Registry> {
        &self.nodes.registry
    }

    /// The model being trained.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The coordinator (absent when the run was already complete).
    pub fn coordinator(&self) -> Option<&Coordinator> {
        self.coordinator.as_ref()
    }

    /// The state database, when the run is durable.
    pub fn state_path(&self) -> Option<&Path> {
        self.store.as_ref().map(Store::path)
    }

    /// Issues a one-time token for `node`, valid for
    /// [`pki::DEFAULT_TOKEN_TTL`], with what the node needs to use it.
    pub fn invite(&self, node: &str) -> Result<Invitation, EnrolError> {
        self.invite_for(node, pki::DEFAULT_TOKEN_TTL)
    }

    /// [`Self::invite`] with a token valid for `ttl`.
    pub fn invite_for(&self, node: &str, ttl: Duration) -> Result<Invitation, EnrolError> {
        let issued = self
            .nodes
            .registry
            .issue_token(node, ttl, pki::unix_now())?;
        Ok(Invitation {
            server: self.address(),
            ca_fingerprint: self.ca_fingerprint.clone(),
            token: issued.token,
            node: Some(issued.node),
        })
    }

    /// Serves enrolment and rounds until the run ends or `shutdown`
    /// resolves; everything durable is on disk when it returns.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> RunReport {
        let mut observer = std::mem::replace(&mut self.observer, Box::new(LogObserver));
        self.run_observed(observer.as_mut(), shutdown).await
    }

    /// [`Self::run`], telling `observer` instead of the builder's.
    pub async fn run_observed(
        self,
        observer: &mut dyn Observer,
        shutdown: impl Future<Output = ()>,
    ) -> RunReport {
        let Some(coordinator) = self.coordinator else {
            let RunStatus::Complete {
                global_model,
                epsilon,
                ..
            } = self.status
            else {
                unreachable!("only a complete run has no coordinator")
            };
            self.endpoint
                .close(quic::CLOSE_OK.into(), b"run already complete");
            return RunReport {
                rounds_completed: 0,
                rounds_failed: 0,
                final_model: global_model,
                metrics: Vec::new(),
                interrupted: false,
                epsilon,
            };
        };
        let mut evaluator = self.evaluator;
        let mut store = self.store;
        serve(
            self.endpoint,
            coordinator,
            move |model: &[f32]| evaluator.evaluate(model),
            ServeOptions {
                limits: self.limits,
                observer,
                state: store
                    .as_mut()
                    .map(|s| s as &mut dyn crate::driver::StateSink),
                nodes: Some(self.nodes),
                connections: self.connections,
                faults: self.faults,
            },
            shutdown,
        )
        .await
    }
}
