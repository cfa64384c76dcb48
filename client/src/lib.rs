//! fedveil-client: a node that trains locally and talks to the server.
//! [`driver`] runs the sans-IO session over QUIC around a
//! [`LocalTrainer`] (the Burn work, from `fedveil-ml`); [`enrol`] obtains
//! and renews the node's certificate; [`ledger`] keeps the node's own
//! privacy ledger; [`node`] puts them together for an enrolled node.

#![warn(missing_docs)]

pub mod driver;
pub mod enrol;
pub mod ledger;
pub mod node;

pub use driver::{ClientError, ClientOptions, ClientReport, Fault, FaultHook, run};
pub use fedveil_ml::train::{LocalTrainer, Trainer};
pub use node::{Node, NodeError};
