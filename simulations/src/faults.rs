//! Injected faults: clients that vanish mid-round and clients that are
//! slow. Every decision is a pure function of the run seed, the client and
//! the round, so a configuration replays the same faults.
//!
//! A sampled client vanishes with probability `dropout`, at a stage drawn
//! uniformly from the stages of the round's protocol: under secure
//! aggregation before it advertises its keys, sends its key shares, sends
//! its masked input or sends its unmasking shares (SecAgg+ must recover
//! from each); in a plain round before its update. A vanished client closes
//! its connection and rejoins after [`REJOIN_DELAY`], as a phone that lost
//! its network comes back. Stragglers wait a drawn delay before sending
//! their update (or masked input).

use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use fedveil_client::{Fault, FaultHook};
use fedveil_ml::train::mix_seed;
use fedveil_proto::wire::{Message, SecAgg};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, Exp};

/// How long a vanished client stays away before it reconnects.
pub const REJOIN_DELAY: Duration = Duration::from_secs(1);

/// Separates fault draws from every other use of the run seed.
const FAULT_SEED: u64 = 0x6661_756c_7473;

/// Where in a round a client can vanish: before it sends the message of
/// that stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    /// Plain round: before the update.
    Update,
    /// SecAgg+ round 0: before advertising its public keys.
    AdvertiseKeys,
    /// SecAgg+ round 1: before sending its encrypted key shares.
    ShareKeys,
    /// SecAgg+ round 2: before sending its masked input.
    MaskedInput,
    /// SecAgg+ round 3: before sending its unmasking shares.
    Unmasking,
}

impl Stage {
    /// The stages a client can vanish at in a plaintext round.
    pub const PLAIN: [Stage; 1] = [Stage::Update];
    /// The stages a client can vanish at in a SecAgg+ round.
    pub const SECURE: [Stage; 4] = [
        Stage::AdvertiseKeys,
        Stage::ShareKeys,
        Stage::MaskedInput,
        Stage::Unmasking,
    ];

    /// The stage whose message `message` is, if it is one.
    pub fn of(message: &Message) -> Option<Stage> {
        match message {
            Message::Update(_) => Some(Stage::Update),
            Message::SecAgg(SecAgg::AdvertiseKeys { .. }) => Some(Stage::AdvertiseKeys),
            Message::SecAgg(SecAgg::Shares { .. }) => Some(Stage::ShareKeys),
            Message::SecAgg(SecAgg::MaskedInput { .. }) => Some(Stage::MaskedInput),
            Message::SecAgg(SecAgg::UnmaskShares { .. }) => Some(Stage::Unmasking),
            _ => None,
        }
    }

    /// The stage's name in logs and summaries.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Update => "update",
            Stage::AdvertiseKeys => "advertise-keys",
            Stage::ShareKeys => "share-keys",
            Stage::MaskedInput => "masked-input",
            Stage::Unmasking => "unmasking",
        }
    }

    /// Whether this stage's message carries the trained update (where a
    /// straggler's delay goes).
    fn carries_update(self) -> bool {
        matches!(self, Stage::Update | Stage::MaskedInput)
    }
}

/// A straggler delay distribution: `fixed:D`, `exp:MEAN` or
/// `uniform:LO..HI`, durations as `250ms`, `2s` or `1.5m`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DelayDist {
    /// Always this delay.
    Fixed(Duration),
    /// Exponentially distributed delays.
    Exponential {
        /// The mean delay.
        mean: Duration,
    },
    /// Uniformly distributed delays.
    Uniform {
        /// The shortest delay.
        low: Duration,
        /// The longest delay.
        high: Duration,
    },
}

impl DelayDist {
    fn sample(&self, rng: &mut ChaCha20Rng) -> Duration {
        match *self {
            DelayDist::Fixed(d) => d,
            DelayDist::Exponential { mean } => {
                let rate = 1.0 / mean.as_secs_f64();
                Duration::from_secs_f64(Exp::new(rate).expect("positive rate").sample(rng))
            }
            DelayDist::Uniform { low, high } => {
                Duration::from_secs_f64(rng.random_range(low.as_secs_f64()..=high.as_secs_f64()))
            }
        }
    }
}

/// A fault setting that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum FaultError {
    /// A delay or delay distribution that does not parse.
    #[error("{input:?}: {reason}")]
    BadDelay {
        /// What was given.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A dropout rate outside [0, 1).
    #[error("dropout {0} must be in [0, 1)")]
    BadDropout(f64),
}

fn bad_delay(input: &str, reason: impl Into<String>) -> FaultError {
    FaultError::BadDelay {
        input: input.to_owned(),
        reason: reason.into(),
    }
}

/// `250ms`, `2s`, `1.5m`: a non-negative number and a unit.
fn parse_delay(s: &str) -> Result<Duration, FaultError> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| bad_delay(s, "add a unit (ms, s or m)"))?;
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| bad_delay(s, "expected a number followed by ms, s or m"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => {
            return Err(bad_delay(
                s,
                format!("unknown unit {unit:?} (use ms, s or m)"),
            ));
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|e| bad_delay(s, e.to_string()))
}

impl FromStr for DelayDist {
    type Err = FaultError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let usage = "expected fixed:D, exp:MEAN or uniform:LO..HI (e.g. exp:2s)";
        let (kind, arg) = s.split_once(':').ok_or_else(|| bad_delay(s, usage))?;
        match kind {
            "fixed" => Ok(DelayDist::Fixed(parse_delay(arg)?)),
            "exp" => {
                let mean = parse_delay(arg)?;
                if mean.is_zero() {
                    return Err(bad_delay(s, "the mean must be positive"));
                }
                Ok(DelayDist::Exponential { mean })
            }
            "uniform" => {
                let (low, high) = arg.split_once("..").ok_or_else(|| bad_delay(s, usage))?;
                let (low, high) = (parse_delay(low)?, parse_delay(high)?);
                if low > high {
                    return Err(bad_delay(s, "the low end is above the high end"));
                }
                Ok(DelayDist::Uniform { low, high })
            }
            _ => Err(bad_delay(s, usage)),
        }
    }
}

impl fmt::Display for DelayDist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DelayDist::Fixed(d) => write!(f, "fixed:{}s", d.as_secs_f64()),
            DelayDist::Exponential { mean } => write!(f, "exp:{}s", mean.as_secs_f64()),
            DelayDist::Uniform { low, high } => {
                write!(f, "uniform:{}s..{}s", low.as_secs_f64(), high.as_secs_f64())
            }
        }
    }
}

/// The faults of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultPlan {
    /// Probability that a sampled client vanishes in a round.
    pub dropout: f64,
    /// How late stragglers' updates are.
    pub straggler_delay: Option<DelayDist>,
    /// Seeds every client's fate.
    pub seed: u64,
}

/// What happens to one client in one round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fate {
    /// The stage it vanishes at, if it does.
    pub vanish_at: Option<Stage>,
    /// Added before the update leaves.
    pub delay: Duration,
}

impl FaultPlan {
    /// A plan, with `dropout` checked to be in [0, 1).
    pub fn new(
        dropout: f64,
        straggler_delay: Option<DelayDist>,
        seed: u64,
    ) -> Result<Self, FaultError> {
        if !(0.0..1.0).contains(&dropout) {
            return Err(FaultError::BadDropout(dropout));
        }
        Ok(Self {
            dropout,
            straggler_delay,
            seed,
        })
    }

    /// Whether the plan injects anything.
    pub fn is_active(&self) -> bool {
        self.dropout > 0.0 || self.straggler_delay.is_some()
    }

    /// Client `client`'s fate in `round` (the same every time it is asked).
    pub fn fate(&self, client: u64, round: u64, secure: bool) -> Fate {
        let mut rng = ChaCha20Rng::seed_from_u64(mix_seed(&[self.seed, FAULT_SEED, client, round]));
        let stages: &[Stage] = if secure {
            &Stage::SECURE
        } else {
            &Stage::PLAIN
        };
        let vanishes = rng.random_bool(self.dropout);
        let stage = stages[rng.random_range(0..stages.len())];
        let delay = self
            .straggler_delay
            .map_or(Duration::ZERO, |d| d.sample(&mut rng));
        Fate {
            vanish_at: vanishes.then_some(stage),
            delay,
        }
    }

    /// The hook for simulated client `client`; `log` tallies what happened.
    pub fn hook(&self, client: u64, log: std::sync::Arc<FaultLog>) -> ClientFaults {
        ClientFaults {
            plan: *self,
            client,
            log,
        }
    }
}

/// Counts of injected faults over a run.
#[derive(Debug, Default)]
pub struct FaultLog {
    inner: Mutex<FaultTally>,
}

/// Counts of the faults a run injected.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FaultTally {
    /// Vanishings by stage.
    pub vanished: std::collections::BTreeMap<Stage, u64>,
    /// Reconnections after vanishing.
    pub rejoined: u64,
    /// Updates sent late, and their total delay.
    pub delayed: u64,
    /// Delay added, summed over all updates.
    pub total_delay: Duration,
}

impl FaultTally {
    /// Vanishings at every stage together.
    pub fn vanished_total(&self) -> u64 {
        self.vanished.values().sum()
    }
}

impl FaultLog {
    /// What has been counted so far.
    pub fn tally(&self) -> FaultTally {
        self.inner.lock().expect("fault log").clone()
    }

    /// Counts a vanished client that came back.
    pub fn rejoined(&self) {
        self.inner.lock().expect("fault log").rejoined += 1;
    }
}

/// One simulated client's [`FaultHook`].
#[derive(Debug)]
pub struct ClientFaults {
    plan: FaultPlan,
    client: u64,
    log: std::sync::Arc<FaultLog>,
}

impl FaultHook for ClientFaults {
    fn before_send(&self, message: &Message) -> Fault {
        let (Some(stage), Some(round)) = (Stage::of(message), message.round()) else {
            return Fault::Send;
        };
        let secure = stage != Stage::Update;
        let fate = self.plan.fate(self.client, round, secure);
        if fate.vanish_at == Some(stage) {
            *self
                .log
                .inner
                .lock()
                .expect("fault log")
                .vanished
                .entry(stage)
                .or_default() += 1;
            return Fault::Vanish;
        }
        if stage.carries_update() && !fate.delay.is_zero() {
            let mut tally = self.log.inner.lock().expect("fault log");
            tally.delayed += 1;
            tally.total_delay += fate.delay;
            return Fault::Delay(fate.delay);
        }
        Fault::Send
    }
}

#[cfg(test)]
mod tests;
