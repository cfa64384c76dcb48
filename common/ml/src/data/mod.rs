//! Datasets: loaders for the standard formats, partitioners, synthetic data.
//!
//! A [`Dataset`] is loaded once and shared (`Arc`); a client's share of it is
//! a [`Shard`], a list of indices, so a thousand idle simulated clients cost
//! only their index lists.

pub mod csv;
pub mod fetch;
pub mod idx;
pub mod image_folder;
pub mod leaf;
pub mod partition;
pub mod synthetic;
pub mod text;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use csv::{CsvSpec, load_csv};

pub use fedveil_proto::wire::{ClassName, DataSpec};
pub use image_folder::{ImageFolderSpec, load_image_folder};
pub use partition::Partition;

/// What a model learns from the data: which of the task's metrics the
/// framework reports (accuracy for a classification; mean squared and mean
/// absolute error for a regression).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Class ids; loss: cross-entropy.
    #[default]
    Classification,
    /// Real-valued targets; loss: mean squared error.
    Regression,
}

impl Task {
    /// The task of data with `num_classes` classes (0: regression).
    pub fn of_classes(num_classes: usize) -> Self {
        if num_classes == 0 {
            Self::Regression
        } else {
            Self::Classification
        }
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Classification => "classification",
            Self::Regression => "regression",
        })
    }
}

impl std::str::FromStr for Task {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self, DataError> {
        match s {
            "classification" => Ok(Self::Classification),
            "regression" => Ok(Self::Regression),
            other => Err(DataError::Invalid(format!(
                "unknown task '{other}' (classification or regression)"
            ))),
        }
    }
}

/// Environment variable naming the data directory.
pub const DATA_DIR_ENV: &str = "FEDVEIL_DATA";
/// Environment variable that, set to anything but `0`, forbids downloads.
pub const OFFLINE_ENV: &str = "FEDVEIL_OFFLINE";

/// A labelled dataset of fixed-shape examples, stored densely.
///
/// Classification data has `num_classes >= 2` and a class id per example in
/// `labels`. Regression data has `num_classes == 0`, its values in
/// `targets`, and every label 0 (one stratum, so partitioners and shards
/// treat it like one class).
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Row-major features, `len() * example_len()` values.
    pub features: Vec<f32>,
    /// Shape of one example, e.g. `[1, 28, 28]` for MNIST.
    pub example_shape: Vec<usize>,
    /// Class id of each example (0 for regression data).
    pub labels: Vec<u32>,
    /// Classes of a classification; 0 for regression.
    pub num_classes: usize,
    /// Regression targets, one per example; empty for classification.
    pub targets: Vec<f32>,
    /// Class names in id order, when the source names them (CSV
    /// `--classes`, image-folder subfolders); empty otherwise.
    pub class_names: Vec<String>,
    /// The natural owner of each example (a LEAF writer), or empty when the
    /// dataset has none.
    pub owners: Vec<u32>,
    /// Text: examples are `[seq_len]` token ids (stored as exact f32s, id 0
    /// is padding) from a vocabulary of this size; 0 for other data.
    pub vocab_size: usize,
}

impl Dataset {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// What the data is, as the server checks it at join: example shape,
    /// classes (0 for a regression), their names, the vocabulary.
    pub fn spec(&self) -> DataSpec {
        let to_u32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        DataSpec {
            example_shape: self.example_shape.iter().map(|&d| to_u32(d)).collect(),
            num_classes: to_u32(self.num_classes),
            class_names: self.class_names.iter().cloned().map(ClassName).collect(),
            vocab_size: to_u32(self.vocab_size),
        }
    }

    /// The learning task this data poses.
    pub fn task(&self) -> Task {
        Task::of_classes(self.num_classes)
    }

    /// Values per example (the product of the example shape).
    pub fn example_len(&self) -> usize {
        self.example_shape.iter().product()
    }

    /// Example `i`'s values.
    pub fn example(&self, i: usize) -> &[f32] {
        let n = self.example_len();
        &self.features[i * n..(i + 1) * n]
    }

    /// Examples per class (regression: one count, of all examples).
    pub fn class_counts(&self) -> Vec<usize> {
        if self.task() == Task::Regression {
            return vec![self.len()];
        }
        let mut counts = vec![0; self.num_classes];
        for &l in &self.labels {
            counts[l as usize] += 1;
        }
        counts
    }

    /// Standardises every feature with `stats`: `(x - mean) / std`.
    pub fn standardize(&mut self, stats: &FeatureStats) -> Result<(), DataError> {
        let n = self.example_len();
        if stats.mean.len() != n || stats.std.len() != n {
            return Err(DataError::Invalid(format!(
                "feature statistics for {} and {} features, the data has {n}",
                stats.mean.len(),
                stats.std.len()
            )));
        }
        if let Some(bad) = stats.std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(DataError::Invalid(format!(
                "feature standard deviations must be positive, got {bad}"
            )));
        }
        for row in self.features.chunks_mut(n) {
            for ((x, m), s) in row.iter_mut().zip(&stats.mean).zip(&stats.std) {
                *x = (*x - m) / s;
            }
        }
        Ok(())
    }

    /// The examples at `rows`, in that order.
    pub fn select(&self, rows: &[usize]) -> Self {
        let mut features = Vec::with_capacity(rows.len() * self.example_len());
        for &i in rows {
            features.extend_from_slice(self.example(i));
        }
        Self {
            features,
            example_shape: self.example_shape.clone(),
            labels: rows.iter().map(|&i| self.labels[i]).collect(),
            num_classes: self.num_classes,
            class_names: self.class_names.clone(),
            targets: match self.targets.is_empty() {
                true => Vec::new(),
                false => rows.iter().map(|&i| self.targets[i]).collect(),
            },
            owners: match self.owners.is_empty() {
                true => Vec::new(),
                false => rows.iter().map(|&i| self.owners[i]).collect(),
            },
            vocab_size: self.vocab_size,
        }
    }

    /// A seeded random `fraction` of the examples held out as the test
    /// split, the rest training: for sources that come as one file.
    pub fn holdout(&self, fraction: f64, seed: u64) -> Split {
        use rand::SeedableRng;
        use rand::seq::SliceRandom;
        let mut rows: Vec<usize> = (0..self.len()).collect();
        rows.shuffle(&mut rand_chacha::ChaCha20Rng::seed_from_u64(seed));
        let test =
            ((fraction.clamp(0.0, 1.0) * rows.len() as f64).round() as usize).min(rows.len());
        let (test_rows, train_rows) = rows.split_at(test);
        Split {
            train: Arc::new(self.select(train_rows)),
            test: Arc::new(self.select(test_rows)),
        }
    }

    /// The first `n` examples (for quick runs and tests).
    pub fn truncated(mut self, n: usize) -> Self {
        let n = n.min(self.len());
        self.features.truncate(n * self.example_len());
        self.labels.truncate(n);
        self.targets.truncate(n);
        self.owners.truncate(n);
        self
    }
}

/// One client's view of a shared dataset.
#[derive(Debug, Clone)]
pub struct Shard {
    /// The whole dataset.
    pub data: Arc<Dataset>,
    /// The examples of it this shard holds.
    pub indices: Vec<usize>,
}

impl Shard {
    /// A shard of every example.
    pub fn whole(data: Arc<Dataset>) -> Self {
        let indices = (0..data.len()).collect();
        Self { data, indices }
    }

    /// Number of examples in the shard.
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// Whether the shard is empty.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }
}

/// Per-feature means and standard deviations to standardise with: the
/// same on every party, so that a feature means the same to every model.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureStats {
    /// Each feature's mean.
    pub mean: Vec<f32>,
    /// Each feature's standard deviation.
    pub std: Vec<f32>,
}

impl FeatureStats {
    /// The statistics of `data`'s features (a zero spread counts as 1, so
    /// a constant feature stays 0 after standardising).
    pub fn of(data: &Dataset) -> Self {
        let n = data.example_len();
        let rows = data.len().max(1) as f64;
        let mut sum = vec![0f64; n];
        let mut sq = vec![0f64; n];
        for row in data.features.chunks(n) {
            for (j, &x) in row.iter().enumerate() {
                sum[j] += f64::from(x);
                sq[j] += f64::from(x) * f64::from(x);
            }
        }
        let mean: Vec<f64> = sum.iter().map(|s| s / rows).collect();
        let std = sq
            .iter()
            .zip(&mean)
            .map(|(q, m)| {
                let s = (q / rows - m * m).max(0.0).sqrt();
                if s > 1e-12 { s as f32 } else { 1.0 }
            })
            .collect();
        Self {
            mean: mean.into_iter().map(|m| m as f32).collect(),
            std,
        }
    }
}

/// Where a party's data comes from: a built-in dataset by name, or the
/// operator's own files (`csv:PATH`, `image-folder:PATH`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    /// A dataset fedveil knows by name.
    Builtin(DatasetName),
    /// A CSV table.
    Csv(PathBuf),
    /// A folder of images, one subfolder per class.
    ImageFolder(PathBuf),
}

impl DataSource {
    /// `NAME` of a built-in dataset, `csv:PATH` or `image-folder:PATH`.
    pub fn parse(s: &str) -> Result<Self, DataError> {
        match s.split_once(':') {
            Some(("csv", path)) if !path.is_empty() => Ok(Self::Csv(PathBuf::from(path))),
            Some(("image-folder", path)) if !path.is_empty() => {
                Ok(Self::ImageFolder(PathBuf::from(path)))
            }
            _ => DatasetName::parse(s).map(Self::Builtin),
        }
    }
}

/// A train/test pair.
#[derive(Debug, Clone)]
pub struct Split {
    /// Training examples.
    pub train: Arc<Dataset>,
    /// Held-out test examples.
    pub test: Arc<Dataset>,
}

/// Why a dataset could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The dataset's files are not in the data directory.
    #[error(
        "dataset '{dataset}' is missing from {dir}: put {files} there \
         (or point --data-dir / {DATA_DIR_ENV} at a folder that has {dataset}/){hint}"
    )]
    Missing {
        /// The dataset.
        dataset: String,
        /// Where they were looked for.
        dir: PathBuf,
        /// The files missing.
        files: String,
        /// How to get them.
        hint: String,
    },
    /// A file's SHA-256 is not the pinned one.
    #[error(
        "{path}: checksum mismatch (sha256 {actual}, expected {expected}); delete it and fetch it again"
    )]
    Checksum {
        /// The file.
        path: PathBuf,
        /// The pinned hash.
        expected: String,
        /// The file's hash.
        actual: String,
    },
    /// A file is not valid IDX.
    #[error("{path}: not a valid IDX file: {reason}")]
    BadIdx {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A file cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A download failed.
    #[error("download of {url} failed: {reason}")]
    Download {
        /// What was fetched.
        url: String,
        /// Why it failed.
        reason: String,
    },
    /// No dataset has this name.
    #[error("unknown dataset '{0}' (known: {known}, or csv:PATH, image-folder:PATH)", known = DatasetName::ALL.map(DatasetName::as_str).join(", "))]
    Unknown(String),
    /// A line of a data file cannot be read.
    #[error("{path}:{line}: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// The line (1-based).
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// Data that cannot be used as asked.
    #[error("{0}")]
    Invalid(String),
}

impl DataError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// The data directory: `explicit` (a `--data-dir` flag), else `$FEDVEIL_DATA`,
/// else the per-user cache (`~/.cache/fedveil/data` on Linux).
pub fn resolve_data_dir(explicit: Option<&Path>) -> PathBuf {
    if let Some(dir) = explicit {
        return dir.to_owned();
    }
    if let Some(dir) = std::env::var_os(DATA_DIR_ENV).filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("fedveil")
        .join("data")
}

/// Datasets this build can load by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetName {
    /// Handwritten digits (IDX).
    Mnist,
    /// Clothing images in MNIST's format (IDX).
    FashionMnist,
    /// LEAF FEMNIST, split by writer.
    Femnist,
    /// Generated image data, for tests and demos without files.
    Synthetic,
    /// LEAF Shakespeare, split by speaking role (next character).
    LeafShakespeare,
    /// Shakespeare from LEAF's per-role raw text, one owner per role.
    ShakespeareRoles,
    /// Tiny Shakespeare (next character).
    TinyShakespeare,
    /// GLUE SST-2 (binary sentiment).
    Sst2,
    /// AG News (4 topics).
    AgNews,
}

impl DatasetName {
    /// Every built-in dataset.
    pub const ALL: [Self; 9] = [
        Self::Mnist,
        Self::FashionMnist,
        Self::Femnist,
        Self::Synthetic,
        Self::LeafShakespeare,
        Self::ShakespeareRoles,
        Self::TinyShakespeare,
        Self::Sst2,
        Self::AgNews,
    ];

    /// The dataset named `name` (as in `--dataset`).
    pub fn parse(name: &str) -> Result<Self, DataError> {
        Self::ALL
            .into_iter()
            .find(|d| d.as_str() == name)
            .ok_or_else(|| DataError::Unknown(name.to_owned()))
    }

    /// The dataset's name, as `--dataset` takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mnist => "mnist",
            Self::FashionMnist => "fashion-mnist",
            Self::Femnist => "femnist",
            Self::Synthetic => "synthetic",
            Self::LeafShakespeare => "leaf-shakespeare",
            Self::ShakespeareRoles => "shakespeare-roles",
            Self::TinyShakespeare => "tiny-shakespeare",
            Self::Sst2 => "sst2",
            Self::AgNews => "ag-news",
        }
    }

    /// Whether examples are token sequences (for transformer models).
    pub fn is_text(self) -> bool {
        matches!(
            self,
            Self::LeafShakespeare
                | Self::ShakespeareRoles
                | Self::TinyShakespeare
                | Self::Sst2
                | Self::AgNews
        )
    }
}

/// How a dataset is fetched when it is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Download {
    /// Fetch missing files from the canonical mirrors (checksums pinned).
    IfMissing,
    /// Fail with a message naming the missing files.
    Never,
}

/// Loads `name` from `data_dir` (train and test split).
///
/// `synthetic` is generated in memory from `seed`; the others are read from
/// `data_dir/<name>/` in their standard formats.
pub fn load(
    name: DatasetName,
    data_dir: &Path,
    download: Download,
    seed: u64,
) -> Result<Split, DataError> {
    let offline = std::env::var_os(OFFLINE_ENV).is_some_and(|v| !v.is_empty() && v != "0");
    let download = if offline { Download::Never } else { download };
    match name {
        DatasetName::Mnist => idx::load_idx_dataset(&idx::MNIST, data_dir, download),
        DatasetName::FashionMnist => idx::load_idx_dataset(&idx::FASHION_MNIST, data_dir, download),
        DatasetName::Femnist => leaf::load_femnist(data_dir),
        DatasetName::Synthetic => Ok(synthetic::SyntheticConfig::default().generate(seed)),
        DatasetName::LeafShakespeare => text::load_leaf_shakespeare(data_dir),
        DatasetName::ShakespeareRoles => text::load_shakespeare_roles(data_dir),
        DatasetName::TinyShakespeare => text::load_tiny_shakespeare(data_dir),
        DatasetName::Sst2 => text::load_sst2(data_dir),
        DatasetName::AgNews => text::load_ag_news(data_dir),
    }
}
