//! The built-in data pipeline: fedveil's dense [`Dataset`]
//! (images, token sequences, feature rows) seen as a Burn dataset of
//! [`Example`]s, batched by [`DenseBatcher`] into [`DenseBatch`]es for the
//! built-in models.

use std::sync::Arc;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::{Dataset as BurnDataset, DatasetError};
use burn::prelude::*;

use crate::data::{Dataset, Shard};

/// One example of a dense dataset: a handle, not a copy, so reading a
/// batch of them costs only the batch's own copy into a tensor.
#[derive(Debug, Clone)]
pub struct Example {
    data: Arc<Dataset>,
    index: usize,
}

impl Example {
    /// Its feature values.
    pub fn features(&self) -> &[f32] {
        self.data.example(self.index)
    }

    /// Its position in the whole dataset.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Its class id (0 for regression data).
    pub fn label(&self) -> u32 {
        self.data.labels[self.index]
    }

    /// Its regression target (regression data only).
    pub fn target(&self) -> Option<f32> {
        self.data.targets.get(self.index).copied()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("index {index} is outside a shard of {len} examples")]
struct OutOfRange {
    index: usize,
    len: usize,
}

/// A shard is a Burn dataset of its examples, in shard order.
impl BurnDataset<Example> for Shard {
    fn get(&self, index: usize) -> Result<Example, DatasetError> {
        match self.indices.get(index) {
            Some(&i) => Ok(Example {
                data: Arc::clone(&self.data),
                index: i,
            }),
            None => Err(DatasetError::new(OutOfRange {
                index,
                len: self.len(),
            })),
        }
    }

    fn len(&self) -> usize {
        self.indices.len()
    }
}

/// Model inputs for one batch.
pub enum Inputs {
    /// `[batch, channels, height, width]`.
    Images(Tensor<4>),
    /// Token ids `[batch, seq]` (text datasets).
    Tokens(Tensor<2, Int>),
    /// Feature rows `[batch, features]` (tabular data).
    Features(Tensor<2>),
}

/// A batch of dense examples and what the model should predict: class
/// labels, or (regression data) target values.
pub struct DenseBatch {
    /// The batch's inputs.
    pub inputs: Inputs,
    /// Class ids `[batch]` (all 0 for regression data).
    pub labels: Tensor<1, Int>,
    /// Regression targets `[batch]`; `None` for classification data.
    pub targets: Option<Tensor<1>>,
}

/// Batches dense examples by their dataset's kind: token ids for text
/// (`vocab_size > 0`), images for `[c, h, w]` examples, feature rows
/// otherwise.
#[derive(Debug, Clone, Copy, Default)]
pub struct DenseBatcher {
    /// Cut trailing padding columns from token batches: for models whose
    /// outputs padding cannot change, so short texts cost their own length,
    /// not the longest allowed.
    pub trim_padding: bool,
}

impl Batcher<Example, DenseBatch> for DenseBatcher {
    fn batch(&self, items: Vec<Example>, device: &Device) -> DenseBatch {
        let Some(first) = items.first() else {
            panic!("the framework never asks for an empty batch")
        };
        let data = Arc::clone(&first.data);
        let n = items.len();
        let text = data.vocab_size > 0;
        let mut width = data.example_len();
        if text && self.trim_padding {
            width = items
                .iter()
                .map(|e| unpadded_len(e.features()))
                .max()
                .unwrap_or(0)
                .max(1);
        }
        let mut features = Vec::with_capacity(n * width);
        for e in &items {
            features.extend_from_slice(&e.features()[..width]);
        }
        let labels: Vec<i32> = items.iter().map(|e| e.label() as i32).collect();
        let labels = Tensor::<1, Int>::from_data(TensorData::new(labels, [n]), device);
        let targets = (!data.targets.is_empty()).then(|| {
            let values: Vec<f32> = items.iter().filter_map(Example::target).collect();
            Tensor::<1>::from_data(TensorData::new(values, [n]), device)
        });
        let inputs = match data.example_shape[..] {
            _ if text => {
                // Token ids are stored as exact f32s.
                let ids: Vec<i32> = features.iter().map(|&v| v as i32).collect();
                Inputs::Tokens(Tensor::from_data(TensorData::new(ids, [n, width]), device))
            }
            [c, h, w] => Inputs::Images(Tensor::from_data(
                TensorData::new(features, [n, c, h, w]),
                device,
            )),
            _ => Inputs::Features(Tensor::from_data(
                TensorData::new(features, [n, width]),
                device,
            )),
        };
        DenseBatch {
            inputs,
            labels,
            targets,
        }
    }
}

/// Length of a token sequence without its trailing padding.
fn unpadded_len(tokens: &[f32]) -> usize {
    tokens
        .iter()
        .rposition(|&t| t != crate::data::text::PAD as f32)
        .map_or(0, |last| last + 1)
}
