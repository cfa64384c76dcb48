//! `fedveil-sim`: run a federated simulation over loopback QUIC.
//!
//! With no arguments it runs a small default simulation: MNIST if its files
//! are found (or can be downloaded), otherwise the synthetic dataset, saying
//! so plainly.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use fedveil_common::dp::rdp;
use fedveil_server::setup::MetricsFiles;
use fedveil_sim::progress::{ProgressObserver, human_bytes};
use fedveil_sim::{SimConfig, plots};

#[derive(Parser, Debug)]
#[command(
    name = "fedveil-sim",
    version,
    about = "Run a federated learning simulation over loopback QUIC",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML file with any of the settings below (flags override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// mnist, fashion-mnist, femnist, synthetic, leaf-shakespeare, shakespeare-roles, tiny-shakespeare, sst2 or ag-news [default: mnist, falling back to synthetic if unavailable].
    #[arg(long)]
    dataset: Option<String>,
    /// Data directory [default: $FEDVEIL_DATA, then the user cache].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// iid, dirichlet:ALPHA or shards:K [default: iid].
    #[arg(long)]
    partition: Option<String>,
    /// Model name [default: cnn].
    #[arg(long)]
    model: Option<String>,
    /// cpu, cuda or cuda:N [default: cpu].
    #[arg(long)]
    device: Option<String>,
    /// Number of simulated clients [default: 10].
    #[arg(long)]
    clients: Option<usize>,
    /// Fraction C of clients sampled per round [default: 0.5].
    #[arg(long)]
    fraction: Option<f64>,
    /// Rounds [default: 5].
    #[arg(long)]
    rounds: Option<u64>,
    /// Local epochs E [default: 1].
    #[arg(long)]
    local_epochs: Option<u32>,
    /// Caps each client's local training at this many minibatch steps
    /// per round [default: no cap].
    #[arg(long)]
    max_local_steps: Option<u32>,
    /// Local batch size B [default: 20].
    #[arg(long)]
    batch_size: Option<u32>,
    /// Client learning rate [default: 0.05].
    #[arg(long)]
    lr: Option<f32>,
    /// Client optimizer: sgd, or adam (fresh moments each round; use a
    /// learning rate near 1e-3) [default: sgd].
    #[arg(long)]
    local_optimizer: Option<fedveil_common::wire::LocalOptimizer>,
    /// Seed for data split, initial model, sampling and shuffling [default: 0].
    #[arg(long)]
    seed: Option<u64>,
    /// Use only the first N training examples; 0 = all [default: 10000].
    #[arg(long)]
    train_limit: Option<usize>,
    /// Probability that a sampled client vanishes in a round, at a uniformly
    /// drawn stage of the protocol; it rejoins a second later [default: 0].
    #[arg(long)]
    dropout: Option<f64>,
    /// Delay before each client's update leaves: exp:MEAN, fixed:D or
    /// uniform:LO..HI, e.g. exp:2s [default: none].
    #[arg(long)]
    straggler_delay: Option<String>,
    /// Seconds before a round completes without stragglers [default: 600].
    #[arg(long)]
    round_timeout: Option<f64>,
    /// Local trainings at once [default: number of cores].
    #[arg(long)]
    max_concurrent_training: Option<usize>,
    /// Results directory [default: results/sim-UNIXTIME].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Secure aggregation (SecAgg+) on or off [default: true].
    #[arg(long)]
    secagg: Option<bool>,
    /// SecAgg+ neighbours per client [default: ~3 log2(cohort)].
    #[arg(long)]
    secagg_degree: Option<u32>,
    /// SecAgg+ Shamir threshold, > degree/2 [default: tolerates 10% dropout].
    #[arg(long)]
    secagg_threshold: Option<u32>,
    /// SecAgg+ modulus bits, 16..=32 [default: 32].
    #[arg(long)]
    secagg_bits: Option<u32>,
    /// Clip range of weighted update values before encoding [default: 1.0].
    #[arg(long)]
    secagg_clip: Option<f32>,
    /// Differential privacy: distributed, central or local [default with DP
    /// on: distributed under secure aggregation, else central].
    #[arg(long)]
    dp: Option<String>,
    /// DP noise multiplier z (noise std / clip norm); turns DP on.
    #[arg(long)]
    noise_multiplier: Option<f64>,
    /// DP: epsilon to reach after --rounds rounds (local DP: per round); turns DP on.
    #[arg(long)]
    target_epsilon: Option<f64>,
    /// DP delta [default: 1e-5].
    #[arg(long)]
    delta: Option<f64>,
    /// DP: L2 norm every update is clipped to [default: 1.0].
    #[arg(long)]
    clip_norm: Option<f64>,
    /// DP: largest epsilon the run may spend [default: the target epsilon].
    #[arg(long)]
    dp_budget: Option<f64>,
    /// Distributed DP: fewest contributors per round [default: 70% of the expected cohort].
    #[arg(long)]
    dp_min_contributors: Option<usize>,
    /// DP: adapt the clip bound to a quantile of the update norms (Andrew
    /// et al. 2021); --clip-norm is then the initial bound.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    adaptive_clip: Option<bool>,
    /// Adaptive clipping: the norm quantile the bound tracks [default: 0.5].
    #[arg(long)]
    clip_quantile: Option<f64>,
    /// Adaptive clipping: step size of the geometric update [default: 0.2].
    #[arg(long)]
    clip_lr: Option<f64>,
    /// Adaptive clipping: std of the noise on the clipped count [default:
    /// expected cohort / 20].
    #[arg(long)]
    clip_count_noise: Option<f64>,
    /// Server optimizer: fedavg, fedavgm, fedadagrad, fedyogi or fedadam [default: fedavg].
    #[arg(long)]
    server_optimizer: Option<String>,
    /// Server learning rate [default: 1 for fedavg/fedavgm, 0.01 for the adaptive ones].
    #[arg(long)]
    server_lr: Option<f64>,
    /// FedAvgM momentum [default: 0.9].
    #[arg(long)]
    server_momentum: Option<f64>,
    /// FedAdam/FedYogi/FedAdagrad beta1 [default: 0.9].
    #[arg(long)]
    beta1: Option<f64>,
    /// FedAdam/FedYogi beta2 [default: 0.99].
    #[arg(long)]
    beta2: Option<f64>,
    /// Adaptivity tau [default: 1e-3].
    #[arg(long)]
    tau: Option<f64>,
    /// FedProx proximal weight mu [default: 0, off].
    #[arg(long)]
    prox_mu: Option<f32>,
    /// No progress bars (for CI and logs).
    #[arg(long, short)]
    quiet: bool,
    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, default_value = "warn", env = "FEDVEIL_LOG")]
    log: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Privacy planning with the RDP accountant (Poisson-subsampled
    /// Gaussian): prints epsilon, or with --target-epsilon the noise
    /// multiplier, as a bare number on the last line.
    Privacy(PrivacyArgs),
    /// Draws two or more finished runs on the same axes (accuracy, loss,
    /// epsilon, traffic, round time), as PNG and SVG.
    Compare(CompareArgs),
}

#[derive(clap::Args, Debug)]
struct CompareArgs {
    /// Results directories (each with its metrics.jsonl).
    #[arg(required = true, num_args = 2..)]
    runs: Vec<PathBuf>,
    /// Where the charts go [default: results/compare-A-vs-B].
    #[arg(long)]
    out: Option<PathBuf>,
}

impl CompareArgs {
    fn run(&self) -> Result<()> {
        let runs = self
            .runs
            .iter()
            .map(|dir| plots::Run::load(dir))
            .collect::<Result<Vec<_>>>()?;
        let out = self.out.clone().unwrap_or_else(|| {
            let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
            PathBuf::from("results").join(format!("compare-{}", names.join("-vs-")))
        });
        for file in plots::plot_runs(&out, &runs)? {
            println!("{}", file.display());
        }
        Ok(())
    }
}

#[derive(clap::Args, Debug)]
struct PrivacyArgs {
    /// Probability q that a client takes part in a round.
    #[arg(long)]
    sampling_rate: f64,
    /// Noise std over clip norm.
    #[arg(
        long,
        required_unless_present = "target_epsilon",
        conflicts_with = "target_epsilon"
    )]
    noise_multiplier: Option<f64>,
    /// Epsilon to reach; prints the noise multiplier that does.
    #[arg(long)]
    target_epsilon: Option<f64>,
    /// Rounds T.
    #[arg(long)]
    rounds: u64,
    #[arg(long, default_value_t = fedveil_common::dp::DEFAULT_DELTA)]
    delta: f64,
}

impl PrivacyArgs {
    fn run(&self) -> Result<()> {
        let (q, t, delta) = (self.sampling_rate, self.rounds, self.delta);
        match (self.noise_multiplier, self.target_epsilon) {
            (Some(z), _) => {
                let eps = rdp::gaussian_epsilon(q, z, t, delta)?;
                println!("epsilon after {t} rounds at q = {q}, z = {z}, delta = {delta:e}:");
                println!("{eps}");
            }
            (None, Some(target)) => {
                let z = rdp::gaussian_noise_multiplier(q, target, t, delta)?;
                println!(
                    "noise multiplier for epsilon {target} after {t} rounds at q = {q}, delta = {delta:e}:"
                );
                println!("{z}");
            }
            (None, None) => unreachable!("clap requires one"),
        }
        Ok(())
    }
}

impl Cli {
    /// Defaults, then the config file, then flags.
    fn resolve(&self) -> Result<(SimConfig, bool)> {
        let (mut c, file_names_dataset) = match &self.config {
            Some(path) => SimConfig::from_toml_file(path)?,
            None => (SimConfig::default(), false),
        };
        let explicit_dataset = self.dataset.is_some() || file_names_dataset;
        macro_rules! take {
            ($($field:ident),*) => { $( if let Some(v) = &self.$field { c.$field = v.clone(); } )* };
        }
        take!(
            dataset,
            partition,
            model,
            device,
            clients,
            fraction,
            rounds,
            local_epochs,
            batch_size,
            lr,
            local_optimizer,
            seed,
            train_limit,
            round_timeout,
            dropout,
            secagg,
            secagg_bits,
            secagg_clip,
            delta,
            clip_norm,
            adaptive_clip,
            clip_quantile,
            clip_lr,
            server_optimizer,
            server_momentum,
            beta1,
            beta2,
            tau,
            prox_mu
        );
        macro_rules! take_opt {
            ($($field:ident),*) => { $( if self.$field.is_some() { c.$field = self.$field.clone(); } )* };
        }
        take_opt!(
            dp,
            noise_multiplier,
            target_epsilon,
            dp_budget,
            dp_min_contributors,
            clip_count_noise,
            max_local_steps,
            straggler_delay,
            server_lr
        );
        if self.secagg_degree.is_some() {
            c.secagg_degree = self.secagg_degree;
        }
        if self.secagg_threshold.is_some() {
            c.secagg_threshold = self.secagg_threshold;
        }
        if self.data_dir.is_some() {
            c.data_dir = self.data_dir.clone();
        }
        if self.max_concurrent_training.is_some() {
            c.max_concurrent_training = self.max_concurrent_training;
        }
        if self.out.is_some() {
            c.out = self.out.clone();
        }
        Ok((c, explicit_dataset))
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::Privacy(args)) => return args.run(),
        Some(Command::Compare(args)) => return args.run(),
        None => {}
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log).context("--log")?)
        .with_writer(std::io::stderr)
        .init();
    let (mut cfg, explicit_dataset) = cli.resolve()?;
    let loaded = fedveil_sim::load_data(&cfg, explicit_dataset)?;
    if let Some(note) = &loaded.fallback_note {
        eprintln!("note: {note}");
    }
    cfg.dataset = loaded.dataset.clone();
    let out = cfg.out.clone().unwrap_or_else(|| {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        PathBuf::from("results").join(format!("sim-{secs}"))
    });
    cfg.out = Some(out.clone());
    let name = cfg.name.clone().unwrap_or_else(|| {
        let from = cli
            .config
            .as_deref()
            .and_then(Path::file_stem)
            .or(out.file_name());
        from.map_or_else(
            || "fedveil-sim".to_owned(),
            |n| n.to_string_lossy().into_owned(),
        )
    });
    cfg.name = Some(name.clone());
    let files =
        MetricsFiles::create(&out).with_context(|| format!("cannot create {}", out.display()))?;
    std::fs::write(out.join("config.toml"), toml::to_string(&cfg)?)?;
    eprintln!(
        "fedveil-sim: {} enrolled clients (mutual TLS) on {} ({} train / {} test, {} split), {} rounds, C={}, E={}{}, B={}, {} lr={}, secure aggregation {}, {} trainings at once",
        cfg.clients,
        cfg.dataset,
        loaded.split.train.len(),
        loaded.split.test.len(),
        cfg.partition,
        cfg.rounds,
        cfg.fraction,
        cfg.local_epochs,
        cfg.max_local_steps
            .map(|s| format!(" (at most {s} steps)"))
            .unwrap_or_default(),
        cfg.batch_size,
        cfg.local_optimizer,
        cfg.lr,
        if cfg.secagg { "on" } else { "off" },
        cfg.concurrency()
    );
    if let Some(dp) = cfg.dp_config()? {
        eprintln!(
            "differential privacy: {:?}, clip norm {}, {}, delta {:e}, budget {}",
            dp.mechanism,
            dp.clip_norm,
            match dp.noise {
                fedveil_common::dp::NoiseLevel::NoiseMultiplier(z) =>
                    format!("noise multiplier {z}"),
                fedveil_common::dp::NoiseLevel::TargetEpsilon(e) => format!("target epsilon {e}"),
            },
            dp.delta,
            dp.budget.map_or("= target".to_owned(), |b| b.to_string())
        );
    }
    let mut observer = ProgressObserver::new(cfg.rounds, files, cli.quiet);
    let runtime = tokio::runtime::Runtime::new()?;
    let report = runtime.block_on(fedveil_sim::run(&cfg, &loaded.split, &mut observer))?;
    observer.finish();

    let m = &report.server.metrics;
    let failed_clients: Vec<&String> = report
        .clients
        .iter()
        .filter_map(|r| r.as_ref().err())
        .collect();
    println!("\nsummary");
    // A failed round (no valid update, or secure aggregation could not
    // recover) is run again, up to the coordinator's failure limit.
    println!(
        "  rounds             {} of {} completed, {} failed and retried{}",
        report.server.rounds_completed,
        cfg.rounds,
        report.server.rounds_failed,
        if report.server.rounds_completed < cfg.rounds {
            ", run aborted"
        } else {
            ""
        }
    );
    if let (Some(last), Some(best)) = (
        m.last(),
        m.iter().max_by(|a, b| a.accuracy.total_cmp(&b.accuracy)),
    ) {
        println!(
            "  final accuracy     {:.4} (loss {:.4})",
            last.accuracy, last.loss
        );
        println!(
            "  best accuracy      {:.4} (round {})",
            best.accuracy, best.round
        );
    }
    let (up, down): (u64, u64) = (
        m.iter().map(|r| r.bytes_up).sum(),
        m.iter().map(|r| r.bytes_down).sum(),
    );
    println!(
        "  traffic            {} up, {} down",
        human_bytes(up),
        human_bytes(down)
    );
    if let Some(eps) = report.server.epsilon {
        println!(
            "  privacy spent      epsilon {eps:.4} at delta {:e} (every started round counts)",
            cfg.delta
        );
    }
    let f = &report.faults;
    if fault_plan_active(&cfg) {
        let stages: Vec<String> = f
            .vanished
            .iter()
            .map(|(stage, n)| format!("{n} {}", stage.as_str()))
            .collect();
        println!(
            "  clients vanished   {} ({}), rejoined {}",
            f.vanished_total(),
            if stages.is_empty() {
                "none".to_owned()
            } else {
                stages.join(", ")
            },
            f.rejoined
        );
        println!(
            "  stragglers         {} updates late, {:.1}s of delay in all",
            f.delayed,
            f.total_delay.as_secs_f64()
        );
    }
    println!(
        "  model instances    {} (shared by {} clients)",
        report.model_instances, cfg.clients
    );
    println!("  wall time          {:.1}s", report.wall.as_secs_f64());
    println!("  clients failed     {}", failed_clients.len());
    for f in failed_clients.iter().take(5) {
        println!("    {f}");
    }
    let model_file = out.join("model.safetensors");
    fedveil_sim::save_model(&cfg, &loaded.split, &report.server.final_model, &model_file)?;
    let run = plots::Run {
        name,
        metrics: report.server.metrics.clone(),
    };
    let charts = plots::plot_runs(&out, &[run])?;
    println!("  results            {}", out.display());
    println!(
        "                     config.toml, metrics.jsonl/.csv (reproducible from the seed), costs.jsonl/.csv (time, traffic), model.safetensors, {} charts (PNG and SVG)",
        charts.len() / 2
    );
    Ok(())
}

fn fault_plan_active(cfg: &SimConfig) -> bool {
    cfg.fault_plan().is_ok_and(|p| p.is_active())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_defaults_and_config_file() {
        let dir = std::env::temp_dir().join(format!("fedveil-sim-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("run.toml");
        std::fs::write(&file, "clients = 7\nrounds = 9\nsecagg = true\n").unwrap();
        let cli = Cli::parse_from([
            "fedveil-sim",
            "--config",
            file.to_str().unwrap(),
            "--rounds",
            "2",
            "--secagg",
            "false",
            "--secagg-degree",
            "4",
            "--dataset",
            "synthetic",
        ]);
        let (c, explicit) = cli.resolve().unwrap();
        assert_eq!((c.clients, c.rounds), (7, 2));
        assert!(!c.secagg);
        assert_eq!(c.secagg_degree, Some(4));
        assert!(explicit);
        let (d, explicit) = Cli::parse_from(["fedveil-sim"]).resolve().unwrap();
        assert_eq!(d, SimConfig::default());
        assert!(!explicit);
        assert_eq!(d.dp_config().unwrap(), None);
    }

    #[test]
    fn dp_flags_turn_dp_on_with_the_right_default_mechanism() {
        use fedveil_common::dp::{Mechanism, NoiseLevel};
        let (c, _) = Cli::parse_from(["fedveil-sim", "--target-epsilon", "3"])
            .resolve()
            .unwrap();
        let dp = c.dp_config().unwrap().unwrap();
        assert_eq!(dp.mechanism, Mechanism::Distributed);
        assert_eq!(dp.noise, NoiseLevel::TargetEpsilon(3.0));
        let (c, _) = Cli::parse_from([
            "fedveil-sim",
            "--secagg",
            "false",
            "--noise-multiplier",
            "1.1",
        ])
        .resolve()
        .unwrap();
        assert_eq!(
            c.dp_config().unwrap().unwrap().mechanism,
            Mechanism::Central
        );
        let (c, _) = Cli::parse_from(["fedveil-sim", "--dp", "local"])
            .resolve()
            .unwrap();
        assert!(c.dp_config().is_err());
        let (c, _) = Cli::parse_from(["fedveil-sim", "--dp", "laplace", "--noise-multiplier", "1"])
            .resolve()
            .unwrap();
        assert!(c.dp_config().is_err());
    }

    #[test]
    fn privacy_subcommand_parses() {
        let cli = Cli::parse_from([
            "fedveil-sim",
            "privacy",
            "--sampling-rate",
            "0.01",
            "--noise-multiplier",
            "1.1",
            "--rounds",
            "1000",
            "--delta",
            "1e-5",
        ]);
        let Some(Command::Privacy(p)) = cli.command else {
            panic!("no subcommand")
        };
        assert_eq!(
            (p.sampling_rate, p.noise_multiplier, p.rounds),
            (0.01, Some(1.1), 1000)
        );
        assert!(
            Cli::try_parse_from([
                "fedveil-sim",
                "privacy",
                "--sampling-rate",
                "0.1",
                "--rounds",
                "3"
            ])
            .is_err()
        );
    }

    #[test]
    fn compare_takes_two_or_more_runs() {
        let cli = Cli::parse_from(["fedveil-sim", "compare", "a", "b", "c", "--out", "x"]);
        let Some(Command::Compare(c)) = cli.command else {
            panic!("no subcommand")
        };
        assert_eq!(c.runs.len(), 3);
        assert_eq!(c.out, Some(PathBuf::from("x")));
        assert!(Cli::try_parse_from(["fedveil-sim", "compare", "a"]).is_err());
    }

    #[test]
    fn fault_flags_reach_the_config() {
        let cli = Cli::parse_from([
            "fedveil-sim",
            "--dropout",
            "0.25",
            "--straggler-delay",
            "exp:2s",
        ]);
        let (cfg, _) = cli.resolve().unwrap();
        let plan = cfg.fault_plan().unwrap();
        assert_eq!(plan.dropout, 0.25);
        assert_eq!(plan.straggler_delay, Some("exp:2s".parse().unwrap()));
        let bad = Cli::parse_from(["fedveil-sim", "--straggler-delay", "exp:2"]);
        let err = bad
            .resolve()
            .unwrap()
            .0
            .fault_plan()
            .unwrap_err()
            .to_string();
        assert!(err.contains("straggler delay"), "{err}");
    }
}
