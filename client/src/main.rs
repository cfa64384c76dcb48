//! `fedveil-client`: join a fedveil server and train on local data.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use fedveil_client::{ClientOptions, LocalTrainer, Trainer};
use fedveil_common::data::{self, DatasetName, Download, Partition, Shard};
use fedveil_common::model::DeviceSpec;
use fedveil_common::net;

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
    /// Connect to a server and take part in training until the run ends.
    Run(RunArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Server address, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:4433")]
    server: String,
    /// The server's CA certificate (ca.pem from `fedveil-server init`).
    #[arg(long)]
    ca_cert: PathBuf,
    /// This node's name, as the server logs it.
    #[arg(long)]
    name: String,
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

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log).context("--log")?)
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Run(args) => tokio::runtime::Runtime::new()?.block_on(run(args)),
    }
}

async fn run(args: RunArgs) -> Result<()> {
    let ca = std::fs::read_to_string(&args.ca_cert).with_context(|| {
        format!(
            "cannot read the server's CA certificate {}",
            args.ca_cert.display()
        )
    })?;
    let server = tokio::net::lookup_host(&args.server)
        .await
        .with_context(|| format!("cannot resolve {}", args.server))?
        .next()
        .with_context(|| format!("{} has no address", args.server))?;
    let host = args
        .server
        .rsplit_once(':')
        .map_or(args.server.as_str(), |(h, _)| h);
    let device = args.device.device()?;
    let split = data::load(
        DatasetName::parse(&args.dataset)?,
        &data::resolve_data_dir(args.data_dir.as_deref()),
        Download::IfMissing,
        args.seed,
    )?;
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
        &args.model,
        shard,
        device,
        fedveil_client::trainer::mix_seed(&[args.seed, hash_name(&args.name)]),
    )?);
    let mut endpoint = quinn::Endpoint::client(
        (if server.is_ipv6() {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        })
        .parse()?,
    )?;
    endpoint.set_default_client_config(net::client_config(&ca)?);
    let mut opts = ClientOptions::new(server, net::server_name(host), args.name.clone());
    opts.retry.attempts = args.connect_attempts;
    tracing::info!(server = %server, examples = trainer.num_examples(), "connecting");
    match fedveil_client::run(&endpoint, &opts, trainer).await {
        Ok(report) => {
            println!(
                "{}: trained {} rounds; server completed {}",
                args.name, report.rounds_trained, report.server_rounds_completed
            );
            endpoint.wait_idle().await;
            Ok(())
        }
        Err(err) => bail!("{}: {err}", args.name),
    }
}

fn hash_name(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
