//! Models: the contract a user's Burn model implements ([`FederatedModel`]),
//! the object-safe view the framework holds ([`FlModel`]), factories, the
//! built-in models, and the flat-vector view.
//!
//! Burn 0.22 picks the backend at run time through a `Device`, so model code
//! names no backend; [`DeviceSpec`] turns `--device` into one.

pub mod cnn;
pub mod conv;
pub mod dense;
pub mod federated;
pub mod flat;
pub mod mlp;
pub mod transformer;

use burn::prelude::Device;

pub use crate::device::{DeviceError, DeviceSpec};
pub use dense::{DenseBatch, DenseBatcher, Example, Inputs};
pub use federated::{
    BatchMetrics, EVAL_BATCH_SIZE, EvalStats, Federated, FederatedModel, FlModel, ModelFactory,
    TrainPlan, TrainStats, cross_entropy, mean_squared_error,
};
pub use fedveil_proto::wire::ModelSpec;
pub use flat::ParamLayout;

/// Names of the built-in models (`--model`). Sizes follow a colon, e.g.
/// `transformer-cls:d_model=256,n_layers=4,n_heads=8,d_ff=512` or
/// `mlp:hidden=128,layers=3`.
pub const MODEL_NAMES: &[&str] = &["cnn", "mlp", "transformer-cls", "transformer-lm"];

/// Why a model could not be built, loaded or trained.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    /// No built-in model has this name.
    #[error("unknown model '{0}' (known: {known})", known = MODEL_NAMES.join(", "))]
    Unknown(String),
    /// A parameter vector of the wrong length.
    #[error("parameter vector has {got} values, the model has {expected}")]
    WrongLength {
        /// Values given.
        got: usize,
        /// Values the model has.
        expected: usize,
    },
    /// The model cannot take this data.
    #[error("model '{model}' cannot take inputs of shape {shape:?}: {reason}")]
    IncompatibleData {
        /// The model.
        model: String,
        /// The data's example shape.
        shape: Vec<usize>,
        /// Why not.
        reason: String,
    },
    /// A training plan that cannot run (no examples, zero batch size...).
    #[error("invalid training plan: {0}")]
    InvalidPlan(String),
    /// Training produced a non-finite loss.
    #[error("training diverged (loss {0}); lower the learning rate")]
    Diverged(f32),
    /// The model cannot be saved or loaded.
    #[error("model file {0}")]
    Store(String),
    /// A batch cannot be made from the data.
    #[error("reading the data: {0}")]
    Data(String),
    /// A size option of a built-in model is invalid.
    #[error("model '{model}': {source}")]
    Options {
        /// The model.
        model: String,
        /// What is wrong.
        source: OptionError,
    },
    /// A training's own threads could not be started.
    #[error("cannot start the training threads: {0}")]
    Threads(String),
    /// The device is unknown, not compiled in or not on this machine.
    #[error(transparent)]
    Device(#[from] DeviceError),
}

/// What a model needs to know about the data to be built.
#[derive(Debug, Clone, PartialEq)]
pub struct DataShape {
    /// The shape of one example (e.g. `[1, 28, 28]`).
    pub example_shape: Vec<usize>,
    /// Number of classes; 0 for a regression.
    pub num_classes: usize,
    /// Token vocabulary of text data (0 for images).
    pub vocab_size: usize,
}

impl DataShape {
    /// The shape of `data`.
    pub fn of(data: &crate::data::Dataset) -> Self {
        Self {
            example_shape: data.example_shape.clone(),
            num_classes: data.num_classes,
            vocab_size: data.vocab_size,
        }
    }
}

/// The factory of the built-in model `name` (with its options after a
/// colon), over the dense datasets fedveil loads.
pub fn builtin(name: &str) -> Result<ModelFactory<Example>, ModelError> {
    let (base, options) = name.split_once(':').unwrap_or((name, ""));
    if !MODEL_NAMES.contains(&base) || (base == "cnn" && !options.is_empty()) {
        return Err(ModelError::Unknown(name.to_owned()));
    }
    let full = name.to_owned();
    Ok(ModelFactory::new(name, move |shape, device| {
        build_builtin(&full, shape, device)
    }))
}

/// Builds the built-in model `name` for data of `shape`.
pub fn build(
    name: &str,
    shape: &DataShape,
    device: &Device,
) -> Result<Box<dyn FlModel<Example>>, ModelError> {
    builtin(name)?.build(shape, device)
}

fn build_builtin(
    name: &str,
    shape: &DataShape,
    device: &Device,
) -> Result<Box<dyn FlModel<Example>>, ModelError> {
    let (base, options) = name.split_once(':').unwrap_or((name, ""));
    if shape.num_classes == 0 && base != "mlp" {
        return Err(incompatible(
            name,
            shape,
            "it is a classifier and the data is a regression (no classes): use mlp or your own model",
        ));
    }
    match base {
        "transformer-cls" | "transformer-lm" => {
            let [seq_len] = shape.example_shape[..] else {
                return Err(incompatible(
                    name,
                    shape,
                    "expected token sequences [seq_len] (a text dataset)",
                ));
            };
            if shape.vocab_size == 0 {
                return Err(incompatible(name, shape, "the dataset has no vocabulary"));
            }
            let cfg = transformer::TextTransformerConfig::new(
                shape.vocab_size,
                seq_len,
                shape.num_classes,
            )
            .with_causal(base == "transformer-lm");
            let cfg =
                transformer::with_options(cfg, options).map_err(|source| ModelError::Options {
                    model: name.to_owned(),
                    source,
                })?;
            Ok(Box::new(Federated::new(
                name,
                |d| cfg.init(d),
                cfg.batcher(),
                device,
            )))
        }
        "cnn" => {
            if shape.vocab_size > 0 {
                return Err(incompatible(
                    name,
                    shape,
                    "the CNN takes images; use transformer-cls or transformer-lm for text",
                ));
            }
            let [c, h, w] = shape.example_shape[..] else {
                return Err(incompatible(
                    name,
                    shape,
                    "expected [channels, height, width]",
                ));
            };
            if h != w || h < 22 {
                return Err(incompatible(
                    name,
                    shape,
                    "expected square images of side >= 22",
                ));
            }
            let cfg = cnn::CnnConfig::new()
                .with_in_channels(c)
                .with_image_size(h)
                .with_num_classes(shape.num_classes);
            Ok(Box::new(Federated::new(
                name,
                |d| cfg.init(d),
                DenseBatcher::default(),
                device,
            )))
        }
        "mlp" => {
            if shape.vocab_size > 0 {
                return Err(incompatible(
                    name,
                    shape,
                    "the MLP takes numeric features; use transformer-cls or transformer-lm for text",
                ));
            }
            let inputs: usize = shape.example_shape.iter().product();
            if inputs == 0 {
                return Err(incompatible(name, shape, "examples have no features"));
            }
            let cfg = mlp::MlpConfig::new(inputs, shape.num_classes)
                .with_options(options)
                .map_err(|source| ModelError::Options {
                    model: name.to_owned(),
                    source,
                })?;
            Ok(Box::new(Federated::new(
                name,
                |d| cfg.init(d),
                DenseBatcher::default(),
                device,
            )))
        }
        other => Err(ModelError::Unknown(other.to_owned())),
    }
}

/// A model name's options (after the colon) that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct OptionError(pub String);

/// The `key=N,...` size options of a model name, each a whole number.
pub fn size_options(options: &str) -> Result<Vec<(&str, usize)>, OptionError> {
    options
        .split(',')
        .filter(|o| !o.is_empty())
        .map(|option| {
            let (key, value) = option
                .split_once('=')
                .ok_or_else(|| OptionError(format!("option {option:?}: expected key=value")))?;
            let value = value
                .parse()
                .map_err(|_| OptionError(format!("option {option:?}: expected a whole number")))?;
            Ok((key, value))
        })
        .collect()
}

fn incompatible(name: &str, shape: &DataShape, reason: &str) -> ModelError {
    ModelError::IncompatibleData {
        model: name.to_owned(),
        shape: shape.example_shape.clone(),
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests;
