//! `fedveil-client`: join a fedveil server and train on local data.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use fedveil_client::{Node, Trainer};
use fedveil_ml::data::{Partition, Shard};
use fedveil_net::pki::{self, Invitation};
use fedveil_proto::round::policy::NodePolicy;
use fedveil_settings::{DataSettings, Layered, SettingsFile};

#[derive(Parser)]
#[command(name = "fedveil-client", version, about = "fedveil client node")]
struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, global = true, default_value = "info", env = "FEDVEIL_LOG")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enrol this node with a server: make a key here, get it certified.
    Enroll(EnrollArgs),
    /// Connect to a server and take part in training until the run ends
    /// (renews the certificate first when it is due).
    Run(RunArgs),
    /// Replace this node's key and certificate now.
    Renew(NodeArgs),
    /// Show what this node has spent (its own privacy ledger) and the
    /// policy it holds rounds to.
    Ledger(LedgerArgs),
}

#[derive(Args)]
struct LedgerArgs {
    /// The node directory.
    #[arg(long)]
    dir: PathBuf,
    #[command(flatten)]
    policy: PolicyArgs,
}

/// The node's privacy policy: each flag overrides the same key of the
/// `[privacy]` table in the node's client.toml.
#[derive(Args)]
struct PolicyArgs {
    /// Send updates only through secure aggregation.
    #[arg(long)]
    require_secure_aggregation: bool,
    /// Send updates only under this DP mechanism: local or distributed
    /// (noise the node adds itself).
    #[arg(long, value_name = "MECHANISM")]
    require_dp: Option<fedveil_proto::dp::Mechanism>,
    /// The least noise multiplier a round may give this node, as its own
    /// ledger counts it.
    #[arg(long, value_name = "Z")]
    min_noise_multiplier: Option<f64>,
    /// The most epsilon this node spends, over all runs and servers.
    #[arg(long, value_name = "EPSILON")]
    max_epsilon: Option<f64>,
    /// The delta the node's ledger reports epsilon at [default: 1e-5].
    #[arg(long, value_name = "DELTA")]
    privacy_delta: Option<f64>,
    /// The fewest clients whose inputs may be unmasked together with this
    /// node's.
    #[arg(long, value_name = "N")]
    min_cohort: Option<u32>,
    /// The least secure-aggregation threshold accepted.
    #[arg(long, value_name = "T")]
    min_threshold: Option<u32>,
}

impl PolicyArgs {
    /// `policy` with these flags applied over it.
    fn over(&self, mut policy: NodePolicy) -> NodePolicy {
        policy.require_secure_aggregation |= self.require_secure_aggregation;
        let or = |flag: Option<f64>, file: Option<f64>| flag.or(file);
        policy.require_dp = self.require_dp.or(policy.require_dp);
        policy.min_noise_multiplier = or(self.min_noise_multiplier, policy.min_noise_multiplier);
        policy.max_epsilon = or(self.max_epsilon, policy.max_epsilon);
        policy.delta = self.privacy_delta.unwrap_or(policy.delta);
        policy.min_cohort = self.min_cohort.or(policy.min_cohort);
        policy.min_threshold = self.min_threshold.or(policy.min_threshold);
        policy
    }
}

#[derive(Args)]
struct EnrollArgs {
    /// Server address, HOST:PORT (HOST must be a name in its certificate).
    #[arg(long)]
    server: String,
    /// SHA-256 fingerprint of the server's CA (`fedveil-server fingerprint`).
    #[arg(long)]
    ca_fingerprint: String,
    /// The one-time token from `fedveil-server enroll`.
    #[arg(long, env = "FEDVEIL_TOKEN")]
    token: String,
    /// Directory for this node's key, certificate and settings.
    #[arg(long)]
    dir: PathBuf,
    /// Node name [default: the name the token was issued for].
    #[arg(long)]
    name: Option<String>,
}

/// An enrolled node's directory and, optionally, where its server is.
#[derive(Args)]
struct NodeArgs {
    /// The node directory (from `fedveil-client enroll`).
    #[arg(long)]
    dir: PathBuf,
    /// Server address, HOST:PORT [default: the one enrolled with].
    #[arg(long)]
    server: Option<String>,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Renew when less than this is left, e.g. 7d [default: a third of the
    /// certificate's lifetime].
    #[arg(long, value_parser = pki::parse_duration)]
    renew_before: Option<Duration>,
    /// TOML file with the data settings (dataset, label, classes,
    /// feature_mean, ...): the run's recipe, whose other keys the node
    /// ignores; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Use part INDEX of the training set split into COUNT parts
    /// (for demos on one machine; a real node trains on all its data).
    #[arg(long, value_name = "INDEX/COUNT")]
    shard: Option<String>,
    /// How the training set is split when --shard is given.
    #[arg(long, default_value = "iid")]
    partition: Partition,
    /// Seed for the split (must match across the nodes of a demo).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Connection attempts before giving up (waits grow exponentially, up
    /// to 30 s, with jitter).
    #[arg(long, default_value_t = fedveil_client::driver::DEFAULT_CONNECT_ATTEMPTS)]
    connect_attempts: u32,
    #[command(flatten)]
    policy: PolicyArgs,
}

/// The command line: the derived commands, with the data settings shared
/// with the server and simulations added to `run`.
fn command() -> clap::Command {
    Cli::command().mut_subcommand("run", DataSettings::add_flags)
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
    let runtime = tokio::runtime::Runtime::new()?;
    match cli.command {
        Command::Enroll(args) => runtime.block_on(enroll(args)),
        Command::Run(args) => {
            let mut data_settings = match &args.config {
                None => DataSettings::default(),
                Some(path) => SettingsFile::read_recipe(path)?.get()?,
            };
            data_settings.update_from_flags(matches.subcommand_matches("run").expect("run"))?;
            runtime.block_on(run(args, data_settings))
        }
        Command::Renew(args) => runtime.block_on(renew(args)),
        Command::Ledger(args) => runtime.block_on(ledger(args)),
    }
}

async fn ledger(args: LedgerArgs) -> Result<()> {
    // Any reachable address will do: nothing is sent.
    let node = Node::open_at(&args.dir, Some("127.0.0.1:1")).await?;
    let saved = node.policy().clone();
    let node = node.privacy_policy(args.policy.over(saved))?;
    let ledger = node.ledger();
    println!(
        "{}: epsilon {:.4} at delta {:e} over {} rounds with noise of its own; {} rounds sent without it",
        node.name(),
        ledger.epsilon(),
        ledger.privacy.delta,
        ledger.privacy.rounds_charged(),
        ledger.unprotected_rounds,
    );
    println!("policy: {}", serde_json::to_string(node.policy())?);
    Ok(())
}

async fn enroll(args: EnrollArgs) -> Result<()> {
    let invitation = Invitation {
        server: args.server.clone(),
        ca_fingerprint: args.ca_fingerprint.clone(),
        token: args.token.clone(),
        node: args.name.clone(),
    };
    let node = Node::enrol_into(&args.dir, &invitation).await?;
    node.wait_idle().await;
    let identity = node.identity();
    println!(
        "enrolled as '{}' with {} (certificate {}, valid until {}); identity in {}\n\
         next: `fedveil-client run --dir {}`",
        identity.name(),
        args.server,
        identity.info().serial,
        pki::format_time(identity.info().not_after),
        args.dir.display(),
        args.dir.display(),
    );
    Ok(())
}

async fn renew(args: NodeArgs) -> Result<()> {
    let mut node = Node::open_at(&args.dir, args.server.as_deref()).await?;
    node.renew().await?;
    node.wait_idle().await;
    println!(
        "renewed the certificate of '{}': {} valid until {}",
        node.name(),
        node.identity().info().serial,
        pki::format_time(node.identity().info().not_after)
    );
    Ok(())
}

async fn run(args: RunArgs, data_settings: DataSettings) -> Result<()> {
    let mut node = Node::open_at(&args.node.dir, args.node.server.as_deref())
        .await?
        .connect_attempts(args.connect_attempts);
    let saved = node.policy().clone();
    node = node.privacy_policy(args.policy.over(saved))?;
    tracing::info!(policy = %serde_json::to_string(node.policy())?, epsilon = node.ledger().epsilon(), "privacy policy");
    if let Some(lead) = args.renew_before {
        node = node.renew_before(lead);
    }
    let name = node.name().to_owned();
    let device = data_settings.device()?.device()?;
    let split = data_settings.load(args.seed)?;
    let shard = match &args.shard {
        None => Shard::whole(split.train),
        Some(spec) => {
            let (i, n) = spec
                .split_once('/')
                .and_then(|(i, n)| Some((i.parse::<usize>().ok()?, n.parse::<usize>().ok()?)))
                .filter(|&(i, n)| i < n)
                .with_context(|| {
                    format!("--shard {spec}: expected INDEX/COUNT with INDEX < COUNT")
                })?;
            let parts = args.partition.split_dataset(&split.train, n, args.seed)?;
            Shard {
                data: split.train,
                indices: parts[i].clone(),
            }
        }
    };
    let trainer = Arc::new(Trainer::new(
        &data_settings.model,
        shard,
        device,
        fedveil_ml::train::mix_seed(&[args.seed, hash_name(&name)]),
    )?);
    match node.run(trainer).await {
        Ok(report) => {
            println!(
                "{name}: trained {} rounds; server completed {}",
                report.rounds_trained, report.server_rounds_completed
            );
            node.wait_idle().await;
            Ok(())
        }
        Err(err) => bail!("{name}: {err}"),
    }
}

fn hash_name(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
