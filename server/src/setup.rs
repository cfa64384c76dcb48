//! Building blocks a server run is assembled from: the initial global model,
//! the held-out evaluator, and the metrics files. Shared by the
//! `fedveil-server` binary and the simulator.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use burn::data::dataset::Dataset as BurnDataset;
use burn::prelude::Device;
use fedveil_ml::data::{Dataset, Shard};
use fedveil_ml::model::{
    self, DataShape, EvalStats, Example, FlModel, ModelError, ModelFactory, ModelSpec,
};
use fedveil_proto::metrics::{RoundCosts, RoundMetrics};
use fedveil_proto::round::Event;
use std::sync::Arc;

use crate::driver::{Evaluator, Observer};

/// The model's shape signature and a freshly initialised parameter vector.
/// The device RNG is seeded, so the same seed gives the same initial model.
pub fn initial_model<I: 'static>(
    factory: &ModelFactory<I>,
    shape: &DataShape,
    device: &Device,
    seed: u64,
) -> Result<(ModelSpec, Vec<f32>), ModelError> {
    device.seed(seed);
    let m = factory.build(shape, device)?;
    Ok((m.spec().clone(), m.params()))
}

/// Evaluates global models on a held-out dataset.
pub struct ModelEvaluator<I: 'static = Example> {
    model: Box<dyn FlModel<I>>,
    test: Arc<dyn BurnDataset<I>>,
}

impl ModelEvaluator<Example> {
    /// The built-in model `name` on a dense test set.
    pub fn new(name: &str, test: Arc<Dataset>, device: &Device) -> Result<Self, ModelError> {
        let shape = DataShape::of(&test);
        Self::of(
            &model::builtin(name)?,
            &shape,
            Arc::new(Shard::whole(test)),
            device,
        )
    }
}

impl<I: 'static> ModelEvaluator<I> {
    /// The models `factory` builds, on any Burn test set of data `shape`.
    pub fn of(
        factory: &ModelFactory<I>,
        shape: &DataShape,
        test: Arc<dyn BurnDataset<I>>,
        device: &Device,
    ) -> Result<Self, ModelError> {
        Ok(Self {
            model: factory.build(shape, device)?,
            test,
        })
    }
}

impl<I: 'static> Evaluator for ModelEvaluator<I> {
    fn evaluate(&mut self, global_model: &[f32]) -> EvalStats {
        let stats = self
            .model
            .set_params(global_model)
            .and_then(|()| self.model.evaluate(self.test.as_ref()));
        stats.unwrap_or_else(|err| {
            tracing::error!(%err, "cannot evaluate global model");
            EvalStats::failed()
        })
    }
}

/// Writes `metrics.jsonl` / `metrics.csv` (the outcome) and `costs.jsonl`
/// / `costs.csv` (time and traffic) in a directory, one line per round,
/// flushed as each round completes. See [`fedveil_proto::metrics`].
pub struct MetricsFiles {
    metrics: (BufWriter<File>, BufWriter<File>),
    costs: (BufWriter<File>, BufWriter<File>),
    /// The directory the files are in.
    pub dir: PathBuf,
}

impl MetricsFiles {
    /// Creates (truncates) the four files in `dir`, with CSV headers.
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let open = |stem: &str, header: &str| -> std::io::Result<_> {
            let jsonl = BufWriter::new(File::create(dir.join(format!("{stem}.jsonl")))?);
            let mut csv = BufWriter::new(File::create(dir.join(format!("{stem}.csv")))?);
            writeln!(csv, "{header}")?;
            csv.flush()?;
            Ok((jsonl, csv))
        };
        Ok(Self {
            metrics: open("metrics", RoundMetrics::CSV_HEADER)?,
            costs: open("costs", RoundCosts::CSV_HEADER)?,
            dir: dir.to_owned(),
        })
    }

    /// Appends `m`'s line to each file and flushes.
    pub fn write(&mut self, m: &RoundMetrics) -> std::io::Result<()> {
        let costs = m.costs();
        append(&mut self.metrics, m, &m.csv_row())?;
        append(&mut self.costs, &costs, &costs.csv_row())
    }
}

fn append(
    (jsonl, csv): &mut (BufWriter<File>, BufWriter<File>),
    record: &impl serde::Serialize,
    csv_row: &str,
) -> std::io::Result<()> {
    serde_json::to_writer(&mut *jsonl, record)?;
    writeln!(jsonl)?;
    writeln!(csv, "{csv_row}")?;
    jsonl.flush()?;
    csv.flush()
}

/// Writes metrics files and passes everything on to another observer
/// (the `fedveil-server run` observer: logs, and files with `--out`).
pub struct ServerObserver {
    /// Where metrics go (none: only `inner` is told).
    pub files: Option<MetricsFiles>,
    /// Told every event and round too.
    pub inner: Box<dyn Observer>,
}

impl ServerObserver {
    /// Logs through `tracing` and writes `files`.
    pub fn logging(files: Option<MetricsFiles>) -> Self {
        Self {
            files,
            inner: Box::new(crate::driver::LogObserver),
        }
    }
}

impl Observer for ServerObserver {
    fn on_event(&mut self, event: &Event) {
        self.inner.on_event(event);
    }

    fn on_round(&mut self, m: &RoundMetrics, global_model: &[f32]) {
        self.inner.on_round(m, global_model);
        if let Some(files) = &mut self.files
            && let Err(err) = files.write(m)
        {
            tracing::error!(%err, dir = %files.dir.display(), "cannot write metrics");
        }
    }
}
