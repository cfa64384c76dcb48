//! fedveil-server: the aggregation server. [`driver`] runs the sans-IO
//! round coordinator from `fedveil-common` over QUIC; [`setup`] builds the
//! pieces a run needs.

pub mod driver;
pub mod setup;

pub use driver::{Evaluator, LogObserver, Observer, RunReport, serve};
