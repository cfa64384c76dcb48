//! What early and slow connections may make the server hold: named limits,
//! each a flag of `fedveil-server run` (see [`crate::Deployment`]).

use std::time::Duration;

/// How long a new connection may take to open its stream and say hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections in the TLS handshake at once; more are refused outright.
pub const DEFAULT_MAX_HANDSHAKES: usize = 256;
/// Above this many handshakes at once, a peer must first prove its address
/// (a QUIC retry) before the server does any TLS work for it.
pub const DEFAULT_RETRY_ABOVE_HANDSHAKES: usize = 32;
/// Connections that have not said hello yet, over all peers.
pub const DEFAULT_MAX_UNADMITTED: usize = 256;
/// Connections of one enrolled node that have not said hello yet.
pub const DEFAULT_MAX_UNADMITTED_PER_NODE: usize = 2;
/// Messages of one connection read but not yet handled: beyond them the
/// reader stops reading, and QUIC flow control pushes back on the peer.
pub const DEFAULT_MAX_QUEUED_PER_CONNECTION: usize = 64;
/// Messages queued for one connection but not yet written (a round sends
/// each client about eight): a peer that stops reading fills its QUIC
/// window, then this queue, and is then disconnected instead of making
/// the server hold every later round's messages for it.
pub const DEFAULT_MAX_OUTBOUND_QUEUED: usize = 32;

/// How many connections the server holds in each early state, and how
/// long it waits for a hello: what an unauthenticated or misbehaving peer
/// can make it hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// See [`DEFAULT_MAX_HANDSHAKES`].
    pub max_handshakes: usize,
    /// See [`DEFAULT_RETRY_ABOVE_HANDSHAKES`].
    pub retry_above_handshakes: usize,
    /// See [`DEFAULT_MAX_UNADMITTED`].
    pub max_unadmitted: usize,
    /// See [`DEFAULT_MAX_UNADMITTED_PER_NODE`].
    pub max_unadmitted_per_node: usize,
    /// See [`DEFAULT_MAX_QUEUED_PER_CONNECTION`].
    pub max_queued_per_connection: usize,
    /// See [`DEFAULT_MAX_OUTBOUND_QUEUED`].
    pub max_outbound_queued: usize,
    /// How long a connection may take to open its stream and say hello.
    pub hello_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            retry_above_handshakes: DEFAULT_RETRY_ABOVE_HANDSHAKES,
            max_unadmitted: DEFAULT_MAX_UNADMITTED,
            max_unadmitted_per_node: DEFAULT_MAX_UNADMITTED_PER_NODE,
            max_queued_per_connection: DEFAULT_MAX_QUEUED_PER_CONNECTION,
            max_outbound_queued: DEFAULT_MAX_OUTBOUND_QUEUED,
            hello_timeout: HELLO_TIMEOUT,
        }
    }
}
