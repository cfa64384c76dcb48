//! Local training and evaluation for any Burn classifier, behind the
//! object-safe [`FlModel`] trait that the client and server use.

use burn::nn::loss::CrossEntropyLoss;
use burn::optim::{AdamConfig, GradientsParams, SgdConfig};
use burn::prelude::*;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha20Rng;

use super::flat::{ParamLayout, load_flat, to_flat};
use super::{ModelError, ModelSpec};
use crate::data::{Dataset, Shard};
use fedveil_proto::wire::LocalOptimizer;

/// Examples per batch when evaluating (no gradients, so larger is fine).
pub const EVAL_BATCH_SIZE: usize = 500;

/// Model inputs for one batch.
pub enum Inputs {
    /// `[batch, channels, height, width]`.
    Images(Tensor<4>),
    /// Token ids `[batch, seq]` (text datasets).
    Tokens(Tensor<2, Int>),
}

/// A Burn module that maps a batch to class logits `[batch, classes]`.
pub trait Classifier: Module + Sized + 'static {
    fn logits(&self, inputs: Inputs) -> Tensor<2>;

    /// The loss local training minimises: by default cross-entropy of
    /// [`Classifier::logits`] against the labels. A language model
    /// overrides it to predict every next token, not only the last.
    fn training_loss(
        &self,
        inputs: Inputs,
        labels: Tensor<1, Int>,
        loss: &CrossEntropyLoss,
    ) -> Tensor<1> {
        loss.forward(self.logits(inputs), labels)
    }

    /// Whether trailing padding columns may be cut from a token batch
    /// without changing any output (padding masked out everywhere). Short
    /// texts then cost their own length, not the longest allowed.
    fn ignores_trailing_padding(&self) -> bool {
        false
    }
}

/// What one local training run should do.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainPlan {
    pub epochs: u32,
    pub batch_size: usize,
    /// Stop after this many steps, even within an epoch.
    pub max_steps: Option<usize>,
    pub learning_rate: f64,
    /// Seeds minibatch shuffling; callers mix in round and client.
    pub shuffle_seed: u64,
    /// FedProx weight mu (0: off).
    pub prox_mu: f64,
    pub optimizer: LocalOptimizer,
}

/// Outcome of local training.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainStats {
    /// Examples in the shard (the FedAvg weight).
    pub examples: usize,
    pub steps: usize,
    /// Mean loss over the last epoch (the steps of it that ran).
    pub last_epoch_loss: f32,
}

/// Loss and accuracy over a set of examples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalStats {
    pub examples: usize,
    pub loss: f32,
    pub accuracy: f32,
}

/// A trainable model as seen by the federated code: parameters in and out as
/// flat vectors, train on a shard, evaluate on a shard.
pub trait FlModel: Send {
    fn spec(&self) -> &ModelSpec;
    fn layout(&self) -> &ParamLayout;
    fn params(&self) -> Vec<f32>;
    fn set_params(&mut self, values: &[f32]) -> Result<(), ModelError>;
    fn train(&mut self, shard: &Shard, plan: &TrainPlan) -> Result<TrainStats, ModelError>;
    fn evaluate(&self, shard: &Shard) -> EvalStats;
    /// Writes the parameters as safetensors in PyTorch's layout (named by
    /// module path, linear weights `[out, in]`).
    fn save_safetensors(&self, path: &std::path::Path) -> Result<(), ModelError>;
    /// Reads parameters written by [`FlModel::save_safetensors`].
    fn load_safetensors(&mut self, path: &std::path::Path) -> Result<(), ModelError>;
}

/// [`FlModel`] for any [`Classifier`].
pub struct BurnClassifier<M: Classifier> {
    model: M,
    /// Autodiff-enabled device the parameters live on.
    device: Device,
    spec: ModelSpec,
    layout: ParamLayout,
}

impl<M: Classifier> BurnClassifier<M> {
    /// Wraps a model initialised on `device` (autodiff is turned on here).
    pub fn new(name: &str, init: impl FnOnce(&Device) -> M, device: &Device) -> Self {
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
            device,
            spec,
            layout,
        }
    }

    pub fn module(&self) -> &M {
        &self.model
    }

    fn batch(
        &self,
        data: &Dataset,
        indices: &[usize],
        device: &Device,
    ) -> (Inputs, Tensor<1, Int>) {
        let mut d = data.example_len();
        if data.vocab_size > 0 && self.model.ignores_trailing_padding() {
            d = indices
                .iter()
                .map(|&i| unpadded_len(data.example(i)))
                .max()
                .unwrap_or(0)
                .max(1);
        }
        let mut features = Vec::with_capacity(indices.len() * d);
        for &i in indices {
            features.extend_from_slice(&data.example(i)[..d]);
        }
        let mut shape = vec![indices.len()];
        shape.extend_from_slice(&data.example_shape);
        let labels: Vec<i32> = indices.iter().map(|&i| data.labels[i] as i32).collect();
        let y = Tensor::<1, Int>::from_data(TensorData::new(labels, [indices.len()]), device);
        let x = if data.vocab_size > 0 {
            // Token ids are stored as exact f32s.
            let ids: Vec<i32> = features.iter().map(|&v| v as i32).collect();
            Inputs::Tokens(Tensor::<2, Int>::from_data(
                TensorData::new(ids, [indices.len(), d]),
                device,
            ))
        } else {
            Inputs::Images(Tensor::<4>::from_data(
                TensorData::new(features, shape),
                device,
            ))
        };
        (x, y)
    }
}

/// Length of a token sequence without its trailing padding.
fn unpadded_len(tokens: &[f32]) -> usize {
    tokens
        .iter()
        .rposition(|&t| t != crate::data::text::PAD as f32)
        .map_or(0, |last| last + 1)
}

impl<M: Classifier> FlModel for BurnClassifier<M> {
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

    fn train(&mut self, shard: &Shard, plan: &TrainPlan) -> Result<TrainStats, ModelError> {
        if plan.batch_size == 0 {
            return Err(ModelError::InvalidPlan(
                "batch size must be at least 1".into(),
            ));
        }
        if plan.max_steps == Some(0) {
            return Err(ModelError::InvalidPlan(
                "max steps must be at least 1".into(),
            ));
        }
        if !(plan.learning_rate > 0.0 && plan.learning_rate.is_finite()) {
            return Err(ModelError::InvalidPlan(format!(
                "learning rate {} must be positive",
                plan.learning_rate
            )));
        }
        if !(plan.prox_mu >= 0.0 && plan.prox_mu.is_finite()) {
            return Err(ModelError::InvalidPlan(format!(
                "proximal weight mu {} must be non-negative",
                plan.prox_mu
            )));
        }
        let loss_fn = CrossEntropyLoss::new(None, &self.device);
        let mut optim = match plan.optimizer {
            LocalOptimizer::Sgd => SgdConfig::new().init(),
            // PyTorch's epsilon (Burn defaults to 1e-5).
            LocalOptimizer::Adam => AdamConfig::new().with_epsilon(1e-8).init(),
        };
        let mut rng = ChaCha20Rng::seed_from_u64(plan.shuffle_seed);
        let mut order = shard.indices.clone();
        let mut model = self.model.clone();
        // FedProx by proximal gradient steps: after each optimizer step, the exact
        // proximal map of (mu / 2) ||w - anchor||^2 with step size lr,
        // w <- anchor + (w - anchor) / (1 + lr mu).
        let anchor = (plan.prox_mu > 0.0).then(|| to_flat(&model));
        let shrink = (1.0 / (1.0 + plan.learning_rate * plan.prox_mu)) as f32;
        let (mut steps, mut last_epoch_loss) = (0, f32::NAN);
        let max_steps = plan.max_steps.unwrap_or(usize::MAX);
        for _ in 0..plan.epochs {
            if steps >= max_steps {
                break;
            }
            order.shuffle(&mut rng);
            let (mut loss_sum, mut seen) = (0.0f64, 0usize);
            for batch in order.chunks(plan.batch_size).take(max_steps - steps) {
                let (x, y) = self.batch(&shard.data, batch, &self.device);
                let loss = model.training_loss(x, y, &loss_fn);
                loss_sum += f64::from(loss.clone().into_scalar::<f32>()) * batch.len() as f64;
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
                seen += batch.len();
            }
            last_epoch_loss = (loss_sum / seen.max(1) as f64) as f32;
        }
        if !last_epoch_loss.is_finite() && plan.epochs > 0 && !order.is_empty() {
            return Err(ModelError::Diverged(last_epoch_loss));
        }
        self.model = model;
        Ok(TrainStats {
            examples: shard.len(),
            steps,
            last_epoch_loss,
        })
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

    fn evaluate(&self, shard: &Shard) -> EvalStats {
        let model = self.model.valid();
        let device = self.device.clone().inner();
        let loss_fn = CrossEntropyLoss::new(None, &device);
        let (mut loss_sum, mut correct) = (0.0f64, 0i64);
        for batch in shard.indices.chunks(EVAL_BATCH_SIZE) {
            let (x, y) = self.batch(&shard.data, batch, &device);
            let logits = model.logits(x);
            let loss = loss_fn.forward(logits.clone(), y.clone());
            loss_sum += f64::from(loss.into_scalar::<f32>()) * batch.len() as f64;
            let pred = logits.argmax(1).squeeze_dim::<1>(1);
            correct += pred.equal(y).int().sum().into_scalar::<i64>();
        }
        let n = shard.len().max(1) as f64;
        EvalStats {
            examples: shard.len(),
            loss: (loss_sum / n) as f32,
            accuracy: (correct as f64 / n) as f32,
        }
    }
}
