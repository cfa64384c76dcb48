//! Your own Burn model on your own data, federated through SecAgg+ with
//! differential privacy.
//!
//! Ten hospitals each hold some of the Wisconsin breast cancer patients
//! (`sklearn/breast_cancer.csv` in the data directory). They train a model
//! written here, on a record type and a batcher written here, through
//! fedveil. Nothing in fedveil knows this model: it implements
//! [`FederatedModel`], and the framework does the rest (flattening, deltas,
//! clipping, distributed DP noise, SecAgg+ masking, the server step, the
//! privacy ledger), over real QUIC with mutual TLS on loopback.
//!
//! ```sh
//! FEDVEIL_DATA=../shared/data cargo run --release -p fedveil-examples --example own_model
//! ```

use std::sync::Arc;

// Burn's derives name `burn::`; the facade's re-export answers to it.
use fedveil::burn;
use fedveil::burn::data::dataloader::batcher::Batcher;
use fedveil::burn::data::dataset::{Dataset, InMemDataset};
use fedveil::burn::nn::{Linear, LinearConfig, Relu};
use fedveil::burn::prelude::*;
use fedveil::data::{CsvSpec, FeatureStats, load_csv, resolve_data_dir};
use fedveil::model::{
    BatchMetrics, DataShape, Federated, FederatedModel, FlModel, ModelFactory, cross_entropy,
};
use fedveil::settings::{Settings, Simulation};
use fedveil::sim::{Federation, QuietObserver, SimConfig, run_federation};

/// Hospitals in the federation.
const HOSPITALS: usize = 10;

/// One patient as a hospital keeps it: standardised measurements and the
/// diagnosis.
#[derive(Debug, Clone)]
struct Patient {
    measurements: Vec<f32>,
    malignant: bool,
}

/// The model: one hidden layer, two logits. (No dropout: its draws come
/// from Burn's own generator, not the run's seed, and the example's figure
/// should reproduce.)
#[derive(Module, Debug)]
struct Diagnosis {
    hidden: Linear,
    relu: Relu,
    output: Linear,
}

impl Diagnosis {
    fn new(inputs: usize, device: &Device) -> Self {
        Self {
            hidden: LinearConfig::new(inputs, 32).init(device),
            relu: Relu::new(),
            output: LinearConfig::new(32, 2).init(device),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.output
            .forward(self.relu.forward(self.hidden.forward(x)))
    }
}

/// A batch of patients, as the model takes it.
struct PatientBatch {
    measurements: Tensor<2>,
    malignant: Tensor<1, Int>,
}

struct PatientBatcher;

impl Batcher<Patient, PatientBatch> for PatientBatcher {
    fn batch(&self, patients: Vec<Patient>, device: &Device) -> PatientBatch {
        let (n, width) = (patients.len(), patients[0].measurements.len());
        let x: Vec<f32> = patients
            .iter()
            .flat_map(|p| p.measurements.iter().copied())
            .collect();
        let y: Vec<i32> = patients.iter().map(|p| i32::from(p.malignant)).collect();
        PatientBatch {
            measurements: Tensor::from_data(TensorData::new(x, [n, width]), device),
            malignant: Tensor::from_data(TensorData::new(y, [n]), device),
        }
    }
}

/// What makes the model federated: a training step and an evaluation step.
impl FederatedModel for Diagnosis {
    type Batch = PatientBatch;

    fn train_step(&self, batch: PatientBatch) -> Tensor<1> {
        cross_entropy(self.forward(batch.measurements), batch.malignant)
    }

    fn eval_step(&self, batch: PatientBatch) -> BatchMetrics {
        BatchMetrics::classification(self.forward(batch.measurements), batch.malignant)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The table, standardised with statistics every party shares (here of
    // the whole table, as from reference data), then 20% held out for the
    // server's test set.
    let path = resolve_data_dir(None).join("sklearn/breast_cancer.csv");
    let spec = CsvSpec {
        label: "diagnosis".into(),
        classes: Some(vec!["benign".into(), "malignant".into()]),
        ..CsvSpec::default()
    };
    let mut table = load_csv(&path, &spec)?;
    table.standardize(&FeatureStats::of(&table))?;
    let split = table.holdout(0.2, 1);
    let patients = |data: &fedveil::data::Dataset| -> Vec<Patient> {
        (0..data.len())
            .map(|i| Patient {
                measurements: data.example(i).to_vec(),
                malignant: data.labels[i] == 1,
            })
            .collect()
    };
    let mut hospitals = vec![Vec::new(); HOSPITALS];
    for (i, patient) in patients(&split.train).into_iter().enumerate() {
        hospitals[i % HOSPITALS].push(patient);
    }
    let inputs = table.example_len();
    let federation = Federation {
        model: ModelFactory::new("diagnosis", move |_shape: &DataShape, device: &Device| {
            let model = Federated::new(
                "diagnosis",
                |device: &Device| Diagnosis::new(inputs, device),
                PatientBatcher,
                device,
            );
            Ok(Box::new(model) as Box<dyn FlModel<Patient>>)
        }),
        shape: DataShape::of(&split.train),
        data: split.test.spec(),
        clients: hospitals
            .into_iter()
            .map(|h| Arc::new(InMemDataset::new(h)) as Arc<dyn Dataset<Patient>>)
            .collect(),
        test: Arc::new(InMemDataset::new(patients(&split.test))),
        strategy: None,
    };

    // Five rounds through SecAgg+ (on by default) with distributed DP at
    // epsilon 8: the noise ten hospitals add is large next to their
    // clipped updates, so more rounds would cost accuracy, not buy it.
    let cfg = SimConfig {
        sim: Simulation::default(),
        run: Settings {
            rounds: 5,
            lr: 0.1,
            target_epsilon: Some(8.0),
            seed: 1,
            ..Settings::default()
        },
    };
    let report = run_federation(&cfg, federation, &mut QuietObserver).await?;
    let failed = report.clients.iter().filter(|c| c.is_err()).count();
    anyhow::ensure!(
        failed == 0,
        "{failed} hospitals failed: {:?}",
        report.clients
    );
    for m in &report.server.metrics {
        println!(
            "round {}: {}  loss {:.4}  epsilon {:.2}  secure {}",
            m.round,
            m.score_text(),
            m.loss,
            m.epsilon.unwrap_or(0.0),
            m.secure
        );
    }
    let last = report
        .server
        .metrics
        .last()
        .ok_or_else(|| anyhow::anyhow!("no round completed"))?;
    println!(
        "own model, {HOSPITALS} hospitals, SecAgg+ and DP: test accuracy {:.4} at epsilon {:.2} (delta 1e-5)",
        last.accuracy.unwrap_or(f32::NAN),
        last.epsilon.unwrap_or(f64::NAN)
    );
    Ok(())
}
