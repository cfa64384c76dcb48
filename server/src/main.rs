//! `fedveil-server`: create the server's TLS identity and run federated
//! training rounds for connecting clients.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use fedveil_common::data::{self, DatasetName, Download};
use fedveil_common::dp::{DpConfig, Mechanism, NoiseLevel};
use fedveil_common::model::{DataShape, DeviceSpec};
use fedveil_common::net::{self, NodeRegistry, ServerIdentity};
use fedveil_common::pki;
use fedveil_common::round::server::SecAggConfig;
use fedveil_common::round::server::{
    DEFAULT_MAX_CLIENTS, DEFAULT_MAX_EXAMPLES_PER_UPDATE, DEFAULT_MAX_FAILED_ROUNDS,
};
use fedveil_common::round::{Coordinator, CoordinatorConfig};
use fedveil_common::server_opt::ServerOptimizerConfig;
use fedveil_common::wire::{FrameLimits, LocalOptimizer, RoundConfig};
use fedveil_server::config_file::{SERVER_CONFIG_FILE, ServerFile};
use fedveil_server::setup::{MetricsFiles, ModelEvaluator, ServerObserver, initial_model};
use fedveil_server::store::Store;
use fedveil_server::{NodeService, Registry, ServeOptions};

#[derive(Parser)]
#[command(name = "fedveil-server", version, about = "fedveil aggregation server")]
struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, global = true, default_value = "info", env = "FEDVEIL_LOG")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the server's CA, TLS certificate and server.toml in DIR.
    Init(InitArgs),
    /// Issue a one-time enrolment token for a node (printed on stdout).
    Enroll(EnrollArgs),
    /// List enrolled nodes.
    Nodes(RegistryArgs),
    /// Revoke a node: refused from its next connection on, and dropped now
    /// by a running server.
    Revoke(RevokeArgs),
    /// Print the CA fingerprint nodes pin when they enrol.
    Fingerprint(DirArgs),
    /// Run federated training (creates the identity first if DIR has none).
    /// Resumes the run from its last committed round after a restart.
    Run(Box<RunArgs>),
    /// Write the run's committed global model to a file.
    Export(ExportArgs),
}

#[derive(Args)]
struct StateArgs {
    /// The state database [default: DIR/state.db].
    #[arg(long)]
    state: Option<PathBuf>,
    /// Name of the run in the state database.
    #[arg(long, default_value = "default")]
    run: String,
}

impl StateArgs {
    fn path(&self, dir: &std::path::Path) -> PathBuf {
        self.state
            .clone()
            .unwrap_or_else(|| dir.join(fedveil_server::store::STATE_DB_FILE))
    }
}

#[derive(Args)]
struct DirArgs {
    /// The server directory (from `fedveil-server init`).
    #[arg(long)]
    dir: PathBuf,
}

/// Where the node registry lives: the state database.
#[derive(Args)]
struct RegistryArgs {
    /// The server directory (from `fedveil-server init`).
    #[arg(long)]
    dir: PathBuf,
    /// The state database [default: DIR/state.db].
    #[arg(long)]
    state: Option<PathBuf>,
}

impl RegistryArgs {
    fn open(&self) -> Result<Registry> {
        let path = self
            .state
            .clone()
            .unwrap_or_else(|| self.dir.join(fedveil_server::store::STATE_DB_FILE));
        Ok(Registry::open(&path)?)
    }
}

#[derive(Args)]
struct EnrollArgs {
    #[command(flatten)]
    registry: RegistryArgs,
    /// The node's name (letters, digits, '.', '-', '_').
    #[arg(long)]
    name: String,
    /// How long the token stays valid, e.g. 30m, 24h, 7d [default: token_ttl
    /// from server.toml, else 24h].
    #[arg(long, value_parser = pki::parse_duration)]
    ttl: Option<Duration>,
}

#[derive(Args)]
struct RevokeArgs {
    #[command(flatten)]
    registry: RegistryArgs,
    /// The node to revoke.
    name: String,
}

#[derive(Args)]
struct ExportArgs {
    /// The server directory (holds state.db unless --state says otherwise).
    #[arg(long)]
    dir: PathBuf,
    #[command(flatten)]
    state: StateArgs,
    /// Output format.
    #[arg(long, default_value = "safetensors")]
    format: String,
    /// Output file.
    #[arg(long)]
    out: PathBuf,
}

/// The server optimizer (Reddi et al. 2021) and client-side FedProx.
#[derive(Args, Debug, Clone, serde::Serialize)]
struct OptimArgs {
    /// fedavg, fedavgm, fedadagrad, fedyogi or fedadam.
    #[arg(long, default_value = "fedavg")]
    server_optimizer: String,
    /// Server learning rate [default: 1 for fedavg/fedavgm, 0.01 for the adaptive ones].
    #[arg(long)]
    server_lr: Option<f64>,
    /// FedAvgM momentum.
    #[arg(long, default_value_t = fedveil_common::server_opt::DEFAULT_SERVER_MOMENTUM)]
    server_momentum: f64,
    #[arg(long, default_value_t = fedveil_common::server_opt::DEFAULT_BETA1)]
    beta1: f64,
    #[arg(long, default_value_t = fedveil_common::server_opt::DEFAULT_BETA2)]
    beta2: f64,
    /// Adaptivity tau of FedAdagrad/FedYogi/FedAdam.
    #[arg(long, default_value_t = fedveil_common::server_opt::DEFAULT_TAU)]
    tau: f64,
    /// FedProx proximal weight mu sent to clients (0: off).
    #[arg(long, default_value_t = 0.0)]
    prox_mu: f32,
}

impl OptimArgs {
    fn config(&self) -> Result<ServerOptimizerConfig> {
        ServerOptimizerConfig::from_settings(
            &self.server_optimizer,
            self.server_lr,
            self.server_momentum,
            self.beta1,
            self.beta2,
            self.tau,
        )
        .map_err(anyhow::Error::msg)
    }
}

#[derive(Args)]
struct InitArgs {
    /// Directory for the CA and server certificate (keys are mode 0600).
    #[arg(long)]
    dir: PathBuf,
    /// DNS names and IP addresses clients use to reach this server.
    #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
    name: Vec<String>,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    identity: InitArgs,
    /// UDP address to listen on [default: listen from server.toml, else
    /// 127.0.0.1:4433].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Lifetime of client certificates issued at enrolment, e.g. 30d
    /// [default: client_cert_ttl from server.toml, else 30d].
    #[arg(long, value_parser = pki::parse_duration)]
    client_cert_ttl: Option<Duration>,
    /// Dataset whose test split evaluates each new global model.
    #[arg(long, default_value = "mnist")]
    dataset: String,
    /// Data directory (default: $FEDVEIL_DATA, then the user cache).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long, default_value = "cnn")]
    model: String,
    /// cpu, cuda or cuda:N (cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Clients needed before a round starts.
    #[arg(long, default_value_t = 2)]
    min_clients: usize,
    /// Fraction C of connected clients sampled each round.
    #[arg(long, default_value_t = 1.0)]
    fraction: f64,
    #[arg(long, default_value_t = 10)]
    rounds: u64,
    /// Local epochs E per round.
    #[arg(long, default_value_t = 1)]
    local_epochs: u32,
    /// Caps each client's local training at this many minibatch steps per
    /// round [default: no cap].
    #[arg(long)]
    max_local_steps: Option<u32>,
    /// Local minibatch size B.
    #[arg(long, default_value_t = 10)]
    batch_size: u32,
    /// Client learning rate.
    #[arg(long, default_value_t = 0.05)]
    lr: f32,
    /// Client optimizer: sgd, or adam (fresh moments each round; use a
    /// learning rate near 1e-3).
    #[arg(long, default_value_t = LocalOptimizer::Sgd)]
    local_optimizer: LocalOptimizer,
    /// Seconds before a round completes without its stragglers.
    #[arg(long, default_value_t = 600)]
    round_timeout: u64,
    /// Most clients admitted at once.
    #[arg(long, default_value_t = DEFAULT_MAX_CLIENTS)]
    max_clients: usize,
    /// Largest example count one update may claim.
    #[arg(long, default_value_t = DEFAULT_MAX_EXAMPLES_PER_UPDATE)]
    max_examples_per_update: u64,
    /// Seeds the initial model, cohort sampling and client shuffling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write metrics.jsonl and metrics.csv here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Stop the run after this many failed rounds.
    #[arg(long, default_value_t = DEFAULT_MAX_FAILED_ROUNDS)]
    max_failed_rounds: u64,
    #[command(flatten)]
    secagg: SecAggArgs,
    #[command(flatten)]
    dp: DpArgs,
    #[command(flatten)]
    optim: OptimArgs,
    #[command(flatten)]
    state: StateArgs,
}

/// Differential privacy; on when a noise multiplier or target epsilon is given.
#[derive(Args, Debug, Clone, serde::Serialize)]
pub struct DpArgs {
    /// distributed (needs --secagg), central or local [default: distributed
    /// with --secagg, else central].
    #[arg(long)]
    dp: Option<Mechanism>,
    /// Noise std over clip norm.
    #[arg(long, conflicts_with = "target_epsilon")]
    noise_multiplier: Option<f64>,
    /// Epsilon to reach after --rounds rounds (local DP: per round).
    #[arg(long)]
    target_epsilon: Option<f64>,
    #[arg(long, default_value_t = fedveil_common::dp::DEFAULT_DELTA)]
    delta: f64,
    /// L2 norm every update is clipped to.
    #[arg(long, default_value_t = fedveil_common::dp::DEFAULT_CLIP_NORM)]
    clip_norm: f64,
    /// Largest epsilon the run may spend [default: the target epsilon].
    #[arg(long)]
    dp_budget: Option<f64>,
    /// Clients the sampling rate refers to (enrolled clients) [default: --min-clients].
    #[arg(long)]
    dp_population: Option<usize>,
    /// Distributed DP: fewest contributors per round [default: 70% of the expected cohort].
    #[arg(long)]
    dp_min_contributors: Option<usize>,
    /// Adapt the clip bound to a quantile of the update norms (Andrew et
    /// al. 2021); --clip-norm is then the initial bound.
    #[arg(long)]
    adaptive_clip: bool,
    /// Adaptive clipping: the norm quantile the bound tracks.
    #[arg(long, default_value_t = fedveil_common::dp::adaptive::DEFAULT_TARGET_QUANTILE)]
    clip_quantile: f64,
    /// Adaptive clipping: step size of the geometric update.
    #[arg(long, default_value_t = fedveil_common::dp::adaptive::DEFAULT_CLIP_LEARNING_RATE)]
    clip_lr: f64,
    /// Adaptive clipping: std of the noise on the clipped count [default:
    /// expected cohort / 20].
    #[arg(long)]
    clip_count_noise: Option<f64>,
}

impl DpArgs {
    fn config(&self, rounds: u64, secagg: bool) -> Result<Option<DpConfig>> {
        let noise = match (self.noise_multiplier, self.target_epsilon) {
            (Some(z), None) => NoiseLevel::NoiseMultiplier(z),
            (None, Some(e)) => NoiseLevel::TargetEpsilon(e),
            (None, None) if self.dp.is_some() => {
                anyhow::bail!("--dp needs --noise-multiplier or --target-epsilon")
            }
            _ => return Ok(None),
        };
        Ok(Some(DpConfig {
            mechanism: self.dp.unwrap_or(if secagg {
                Mechanism::Distributed
            } else {
                Mechanism::Central
            }),
            clip_norm: self.clip_norm,
            noise,
            delta: self.delta,
            planned_rounds: rounds,
            budget: self.dp_budget,
            min_contributors: self.dp_min_contributors,
            adaptive: self
                .adaptive_clip
                .then_some(fedveil_common::dp::AdaptiveClipping {
                    target_quantile: self.clip_quantile,
                    learning_rate: self.clip_lr,
                    count_noise_std: self.clip_count_noise,
                }),
        }))
    }
}

/// Secure aggregation (SecAgg+): the server sees only the cohort's sum.
#[derive(Args, Debug, Clone, serde::Serialize)]
pub struct SecAggArgs {
    /// Aggregate through SecAgg+.
    #[arg(long)]
    secagg: bool,
    /// Neighbours per client [default: ~3 log2(cohort), the full cohort when small].
    #[arg(long)]
    secagg_degree: Option<u32>,
    /// Shamir threshold t (> degree / 2) [default: from --secagg-expected-dropout].
    #[arg(long)]
    secagg_threshold: Option<u32>,
    /// Masked values live in Z_(2^BITS).
    #[arg(long, default_value_t = fedveil_common::secagg::DEFAULT_BITS)]
    secagg_bits: u32,
    /// Weighted update values are clipped to [-CLIP, CLIP] before encoding.
    #[arg(long, default_value_t = fedveil_common::secagg::DEFAULT_CLIP)]
    secagg_clip: f32,
    /// Example counts are capped at this weight.
    #[arg(long, default_value_t = fedveil_common::secagg::DEFAULT_MAX_WEIGHT)]
    secagg_max_weight: u64,
    /// Dropout rate the default threshold tolerates.
    #[arg(long, default_value_t = fedveil_common::secagg::DEFAULT_EXPECTED_DROPOUT)]
    secagg_expected_dropout: f64,
    /// Seconds allowed for each key-exchange and unmask stage.
    #[arg(long, default_value_t = 60)]
    secagg_stage_timeout: u64,
}

impl SecAggArgs {
    fn config(&self) -> Option<SecAggConfig> {
        self.secagg.then(|| SecAggConfig {
            degree: self.secagg_degree,
            threshold: self.secagg_threshold,
            bits: self.secagg_bits,
            clip: self.secagg_clip,
            max_weight: self.secagg_max_weight,
            expected_dropout: self.secagg_expected_dropout,
            stage_timeout: Duration::from_secs(self.secagg_stage_timeout),
        })
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log).context("--log")?)
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Init(args) => init(&args),
        Command::Enroll(args) => enroll(&args),
        Command::Nodes(args) => nodes(&args),
        Command::Revoke(args) => revoke(&args),
        Command::Fingerprint(args) => {
            println!("{}", load_identity(&args.dir)?.ca_fingerprint());
            Ok(())
        }
        Command::Run(args) => tokio::runtime::Runtime::new()?.block_on(run(*args)),
        Command::Export(args) => export(&args),
    }
}

fn init(args: &InitArgs) -> Result<()> {
    if args.dir.join(net::SERVER_CERT_FILE).exists() {
        bail!(
            "{} already holds a server identity; nodes enrolled with it would lose their CA. Use another directory for a new CA",
            args.dir.display()
        );
    }
    let identity = ServerIdentity::create(&args.dir, &args.name)?;
    let file = ServerFile::new(&args.name);
    file.save(&args.dir)?;
    println!(
        "created the CA and a server certificate for {} in {}\n\
         CA key: {} (mode 0600; never leaves this machine)\n\
         settings: {} (listen {})\n\
         CA fingerprint (nodes pin it when they enrol):\n  {}\n\
         next: issue a token per node with `fedveil-server enroll --dir {} --name NODE`",
        args.name.join(", "),
        args.dir.display(),
        args.dir.join(net::CA_KEY_FILE).display(),
        args.dir.join(SERVER_CONFIG_FILE).display(),
        file.listen,
        identity.ca_fingerprint(),
        args.dir.display(),
    );
    Ok(())
}

/// The identity `init` made, or an error saying to run it.
fn load_identity(dir: &std::path::Path) -> Result<ServerIdentity> {
    ServerIdentity::load(dir).with_context(|| {
        format!(
            "{} holds no server identity; create one with `fedveil-server init --dir {} --name HOST`",
            dir.display(),
            dir.display()
        )
    })
}

fn enroll(args: &EnrollArgs) -> Result<()> {
    let identity = load_identity(&args.registry.dir)?;
    let file = ServerFile::load(&args.registry.dir)?;
    let ttl = args
        .ttl
        .or(file.as_ref().map(ServerFile::token_ttl))
        .unwrap_or(pki::DEFAULT_TOKEN_TTL);
    let registry = args.registry.open()?;
    let issued = registry.issue_token(&args.name, ttl, pki::unix_now())?;
    let server = file.map_or_else(
        || format!("localhost:{}", fedveil_server::config_file::DEFAULT_PORT),
        |f| format!("{}:{}", f.names[0], f.listen.port()),
    );
    // The token alone on stdout, so scripts can capture it; the how-to on
    // stderr.
    println!("{}", issued.token);
    eprintln!(
        "token for node '{}', single use, valid until {}; on the node run:\n  \
         fedveil-client enroll --server {server} --ca-fingerprint {} --token {} --dir NODE_DIR",
        issued.node,
        pki::format_time(issued.expires_at),
        identity.ca_fingerprint(),
        issued.token,
    );
    Ok(())
}

fn nodes(args: &RegistryArgs) -> Result<()> {
    let now = pki::unix_now();
    let nodes = args.open()?.nodes()?;
    if nodes.is_empty() {
        println!("no enrolled nodes");
        return Ok(());
    }
    println!(
        "{:<24} {:<8} {:<34} {:<21} LAST SEEN",
        "NAME", "STATUS", "SERIAL", "EXPIRES"
    );
    for n in nodes {
        let status = match (n.revoked_at, n.not_after) {
            (Some(_), _) => "revoked",
            (None, Some(t)) if t <= now => "expired",
            (None, _) => "active",
        };
        println!(
            "{:<24} {:<8} {:<34} {:<21} {}",
            n.name,
            status,
            n.serial.as_deref().unwrap_or("-"),
            n.not_after.map_or("-".into(), pki::format_time),
            n.last_seen.map_or("never".into(), pki::format_time),
        );
    }
    Ok(())
}

fn revoke(args: &RevokeArgs) -> Result<()> {
    let certs = args.registry.open()?.revoke(&args.name, pki::unix_now())?;
    println!(
        "revoked node '{}' ({certs} certificate(s)); a running server refuses it from now on and drops its connection within {:?}",
        args.name,
        fedveil_server::driver::REVOCATION_POLL_INTERVAL
    );
    Ok(())
}

async fn run(args: RunArgs) -> Result<()> {
    let identity = ServerIdentity::load_or_create(&args.identity.dir, &args.identity.name)?;
    let file = match ServerFile::load(&args.identity.dir)? {
        Some(f) => f,
        None => {
            let f = ServerFile::new(&args.identity.name);
            f.save(&args.identity.dir)?;
            f
        }
    };
    let listen = args.listen.unwrap_or(file.listen);
    let device = args.device.device()?;
    let data_dir = data::resolve_data_dir(args.data_dir.as_deref());
    let split = data::load(
        DatasetName::parse(&args.dataset)?,
        &data_dir,
        Download::IfMissing,
        args.seed,
    )?;
    let shape = DataShape::of(&split.test);
    let (spec, initial) = initial_model(&args.model, &shape, &device, args.seed)?;
    let population = args.dp.dp_population.unwrap_or(args.min_clients);
    let dp = args
        .dp
        .config(args.rounds, args.secagg.secagg)?
        .map(|c| {
            c.plan(
                args.fraction,
                population,
                spec.param_count as usize,
                population.min(args.max_clients),
                args.secagg.secagg,
            )
        })
        .transpose()
        .context("differential privacy")?;
    if let Some(plan) = &dp {
        plan.log();
    }
    // With DP the distributed encoding is sized for `population` clients:
    // admit no more than that.
    let max_clients = if dp.is_some() {
        args.max_clients.min(population)
    } else {
        args.max_clients
    };
    let config = CoordinatorConfig {
        rounds: args.rounds,
        min_clients: args.min_clients,
        fraction: args.fraction,
        round_timeout: Duration::from_secs(args.round_timeout),
        max_clients,
        max_examples_per_update: args.max_examples_per_update,
        seed: args.seed,
        round: RoundConfig {
            local_epochs: args.local_epochs,
            batch_size: args.batch_size,
            max_local_steps: args.max_local_steps,
            learning_rate: args.lr,
            seed: args.seed,
            secure_aggregation: args.secagg.secagg,
            dp: None,
            prox_mu: args.optim.prox_mu,
            local_optimizer: args.local_optimizer,
        },
        secagg: args.secagg.config(),
        max_failed_rounds: args.max_failed_rounds,
        server_optimizer: args.optim.config()?,
        dp,
    };
    let limits = FrameLimits::for_model(spec.param_count);
    // The run's identity: what must not change between restarts.
    let record = serde_json::json!({
        "model": args.model,
        "dataset": args.dataset,
        "example_shape": shape.example_shape,
        "num_classes": shape.num_classes,
        "vocab_size": shape.vocab_size,
        "param_count": spec.param_count,
        "rounds": args.rounds,
        "min_clients": args.min_clients,
        "fraction": args.fraction,
        "local_epochs": args.local_epochs,
        "max_local_steps": args.max_local_steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "local_optimizer": args.local_optimizer.to_string(),
        "seed": args.seed,
        "secagg": args.secagg,
        "dp": args.dp,
        "optim": args.optim,
    })
    .to_string();
    let state_path = args.state.path(&args.identity.dir);
    let mut store = Store::open(&state_path, &args.state.run, &record)?;
    let saved = store.load()?;
    let coordinator = match saved.checkpoint {
        None if saved.ledger.is_none() => Coordinator::new(config, spec.clone(), initial, 1)?,
        checkpoint => {
            // Nothing committed yet but a round was charged: continue from
            // the initial state, after that round.
            let checkpoint = match checkpoint {
                Some(c) => c,
                None => Coordinator::new(config.clone(), spec.clone(), initial, 1)?.checkpoint(),
            };
            let c = Coordinator::resume(config, spec.clone(), checkpoint, saved.ledger)?;
            let resumed = c.checkpoint();
            if resumed.rounds_completed >= args.rounds {
                println!(
                    "run '{}' already completed its {} rounds (state in {}); export its model with `fedveil-server export`, or start a new run with --run NAME",
                    args.state.run,
                    resumed.rounds_completed,
                    state_path.display()
                );
                return Ok(());
            }
            println!(
                "resumed run '{}' at round {} ({} completed, {} failed); model sha256 {}; moments sha256 {}; epsilon {}",
                args.state.run,
                c.next_round(),
                resumed.rounds_completed,
                resumed.rounds_failed,
                fingerprint(&resumed.global_model),
                fingerprint(&[resumed.optimizer.m.as_slice(), &resumed.optimizer.v].concat()),
                resumed
                    .ledger
                    .as_ref()
                    .map_or("-".to_owned(), |l| format!("{:.6}", l.epsilon())),
            );
            c
        }
    };
    tracing::info!(state = %state_path.display(), run = %args.state.run, "state database");
    let evaluator = ModelEvaluator::new(&args.model, split.test, &device)?;
    let registry = Arc::new(Registry::open(&state_path)?);
    if identity.ca.is_none() {
        tracing::warn!("no CA key in the server directory: nodes cannot enrol or renew here");
    }
    let tls = net::server_config(
        &identity,
        Some(Arc::clone(&registry) as Arc<dyn NodeRegistry>),
    )?;
    let ca_fingerprint = identity.ca_fingerprint();
    let nodes = Arc::new(NodeService {
        registry,
        ca: identity.ca,
        cert_ttl: args.client_cert_ttl.unwrap_or(file.client_cert_ttl()),
    });
    let endpoint = quinn::Endpoint::server(tls, listen)
        .with_context(|| format!("cannot listen on {listen}"))?;
    tracing::info!(
        listen = %endpoint.local_addr()?,
        model = %spec.name,
        params = spec.param_count,
        %ca_fingerprint,
        "server ready; waiting for {} enrolled clients", args.min_clients
    );
    let mut observer = ServerObserver {
        files: args.out.as_deref().map(MetricsFiles::create).transpose()?,
    };
    let report = fedveil_server::serve(
        endpoint,
        coordinator,
        evaluator,
        ServeOptions {
            limits,
            observer: &mut observer,
            state: Some(&mut store),
            nodes: Some(nodes),
        },
        shutdown_signal(),
    )
    .await;
    match report.metrics.last() {
        Some(last) => println!(
            "{} rounds completed ({} failed); final test accuracy {:.4}, loss {:.4}",
            report.rounds_completed, report.rounds_failed, last.accuracy, last.loss
        ),
        None => println!("no round completed"),
    }
    if let Some(eps) = report.epsilon {
        println!(
            "privacy spent: epsilon {eps:.4} at delta {:e} (every started round counts)",
            args.dp.delta
        );
    }
    Ok(())
}

/// SHA-256 of values' little-endian bytes, in hex (to compare states).
fn fingerprint(values: &[f32]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for v in values {
        h.update(v.to_le_bytes());
    }
    hex::encode(h.finalize())
}

fn export(args: &ExportArgs) -> Result<()> {
    if args.format != "safetensors" {
        anyhow::bail!(
            "unknown export format {:?} (supported: safetensors)",
            args.format
        );
    }
    let path = args.state.path(&args.dir);
    let store = Store::open_existing(&path, &args.state.run)?;
    let record: serde_json::Value =
        serde_json::from_str(&store.config()?).context("the run's saved config")?;
    let shape = DataShape {
        example_shape: serde_json::from_value(record["example_shape"].clone())
            .context("saved example shape")?,
        num_classes: serde_json::from_value(record["num_classes"].clone())
            .context("saved class count")?,
        // Runs from before text models have no vocabulary.
        vocab_size: record["vocab_size"].as_u64().unwrap_or(0) as usize,
    };
    let name = record["model"].as_str().context("saved model name")?;
    let mut model = fedveil_common::model::build(name, &shape, &burn::prelude::Device::flex())?;
    let saved = store.load()?;
    let checkpoint = saved
        .checkpoint
        .with_context(|| format!("run '{}' has no committed round yet", args.state.run))?;
    model.set_params(&checkpoint.global_model)?;
    model.save_safetensors(&args.out)?;
    println!(
        "wrote the global model after round {} ({} parameters, sha256 {}) to {}",
        checkpoint.next_round - 1,
        checkpoint.global_model.len(),
        fingerprint(&checkpoint.global_model),
        args.out.display()
    );
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
