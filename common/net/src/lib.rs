//! fedveil-net: how fedveil's parties reach each other.
//!
//! [`quic`] sets up QUIC with mutual TLS 1.3 (quinn, rustls) and moves
//! [`fedveil_proto::wire::Message`]s over a stream through the sans-IO
//! codec; [`pki`] is the deployment's own certificate authority, node
//! identities and the signatures that bind SecAgg keys to them. The server
//! and client drivers share both.

#![warn(missing_docs)]

pub mod pki;
pub mod quic;
