//! `fedveil-client`: join a fedveil server and train on local data.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use fedveil_client::{ClientOptions, LocalTrainer, Trainer};
use fedveil_ml::data::{Partition, Shard};
use fedveil_net::pki::{self, NodeIdentity};
use fedveil_net::quic;
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
}

/// The command line: the derived commands, with the data settings shared
/// with the server and simulations added to `run`.
fn command() -> clap::Command {
    Cli::command().mut_subcommand("run", DataSettings::add_flags)
}

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
        Command::Renew(args) => runtime.block_on(async {
            let (server, identity) = load_node(&args).await?;
            renew(&server, &args.dir, &identity).await.map(|_| ())
        }),
    }
}

/// Settings saved at enrolment next to the identity.
const NODE_SETTINGS_FILE: &str = "client.toml";

#[derive(serde::Serialize, serde::Deserialize)]
struct NodeSettings {
    /// HOST:PORT of the server this node enrolled with.
    server: String,
}

/// A resolved server address and the name its certificate must carry.
struct Server {
    addr: std::net::SocketAddr,
    name: String,
}

async fn resolve(server: &str) -> Result<Server> {
    let addr = tokio::net::lookup_host(server)
        .await
        .with_context(|| format!("cannot resolve {server}"))?
        .next()
        .with_context(|| format!("{server} has no address"))?;
    let host = server.rsplit_once(':').map_or(server, |(h, _)| h);
    Ok(Server {
        addr,
        name: quic::server_name(host).to_owned(),
    })
}

fn endpoint_for(server: &Server) -> Result<quinn::Endpoint> {
    let local = if server.addr.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    };
    Ok(quinn::Endpoint::client(local.parse()?)?)
}

async fn enroll(args: EnrollArgs) -> Result<()> {
    let pin = pki::parse_fingerprint(&args.ca_fingerprint)?;
    if let Some(name) = &args.name {
        pki::validate_node_name(name)?;
    }
    if args.dir.join(pki::NODE_IDENTITY_FILE).exists() {
        bail!(
            "{} already holds a node identity; use another directory, or `fedveil-client renew` to refresh it",
            args.dir.display()
        );
    }
    let server = resolve(&args.server).await?;
    let endpoint = endpoint_for(&server)?;
    let identity = fedveil_client::enrol::enrol(
        &endpoint,
        server.addr,
        &server.name,
        pin,
        &args.token,
        args.name.as_deref(),
    )
    .await
    .context("enrolment failed")?;
    identity.save(&args.dir)?;
    let settings = toml::to_string(&NodeSettings {
        server: args.server.clone(),
    })?;
    std::fs::write(args.dir.join(NODE_SETTINGS_FILE), settings)?;
    endpoint.wait_idle().await;
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

/// The node's identity and its server (from --server or client.toml).
async fn load_node(args: &NodeArgs) -> Result<(Server, NodeIdentity)> {
    let identity = NodeIdentity::load(&args.dir).with_context(|| {
        format!(
            "no node identity in {}: enrol first (`fedveil-client enroll`)",
            args.dir.display()
        )
    })?;
    let server = match &args.server {
        Some(s) => s.clone(),
        None => {
            let path = args.dir.join(NODE_SETTINGS_FILE);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("{}: pass --server HOST:PORT", path.display()))?;
            toml::from_str::<NodeSettings>(&text)
                .with_context(|| format!("{}", path.display()))?
                .server
        }
    };
    Ok((resolve(&server).await?, identity))
}

/// Renews `current` and saves the new identity over it.
async fn renew(
    server: &Server,
    dir: &std::path::Path,
    current: &NodeIdentity,
) -> Result<NodeIdentity> {
    let endpoint = endpoint_for(server)?;
    let renewed = fedveil_client::enrol::renew(&endpoint, server.addr, &server.name, current)
        .await
        .context("certificate renewal failed")?;
    renewed.save(dir)?;
    endpoint.wait_idle().await;
    println!(
        "renewed the certificate of '{}': {} valid until {}",
        renewed.name(),
        renewed.info().serial,
        pki::format_time(renewed.info().not_after)
    );
    Ok(renewed)
}

async fn run(args: RunArgs, data_settings: DataSettings) -> Result<()> {
    let (server, mut identity) = load_node(&args.node).await?;
    let now = pki::unix_now();
    if identity.remaining(now) <= 0 {
        bail!(
            "this node's certificate expired at {}; it cannot be renewed any more: ask the operator for a new token (`fedveil-server enroll --name {}`), then enrol again into a new directory",
            pki::format_time(identity.info().not_after),
            identity.name()
        );
    }
    if identity.renewal_due(now, args.renew_before) {
        identity = renew(&server, &args.node.dir, &identity).await?;
    }
    let name = identity.name().to_owned();
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
    let endpoint = endpoint_for(&server)?;
    let mut opts = ClientOptions::enrolled(server.addr, &server.name, &identity)?;
    opts.retry.attempts = args.connect_attempts;
    tracing::info!(server = %server.addr, node = %name, examples = trainer.num_examples(), "connecting");
    // A run can outlast the certificate's renewal point: renew in the
    // background (the live connection stays authenticated; the next one
    // uses the new certificate).
    let renewer = tokio::spawn(renew_when_due(
        server.addr,
        server.name.clone(),
        args.node.dir.clone(),
        identity,
        args.renew_before,
    ));
    let result = fedveil_client::run(&endpoint, &opts, trainer).await;
    renewer.abort();
    match result {
        Ok(report) => {
            println!(
                "{name}: trained {} rounds; server completed {}",
                report.rounds_trained, report.server_rounds_completed
            );
            endpoint.wait_idle().await;
            Ok(())
        }
        Err(err) => bail!("{name}: {err}"),
    }
}

/// Sleeps until renewal is due, renews, and repeats.
async fn renew_when_due(
    addr: std::net::SocketAddr,
    name: String,
    dir: PathBuf,
    mut identity: NodeIdentity,
    renew_before: Option<Duration>,
) {
    let server = Server { addr, name };
    loop {
        let lifetime = identity.info().not_after - identity.info().not_before;
        let lead = renew_before.map_or(lifetime / 3, |d| d.as_secs() as i64);
        let wait = (identity.remaining(pki::unix_now()) - lead).max(60);
        tokio::time::sleep(Duration::from_secs(wait as u64)).await;
        match renew(&server, &dir, &identity).await {
            Ok(renewed) => identity = renewed,
            Err(err) => tracing::warn!(%err, "certificate renewal failed; will retry"),
        }
    }
}

fn hash_name(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
