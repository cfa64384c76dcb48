//! fedveil-client: a node that trains locally and talks to the server.
//! [`trainer`] does the Burn work; [`driver`] runs the sans-IO session over
//! QUIC.

pub mod driver;
pub mod enrol;
pub mod trainer;

pub use driver::{ClientError, ClientOptions, ClientReport, Fault, FaultHook, run};
pub use trainer::{LocalTrainer, Trainer};
