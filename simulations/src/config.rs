//! A simulation's configuration: the run's shared [`Settings`] and the
//! [`Simulation`] group (population, partition, faults), both defined once
//! in `fedveil_settings`, layered defaults, then a TOML recipe, then
//! flags.

use std::path::Path;

use clap::Args;
use fedveil_ml::model::DeviceSpec;
use fedveil_settings::{Deployment, Layered, Settings, SettingsError, SettingsFile, Simulation};
use serde::{Deserialize, Serialize};

use crate::faults::{DelayDist, FaultError, FaultPlan};

/// Everything a simulation run needs. TOML keys are the field names of
/// [`Settings`] and [`Simulation`]; flags use the same names with dashes.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, Args)]
pub struct SimConfig {
    /// The simulated population, partition and faults.
    #[serde(flatten)]
    #[command(flatten)]
    pub sim: Simulation,
    /// The run's settings, shared with deployments.
    #[serde(flatten)]
    #[command(flatten)]
    pub run: Settings,
}

/// A simulation setting that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimConfigError {
    /// A shared setting is invalid.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// The straggler delay does not parse.
    #[error("straggler_delay {0}")]
    StragglerDelay(FaultError),
    /// The fault settings are invalid.
    #[error(transparent)]
    Faults(FaultError),
}

impl SimConfig {
    /// Reads a recipe; missing keys keep their defaults, unknown keys are
    /// refused. Also says whether the file names a dataset (an explicit
    /// choice never falls back to synthetic data).
    pub fn from_toml_file(path: &Path) -> Result<(Self, bool), SettingsError> {
        let file = SettingsFile::read_recipe(path)?;
        file.note_ignored(Deployment::keys(), "deployment settings in a simulation");
        Ok((file.get()?, file.sets("dataset")))
    }

    /// The faults to inject.
    pub fn fault_plan(&self) -> Result<FaultPlan, SimConfigError> {
        let delay = self
            .sim
            .straggler_delay
            .as_deref()
            .map(str::parse::<DelayDist>)
            .transpose()
            .map_err(SimConfigError::StragglerDelay)?;
        FaultPlan::new(self.sim.dropout, delay, self.run.seed).map_err(SimConfigError::Faults)
    }

    /// Local trainings at once.
    pub fn concurrency(&self) -> usize {
        self.sim
            .max_concurrent_training
            .unwrap_or_else(cores)
            .max(1)
    }

    /// Threads each training gets to itself on `device`, or None where the
    /// trainings share one pool (a GPU device, or `threads_per_training =
    /// 0`). On the CPU each training gets an equal share of the cores, so
    /// trainings at once do not queue on one another's operations.
    pub fn threads_per_training(&self, device: DeviceSpec) -> Option<usize> {
        match self.sim.threads_per_training {
            Some(0) => None,
            Some(n) => Some(n),
            None if device.is_host() => Some((cores() / self.concurrency()).max(1)),
            None => None,
        }
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("fedveil-{}-{name}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn each_cpu_training_gets_its_share_of_the_cores_and_a_gpu_none() {
        let mut c = SimConfig::default();
        c.sim.max_concurrent_training = Some(1);
        assert_eq!(c.threads_per_training(DeviceSpec::Cpu), Some(cores()));
        c.sim.max_concurrent_training = Some(cores() * 4);
        assert_eq!(c.threads_per_training(DeviceSpec::Cpu), Some(1));
        assert_eq!(c.threads_per_training(DeviceSpec::Cuda(0)), None);
        c.sim.threads_per_training = Some(0);
        assert_eq!(
            c.threads_per_training(DeviceSpec::Cpu),
            None,
            "0 = one shared pool"
        );
        c.sim.threads_per_training = Some(3);
        assert_eq!(c.threads_per_training(DeviceSpec::Cuda(0)), Some(3));
    }

    #[test]
    fn partial_toml_keeps_defaults_and_unknown_keys_fail() {
        let path = write(
            "partial.toml",
            "clients = 3\npartition = \"dirichlet:0.5\"\nmin_clients = 9",
        );
        let (c, names_dataset) = SimConfig::from_toml_file(&path).unwrap();
        assert_eq!(c.sim.clients, 3);
        assert_eq!(c.sim.partition, "dirichlet:0.5");
        assert_eq!(c.run.rounds, Settings::default().rounds);
        assert!(!names_dataset);
        let typo = write("typo.toml", "clinets = 3");
        let err = SimConfig::from_toml_file(&typo).unwrap_err().to_string();
        assert!(
            err.contains("unknown setting 'clinets', did you mean 'clients'?"),
            "{err}"
        );
        std::fs::remove_file(path).unwrap();
        std::fs::remove_file(typo).unwrap();
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
            fedveil_ml::data::DataSource::parse(&cfg.run.data.dataset).unwrap();
            cfg.run.data.feature_stats().unwrap();
            cfg.sim
                .partition
                .parse::<fedveil_ml::data::Partition>()
                .unwrap();
            let base = cfg.run.data.model.split(':').next().unwrap();
            assert!(fedveil_ml::model::MODEL_NAMES.contains(&base), "{what}");
            cfg.run.dp_config().unwrap();
            cfg.run.server_optimizer().unwrap();
            cfg.fault_plan().unwrap();
            cfg.run.round_timeout().unwrap();
            assert_eq!(
                cfg.run.data.train_limit, 0,
                "{what}: recipes use the whole dataset"
            );
            let file = path.file_name().unwrap().to_string_lossy();
            assert!(
                readme.contains(&format!("simulations/recipes/{file}")),
                "README does not document {file}"
            );
        }
    }

    #[test]
    fn round_trips_through_toml() {
        let mut c = SimConfig::default();
        c.run.out = Some("x".into());
        c.sim.straggler_delay = Some("exp:2s".into());
        let text = toml::to_string(&c).unwrap();
        assert_eq!(toml::from_str::<SimConfig>(&text).unwrap(), c);
    }
}
