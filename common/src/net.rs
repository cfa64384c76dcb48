//! The only I/O in `fedveil-common` (behind the `net` feature): TLS 1.3
//! identities and configs for quinn, and moving [`Message`]s over a QUIC
//! stream through the sans-IO codec. Server and client drivers share it.
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
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject};

use crate::wire::{CodecError, FrameDecoder, FrameLimits, Message, encode};

/// ALPN protocol id; a peer speaking anything else fails the handshake.
pub const ALPN: &[u8] = b"fedveil/1";
/// Keep-alive interval, so a connection survives long local training.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// A silent peer is considered gone after this long.
pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest piece read from a stream at once.
pub const READ_CHUNK_BYTES: usize = 1 << 20;
/// Application close code: normal end of a run.
pub const CLOSE_OK: u32 = 0;
/// Application close code: the peer was refused (see the error message).
pub const CLOSE_REFUSED: u32 = 1;

/// What can go wrong at the transport level.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{0}")]
    Codec(#[from] CodecError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("read: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("tls: {0}")]
    Tls(String),
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
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
pub const CA_KEY_FILE: &str = "ca.key";
pub const SERVER_CERT_FILE: &str = "server.pem";
pub const SERVER_KEY_FILE: &str = "server.key";

/// The server's TLS identity: its own CA and a server certificate it signed.
/// Clients pin the CA certificate.
pub struct ServerIdentity {
    pub ca_cert_pem: String,
    /// The CA's signing key; `None` when loaded (it stays on disk).
    pub ca_key_pem: Option<String>,
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl ServerIdentity {
    /// Loads the identity in `dir`, creating it (CA and a server certificate
    /// for `names`, DNS names or IP addresses) if `dir` has none.
    pub fn load_or_create(dir: &Path, names: &[String]) -> Result<Self, NetError> {
        if dir.join(SERVER_CERT_FILE).exists() {
            Self::load(dir)
        } else {
            Self::create(dir, names)
        }
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
        if names.is_empty() {
            return Err(NetError::Tls(
                "the server certificate needs at least one name".into(),
            ));
        }
        let ca_key = KeyPair::generate().map_err(tls_err)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(tls_err)?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "fedveil CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key).map_err(tls_err)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate().map_err(tls_err)?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(tls_err)?;
        params
            .distinguished_name
            .push(DnType::CommonName, names[0].as_str());
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = params.signed_by(&server_key, &issuer).map_err(tls_err)?;
        Ok(Self {
            ca_cert_pem: ca_cert.pem(),
            ca_key_pem: Some(issuer.key().serialize_pem()),
            cert_chain: vec![server_cert.der().clone()],
            key: PrivatePkcs8KeyDer::from(server_key.serialize_der()).into(),
        })
    }

    /// Writes the identity's files into `dir` (keys with mode 0600).
    pub fn save(&self, dir: &Path) -> Result<(), NetError> {
        std::fs::create_dir_all(dir).map_err(file_err(dir))?;
        write_file(&dir.join(CA_CERT_FILE), self.ca_cert_pem.as_bytes(), false)?;
        if let Some(ca_key) = &self.ca_key_pem {
            write_file(&dir.join(CA_KEY_FILE), ca_key.as_bytes(), true)?;
        }
        let certs: String = self
            .cert_chain
            .iter()
            .map(|c| pem_block("CERTIFICATE", c.as_ref()))
            .collect();
        write_file(&dir.join(SERVER_CERT_FILE), certs.as_bytes(), false)?;
        let key = pem_block("PRIVATE KEY", self.key.secret_der());
        write_file(&dir.join(SERVER_KEY_FILE), key.as_bytes(), true)
    }

    pub fn load(dir: &Path) -> Result<Self, NetError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(file_err(&path))
        };
        let cert_chain = CertificateDer::pem_slice_iter(&read(SERVER_CERT_FILE)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(tls_err)?;
        let key = PrivateKeyDer::from_pem_slice(&read(SERVER_KEY_FILE)?).map_err(tls_err)?;
        let ca_cert_pem = String::from_utf8(read(CA_CERT_FILE)?).map_err(tls_err)?;
        Ok(Self {
            ca_cert_pem,
            ca_key_pem: None,
            cert_chain,
            key,
        })
    }
}

fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<(), NetError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let _ = secret;
    let mut f = options.open(path).map_err(file_err(path))?;
    f.write_all(bytes).map_err(file_err(path))?;
    f.sync_all().map_err(file_err(path))
}

/// PEM armour for DER bytes.
fn pem_block(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der.to_vec()))
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

/// A quinn server config for `identity` (TLS 1.3 only).
pub fn server_config(identity: &ServerIdentity) -> Result<quinn::ServerConfig, NetError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_no_client_auth()
        .with_single_cert(identity.cert_chain.clone(), identity.key.clone_key())
        .map_err(tls_err)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(tls_err)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport());
    Ok(config)
}

/// A quinn client config that trusts only the CA in `ca_cert_pem`.
pub fn client_config(ca_cert_pem: &str) -> Result<quinn::ClientConfig, NetError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_cert_pem.as_bytes()) {
        roots.add(cert.map_err(tls_err)?).map_err(tls_err)?;
    }
    if roots.is_empty() {
        return Err(NetError::Tls("the CA file holds no certificate".into()));
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(tls_err)?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport());
    Ok(config)
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
    pub fn new(recv: quinn::RecvStream, limits: FrameLimits) -> Self {
        Self {
            recv,
            decoder: FrameDecoder::new(limits),
            ready: Default::default(),
            bytes_read: 0,
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
