//! fedveil-sim: a real server and many real clients in one process, talking
//! QUIC + TLS 1.3 over loopback. Nothing is mocked: every client has its own
//! connection, its own shard and its own training run; only the machine is
//! shared.

#![warn(missing_docs)]

pub mod config;
pub mod faults;
pub mod plots;
pub mod progress;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use burn::data::dataset::Dataset as BurnDataset;
use fedveil_client::{ClientError, ClientOptions, ClientReport, FaultHook, LocalTrainer, Trainer};
use fedveil_ml::data::{self, DataSpec, DatasetName, Download, Partition, Shard, Split};
use fedveil_ml::model::{DataShape, Example, ModelFactory};
use fedveil_ml::train::ModelPool;
use fedveil_ml::train::mix_seed;
use fedveil_net::pki;
use fedveil_net::quic;
use fedveil_proto::strategy::Strategy;
use fedveil_server::{Observer, RunReport, Server};
use fedveil_settings::Population;
use tokio::sync::Semaphore;

pub use config::SimConfig;

/// Handshakes in flight at once: a thousand simulated clients dialling one
/// server over one socket at the same instant would overflow its receive
/// buffer and stall on retransmission timers.
pub const SIM_CONCURRENT_HANDSHAKES: usize = 64;

/// Separate the server's and the clients' secret streams (seeded in
/// simulations only, see [`Coordinator::with_secret_seed`]) from every
/// other use of the seed.
const SERVER_SECRETS_SEED: u64 = 0x7365_6372_6574;
const CLIENT_SECRETS_SEED: u64 = 0x636c_6965_6e74;

/// How long a client that cannot rejoin waits to learn whether the run
/// is simply over.
pub const SIM_SERVER_END_WAIT: Duration = Duration::from_secs(5);

/// Why one simulated client did not finish its run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimClientError {
    /// The client could not enrol.
    #[error("{name}: enrolment: {source}")]
    Enrolment {
        /// The client's name.
        name: String,
        /// Why enrolment failed.
        source: fedveil_client::enrol::EnrolmentError,
    },
    /// The client's TLS configuration could not be made.
    #[error("{name}: {source}")]
    Tls {
        /// The client's name.
        name: String,
        /// Why.
        source: fedveil_net::quic::NetError,
    },
    /// The client's run failed.
    #[error("{name}: {source}")]
    Run {
        /// The client's name.
        name: String,
        /// Why.
        source: ClientError,
    },
    /// The client's task panicked or was cancelled.
    #[error("client task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What a simulation produced.
#[derive(Debug)]
pub struct SimReport {
    /// What the server reported.
    pub server: RunReport,
    /// Each client's report, or why it failed.
    pub clients: Vec<Result<ClientReport, SimClientError>>,
    /// Wall-clock time of the whole simulation.
    pub wall: Duration,
    /// Faults injected (see [`faults`]).
    pub faults: faults::FaultTally,
    /// Model instances the clients' shared pool built: the most that
    /// trained at once.
    pub model_instances: usize,
}

/// Where the data came from, for the run summary.
#[derive(Debug, Clone)]
pub struct LoadedData {
    /// Training and test sets.
    pub split: Split,
    /// The dataset's name, as loaded.
    pub dataset: String,
    /// Set when the default dataset was unavailable and synthetic data is used.
    pub fallback_note: Option<String>,
}

/// Loads the configured dataset. When the user did not choose one
/// (`explicit == false`) and MNIST cannot be found or fetched, says why and
/// falls back to synthetic data; an explicit choice never falls back.
pub fn load_data(cfg: &SimConfig, explicit: bool) -> Result<LoadedData> {
    // A natural partition gives each client one owner's data; cutting the
    // dataset short would drop whole owners, so it is never truncated.
    let mut data = cfg.run.data.clone();
    if matches!(
        cfg.sim.partition.parse::<Partition>(),
        Ok(Partition::Natural)
    ) {
        data.train_limit = 0;
    }
    let (split, dataset, fallback_note) = match data.load(cfg.run.seed) {
        Ok(split) => (split, data.dataset.clone(), None),
        Err(err) if !explicit => {
            let note = format!("{err}\nusing the synthetic dataset instead");
            let dir = data::resolve_data_dir(data.data_dir.as_deref());
            let split = data::load(DatasetName::Synthetic, &dir, Download::Never, cfg.run.seed)?;
            (data.limit_train(split), "synthetic".to_owned(), Some(note))
        }
        Err(err) => return Err(err.into()),
    };
    Ok(LoadedData {
        split,
        dataset,
        fallback_note,
    })
}

/// What a simulation federates: the model every party builds, each
/// client's data and the server's test data, and optionally a strategy of
/// the user's. [`Federation::builtin`] makes one from the settings (a
/// built-in model on fedveil's datasets, split by the configured
/// partition); a user's own model and data go in as a
/// [`ModelFactory`] and Burn datasets of any item type.
pub struct Federation<I> {
    /// Builds the model, on every party, for data of `shape`.
    pub model: ModelFactory<I>,
    /// What the model is built for.
    pub shape: DataShape,
    /// What every party's data is, as the server checks at join
    /// ([`DataSpec::default`] when the data does not say).
    pub data: DataSpec,
    /// One training set per simulated client: as many clients as sets.
    pub clients: Vec<Arc<dyn BurnDataset<I>>>,
    /// The server's test data, on which it evaluates each global model.
    pub test: Arc<dyn BurnDataset<I>>,
    /// Runs instead of the settings' built-in aggregation and server
    /// optimizer (the privacy rules hold it the same way).
    pub strategy: Option<Box<dyn Strategy>>,
}

impl Federation<Example> {
    /// The configured built-in model on `split`, its training set split
    /// among `cfg.sim.clients` clients by `cfg.sim.partition`.
    pub fn builtin(cfg: &SimConfig, split: &Split) -> Result<Self> {
        if cfg.sim.clients == 0 {
            bail!("clients must be at least 1");
        }
        let partition: Partition = cfg.sim.partition.parse()?;
        let shards = partition
            .split_dataset(&split.train, cfg.sim.clients, cfg.run.seed)
            .context("partitioning the training set")?;
        Ok(Self {
            model: fedveil_ml::model::builtin(&cfg.run.data.model)?,
            shape: DataShape::of(&split.train),
            data: split.test.spec(),
            clients: shards
                .into_iter()
                .map(|indices| {
                    Arc::new(Shard {
                        data: Arc::clone(&split.train),
                        indices,
                    }) as Arc<dyn BurnDataset<Example>>
                })
                .collect(),
            test: Arc::new(Shard::whole(Arc::clone(&split.test))),
            strategy: None,
        })
    }
}

/// Runs one simulation of the configured built-in model on `split`.
pub async fn run(cfg: &SimConfig, split: &Split, observer: &mut dyn Observer) -> Result<SimReport> {
    run_federation(cfg, Federation::builtin(cfg, split)?, observer).await
}

/// Runs one simulation of `federation`: a real server and one real client
/// per training set, over QUIC on loopback, with the settings of `cfg`
/// (rounds, local training, secure aggregation, DP, strategy, faults).
/// `cfg.sim.clients` and `cfg.sim.partition` are not used: the federation
/// already has its clients.
pub async fn run_federation<I: Send + Sync + 'static>(
    cfg: &SimConfig,
    federation: Federation<I>,
    observer: &mut dyn Observer,
) -> Result<SimReport> {
    let started = Instant::now();
    let Federation {
        model: factory,
        shape,
        data,
        clients: client_data,
        test,
        strategy,
    } = federation;
    if client_data.is_empty() {
        bail!("a federation needs at least one client");
    }
    let clients_n = client_data.len();
    let device = cfg.run.data.device()?.device()?;
    let largest_shard = client_data.iter().map(|d| d.len()).max().unwrap_or(1) as u64;
    let fault_plan = cfg.fault_plan()?;
    let fault_log = Arc::new(faults::FaultLog::default());
    // Set when the server's run is over: a client that vanished in the last
    // round finds no server to rejoin, which is no failure.
    let (server_done, server_done_rx) = tokio::sync::watch::channel(false);
    // Every client is connected before round 1, and the DP population is
    // the whole simulated population, also the largest cohort the
    // distributed encoding must fit.
    let population = Population {
        min_clients: clients_n,
        max_clients: clients_n,
        dp_population: cfg.run.dp_population.unwrap_or(clients_n),
        // Weights are example counts over the largest shard: full resolution.
        secagg_max_weight: cfg.run.secagg_max_weight.unwrap_or(largest_shard.max(1)),
        // The Shamir threshold must survive the dropout the run injects.
        expected_dropout: cfg.run.secagg_expected_dropout.max(cfg.sim.dropout),
    };
    // A real server, with the deployment's PKI in process: a CA, a node
    // registry in memory, and one token per client. Clients enrol over QUIC
    // like real nodes, then train over mutual TLS with SecAgg keys bound to
    // their identity.
    let mut server = Server::builder(cfg.run.clone())
        .population(population)
        .model_on(factory.clone(), shape.clone(), data.clone(), test)
        .listen("127.0.0.1:0".parse()?)
        // Reproducible runs: DP noise and Poisson sampling follow the seed.
        .secret_seed(mix_seed(&[cfg.run.seed, SERVER_SECRETS_SEED]));
    if let Some(strategy) = strategy {
        server = server.strategy(strategy);
    }
    let server = server.build()?;
    let server_addr = server.local_addr();
    let ca_fingerprint = pki::parse_fingerprint(server.ca_fingerprint())?;
    let mut tokens = Vec::with_capacity(clients_n);
    for i in 0..clients_n {
        tokens.push(server.invite(&client_name(i))?.token);
    }
    // One client endpoint (one UDP socket) carries every simulated client.
    let client_endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;

    let slots = Arc::new(Semaphore::new(cfg.concurrency()));
    let connect_slots = Arc::new(Semaphore::new(SIM_CONCURRENT_HANDSHAKES));
    // Every trainer is built before any client dials, so no handshake waits
    // on model construction. They share one device and one pool of model
    // instances: as many exist as train at once, however many clients.
    let mut models = ModelPool::of(factory, shape, device.clone())?;
    if let Some(threads) = cfg.threads_per_training(cfg.run.data.device()?) {
        models = models.with_threads_per_training(threads);
    }
    let mut trainers = Vec::with_capacity(clients_n);
    for (i, dataset) in client_data.into_iter().enumerate() {
        let trainer: Arc<dyn LocalTrainer> = Arc::new(
            Trainer::with_data(
                Arc::clone(&models),
                dataset,
                mix_seed(&[cfg.run.seed, i as u64]),
            )
            .describing(data.clone()),
        );
        trainers.push(trainer);
    }
    let mut clients = tokio::task::JoinSet::new();
    for ((i, trainer), token) in trainers.into_iter().enumerate().zip(tokens) {
        let endpoint = client_endpoint.clone();
        let slots = Arc::clone(&slots);
        let connect_slots = Arc::clone(&connect_slots);
        let faults = fault_plan.is_active().then(|| {
            Arc::new(fault_plan.hook(i as u64, Arc::clone(&fault_log))) as Arc<dyn FaultHook>
        });
        let fault_log = Arc::clone(&fault_log);
        let mut server_done = server_done_rx.clone();
        let cfg_seed = cfg.run.seed;
        clients.spawn(async move {
            let name = client_name(i);
            let identity = {
                let _permit = connect_slots.acquire().await.expect("semaphore open");
                fedveil_client::enrol::enrol(
                    &endpoint,
                    server_addr,
                    "localhost",
                    ca_fingerprint,
                    &token,
                    None,
                )
                .await
                .map_err(|source| SimClientError::Enrolment {
                    name: name.clone(),
                    source,
                })?
            };
            let mut opts = ClientOptions::enrolled(server_addr, "localhost", &identity)
                .map_err(|source| SimClientError::Tls {
                    name: name.clone(),
                    source,
                })?;
            opts.training_slots = Some(slots);
            opts.connect_slots = Some(connect_slots);
            opts.faults = faults;
            // A client that vanished comes back after a while, as a new
            // connection; its rounds add up over its connections.
            let (mut rounds_trained, mut vanished) = (0, false);
            let gone_report = |rounds_trained| ClientReport {
                client_id: None,
                rounds_trained,
                server_rounds_completed: 0,
                bytes_sent: 0,
                bytes_received: 0,
            };
            for connection in 0u64.. {
                // Each connection's secrets (keys, masks, DP noise) follow
                // the seed, so the same seed replays the same run.
                opts.session_seed = Some(mix_seed(&[
                    cfg_seed,
                    CLIENT_SECRETS_SEED,
                    i as u64,
                    connection,
                ]));
                let run = fedveil_client::run(&endpoint, &opts, Arc::clone(&trainer));
                let result = if vanished {
                    // A rejoining client stops trying once the run is over.
                    tokio::select! {
                        result = run => result,
                        _ = server_done.wait_for(|done| *done) => return Ok(gone_report(rounds_trained)),
                    }
                } else {
                    run.await
                };
                match result {
                    Err(ClientError::Vanished {
                        rounds_trained: trained,
                        ..
                    }) => {
                        rounds_trained += trained;
                        vanished = true;
                        tokio::time::sleep(faults::REJOIN_DELAY).await;
                        fault_log.rejoined();
                    }
                    Ok(mut report) => {
                        report.rounds_trained += rounds_trained;
                        return Ok(report);
                    }
                    Err(e) => {
                        let run_over = tokio::time::timeout(
                            SIM_SERVER_END_WAIT,
                            server_done.wait_for(|done| *done),
                        )
                        .await
                        .is_ok_and(|r| r.is_ok());
                        if vanished && run_over {
                            return Ok(gone_report(rounds_trained));
                        }
                        return Err(SimClientError::Run { name, source: e });
                    }
                }
            }
            unreachable!("a client connects until its run ends")
        });
    }
    // If every client has ended (all refused or failed), nobody is left to
    // run a round: the server stops instead of waiting forever.
    let (all_gone, gone) = tokio::sync::oneshot::channel::<()>();
    let collector = tokio::spawn(async move {
        let mut reports = Vec::new();
        while let Some(joined) = clients.join_next().await {
            reports.push(joined.unwrap_or_else(|e| Err(SimClientError::Task(e))));
        }
        let _ = all_gone.send(());
        reports
    });
    let server_report = server
        .run_observed(observer, async {
            if gone.await.is_ok() {
                tracing::warn!("every client has ended; stopping the server");
            }
        })
        .await;
    let _ = server_done.send(true);
    let client_reports = collector.await.context("collecting client reports")?;
    client_endpoint.close(quic::CLOSE_OK.into(), b"done");
    Ok(SimReport {
        server: server_report,
        clients: client_reports,
        wall: started.elapsed(),
        faults: fault_log.tally(),
        model_instances: models.instances(),
    })
}

/// Writes the global model `params` as safetensors (PyTorch's layout).
pub fn save_model(
    cfg: &SimConfig,
    split: &Split,
    params: &[f32],
    path: &std::path::Path,
) -> Result<()> {
    let device = cfg.run.data.device()?.device()?;
    let mut model =
        fedveil_ml::model::build(&cfg.run.data.model, &DataShape::of(&split.train), &device)?;
    model.set_params(params)?;
    model
        .save_safetensors(path)
        .with_context(|| format!("saving the global model to {}", path.display()))
}

/// The name simulated client `i` enrols as.
pub fn client_name(i: usize) -> String {
    format!("client-{i:05}")
}

/// Quiet observer that only logs at debug level (tests, `--quiet`).
pub struct QuietObserver;

impl Observer for QuietObserver {
    fn on_event(&mut self, event: &fedveil_proto::round::Event) {
        tracing::debug!(?event, "event");
    }
}
