//! A multilayer perceptron for tabular data (and flattened images):
//! `layers` hidden layers of `hidden` units with ReLU, then a linear head:
//! one logit per class for a classification, one value for a regression
//! (`num_classes` 0), trained on cross-entropy or on squared error.

use burn::nn::{Linear, LinearConfig, Relu};
use burn::prelude::*;

use super::dense::{DenseBatch, Inputs};
use super::federated::{BatchMetrics, FederatedModel, cross_entropy, mean_squared_error};
use super::{OptionError, size_options};

/// The built-in multilayer perceptron for tabular data.
#[derive(Config, Debug)]
pub struct MlpConfig {
    /// Input features per example.
    pub inputs: usize,
    /// Classes of a classification; 0 for a regression (one output).
    pub num_classes: usize,
    /// Units per hidden layer.
    #[config(default = 64)]
    pub hidden: usize,
    /// Hidden layers.
    #[config(default = 2)]
    pub layers: usize,
}

/// The built-in MLP (see [`MlpConfig`]).
#[derive(Module, Debug)]
pub struct Mlp {
    hidden: Vec<Linear>,
    head: Linear,
    relu: Relu,
}

impl MlpConfig {
    /// A freshly initialised MLP on `device`.
    pub fn init(&self, device: &Device) -> Mlp {
        let widths =
            std::iter::once(self.inputs).chain(std::iter::repeat_n(self.hidden, self.layers));
        let hidden = widths
            .clone()
            .zip(widths.skip(1))
            .map(|(i, o)| LinearConfig::new(i, o).init(device))
            .collect();
        let last = if self.layers == 0 {
            self.inputs
        } else {
            self.hidden
        };
        Mlp {
            hidden,
            head: LinearConfig::new(last, self.num_classes.max(1)).init(device),
            relu: Relu::new(),
        }
    }

    /// Applies `hidden=N,layers=L` options (the part of a model name after
    /// the colon).
    pub fn with_options(mut self, options: &str) -> Result<Self, OptionError> {
        for (key, value) in size_options(options)? {
            match key {
                "hidden" if value > 0 => self.hidden = value,
                "layers" => self.layers = value,
                _ => {
                    return Err(OptionError(format!(
                        "unknown or invalid option {key}={value} (hidden=N > 0, layers=L)"
                    )));
                }
            }
        }
        Ok(self)
    }
}

impl Mlp {
    /// Class logits `[batch, classes]` of feature rows `[batch, features]`.
    pub fn forward(&self, features: Tensor<2>) -> Tensor<2> {
        let x = self
            .hidden
            .iter()
            .fold(features, |x, layer| self.relu.forward(layer.forward(x)));
        self.head.forward(x)
    }

    fn logits(&self, inputs: Inputs) -> Tensor<2> {
        match inputs {
            Inputs::Features(x) => self.forward(x),
            Inputs::Images(x) => self.forward(x.flatten::<2>(1, 3)),
            // The factory builds the MLP for numeric data only.
            Inputs::Tokens(_) => unreachable!("the MLP takes numeric features"),
        }
    }
}

impl FederatedModel for Mlp {
    type Batch = DenseBatch;

    fn train_step(&self, batch: DenseBatch) -> Tensor<1> {
        let outputs = self.logits(batch.inputs);
        match batch.targets {
            Some(targets) => mean_squared_error(outputs.flatten(0, 1), targets),
            None => cross_entropy(outputs, batch.labels),
        }
    }

    fn eval_step(&self, batch: DenseBatch) -> BatchMetrics {
        let outputs = self.logits(batch.inputs);
        match batch.targets {
            Some(targets) => BatchMetrics::regression(outputs.flatten(0, 1), targets),
            None => BatchMetrics::classification(outputs, batch.labels),
        }
    }
}
