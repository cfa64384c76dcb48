//! The public-key infrastructure of one fedveil deployment: the server's
//! own certificate authority, the server certificate, client certificates
//! issued from certificate signing requests, and node identities that sign
//! their secure-aggregation keys.
//!
//! Pure: no sockets and no clock; times are Unix seconds passed in by the
//! caller. Keys are ECDSA P-256 (the most widely supported TLS 1.3 client
//! key type). A node's private key is generated on the node and never
//! leaves it: the CA only ever sees its public key, inside a CSR.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyUsagePurpose, SerialNumber, SigningKey,
};
use rustls_pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime, pem::PemObject,
};
use sha2::{Digest, Sha256};

pub use rcgen::KeyPair;

use fedveil_proto::secagg::{AttestationError, KeyAttestor, SignatureCheck, keys_message};
use fedveil_proto::wire::{KeyAttestation, PeerKeys};

/// Default lifetime of a client certificate; nodes renew before it ends.
pub const DEFAULT_CLIENT_CERT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default lifetime of an enrolment token.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// Certificates start this long before they are issued, so a node whose
/// clock is slightly behind the server's can still use a fresh one.
pub const CERT_BACKDATE: Duration = Duration::from_secs(5 * 60);
/// Longest node name.
pub const MAX_NODE_NAME_LEN: usize = 64;
/// Bytes of randomness in an enrolment token.
pub const TOKEN_BYTES: usize = 32;
/// Lifetime of a new CA. Nodes pin its fingerprint, so replacing it means
/// enrolling every node again: long, but not forever.
pub const CA_CERT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Lifetime of a server certificate; the server reissues its own from the
/// CA when a third of it is left (see `ServerIdentity::load_or_create`).
pub const SERVER_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// What can go wrong with keys, certificates and requests.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// The certificate or key could not be generated.
    #[error("certificate generation: {0}")]
    Generate(String),
    /// The certificate signing request is malformed or not self-signed.
    #[error("invalid certificate signing request: {0}")]
    BadCsr(String),
    /// A certificate does not parse, verify or match its key.
    #[error("invalid certificate: {0}")]
    BadCertificate(String),
    /// A node name outside the allowed characters or length.
    #[error(
        "invalid node name {0:?}: use 1-{MAX_NODE_NAME_LEN} letters, digits, '.', '-' or '_', starting with a letter or digit"
    )]
    BadName(String),
    /// A CA fingerprint that is not 32 hex bytes.
    #[error("invalid CA fingerprint {0:?}: expected 64 hex digits (SHA-256), colons allowed")]
    BadFingerprint(String),
    /// A lifetime that does not parse.
    #[error("invalid duration {input:?}: {reason}")]
    BadDuration {
        /// What was given.
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A private key file others may read: refused, as ssh refuses one.
    #[error(
        "{path} holds a private key readable by others (mode {mode:o}); make it private: chmod 600 {path}"
    )]
    KeyReadableByOthers {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A key or certificate file cannot be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

fn gen_err(e: impl std::fmt::Display) -> PkiError {
    PkiError::Generate(e.to_string())
}

/// What a node needs to enrol, as its operator receives it: where the
/// server is, the fingerprint of the CA to pin, and a one-time token.
/// `fedveil-server enroll` prints these three; an embedded server hands
/// them over in process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invitation {
    /// HOST:PORT; HOST must be a name in the server certificate.
    pub server: String,
    /// SHA-256 fingerprint of the CA certificate (see [`fingerprint`]).
    pub ca_fingerprint: String,
    /// The one-time enrolment token.
    pub token: String,
    /// The node name the token was issued for, when known: a node that
    /// gives it has it checked against the token.
    pub node: Option<String>,
}

/// Parses a lifetime such as `90s`, `30m`, `24h`, `30d` or `2w`.
pub fn parse_duration(s: &str) -> Result<Duration, PkiError> {
    let s = s.trim();
    let bad = |reason| PkiError::BadDuration {
        input: s.to_owned(),
        reason,
    };
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| bad("add a unit (s, m, h, d or w)"))?;
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| bad("expected a number followed by s, m, h, d or w"))?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 24 * 3600,
        "w" => 7 * 24 * 3600,
        _ => return Err(bad("unknown unit (use s, m, h, d or w)")),
    };
    match n.checked_mul(unit_secs) {
        Some(secs) if secs > 0 => Ok(Duration::from_secs(secs)),
        Some(_) => Err(bad("must be positive")),
        None => Err(bad("too long")),
    }
}

/// Formats a duration the way [`parse_duration`] reads it (largest unit
/// that divides it).
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    for (unit, size) in [
        ("w", 7 * 24 * 3600),
        ("d", 24 * 3600),
        ("h", 3600),
        ("m", 60),
    ] {
        if secs >= size && secs.is_multiple_of(size) {
            return format!("{}{unit}", secs / size);
        }
    }
    format!("{secs}s")
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SSZ` (UTC), for operators.
pub fn format_time(unix: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("@{unix}"),
    }
}

/// Node names appear in certificates, logs and file names: keep them plain.
pub fn validate_node_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NODE_NAME_LEN
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(PkiError::BadName(name.to_owned()))
    }
}

/// SHA-256 of a certificate's DER bytes, lowercase hex: what operators
/// hand to nodes so they can pin the CA before trusting anything.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Parses a fingerprint as printed by `fingerprint`, by `openssl x509
/// -fingerprint -sha256` (colons, upper case) or with a `sha256:` prefix.
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], PkiError> {
    let bad = || PkiError::BadFingerprint(s.to_owned());
    let trimmed = s.trim();
    let body = trimmed
        .strip_prefix("sha256:")
        .or_else(|| trimmed.strip_prefix("SHA256:"))
        .unwrap_or(trimmed);
    let digits: String = body.chars().filter(|&c| c != ':').collect();
    let bytes = hex::decode(digits.to_ascii_lowercase()).map_err(|_| bad())?;
    bytes.try_into().map_err(|_| bad())
}

/// A fresh enrolment token (hex) and the hash the server keeps of it.
pub fn new_token() -> (String, String) {
    let bytes: [u8; TOKEN_BYTES] = rand::random();
    let token = hex::encode(bytes);
    let hash = token_hash(&token);
    (token, hash)
}

/// The stored form of a token: its SHA-256, so a leaked database does not
/// leak usable tokens.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.trim().as_bytes()))
}

/// The fields of a certificate that the registry and the logs need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Serial number, lowercase hex.
    pub serial: String,
    /// Subject common name: the node name.
    pub name: String,
    /// Start of validity (Unix seconds).
    pub not_before: i64,
    /// End of validity (Unix seconds).
    pub not_after: i64,
}

impl CertInfo {
    /// Reads what a DER certificate says.
    pub fn parse(der: &[u8]) -> Result<Self, PkiError> {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let bad = |e: &dyn std::fmt::Display| PkiError::BadCertificate(e.to_string());
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| bad(&e))?;
        let name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or_else(|| bad(&"no subject common name"))?
            .to_owned();
        Ok(Self {
            serial: hex::encode(cert.raw_serial()),
            name,
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
        })
    }
}

fn offset_time(unix: i64) -> Result<time::OffsetDateTime, PkiError> {
    time::OffsetDateTime::from_unix_timestamp(unix).map_err(gen_err)
}

/// A random positive 16-byte serial (RFC 5280: at most 20 bytes, unique
/// per CA; 126 random bits make collisions irrelevant).
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// PEM armour for DER bytes.
pub fn pem_block(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der.to_vec()))
}

/// The server's certificate authority. Its key signs the server
/// certificate and every client certificate; it lives only on the server.
pub struct CertificateAuthority {
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

/// A certificate the CA issued to a node.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// The certificate, DER.
    pub der: Vec<u8>,
    /// What it says.
    pub info: CertInfo,
}

impl CertificateAuthority {
    /// A fresh CA (path length 0: it signs only end-entity certificates).
    pub fn generate() -> Result<Self, PkiError> {
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        // A distinct subject per CA: certificates of another deployment's
        // CA then fail as "unknown CA", not as a bad signature.
        let tag: [u8; 6] = rand::random();
        params.distinguished_name.push(
            DnType::CommonName,
            format!("fedveil CA {}", hex::encode(tag)),
        );
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(random_serial());
        let now = unix_now();
        params.not_before = offset_time(now - CERT_BACKDATE.as_secs() as i64)?;
        params.not_after = offset_time(now + CA_CERT_TTL.as_secs() as i64)?;
        let cert = params.self_signed(&key).map_err(gen_err)?;
        Ok(Self {
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its certificate and private key (PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(gen_err)?;
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
        let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(gen_err)?;
        Ok(Self { cert, issuer })
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// When the CA certificate expires (Unix seconds).
    pub fn not_after(&self) -> Result<i64, PkiError> {
        Ok(CertInfo::parse(&self.cert)?.not_after)
    }

    /// `not_after`, no later than the CA's own expiry: a certificate the
    /// CA cannot vouch for to its end would fail chain checks early.
    fn clamp(&self, not_after: i64) -> Result<i64, PkiError> {
        Ok(not_after.min(self.not_after()?))
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        pem_block("CERTIFICATE", &self.cert)
    }

    /// The CA's private key, PEM (secret: save with mode 0600).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The SHA-256 fingerprint nodes pin.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert)
    }

    /// A server certificate for `names` (DNS names or IP addresses, each
    /// becoming a SAN of the right type) and its key. The chain holds the
    /// CA certificate too, so an enrolling node can check it against the
    /// pinned fingerprint.
    pub fn issue_server(
        &self,
        names: &[String],
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PkiError> {
        if names.is_empty() {
            return Err(PkiError::Generate(
                "the server certificate needs at least one name".into(),
            ));
        }
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(gen_err)?;
        params
            .distinguished_name
            .push(DnType::CommonName, names[0].as_str());
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(random_serial());
        let now = unix_now();
        params.not_before = offset_time(now - CERT_BACKDATE.as_secs() as i64)?;
        params.not_after = offset_time(self.clamp(now + SERVER_CERT_TTL.as_secs() as i64)?)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(gen_err)?;
        Ok((
            vec![cert.der().clone(), self.cert.clone()],
            PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        ))
    }

    /// Signs a node's CSR. The CSR proves possession of the key (its
    /// signature is checked) and contributes only the public key: name,
    /// usages and validity are the CA's choice, never the requester's.
    pub fn issue_client(
        &self,
        csr_der: &[u8],
        name: &str,
        not_before: i64,
        not_after: i64,
    ) -> Result<IssuedCert, PkiError> {
        validate_node_name(name)?;
        let csr = CertificateSigningRequestParams::from_der(&csr_der.into())
            .map_err(|e| PkiError::BadCsr(e.to_string()))?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(random_serial());
        params.not_before = offset_time(not_before)?;
        params.not_after = offset_time(self.clamp(not_after)?)?;
        let request = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        };
        let cert = request.signed_by(&self.issuer).map_err(gen_err)?;
        let der = cert.der().to_vec();
        let info = CertInfo::parse(&der)?;
        Ok(IssuedCert { der, info })
    }
}

/// A fresh node key and a CSR for `name` signed with it.
pub fn new_key_and_csr(name: &str) -> Result<(KeyPair, Vec<u8>), PkiError> {
    validate_node_name(name)?;
    let key = KeyPair::generate().map_err(gen_err)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
    params.distinguished_name.push(DnType::CommonName, name);
    let csr = params.serialize_request(&key).map_err(gen_err)?;
    Ok((key, csr.der().to_vec()))
}

/// File names inside a node's directory.
pub const NODE_IDENTITY_FILE: &str = "node.pem";
/// The CA certificate a node trusts, in its directory.
pub const NODE_CA_FILE: &str = "ca.pem";

/// An enrolled node: its private key, the certificate the CA issued for
/// it, and the CA certificate it trusts.
pub struct NodeIdentity {
    key: KeyPair,
    cert: CertificateDer<'static>,
    ca: CertificateDer<'static>,
    info: CertInfo,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Clone for NodeIdentity {
    fn clone(&self) -> Self {
        Self {
            key: KeyPair::try_from(self.key.serialize_der()).expect("a key re-parses"),
            cert: self.cert.clone(),
            ca: self.ca.clone(),
            info: self.info.clone(),
        }
    }
}

impl NodeIdentity {
    /// Pairs `key` with its issued certificate, checking they belong
    /// together and that the certificate chains to `ca`.
    pub fn new(key: KeyPair, cert_der: Vec<u8>, ca_der: Vec<u8>) -> Result<Self, PkiError> {
        let cert = CertificateDer::from(cert_der);
        let info = CertInfo::parse(&cert)?;
        let ee = webpki::EndEntityCert::try_from(&cert)
            .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
        // The certificate must carry our public key.
        let probe = b"fedveil key check";
        let sig = key.sign(probe).map_err(gen_err)?;
        ee.verify_signature(webpki::ring::ECDSA_P256_SHA256, probe, &sig)
            .map_err(|_| {
                PkiError::BadCertificate("the certificate is not for this node's key".into())
            })?;
        let ca = CertificateDer::from(ca_der);
        webpki::anchor_from_trusted_cert(&ca)
            .map_err(|e| PkiError::BadCertificate(format!("CA certificate: {e}")))?;
        // Signed by that CA, for client authentication, at its own start
        // (expiry is the caller's to judge: an expired node asks to enrol
        // again, with its own message).
        PeerVerifier::new(ca.clone())
            .verify_cert(&cert, info.not_before)
            .map_err(|e| {
                PkiError::BadCertificate(format!("the certificate does not chain to the CA: {e}"))
            })?;
        Ok(Self {
            key,
            cert,
            ca,
            info,
        })
    }

    /// What the node's certificate says.
    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    /// The node's name, from its certificate.
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// The node's certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The CA certificate the node trusts, DER.
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca
    }

    /// The CA certificate the node trusts, PEM.
    pub fn ca_pem(&self) -> String {
        pem_block("CERTIFICATE", &self.ca)
    }

    /// The private key, for rustls.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivatePkcs8KeyDer::from(self.key.serialize_der()).into()
    }

    /// Seconds of validity left at `now` (negative once expired).
    pub fn remaining(&self, now: i64) -> i64 {
        self.info.not_after - now
    }

    /// Whether to renew at `now`: once less than a third of the
    /// lifetime is left (when the server's registry opens renewal), or
    /// less than `renew_before` if that is shorter.
    pub fn renewal_due(&self, now: i64, renew_before: Option<Duration>) -> bool {
        let lifetime = self.info.not_after - self.info.not_before;
        let threshold =
            renew_before.map_or(lifetime / 3, |d| (d.as_secs() as i64).min(lifetime / 3));
        self.remaining(now) <= threshold
    }

    /// Writes the identity to `dir`: `node.pem` (certificate and key, mode
    /// 0600) and `ca.pem`, each replaced atomically so a crash never leaves
    /// a key without its certificate.
    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        std::fs::create_dir_all(dir).map_err(file_err(dir))?;
        let bundle = format!(
            "{}{}",
            pem_block("CERTIFICATE", &self.cert),
            self.key.serialize_pem()
        );
        write_atomic(&dir.join(NODE_IDENTITY_FILE), bundle.as_bytes(), true)?;
        write_atomic(&dir.join(NODE_CA_FILE), self.ca_pem().as_bytes(), false)
    }

    /// Loads the identity `save` wrote.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(file_err(&path))
        };
        let bundle = read_secret(&dir.join(NODE_IDENTITY_FILE))?;
        let cert = CertificateDer::from_pem_slice(&bundle)
            .map_err(|e| PkiError::BadCertificate(format!("{NODE_IDENTITY_FILE}: {e}")))?;
        let key_der = PrivateKeyDer::from_pem_slice(&bundle)
            .map_err(|e| PkiError::BadCertificate(format!("{NODE_IDENTITY_FILE} key: {e}")))?;
        let key = KeyPair::try_from(&key_der).map_err(gen_err)?;
        let ca = CertificateDer::from_pem_slice(&read(NODE_CA_FILE)?)
            .map_err(|e| PkiError::BadCertificate(format!("{NODE_CA_FILE}: {e}")))?;
        Self::new(key, cert.to_vec(), ca.to_vec())
    }
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::File {
        path: path.to_owned(),
        source,
    }
}

/// Reads a private key file, refusing one that others may read (any
/// group or other permission bit, on Unix).
pub fn read_secret(path: &Path) -> Result<Vec<u8>, PkiError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(file_err(path))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(PkiError::KeyReadableByOthers {
                path: path.to_owned(),
                mode: mode & 0o777,
            });
        }
    }
    std::fs::read(path).map_err(file_err(path))
}

/// Writes `bytes` to `path` (mode 0600 when `secret`), durably and
/// atomically: a temporary file of a unique name, created exclusively (so
/// neither a file nor a symbolic link planted under that name is followed
/// or reused), synced, renamed over `path`, and the directory synced so
/// the rename itself survives a crash.
pub fn write_atomic(path: &Path, bytes: &[u8], secret: bool) -> Result<(), PkiError> {
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let _ = secret;
    let written = (|| {
        let mut f = options.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(source) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(PkiError::File {
            path: path.to_owned(),
            source,
        });
    }
    #[cfg(unix)]
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(file_err(dir))?;
    Ok(())
}

/// Checks node certificates against one CA: what a client needs to trust
/// its peers' SecAgg keys without trusting the server that relays them.
#[derive(Debug, Clone)]
pub struct PeerVerifier {
    ca: CertificateDer<'static>,
}

impl PeerVerifier {
    /// Trusts node certificates issued by `ca`.
    pub fn new(ca: CertificateDer<'static>) -> Self {
        Self { ca }
    }

    /// Verifies that `cert` is a client certificate of our CA valid at
    /// `now`, and returns its node name.
    pub fn verify_cert(&self, cert: &[u8], now: i64) -> Result<String, PkiError> {
        let bad = |e: webpki::Error| PkiError::BadCertificate(e.to_string());
        let anchor = webpki::anchor_from_trusted_cert(&self.ca).map_err(bad)?;
        let der = CertificateDer::from(cert);
        let ee = webpki::EndEntityCert::try_from(&der).map_err(bad)?;
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[],
            UnixTime::since_unix_epoch(Duration::from_secs(now.max(0) as u64)),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| PkiError::BadCertificate(format!("it does not chain to the CA: {e}")))?;
        CertInfo::parse(cert).map(|i| i.name)
    }
}

/// A node's identity as the SecAgg key signer and peer verifier.
#[derive(Debug)]
pub struct NodeAttestor {
    identity: NodeIdentity,
    verifier: PeerVerifier,
    clock: fn() -> i64,
}

impl NodeAttestor {
    /// Uses the system clock for certificate validity.
    pub fn new(identity: NodeIdentity) -> Self {
        let verifier = PeerVerifier::new(identity.ca.clone());
        Self {
            identity,
            verifier,
            clock: unix_now,
        }
    }
}

/// Seconds since the Unix epoch, from the system clock.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl KeyAttestor for NodeAttestor {
    fn attest(&self, round: u64, keys: &PeerKeys) -> KeyAttestation {
        let msg = keys_message(round, keys);
        let signature = self
            .identity
            .key
            .sign(&msg)
            .expect("ECDSA signing with a valid key does not fail");
        KeyAttestation {
            certificate: self.identity.cert.to_vec(),
            signature,
        }
    }

    fn verify(&self, round: u64, keys: &PeerKeys) -> Result<String, AttestationError> {
        let att = keys
            .attestation
            .as_ref()
            .ok_or(AttestationError::Unsigned)?;
        let name = self
            .verifier
            .verify_cert(&att.certificate, (self.clock)())
            .map_err(|e| AttestationError::Certificate(e.to_string()))?;
        let msg = keys_message(round, keys);
        if !signature_valid(&att.certificate, &msg, &att.signature) {
            return Err(AttestationError::BadSignature(name));
        }
        Ok(name)
    }

    fn sign_survivors(&self, message: &[u8]) -> Vec<u8> {
        self.identity
            .key
            .sign(message)
            .expect("ECDSA signing with a valid key does not fail")
    }

    fn verify_survivors(
        &self,
        certificate: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), AttestationError> {
        if signature_valid(certificate, message, signature) {
            Ok(())
        } else {
            Err(AttestationError::BadSignature(
                CertInfo::parse(certificate).map_or_else(|_| "?".into(), |i| i.name),
            ))
        }
    }

    fn identity(&self) -> &str {
        self.identity.name()
    }
}

/// The server's check of its nodes' signatures (ECDSA P-256 / SHA-256 by
/// the key of the certificate the connection authenticated with).
///
/// ```
/// use fedveil_net::pki::NodeSignatures;
/// use fedveil_proto::secagg::SignatureCheck;
///
/// assert!(!NodeSignatures.verify(b"not a certificate", b"message", b"signature"));
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct NodeSignatures;

impl SignatureCheck for NodeSignatures {
    fn verify(&self, certificate: &[u8], message: &[u8], signature: &[u8]) -> bool {
        signature_valid(certificate, message, signature)
    }
}

/// Checks an ECDSA P-256 / SHA-256 signature by the key of `certificate`.
fn signature_valid(certificate: &[u8], message: &[u8], signature: &[u8]) -> bool {
    let der = CertificateDer::from(certificate);
    webpki::EndEntityCert::try_from(&der).is_ok_and(|ee| {
        ee.verify_signature(webpki::ring::ECDSA_P256_SHA256, message, signature)
            .is_ok()
    })
}

#[cfg(test)]
mod tests;
