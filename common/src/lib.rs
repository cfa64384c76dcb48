//! fedveil-common: the vocabulary and pure logic shared by server, client
//! and simulation. Nothing here opens a socket, spawns a task or reads the
//! clock; drivers pass time in. (Long mask expansions use scoped threads
//! internally; they return before the call does.)

pub mod aggregate;
pub mod data;
pub mod dp;
pub mod metrics;
pub mod model;
#[cfg(feature = "net")]
pub mod net;
#[cfg(feature = "net")]
pub mod pki;
pub mod round;
pub mod secagg;
pub mod server_opt;
pub mod wire;
