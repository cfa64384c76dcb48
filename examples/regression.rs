//! A regression of your own: a linear model predicting diabetes progression
//! (`sklearn/diabetes.csv`) from ten baseline measurements, federated over
//! eight clinics through SecAgg+. The model reports the task's metrics
//! with [`BatchMetrics::regression`], so the server's metrics are the test
//! MSE and MAE instead of an accuracy.
//!
//! ```sh
//! FEDVEIL_DATA=../shared/data cargo run --release -p fedveil-examples --example regression
//! ```

use std::sync::Arc;

// Burn's derives name `burn::`; the facade's re-export answers to it.
use fedveil::burn;
use fedveil::burn::data::dataloader::batcher::Batcher;
use fedveil::burn::data::dataset::{Dataset, InMemDataset};
use fedveil::burn::nn::{Linear, LinearConfig};
use fedveil::burn::prelude::*;
use fedveil::data::{CsvSpec, FeatureStats, Task, load_csv, resolve_data_dir};
use fedveil::model::{
    BatchMetrics, DataShape, Federated, FederatedModel, FlModel, ModelFactory, mean_squared_error,
};
use fedveil::settings::{Settings, Simulation};
use fedveil::sim::{Federation, QuietObserver, SimConfig, run_federation};
use fedveil::wire::LocalOptimizer;

const CLINICS: usize = 8;

/// One patient: standardised measurements, progression a year later.
#[derive(Debug, Clone)]
struct Record {
    measurements: Vec<f32>,
    progression: f32,
}

/// Linear regression, as a Burn module.
#[derive(Module, Debug)]
struct Linear1 {
    linear: Linear,
}

impl Linear1 {
    fn predict(&self, x: Tensor<2>) -> Tensor<1> {
        self.linear.forward(x).flatten(0, 1)
    }
}

struct RecordBatch {
    measurements: Tensor<2>,
    progression: Tensor<1>,
}

struct RecordBatcher;

impl Batcher<Record, RecordBatch> for RecordBatcher {
    fn batch(&self, records: Vec<Record>, device: &Device) -> RecordBatch {
        let (n, width) = (records.len(), records[0].measurements.len());
        let x: Vec<f32> = records
            .iter()
            .flat_map(|r| r.measurements.iter().copied())
            .collect();
        let y: Vec<f32> = records.iter().map(|r| r.progression).collect();
        RecordBatch {
            measurements: Tensor::from_data(TensorData::new(x, [n, width]), device),
            progression: Tensor::from_data(TensorData::new(y, [n]), device),
        }
    }
}

impl FederatedModel for Linear1 {
    type Batch = RecordBatch;

    fn train_step(&self, batch: RecordBatch) -> Tensor<1> {
        mean_squared_error(self.predict(batch.measurements), batch.progression)
    }

    fn eval_step(&self, batch: RecordBatch) -> BatchMetrics {
        BatchMetrics::regression(self.predict(batch.measurements), batch.progression)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let path = resolve_data_dir(None).join("sklearn/diabetes.csv");
    let spec = CsvSpec {
        label: "progression".into(),
        task: Task::Regression,
        ..CsvSpec::default()
    };
    let mut table = load_csv(&path, &spec)?;
    table.standardize(&FeatureStats::of(&table))?;
    let split = table.holdout(0.2, 1);
    let records = |data: &fedveil::data::Dataset| -> Vec<Record> {
        (0..data.len())
            .map(|i| Record {
                measurements: data.example(i).to_vec(),
                progression: data.targets[i],
            })
            .collect()
    };
    let mut clinics = vec![Vec::new(); CLINICS];
    for (i, record) in records(&split.train).into_iter().enumerate() {
        clinics[i % CLINICS].push(record);
    }
    let inputs = table.example_len();
    let federation = Federation {
        model: ModelFactory::new("linear", move |_: &DataShape, device: &Device| {
            let model = Federated::new(
                "linear",
                |device: &Device| Linear1 {
                    linear: LinearConfig::new(inputs, 1).init(device),
                },
                RecordBatcher,
                device,
            );
            Ok(Box::new(model) as Box<dyn FlModel<Record>>)
        }),
        shape: DataShape::of(&split.train),
        data: split.test.spec(),
        clients: clinics
            .into_iter()
            .map(|c| Arc::new(InMemDataset::new(c)) as Arc<dyn Dataset<Record>>)
            .collect(),
        test: Arc::new(InMemDataset::new(records(&split.test))),
        strategy: None,
    };
    // The targets stay in their units (25..346), so the predictions and
    // the reported errors are in them too.
    let cfg = SimConfig {
        sim: Simulation::default(),
        run: Settings {
            rounds: 30,
            lr: 0.02,
            local_optimizer: LocalOptimizer::Sgd,
            batch_size: 16,
            // SecAgg+ encodes each update value within +-secagg_clip; a
            // bias that moves by the targets' scale needs the room.
            secagg_clip: 200.0,
            seed: 1,
            ..Settings::default()
        },
    };
    let report = run_federation(&cfg, federation, &mut QuietObserver).await?;
    let failed = report.clients.iter().filter(|c| c.is_err()).count();
    anyhow::ensure!(failed == 0, "{failed} clinics failed: {:?}", report.clients);
    let metrics = &report.server.metrics;
    let (first, last) = (
        metrics
            .first()
            .ok_or_else(|| anyhow::anyhow!("no round completed"))?,
        metrics.last().expect("one round at least"),
    );
    println!(
        "linear regression, {CLINICS} clinics, SecAgg+: test MSE {:.1} (round 1: {:.1}), MAE {:.2}, R^2 {:.3}",
        last.mse.unwrap_or(f32::NAN),
        first.mse.unwrap_or(f32::NAN),
        last.mae.unwrap_or(f32::NAN),
        1.0 - f64::from(last.mse.unwrap_or(f32::NAN)) / variance(&split.test.targets)
    );
    Ok(())
}

/// The variance of the test targets (what predicting their mean scores).
fn variance(values: &[f32]) -> f64 {
    let n = values.len() as f64;
    let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    values
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n
}
