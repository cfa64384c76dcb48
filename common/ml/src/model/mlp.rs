//! A multilayer perceptron for tabular data (and flattened images):
//! `layers` hidden layers of `hidden` units with ReLU, then a linear head.

use burn::nn::{Linear, LinearConfig, Relu};
use burn::prelude::*;

use super::dense::{DenseBatch, Inputs};
use super::federated::{BatchMetrics, FederatedModel, cross_entropy};
use super::{OptionError, size_options};

#[derive(Config, Debug)]
pub struct MlpConfig {
    /// Input features per example.
    pub inputs: usize,
    pub num_classes: usize,
    #[config(default = 64)]
    pub hidden: usize,
    #[config(default = 2)]
    pub layers: usize,
}

#[derive(Module, Debug)]
pub struct Mlp {
    hidden: Vec<Linear>,
    head: Linear,
    relu: Relu,
}

impl MlpConfig {
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
            head: LinearConfig::new(last, self.num_classes).init(device),
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
        cross_entropy(self.logits(batch.inputs), batch.labels)
    }

    fn eval_step(&self, batch: DenseBatch) -> BatchMetrics {
        BatchMetrics::classification(self.logits(batch.inputs), batch.labels)
    }
}
