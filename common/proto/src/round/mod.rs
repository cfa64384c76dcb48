//! The round protocol as sans-IO state machines: [`server::Coordinator`]
//! and [`client::ClientSession`]. Drivers feed them messages and time and
//! send what they emit; the tests in `tests.rs` drive both ends in memory.

pub mod client;
pub mod policy;
pub mod server;

pub use client::{ClientEvent, ClientSession, SessionError};
pub use server::{
    ClientId, ConfigError, Coordinator, CoordinatorBuilder, CoordinatorConfig, Event, PeerIdentity,
    RoundSummary, Transmit,
};

#[cfg(test)]
mod tests;
