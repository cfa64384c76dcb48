//! QUIC transport: TLS 1.3 identities and configs for quinn, and moving
//! [`Message`]s over a QUIC stream through the sans-IO codec. Server and
//! client drivers share it.
//!
//! Each connection carries one bidirectional stream, opened by the client;
//! messages are frames on it, in order. QUIC flow control streams a large
//! model through in pieces; the frame layout has 64-bit lengths, so nothing
//! caps a model but [`FrameLimits`].

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject};

use crate::pki::{self, CertInfo, CertificateAuthority, NodeIdentity};
use fedveil_proto::wire::{CodecError, FrameDecoder, FrameLimits, Message, encode};

/// ALPN protocol id of training connections (mutual TLS).
pub const ALPN: &[u8] = b"fedveil/1";
/// ALPN protocol id of enrolment and renewal connections.
pub const ENROL_ALPN: &[u8] = b"fedveil-enrol/1";
/// Keep-alive interval, so a connection survives long local training.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// A silent peer is considered gone after this long.
pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest piece read from a stream at once.
pub const READ_CHUNK_BYTES: usize = 1 << 20;
/// Application close code: normal end of a run.
pub const CLOSE_OK: u32 = 0;
/// Application close code: the peer was refused (see the error message);
/// trying again later may work (the server was full or restarting).
pub const CLOSE_REFUSED: u32 = 1;
/// Application close code: the node is not (or no longer) allowed in;
/// the close reason says why. Retrying cannot help.
pub const CLOSE_UNAUTHORIZED: u32 = 2;
/// Close code: the connection's certificate expired, or a renewal
/// superseded it; the node reconnects with its current certificate.
pub const CLOSE_CERT_ENDED: u32 = 3;

/// What can go wrong at the transport level.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A frame that does not decode, or exceeds its limit.
    #[error("{0}")]
    Codec(#[from] CodecError),
    /// The connection was lost or closed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// A connection could not be started.
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// Reading a stream failed.
    #[error("read: {0}")]
    Read(#[from] quinn::ReadError),
    /// Writing a stream failed.
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    /// The TLS configuration could not be built.
    #[error("tls: {0}")]
    Tls(String),
    /// A key or certificate file cannot be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl NetError {
    /// True when the peer closed the whole connection with [`CLOSE_OK`]:
    /// the normal end of a run, not a failure.
    pub fn is_normal_close(&self) -> bool {
        let conn = match self {
            NetError::Connection(e) => e,
            NetError::Read(quinn::ReadError::ConnectionLost(e)) => e,
            NetError::Write(quinn::WriteError::ConnectionLost(e)) => e,
            _ => return false,
        };
        matches!(conn, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == quinn::VarInt::from_u32(CLOSE_OK))
    }
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> NetError + '_ {
    move |source| NetError::File {
        path: path.to_owned(),
        source,
    }
}

fn tls_err(e: impl std::fmt::Display) -> NetError {
    NetError::Tls(e.to_string())
}

/// File names inside a server's identity directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA's private key in the server directory (mode 0600).
pub const CA_KEY_FILE: &str = "ca.key";
/// The server certificate chain in the server directory.
pub const SERVER_CERT_FILE: &str = "server.pem";
/// The server's private key in the server directory (mode 0600).
pub const SERVER_KEY_FILE: &str = "server.key";

/// The server's TLS identity: its own CA and a server certificate it signed.
/// Nodes pin the CA certificate (by fingerprint when they enrol).
pub struct ServerIdentity {
    /// The CA certificate, PEM.
    pub ca_cert_pem: String,
    /// The CA with its signing key; `None` when `ca.key` is not on this
    /// machine (then the server cannot enrol nodes).
    pub ca: Option<CertificateAuthority>,
    /// Server certificate, then the CA certificate.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The server certificate's private key.
    pub key: PrivateKeyDer<'static>,
}

impl ServerIdentity {
    /// Loads the identity in `dir`, creating it (CA and a server certificate
    /// for `names`, DNS names or IP addresses) if `dir` has none.
    /// A loaded server certificate with a third of its life or less left
    /// is reissued from the CA (when its key is here) and saved.
    pub fn load_or_create(dir: &Path, names: &[String]) -> Result<Self, NetError> {
        if dir.join(SERVER_CERT_FILE).exists() {
            let mut identity = Self::load(dir)?;
            identity.rotate_if_due(dir, names, pki::unix_now())?;
            Ok(identity)
        } else {
            Self::create(dir, names)
        }
    }

    /// Reissues the server certificate for `names` when a third of its
    /// lifetime or less is left at `now`, saving it in `dir`; returns
    /// whether it did. Without the CA key here it only warns (or fails,
    /// once the certificate has expired): rotate it where the key is.
    pub fn rotate_if_due(
        &mut self,
        dir: &Path,
        names: &[String],
        now: i64,
    ) -> Result<bool, NetError> {
        let info = CertInfo::parse(&self.cert_chain[0]).map_err(tls_err)?;
        let (lifetime, left) = (info.not_after - info.not_before, info.not_after - now);
        if left * 3 > lifetime {
            return Ok(false);
        }
        let Some(ca) = &self.ca else {
            if left <= 0 {
                return Err(NetError::Tls(format!(
                    "the server certificate in {} expired at {}; reissue it where the CA key is (`fedveil-server run` there renews it)",
                    dir.display(),
                    pki::format_time(info.not_after)
                )));
            }
            tracing::warn!(expires = %pki::format_time(info.not_after), "the server certificate expires soon and the CA key is not here to reissue it");
            return Ok(false);
        };
        let (cert_chain, key) = ca.issue_server(names).map_err(tls_err)?;
        self.cert_chain = cert_chain;
        self.key = key;
        self.save(dir)?;
        let renewed = CertInfo::parse(&self.cert_chain[0]).map_err(tls_err)?;
        tracing::info!(serial = %renewed.serial, valid_until = %pki::format_time(renewed.not_after), "server certificate reissued");
        Ok(true)
    }

    /// Creates a fresh CA and server certificate in `dir`. Keys are written
    /// with mode 0600.
    pub fn create(dir: &Path, names: &[String]) -> Result<Self, NetError> {
        let identity = Self::generate(names)?;
        identity.save(dir)?;
        Ok(identity)
    }

    /// A fresh CA and a server certificate for `names` (DNS names or IP
    /// addresses), in memory.
    pub fn generate(names: &[String]) -> Result<Self, NetError> {
        let ca = CertificateAuthority::generate().map_err(tls_err)?;
        let (cert_chain, key) = ca.issue_server(names).map_err(tls_err)?;
        Ok(Self {
            ca_cert_pem: ca.cert_pem(),
            ca: Some(ca),
            cert_chain,
            key,
        })
    }

    /// SHA-256 fingerprint of the CA certificate, which nodes pin.
    pub fn ca_fingerprint(&self) -> String {
        let der = CertificateDer::from_pem_slice(self.ca_cert_pem.as_bytes())
            .expect("the CA certificate was parsed when loaded");
        pki::fingerprint(&der)
    }

    /// Writes the identity's files into `dir` (keys with mode 0600).
    pub fn save(&self, dir: &Path) -> Result<(), NetError> {
        std::fs::create_dir_all(dir).map_err(file_err(dir))?;
        let write = |name: &str, bytes: &[u8], secret: bool| {
            pki::write_atomic(&dir.join(name), bytes, secret).map_err(tls_err)
        };
        write(CA_CERT_FILE, self.ca_cert_pem.as_bytes(), false)?;
        if let Some(ca) = &self.ca {
            write(CA_KEY_FILE, ca.key_pem().as_bytes(), true)?;
        }
        let certs: String = self
            .cert_chain
            .iter()
            .map(|c| pki::pem_block("CERTIFICATE", c.as_ref()))
            .collect();
        write(SERVER_CERT_FILE, certs.as_bytes(), false)?;
        let key = pki::pem_block("PRIVATE KEY", self.key.secret_der());
        write(SERVER_KEY_FILE, key.as_bytes(), true)
    }

    /// Loads the identity in `dir`; the CA key is optional (an operator may
    /// keep it offline and enrol nodes elsewhere).
    pub fn load(dir: &Path) -> Result<Self, NetError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(file_err(&path))
        };
        let mut cert_chain = CertificateDer::pem_slice_iter(&read(SERVER_CERT_FILE)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(tls_err)?;
        let key = PrivateKeyDer::from_pem_slice(
            &pki::read_secret(&dir.join(SERVER_KEY_FILE)).map_err(tls_err)?,
        )
        .map_err(tls_err)?;
        let ca_cert_pem = String::from_utf8(read(CA_CERT_FILE)?).map_err(tls_err)?;
        let ca_der = CertificateDer::from_pem_slice(ca_cert_pem.as_bytes()).map_err(tls_err)?;
        // Directories from before enrolment hold the server certificate alone.
        if cert_chain.len() == 1 {
            cert_chain.push(ca_der);
        }
        let ca_key = dir.join(CA_KEY_FILE);
        let ca = if ca_key.exists() {
            let key_pem =
                String::from_utf8(pki::read_secret(&ca_key).map_err(tls_err)?).map_err(tls_err)?;
            Some(CertificateAuthority::from_pem(&ca_cert_pem, &key_pem).map_err(tls_err)?)
        } else {
            None
        };
        Ok(Self {
            ca_cert_pem,
            ca,
            cert_chain,
            key,
        })
    }
}

fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE_INTERVAL));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(MAX_IDLE_TIMEOUT).expect("idle timeout in range"),
    ));
    // One control stream per connection; nothing else is accepted.
    t.max_concurrent_uni_streams(0u8.into());
    t.max_concurrent_bidi_streams(1u8.into());
    Arc::new(t)
}

/// Why the node registry refuses a certificate our CA signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryRejection {
    /// The registry never issued this certificate.
    #[error("certificate {serial} of node '{name}' is not in the node registry")]
    Unknown {
        /// The certificate's node name.
        name: String,
        /// The certificate's serial.
        serial: String,
    },
    /// The certificate, or its node, is revoked.
    #[error("certificate {serial} of node '{name}' was revoked")]
    Revoked {
        /// The certificate's node name.
        name: String,
        /// The certificate's serial.
        serial: String,
    },
    /// The registry could not be asked.
    #[error("the node registry cannot be read: {0}")]
    Unavailable(String),
}

/// The server's list of enrolled nodes, consulted on every handshake so a
/// revocation takes effect for the next connection.
pub trait NodeRegistry: Send + Sync {
    /// Accepts `cert` or says why not.
    fn check(&self, cert: &CertInfo) -> Result<(), RegistryRejection>;
}

/// Client-certificate policy: a certificate, when presented, must chain to
/// our CA, be within its validity, be for client auth, and be live in the
/// registry. A connection without one is let through the handshake only so
/// it can enrol; the driver closes any other such connection.
struct NodeCertVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    registry: Arc<dyn NodeRegistry>,
}

impl std::fmt::Debug for NodeCertVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeCertVerifier")
    }
}

impl ClientCertVerifier for NodeCertVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let info = CertInfo::parse(end_entity).ok();
        let (name, serial) = info
            .as_ref()
            .map_or(("?", "?"), |i| (i.name.as_str(), i.serial.as_str()));
        if let Err(err) = self
            .chain
            .verify_client_cert(end_entity, intermediates, now)
        {
            tracing::warn!(node = name, serial, %err, "client certificate rejected");
            return Err(err);
        }
        let Some(info) = &info else {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::BadEncoding,
            ));
        };
        match self.registry.check(info) {
            Ok(()) => Ok(ClientCertVerified::assertion()),
            Err(rejection) => {
                tracing::warn!(node = name, serial, %rejection, "client certificate rejected");
                Err(rustls::Error::InvalidCertificate(match rejection {
                    RegistryRejection::Revoked { .. } => rustls::CertificateError::Revoked,
                    _ => rustls::CertificateError::ApplicationVerificationFailure,
                }))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

fn roots(ca_cert_pem: &str) -> Result<rustls::RootCertStore, NetError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_cert_pem.as_bytes()) {
        roots.add(cert.map_err(tls_err)?).map_err(tls_err)?;
    }
    if roots.is_empty() {
        return Err(NetError::Tls("the CA file holds no certificate".into()));
    }
    Ok(roots)
}

/// A quinn server config for `identity` (TLS 1.3 only). With a `registry`,
/// client certificates are checked against it and nodes may enrol (ALPN
/// [`ENROL_ALPN`]); without one, clients are not authenticated.
pub fn server_config(
    identity: &ServerIdentity,
    registry: Option<Arc<dyn NodeRegistry>>,
) -> Result<quinn::ServerConfig, NetError> {
    let builder = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?;
    let builder = match registry {
        Some(registry) => {
            let chain = WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(&identity.ca_cert_pem)?),
                crypto_provider(),
            )
            .allow_unauthenticated()
            .build()
            .map_err(tls_err)?;
            builder.with_client_cert_verifier(Arc::new(NodeCertVerifier { chain, registry }))
        }
        None => builder.with_no_client_auth(),
    };
    let mut tls = builder
        .with_single_cert(identity.cert_chain.clone(), identity.key.clone_key())
        .map_err(tls_err)?;
    tls.alpn_protocols = vec![ALPN.to_vec(), ENROL_ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(tls_err)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport());
    Ok(config)
}

fn finish_client_config(
    builder: rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>,
    identity: Option<&NodeIdentity>,
    alpn: &[u8],
) -> Result<quinn::ClientConfig, NetError> {
    let mut tls = match identity {
        Some(id) => builder
            .with_client_auth_cert(vec![id.cert_der().clone()], id.private_key())
            .map_err(tls_err)?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(tls_err)?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport());
    Ok(config)
}

/// A quinn client config that trusts only the CA in `ca_cert_pem` and, with
/// an `identity`, authenticates as that enrolled node (mutual TLS).
pub fn client_config(
    ca_cert_pem: &str,
    identity: Option<&NodeIdentity>,
) -> Result<quinn::ClientConfig, NetError> {
    let builder = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_root_certificates(roots(ca_cert_pem)?);
    finish_client_config(builder, identity, ALPN)
}

/// The client config of an enrolment connection: the server must present
/// a chain ending in the CA whose SHA-256 is `ca_fingerprint` (the node has
/// no CA file yet). With an `identity`, the node authenticates with its
/// current certificate (renewal).
pub fn enrol_client_config(
    ca_fingerprint: [u8; 32],
    identity: Option<&NodeIdentity>,
) -> Result<quinn::ClientConfig, NetError> {
    let builder = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCaVerifier {
            fingerprint: ca_fingerprint,
        }));
    finish_client_config(builder, identity, ENROL_ALPN)
}

/// Server-certificate check for enrolment: find the pinned CA in the chain
/// the server sent, then verify the chain and name against it as usual.
#[derive(Debug)]
struct PinnedCaVerifier {
    fingerprint: [u8; 32],
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use sha2::Digest;
        let ca = intermediates
            .iter()
            .find(|c| sha2::Sha256::digest(c.as_ref()).as_slice() == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the server's CA does not match the pinned fingerprint {}",
                    hex::encode(self.fingerprint)
                ))
            })?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            crypto_provider(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &crypto_provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &crypto_provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        crypto_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The ALPN protocol a connection negotiated.
pub fn negotiated_alpn(connection: &quinn::Connection) -> Option<Vec<u8>> {
    connection
        .handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

/// The client certificate a connection authenticated with, if any (the
/// verifier already checked it).
pub fn peer_certificate(connection: &quinn::Connection) -> Option<(Vec<u8>, CertInfo)> {
    let chain = connection
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    let der = chain.first()?.to_vec();
    let info = CertInfo::parse(&der).ok()?;
    Some((der, info))
}

/// Why the server refused this node, from what a failed connection says:
/// a TLS alert (the handshake rejected the certificate), an application
/// close with [`CLOSE_UNAUTHORIZED`], or a local verification failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The server wants a client certificate and got none.
    #[error(
        "the server requires a client certificate: enrol this node first (`fedveil-client enroll`)"
    )]
    NoCertificate,
    /// The certificate is from another CA.
    #[error(
        "the server does not trust this node's certificate (issued by another CA): enrol with this server (`fedveil-client enroll`)"
    )]
    UnknownCa,
    /// The certificate is outside its validity.
    #[error(
        "the server says this node's certificate has expired or is not yet valid (check both clocks); an expired certificate cannot be renewed: ask the operator for a new token and enrol again"
    )]
    Expired,
    /// The node was revoked.
    #[error(
        "this node's certificate was revoked by the server's operator: ask them to enrol it again (`fedveil-server enroll`)"
    )]
    Revoked,
    /// The registry never issued the certificate.
    #[error(
        "the server does not know this node's certificate (not in its node registry): ask the operator for a token and enrol again"
    )]
    NotInRegistry,
    /// Another TLS alert.
    #[error("the server refused this node's certificate (TLS alert {0})")]
    OtherAlert(u8),
    /// An application close with a reason.
    #[error("the server refused this node: {0}")]
    Refused(String),
    /// The connection's certificate ended (expired or superseded by a
    /// renewal): reconnect with the current one.
    #[error("the server closed the connection: {0}")]
    CertificateEnded(String),
    /// The server's certificate failed this node's checks.
    #[error("this node does not trust the server: {0}")]
    ServerUntrusted(String),
}

/// TLS alert numbers (RFC 8446 section 6).
mod alert {
    pub const BAD_CERTIFICATE: u8 = 42;
    /// A chain whose signature does not verify (e.g. another CA with the
    /// same name).
    pub const DECRYPT_ERROR: u8 = 51;
    pub const CERTIFICATE_REVOKED: u8 = 44;
    pub const CERTIFICATE_EXPIRED: u8 = 45;
    pub const UNKNOWN_CA: u8 = 48;
    pub const ACCESS_DENIED: u8 = 49;
    pub const CERTIFICATE_REQUIRED: u8 = 116;
}

/// QUIC carries a TLS alert as transport error 0x100 + alert.
fn crypto_alert(code: quinn::TransportErrorCode) -> Option<u8> {
    let code = u64::from(code);
    (0x100..0x200).contains(&code).then(|| (code - 0x100) as u8)
}

/// Classifies a connection failure as a refusal of this node, if it is one.
pub fn rejection(err: &quinn::ConnectionError) -> Option<Rejection> {
    use quinn::ConnectionError as E;
    let from_alert = |a: u8| match a {
        alert::CERTIFICATE_REQUIRED => Rejection::NoCertificate,
        alert::UNKNOWN_CA | alert::BAD_CERTIFICATE | alert::DECRYPT_ERROR => Rejection::UnknownCa,
        alert::CERTIFICATE_EXPIRED => Rejection::Expired,
        alert::CERTIFICATE_REVOKED => Rejection::Revoked,
        alert::ACCESS_DENIED => Rejection::NotInRegistry,
        other => Rejection::OtherAlert(other),
    };
    match err {
        // The server sent the alert.
        E::ConnectionClosed(close) => crypto_alert(close.error_code).map(from_alert),
        // We failed the handshake ourselves: we do not trust the server.
        E::TransportError(e) => crypto_alert(e.code).map(|_| {
            // The classic "enrols but never connects": a host that is not
            // in the server certificate.
            let hint = if e.reason.contains("not valid for name") {
                " (the host you dialled is not a name in the server's certificate: use one of the names given to `fedveil-server init --name`)"
            } else {
                ""
            };
            Rejection::ServerUntrusted(format!("{}{hint}", e.reason))
        }),
        E::ApplicationClosed(close)
            if close.error_code == quinn::VarInt::from_u32(CLOSE_UNAUTHORIZED) =>
        {
            Some(Rejection::Refused(
                String::from_utf8_lossy(&close.reason).into_owned(),
            ))
        }
        E::ApplicationClosed(close)
            if close.error_code == quinn::VarInt::from_u32(CLOSE_CERT_ENDED) =>
        {
            Some(Rejection::CertificateEnded(
                String::from_utf8_lossy(&close.reason).into_owned(),
            ))
        }
        _ => None,
    }
}

impl NetError {
    /// The refusal behind this error, if the server refused this node.
    pub fn rejection(&self) -> Option<Rejection> {
        match self {
            NetError::Connection(e) => rejection(e),
            NetError::Read(quinn::ReadError::ConnectionLost(e)) => rejection(e),
            NetError::Write(quinn::WriteError::ConnectionLost(e)) => rejection(e),
            _ => None,
        }
    }
}

/// The name a client checks the server certificate against: the host part
/// of `HOST:PORT` (an IP address is matched against IP SANs).
pub fn server_name(host: &str) -> &str {
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Whether `name` is an IP address (for certificate SANs).
pub fn is_ip(name: &str) -> bool {
    name.parse::<IpAddr>().is_ok()
}

/// Writes one message; returns the bytes put on the stream.
pub async fn write_message(send: &mut quinn::SendStream, msg: &Message) -> Result<u64, NetError> {
    let frame = encode(msg)?;
    send.write_all(&frame.head).await?;
    send.write_all(&frame.payload).await?;
    Ok(frame.len() as u64)
}

/// Reads messages from a stream through a [`FrameDecoder`].
pub struct MessageReader {
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    ready: std::collections::VecDeque<Message>,
    bytes_read: u64,
}

impl MessageReader {
    /// Reads frames from `recv`, none larger than `limits` allow.
    pub fn new(recv: quinn::RecvStream, limits: FrameLimits) -> Self {
        Self {
            recv,
            decoder: FrameDecoder::new(limits),
            ready: Default::default(),
            bytes_read: 0,
        }
    }

    /// Reads frames from `recv`, the first within `first` (a hello: see
    /// [`FrameLimits::hello`]), the rest within `limits`.
    pub fn with_first_frame(
        recv: quinn::RecvStream,
        first: FrameLimits,
        limits: FrameLimits,
    ) -> Self {
        Self {
            decoder: FrameDecoder::with_first_frame(first, limits),
            ..Self::new(recv, limits)
        }
    }

    /// Bytes read from the stream so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// The next message; `Ok(None)` when the peer finished the stream cleanly.
    pub async fn next(&mut self) -> Result<Option<Message>, NetError> {
        loop {
            if let Some(msg) = self.ready.pop_front() {
                return Ok(Some(msg));
            }
            match self.recv.read_chunk(READ_CHUNK_BYTES, true).await? {
                Some(chunk) => {
                    self.bytes_read += chunk.bytes.len() as u64;
                    self.ready.extend(self.decoder.push(&chunk.bytes)?);
                }
                None => {
                    self.decoder.finish()?;
                    return Ok(None);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_created_identity_keeps_its_keys_private_and_loads_back_with_its_ca() {
        let dir = std::env::temp_dir().join(format!("fedveil-identity-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let created = ServerIdentity::create(&dir, &["localhost".into()]).unwrap();
        #[cfg(unix)]
        for (file, mode) in [
            (CA_KEY_FILE, 0o600),
            (SERVER_KEY_FILE, 0o600),
            (CA_CERT_FILE, 0o644),
        ] {
            use std::os::unix::fs::PermissionsExt;
            let m = std::fs::metadata(dir.join(file))
                .unwrap()
                .permissions()
                .mode();
            if mode == 0o600 {
                assert_eq!(m & 0o077, 0, "{file} is private");
            } else {
                assert_ne!(m & 0o044, 0, "{file} is readable");
            }
        }
        let loaded = ServerIdentity::load(&dir).unwrap();
        assert_eq!(loaded.ca_fingerprint(), created.ca_fingerprint());
        assert_eq!(loaded.cert_chain, created.cert_chain);
        assert!(loaded.ca.is_some(), "the CA key is loaded for enrolment");
        // A key others may read is refused, not used.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let key = dir.join(SERVER_KEY_FILE);
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
            let err = ServerIdentity::load(&dir).err().unwrap().to_string();
            assert!(err.contains("readable by others"), "{err}");
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        // Without the key file the server can still serve, not enrol.
        std::fs::remove_file(dir.join(CA_KEY_FILE)).unwrap();
        assert!(ServerIdentity::load(&dir).unwrap().ca.is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Explicit lifetimes: the CA for years, the server certificate for
    /// months, reissued from the CA when a third of it is left.
    #[test]
    fn the_server_certificate_is_reissued_when_a_third_of_its_life_is_left() {
        let dir = std::env::temp_dir().join(format!("fedveil-rotate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let names = vec!["localhost".to_string()];
        let mut identity = ServerIdentity::create(&dir, &names).unwrap();
        let info = |id: &ServerIdentity| CertInfo::parse(&id.cert_chain[0]).unwrap();
        let ca = identity.ca.as_ref().unwrap();
        let ca_life = ca.not_after().unwrap() - pki::unix_now();
        assert!(
            (ca_life - pki::CA_CERT_TTL.as_secs() as i64).abs() < 60,
            "{ca_life}"
        );
        let first = info(&identity);
        let life = first.not_after - first.not_before;
        assert!((life - (pki::SERVER_CERT_TTL + pki::CERT_BACKDATE).as_secs() as i64).abs() < 60);
        // Half its life left: kept.
        assert!(
            !identity
                .rotate_if_due(&dir, &names, first.not_before + life / 2)
                .unwrap()
        );
        // A quarter left: reissued, saved, and it chains to the same CA.
        let late = first.not_before + life * 3 / 4;
        assert!(identity.rotate_if_due(&dir, &names, late).unwrap());
        let second = info(&ServerIdentity::load(&dir).unwrap());
        assert_ne!(second.serial, first.serial);
        assert_eq!(second.serial, info(&identity).serial);
        // Without the CA key an expired certificate is an error that says
        // where to renew it.
        std::fs::remove_file(dir.join(CA_KEY_FILE)).unwrap();
        let mut keyless = ServerIdentity::load(&dir).unwrap();
        let err = keyless
            .rotate_if_due(&dir, &names, second.not_after + 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("expired"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tls_alerts_become_rejections_a_user_can_act_on() {
        use quinn::{ConnectionError, TransportErrorCode};
        let closed = |alert: u8| {
            ConnectionError::ConnectionClosed(quinn::ConnectionClose {
                error_code: TransportErrorCode::crypto(alert),
                frame_type: None,
                reason: Default::default(),
            })
        };
        assert_eq!(rejection(&closed(44)), Some(Rejection::Revoked));
        assert_eq!(rejection(&closed(45)), Some(Rejection::Expired));
        assert_eq!(rejection(&closed(48)), Some(Rejection::UnknownCa));
        assert_eq!(rejection(&closed(49)), Some(Rejection::NotInRegistry));
        assert_eq!(rejection(&closed(116)), Some(Rejection::NoCertificate));
        assert_eq!(rejection(&closed(80)), Some(Rejection::OtherAlert(80)));
        let unauthorized = ConnectionError::ApplicationClosed(quinn::ApplicationClose {
            error_code: CLOSE_UNAUTHORIZED.into(),
            reason: "revoked".into(),
        });
        assert_eq!(
            rejection(&unauthorized),
            Some(Rejection::Refused("revoked".into()))
        );
        let busy = ConnectionError::ApplicationClosed(quinn::ApplicationClose {
            error_code: CLOSE_REFUSED.into(),
            reason: Default::default(),
        });
        assert_eq!(
            rejection(&busy),
            None,
            "a full server is not a refusal of the node"
        );
        assert_eq!(rejection(&ConnectionError::TimedOut), None);
    }
}
