//! fedveil-server: the aggregation server. [`driver`] runs the sans-IO
//! round coordinator from `fedveil-common` over QUIC; [`setup`] builds the
//! pieces a run needs.

pub mod driver;
pub mod setup;
pub mod store;

pub use driver::{Evaluator, LogObserver, Observer, RunReport, StateSink, serve};
