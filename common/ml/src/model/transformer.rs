//! Transformer encoders over token sequences, for the text tasks:
//!
//! - `transformer-cls`: token + learned position embeddings, pre-norm
//!   encoder layers with multi-head self-attention, a final layer norm,
//!   mean pooling over the non-padding tokens, and a linear head. Padding
//!   (token id 0) is masked out of attention keys and out of the pool, so
//!   it cannot change the result.
//! - `transformer-lm`: the same stack with a causal attention mask, read
//!   out at the last position: next-character prediction, as LEAF's
//!   Shakespeare task poses it.
//!
//! Both are ordinary Burn modules, so they flatten to the same parameter
//! vector form as the CNN and everything downstream (secure aggregation,
//! DP, server optimizers) applies unchanged.

use burn::nn::attention::generate_autoregressive_mask;
use burn::nn::transformer::{
    TransformerEncoder, TransformerEncoderConfig, TransformerEncoderInput,
};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;

use super::dense::{DenseBatch, DenseBatcher, Inputs};
use super::federated::{BatchMetrics, FederatedModel, cross_entropy};
use super::{OptionError, size_options};
use crate::data::text::PAD;

/// The built-in text transformer: classification, or (causal) next-token prediction.
#[derive(Config, Debug)]
pub struct TextTransformerConfig {
    /// Token ids are below this (PAD = 0 included).
    pub vocab_size: usize,
    /// Longest input sequence (position embeddings).
    pub max_len: usize,
    /// Classes of a classification (the vocabulary size for a language model).
    pub num_classes: usize,
    /// Embedding width.
    #[config(default = 128)]
    pub d_model: usize,
    /// Transformer blocks.
    #[config(default = 2)]
    pub n_layers: usize,
    /// Attention heads per block.
    #[config(default = 4)]
    pub n_heads: usize,
    /// Width of each block's feed-forward layer.
    #[config(default = 256)]
    pub d_ff: usize,
    /// Causal attention and last-position readout (language model).
    #[config(default = false)]
    pub causal: bool,
}

/// The built-in text transformer (see [`TextTransformerConfig`]).
#[derive(Module, Debug)]
pub struct TextTransformer {
    token: Embedding,
    position: Embedding,
    encoder: TransformerEncoder,
    norm: LayerNorm,
    head: Linear,
    causal: bool,
}

/// Applies `key=value,...` size options (`d_model`, `n_layers`, `n_heads`,
/// `d_ff`) from a model name such as `transformer-cls:d_model=256`.
pub fn with_options(
    mut cfg: TextTransformerConfig,
    options: &str,
) -> Result<TextTransformerConfig, OptionError> {
    for (key, value) in size_options(options)? {
        if value == 0 {
            return Err(OptionError(format!("option {key}: must be positive")));
        }
        match key {
            "d_model" => cfg.d_model = value,
            "n_layers" => cfg.n_layers = value,
            "n_heads" => cfg.n_heads = value,
            "d_ff" => cfg.d_ff = value,
            _ => {
                return Err(OptionError(format!(
                    "unknown option {key:?} (d_model, n_layers, n_heads, d_ff)"
                )));
            }
        }
    }
    if !cfg.d_model.is_multiple_of(cfg.n_heads) {
        return Err(OptionError(format!(
            "d_model {} is not a multiple of n_heads {}",
            cfg.d_model, cfg.n_heads
        )));
    }
    Ok(cfg)
}

impl TextTransformerConfig {
    /// The batcher that feeds it: the classifier masks padding out of
    /// attention and out of the pool, so trailing padding may be cut; the
    /// language model reads out at the last position, so it may not.
    pub fn batcher(&self) -> DenseBatcher {
        DenseBatcher {
            trim_padding: !self.causal,
        }
    }

    /// A freshly initialised transformer on `device`.
    pub fn init(&self, device: &Device) -> TextTransformer {
        TextTransformer {
            token: EmbeddingConfig::new(self.vocab_size, self.d_model).init(device),
            position: EmbeddingConfig::new(self.max_len, self.d_model).init(device),
            // No dropout: local training stays a deterministic function of
            // the seed, and the small federated models do not need it.
            encoder: TransformerEncoderConfig::new(
                self.d_model,
                self.d_ff,
                self.n_heads,
                self.n_layers,
            )
            .with_norm_first(true)
            .with_dropout(0.0)
            .init(device),
            norm: LayerNormConfig::new(self.d_model).init(device),
            head: LinearConfig::new(self.d_model, self.num_classes).init(device),
            causal: self.causal,
        }
    }
}

impl TextTransformer {
    /// Logits `[batch, classes]` for token ids `[batch, seq]`.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<2> {
        let [batch, seq] = tokens.dims();
        let padding = tokens.clone().equal_elem(PAD as i64);
        let h = self.hidden(tokens);
        let [_, _, d] = h.dims();
        let pooled = if self.causal {
            h.slice([0..batch, seq - 1..seq, 0..d]).reshape([batch, d])
        } else {
            let keep = padding.bool_not().float().unsqueeze_dim::<3>(2);
            let count = keep.clone().sum_dim(1).clamp_min(1.0);
            (h * keep).sum_dim(1).div(count).reshape([batch, d])
        };
        self.head.forward(pooled)
    }

    /// The normalised encoder output `[batch, seq, d_model]`.
    pub fn hidden(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        let [batch, seq] = tokens.dims();
        let device = tokens.device();
        let padding = tokens.clone().equal_elem(PAD as i64);
        let positions = Tensor::<1, Int>::arange(0..seq as i64, &device)
            .reshape([1, seq])
            .expand([batch, seq]);
        let x = self.token.forward(tokens) + self.position.forward(positions);
        let mut input = TransformerEncoderInput::new(x).mask_pad(padding.clone());
        if self.causal {
            input = input.mask_attn(generate_autoregressive_mask(batch, seq, &device));
        }
        self.norm.forward(self.encoder.forward(input))
    }
}

impl TextTransformer {
    fn tokens(inputs: Inputs) -> Tensor<2, Int> {
        match inputs {
            Inputs::Tokens(t) => t,
            // The factory builds transformers for text data only.
            _ => unreachable!("a text transformer takes token ids"),
        }
    }
}

impl FederatedModel for TextTransformer {
    type Batch = DenseBatch;

    /// The language model learns from every position: token i predicts
    /// token i + 1, and the last one predicts the label (the character
    /// after the window). The causal mask keeps each prediction honest.
    fn train_step(&self, batch: DenseBatch) -> Tensor<1> {
        let tokens = Self::tokens(batch.inputs);
        if !self.causal {
            return cross_entropy(self.forward(tokens), batch.labels);
        }
        let [n, seq] = tokens.dims();
        let logits = self.head.forward(self.hidden(tokens.clone()));
        let classes = logits.dims()[2];
        let next = Tensor::cat(
            vec![tokens.slice([0..n, 1..seq]), batch.labels.reshape([n, 1])],
            1,
        );
        cross_entropy(logits.reshape([n * seq, classes]), next.reshape([n * seq]))
    }

    fn eval_step(&self, batch: DenseBatch) -> BatchMetrics {
        BatchMetrics::classification(self.forward(Self::tokens(batch.inputs)), batch.labels)
    }
}

#[cfg(test)]
mod tests;
