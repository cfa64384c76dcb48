//! An enrolled node in one value: its identity (private key and
//! certificate, kept in a directory or in memory), the server it belongs
//! to, and the runs it takes part in, renewing its certificate when due.
//! `fedveil-client` is a thin command line over it; an embedded node is a
//! few lines:
//!
//! ```no_run
//! use std::sync::Arc;
//! use fedveil_client::{Node, Trainer};
//! use fedveil_ml::data::{Shard, synthetic::SyntheticConfig};
//! use fedveil_net::pki::Invitation;
//!
//! # async fn demo(invitation: Invitation) -> Result<(), Box<dyn std::error::Error>> {
//! // The first start enrols (the key never leaves this directory); later
//! // starts load the identity and renew it when due.
//! let mut node = Node::open_or_enrol("node", &invitation).await?;
//! let data = SyntheticConfig::default().generate(1).train;
//! let trainer = Trainer::new("cnn", Shard::whole(data), burn::prelude::Device::flex(), 7)?;
//! let report = node.run(Arc::new(trainer)).await?;
//! println!("trained {} rounds", report.rounds_trained);
//! # Ok(())
//! # }
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedveil_ml::train::LocalTrainer;
use fedveil_net::pki::{self, Invitation, NodeIdentity, PkiError};
use fedveil_net::quic::{self, NetError};
use serde::{Deserialize, Serialize};

use fedveil_proto::round::policy::{NodeLedger, NodePolicy, PolicyError};

use crate::driver::{
    ClientError, ClientOptions, ClientReport, DEFAULT_CONNECT_ATTEMPTS, NodePrivacy,
};
use crate::enrol::{self, EnrolmentError};
use crate::ledger::{LEDGER_FILE, LedgerError, SharedLedger};

/// How long a node waits after a failed renewal before trying again.
pub const RENEWAL_RETRY: Duration = Duration::from_secs(60);

/// Settings saved at enrolment next to the identity.
pub const NODE_SETTINGS_FILE: &str = "client.toml";

/// What went wrong for a node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The server's name does not resolve.
    #[error("cannot resolve {server}: {source}")]
    Resolve {
        /// HOST:PORT as given.
        server: String,
        /// The resolver's error.
        source: std::io::Error,
    },
    /// The server's name resolves to no address.
    #[error("{0} resolves to no address")]
    NoAddress(String),
    /// No UDP socket could be opened.
    #[error("cannot open a UDP socket: {0}")]
    Socket(std::io::Error),
    /// The directory already holds an identity.
    #[error("{} already holds a node identity; use another directory, or renew it", .0.display())]
    AlreadyEnrolled(PathBuf),
    /// The directory holds no identity.
    #[error("no node identity in {}: enrol first ({source})", dir.display())]
    NotEnrolled {
        /// The directory.
        dir: PathBuf,
        /// Why the identity could not be read.
        source: PkiError,
    },
    /// The node's settings file cannot be read.
    #[error("{}: {detail}", path.display())]
    Settings {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// The certificate has expired; only a new enrolment helps.
    #[error(
        "the certificate of '{name}' expired at {expired_at} and cannot be renewed any more: ask the operator for a new token, then enrol again into a new directory"
    )]
    Expired {
        /// The node's name.
        name: String,
        /// When the certificate expired.
        expired_at: String,
    },
    /// Enrolment failed.
    #[error("enrolment failed: {0}")]
    Enrolment(EnrolmentError),
    /// Renewal failed.
    #[error("certificate renewal failed: {0}")]
    Renewal(EnrolmentError),
    /// The node's privacy policy cannot be enforced as written.
    #[error("privacy policy: {0}")]
    Policy(#[from] PolicyError),
    /// The node's privacy ledger cannot be used.
    #[error("privacy ledger: {0}")]
    Ledger(#[from] LedgerError),
    /// A key or certificate could not be used or saved.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// The TLS configuration could not be made.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The run failed.
    #[error(transparent)]
    Client(#[from] ClientError),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeSettings {
    /// HOST:PORT of the server this node enrolled with.
    server: String,
    /// The node's own privacy policy (`[privacy]`).
    #[serde(default, skip_serializing_if = "is_default")]
    privacy: NodePolicy,
    /// The node's privacy ledger, relative to the node directory [default:
    /// `privacy-ledger.json` there]. Nodes of one site enrolled with
    /// several servers name one file, so that one budget covers them all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ledger: Option<PathBuf>,
}

fn is_default(policy: &NodePolicy) -> bool {
    *policy == NodePolicy::default()
}

/// An enrolled node; see the [module docs](self).
#[derive(Debug)]
pub struct Node {
    identity: NodeIdentity,
    /// HOST:PORT, as enrolled with.
    server: String,
    addr: SocketAddr,
    /// The name the server certificate must carry.
    server_name: String,
    /// Where the identity is kept (renewals are saved there).
    dir: Option<PathBuf>,
    endpoint: quinn::Endpoint,
    renew_before: Option<Duration>,
    connect_attempts: u32,
    privacy: NodePrivacy,
    /// Where the ledger is kept (nodes with a directory).
    ledger_path: Option<PathBuf>,
}

impl Node {
    /// Enrols with `invitation`, keeping the identity in memory only (it
    /// is lost with the process: tests, demos).
    pub async fn enrol(invitation: &Invitation) -> Result<Self, NodeError> {
        let pin = pki::parse_fingerprint(&invitation.ca_fingerprint)?;
        if let Some(name) = &invitation.node {
            pki::validate_node_name(name)?;
        }
        let (addr, server_name) = resolve(&invitation.server).await?;
        let endpoint = endpoint_for(addr)?;
        let identity = enrol::enrol(
            &endpoint,
            addr,
            &server_name,
            pin,
            &invitation.token,
            invitation.node.as_deref(),
        )
        .await
        .map_err(NodeError::Enrolment)?;
        Ok(Self::with(
            identity,
            invitation.server.clone(),
            addr,
            server_name,
            endpoint,
        ))
    }

    /// A node with default renewal and retry settings, kept in memory.
    fn with(
        identity: NodeIdentity,
        server: String,
        addr: SocketAddr,
        server_name: String,
        endpoint: quinn::Endpoint,
    ) -> Self {
        Self {
            identity,
            server,
            addr,
            server_name,
            dir: None,
            endpoint,
            renew_before: None,
            connect_attempts: DEFAULT_CONNECT_ATTEMPTS,
            privacy: NodePrivacy {
                policy: NodePolicy::default(),
                ledger: SharedLedger::in_memory(&NodePolicy::default()),
            },
            ledger_path: None,
        }
    }

    /// Enrols with `invitation` and saves the identity (key mode 0600) and
    /// the server's address in `dir`, which must not hold one yet.
    pub async fn enrol_into(
        dir: impl AsRef<Path>,
        invitation: &Invitation,
    ) -> Result<Self, NodeError> {
        let dir = dir.as_ref();
        if dir.join(pki::NODE_IDENTITY_FILE).exists() {
            return Err(NodeError::AlreadyEnrolled(dir.to_owned()));
        }
        let mut node = Self::enrol(invitation).await?;
        node.identity.save(dir)?;
        let settings = toml::to_string(&NodeSettings {
            server: node.server.clone(),
            privacy: NodePolicy::default(),
            ledger: None,
        })
        .expect("node settings serialize");
        let path = dir.join(NODE_SETTINGS_FILE);
        pki::write_atomic(&path, settings.as_bytes(), false)?;
        node.dir = Some(dir.to_owned());
        node.ledger_path = Some(dir.join(LEDGER_FILE));
        node.set_policy(NodePolicy::default())?;
        Ok(node)
    }

    /// Loads the node enrolled in `dir`, talking to the server it enrolled
    /// with.
    pub async fn open(dir: impl AsRef<Path>) -> Result<Self, NodeError> {
        Self::open_at(dir, None).await
    }

    /// Loads the node enrolled in `dir`, talking to `server` (HOST:PORT)
    /// instead of the one it enrolled with when given.
    pub async fn open_at(dir: impl AsRef<Path>, server: Option<&str>) -> Result<Self, NodeError> {
        let dir = dir.as_ref();
        let identity = NodeIdentity::load(dir).map_err(|source| match source {
            // The identity is there; its file's mode is what to fix.
            e @ PkiError::KeyReadableByOthers { .. } => NodeError::Pki(e),
            source => NodeError::NotEnrolled {
                dir: dir.to_owned(),
                source,
            },
        })?;
        let path = dir.join(NODE_SETTINGS_FILE);
        let settings = |detail: String| NodeError::Settings {
            path: path.clone(),
            detail,
        };
        let saved = match std::fs::read_to_string(&path) {
            Ok(text) => {
                Some(toml::from_str::<NodeSettings>(&text).map_err(|e| settings(e.to_string()))?)
            }
            Err(e) if server.is_some() && e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(settings(e.to_string())),
        };
        let (saved_server, policy, ledger) = match saved {
            Some(s) => (Some(s.server), s.privacy, s.ledger),
            None => (None, NodePolicy::default(), None),
        };
        let server = match (server, saved_server) {
            (Some(s), _) => s.to_owned(),
            (None, Some(s)) => s,
            (None, None) => unreachable!("a missing settings file without --server is an error"),
        };
        let (addr, server_name) = resolve(&server).await?;
        let mut node = Self::with(identity, server, addr, server_name, endpoint_for(addr)?);
        node.dir = Some(dir.to_owned());
        node.ledger_path = Some(dir.join(ledger.unwrap_or_else(|| LEDGER_FILE.into())));
        node.set_policy(policy)?;
        Ok(node)
    }

    /// [`Self::open`] if `dir` holds an identity, else
    /// [`Self::enrol_into`]: the same program starts a node the first time
    /// and every time after.
    pub async fn open_or_enrol(
        dir: impl AsRef<Path>,
        invitation: &Invitation,
    ) -> Result<Self, NodeError> {
        let dir = dir.as_ref();
        if dir.join(pki::NODE_IDENTITY_FILE).exists() {
            Self::open(dir).await
        } else {
            Self::enrol_into(dir, invitation).await
        }
    }

    /// Renews when less than `lead` is left [default: a third of the
    /// certificate's lifetime].
    pub fn renew_before(mut self, lead: Duration) -> Self {
        self.renew_before = Some(lead);
        self
    }

    /// Connection attempts per run before giving up.
    pub fn connect_attempts(mut self, attempts: u32) -> Self {
        self.connect_attempts = attempts;
        self
    }

    /// Holds every round to `policy` from now on (instead of the
    /// `[privacy]` table of the node's settings file). The node's ledger
    /// stays the one in its directory, kept over all runs and servers.
    pub fn privacy_policy(mut self, policy: NodePolicy) -> Result<Self, NodeError> {
        self.set_policy(policy)?;
        Ok(self)
    }

    fn set_policy(&mut self, policy: NodePolicy) -> Result<(), NodeError> {
        policy.validate()?;
        self.privacy.ledger = match &self.ledger_path {
            Some(path) => SharedLedger::open(path, &policy)?,
            None => {
                let current = self.privacy.ledger.current();
                current
                    .check_against(&policy)
                    .map(|()| self.privacy.ledger.clone())
                    .unwrap_or_else(|_| SharedLedger::in_memory(&policy))
            }
        };
        self.privacy.policy = policy;
        Ok(())
    }

    /// The privacy policy every round is held to.
    pub fn policy(&self) -> &NodePolicy {
        &self.privacy.policy
    }

    /// What this node has spent, over all its runs.
    pub fn ledger(&self) -> NodeLedger {
        self.privacy.ledger.current()
    }

    /// The node's name, from its certificate.
    pub fn name(&self) -> &str {
        self.identity.name()
    }

    /// The node's identity.
    pub fn identity(&self) -> &NodeIdentity {
        &self.identity
    }

    /// The server, HOST:PORT.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Options for a run: mutual TLS with this node's certificate and
    /// SecAgg keys signed by it.
    pub fn options(&self) -> Result<ClientOptions, NodeError> {
        let mut opts = ClientOptions::enrolled(self.addr, &self.server_name, &self.identity)?;
        opts.retry.attempts = self.connect_attempts;
        opts.privacy = Some(self.privacy.clone());
        Ok(opts)
    }

    /// Replaces the key and certificate now (saved when the node has a
    /// directory).
    pub async fn renew(&mut self) -> Result<(), NodeError> {
        self.identity = renew_and_save(
            &self.endpoint,
            self.addr,
            &self.server_name,
            self.dir.as_deref(),
            &self.identity,
        )
        .await?;
        Ok(())
    }

    /// Takes part in training with `trainer` until the run ends. Renews
    /// first when renewal is due, and in the background while the run
    /// lasts (the live connection stays authenticated; the next one uses
    /// the new certificate).
    pub async fn run(&mut self, trainer: Arc<dyn LocalTrainer>) -> Result<ClientReport, NodeError> {
        let now = pki::unix_now();
        if self.identity.remaining(now) <= 0 {
            return Err(NodeError::Expired {
                name: self.name().to_owned(),
                expired_at: pki::format_time(self.identity.info().not_after),
            });
        }
        if self.identity.renewal_due(now, self.renew_before) {
            self.renew().await?;
        }
        loop {
            let opts = self.options()?;
            let used = self.identity.info().serial.clone();
            tracing::info!(server = %self.addr, node = %self.name(), examples = trainer.num_examples(), "connecting");
            let latest = Arc::new(Mutex::new(self.identity.clone()));
            let renewer = tokio::spawn(renew_when_due(
                self.endpoint.clone(),
                self.addr,
                self.server_name.clone(),
                self.dir.clone(),
                Arc::clone(&latest),
                self.renew_before,
            ));
            let result = crate::driver::run(&self.endpoint, &opts, Arc::clone(&trainer)).await;
            renewer.abort();
            self.identity = latest.lock().expect("identity lock").clone();
            match result {
                // The server ends a connection whose certificate expired
                // or was superseded: go on with the current one, renewing
                // first if the background renewal has not happened yet.
                Err(ClientError::Rejected(quic::Rejection::CertificateEnded(why))) => {
                    tracing::info!(node = %self.name(), %why, "reconnecting with the current certificate");
                    // Another process (`fedveil-client renew` from cron)
                    // may have renewed into the directory.
                    if let Some(saved) =
                        self.dir.as_deref().and_then(|d| NodeIdentity::load(d).ok())
                        && saved.info().serial != used
                        && saved.info().not_after > self.identity.info().not_after
                    {
                        self.identity = saved;
                    }
                    if self.identity.info().serial == used {
                        let now = pki::unix_now();
                        if self.identity.remaining(now) <= 0 {
                            return Err(NodeError::Expired {
                                name: self.name().to_owned(),
                                expired_at: pki::format_time(self.identity.info().not_after),
                            });
                        }
                        self.renew().await?;
                    }
                }
                other => return Ok(other?),
            }
        }
    }

    /// Waits until the node's connections have closed cleanly (call before
    /// the process exits, so the server hears the goodbye).
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }
}

/// Resolves HOST:PORT to an address and the name the server certificate
/// must carry.
async fn resolve(server: &str) -> Result<(SocketAddr, String), NodeError> {
    let addr = tokio::net::lookup_host(server)
        .await
        .map_err(|source| NodeError::Resolve {
            server: server.to_owned(),
            source,
        })?
        .next()
        .ok_or_else(|| NodeError::NoAddress(server.to_owned()))?;
    let host = server.rsplit_once(':').map_or(server, |(h, _)| h);
    Ok((addr, quic::server_name(host).to_owned()))
}

/// A client endpoint of the server address's family.
fn endpoint_for(server: SocketAddr) -> Result<quinn::Endpoint, NodeError> {
    let local: SocketAddr = if server.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    quinn::Endpoint::client(local).map_err(NodeError::Socket)
}

async fn renew_and_save(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    server_name: &str,
    dir: Option<&Path>,
    current: &NodeIdentity,
) -> Result<NodeIdentity, NodeError> {
    let renewed = enrol::renew(endpoint, addr, server_name, current)
        .await
        .map_err(NodeError::Renewal)?;
    if let Some(dir) = dir {
        renewed.save(dir)?;
    }
    tracing::info!(
        node = %renewed.name(),
        serial = %renewed.info().serial,
        valid_until = %pki::format_time(renewed.info().not_after),
        "certificate renewed"
    );
    Ok(renewed)
}

/// Sleeps until renewal is due, renews, and repeats.
async fn renew_when_due(
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    server_name: String,
    dir: Option<PathBuf>,
    latest: Arc<Mutex<NodeIdentity>>,
    renew_before: Option<Duration>,
) {
    loop {
        let current = latest.lock().expect("identity lock").clone();
        let info = current.info();
        let third = (info.not_after - info.not_before) / 3;
        let lead = renew_before.map_or(third, |d| (d.as_secs() as i64).min(third));
        let wait = (current.remaining(pki::unix_now()) - lead).max(1);
        tokio::time::sleep(Duration::from_secs(wait as u64)).await;
        match renew_and_save(&endpoint, addr, &server_name, dir.as_deref(), &current).await {
            Ok(renewed) => {
                // A certificate so short-lived that it is due again at
                // once must not turn into a renewal storm.
                let again = renewed.renewal_due(pki::unix_now(), renew_before);
                *latest.lock().expect("identity lock") = renewed;
                if again {
                    tokio::time::sleep(RENEWAL_RETRY).await;
                }
            }
            Err(err) => {
                tracing::warn!(%err, "certificate renewal failed; will retry");
                tokio::time::sleep(RENEWAL_RETRY).await;
            }
        }
    }
}
