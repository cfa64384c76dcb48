//! The settings of a federated run, defined once.
//!
//! [`Settings`] is at the same time the TOML schema of a recipe file
//! (`simulations/recipes/*.toml`, `fedveil-server run --config FILE`) and
//! the flags of `fedveil-server run` and `fedveil-sim`: a key is the field's
//! name, its flag the same name with dashes. Each setting has one default,
//! [`Settings::default`], which both binaries print in their `--help`.
//!
//! Settings are layered like ripgrep's: defaults, then the file, then the
//! command line ([`Layered`]). A flag the user did not type never overwrites
//! a value from the file, because the flags carry no clap defaults at all.

#![warn(missing_docs)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::builder::Resettable;
use clap::{ArgAction, ArgMatches, Args, Command, FromArgMatches};
use fedveil_ml::data::{
    self, CsvSpec, DataError, DataSource, Download, FeatureStats, ImageFolderSpec, Split, Task,
};
use fedveil_ml::model::DeviceSpec;
use fedveil_proto::dp::adaptive::{DEFAULT_CLIP_LEARNING_RATE, DEFAULT_TARGET_QUANTILE};
use fedveil_proto::dp::{AdaptiveClipping, DpConfig, DpConfigError, DpPlan, Mechanism, NoiseLevel};
use fedveil_proto::round::CoordinatorConfig;
use fedveil_proto::round::server::DEFAULT_MAX_BUFFERED_VALUES;
use fedveil_proto::round::server::{
    DEFAULT_MAX_CLIENTS, DEFAULT_MAX_EXAMPLES_PER_UPDATE, DEFAULT_MAX_FAILED_ROUNDS,
    DEFAULT_MAX_REFUSALS_PER_ROUND, DEFAULT_ROUND_TIMEOUT, DEFAULT_SECAGG_STAGE_TIMEOUT,
    MIN_SECAGG_COHORT, SecAggConfig,
};
use fedveil_proto::secagg::{
    DEFAULT_BITS, DEFAULT_CLIP, DEFAULT_EXPECTED_DROPOUT, DEFAULT_MAX_WEIGHT,
};
use fedveil_proto::server_opt::{self, ServerOptimizerConfig};
use fedveil_proto::strategy::{AggregationRule, StrategyError};
use fedveil_proto::wire::{LocalOptimizer, RoundConfig};
use serde::{Deserialize, Serialize};

pub mod connections;
use connections::ConnectionLimits;

/// A setting that cannot be used, or a settings file that cannot be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    /// The file cannot be read.
    #[error("cannot read settings file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a value has the wrong type.
    #[error("settings file {path}: {detail}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A key no settings group knows.
    #[error("settings file {path}: unknown setting '{key}'{hint}")]
    Unknown {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// ", did you mean '...'?" when one is close.
        hint: String,
    },
    /// A value that cannot be used.
    #[error("{setting} = {value}: {reason}")]
    Invalid {
        /// The setting's name.
        setting: &'static str,
        /// The value given.
        value: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// The data cannot be loaded.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The DP settings are inconsistent.
    #[error("differential privacy: {0}")]
    Dp(#[from] DpConfigError),
    /// The command line is invalid.
    #[error("{0}")]
    Flags(#[from] clap::Error),
}

impl SettingsError {
    /// A strategy setting refused: named by the setting the error names.
    fn of_strategy(setting: &'static str, value: &str, err: StrategyError) -> Self {
        match err {
            StrategyError::BadSetting {
                setting,
                value,
                expected,
            } => Self::invalid(setting, value, expected),
            other => Self::invalid(setting, value, other.to_string()),
        }
    }

    fn invalid(
        setting: &'static str,
        value: impl std::fmt::Display,
        reason: impl Into<String>,
    ) -> Self {
        Self::Invalid {
            setting,
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

/// What a party trains or evaluates on: shared by the server (its test
/// split), every node and simulations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(default)]
pub struct DataSettings {
    /// mnist, fashion-mnist, femnist, synthetic, leaf-shakespeare,
    /// shakespeare-roles, tiny-shakespeare, sst2, ag-news, or the party's
    /// own files: a table as csv:PATH, images as image-folder:PATH (one
    /// subfolder per class). A relative PATH is looked up from here, else
    /// in the data directory. The server evaluates on its test split.
    #[arg(long, required = false, help_heading = "Data and model")]
    pub dataset: String,
    /// image-folder: the side every image is resized to.
    #[arg(long, required = false, help_heading = "Data and model")]
    pub image_size: usize,
    /// image-folder: 1 (grey) or 3 (RGB) channels.
    #[arg(long, required = false, help_heading = "Data and model")]
    pub image_channels: usize,
    /// csv: the label column.
    #[arg(long, help_heading = "Data and model")]
    pub label: Option<String>,
    /// csv: classification (labels are classes) or regression (labels are
    /// numbers; the task's metrics are MSE and MAE).
    #[arg(long, required = false, help_heading = "Data and model")]
    pub task: Task,
    /// csv, image-folder: the class names in id order, the same list on
    /// every party (csv: needed when labels are names) [default: csv labels
    /// are class ids; image folders' sorted subfolder names].
    #[arg(long, value_delimiter = ',', help_heading = "Data and model")]
    pub classes: Option<Vec<String>>,
    /// csv, image-folder: the seeded fraction of examples held out as the
    /// test split (0: all train; 1: all test, e.g. the server's own files).
    #[arg(long, required = false, help_heading = "Data and model")]
    pub holdout: f64,
    /// csv: per-feature means to standardise with, one per feature column
    /// in file order; the same on every party (`fedveil-sim feature-stats`
    /// prints them) [default: no standardisation].
    #[arg(
        long,
        value_delimiter = ',',
        requires = "feature_std",
        help_heading = "Data and model"
    )]
    pub feature_mean: Option<Vec<f32>>,
    /// csv: per-feature standard deviations, as --feature-mean.
    #[arg(
        long,
        value_delimiter = ',',
        requires = "feature_mean",
        help_heading = "Data and model"
    )]
    pub feature_std: Option<Vec<f32>>,
    /// Data directory [default: $FEDVEIL_DATA, then the user cache].
    #[arg(long, help_heading = "Data and model")]
    pub data_dir: Option<PathBuf>,
    /// Use only the first N training examples; 0 = all of them.
    #[arg(long, required = false, help_heading = "Data and model")]
    pub train_limit: usize,
    /// Model name: cnn, mlp, transformer-cls or transformer-lm (sizes after
    /// a colon, e.g. transformer-cls:d_model=256 or mlp:hidden=128).
    #[arg(long, required = false, help_heading = "Data and model")]
    pub model: String,
    /// cpu (Burn's flex), wgpu (a GPU through Vulkan, Metal or DX12), wgpu:cpu
    /// (Mesa's lavapipe), wgpu:N, wgpu:integrated or wgpu:integrated:N, cuda
    /// or cuda:N (cuda needs a build with the `cuda` feature).
    #[arg(long, required = false, help_heading = "Data and model")]
    pub device: String,
}

impl Default for DataSettings {
    fn default() -> Self {
        Self {
            dataset: "mnist".into(),
            label: None,
            task: Task::Classification,
            classes: None,
            holdout: 0.2,
            image_size: 28,
            image_channels: 1,
            feature_mean: None,
            feature_std: None,
            data_dir: None,
            train_limit: 0,
            model: "cnn".into(),
            device: "cpu".into(),
        }
    }
}

impl DataSettings {
    /// Loads the named dataset from the data directory (downloading what
    /// is missing and may be fetched), its training split cut to
    /// `train_limit`.
    pub fn load(&self, seed: u64) -> Result<Split, SettingsError> {
        let split = match DataSource::parse(&self.dataset)? {
            DataSource::Builtin(name) => {
                let dir = data::resolve_data_dir(self.data_dir.as_deref());
                data::load(name, &dir, Download::IfMissing, seed)?
            }
            DataSource::Csv(path) => {
                let label = self.label.clone().ok_or_else(|| {
                    SettingsError::invalid(
                        "label",
                        "none",
                        "csv data needs the name of its label column",
                    )
                })?;
                let spec = CsvSpec {
                    label,
                    classes: self.classes.clone(),
                    task: self.task,
                };
                let mut table = data::load_csv(&self.locate(path), &spec)?;
                if let Some(stats) = self.feature_stats()? {
                    table.standardize(&stats)?;
                }
                table.holdout(self.holdout()?, seed)
            }
            DataSource::ImageFolder(path) => {
                let spec = ImageFolderSpec {
                    side: self.image_size,
                    channels: self.image_channels,
                    classes: self.classes.clone(),
                };
                data::load_image_folder(&self.locate(path), &spec)?.holdout(self.holdout()?, seed)
            }
        };
        Ok(self.limit_train(split))
    }

    /// A relative path not found from here is looked up in the data
    /// directory, so recipes can name shared files.
    fn locate(&self, path: PathBuf) -> PathBuf {
        let in_data_dir = data::resolve_data_dir(self.data_dir.as_deref()).join(&path);
        if path.is_relative() && !path.exists() && in_data_dir.exists() {
            in_data_dir
        } else {
            path
        }
    }

    fn holdout(&self) -> Result<f64, SettingsError> {
        match self.holdout {
            f if (0.0..=1.0).contains(&f) => Ok(f),
            f => Err(SettingsError::invalid("holdout", f, "must be in [0, 1]")),
        }
    }

    /// The standardisation statistics, if given (both or neither).
    pub fn feature_stats(&self) -> Result<Option<FeatureStats>, SettingsError> {
        match (&self.feature_mean, &self.feature_std) {
            (None, None) => Ok(None),
            (Some(mean), Some(std)) => Ok(Some(FeatureStats {
                mean: mean.clone(),
                std: std.clone(),
            })),
            (Some(_), None) => Err(SettingsError::invalid(
                "feature_std",
                "none",
                "feature_mean needs feature_std",
            )),
            (None, Some(_)) => Err(SettingsError::invalid(
                "feature_mean",
                "none",
                "feature_std needs feature_mean",
            )),
        }
    }

    /// The split with its training set cut to `train_limit` (0: whole).
    pub fn limit_train(&self, split: Split) -> Split {
        if self.train_limit == 0 || self.train_limit >= split.train.len() {
            return split;
        }
        Split {
            train: std::sync::Arc::new((*split.train).clone().truncated(self.train_limit)),
            test: split.test,
        }
    }

    /// The device to train and evaluate on.
    pub fn device(&self) -> Result<DeviceSpec, SettingsError> {
        self.device
            .parse()
            .map_err(|e: fedveil_ml::model::DeviceError| {
                SettingsError::invalid("device", &self.device, e.to_string())
            })
    }
}

/// What a federated run trains, how, and under which protection: shared by
/// deployments and simulations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(default)]
pub struct Settings {
    /// What the party trains or evaluates on.
    #[serde(flatten)]
    #[command(flatten)]
    pub data: DataSettings,

    // --- rounds ---
    /// Rounds to run.
    #[arg(long, required = false, help_heading = "Rounds")]
    pub rounds: u64,
    /// Fraction C of the connected clients sampled into each round (with
    /// DP: each client's probability of taking part).
    #[arg(long, required = false, help_heading = "Rounds")]
    pub fraction: f64,
    /// Seconds before a round completes without its stragglers.
    #[arg(long, required = false, help_heading = "Rounds")]
    pub round_timeout: f64,
    /// The run stops after this many failed rounds.
    #[arg(long, required = false, help_heading = "Rounds")]
    pub max_failed_rounds: u64,
    /// Refusals a client may draw in one round; the last closes its
    /// connection.
    #[arg(long, required = false, help_heading = "Rounds")]
    pub max_refusals_per_round: u32,
    /// Most clients admitted at once.
    #[arg(long, required = false, help_heading = "Rounds")]
    pub max_clients: usize,
    /// Largest example count one update may claim.
    #[arg(long, required = false, help_heading = "Rounds")]
    pub max_examples_per_update: u64,
    /// Seeds the initial model, cohort sampling, data split and shuffling.
    #[arg(long, required = false, help_heading = "Rounds")]
    pub seed: u64,
    /// Where metrics, charts and the final model go [simulations default:
    /// results/sim-UNIXTIME; deployments write no files without it].
    #[arg(long, help_heading = "Rounds")]
    pub out: Option<PathBuf>,

    // --- local training ---
    /// Local epochs E per round.
    #[arg(long, required = false, help_heading = "Local training")]
    pub local_epochs: u32,
    /// Caps each client's local training at this many minibatch steps per
    /// round [default: no cap].
    #[arg(long, help_heading = "Local training")]
    pub max_local_steps: Option<u32>,
    /// Local minibatch size B.
    #[arg(long, required = false, help_heading = "Local training")]
    pub batch_size: u32,
    /// Client learning rate.
    #[arg(long, required = false, help_heading = "Local training")]
    pub lr: f32,
    /// Client optimizer: sgd, or adam (fresh moments each round; use a
    /// learning rate near 1e-3).
    #[arg(long, required = false, help_heading = "Local training")]
    pub local_optimizer: LocalOptimizer,
    /// FedProx proximal weight mu (0: off).
    #[arg(long, required = false, help_heading = "Local training")]
    pub prox_mu: f32,

    // --- secure aggregation ---
    /// Aggregate through SecAgg+, so the server sees only the cohort's sum
    /// (`--secagg false` turns it off).
    #[arg(long, required = false, action = ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", help_heading = "Secure aggregation")]
    pub secagg: bool,
    /// SecAgg+ neighbours per client [default: ~3 log2(cohort), the whole
    /// cohort when small].
    #[arg(long, help_heading = "Secure aggregation")]
    pub secagg_degree: Option<u32>,
    /// SecAgg+ Shamir threshold t, > degree / 2 [default: tolerates
    /// --secagg-expected-dropout].
    #[arg(long, help_heading = "Secure aggregation")]
    pub secagg_threshold: Option<u32>,
    /// Masked values live in Z_(2^BITS), 16..=32.
    #[arg(long, required = false, help_heading = "Secure aggregation")]
    pub secagg_bits: u32,
    /// Weighted update values are clipped to [-CLIP, CLIP] before encoding.
    #[arg(long, required = false, help_heading = "Secure aggregation")]
    pub secagg_clip: f32,
    /// Example counts are capped at this weight [default: 10000 in a
    /// deployment; the largest shard in a simulation].
    #[arg(long, help_heading = "Secure aggregation")]
    pub secagg_max_weight: Option<u64>,
    /// Dropout rate the default threshold tolerates.
    #[arg(long, required = false, help_heading = "Secure aggregation")]
    pub secagg_expected_dropout: f64,
    /// Seconds allowed for each key-exchange and unmask stage.
    #[arg(long, required = false, help_heading = "Secure aggregation")]
    pub secagg_stage_timeout: f64,

    // --- differential privacy ---
    /// distributed (needs secure aggregation), central or local [default
    /// with DP on: distributed under secure aggregation, else central]. DP
    /// is on when a noise multiplier or a target epsilon is given.
    #[arg(long, help_heading = "Differential privacy")]
    pub dp: Option<Mechanism>,
    /// Noise std over clip norm; turns DP on.
    #[arg(long, help_heading = "Differential privacy")]
    pub noise_multiplier: Option<f64>,
    /// Epsilon to reach after --rounds rounds (local DP: per round); turns
    /// DP on.
    #[arg(long, help_heading = "Differential privacy")]
    pub target_epsilon: Option<f64>,
    /// DP delta.
    #[arg(long, required = false, help_heading = "Differential privacy")]
    pub delta: f64,
    /// L2 norm every update is clipped to (adaptive clipping: the initial
    /// bound).
    #[arg(long, required = false, help_heading = "Differential privacy")]
    pub clip_norm: f64,
    /// Largest epsilon the run may spend [default: the target epsilon, else
    /// what the planned rounds spend].
    #[arg(long, help_heading = "Differential privacy")]
    pub dp_budget: Option<f64>,
    /// Clients the sampling rate refers to [default: --min-clients in a
    /// deployment; all clients in a simulation].
    #[arg(long, help_heading = "Differential privacy")]
    pub dp_population: Option<usize>,
    /// Distributed DP: fewest contributors a round accepts [default: 70% of
    /// the expected cohort].
    #[arg(long, help_heading = "Differential privacy")]
    pub dp_min_contributors: Option<usize>,
    /// Most epsilon (at --delta) any node may spend over all runs of this
    /// server; a node whose next round would pass it is no longer sampled.
    #[arg(long, help_heading = "Differential privacy")]
    pub population_budget: Option<f64>,
    /// Adapt the clip bound to a quantile of the update norms (Andrew et al.
    /// 2021).
    #[arg(long, required = false, action = ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", help_heading = "Differential privacy")]
    pub adaptive_clip: bool,
    /// Adaptive clipping: the norm quantile the bound tracks.
    #[arg(long, required = false, help_heading = "Differential privacy")]
    pub clip_quantile: f64,
    /// Adaptive clipping: step size of the geometric update.
    #[arg(long, required = false, help_heading = "Differential privacy")]
    pub clip_lr: f64,
    /// Adaptive clipping: std of the noise on the clipped count [default:
    /// expected cohort / 20].
    #[arg(long, help_heading = "Differential privacy")]
    pub clip_count_noise: Option<f64>,

    // --- strategy ---
    /// How updates are combined: mean (FedAvg; the only one under secure
    /// aggregation or central/distributed DP), median (FedMedian),
    /// trimmed-mean, krum or multi-krum.
    #[arg(long, required = false, help_heading = "Server strategy")]
    pub aggregation: String,
    /// Trimmed mean: fraction of values dropped at each end, per coordinate.
    #[arg(long, required = false, help_heading = "Server strategy")]
    pub trim_fraction: f64,
    /// Krum / Multi-Krum: faulty clients tolerated (a round needs 2f + 3
    /// updates).
    #[arg(long, required = false, help_heading = "Server strategy")]
    pub byzantine: usize,
    /// Multi-Krum: updates averaged [default: the updates less --byzantine].
    #[arg(long, help_heading = "Server strategy")]
    pub krum_keep: Option<usize>,
    /// Most values held for a strategy that needs every update (cohort ×
    /// model size).
    #[arg(long, required = false, help_heading = "Server strategy")]
    pub max_buffered_values: usize,

    // --- server optimizer ---
    /// fedavg, fedavgm, fedadagrad, fedyogi or fedadam (Reddi et al. 2021):
    /// the step the aggregate takes.
    #[arg(long, required = false, help_heading = "Server optimizer")]
    pub server_optimizer: String,
    /// Server learning rate [default: 1 for fedavg/fedavgm, 0.01 for the
    /// adaptive ones].
    #[arg(long, help_heading = "Server optimizer")]
    pub server_lr: Option<f64>,
    /// FedAvgM momentum.
    #[arg(long, required = false, help_heading = "Server optimizer")]
    pub server_momentum: f64,
    /// FedAdam/FedYogi/FedAdagrad beta1.
    #[arg(long, required = false, help_heading = "Server optimizer")]
    pub beta1: f64,
    /// FedAdam/FedYogi beta2.
    #[arg(long, required = false, help_heading = "Server optimizer")]
    pub beta2: f64,
    /// Adaptivity tau of FedAdagrad/FedYogi/FedAdam.
    #[arg(long, required = false, help_heading = "Server optimizer")]
    pub tau: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            data: DataSettings::default(),
            rounds: 5,
            fraction: 1.0,
            round_timeout: DEFAULT_ROUND_TIMEOUT.as_secs_f64(),
            max_failed_rounds: DEFAULT_MAX_FAILED_ROUNDS,
            max_refusals_per_round: DEFAULT_MAX_REFUSALS_PER_ROUND,
            max_clients: DEFAULT_MAX_CLIENTS,
            max_examples_per_update: DEFAULT_MAX_EXAMPLES_PER_UPDATE,
            seed: 0,
            out: None,
            local_epochs: 1,
            max_local_steps: None,
            batch_size: 20,
            lr: 0.05,
            local_optimizer: LocalOptimizer::Sgd,
            prox_mu: 0.0,
            secagg: true,
            secagg_degree: None,
            secagg_threshold: None,
            secagg_bits: DEFAULT_BITS,
            secagg_clip: DEFAULT_CLIP,
            secagg_max_weight: None,
            secagg_expected_dropout: DEFAULT_EXPECTED_DROPOUT,
            secagg_stage_timeout: DEFAULT_SECAGG_STAGE_TIMEOUT.as_secs_f64(),
            dp: None,
            noise_multiplier: None,
            target_epsilon: None,
            delta: fedveil_proto::dp::DEFAULT_DELTA,
            clip_norm: fedveil_proto::dp::DEFAULT_CLIP_NORM,
            dp_budget: None,
            dp_population: None,
            dp_min_contributors: None,
            population_budget: None,
            adaptive_clip: false,
            clip_quantile: DEFAULT_TARGET_QUANTILE,
            clip_lr: DEFAULT_CLIP_LEARNING_RATE,
            clip_count_noise: None,
            aggregation: "mean".into(),
            trim_fraction: fedveil_proto::strategy::DEFAULT_TRIM_FRACTION,
            byzantine: fedveil_proto::strategy::DEFAULT_BYZANTINE,
            krum_keep: None,
            max_buffered_values: DEFAULT_MAX_BUFFERED_VALUES,
            server_optimizer: "fedavg".into(),
            server_lr: None,
            server_momentum: server_opt::DEFAULT_SERVER_MOMENTUM,
            beta1: server_opt::DEFAULT_BETA1,
            beta2: server_opt::DEFAULT_BETA2,
            tau: server_opt::DEFAULT_TAU,
        }
    }
}

/// Settings only a deployment reads (a simulation knows its clients).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(default)]
pub struct Deployment {
    /// Enrolled clients connected before the first round starts.
    #[arg(long, required = false, help_heading = "Deployment")]
    pub min_clients: usize,
    /// TLS handshakes at once; more are refused outright.
    #[arg(long, required = false, help_heading = "Connection limits")]
    pub max_handshakes: usize,
    /// Above this many handshakes at once, a peer must first prove its
    /// address (a QUIC retry).
    #[arg(long, required = false, help_heading = "Connection limits")]
    pub retry_above_handshakes: usize,
    /// Connections waiting to say hello, over all peers.
    #[arg(long, required = false, help_heading = "Connection limits")]
    pub max_unadmitted: usize,
    /// Connections of one enrolled node waiting to say hello.
    #[arg(long, required = false, help_heading = "Connection limits")]
    pub max_unadmitted_per_node: usize,
    /// Messages of one connection read but not yet handled (then QUIC flow
    /// control pushes back).
    #[arg(long, required = false, help_heading = "Connection limits")]
    pub max_queued_per_connection: usize,
    /// Messages queued for one connection but not yet written; a peer that
    /// does not read past them is disconnected.
    #[arg(long, required = false, help_heading = "Connection limits")]
    pub max_outbound_queued: usize,
    /// Seconds a connection may take to open its stream and say hello.
    #[arg(long, required = false, help_heading = "Connection limits")]
    pub hello_timeout: f64,
}

impl Default for Deployment {
    fn default() -> Self {
        let limits = ConnectionLimits::default();
        Self {
            min_clients: MIN_SECAGG_COHORT,
            max_handshakes: limits.max_handshakes,
            retry_above_handshakes: limits.retry_above_handshakes,
            max_unadmitted: limits.max_unadmitted,
            max_unadmitted_per_node: limits.max_unadmitted_per_node,
            max_queued_per_connection: limits.max_queued_per_connection,
            max_outbound_queued: limits.max_outbound_queued,
            hello_timeout: limits.hello_timeout.as_secs_f64(),
        }
    }
}

impl Deployment {
    /// The connection limits these settings name; each must be at least 1
    /// (the hello timeout positive).
    pub fn connection_limits(&self) -> Result<ConnectionLimits, SettingsError> {
        let counts = [
            ("max_handshakes", self.max_handshakes),
            ("retry_above_handshakes", self.retry_above_handshakes),
            ("max_unadmitted", self.max_unadmitted),
            ("max_unadmitted_per_node", self.max_unadmitted_per_node),
            ("max_queued_per_connection", self.max_queued_per_connection),
            ("max_outbound_queued", self.max_outbound_queued),
        ];
        if let Some((setting, value)) = counts.into_iter().find(|(_, n)| *n == 0) {
            return Err(SettingsError::Invalid {
                setting,
                value: value.to_string(),
                reason: "must be at least 1".into(),
            });
        }
        let hello_timeout = Duration::try_from_secs_f64(self.hello_timeout)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| SettingsError::Invalid {
                setting: "hello_timeout",
                value: self.hello_timeout.to_string(),
                reason: "must be a positive number of seconds".into(),
            })?;
        Ok(ConnectionLimits {
            max_handshakes: self.max_handshakes,
            retry_above_handshakes: self.retry_above_handshakes,
            max_unadmitted: self.max_unadmitted,
            max_unadmitted_per_node: self.max_unadmitted_per_node,
            max_queued_per_connection: self.max_queued_per_connection,
            max_outbound_queued: self.max_outbound_queued,
            hello_timeout,
        })
    }
}

/// Settings only a simulation reads: the simulated population and the
/// faults injected into it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(default)]
pub struct Simulation {
    /// The run's name, in plot titles [default: the settings file's name,
    /// else the results directory's].
    #[arg(long, help_heading = "Simulation")]
    pub name: Option<String>,
    /// Simulated clients, each a real QUIC connection.
    #[arg(long, required = false, help_heading = "Simulation")]
    pub clients: usize,
    /// How the training set is split over the clients: iid,
    /// dirichlet:ALPHA, shards:K or natural (one owner per client).
    #[arg(long, required = false, help_heading = "Simulation")]
    pub partition: String,
    /// Probability that a sampled client vanishes in a round, at a
    /// uniformly drawn stage of the protocol; it rejoins a second later.
    #[arg(long, required = false, help_heading = "Simulation")]
    pub dropout: f64,
    /// Delay before each client's update leaves: exp:MEAN, fixed:D or
    /// uniform:LO..HI, e.g. exp:2s [default: none].
    #[arg(long, help_heading = "Simulation")]
    pub straggler_delay: Option<String>,
    /// Local trainings running at once [default: number of cores].
    #[arg(long, help_heading = "Simulation")]
    pub max_concurrent_training: Option<usize>,
    /// CPU threads each training runs on, its own; 0 = all trainings share
    /// one pool of all cores [default: cores / trainings at once on the
    /// cpu device, 0 on a GPU].
    #[arg(long, help_heading = "Simulation")]
    pub threads_per_training: Option<usize>,
}

impl Default for Simulation {
    fn default() -> Self {
        Self {
            name: None,
            clients: 10,
            partition: "iid".into(),
            dropout: 0.0,
            straggler_delay: None,
            max_concurrent_training: None,
            threads_per_training: None,
        }
    }
}

/// Every key a settings file may hold: the shared [`Settings`] and the
/// groups of one kind of run. A binary refuses any other key, and says
/// which of these it ignores.
pub fn recipe_keys() -> BTreeSet<String> {
    let mut keys = Settings::keys();
    keys.extend(Deployment::keys());
    keys.extend(Simulation::keys());
    keys
}

/// Who takes part in a run: what the coordinator needs beyond
/// [`Settings`], which a deployment and a simulation know differently.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Population {
    /// Admitted clients needed before a round starts.
    pub min_clients: usize,
    /// Most clients admitted at once.
    pub max_clients: usize,
    /// Clients the DP sampling rate refers to (and the largest cohort the
    /// distributed-DP encoding must fit).
    pub dp_population: usize,
    /// Weight cap of secure aggregation.
    pub secagg_max_weight: u64,
    /// Dropout rate the Shamir threshold must tolerate.
    pub expected_dropout: f64,
}

impl Population {
    /// A deployment's: enrolled nodes connect as they come.
    pub fn deployment(settings: &Settings, deployment: &Deployment) -> Self {
        Self {
            min_clients: deployment.min_clients,
            max_clients: settings.max_clients,
            dp_population: settings.dp_population.unwrap_or(deployment.min_clients),
            secagg_max_weight: settings.secagg_max_weight.unwrap_or(DEFAULT_MAX_WEIGHT),
            expected_dropout: settings.secagg_expected_dropout,
        }
    }
}

impl Settings {
    /// The round timeout, checked positive.
    pub fn round_timeout(&self) -> Result<Duration, SettingsError> {
        positive_seconds("round_timeout", self.round_timeout)
    }

    /// What every cohort member is told to do.
    pub fn round_config(&self) -> RoundConfig {
        RoundConfig {
            local_epochs: self.local_epochs,
            batch_size: self.batch_size,
            max_local_steps: self.max_local_steps,
            learning_rate: self.lr,
            seed: self.seed,
            secure_aggregation: self.secagg,
            dp: None,
            prox_mu: self.prox_mu,
            local_optimizer: self.local_optimizer,
        }
    }

    /// Secure aggregation, if on.
    pub fn secagg_config(
        &self,
        max_weight: u64,
        expected_dropout: f64,
    ) -> Result<Option<SecAggConfig>, SettingsError> {
        if !self.secagg {
            return Ok(None);
        }
        Ok(Some(SecAggConfig {
            degree: self.secagg_degree,
            threshold: self.secagg_threshold,
            bits: self.secagg_bits,
            clip: self.secagg_clip,
            max_weight,
            expected_dropout,
            stage_timeout: positive_seconds("secagg_stage_timeout", self.secagg_stage_timeout)?,
        }))
    }

    /// The DP settings, if DP is on.
    pub fn dp_config(&self) -> Result<Option<DpConfig>, SettingsError> {
        let noise = match (self.noise_multiplier, self.target_epsilon) {
            (None, None) => match self.dp {
                Some(m) => {
                    return Err(SettingsError::invalid(
                        "dp",
                        m,
                        "needs a noise_multiplier or a target_epsilon",
                    ));
                }
                None => return Ok(None),
            },
            (Some(z), Some(e)) => {
                return Err(SettingsError::invalid(
                    "noise_multiplier",
                    z,
                    format!("give a noise_multiplier or a target_epsilon ({e}), not both"),
                ));
            }
            (Some(z), None) => NoiseLevel::NoiseMultiplier(z),
            (None, Some(e)) => NoiseLevel::TargetEpsilon(e),
        };
        let mechanism = self.dp.unwrap_or(if self.secagg {
            Mechanism::Distributed
        } else {
            Mechanism::Central
        });
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

    /// The coordinator's configuration for `population`, training a model
    /// of `param_count` parameters. With DP the distributed encoding is
    /// sized for the DP population, so no more clients are admitted.
    pub fn coordinator_config(
        &self,
        population: &Population,
        param_count: usize,
    ) -> Result<CoordinatorConfig, SettingsError> {
        let dp: Option<DpPlan> = self
            .dp_config()?
            .map(|c| {
                c.plan(
                    self.fraction,
                    population.dp_population,
                    param_count,
                    population.dp_population.min(population.max_clients),
                    self.secagg,
                )
            })
            .transpose()?;
        let max_clients = match dp {
            Some(_) => population.max_clients.min(population.dp_population),
            None => population.max_clients,
        };
        Ok(CoordinatorConfig {
            rounds: self.rounds,
            min_clients: population.min_clients,
            fraction: self.fraction,
            round_timeout: self.round_timeout()?,
            max_clients,
            max_examples_per_update: self.max_examples_per_update,
            seed: self.seed,
            round: self.round_config(),
            secagg: self
                .secagg_config(population.secagg_max_weight, population.expected_dropout)?,
            max_failed_rounds: self.max_failed_rounds,
            max_refusals_per_round: self.max_refusals_per_round,
            aggregation: self.aggregation()?,
            server_optimizer: self.server_optimizer()?,
            max_buffered_values: self.max_buffered_values,
            dp,
        })
    }

    /// The settings that make a run what it is, as JSON: a restart must
    /// present the same ones (the store refuses to resume otherwise), while
    /// where the data lives, where results go, the device and the
    /// operational limits may change between restarts.
    pub fn run_identity(&self) -> serde_json::Map<String, serde_json::Value> {
        const OPERATIONAL: &[&str] = &[
            "data_dir",
            "out",
            "device",
            "train_limit",
            "round_timeout",
            "max_failed_rounds",
            "max_refusals_per_round",
            "max_clients",
            "max_examples_per_update",
            "max_buffered_values",
            "secagg_stage_timeout",
        ];
        let mut map = match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => unreachable!("settings serialize to a map"),
        };
        map.retain(|k, _| !OPERATIONAL.contains(&k.as_str()));
        map
    }

    /// The aggregation rule, validated.
    pub fn aggregation(&self) -> Result<AggregationRule, SettingsError> {
        AggregationRule::from_settings(
            &self.aggregation,
            self.trim_fraction,
            self.byzantine,
            self.krum_keep,
        )
        .map_err(|e| SettingsError::of_strategy("aggregation", &self.aggregation, e))
    }

    /// The server optimizer, validated.
    pub fn server_optimizer(&self) -> Result<ServerOptimizerConfig, SettingsError> {
        ServerOptimizerConfig::from_settings(
            &self.server_optimizer,
            self.server_lr,
            self.server_momentum,
            self.beta1,
            self.beta2,
            self.tau,
        )
        .map_err(|e| SettingsError::of_strategy("server_optimizer", &self.server_optimizer, e))
    }
}

fn positive_seconds(setting: &'static str, secs: f64) -> Result<Duration, SettingsError> {
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            SettingsError::invalid(setting, secs, "must be a positive number of seconds")
        })
}

/// A group of settings that can be layered: defaults, then a TOML file,
/// then flags. Implemented for every `Args + Deserialize + Default` type.
pub trait Layered: Args + FromArgMatches + Serialize + for<'de> Deserialize<'de> + Default {
    /// The names of the settings (TOML keys) this group defines.
    fn keys() -> BTreeSet<String> {
        Self::augment_args(Command::new("keys"))
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .collect()
    }

    /// Reads the group's keys from a parsed TOML table; missing keys keep
    /// their defaults. Keys of other groups are left to them.
    fn from_table(table: &toml::Table, path: &Path) -> Result<Self, SettingsError> {
        let keys = Self::keys();
        let mine: toml::Table = table
            .iter()
            .filter(|(k, _)| keys.contains(k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let parse = |table: toml::Table| toml::Value::Table(table).try_into::<Self>();
        parse(mine.clone()).map_err(|e| {
            // Name the key: the first one that fails on its own.
            let key = mine.iter().find_map(|(k, v)| {
                parse(toml::Table::from_iter([(k.clone(), v.clone())]))
                    .is_err()
                    .then_some(k)
            });
            SettingsError::Parse {
                path: path.to_owned(),
                detail: match key {
                    Some(k) => format!("{k}: {}", e.message()),
                    None => e.message().to_owned(),
                },
            }
        })
    }

    /// Overrides the settings the user gave on the command line.
    fn update_from_flags(&mut self, matches: &ArgMatches) -> Result<(), SettingsError> {
        self.update_from_arg_matches(matches)?;
        Ok(())
    }

    /// Adds the group's flags to `command`, each help line ending with the
    /// setting's default.
    fn add_flags(command: Command) -> Command {
        let defaults = serde_json::to_value(Self::default()).unwrap_or_default();
        // The group's doc comment is not the command's description.
        let (about, long_about) = (
            command.get_about().cloned(),
            command.get_long_about().cloned(),
        );
        Self::augment_args(command)
            .about(about.map_or(Resettable::Reset, Resettable::Value))
            .long_about(long_about.map_or(Resettable::Reset, Resettable::Value))
            .mut_args(
                |arg| match defaults.get(arg.get_id().as_str()).and_then(shown) {
                    Some(shown) if arg.get_long().is_some() => {
                        let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
                        arg.help(format!("{help} [default: {shown}]"))
                    }
                    _ => arg,
                },
            )
    }
}

/// A default as a user would type it (`0.05`, not the `f64` of an `f32`).
fn shown(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) if n.is_f64() => {
            let x = n.as_f64()?;
            Some(if f64::from(x as f32) == x {
                (x as f32).to_string()
            } else {
                x.to_string()
            })
        }
        other => Some(other.to_string()),
    }
}

impl<T> Layered for T where
    T: Args + FromArgMatches + Serialize + for<'de> Deserialize<'de> + Default
{
}

/// A settings file: parsed once, then read by each group, with every key
/// checked against the groups that may read it.
#[derive(Debug, Clone)]
pub struct SettingsFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// Its parsed contents.
    pub table: toml::Table,
}

impl SettingsFile {
    /// Reads and parses a settings file.
    pub fn read(path: &Path) -> Result<Self, SettingsError> {
        let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
            path: path.to_owned(),
            source,
        })?;
        let table = text
            .parse::<toml::Table>()
            .map_err(|e| SettingsError::Parse {
                path: path.to_owned(),
                detail: e.message().to_owned(),
            })?;
        Ok(Self {
            path: path.to_owned(),
            table,
        })
    }

    /// Reads a recipe file: every key must be a setting of some kind of
    /// run ([`recipe_keys`]).
    pub fn read_recipe(path: &Path) -> Result<Self, SettingsError> {
        let file = Self::read(path)?;
        file.check_keys(&recipe_keys())?;
        Ok(file)
    }

    /// Logs, once, which settings of a group this kind of run does not read
    /// the file sets (`what` names them, e.g. "simulation settings in a
    /// deployment").
    pub fn note_ignored(&self, group: BTreeSet<String>, what: &str) {
        let ignored: Vec<String> = group.into_iter().filter(|k| self.sets(k)).collect();
        if !ignored.is_empty() {
            tracing::info!(
                file = %self.path.display(),
                "ignoring {what}: {}",
                ignored.join(", ")
            );
        }
    }

    /// Refuses a key that none of `known` defines (a typo must not silently
    /// run with a default).
    pub fn check_keys(&self, known: &BTreeSet<String>) -> Result<(), SettingsError> {
        match self.table.keys().find(|k| !known.contains(k.as_str())) {
            None => Ok(()),
            Some(key) => Err(SettingsError::Unknown {
                path: self.path.clone(),
                key: key.clone(),
                hint: closest(key, known)
                    .map(|k| format!(", did you mean '{k}'?"))
                    .unwrap_or_default(),
            }),
        }
    }

    /// Whether the file sets `key`.
    pub fn sets(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    /// Reads group `T` from the file (missing keys keep `T`'s defaults).
    pub fn get<T: Layered>(&self) -> Result<T, SettingsError> {
        T::from_table(&self.table, &self.path)
    }
}

/// The known key nearest to `key` by edit distance, if it is a plausible typo.
fn closest<'a>(key: &str, known: &'a BTreeSet<String>) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (strsim::levenshtein(key, k), k.as_str()))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min()
        .map(|(_, k)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> ArgMatches {
        Settings::add_flags(Command::new("t"))
            .try_get_matches_from(std::iter::once("t").chain(args.iter().copied()))
            .unwrap()
    }

    fn file(text: &str) -> SettingsFile {
        SettingsFile {
            path: "recipe.toml".into(),
            table: text.parse().unwrap(),
        }
    }

    #[test]
    fn flags_override_the_file_and_absent_flags_do_not() {
        let f = file("rounds = 7\nbatch_size = 32\nsecagg = false");
        let mut s: Settings = f.get().unwrap();
        assert_eq!((s.rounds, s.batch_size, s.secagg), (7, 32, false));
        s.update_from_flags(&parse(&["--rounds", "3"])).unwrap();
        assert_eq!((s.rounds, s.batch_size, s.secagg), (3, 32, false));
        assert_eq!(s.lr, Settings::default().lr);
    }

    #[test]
    fn bare_secagg_turns_it_on_and_false_turns_it_off() {
        let mut s = Settings {
            secagg: false,
            ..Settings::default()
        };
        s.update_from_flags(&parse(&["--secagg"])).unwrap();
        assert!(s.secagg);
        s.update_from_flags(&parse(&["--secagg", "false"])).unwrap();
        assert!(!s.secagg);
        s.update_from_flags(&parse(&["--adaptive-clip"])).unwrap();
        assert!(s.adaptive_clip);
    }

    #[test]
    fn privacy_is_on_by_default_and_the_whole_dataset_is_used() {
        let s = Settings::default();
        assert!(s.secagg);
        assert_eq!(s.data.train_limit, 0);
    }

    #[test]
    fn unknown_keys_are_refused_with_a_suggestion() {
        let err = file("rounds = 2\nnoise_multiplyer = 1.0")
            .check_keys(&Settings::keys())
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "settings file recipe.toml: unknown setting 'noise_multiplyer', did you mean 'noise_multiplier'?"
        );
        assert!(file("rounds = 2").check_keys(&Settings::keys()).is_ok());
    }

    #[test]
    fn a_wrong_type_names_the_file_and_the_key() {
        let err = file("rounds = \"many\"").get::<Settings>().unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("recipe.toml") && text.contains("rounds"),
            "{text}"
        );
    }

    #[test]
    fn help_shows_each_default_once() {
        let help = Settings::add_flags(Command::new("t"))
            .render_long_help()
            .to_string();
        assert!(help.contains("[default: fedavg]"), "{help}");
        assert!(help.contains("[default: true]"), "{help}");
        assert_eq!(help.matches("[default: cnn]").count(), 1);
    }

    #[test]
    fn every_setting_is_a_key_and_a_flag() {
        let keys = Settings::keys();
        let json = serde_json::to_value(Settings::default()).unwrap();
        let fields: BTreeSet<String> = json.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, fields);
    }
}
