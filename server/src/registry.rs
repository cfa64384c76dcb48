//! The node registry, in the server's state database next to the run
//! state: enrolled nodes, every certificate issued to them, and pending
//! enrolment tokens (stored as SHA-256 hashes).
//!
//! Operator commands (`fedveil-server enroll`, `revoke`) write to the same
//! file from another process; the running server reads it on every
//! handshake, so a revocation holds for the next connection at once, and
//! notices the change (SQLite's `data_version`) to drop live connections.
//!
//! - `nodes`: one row per name; `revoked_at` set by `revoke`, cleared when
//!   the name is enrolled again with a new token.
//! - `certificates`: serial, node, validity; `revoked_at` set by `revoke`
//!   and never cleared, so a re-enrolled node's old certificates stay dead;
//!   `superseded_at`, set by a renewal to the end of a short grace period
//!   after which the node's previous certificates are no longer accepted.
//! - `tokens`: hash, node name, expiry, and `used_at` once redeemed.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use fedveil_net::pki::{self, CertInfo, IssuedCert, PkiError};
use fedveil_net::quic::{NodeRegistry, RegistryRejection};
use fedveil_proto::wire::ReasonCode;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::store::{NODE_SPEND_SCHEMA, StoreError, open_database, sqlite_err};
use fedveil_proto::dp::NodeSpend;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY,
    enrolled_at INTEGER NOT NULL,
    revoked_at INTEGER,
    last_seen INTEGER
);
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,
    node TEXT NOT NULL REFERENCES nodes(name),
    issued_at INTEGER NOT NULL,
    not_after INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE INDEX IF NOT EXISTS certificates_by_node ON certificates(node);
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at INTEGER
);
";

/// How long a renewed node's previous certificates stay usable: long
/// enough for a renewal whose answer was lost to be retried with them.
pub const DEFAULT_RENEWAL_GRACE: Duration = Duration::from_secs(3600);
/// Renewal opens when at most this fraction of a certificate's lifetime is
/// left (the last third), so a stolen key cannot be renewed forever from
/// the first day, and a node renews well before it is locked out.
pub const DEFAULT_RENEWAL_WINDOW: f64 = 1.0 / 3.0;

/// Adds a column to a table made by an older version, if it lacks it.
fn add_column(conn: &Connection, table: &str, column: &str, decl: &str) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare(&format!("PRAGMA table_info({table})"))?;
    let has = stmt
        .query_map([], |r| r.get::<_, String>(1))?
        .collect::<Result<Vec<_>, _>>()?
        .iter()
        .any(|c| c == column);
    if !has {
        conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
    }
    Ok(())
}

/// Why an enrolment or renewal was refused. Each maps to a wire
/// [`ReasonCode`], so the node can say what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    /// No token like this was issued.
    #[error("unknown enrolment token (mistyped, or issued by another server)")]
    TokenUnknown,
    /// The token was already used.
    #[error("this enrolment token was already used; ask the operator for a new one")]
    TokenUsed,
    /// The token has expired.
    #[error("this enrolment token has expired; ask the operator for a new one")]
    TokenExpired,
    /// The node asked for another name than the token's.
    #[error("this token was issued for node '{expected}', not '{requested}'")]
    TokenNameMismatch {
        /// The token's name.
        expected: String,
        /// The name asked for.
        requested: String,
    },
    /// A live node already has this name.
    #[error(
        "node name '{0}' is already enrolled; revoke it first (`fedveil-server revoke {0}`) or choose another name"
    )]
    NameTaken(String),
    /// The CSR or the certificate is invalid.
    #[error("{0}")]
    Pki(#[from] PkiError),
    /// Renewal without an enrolled certificate.
    #[error("renewal needs the node's current client certificate")]
    NotEnrolled,
    /// The node is revoked.
    #[error("node '{0}' is revoked")]
    Revoked(String),
    /// No node has this name.
    #[error("no node named '{0}' is enrolled (see `fedveil-server nodes`)")]
    NoSuchNode(String),
    /// The registry never issued this certificate.
    #[error("certificate {0} is not in the node registry")]
    UnknownCertificate(String),
    /// A renewal replaced this certificate and its grace period is over.
    #[error("certificate {0} was replaced by a renewal; use the newer certificate")]
    Superseded(String),
    /// Renewal opens in the last part of a certificate's life.
    #[error(
        "node '{name}' may renew its certificate from {opens_at} on (the last third of its life), not yet"
    )]
    RenewalTooEarly {
        /// The node.
        name: String,
        /// When renewal opens (UTC).
        opens_at: String,
    },
    /// This server holds no CA key.
    #[error("this server cannot enrol nodes: its CA key is not on this machine")]
    Disabled,
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl EnrolError {
    /// The reason code the node receives.
    pub fn code(&self) -> ReasonCode {
        match self {
            EnrolError::TokenUnknown => ReasonCode::TokenUnknown,
            EnrolError::TokenUsed => ReasonCode::TokenUsed,
            EnrolError::TokenExpired => ReasonCode::TokenExpired,
            EnrolError::TokenNameMismatch { .. } => ReasonCode::TokenNameMismatch,
            EnrolError::NameTaken(_) => ReasonCode::NameTaken,
            EnrolError::Pki(PkiError::BadName(_)) | EnrolError::Pki(PkiError::BadCsr(_)) => {
                ReasonCode::BadCsr
            }
            EnrolError::RenewalTooEarly { .. } => ReasonCode::RenewalTooEarly,
            EnrolError::NotEnrolled
            | EnrolError::Superseded(_)
            | EnrolError::UnknownCertificate(_)
            | EnrolError::NoSuchNode(_) => ReasonCode::NotEnrolled,
            EnrolError::Revoked(_) => ReasonCode::Revoked,
            EnrolError::Disabled => ReasonCode::EnrolmentDisabled,
            EnrolError::Pki(_) | EnrolError::Store(_) => ReasonCode::Internal,
        }
    }
}

/// Where one certificate stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertState {
    /// Usable.
    Live,
    /// It or its node was revoked.
    Revoked,
    /// A renewal replaced it and the grace period is over.
    Superseded,
    /// The registry never issued it.
    Unknown,
}

/// A node as `fedveil-server nodes` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// The node's name.
    pub name: String,
    /// The newest certificate's serial and expiry.
    pub serial: Option<String>,
    /// When its certificate expires (Unix seconds).
    pub not_after: Option<i64>,
    /// When it enrolled (Unix seconds).
    pub enrolled_at: i64,
    /// When it was revoked, if it was.
    pub revoked_at: Option<i64>,
    /// When it last connected to train.
    pub last_seen: Option<i64>,
}

/// A pending enrolment token as the operator sees it (never the token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedToken {
    /// The token itself (shown once; only its hash is stored).
    pub token: String,
    /// The node name it is for.
    pub node: String,
    /// When it expires (Unix seconds).
    pub expires_at: i64,
}

/// The registry over one SQLite connection. Shared by the TLS verifier
/// (every handshake) and the driver, hence the mutex; each call is one
/// short statement or transaction.
pub struct Registry {
    conn: Mutex<Connection>,
    path: PathBuf,
    /// See [`DEFAULT_RENEWAL_WINDOW`].
    renewal_window: f64,
    /// See [`DEFAULT_RENEWAL_GRACE`].
    renewal_grace: Duration,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("path", &self.path)
            .finish()
    }
}

impl Registry {
    /// Opens the registry in the state database at `path` (creating it).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = open_database(path)?;
        Self::with_schema(conn, path.to_owned())
    }

    /// A registry that lives only as long as the process (simulations).
    pub fn in_memory() -> Result<Self, StoreError> {
        let path = PathBuf::from(":memory:");
        let conn = Connection::open_in_memory().map_err(sqlite_err(&path))?;
        Self::with_schema(conn, path)
    }

    fn with_schema(conn: Connection, path: PathBuf) -> Result<Self, StoreError> {
        {
            let err = sqlite_err(&path);
            conn.execute_batch(SCHEMA).map_err(&err)?;
            conn.execute_batch(NODE_SPEND_SCHEMA).map_err(&err)?;
            add_column(&conn, "certificates", "superseded_at", "INTEGER").map_err(&err)?;
        }
        Ok(Self {
            conn: Mutex::new(conn),
            path,
            renewal_window: DEFAULT_RENEWAL_WINDOW,
            renewal_grace: DEFAULT_RENEWAL_GRACE,
        })
    }

    /// Renewal opens when at most `window` of a certificate's lifetime is
    /// left (1.0: at any time), and a renewed node's previous certificates
    /// are refused `grace` after the renewal.
    pub fn with_renewal_policy(mut self, window: f64, grace: Duration) -> Self {
        self.renewal_window = window.clamp(0.0, 1.0);
        self.renewal_grace = grace;
        self
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent
        // (statements are atomic); keep serving.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        sqlite_err(&self.path)
    }

    /// Runs `f` in one write transaction, taken at once (`IMMEDIATE`) so a
    /// read-check-write cannot race another process; commits only if `f`
    /// succeeds.
    fn write<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, EnrolError>,
    ) -> Result<T, EnrolError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.err())?;
        let out = f(&tx)?;
        tx.commit().map_err(self.err())?;
        Ok(out)
    }

    fn is_active(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
        conn.query_row(
            "SELECT 1 FROM nodes WHERE name = ?1 AND revoked_at IS NULL",
            [name],
            |_| Ok(()),
        )
        .optional()
        .map(|r| r.is_some())
    }

    /// Issues a one-time token for `name`, valid for `ttl`. Refused when a
    /// live node already has the name.
    pub fn issue_token(
        &self,
        name: &str,
        ttl: Duration,
        now: i64,
    ) -> Result<IssuedToken, EnrolError> {
        pki::validate_node_name(name)?;
        let conn = self.conn();
        if Self::is_active(&conn, name).map_err(self.err())? {
            return Err(EnrolError::NameTaken(name.to_owned()));
        }
        let (token, hash) = pki::new_token();
        let expires_at = now + ttl.as_secs() as i64;
        conn.execute(
            "INSERT INTO tokens (hash, node, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
            params![hash, name, now, expires_at],
        )
        .map_err(self.err())?;
        Ok(IssuedToken {
            token,
            node: name.to_owned(),
            expires_at,
        })
    }

    /// Redeems `token` for `name` (default: the token's name): checks the
    /// token, has `sign` issue the certificate for the name, and records
    /// token use, node and certificate in one transaction. Nothing changes
    /// if any step fails (a bad CSR does not burn the token).
    pub fn enrol(
        &self,
        token: &str,
        name: Option<&str>,
        now: i64,
        sign: impl FnOnce(&str) -> Result<IssuedCert, PkiError>,
    ) -> Result<IssuedCert, EnrolError> {
        let err = self.err();
        self.write(|tx| {
            let hash = pki::token_hash(token);
            let row: Option<(String, i64, Option<i64>)> = tx
                .query_row(
                    "SELECT node, expires_at, used_at FROM tokens WHERE hash = ?1",
                    [&hash],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()
                .map_err(&err)?;
            let Some((expected, expires_at, used_at)) = row else {
                return Err(EnrolError::TokenUnknown);
            };
            if used_at.is_some() {
                return Err(EnrolError::TokenUsed);
            }
            if now >= expires_at {
                return Err(EnrolError::TokenExpired);
            }
            let name = name.unwrap_or(&expected);
            if expected != name {
                return Err(EnrolError::TokenNameMismatch {
                    expected: expected.clone(),
                    requested: name.to_owned(),
                });
            }
            if Self::is_active(tx, name).map_err(&err)? {
                return Err(EnrolError::NameTaken(name.to_owned()));
            }
            let issued = sign(name)?;
            tx.execute(
                "UPDATE tokens SET used_at = ?1 WHERE hash = ?2",
                params![now, hash],
            )
            .map_err(&err)?;
            tx.execute(
                "INSERT INTO nodes (name, enrolled_at) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET enrolled_at = excluded.enrolled_at, revoked_at = NULL",
                params![name, now],
            )
            .map_err(&err)?;
            Self::insert_cert(tx, &issued.info, now).map_err(&err)?;
            Ok(issued)
        })
    }

    fn insert_cert(conn: &Connection, info: &CertInfo, now: i64) -> rusqlite::Result<()> {
        conn.execute(
            "INSERT INTO certificates (serial, node, issued_at, not_after) VALUES (?1, ?2, ?3, ?4)",
            params![info.serial, info.name, now, info.not_after],
        )
        .map(|_| ())
    }

    /// Issues a successor to the live certificate `current` (already
    /// verified by TLS), once the last part of its life has begun (see
    /// [`Self::with_renewal_policy`]). The node's other certificates stay
    /// valid for the grace period, so a renewal whose answer is lost can be
    /// retried, and are refused after it.
    pub fn renew(
        &self,
        current: &CertInfo,
        now: i64,
        sign: impl FnOnce(&str) -> Result<IssuedCert, PkiError>,
    ) -> Result<IssuedCert, EnrolError> {
        let lifetime = current.not_after - current.not_before;
        let opens_at = current.not_after - (lifetime as f64 * self.renewal_window) as i64;
        if now < opens_at {
            return Err(EnrolError::RenewalTooEarly {
                name: current.name.clone(),
                opens_at: pki::format_time(opens_at),
            });
        }
        let grace_ends = now + self.renewal_grace.as_secs() as i64;
        self.write(|tx| {
            match Self::state(tx, &current.serial, &current.name, now).map_err(self.err())? {
                CertState::Unknown => {
                    return Err(EnrolError::UnknownCertificate(current.serial.clone()));
                }
                CertState::Revoked => return Err(EnrolError::Revoked(current.name.clone())),
                CertState::Superseded => {
                    return Err(EnrolError::Superseded(current.serial.clone()));
                }
                CertState::Live => {}
            }
            let issued = sign(&current.name)?;
            tx.execute(
                "UPDATE certificates SET superseded_at = ?1
                 WHERE node = ?2 AND revoked_at IS NULL AND (superseded_at IS NULL OR superseded_at > ?1)",
                params![grace_ends, current.name],
            )
            .map_err(self.err())?;
            Self::insert_cert(tx, &issued.info, now).map_err(self.err())?;
            Ok(issued)
        })
    }

    /// `None`: unknown certificate; `Some(true)`: it or its node is
    /// revoked, or a renewal superseded it before `now`.
    fn status(
        conn: &Connection,
        serial: &str,
        name: &str,
        now: i64,
    ) -> rusqlite::Result<Option<bool>> {
        Ok(match Self::state(conn, serial, name, now)? {
            CertState::Unknown => None,
            CertState::Live => Some(false),
            CertState::Revoked | CertState::Superseded => Some(true),
        })
    }

    fn state(conn: &Connection, serial: &str, name: &str, now: i64) -> rusqlite::Result<CertState> {
        let row: Option<(bool, Option<i64>)> = conn
            .query_row(
                "SELECT c.revoked_at IS NOT NULL OR n.revoked_at IS NOT NULL, c.superseded_at
                 FROM certificates c JOIN nodes n ON n.name = c.node
                 WHERE c.serial = ?1 AND c.node = ?2",
                params![serial, name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(match row {
            None => CertState::Unknown,
            Some((true, _)) => CertState::Revoked,
            Some((false, Some(at))) if at <= now => CertState::Superseded,
            Some(_) => CertState::Live,
        })
    }

    /// Revokes node `name` and all its certificates. Returns how many
    /// certificates were live.
    pub fn revoke(&self, name: &str, now: i64) -> Result<usize, EnrolError> {
        let err = self.err();
        self.write(|tx| {
            let changed = tx
                .execute(
                    "UPDATE nodes SET revoked_at = ?1 WHERE name = ?2 AND revoked_at IS NULL",
                    params![now, name],
                )
                .map_err(&err)?;
            if changed == 0 {
                let known = tx
                    .query_row("SELECT 1 FROM nodes WHERE name = ?1", [name], |_| Ok(()))
                    .optional()
                    .map_err(&err)?
                    .is_some();
                return Err(if known {
                    EnrolError::Revoked(name.to_owned())
                } else {
                    EnrolError::NoSuchNode(name.to_owned())
                });
            }
            let certs = tx
            .execute(
                "UPDATE certificates SET revoked_at = ?1 WHERE node = ?2 AND revoked_at IS NULL",
                params![now, name],
            )
            .map_err(&err)?;
            // Tokens still pending for the name would re-enrol it behind the
            // operator's back.
            tx.execute(
                "UPDATE tokens SET used_at = ?1 WHERE node = ?2 AND used_at IS NULL",
                params![now, name],
            )
            .map_err(&err)?;
            Ok(certs)
        })
    }

    /// Whether `serial` of `name` may still be used (for live connections).
    pub fn is_live(&self, serial: &str, name: &str) -> Result<bool, StoreError> {
        self.is_live_at(serial, name, pki::unix_now())
    }

    /// Where `serial` of `name` stands at `now`.
    pub fn cert_state(&self, serial: &str, name: &str, now: i64) -> Result<CertState, StoreError> {
        Self::state(&self.conn(), serial, name, now).map_err(self.err())
    }

    /// Whether `serial` of `name` may be used at `now`.
    pub fn is_live_at(&self, serial: &str, name: &str, now: i64) -> Result<bool, StoreError> {
        Self::status(&self.conn(), serial, name, now)
            .map(|s| s == Some(false))
            .map_err(self.err())
    }

    /// The serials of `name` that may be used at `now` (not revoked,
    /// expired or superseded), newest first, with their expiry.
    pub fn live_serials(&self, name: &str, now: i64) -> Result<Vec<(String, i64)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT c.serial, c.not_after FROM certificates c JOIN nodes n ON n.name = c.node
                 WHERE c.node = ?1 AND c.revoked_at IS NULL AND n.revoked_at IS NULL
                   AND c.not_after > ?2 AND (c.superseded_at IS NULL OR c.superseded_at > ?2)
                 ORDER BY c.issued_at DESC, c.not_after DESC",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map(params![name, now], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// Records that `name` connected at `now`.
    pub fn touch(&self, name: &str, now: i64) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "UPDATE nodes SET last_seen = ?1 WHERE name = ?2",
                params![now, name],
            )
            .map(|_| ())
            .map_err(self.err())
    }

    /// Changes whenever another connection (an operator command) commits
    /// to the database: a cheap way to notice revocations.
    pub fn data_version(&self) -> Result<i64, StoreError> {
        self.conn()
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(self.err())
    }

    /// What each node has spent over every run in this database (DP runs
    /// charge it with each round they sample the node from).
    pub fn spends(&self) -> Result<std::collections::BTreeMap<String, NodeSpend>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT name, spend FROM node_spend")
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(self.err())?;
        let mut out = std::collections::BTreeMap::new();
        for row in rows {
            let (name, text) = row.map_err(self.err())?;
            let spend = serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                detail: format!("node_spend of '{name}': {e}"),
            })?;
            out.insert(name, spend);
        }
        Ok(out)
    }

    /// Every node, newest certificate first per node, sorted by name.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT n.name, n.enrolled_at, n.revoked_at, n.last_seen,
                        (SELECT serial FROM certificates c WHERE c.node = n.name ORDER BY issued_at DESC, not_after DESC LIMIT 1),
                        (SELECT MAX(not_after) FROM certificates c WHERE c.node = n.name AND c.revoked_at IS NULL)
                 FROM nodes n ORDER BY n.name",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| {
                Ok(NodeRecord {
                    name: r.get(0)?,
                    enrolled_at: r.get(1)?,
                    revoked_at: r.get(2)?,
                    last_seen: r.get(3)?,
                    serial: r.get(4)?,
                    not_after: r.get(5)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }
}

impl NodeRegistry for Registry {
    fn check(&self, cert: &CertInfo) -> Result<(), RegistryRejection> {
        let status = Self::status(&self.conn(), &cert.serial, &cert.name, pki::unix_now())
            .map_err(|e| RegistryRejection::Unavailable(e.to_string()))?;
        match status {
            Some(false) => Ok(()),
            Some(true) => Err(RegistryRejection::Revoked {
                name: cert.name.clone(),
                serial: cert.serial.clone(),
            }),
            None => Err(RegistryRejection::Unknown {
                name: cert.name.clone(),
                serial: cert.serial.clone(),
            }),
        }
    }
}

#[cfg(test)]
mod tests;
