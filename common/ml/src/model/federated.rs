//! The contract between a user's Burn model and fedveil.
//!
//! A model takes part in federated training by implementing
//! [`FederatedModel`] on its own batch type, in the spirit of Burn's
//! `TrainStep`/`ValidStep`: a training step that returns the loss, an
//! evaluation step that returns the batch's metrics. A Burn [`Batcher`]
//! turns the items of a Burn [`Dataset`] into that batch type. Everything
//! else is the framework's and applies unchanged to any model: the flat
//! parameter vector (deltas, clipping, noise, masking, server optimizers,
//! checkpoints), the local optimizer and FedProx, shuffling, step caps and
//! safetensors export, behind the object-safe [`FlModel`] that the client,
//! the server and simulations hold.
//!
//! ```
//! use burn::data::dataloader::batcher::Batcher;
//! use burn::nn::{Linear, LinearConfig};
//! use burn::prelude::*;
//! use fedveil_ml::model::{BatchMetrics, Federated, FederatedModel, FlModel, cross_entropy};
//!
//! /// The user's model: any Burn module.
//! #[derive(Module, Debug)]
//! struct Logistic {
//!     linear: Linear,
//! }
//!
//! /// The user's batch type.
//! struct Batch {
//!     features: Tensor<2>,
//!     labels: Tensor<1, Int>,
//! }
//!
//! impl FederatedModel for Logistic {
//!     type Batch = Batch;
//!
//!     fn train_step(&self, batch: Batch) -> Tensor<1> {
//!         cross_entropy(self.linear.forward(batch.features), batch.labels)
//!     }
//!
//!     fn eval_step(&self, batch: Batch) -> BatchMetrics {
//!         let logits = self.linear.forward(batch.features);
//!         BatchMetrics::classification(logits, batch.labels)
//!     }
//! }
//!
//! /// The user's batcher, from items `([f32; 2], class)`.
//! struct PairBatcher;
//!
//! impl Batcher<([f32; 2], i32), Batch> for PairBatcher {
//!     fn batch(&self, items: Vec<([f32; 2], i32)>, device: &Device) -> Batch {
//!         let n = items.len();
//!         let x: Vec<f32> = items.iter().flat_map(|(x, _)| *x).collect();
//!         let y: Vec<i32> = items.iter().map(|(_, y)| *y).collect();
//!         Batch {
//!             features: Tensor::from_data(TensorData::new(x, [n, 2]), device),
//!             labels: Tensor::from_data(TensorData::new(y, [n]), device),
//!         }
//!     }
//! }
//!
//! let device = Device::flex();
//! let model = Federated::new(
//!     "logistic",
//!     |device: &Device| Logistic { linear: LinearConfig::new(2, 2).init(device) },
//!     PairBatcher,
//!     &device,
//! );
//! // Two parameters per input and class, plus a bias per class.
//! assert_eq!(model.spec().param_count, 6);
//! let data = burn::data::dataset::InMemDataset::new(vec![([0.0, 1.0], 1), ([1.0, 0.0], 0)]);
//! assert_eq!(model.evaluate(&data)?.examples, 2);
//! # Ok::<(), fedveil_ml::model::ModelError>(())
//! ```

use std::marker::PhantomData;
use std::sync::Arc;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::optim::{AdamConfig, GradientsParams, SgdConfig};
use burn::prelude::*;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha20Rng;

use super::flat::{ParamLayout, load_flat, to_flat};
use super::{DataShape, ModelError, ModelSpec};
use fedveil_proto::metrics::TaskScores;
use fedveil_proto::wire::LocalOptimizer;

/// Examples per batch when evaluating (no gradients, so larger is fine).
pub const EVAL_BATCH_SIZE: usize = 500;

/// A Burn module fedveil can federate: one training step and one
/// evaluation step on the model's own batch type.
pub trait FederatedModel: Module + 'static {
    /// One minibatch, as the model's [`Batcher`] builds it.
    type Batch;

    /// The loss local training minimises on `batch`: a one-element tensor,
    /// the mean over the batch.
    fn train_step(&self, batch: Self::Batch) -> Tensor<1>;

    /// What the model scores on `batch`; called on the model without
    /// autodiff ([`Module::valid`]). Build it with
    /// [`BatchMetrics::classification`] or [`BatchMetrics::regression`].
    fn eval_step(&self, batch: Self::Batch) -> BatchMetrics;
}

/// Mean cross-entropy of class `logits` `[batch, classes]` against
/// `labels` `[batch]`: the training loss of a classifier.
pub fn cross_entropy(logits: Tensor<2>, labels: Tensor<1, Int>) -> Tensor<1> {
    burn::nn::loss::CrossEntropyLossConfig::new()
        .init(&logits.device())
        .forward(logits, labels)
}

/// Mean squared error of `predictions` against `targets` (both `[batch]`):
/// the training loss of a regression.
pub fn mean_squared_error(predictions: Tensor<1>, targets: Tensor<1>) -> Tensor<1> {
    (predictions - targets).powi_scalar(2).mean()
}

/// What one evaluation batch scored, as sums over its examples, so that
/// batches of any size add up exactly. A classification counts correct
/// predictions; a regression sums squared and absolute errors.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[non_exhaustive]
pub struct BatchMetrics {
    /// Examples in the batch.
    pub examples: usize,
    /// Sum of the per-example loss.
    pub loss_sum: f64,
    /// Classification: correctly classified examples.
    pub correct: Option<u64>,
    /// Regression: sum of squared errors.
    pub squared_error_sum: Option<f64>,
    /// Regression: sum of absolute errors.
    pub absolute_error_sum: Option<f64>,
}

impl BatchMetrics {
    /// Cross-entropy and accuracy of class `logits` `[batch, classes]`
    /// against `labels` `[batch]`.
    pub fn classification(logits: Tensor<2>, labels: Tensor<1, Int>) -> Self {
        let [examples, _] = logits.dims();
        let loss = cross_entropy(logits.clone(), labels.clone());
        let predicted = logits.argmax(1).squeeze_dim::<1>(1);
        Self {
            examples,
            loss_sum: f64::from(loss.into_scalar::<f32>()) * examples as f64,
            correct: Some(predicted.equal(labels).int().sum().into_scalar::<i64>() as u64),
            ..Self::default()
        }
    }

    /// Squared and absolute errors of `predictions` against `targets`
    /// (both `[batch]`); the loss is the squared error.
    pub fn regression(predictions: Tensor<1>, targets: Tensor<1>) -> Self {
        let [examples] = predictions.dims();
        let error = predictions - targets;
        let squared = f64::from(error.clone().powi_scalar(2).sum().into_scalar::<f32>());
        let absolute = f64::from(error.abs().sum().into_scalar::<f32>());
        Self {
            examples,
            loss_sum: squared,
            correct: None,
            squared_error_sum: Some(squared),
            absolute_error_sum: Some(absolute),
        }
    }

    fn add(&mut self, other: &Self) {
        fn sum<T: std::ops::Add<Output = T>>(a: Option<T>, b: Option<T>) -> Option<T> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a + b),
                (a, b) => a.or(b),
            }
        }
        self.examples += other.examples;
        self.loss_sum += other.loss_sum;
        self.correct = sum(self.correct, other.correct);
        self.squared_error_sum = sum(self.squared_error_sum, other.squared_error_sum);
        self.absolute_error_sum = sum(self.absolute_error_sum, other.absolute_error_sum);
    }
}

/// What one local training run should do.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainPlan {
    /// Passes over the local data.
    pub epochs: u32,
    /// Examples per minibatch.
    pub batch_size: usize,
    /// Stop after this many steps, even within an epoch.
    pub max_steps: Option<usize>,
    /// Local learning rate.
    pub learning_rate: f64,
    /// Seeds minibatch shuffling; callers mix in round and client.
    pub shuffle_seed: u64,
    /// FedProx weight mu (0: off).
    pub prox_mu: f64,
    /// The local optimizer.
    pub optimizer: LocalOptimizer,
}

impl TrainPlan {
    fn validate(&self) -> Result<(), ModelError> {
        let invalid = |reason: String| Err(ModelError::InvalidPlan(reason));
        if self.batch_size == 0 {
            return invalid("batch size must be at least 1".into());
        }
        if self.max_steps == Some(0) {
            return invalid("max steps must be at least 1".into());
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return invalid(format!(
                "learning rate {} must be positive",
                self.learning_rate
            ));
        }
        if !(self.prox_mu >= 0.0 && self.prox_mu.is_finite()) {
            return invalid(format!(
                "proximal weight mu {} must be non-negative",
                self.prox_mu
            ));
        }
        Ok(())
    }
}

/// Outcome of local training.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainStats {
    /// Examples trained on (the FedAvg weight).
    pub examples: usize,
    /// Optimizer steps taken.
    pub steps: usize,
    /// Mean loss over the last epoch (the steps of it that ran).
    pub last_epoch_loss: f32,
}

/// Loss and the task's scores over a set of examples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalStats {
    /// Examples evaluated.
    pub examples: usize,
    /// Mean loss.
    pub loss: f32,
    /// Accuracy for a classification; MSE and MAE for a regression.
    pub scores: TaskScores,
}

impl EvalStats {
    /// What an evaluation that could not run reports: no examples, a NaN
    /// loss, no scores.
    pub fn failed() -> Self {
        Self {
            examples: 0,
            loss: f32::NAN,
            scores: TaskScores::default(),
        }
    }

    /// Classification accuracy (`None` for a regression).
    pub fn accuracy(&self) -> Option<f32> {
        self.scores.accuracy
    }
}

impl From<BatchMetrics> for EvalStats {
    fn from(m: BatchMetrics) -> Self {
        let n = m.examples.max(1) as f64;
        let mean = |sum: Option<f64>| sum.map(|s| (s / n) as f32);
        Self {
            examples: m.examples,
            loss: (m.loss_sum / n) as f32,
            scores: TaskScores {
                accuracy: mean(m.correct.map(|c| c as f64)),
                mse: mean(m.squared_error_sum),
                mae: mean(m.absolute_error_sum),
            },
        }
    }
}

/// A trainable model as the federated code sees it, over items of type
/// `I`: parameters in and out as one flat vector, training and evaluation
/// on a Burn [`Dataset`]. Object-safe, so drivers hold any model.
pub trait FlModel<I>: Send {
    /// The model's name, parameter count and shape signature.
    fn spec(&self) -> &ModelSpec;
    /// Where each tensor sits in the flat parameter vector.
    fn layout(&self) -> &ParamLayout;
    /// All parameters, flattened in layout order.
    fn params(&self) -> Vec<f32>;
    /// Replaces all parameters from a flat vector in layout order.
    fn set_params(&mut self, values: &[f32]) -> Result<(), ModelError>;
    /// Trains on `data` as `plan` says, from the current parameters.
    fn train(&mut self, data: &dyn Dataset<I>, plan: &TrainPlan) -> Result<TrainStats, ModelError>;
    /// Scores the current parameters on all of `data`.
    fn evaluate(&self, data: &dyn Dataset<I>) -> Result<EvalStats, ModelError>;
    /// Writes the parameters as safetensors in PyTorch's layout (named by
    /// module path, linear weights `[out, in]`).
    fn save_safetensors(&self, path: &std::path::Path) -> Result<(), ModelError>;
    /// Reads parameters written by [`FlModel::save_safetensors`].
    fn load_safetensors(&mut self, path: &std::path::Path) -> Result<(), ModelError>;
}

/// [`FlModel`] for any [`FederatedModel`] `M` fed by the batcher `B` from
/// items `I`.
pub struct Federated<M, B, I> {
    model: M,
    batcher: B,
    /// Autodiff-enabled device the parameters live on.
    device: Device,
    spec: ModelSpec,
    layout: ParamLayout,
    items: PhantomData<fn(I)>,
}

impl<M, B, I> Federated<M, B, I>
where
    M: FederatedModel,
    B: Batcher<I, M::Batch>,
{
    /// Builds the model with `init` on `device` (with autodiff turned on)
    /// under `name`, which peers compare along with the parameter layout.
    pub fn new(name: &str, init: impl FnOnce(&Device) -> M, batcher: B, device: &Device) -> Self {
        let device = device.clone().autodiff();
        let model = init(&device);
        let layout = ParamLayout::of(&model);
        let spec = ModelSpec {
            name: name.to_owned(),
            param_count: layout.param_count() as u64,
            shape_signature: layout.signature(),
        };
        Self {
            model,
            batcher,
            device,
            spec,
            layout,
            items: PhantomData,
        }
    }

    /// The Burn module itself.
    pub fn module(&self) -> &M {
        &self.model
    }
}

/// The items at `positions` of `data`.
fn items<I>(data: &dyn Dataset<I>, positions: &[usize]) -> Result<Vec<I>, ModelError> {
    positions
        .iter()
        .map(|&i| data.get(i).map_err(|e| ModelError::Data(e.to_string())))
        .collect()
}

impl<M, B, I> FlModel<I> for Federated<M, B, I>
where
    M: FederatedModel,
    B: Batcher<I, M::Batch>,
{
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    fn params(&self) -> Vec<f32> {
        to_flat(&self.model)
    }

    fn set_params(&mut self, values: &[f32]) -> Result<(), ModelError> {
        if values.len() as u64 != self.spec.param_count {
            return Err(ModelError::WrongLength {
                got: values.len(),
                expected: self.spec.param_count as usize,
            });
        }
        self.model = load_flat(self.model.clone(), values);
        Ok(())
    }

    fn train(&mut self, data: &dyn Dataset<I>, plan: &TrainPlan) -> Result<TrainStats, ModelError> {
        plan.validate()?;
        let mut optim = match plan.optimizer {
            LocalOptimizer::Sgd => SgdConfig::new().init(),
            // PyTorch's epsilon (Burn defaults to 1e-5).
            LocalOptimizer::Adam => AdamConfig::new().with_epsilon(1e-8).init(),
        };
        let mut rng = ChaCha20Rng::seed_from_u64(plan.shuffle_seed);
        let mut order: Vec<usize> = (0..data.len()).collect();
        let mut model = self.model.clone();
        // FedProx by proximal gradient steps: after each optimizer step,
        // the exact proximal map of (mu / 2) ||w - anchor||^2 with step
        // size lr, w <- anchor + (w - anchor) / (1 + lr mu).
        let anchor = (plan.prox_mu > 0.0).then(|| to_flat(&model));
        let shrink = (1.0 / (1.0 + plan.learning_rate * plan.prox_mu)) as f32;
        let (mut steps, mut last_epoch_loss) = (0, f32::NAN);
        let max_steps = plan.max_steps.unwrap_or(usize::MAX);
        for _ in 0..plan.epochs {
            if steps >= max_steps {
                break;
            }
            order.shuffle(&mut rng);
            // Summed on the device and read once per epoch: a read-back per
            // step would make a GPU wait for every step before queueing the next.
            let (mut loss_sum, mut seen) = (None::<Tensor<1>>, 0usize);
            for positions in order.chunks(plan.batch_size).take(max_steps - steps) {
                let batch = self.batcher.batch(items(data, positions)?, &self.device);
                let loss = model.train_step(batch);
                let weighted = loss.clone().detach() * positions.len() as f32;
                loss_sum = Some(match loss_sum {
                    Some(sum) => sum + weighted,
                    None => weighted,
                });
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                model = optim.step(plan.learning_rate, model, grads);
                if let Some(anchor) = &anchor {
                    let mut w = to_flat(&model);
                    for (w, a) in w.iter_mut().zip(anchor) {
                        *w = a + (*w - a) * shrink;
                    }
                    model = load_flat(model, &w);
                }
                steps += 1;
                seen += positions.len();
            }
            last_epoch_loss =
                loss_sum.map_or(0.0, |sum| sum.into_scalar::<f32>() / seen.max(1) as f32);
        }
        if !last_epoch_loss.is_finite() && plan.epochs > 0 && !order.is_empty() {
            return Err(ModelError::Diverged(last_epoch_loss));
        }
        self.model = model;
        Ok(TrainStats {
            examples: data.len(),
            steps,
            last_epoch_loss,
        })
    }

    fn evaluate(&self, data: &dyn Dataset<I>) -> Result<EvalStats, ModelError> {
        let model = self.model.valid();
        let device = self.device.clone().inner();
        let positions: Vec<usize> = (0..data.len()).collect();
        let mut total = BatchMetrics::default();
        for chunk in positions.chunks(EVAL_BATCH_SIZE) {
            let batch = self.batcher.batch(items(data, chunk)?, &device);
            total.add(&model.eval_step(batch));
        }
        Ok(total.into())
    }

    fn save_safetensors(&self, path: &std::path::Path) -> Result<(), ModelError> {
        use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot, SafetensorsStore};
        // PyTorch's layout (linear weights [out, in]), so the file loads
        // into the equivalent torch module as it is.
        let mut store = SafetensorsStore::from_file(path)
            .overwrite(true)
            .with_to_adapter(BurnToPyTorchAdapter)
            .metadata("fedveil_model", self.spec.name.clone());
        self.model
            .save_into(&mut store)
            .map_err(|e| ModelError::Store(format!("{}: {e}", path.display())))
    }

    fn load_safetensors(&mut self, path: &std::path::Path) -> Result<(), ModelError> {
        use burn::store::{ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore};
        let mut store = SafetensorsStore::from_file(path).with_from_adapter(PyTorchToBurnAdapter);
        let mut model = self.model.clone();
        model
            .load_from(&mut store)
            .map_err(|e| ModelError::Store(format!("{}: {e}", path.display())))?;
        self.model = model;
        Ok(())
    }
}

/// The signature of a model factory: a model for data of a shape, on a
/// device.
type Build<I> =
    dyn Fn(&DataShape, &Device) -> Result<Box<dyn FlModel<I>>, ModelError> + Send + Sync;

/// Builds a model for data of a given shape: how a node, the server and a
/// simulation each make their own instance of the same model. Built-in
/// models come from [`builtin`](super::builtin); a user's model from
/// [`ModelFactory::new`].
pub struct ModelFactory<I> {
    name: String,
    build: Arc<Build<I>>,
}

impl<I> Clone for ModelFactory<I> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            build: Arc::clone(&self.build),
        }
    }
}

impl<I> std::fmt::Debug for ModelFactory<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelFactory")
            .field("name", &self.name)
            .finish()
    }
}

impl<I: 'static> ModelFactory<I> {
    /// A factory named `name` (for messages; peers compare the built
    /// model's [`ModelSpec`]) that builds with `build`.
    pub fn new<F>(name: &str, build: F) -> Self
    where
        F: Fn(&DataShape, &Device) -> Result<Box<dyn FlModel<I>>, ModelError>
            + Send
            + Sync
            + 'static,
    {
        Self {
            name: name.to_owned(),
            build: Arc::new(build),
        }
    }

    /// The factory's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A fresh, randomly initialised instance for data of `shape`.
    pub fn build(
        &self,
        shape: &DataShape,
        device: &Device,
    ) -> Result<Box<dyn FlModel<I>>, ModelError> {
        (self.build)(shape, device)
    }
}
