//! Enrolment and renewal: the server side of `fedveil-client enroll` and
//! of certificate renewal. [`NodeService::handle`] turns one request into
//! one answer (no I/O but the registry); [`serve_enrolment`] is the thin
//! driver for one enrolment connection.

use std::sync::Arc;
use std::time::Duration;

use fedveil_net::pki::{self, CertInfo, CertificateAuthority};
use fedveil_net::quic::{self, CLOSE_OK, CLOSE_UNAUTHORIZED, MessageReader, NetError};
use fedveil_proto::wire::{Enrolled, FrameLimits, Message, PROTOCOL_VERSION, ReasonCode};

use crate::registry::{EnrolError, Registry};

/// How long an enrolling node may take to send its request.
pub const ENROL_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything the server needs to admit nodes: the registry, and the CA
/// that signs certificates (absent when its key is kept elsewhere).
pub struct NodeService {
    /// Tokens, nodes and certificates.
    pub registry: Arc<Registry>,
    /// Signs node certificates; `None` disables enrolment and renewal here.
    pub ca: Option<CertificateAuthority>,
    /// Lifetime of the client certificates it issues.
    pub cert_ttl: Duration,
}

impl NodeService {
    /// Answers one request from an enrolment connection. `peer` is the
    /// client certificate the connection authenticated with (renewals).
    pub fn handle(&self, request: Message, peer: Option<&CertInfo>, now: i64) -> Message {
        match self.answer(request, peer, now) {
            Ok(answer) => answer,
            Err(err) => Message::error(err.code(), err.to_string()),
        }
    }

    fn answer(
        &self,
        request: Message,
        peer: Option<&CertInfo>,
        now: i64,
    ) -> Result<Message, EnrolError> {
        let ca = self.ca.as_ref().ok_or(EnrolError::Disabled)?;
        let not_before = now - pki::CERT_BACKDATE.as_secs() as i64;
        let not_after = now + self.cert_ttl.as_secs() as i64;
        let issued = match request {
            Message::EnrolRequest(req) if req.version == PROTOCOL_VERSION => {
                if let Some(name) = &req.node_name {
                    pki::validate_node_name(name)?;
                }
                let issued =
                    self.registry
                        .enrol(&req.token, req.node_name.as_deref(), now, |name| {
                            ca.issue_client(&req.csr, name, not_before, not_after)
                        })?;
                tracing::info!(node = %issued.info.name, serial = %issued.info.serial, "node enrolled");
                issued
            }
            Message::RenewRequest(req) if req.version == PROTOCOL_VERSION => {
                let current = peer.ok_or(EnrolError::NotEnrolled)?;
                let issued = self.registry.renew(current, now, |name| {
                    ca.issue_client(&req.csr, name, not_before, not_after)
                })?;
                tracing::info!(node = %current.name, old = %current.serial, serial = %issued.info.serial, "certificate renewed");
                issued
            }
            Message::EnrolRequest(_) | Message::RenewRequest(_) => {
                return Ok(Message::error(
                    ReasonCode::VersionMismatch,
                    format!("the server speaks protocol {PROTOCOL_VERSION}"),
                ));
            }
            other => {
                return Ok(Message::error(
                    ReasonCode::UnexpectedMessage,
                    format!("a {} message on an enrolment connection", other.kind()),
                ));
            }
        };
        Ok(Message::Enrolled(Enrolled {
            certificate: issued.der,
            ca_certificate: ca.cert_der().to_vec(),
        }))
    }
}

/// Serves one enrolment connection: one request, one answer, close.
pub async fn serve_enrolment(connection: quinn::Connection, service: Arc<NodeService>) {
    let remote = connection.remote_address();
    let peer = quic::peer_certificate(&connection).map(|(_, info)| info);
    let exchange = async {
        let (mut send, recv) = connection.accept_bi().await?;
        let mut reader = MessageReader::new(recv, FrameLimits::enrolment());
        let answer = match reader.next().await {
            Ok(Some(request)) => {
                let kind = request.kind();
                // A SQLite transaction may wait on another process's lock:
                // never on an async worker.
                let service = Arc::clone(&service);
                let peer = peer.clone();
                let answer = tokio::task::spawn_blocking(move || {
                    service.handle(request, peer.as_ref(), pki::unix_now())
                })
                .await
                .unwrap_or_else(|_| {
                    Message::error(ReasonCode::Internal, "the enrolment failed".to_owned())
                });
                if let Message::Error(e) = &answer {
                    tracing::warn!(%remote, request = kind, code = ?e.code, detail = %e.detail, "enrolment refused");
                }
                answer
            }
            Ok(None) => return Ok(None),
            // Say why before closing: the peer may be a node of another
            // version, not only an attacker.
            Err(NetError::Codec(err)) => {
                tracing::warn!(%remote, code = ?err.reason(), %err, "undecodable enrolment request");
                Message::error(err.reason(), err.to_string())
            }
            Err(err) => return Err(err),
        };
        quic::write_message(&mut send, &answer).await?;
        let _ = send.finish();
        let _ = tokio::time::timeout(crate::driver::CLOSE_GRACE, send.stopped()).await;
        Ok::<_, NetError>(Some(answer))
    };
    match tokio::time::timeout(ENROL_REQUEST_TIMEOUT, exchange).await {
        Ok(Ok(Some(Message::Enrolled(_)))) => connection.close(CLOSE_OK.into(), b""),
        Ok(Ok(_)) => connection.close(CLOSE_UNAUTHORIZED.into(), b"enrolment refused"),
        Ok(Err(err)) => {
            tracing::info!(%remote, %err, "enrolment connection failed");
            connection.close(CLOSE_UNAUTHORIZED.into(), b"enrolment failed");
        }
        Err(_) => {
            tracing::warn!(%remote, "no enrolment request in time; closing");
            connection.close(CLOSE_UNAUTHORIZED.into(), b"no enrolment request in time");
        }
    }
}
