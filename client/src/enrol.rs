//! Getting and renewing this node's certificate. The private key is made
//! here and never leaves the node: the server receives only a CSR.
//!
//! Enrolment runs over server-authenticated TLS in which the server's
//! chain must end in the CA the operator's fingerprint names (the node has
//! no CA file yet); renewal runs over the node's current mutual-TLS
//! identity and pins the CA it already trusts.

use std::net::SocketAddr;
use std::time::Duration;

use fedveil_net::pki::{self, NodeIdentity, PkiError};
use fedveil_net::quic::{self, MessageReader, NetError, Rejection};
use fedveil_proto::wire::{
    EnrolRequest, FrameLimits, Message, PROTOCOL_VERSION, ReasonCode, RenewRequest,
};

/// How long one enrolment exchange may take, handshake included.
pub const ENROL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why enrolment or renewal failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrolmentError {
    /// The connection failed.
    #[error("{0}")]
    Net(#[from] NetError),
    /// TLS refused one side (a pin mismatch, or this node's certificate).
    #[error("{0}")]
    Rejected(Rejection),
    /// The server answered with a refusal.
    #[error("{}", refusal_advice(*code, detail))]
    Refused {
        /// Why, as a reason code.
        code: ReasonCode,
        /// The server's explanation.
        detail: String,
    },
    /// A key or certificate could not be made or checked.
    #[error("{0}")]
    Pki(#[from] PkiError),
    /// The server's answer made no sense.
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
    /// The server did not answer in time.
    #[error("the server did not answer within {0:?}")]
    Timeout(Duration),
    /// Connecting failed for another reason.
    #[error("{0}")]
    Connect(crate::ClientError),
}

/// What the node's operator should do about a refusal.
fn refusal_advice(code: ReasonCode, detail: &str) -> String {
    let advice = match code {
        ReasonCode::TokenUnknown => {
            "check the token (copy it whole) and that --server points at the server that issued it"
        }
        ReasonCode::TokenUsed | ReasonCode::TokenExpired => {
            "ask the operator for a new token: `fedveil-server enroll --name NODE`"
        }
        ReasonCode::TokenNameMismatch => {
            "leave out --name, or use the name the token was issued for"
        }
        ReasonCode::NameTaken => {
            "the operator must revoke the old node first (`fedveil-server revoke NAME`), or issue a token for another name"
        }
        ReasonCode::NotEnrolled | ReasonCode::Revoked => {
            "this node must enrol again with a new token"
        }
        ReasonCode::EnrolmentDisabled => "enrol with the server that holds the CA key",
        ReasonCode::RenewalTooEarly => {
            "nothing: the node renews by itself once renewal opens (`fedveil-client run` does it in the background)"
        }
        _ => "",
    };
    if advice.is_empty() {
        format!("the server refused: {detail}")
    } else {
        format!("the server refused: {detail}\n  what to do: {advice}")
    }
}

impl EnrolmentError {
    fn explain(self) -> Self {
        match &self {
            EnrolmentError::Net(e) => e.rejection().map_or(self, EnrolmentError::Rejected),
            _ => self,
        }
    }
}

/// One request/answer exchange on an enrolment connection. Connecting is
/// retried like a training connection (the server may be starting), a
/// refusal is not.
async fn exchange(
    endpoint: &quinn::Endpoint,
    tls: quinn::ClientConfig,
    server: SocketAddr,
    server_name: &str,
    request: Message,
) -> Result<Message, EnrolmentError> {
    let mut opts = crate::ClientOptions::new(server, server_name, "enrolling node");
    opts.tls = Some(tls);
    let connection = match crate::driver::connect(endpoint, &opts).await {
        Ok(c) => c,
        Err(crate::ClientError::Net(e)) => return Err(EnrolmentError::Net(e).explain()),
        Err(crate::ClientError::Rejected(r)) => return Err(EnrolmentError::Rejected(r)),
        Err(other) => return Err(EnrolmentError::Connect(other)),
    };
    let attempt = async {
        let (mut send, recv) = connection.open_bi().await.map_err(NetError::from)?;
        quic::write_message(&mut send, &request).await?;
        let _ = send.finish();
        let mut reader = MessageReader::new(recv, FrameLimits::enrolment());
        let answer = reader.next().await?;
        connection.close(quic::CLOSE_OK.into(), b"");
        answer.ok_or_else(|| EnrolmentError::Protocol("the server closed without answering".into()))
    };
    let answer = tokio::time::timeout(ENROL_TIMEOUT, attempt)
        .await
        .map_err(|_| EnrolmentError::Timeout(ENROL_TIMEOUT))?
        .map_err(EnrolmentError::explain)?;
    match answer {
        Message::Error(e) => Err(EnrolmentError::Refused {
            code: e.code,
            detail: e.detail,
        }),
        other => Ok(other),
    }
}

fn identity_from(answer: Message, key: pki::KeyPair) -> Result<NodeIdentity, EnrolmentError> {
    match answer {
        Message::Enrolled(e) => Ok(NodeIdentity::new(key, e.certificate, e.ca_certificate)?),
        other => Err(EnrolmentError::Protocol(format!(
            "expected a certificate, got a {} message",
            other.kind()
        ))),
    }
}

/// Enrols this node with a one-time `token`: generates a key, sends a CSR,
/// and returns the identity (not yet saved). `name` defaults to the one
/// the token was issued for.
pub async fn enrol(
    endpoint: &quinn::Endpoint,
    server: SocketAddr,
    server_name: &str,
    ca_fingerprint: [u8; 32],
    token: &str,
    name: Option<&str>,
) -> Result<NodeIdentity, EnrolmentError> {
    // The CA writes the certificate's name; the CSR's is a placeholder
    // when the token decides.
    let (key, csr) = pki::new_key_and_csr(name.unwrap_or("enrolling-node"))?;
    let request = Message::EnrolRequest(EnrolRequest {
        version: PROTOCOL_VERSION,
        token: token.trim().to_owned(),
        node_name: name.map(str::to_owned),
        csr,
    });
    let tls = quic::enrol_client_config(ca_fingerprint, None)?;
    let answer = exchange(endpoint, tls, server, server_name, request).await?;
    let identity = identity_from(answer, key)?;
    if pki::fingerprint(identity.ca_der()) != hex::encode(ca_fingerprint) {
        return Err(EnrolmentError::Protocol(
            "the server returned another CA than the pinned one".into(),
        ));
    }
    Ok(identity)
}

/// Replaces `current` with a fresh key and certificate, authenticating
/// with `current` (it must still be valid and not revoked).
pub async fn renew(
    endpoint: &quinn::Endpoint,
    server: SocketAddr,
    server_name: &str,
    current: &NodeIdentity,
) -> Result<NodeIdentity, EnrolmentError> {
    let (key, csr) = pki::new_key_and_csr(current.name())?;
    let pin: [u8; 32] = pki::parse_fingerprint(&pki::fingerprint(current.ca_der()))?;
    let tls = quic::enrol_client_config(pin, Some(current))?;
    let request = Message::RenewRequest(RenewRequest {
        version: PROTOCOL_VERSION,
        csr,
    });
    let answer = exchange(endpoint, tls, server, server_name, request).await?;
    let identity = identity_from(answer, key)?;
    if identity.name() != current.name() || identity.ca_der() != current.ca_der() {
        return Err(EnrolmentError::Protocol(
            "the renewed certificate names another node or CA".into(),
        ));
    }
    Ok(identity)
}
