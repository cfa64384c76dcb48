//! fedveil-ml: the machine-learning side of a node, built on Burn.
//!
//! [`model`] holds the built-in models and their flat-vector view (the form
//! in which fedveil clips, noises, masks and aggregates an update), [`data`]
//! the dataset formats and partitioners, [`device`] where training runs, and
//! [`train`] the local training loop a client runs each round. Protocol types come from
//! [`fedveil_proto`]; nothing here touches the network.

#![warn(missing_docs)]

pub mod data;
pub mod device;
pub mod model;
pub mod train;

pub use train::{LocalTrainer, ModelPool, Trainer};
