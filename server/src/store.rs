//! The server's durable state, in one SQLite database (WAL journal, full
//! fsync on commit).
//!
//! - `runs`: the run registry; a run's config is fixed when it is created,
//!   and a restart with another config is refused rather than mixed in.
//! - `checkpoint`: one row per run, replaced in a single transaction after
//!   every round: round counters, global model, the strategy's step count,
//!   privacy ledger, clip bound and the cohort-sampling generator; and in
//!   the same transaction `strategy_buffers`, the strategy's named vectors
//!   (a server optimizer's moments). SQLite's transaction makes a crash at
//!   any instant leave the old rows or the new ones, never a mix.
//!   (Databases written before strategies kept the moments in the
//!   checkpoint's `opt_m` and `opt_v` columns; those are read as buffers
//!   `m` and `v`, and new checkpoints leave them empty.)
//! - `ledger`: one row per charged round (round, epsilon after it) and, in
//!   the same transaction, `ledger_state`: the whole ledger after it. Both
//!   are written *before* the round's cohort is told to start, so the
//!   privacy spent survives a crash that loses the round.
//! - `rounds`: each round's metrics, for history (written after
//!   evaluation; a crash in between loses only that row).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fedveil_proto::dp::{NodeSpend, PrivacyLedger};
use fedveil_proto::metrics::RoundMetrics;
use fedveil_proto::round::server::{Checkpoint, Durable, RngState};
use fedveil_proto::round::{ConfigError, Coordinator, CoordinatorBuilder};
use fedveil_proto::strategy::StrategyState;
use rusqlite::{Connection, OptionalExtension, params};

/// File name of the state database in the state directory.
pub const STATE_DB_FILE: &str = "state.db";

/// Why the state database cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("state database {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// The run was started with other settings.
    #[error(
        "run '{run}' in {path} was started with another configuration; resume it with the same flags, or start a new run with --run NAME\n  saved:   {saved}\n  current: {current}"
    )]
    ConfigChanged {
        /// The run's name.
        run: String,
        /// The database file.
        path: PathBuf,
        /// The settings recorded when the run started (JSON).
        saved: String,
        /// The settings given now (JSON).
        current: String,
    },
    /// The database holds something this code cannot read.
    #[error("state database {path} is corrupt: {detail}")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What cannot be read.
        detail: String,
    },
    /// No run has this name.
    #[error("no run named '{0}' in the state database")]
    NoSuchRun(String),
    /// The run has no committed round yet.
    #[error("run '{0}' has no committed round yet")]
    NothingCommitted(String),
}

/// What a run resumes from.
#[derive(Debug, Clone, PartialEq)]
pub struct Saved {
    /// The newest checkpoint, if a round was committed.
    pub checkpoint: Option<Checkpoint>,
    /// The newest charged ledger (may be ahead of the checkpoint's).
    pub ledger: Option<PrivacyLedger>,
}

/// One run's durable state.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    run_id: i64,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    config TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoint (
    run_id INTEGER PRIMARY KEY REFERENCES runs(id),
    next_round INTEGER NOT NULL,
    rounds_completed INTEGER NOT NULL,
    rounds_failed INTEGER NOT NULL,
    model BLOB NOT NULL,
    opt_step INTEGER NOT NULL,
    opt_m BLOB NOT NULL,
    opt_v BLOB NOT NULL,
    ledger TEXT,
    clip_norm REAL,
    rng TEXT NOT NULL,
    committed_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS strategy_buffers (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    name TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (run_id, name)
);
CREATE TABLE IF NOT EXISTS ledger (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    round INTEGER NOT NULL,
    epsilon REAL NOT NULL,
    PRIMARY KEY (run_id, round)
);
CREATE TABLE IF NOT EXISTS ledger_state (
    run_id INTEGER PRIMARY KEY REFERENCES runs(id),
    ledger TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    round INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    PRIMARY KEY (run_id, round)
);
";

/// What each node has spent over every run in this database (a
/// `NodeSpend` as JSON), charged in the same transaction as the run's own
/// ledger; read by the node registry.
pub(crate) const NODE_SPEND_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS node_spend (
    name TEXT PRIMARY KEY,
    spend TEXT NOT NULL
);
";

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32s(bytes: &[u8]) -> Option<Vec<f32>> {
    bytes.len().is_multiple_of(4).then(|| {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect()
    })
}

impl Store {
    /// Opens (or creates) the database at `path` and the run `name`. A new
    /// run records `config`; an existing one must have been created with
    /// the same `config`.
    pub fn open(path: &Path, name: &str, config: &str) -> Result<Self, StoreError> {
        let conn = Self::connect(path)?;
        let err = sqlite_err(path);
        let saved: Option<(i64, String)> = conn
            .query_row("SELECT id, config FROM runs WHERE name = ?1", [name], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
            .map_err(&err)?;
        let run_id = match saved {
            Some((_, saved)) if saved != config => {
                return Err(StoreError::ConfigChanged {
                    run: name.to_owned(),
                    path: path.to_owned(),
                    saved,
                    current: config.to_owned(),
                });
            }
            Some((id, _)) => id,
            None => {
                conn.execute(
                    "INSERT INTO runs (name, config, created_at) VALUES (?1, ?2, ?3)",
                    params![name, config, now_secs()],
                )
                .map_err(&err)?;
                conn.last_insert_rowid()
            }
        };
        Ok(Self {
            conn,
            path: path.to_owned(),
            run_id,
        })
    }

    /// Opens an existing run without a config check (export, inspection).
    pub fn open_existing(path: &Path, name: &str) -> Result<Self, StoreError> {
        let conn = Self::connect(path)?;
        let run_id = conn
            .query_row("SELECT id FROM runs WHERE name = ?1", [name], |r| r.get(0))
            .optional()
            .map_err(sqlite_err(path))?
            .ok_or_else(|| StoreError::NoSuchRun(name.to_owned()))?;
        Ok(Self {
            conn,
            path: path.to_owned(),
            run_id,
        })
    }

    fn connect(path: &Path) -> Result<Connection, StoreError> {
        let conn = open_database(path)?;
        conn.execute_batch(SCHEMA).map_err(sqlite_err(path))?;
        conn.execute_batch(NODE_SPEND_SCHEMA)
            .map_err(sqlite_err(path))?;
        Ok(conn)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes `d` durable; returns once it is on disk.
    pub fn persist(&mut self, d: &Durable) -> Result<(), StoreError> {
        let err = sqlite_err(&self.path);
        match d {
            Durable::Charged {
                round,
                ledger,
                population,
                step,
                gate,
            } => {
                let json = serde_json::to_string(ledger).expect("ledger serializes");
                // Write-locked from the start: a deferred transaction that reads
                // first fails at once (busy, whatever the timeout) when the
                // registry or another process wrote meanwhile.
                let tx = self
                    .conn
                    .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                    .map_err(&err)?;
                for name in population {
                    let saved: Option<String> = tx
                        .query_row(
                            "SELECT spend FROM node_spend WHERE name = ?1",
                            [name],
                            |r| r.get(0),
                        )
                        .optional()
                        .map_err(&err)?;
                    let mut spend: NodeSpend = match saved {
                        Some(text) => {
                            serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
                                path: self.path.clone(),
                                detail: format!("node_spend of '{name}': {e}"),
                            })?
                        }
                        None => NodeSpend::default(),
                    };
                    spend.add(ledger.orders(), step, *gate);
                    tx.execute(
                        "INSERT OR REPLACE INTO node_spend (name, spend) VALUES (?1, ?2)",
                        params![
                            name,
                            serde_json::to_string(&spend).expect("spend serializes")
                        ],
                    )
                    .map_err(&err)?;
                }
                // The primary key refuses a round charged twice.
                tx.execute(
                    "INSERT INTO ledger (run_id, round, epsilon) VALUES (?1, ?2, ?3)",
                    params![self.run_id, *round as i64, ledger.epsilon()],
                )
                .map_err(&err)?;
                tx.execute(
                    "INSERT OR REPLACE INTO ledger_state (run_id, ledger) VALUES (?1, ?2)",
                    params![self.run_id, json],
                )
                .map_err(&err)?;
                tx.commit().map_err(&err)?;
            }
            Durable::Checkpoint(c) => {
                let ledger = c
                    .ledger
                    .as_ref()
                    .map(|l| serde_json::to_string(l).expect("ledger serializes"));
                let rng = serde_json::to_string(&c.sampling_rng).expect("rng state serializes");
                // Write-locked from the start: a deferred transaction that reads
                // first fails at once (busy, whatever the timeout) when the
                // registry or another process wrote meanwhile.
                let tx = self
                    .conn
                    .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                    .map_err(&err)?;
                tx.execute(
                    "INSERT OR REPLACE INTO checkpoint (run_id, next_round, rounds_completed, rounds_failed, model, opt_step, opt_m, opt_v, ledger, clip_norm, rng, committed_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                    params![
                        self.run_id,
                        c.next_round as i64,
                        c.rounds_completed as i64,
                        c.rounds_failed as i64,
                        f32_bytes(&c.global_model),
                        c.strategy.step as i64,
                        Vec::<u8>::new(),
                        Vec::<u8>::new(),
                        ledger,
                        c.clip_norm,
                        rng,
                        now_secs(),
                    ],
                )
                .map_err(&err)?;
                tx.execute(
                    "DELETE FROM strategy_buffers WHERE run_id = ?1",
                    [self.run_id],
                )
                .map_err(&err)?;
                for (name, values) in &c.strategy.buffers {
                    tx.execute(
                        "INSERT INTO strategy_buffers (run_id, name, data) VALUES (?1, ?2, ?3)",
                        params![self.run_id, name, f32_bytes(values)],
                    )
                    .map_err(&err)?;
                }
                tx.commit().map_err(&err)?;
            }
        }
        Ok(())
    }

    /// Records a round's metrics (history; not needed to resume).
    pub fn record_round(&mut self, m: &RoundMetrics) -> Result<(), StoreError> {
        let json = m.to_json_with_costs().to_string();
        self.conn
            .execute(
                "INSERT OR REPLACE INTO rounds (run_id, round, metrics) VALUES (?1, ?2, ?3)",
                params![self.run_id, m.round as i64, json],
            )
            .map_err(sqlite_err(&self.path))?;
        Ok(())
    }

    /// What the run resumes from (nothing for a new run).
    pub fn load(&self) -> Result<Saved, StoreError> {
        let err = sqlite_err(&self.path);
        let corrupt = |detail: String| StoreError::Corrupt {
            path: self.path.clone(),
            detail,
        };
        type Row = (
            i64,
            i64,
            i64,
            Vec<u8>,
            i64,
            Vec<u8>,
            Vec<u8>,
            Option<String>,
            Option<f64>,
            String,
        );
        let row: Option<Row> = self
            .conn
            .query_row(
                "SELECT next_round, rounds_completed, rounds_failed, model, opt_step, opt_m, opt_v, ledger, clip_norm, rng FROM checkpoint WHERE run_id = ?1",
                [self.run_id],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                        r.get(7)?,
                        r.get(8)?,
                        r.get(9)?,
                    ))
                },
            )
            .optional()
            .map_err(&err)?;
        let checkpoint = match row {
            None => None,
            Some((next, done, failed, model, step, m, v, ledger, clip_norm, rng)) => {
                let vector = |b: &[u8], what: &str| {
                    f32s(b).ok_or_else(|| corrupt(format!("{what} blob of {} bytes", b.len())))
                };
                let ledger = ledger
                    .map(|j| serde_json::from_str::<PrivacyLedger>(&j))
                    .transpose()
                    .map_err(|e| corrupt(format!("checkpoint ledger: {e}")))?;
                let sampling_rng: RngState =
                    serde_json::from_str(&rng).map_err(|e| corrupt(format!("rng state: {e}")))?;
                let mut buffers = BTreeMap::new();
                let mut query = self
                    .conn
                    .prepare("SELECT name, data FROM strategy_buffers WHERE run_id = ?1")
                    .map_err(&err)?;
                let rows = query
                    .query_map([self.run_id], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
                    })
                    .map_err(&err)?;
                for row in rows {
                    let (name, data) = row.map_err(&err)?;
                    let values = vector(&data, &format!("strategy buffer '{name}'"))?;
                    buffers.insert(name, values);
                }
                // Written before strategies: the moments in their columns.
                for (name, legacy) in [("m", &m), ("v", &v)] {
                    if !legacy.is_empty() && !buffers.contains_key(name) {
                        buffers.insert(name.to_owned(), vector(legacy, "legacy moment")?);
                    }
                }
                Some(Checkpoint {
                    next_round: next as u64,
                    rounds_completed: done as u64,
                    rounds_failed: failed as u64,
                    global_model: vector(&model, "model")?,
                    strategy: StrategyState {
                        step: step as u64,
                        buffers,
                    },
                    ledger,
                    clip_norm,
                    sampling_rng,
                })
            }
        };
        let ledger = self
            .conn
            .query_row(
                "SELECT ledger FROM ledger_state WHERE run_id = ?1",
                [self.run_id],
                |r| r.get::<_, String>(0),
            )
            .optional()
            .map_err(&err)?
            .map(|j| serde_json::from_str::<PrivacyLedger>(&j))
            .transpose()
            .map_err(|e| corrupt(format!("ledger state: {e}")))?;
        Ok(Saved { checkpoint, ledger })
    }

    /// The rounds charged to the ledger, in order, with epsilon after each.
    pub fn charged_rounds(&self) -> Result<Vec<(u64, f64)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT round, epsilon FROM ledger WHERE run_id = ?1 ORDER BY round")
            .map_err(sqlite_err(&self.path))?;
        let rows = stmt
            .query_map([self.run_id], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get(1)?))
            })
            .map_err(sqlite_err(&self.path))?;
        rows.collect::<Result<_, _>>()
            .map_err(sqlite_err(&self.path))
    }

    /// The run's config as recorded when it was created.
    pub fn config(&self) -> Result<String, StoreError> {
        self.conn
            .query_row(
                "SELECT config FROM runs WHERE id = ?1",
                [self.run_id],
                |r| r.get(0),
            )
            .map_err(sqlite_err(&self.path))
    }

    /// The committed global model.
    pub fn global_model(&self) -> Result<Vec<f32>, StoreError> {
        self.load()?
            .checkpoint
            .map(|c| c.global_model)
            .ok_or_else(|| StoreError::NothingCommitted(self.run_name()))
    }

    fn run_name(&self) -> String {
        self.conn
            .query_row("SELECT name FROM runs WHERE id = ?1", [self.run_id], |r| {
                r.get(0)
            })
            .unwrap_or_else(|_| format!("#{}", self.run_id))
    }
}

/// Opens (creating) the state database with the settings every user of it
/// needs: WAL, a commit on disk when it returns, and patience when another
/// process (an operator command) holds the write lock.
pub(crate) fn open_database(path: &Path) -> Result<Connection, StoreError> {
    let err = sqlite_err(path);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Corrupt {
            path: path.to_owned(),
            detail: format!("cannot create {}: {e}", dir.display()),
        })?;
    }
    let conn = Connection::open(path).map_err(&err)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(&err)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(&err)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(&err)?;
    Ok(conn)
}

/// How a run opened from its durable state.
#[derive(Debug)]
pub enum Opened {
    /// A new run, at round 1.
    Started(Coordinator),
    /// A run continued where its committed state left it.
    Resumed(Coordinator),
    /// The run had already completed its rounds; nothing is left to do.
    Complete {
        /// Rounds the run completed.
        rounds_completed: u64,
    },
}

/// Why a run could not be started or resumed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The state database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The saved state does not fit the configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl Store {
    /// Starts the run from `initial`, or resumes it from what this store
    /// holds: the newest checkpoint and the newest charged ledger, so that
    /// a round charged and then lost in a crash stays spent and is never
    /// charged twice. `coordinator` carries the run's config, model spec,
    /// data and strategy.
    pub fn start_or_resume(
        &self,
        coordinator: CoordinatorBuilder,
        initial: Vec<f32>,
    ) -> Result<Opened, OpenError> {
        let saved = self.load()?;
        let resumed = match (saved.checkpoint, saved.ledger) {
            (None, None) => return Ok(Opened::Started(coordinator.start(initial)?)),
            // Nothing committed yet but a round was charged: continue from
            // the initial state, after that round.
            (None, Some(ledger)) => coordinator.start_after(initial, ledger)?,
            (Some(checkpoint), ledger) => coordinator.resume(checkpoint, ledger)?,
        };
        if resumed.rounds_completed() >= resumed.config().rounds {
            return Ok(Opened::Complete {
                rounds_completed: resumed.rounds_completed(),
            });
        }
        Ok(Opened::Resumed(resumed))
    }
}

pub(crate) fn sqlite_err(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |source| StoreError::Sqlite {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests;
