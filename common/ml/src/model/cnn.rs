//! The classic Keras MNIST CNN (93,322 parameters for 28x28x1 inputs):
//! Conv(32,3x3) ReLU, MaxPool 2, Conv(64,3x3) ReLU, MaxPool 2,
//! Conv(64,3x3) ReLU, Flatten, Dense(64) ReLU, Dense(classes).

use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, Relu};
use burn::prelude::*;

use super::conv::LoweredConv2d;
use super::dense::{DenseBatch, Inputs};
use super::federated::{BatchMetrics, FederatedModel, cross_entropy};

/// The built-in CNN for images: three 3x3 convolutions, two poolings, two dense layers.
#[derive(Config, Debug)]
pub struct CnnConfig {
    /// Image channels.
    #[config(default = 1)]
    pub in_channels: usize,
    /// Image side (square images).
    #[config(default = 28)]
    pub image_size: usize,
    /// Number of classes.
    #[config(default = 10)]
    pub num_classes: usize,
}

/// The built-in CNN (see [`CnnConfig`]).
#[derive(Module, Debug)]
pub struct Cnn {
    conv1: LoweredConv2d,
    conv2: LoweredConv2d,
    conv3: LoweredConv2d,
    pool: MaxPool2d,
    fc1: Linear,
    fc2: Linear,
    relu: Relu,
}

impl CnnConfig {
    /// Side length after conv(3) pool(2) conv(3) pool(2) conv(3).
    fn final_side(&self) -> usize {
        ((self.image_size - 2) / 2 - 2) / 2 - 2
    }

    /// A freshly initialised CNN on `device`.
    pub fn init(&self, device: &Device) -> Cnn {
        let side = self.final_side();
        Cnn {
            conv1: LoweredConv2d::new([self.in_channels, 32], [3, 3], device),
            conv2: LoweredConv2d::new([32, 64], [3, 3], device),
            conv3: LoweredConv2d::new([64, 64], [3, 3], device),
            pool: MaxPool2dConfig::new([2, 2]).init(),
            fc1: LinearConfig::new(64 * side * side, 64).init(device),
            fc2: LinearConfig::new(64, self.num_classes).init(device),
            relu: Relu::new(),
        }
    }
}

impl Cnn {
    /// Logits `[batch, classes]` of images `[batch, channels, side, side]`.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let x = self
            .pool
            .forward(self.relu.forward(self.conv1.forward(images)));
        let x = self.pool.forward(self.relu.forward(self.conv2.forward(x)));
        let x = self.relu.forward(self.conv3.forward(x));
        let x = x.flatten::<2>(1, 3);
        let x = self.relu.forward(self.fc1.forward(x));
        self.fc2.forward(x)
    }
}

impl Cnn {
    fn logits(&self, inputs: Inputs) -> Tensor<2> {
        match inputs {
            Inputs::Images(x) => self.forward(x),
            // The factory builds the CNN for image data only.
            _ => unreachable!("the CNN takes images"),
        }
    }
}

impl FederatedModel for Cnn {
    type Batch = DenseBatch;

    fn train_step(&self, batch: DenseBatch) -> Tensor<1> {
        cross_entropy(self.logits(batch.inputs), batch.labels)
    }

    fn eval_step(&self, batch: DenseBatch) -> BatchMetrics {
        BatchMetrics::classification(self.logits(batch.inputs), batch.labels)
    }
}
