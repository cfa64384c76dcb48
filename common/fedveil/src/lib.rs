//! fedveil: privacy-preserving federated learning in Rust.
//!
//! Nodes train a [Burn](https://burn.dev) model on their own data, clip
//! their update, add differential-privacy noise and mask it for secure
//! aggregation (SecAgg+); the server only ever sees the sum, applies a
//! server strategy and keeps model, optimizer state and privacy ledger
//! durable across crashes. Everything travels over QUIC with mutual TLS 1.3
//! under the deployment's own certificate authority.
//!
//! This crate is the one to depend on. It re-exports the layers:
//!
//! | layer | crate | modules |
//! |---|---|---|
//! | protocol core, sans-IO | `fedveil-proto` | [`wire`], [`round`], [`secagg`], [`dp`], [`aggregate`], [`strategy`], [`server_opt`], [`metrics`] |
//! | machine learning (Burn): [`model::FederatedModel`] for your own model | `fedveil-ml` | [`model`], [`data`], [`train`] |
//! | transport and PKI | `fedveil-net` | [`quic`], [`pki`] |
//! | run settings, defined once | `fedveil-settings` | [`settings`] |
//! | drivers (features `client`, `server`, `sim`) | `fedveil-client`, `fedveil-server`, `fedveil-sim` | `client`, `server`, `sim` |
//!
//! and [`burn`] itself, so a model is written against the same Burn the
//! framework trains it with.
//!
//! A deployment starts from two builders: `server::Server::builder` (CA,
//! node registry, durable state, model, strategy; started or resumed) and
//! `client::Node` (enrols into a directory, reloads and renews its
//! identity, takes part in runs). A simulation starts from
//! `sim::Federation` and `sim::run_federation`. `examples/` in the
//! repository shows each.
//!
//! ```
//! // What a run's privacy costs: 1,000 rounds sampling 1% of the nodes,
//! // with noise 1.1 times the clipping bound.
//! let epsilon = fedveil::dp::rdp::gaussian_epsilon(0.01, 1.1, 1000, 1e-5)?;
//! assert!(epsilon > 1.0 && epsilon < 3.0, "epsilon = {epsilon}");
//! # Ok::<(), fedveil::dp::rdp::AccountingError>(())
//! ```

#![warn(missing_docs)]

pub use burn;
pub use fedveil_ml::{data, device, model, train};
pub use fedveil_net::{pki, quic};
pub use fedveil_proto::{aggregate, dp, metrics, round, secagg, server_opt, strategy, wire};
pub use fedveil_settings as settings;

#[cfg(feature = "client")]
pub use fedveil_client as client;
#[cfg(feature = "server")]
pub use fedveil_server as server;
#[cfg(feature = "sim")]
pub use fedveil_sim as sim;
