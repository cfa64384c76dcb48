//! `fedveil-server`: create the server's TLS identity and run federated
//! training rounds for connecting clients.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use fedveil_ml::model::DataShape;
use fedveil_net::pki;
use fedveil_net::quic::{self, ServerIdentity};
use fedveil_proto::round::server::MIN_SECAGG_COHORT;
use fedveil_server::config_file::{SERVER_CONFIG_FILE, ServerFile};
use fedveil_server::deploy::sha256_hex;
use fedveil_server::store::Store;
use fedveil_server::{Registry, RunStatus, Server};
use fedveil_settings::{Deployment, Layered, Settings, SettingsFile, Simulation};

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
    Nodes(NodesArgs),
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

#[derive(Args)]
struct NodesArgs {
    #[command(flatten)]
    registry: RegistryArgs,
    /// The delta each node's epsilon over all runs is shown at.
    #[arg(long, default_value_t = fedveil_proto::round::policy::DEFAULT_POLICY_DELTA)]
    delta: f64,
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

#[derive(Args)]
struct InitArgs {
    /// Directory for the CA and server certificate (keys are mode 0600).
    #[arg(long)]
    dir: PathBuf,
    /// DNS names and IP addresses clients use to reach this server.
    #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
    name: Vec<String>,
}

/// `run`'s own flags; the run's settings ([`Settings`], [`Deployment`])
/// are added to the subcommand by [`command`], defined once for the server,
/// the simulator and the recipe files.
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
    /// TOML file with any of the run's settings, the same format as
    /// simulations/recipes/ (flags override it; simulation-only keys are
    /// ignored).
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    state: StateArgs,
}

/// The run's settings: defaults, then `--config FILE`, then flags.
fn run_settings(args: &RunArgs, matches: &ArgMatches) -> Result<(Settings, Deployment)> {
    let (mut settings, mut deployment) = match &args.config {
        None => (Settings::default(), Deployment::default()),
        Some(path) => {
            let file = SettingsFile::read_recipe(path)?;
            file.note_ignored(Simulation::keys(), "simulation settings in a deployment");
            (file.get()?, file.get()?)
        }
    };
    settings.update_from_flags(matches)?;
    deployment.update_from_flags(matches)?;
    Ok((settings, deployment))
}

/// The command line: the derived commands, with the run's settings added
/// to `run`.
fn command() -> clap::Command {
    Cli::command().mut_subcommand("run", |run| Deployment::add_flags(Settings::add_flags(run)))
}

/// Burn's CPU backend frees and reallocates large buffers at every training
/// step; the system allocator hands them back to the kernel and faults them
/// in again, mimalloc reuses them (a CNN step: 51 -> 33 ms, docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    let matches = command().get_matches();
    let cli = Cli::from_arg_matches(&matches)?;
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
        Command::Run(args) => {
            let run_matches = matches
                .subcommand_matches("run")
                .expect("the run subcommand");
            let (settings, deployment) = run_settings(&args, run_matches)?;
            tokio::runtime::Runtime::new()?.block_on(run(*args, settings, deployment))
        }
        Command::Export(args) => export(&args),
    }
}

fn init(args: &InitArgs) -> Result<()> {
    if args.dir.join(quic::SERVER_CERT_FILE).exists() {
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
        args.dir.join(quic::CA_KEY_FILE).display(),
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

fn nodes(args: &NodesArgs) -> Result<()> {
    let now = pki::unix_now();
    let registry = args.registry.open()?;
    let nodes = registry.nodes()?;
    let spends = registry.spends()?;
    if nodes.is_empty() {
        println!("no enrolled nodes");
        return Ok(());
    }
    println!(
        "{:<24} {:<8} {:<34} {:<21} {:<21} EPSILON (all runs, delta {:e})",
        "NAME", "STATUS", "SERIAL", "EXPIRES", "LAST SEEN", args.delta
    );
    for n in nodes {
        let status = match (n.revoked_at, n.not_after) {
            (Some(_), _) => "revoked",
            (None, Some(t)) if t <= now => "expired",
            (None, _) => "active",
        };
        let spent = spends.get(&n.name).map_or("-".into(), |s| {
            format!("{:.4} over {} rounds", s.epsilon(args.delta), s.rounds)
        });
        println!(
            "{:<24} {:<8} {:<34} {:<21} {:<21} {spent}",
            n.name,
            status,
            n.serial.as_deref().unwrap_or("-"),
            n.not_after.map_or("-".into(), pki::format_time),
            n.last_seen.map_or("never".into(), pki::format_time),
        );
        // A renewal leaves the previous certificate usable for a grace
        // period: every serial that still opens a connection is listed.
        for (serial, not_after) in registry.live_serials(&n.name, now)? {
            if n.serial.as_deref() != Some(serial.as_str()) {
                println!(
                    "{:<24} {:<8} {serial:<34} {:<21} (also live, until its grace period ends)",
                    "",
                    "",
                    pki::format_time(not_after)
                );
            }
        }
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

async fn run(args: RunArgs, settings: Settings, deployment: Deployment) -> Result<()> {
    if settings.secagg && deployment.min_clients < MIN_SECAGG_COHORT {
        bail!(
            "secure aggregation needs cohorts of at least {MIN_SECAGG_COHORT} (with 2, each node could subtract its own update from the sum): run with --min-clients {MIN_SECAGG_COHORT} or more, or turn it off with --secagg false"
        );
    }
    let dir = &args.identity.dir;
    let file = match ServerFile::load(dir)? {
        Some(f) => f,
        None => {
            let f = ServerFile::new(&args.identity.name);
            f.save(dir)?;
            f
        }
    };
    let state_path = args.state.path(dir);
    let mut builder = Server::builder(settings.clone())
        .min_clients(deployment.min_clients)
        .connection_limits(deployment.connection_limits()?)
        .identity_dir(dir)
        .names(args.identity.name.clone())
        .listen(args.listen.unwrap_or(file.listen))
        .client_cert_ttl(args.client_cert_ttl.unwrap_or(file.client_cert_ttl()))
        .state(&state_path, &args.state.run);
    if let Some(out) = &settings.out {
        builder = builder.metrics_dir(out);
    }
    let server = builder.build()?;
    match server.status() {
        RunStatus::Complete {
            rounds_completed, ..
        } => {
            println!(
                "run '{}' already completed its {rounds_completed} rounds (state in {}); export its model with `fedveil-server export`, or start a new run with --run NAME",
                args.state.run,
                state_path.display()
            );
            return Ok(());
        }
        RunStatus::Resumed {
            next_round,
            rounds_completed,
            rounds_failed,
            model_sha256,
            strategy_sha256,
            epsilon,
        } => println!(
            "resumed run '{}' at round {next_round} ({rounds_completed} completed, {rounds_failed} failed); model sha256 {model_sha256}; moments sha256 {strategy_sha256}; epsilon {}",
            args.state.run,
            epsilon.map_or("-".to_owned(), |e| format!("{e:.6}")),
        ),
        RunStatus::Started => {}
    }
    tracing::info!(state = %state_path.display(), run = %args.state.run, "state database");
    if let Some(c) = server.coordinator() {
        tracing::info!(strategy = %c.strategy_name(), "server strategy");
    }
    tracing::info!(
        listen = %server.local_addr(),
        model = %server.spec().name,
        params = server.spec().param_count,
        ca_fingerprint = %server.ca_fingerprint(),
        "server ready; waiting for {} enrolled clients", deployment.min_clients
    );
    let report = server.run(shutdown_signal()).await;
    match report.metrics.last() {
        Some(last) => println!(
            "{} rounds completed ({} failed); final test {}, loss {:.4}",
            report.rounds_completed,
            report.rounds_failed,
            last.score_text(),
            last.loss
        ),
        None => println!("no round completed"),
    }
    if let Some(eps) = report.epsilon {
        println!(
            "privacy spent: epsilon {eps:.4} at delta {:e} (every started round counts)",
            settings.delta
        );
    }
    Ok(())
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
    let mut model = fedveil_ml::model::build(name, &shape, &burn::prelude::Device::flex())?;
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
        sha256_hex(&checkpoint.global_model),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<(Settings, Deployment)> {
        let argv = ["fedveil-server", "run", "--dir", "unused"];
        let matches = command().try_get_matches_from(argv.iter().chain(args))?;
        let Command::Run(run) = Cli::from_arg_matches(&matches)?.command else {
            unreachable!("parsed a run")
        };
        run_settings(&run, matches.subcommand_matches("run").expect("run"))
    }

    #[test]
    fn secure_aggregation_is_on_by_default_and_bare_secagg_is_accepted() {
        let (settings, deployment) = parse(&[]).unwrap();
        assert!(settings.secagg);
        assert_eq!(deployment.min_clients, MIN_SECAGG_COHORT);
        assert!(parse(&["--secagg"]).unwrap().0.secagg);
        assert!(!parse(&["--secagg", "false"]).unwrap().0.secagg);
    }

    #[test]
    fn a_recipe_is_a_config_file_and_flags_override_it() {
        let recipe = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../simulations/recipes/mnist-fedavg-iid.toml"
        );
        let (settings, deployment) =
            parse(&["--config", recipe, "--rounds", "3", "--min-clients", "10"]).unwrap();
        assert_eq!(settings.rounds, 3);
        assert_eq!(deployment.min_clients, 10);
        // From the file.
        assert_eq!(
            (
                settings.fraction,
                settings.local_epochs,
                settings.batch_size
            ),
            (0.1, 5, 10)
        );
        assert_eq!(settings.seed, 1);
    }

    #[test]
    fn connection_limits_are_flags_checked_when_read() {
        let (_, deployment) = parse(&[]).unwrap();
        assert_eq!(
            deployment.connection_limits().unwrap(),
            fedveil_server::ConnectionLimits::default()
        );
        let (_, deployment) =
            parse(&["--max-outbound-queued", "8", "--hello-timeout", "2.5"]).unwrap();
        let limits = deployment.connection_limits().unwrap();
        assert_eq!(limits.max_outbound_queued, 8);
        assert_eq!(limits.hello_timeout, Duration::from_millis(2500));
        let (_, deployment) = parse(&["--max-unadmitted-per-node", "0"]).unwrap();
        let err = deployment.connection_limits().unwrap_err().to_string();
        assert!(err.contains("max_unadmitted_per_node"), "{err}");
        let (_, deployment) = parse(&["--hello-timeout", "0"]).unwrap();
        assert!(deployment.connection_limits().is_err());
    }

    #[test]
    fn an_unknown_key_in_the_config_is_refused() {
        let path = std::env::temp_dir().join(format!("fedveil-typo-{}.toml", std::process::id()));
        std::fs::write(&path, "rounds = 3\nnoise_multiplyer = 1.1\n").unwrap();
        let err = parse(&["--config", path.to_str().unwrap()]).unwrap_err();
        assert!(
            err.to_string().contains("did you mean 'noise_multiplier'"),
            "{err}"
        );
        std::fs::remove_file(path).unwrap();
    }
}
