//! The node's own privacy ledger on disk: [`LEDGER_FILE`] in the node
//! directory, kept over every run and server the node takes part in,
//! written atomically and synced before an update leaves the node (see
//! `fedveil_proto::round::policy`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use fedveil_net::pki;
use fedveil_proto::round::policy::{
    ChargeError, LedgerMismatch, LedgerStore, NodeLedger, NodePolicy, RoundCost,
};

/// The ledger's file in a node directory.
pub const LEDGER_FILE: &str = "privacy-ledger.json";

/// Why a node's ledger cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// The file exists but cannot be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a ledger (the node refuses to start afresh over it:
    /// that would forget what it spent).
    #[error("{} is not a privacy ledger ({source}); the node will not start over it", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// The ledger accounts at another delta than the policy.
    #[error("{}: {source}", path.display())]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// The difference.
        source: LedgerMismatch,
    },
}

/// A node's ledger, shared by its sessions (one run after another,
/// reconnections) and, through its file, by every process of the node (one
/// directory per server may name the same ledger file). Each charge locks
/// the file, builds on what is stored, and writes it back synced.
#[derive(Debug, Clone)]
pub struct SharedLedger {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug)]
struct Inner {
    path: Option<PathBuf>,
    ledger: NodeLedger,
}

impl SharedLedger {
    /// A ledger kept in memory only (a node without a directory).
    pub fn in_memory(policy: &NodePolicy) -> Self {
        Self::with(None, NodeLedger::new(policy.delta))
    }

    /// Loads the ledger kept in `path` (made on the first charge when
    /// absent), accounting as `policy` does.
    pub fn open(path: &Path, policy: &NodePolicy) -> Result<Self, LedgerError> {
        let ledger = read(path, policy)?.unwrap_or_else(|| NodeLedger::new(policy.delta));
        Ok(Self::with(Some(path.to_owned()), ledger))
    }

    fn with(path: Option<PathBuf>, ledger: NodeLedger) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner { path, ledger })),
        }
    }

    /// The ledger as last read or charged.
    pub fn current(&self) -> NodeLedger {
        self.lock().ledger.clone()
    }

    /// Where the ledger is kept, if anywhere.
    pub fn path(&self) -> Option<PathBuf> {
        self.lock().path.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The ledger in `path`, if there is one.
fn read(path: &Path, policy: &NodePolicy) -> Result<Option<NodeLedger>, LedgerError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(LedgerError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let ledger: NodeLedger =
        serde_json::from_slice(&bytes).map_err(|source| LedgerError::Corrupt {
            path: path.to_owned(),
            source,
        })?;
    ledger
        .check_against(policy)
        .map_err(|source| LedgerError::Mismatch {
            path: path.to_owned(),
            source,
        })?;
    Ok(Some(ledger))
}

impl LedgerStore for SharedLedger {
    fn charge(
        &mut self,
        round: u64,
        cost: &RoundCost,
        policy: &NodePolicy,
    ) -> Result<NodeLedger, ChargeError> {
        let store = |e: Box<dyn std::error::Error + Send + Sync>| ChargeError::Store(e);
        let mut inner = self.lock();
        let Some(path) = inner.path.clone() else {
            inner.ledger.charge(round, cost, policy)?;
            return Ok(inner.ledger.clone());
        };
        // The ledger file is replaced by each write, so the lock lives on
        // a file of its own next to it.
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path.with_extension("lock"))
            .map_err(|e| store(e.into()))?;
        lock.lock().map_err(|e| store(e.into()))?;
        let mut ledger = read(&path, policy)
            .map_err(|e| store(e.into()))?
            .unwrap_or_else(|| NodeLedger::new(policy.delta));
        ledger.charge(round, cost, policy)?;
        let json = serde_json::to_vec_pretty(&ledger).map_err(|e| store(e.into()))?;
        pki::write_atomic(&path, &json, false).map_err(|e| store(e.into()))?;
        inner.ledger = ledger.clone();
        Ok(ledger)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noised() -> RoundCost {
        let orders = fedveil_proto::dp::rdp::integer_orders();
        RoundCost::Noised {
            noise_multiplier: 2.0,
            rdp: fedveil_proto::dp::rdp::sampled_gaussian(1.0, 2.0, &orders),
        }
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fedveil-ledger-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_charged_ledger_is_what_the_next_start_loads() {
        let dir = temp_dir("reload");
        let path = dir.join(LEDGER_FILE);
        let policy = NodePolicy::default();
        let mut shared = SharedLedger::open(&path, &policy).unwrap();
        assert_eq!(shared.current().epsilon(), 0.0);
        shared.charge(1, &noised(), &policy).unwrap();
        let ledger = shared.charge(2, &RoundCost::Unprotected, &policy).unwrap();
        let again = SharedLedger::open(&path, &policy).unwrap().current();
        assert_eq!(again, ledger);
        assert_eq!(again.unprotected_rounds, 1);
        assert!(again.epsilon() > 0.0);
        // Another delta is refused, not silently restarted.
        let other = NodePolicy {
            delta: 1e-6,
            ..NodePolicy::default()
        };
        assert!(matches!(
            SharedLedger::open(&path, &other),
            Err(LedgerError::Mismatch { .. })
        ));
        // So is a damaged file.
        std::fs::write(&path, b"{").unwrap();
        assert!(matches!(
            SharedLedger::open(&path, &policy),
            Err(LedgerError::Corrupt { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Two nodes (say, one per server) sharing one ledger file: each
    /// charge builds on the other's, so neither can spend what the other
    /// already did, and the budget holds over both.
    #[test]
    fn sessions_sharing_a_ledger_file_never_undercount() {
        let dir = temp_dir("shared");
        let path = dir.join(LEDGER_FILE);
        let one_round = {
            let mut l = NodeLedger::new(1e-5);
            l.record(1, &noised());
            l.epsilon()
        };
        let mut two = NodeLedger::new(1e-5);
        two.record(1, &noised());
        two.record(2, &noised());
        let policy = NodePolicy {
            max_epsilon: Some(two.epsilon() * 1.001),
            ..NodePolicy::default()
        };
        let mut a = SharedLedger::open(&path, &policy).unwrap();
        let mut b = SharedLedger::open(&path, &policy).unwrap();
        assert!((a.charge(1, &noised(), &policy).unwrap().epsilon() - one_round).abs() < 1e-12);
        // b has not seen a's charge in memory, but the file has it.
        let after_b = b.charge(1, &noised(), &policy).unwrap();
        assert_eq!(after_b.privacy.rounds_charged(), 2);
        assert!(matches!(
            a.charge(2, &noised(), &policy),
            Err(ChargeError::Policy(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
