//! fedveil-server: the aggregation server. [`driver`] runs the sans-IO
//! round coordinator from `fedveil-proto` over QUIC; [`setup`] builds the
//! pieces a run needs.

#![warn(missing_docs)]

pub mod config_file;
pub mod cpu;
pub mod deploy;
pub mod driver;
pub mod enrol;
pub mod registry;
pub mod setup;
pub mod store;

pub use deploy::{DeployError, RunStatus, Server, ServerBuilder};
pub use driver::{
    ConnectionLimits, Evaluator, LogObserver, Observer, RunReport, ServeOptions, ServerFaultHook,
    StateSink, serve,
};
pub use enrol::NodeService;
pub use registry::Registry;
