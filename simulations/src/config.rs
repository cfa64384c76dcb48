//! A simulation's configuration: defaults, then a TOML file, then flags.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fedveil_common::dp::adaptive::{DEFAULT_CLIP_LEARNING_RATE, DEFAULT_TARGET_QUANTILE};
use fedveil_common::dp::{AdaptiveClipping, DpConfig, Mechanism, NoiseLevel};
use fedveil_common::server_opt;
use fedveil_common::wire::LocalOptimizer;

use crate::faults::{DelayDist, FaultPlan};
use serde::{Deserialize, Serialize};

/// Everything a simulation run needs. TOML keys are the field names;
/// flags use the same names with dashes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// The run's name, in plot titles [default: the config file's name,
    /// else the results directory's].
    pub name: Option<String>,
    /// A dataset name (`fedveil_common::data::DatasetName`): mnist,
    /// fashion-mnist, femnist, synthetic or a text set.
    pub dataset: String,
    /// Data directory (default: $FEDVEIL_DATA, then the user cache).
    pub data_dir: Option<PathBuf>,
    /// iid, dirichlet:ALPHA or shards:K.
    pub partition: String,
    pub model: String,
    /// cpu, cuda or cuda:N.
    pub device: String,
    /// Simulated clients (each a real QUIC connection).
    pub clients: usize,
    /// Fraction C of clients sampled each round.
    pub fraction: f64,
    pub rounds: u64,
    pub local_epochs: u32,
    /// Caps each client's local training at this many minibatch steps.
    pub max_local_steps: Option<u32>,
    pub batch_size: u32,
    /// Client learning rate.
    pub lr: f32,
    /// Client optimizer: sgd, or adam (fresh moments each round).
    pub local_optimizer: LocalOptimizer,
    pub seed: u64,
    /// Use only the first N training examples (quick runs); 0 = all.
    pub train_limit: usize,
    /// Seconds before a round completes without its stragglers.
    pub round_timeout: f64,
    /// Probability that a sampled client vanishes in a round, at a stage of
    /// the protocol drawn uniformly (it rejoins shortly after).
    pub dropout: f64,
    /// Delay before a client's update leaves: `exp:MEAN`, `fixed:D` or
    /// `uniform:LO..HI` (e.g. `exp:2s`).
    pub straggler_delay: Option<String>,
    /// Local trainings running at once (default: number of cores).
    pub max_concurrent_training: Option<usize>,
    /// Results directory (default: results/sim-UNIXTIME).
    pub out: Option<PathBuf>,
    /// Aggregate through SecAgg+ (the server sees only the sum).
    pub secagg: bool,
    /// SecAgg+ neighbours per client (default: derived from the cohort).
    pub secagg_degree: Option<u32>,
    /// SecAgg+ Shamir threshold (default: derived from the expected dropout).
    pub secagg_threshold: Option<u32>,
    /// SecAgg+ modulus bits.
    pub secagg_bits: u32,
    /// Clip range of weighted update values before fixed-point encoding.
    pub secagg_clip: f32,
    /// Differential privacy mechanism: distributed, central or local
    /// [default with DP on: distributed under secure aggregation, else central].
    /// DP is on when a noise multiplier or a target epsilon is given.
    pub dp: Option<String>,
    /// DP noise multiplier z (noise std / clip norm).
    pub noise_multiplier: Option<f64>,
    /// DP: the epsilon to reach after `rounds` rounds (local DP: per round).
    pub target_epsilon: Option<f64>,
    /// DP delta.
    pub delta: f64,
    /// DP: L2 norm every update is clipped to.
    pub clip_norm: f64,
    /// DP: epsilon the run may spend [default: the target epsilon, else the
    /// epsilon the planned rounds spend].
    pub dp_budget: Option<f64>,
    /// Distributed DP: fewest contributors a round accepts [default: 70% of
    /// the expected cohort].
    pub dp_min_contributors: Option<usize>,
    /// DP: adapt the clip bound to a quantile of the update norms (Andrew et
    /// al. 2021); `clip_norm` is then the initial bound.
    pub adaptive_clip: bool,
    /// Adaptive clipping: the norm quantile the bound tracks.
    pub clip_quantile: f64,
    /// Adaptive clipping: step size of the geometric update.
    pub clip_lr: f64,
    /// Adaptive clipping: std of the noise on the clipped count [default:
    /// expected cohort / 20].
    pub clip_count_noise: Option<f64>,
    /// Server optimizer: fedavg, fedavgm, fedadagrad, fedyogi or fedadam.
    pub server_optimizer: String,
    /// Server learning rate [default: 1 for fedavg/fedavgm, 0.01 adaptive].
    pub server_lr: Option<f64>,
    pub server_momentum: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub tau: f64,
    /// FedProx proximal weight mu (0: off).
    pub prox_mu: f32,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            name: None,
            dataset: "mnist".into(),
            data_dir: None,
            partition: "iid".into(),
            model: "cnn".into(),
            device: "cpu".into(),
            clients: 10,
            fraction: 0.5,
            rounds: 5,
            local_epochs: 1,
            max_local_steps: None,
            batch_size: 20,
            lr: 0.05,
            local_optimizer: LocalOptimizer::Sgd,
            seed: 0,
            train_limit: 10_000,
            round_timeout: 600.0,
            dropout: 0.0,
            straggler_delay: None,
            max_concurrent_training: None,
            out: None,
            secagg: true,
            secagg_degree: None,
            secagg_threshold: None,
            secagg_bits: fedveil_common::secagg::DEFAULT_BITS,
            secagg_clip: fedveil_common::secagg::DEFAULT_CLIP,
            dp: None,
            noise_multiplier: None,
            target_epsilon: None,
            delta: fedveil_common::dp::DEFAULT_DELTA,
            clip_norm: fedveil_common::dp::DEFAULT_CLIP_NORM,
            dp_budget: None,
            dp_min_contributors: None,
            adaptive_clip: false,
            clip_quantile: DEFAULT_TARGET_QUANTILE,
            clip_lr: DEFAULT_CLIP_LEARNING_RATE,
            clip_count_noise: None,
            server_optimizer: "fedavg".into(),
            server_lr: None,
            server_momentum: server_opt::DEFAULT_SERVER_MOMENTUM,
            beta1: server_opt::DEFAULT_BETA1,
            beta2: server_opt::DEFAULT_BETA2,
            tau: server_opt::DEFAULT_TAU,
            prox_mu: 0.0,
        }
    }
}

impl SimConfig {
    /// Reads a TOML file; missing keys keep their defaults. Also says
    /// whether the file names a dataset (an explicit choice never falls back).
    pub fn from_toml_file(path: &Path) -> anyhow::Result<(Self, bool)> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
        let config: Self =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        let names_dataset = text
            .parse::<toml::Table>()
            .is_ok_and(|t| t.contains_key("dataset"));
        Ok((config, names_dataset))
    }

    pub fn round_timeout(&self) -> anyhow::Result<Duration> {
        Duration::try_from_secs_f64(self.round_timeout)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "round_timeout {} must be a positive number of seconds",
                    self.round_timeout
                )
            })
    }

    /// The faults to inject.
    pub fn fault_plan(&self) -> anyhow::Result<FaultPlan> {
        let delay = self
            .straggler_delay
            .as_deref()
            .map(str::parse::<DelayDist>)
            .transpose()
            .map_err(|e| anyhow::anyhow!("straggler delay {e}"))?;
        FaultPlan::new(self.dropout, delay, self.seed).map_err(anyhow::Error::msg)
    }

    /// The DP settings, if DP is on.
    pub fn dp_config(&self) -> anyhow::Result<Option<DpConfig>> {
        let noise = match (self.noise_multiplier, self.target_epsilon) {
            (None, None) if self.dp.is_some() => anyhow::bail!(
                "DP mechanism {:?} needs --noise-multiplier or --target-epsilon",
                self.dp.as_deref().unwrap_or_default()
            ),
            (None, None) => return Ok(None),
            (Some(_), Some(_)) => {
                anyhow::bail!("give either --noise-multiplier or --target-epsilon, not both")
            }
            (Some(z), None) => NoiseLevel::NoiseMultiplier(z),
            (None, Some(e)) => NoiseLevel::TargetEpsilon(e),
        };
        let mechanism = match &self.dp {
            Some(name) => name.parse::<Mechanism>().map_err(anyhow::Error::msg)?,
            None if self.secagg => Mechanism::Distributed,
            None => Mechanism::Central,
        };
        Ok(Some(DpConfig {
            mechanism,
            clip_norm: self.clip_norm,
            noise,
            delta: self.delta,
            planned_rounds: self.rounds,
            budget: self.dp_budget,
            min_contributors: self.dp_min_contributors,
            adaptive: self.adaptive_clip.then_some(AdaptiveClipping {
                target_quantile: self.clip_quantile,
                learning_rate: self.clip_lr,
                count_noise_std: self.clip_count_noise,
            }),
        }))
    }

    /// The server optimizer settings, validated.
    pub fn server_optimizer(&self) -> anyhow::Result<server_opt::ServerOptimizerConfig> {
        server_opt::ServerOptimizerConfig::from_settings(
            &self.server_optimizer,
            self.server_lr,
            self.server_momentum,
            self.beta1,
            self.beta2,
            self.tau,
        )
        .map_err(anyhow::Error::msg)
    }

    pub fn concurrency(&self) -> usize {
        self.max_concurrent_training
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_toml_keeps_defaults_and_unknown_keys_fail() {
        let c: SimConfig = toml::from_str("clients = 3\npartition = \"dirichlet:0.5\"").unwrap();
        assert_eq!(c.clients, 3);
        assert_eq!(c.partition, "dirichlet:0.5");
        assert_eq!(c.rounds, SimConfig::default().rounds);
        assert!(toml::from_str::<SimConfig>("clinets = 3").is_err());
    }

    /// Every shipped recipe loads, names its dataset, passes the checks a
    /// run makes before it starts, and is documented in the README.
    #[test]
    fn every_recipe_is_valid_and_documented() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let readme = std::fs::read_to_string(root.join("../README.md")).unwrap();
        let mut recipes: Vec<_> = std::fs::read_dir(root.join("recipes"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        recipes.sort();
        assert!(recipes.len() >= 5, "{recipes:?}");
        for path in &recipes {
            let what = path.display();
            let (cfg, names_dataset) = SimConfig::from_toml_file(path).unwrap();
            assert!(names_dataset, "{what} must name its dataset");
            fedveil_common::data::DatasetName::parse(&cfg.dataset).unwrap();
            cfg.partition
                .parse::<fedveil_common::data::Partition>()
                .unwrap();
            let base = cfg.model.split(':').next().unwrap();
            assert!(fedveil_common::model::MODEL_NAMES.contains(&base), "{what}");
            cfg.dp_config().unwrap();
            cfg.server_optimizer().unwrap();
            cfg.fault_plan().unwrap();
            cfg.round_timeout().unwrap();
            assert_eq!(cfg.train_limit, 0, "{what}: recipes use the whole dataset");
            let file = path.file_name().unwrap().to_string_lossy();
            assert!(
                readme.contains(&format!("simulations/recipes/{file}")),
                "README does not document {file}"
            );
        }
    }

    #[test]
    fn round_trips_through_toml() {
        let c = SimConfig {
            out: Some("x".into()),
            ..SimConfig::default()
        };
        assert_eq!(
            toml::from_str::<SimConfig>(&toml::to_string(&c).unwrap()).unwrap(),
            c
        );
    }
}
