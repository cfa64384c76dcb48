//! `fedveil-sim`: run a federated simulation over loopback QUIC.
//!
//! With no arguments it runs a small default simulation: MNIST if its files
//! are found (or can be downloaded), otherwise the synthetic dataset, saying
//! so plainly.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use fedveil_proto::dp::rdp;
use fedveil_proto::metrics::RoundMetrics;
use fedveil_server::setup::MetricsFiles;
use fedveil_settings::Layered;
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
    /// TOML file with any of the settings below (flags override it); the
    /// format of simulations/recipes/.
    #[arg(long)]
    config: Option<PathBuf>,
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
    /// Prints the per-feature means and standard deviations of a CSV table
    /// as settings (feature_mean, feature_std) for the file every party
    /// reads, so all standardise alike.
    FeatureStats(FeatureStatsArgs),
}

#[derive(clap::Args, Debug)]
struct FeatureStatsArgs {
    /// The CSV file (header row, numeric features).
    path: PathBuf,
    /// The label column (left out of the statistics).
    #[arg(long)]
    label: String,
    /// Class names in id order, when labels are names.
    #[arg(long, value_delimiter = ',')]
    classes: Option<Vec<String>>,
    /// classification or regression (the label column is then a number).
    #[arg(long, default_value = "classification")]
    task: fedveil_ml::data::Task,
}

impl FeatureStatsArgs {
    fn run(&self) -> Result<()> {
        let spec = fedveil_ml::data::CsvSpec {
            label: self.label.clone(),
            classes: self.classes.clone(),
            task: self.task,
        };
        let table = fedveil_ml::data::load_csv(&self.path, &spec)?;
        let stats = fedveil_ml::data::FeatureStats::of(&table);
        println!(
            "# standardisation of {} ({} rows)",
            self.path.display(),
            table.len()
        );
        // Each value as the shortest text that reads back as the same f32.
        let list = |values: &[f32]| -> String {
            let shown: Vec<String> = values.iter().map(f32::to_string).collect();
            format!("[{}]", shown.join(", "))
        };
        println!("feature_mean = {}", list(&stats.mean));
        println!("feature_std = {}", list(&stats.std));
        Ok(())
    }
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
    #[arg(long, default_value_t = fedveil_proto::dp::DEFAULT_DELTA)]
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

/// The command line: [`Cli`]'s own flags and the simulation's settings
/// (defined once, in `fedveil_settings`).
fn command() -> clap::Command {
    SimConfig::add_flags(Cli::command())
}

/// Parses the command line into [`Cli`] and the matches the settings are
/// read from.
fn parse_from<I, T>(args: I) -> Result<(Cli, ArgMatches), clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let matches = command().try_get_matches_from(args)?;
    Ok((Cli::from_arg_matches(&matches)?, matches))
}

impl Cli {
    /// Defaults, then the config file, then flags. Also says whether the
    /// user chose the dataset (an explicit choice never falls back).
    fn resolve(&self, matches: &ArgMatches) -> Result<(SimConfig, bool)> {
        let (mut c, file_names_dataset) = match &self.config {
            Some(path) => SimConfig::from_toml_file(path)?,
            None => (SimConfig::default(), false),
        };
        c.update_from_flags(matches)?;
        Ok((c, file_names_dataset || matches.contains_id("dataset")))
    }
}

/// Burn's CPU backend frees and reallocates large buffers at every training
/// step; the system allocator hands them back to the kernel and faults them
/// in again, mimalloc reuses them (a CNN step: 51 -> 33 ms, docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    let (cli, matches) = parse_from(std::env::args_os()).unwrap_or_else(|e| e.exit());
    match &cli.command {
        Some(Command::Privacy(args)) => return args.run(),
        Some(Command::Compare(args)) => return args.run(),
        Some(Command::FeatureStats(args)) => return args.run(),
        None => {}
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log).context("--log")?)
        .with_writer(std::io::stderr)
        .init();
    let (mut cfg, explicit_dataset) = cli.resolve(&matches)?;
    let loaded = fedveil_sim::load_data(&cfg, explicit_dataset)?;
    if let Some(note) = &loaded.fallback_note {
        eprintln!("note: {note}");
    }
    cfg.run.data.dataset = loaded.dataset.clone();
    let out = cfg.run.out.clone().unwrap_or_else(|| {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        PathBuf::from("results").join(format!("sim-{secs}"))
    });
    cfg.run.out = Some(out.clone());
    let name = cfg.sim.name.clone().unwrap_or_else(|| {
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
    cfg.sim.name = Some(name.clone());
    let files =
        MetricsFiles::create(&out).with_context(|| format!("cannot create {}", out.display()))?;
    std::fs::write(out.join("config.toml"), toml::to_string(&cfg)?)?;
    eprintln!(
        "fedveil-sim: {} enrolled clients (mutual TLS) on {} ({} train / {} test, {} split), {} rounds, C={}, E={}{}, B={}, {} lr={}, secure aggregation {}, aggregation {} then {}, {} trainings at once{} on {}",
        cfg.sim.clients,
        cfg.run.data.dataset,
        loaded.split.train.len(),
        loaded.split.test.len(),
        cfg.sim.partition,
        cfg.run.rounds,
        cfg.run.fraction,
        cfg.run.local_epochs,
        cfg.run
            .max_local_steps
            .map(|s| format!(" (at most {s} steps)"))
            .unwrap_or_default(),
        cfg.run.batch_size,
        cfg.run.local_optimizer,
        cfg.run.lr,
        if cfg.run.secagg { "on" } else { "off" },
        cfg.run.aggregation,
        cfg.run.server_optimizer,
        cfg.concurrency(),
        cfg.run
            .data
            .device()
            .ok()
            .and_then(|d| cfg.threads_per_training(d))
            .map(|t| format!(" of {t} thread{}", if t == 1 { "" } else { "s" }))
            .unwrap_or_default(),
        cfg.run.data.device
    );
    if let Some(dp) = cfg.run.dp_config()? {
        eprintln!(
            "differential privacy: {:?}, clip norm {}, {}, delta {:e}, budget {}",
            dp.mechanism,
            dp.clip_norm,
            match dp.noise {
                fedveil_proto::dp::NoiseLevel::NoiseMultiplier(z) =>
                    format!("noise multiplier {z}"),
                fedveil_proto::dp::NoiseLevel::TargetEpsilon(e) => format!("target epsilon {e}"),
            },
            dp.delta,
            dp.budget.map_or("= target".to_owned(), |b| b.to_string())
        );
    }
    let mut observer = ProgressObserver::new(cfg.run.rounds, files, cli.quiet);
    let runtime = tokio::runtime::Runtime::new()?;
    let report = runtime.block_on(fedveil_sim::run(&cfg, &loaded.split, &mut observer))?;
    observer.finish();

    let m = &report.server.metrics;
    let failed_clients: Vec<&fedveil_sim::SimClientError> = report
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
        cfg.run.rounds,
        report.server.rounds_failed,
        if report.server.rounds_completed < cfg.run.rounds {
            ", run aborted"
        } else {
            ""
        }
    );
    // The headline figure: accuracy (higher is better), or a regression's
    // MSE (lower is better).
    let headline = |r: &RoundMetrics| match (r.accuracy, r.mse) {
        (Some(a), _) => Some(("accuracy", a, f64::from(a))),
        (None, Some(e)) => Some(("mse", e, -f64::from(e))),
        (None, None) => None,
    };
    let best = m
        .iter()
        .filter_map(|r| headline(r).map(|h| (h, r.round)))
        .max_by(|a, b| a.0.2.total_cmp(&b.0.2));
    if let (Some(last), Some(((name, value, _), round))) = (m.last(), best) {
        let detail = match last.mae {
            Some(mae) => format!("mae {mae:.4}, loss {:.4}", last.loss),
            None => format!("loss {:.4}", last.loss),
        };
        let last_value = headline(last).map_or(f32::NAN, |h| h.1);
        println!("  final {name:<13}{last_value:.4} ({detail})");
        println!("  best {name:<14}{value:.4} (round {round})");
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
            cfg.run.delta
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
        report.model_instances, cfg.sim.clients
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

    fn resolve(args: &[&str]) -> (SimConfig, bool) {
        let (cli, matches) =
            parse_from(std::iter::once("fedveil-sim").chain(args.iter().copied())).unwrap();
        cli.resolve(&matches).unwrap()
    }

    #[test]
    fn flags_override_defaults_and_config_file() {
        let dir = std::env::temp_dir().join(format!("fedveil-sim-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("run.toml");
        std::fs::write(
            &file,
            "clients = 7\nrounds = 9\nsecagg = true\nbatch_size = 3\n",
        )
        .unwrap();
        let (c, explicit) = resolve(&[
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
        assert_eq!((c.sim.clients, c.run.rounds, c.run.batch_size), (7, 2, 3));
        assert!(!c.run.secagg);
        assert_eq!(c.run.secagg_degree, Some(4));
        assert!(explicit);
        let (d, explicit) = resolve(&[]);
        assert_eq!(d, SimConfig::default());
        assert!(!explicit);
        assert_eq!(d.run.dp_config().unwrap(), None);
        let (bare, _) = resolve(&["--secagg", "--rounds", "1"]);
        assert!(bare.run.secagg);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dp_flags_turn_dp_on_with_the_right_default_mechanism() {
        use fedveil_proto::dp::{Mechanism, NoiseLevel};
        let (c, _) = resolve(&["--target-epsilon", "3"]);
        let dp = c.run.dp_config().unwrap().unwrap();
        assert_eq!(dp.mechanism, Mechanism::Distributed);
        assert_eq!(dp.noise, NoiseLevel::TargetEpsilon(3.0));
        let (c, _) = resolve(&["--secagg", "false", "--noise-multiplier", "1.1"]);
        assert_eq!(
            c.run.dp_config().unwrap().unwrap().mechanism,
            Mechanism::Central
        );
        let (c, _) = resolve(&["--dp", "local"]);
        assert!(c.run.dp_config().is_err());
        assert!(parse_from(["fedveil-sim", "--dp", "laplace", "--noise-multiplier", "1"]).is_err());
    }

    #[test]
    fn privacy_subcommand_parses() {
        let (cli, _) = parse_from([
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
        ])
        .unwrap();
        let Some(Command::Privacy(p)) = cli.command else {
            panic!("no subcommand")
        };
        assert_eq!(
            (p.sampling_rate, p.noise_multiplier, p.rounds),
            (0.01, Some(1.1), 1000)
        );
        assert!(
            parse_from([
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
        let (cli, _) = parse_from(["fedveil-sim", "compare", "a", "b", "c", "--out", "x"]).unwrap();
        let Some(Command::Compare(c)) = cli.command else {
            panic!("no subcommand")
        };
        assert_eq!(c.runs.len(), 3);
        assert_eq!(c.out, Some(PathBuf::from("x")));
        assert!(parse_from(["fedveil-sim", "compare", "a"]).is_err());
    }

    #[test]
    fn fault_flags_reach_the_config() {
        let (cfg, _) = resolve(&["--dropout", "0.25", "--straggler-delay", "exp:2s"]);
        let plan = cfg.fault_plan().unwrap();
        assert_eq!(plan.dropout, 0.25);
        assert_eq!(plan.straggler_delay, Some("exp:2s".parse().unwrap()));
        let (bad, _) = resolve(&["--straggler-delay", "exp:2"]);
        let err = bad.fault_plan().unwrap_err().to_string();
        assert!(err.contains("straggler_delay"), "{err}");
    }
}
