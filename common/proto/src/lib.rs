//! fedveil-proto: the protocol core of fedveil, as pure state machines.
//!
//! Everything a round needs to be correct and private lives here: the wire
//! format ([`wire`]), the server's [`round::Coordinator`] and the node's
//! [`round::ClientSession`], SecAgg+ ([`secagg`]), differential privacy and
//! its accountant ([`dp`]), fixed-point aggregation ([`aggregate`]), server
//! strategies ([`strategy`]) with the server optimizers ([`server_opt`]),
//! and round metrics ([`metrics`]).
//!
//! The crate performs no I/O. It opens no socket and no file, spawns no
//! task, and never reads the clock: drivers hand in bytes, messages and the
//! current [`std::time::Instant`], and take out what to send, what to store
//! and when to wake up. It depends on no machine-learning framework and no
//! async runtime; `.ci/run` checks its dependency tree for Burn, tokio,
//! quinn, HTTP clients and SQLite. The only outside resource it uses is the
//! operating system's CSPRNG, for secret keys and privacy noise. (Long mask
//! expansions use scoped threads internally; they return before the call
//! does.)

#![warn(missing_docs)]

pub mod aggregate;
pub mod dp;
pub mod metrics;
pub mod round;
pub mod secagg;
pub mod server_opt;
pub mod strategy;
pub mod wire;
