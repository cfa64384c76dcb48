//! Differential privacy: clipping, noise, accounting and the budget.
//!
//! Three mechanisms, chosen per run and written into every round config so
//! each client of a cohort applies the same one:
//! - **Distributed** (the default with secure aggregation): each client
//!   clips, rounds its update to integers and adds Skellam noise; the sum
//!   the server unmasks carries noise enough for the target guarantee even
//!   when only the minimum accepted number of clients survive.
//! - **Central** (trusted server, DP-FedAvg of McMahan et al. 2018): clients
//!   clip, the server adds Gaussian noise to the sum.
//! - **Local** (no trust in anyone): each client adds Gaussian noise for its
//!   own per-round (epsilon, delta).
//!
//! Privacy is user-level: neighbouring runs differ by one client's whole
//! data. Threat model and caveats: `docs/SECURITY.md`.

pub mod adaptive;
pub mod clip;
pub mod gate;
pub mod ledger;
pub mod noise;
pub mod rdp;

use serde::{Deserialize, Serialize};

pub use adaptive::AdaptiveClipping;
pub use ledger::{BudgetExceeded, NodeSpend, PrivacyLedger};
use rdp::AccountingError;

/// Default delta when none is given.
pub const DEFAULT_DELTA: f64 = 1e-5;
/// Default L2 clipping bound of a whole update.
pub const DEFAULT_CLIP_NORM: f64 = 1.0;
/// Default modulus bits for distributed DP (values in Z_(2^bits)).
pub const DEFAULT_DP_BITS: u32 = 32;
/// Fraction of the expected cohort that must contribute to a distributed-DP
/// round when no explicit minimum is given; the noise is calibrated to it.
pub const DEFAULT_MIN_CONTRIBUTOR_FRACTION: f64 = 0.7;
/// Noise tail (in standard deviations) the distributed encoding leaves
/// room for, per coordinate of the sum.
pub const NOISE_TAIL_STDS: f64 = 12.0;

/// Which mechanism protects the updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mechanism {
    /// Clients add Skellam noise that only sums to the right level under secure aggregation.
    Distributed,
    /// Clients clip; the server adds Gaussian noise to the sum.
    Central,
    /// Each client noises its own update.
    Local,
}

/// A DP mechanism name that is none of the three.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown DP mechanism {0:?} (expected distributed, central or local)")]
pub struct UnknownMechanism(pub String);

impl std::str::FromStr for Mechanism {
    type Err = UnknownMechanism;
    fn from_str(s: &str) -> Result<Self, UnknownMechanism> {
        match s {
            "distributed" => Ok(Self::Distributed),
            "central" => Ok(Self::Central),
            "local" => Ok(Self::Local),
            other => Err(UnknownMechanism(other.to_owned())),
        }
    }
}

impl std::fmt::Display for Mechanism {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Distributed => "distributed",
            Self::Central => "central",
            Self::Local => "local",
        })
    }
}

/// How much noise: a noise multiplier, or a target epsilon to reach after
/// the planned rounds (for local DP: the per-round epsilon of each client).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoiseLevel {
    /// Noise std over the clip norm.
    NoiseMultiplier(f64),
    /// The epsilon to reach after the planned rounds.
    TargetEpsilon(f64),
}

/// The operator's DP settings for a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DpConfig {
    /// Who adds the noise.
    pub mechanism: Mechanism,
    /// The L2 bound each update is clipped to.
    pub clip_norm: f64,
    /// How much noise.
    pub noise: NoiseLevel,
    /// The delta epsilon is reported at.
    pub delta: f64,
    /// Rounds the noise is planned for (with a target epsilon).
    pub planned_rounds: u64,
    /// Largest epsilon the run may spend; defaults to the target epsilon.
    pub budget: Option<f64>,
    /// Distributed DP: fewest contributors a round accepts (the noise is
    /// calibrated to them).
    pub min_contributors: Option<usize>,
    /// Let the clip bound track a quantile of the update norms (central and
    /// distributed DP); `clip_norm` is then the initial bound.
    #[serde(default)]
    pub adaptive: Option<AdaptiveClipping>,
}

/// A DP configuration that cannot give the promised guarantee.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DpConfigError {
    /// Rounds need a Poisson cohort of some size, and whether one runs
    /// hinges on a single client too often for delta (see [`gate`]).
    #[error(
        "a round runs only when its Poisson cohort holds at least {min_cohort} clients (expected {expected:.1} of {population}); whether it runs then hinges on one client with probability {per_round:.2e} a round, {total:.2e} over {rounds} rounds, which at the planned epsilon would take more than a tenth of delta {delta:e}: lower --dp-min-contributors, sample more clients a round, or use central DP without secure aggregation (every round runs)"
    )]
    GatedSkips {
        /// Fewest clients a round runs with.
        min_cohort: usize,
        /// Expected cohort.
        expected: f64,
        /// Population sampled from.
        population: usize,
        /// Probability per round.
        per_round: f64,
        /// Over the planned rounds.
        total: f64,
        /// Planned rounds.
        rounds: u64,
        /// The run's delta.
        delta: f64,
    },
    /// A clip norm that is not positive and finite.
    #[error("clip norm must be positive and finite, got {0}")]
    ClipNorm(f64),
    /// A noise multiplier that is not positive and finite.
    #[error("noise multiplier must be positive and finite, got {0}")]
    NoiseMultiplier(f64),
    /// A budget that is not positive and finite.
    #[error("budget must be positive and finite, got {0}")]
    Budget(f64),
    /// Zero planned rounds.
    #[error("planned rounds must be at least 1")]
    PlannedRounds,
    /// Distributed DP asked for without secure aggregation.
    #[error(
        "distributed DP needs secure aggregation (--secagg); use central or local DP without it"
    )]
    DistributedWithoutSecAgg,
    /// Distributed DP with a minimum of fewer than 2 contributors.
    #[error("distributed DP needs at least 2 contributors per round, got a minimum of {0}")]
    TooFewContributors(usize),
    /// The noisy integers cannot fit the secure-aggregation modulus.
    #[error(
        "distributed DP cannot fit a cohort of {cohort} with this noise into {bits} bits \
         (largest integer norm {max_norm:.1}, below the rounding floor); use fewer clients or less noise"
    )]
    NoHeadroom {
        /// The cohort the encoding must fit.
        cohort: usize,
        /// Bits of the modulus.
        bits: u32,
        /// The largest integer norm that would fit.
        max_norm: f64,
    },
    /// Adaptive clipping settings out of range.
    #[error("adaptive clipping: {0}")]
    Adaptive(String),
    /// Adaptive clipping with local DP.
    #[error(
        "adaptive clipping needs a noised aggregate of the clipping indicators; local DP has none (use central or distributed DP)"
    )]
    AdaptiveWithLocal,
    /// The budget is already spent.
    #[error("the privacy budget is already spent: epsilon {spent:.4} of {budget}")]
    BudgetSpent {
        /// Epsilon spent.
        spent: f64,
        /// The budget.
        budget: f64,
    },
    /// The noise or the epsilon cannot be computed.
    #[error(transparent)]
    Accounting(#[from] AccountingError),
}

/// What a client must do to its update in one round (part of the round
/// config; the same for the whole cohort).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DpRound {
    /// Clip only; the server adds the noise. With `clip_indicator`, append
    /// +-1/2 (see [`adaptive`]).
    Central {
        /// The L2 bound.
        clip_norm: f64,
        /// Whether to append the clipping indicator.
        clip_indicator: bool,
    },
    /// Clip, then add N(0, noise_std^2) to every value.
    Local {
        /// The L2 bound.
        clip_norm: f64,
        /// The std of the noise added to each value.
        noise_std: f64,
    },
    /// Clip, divide by `granularity`, round to integers with L2 norm at most
    /// `rounded_norm`, add Sk(`skellam_mu`) per value; the integers travel
    /// through secure aggregation. With `indicator_mu`, append the clipping
    /// indicator as +-1 plus Sk(`indicator_mu`).
    Distributed {
        /// The L2 bound.
        clip_norm: f64,
        /// Real value of one integer step.
        granularity: f64,
        /// L2 bound of the rounded integers.
        rounded_norm: f64,
        /// Skellam parameter of each value's noise share.
        skellam_mu: f64,
        /// Skellam parameter of the indicator's noise share (adaptive clipping).
        indicator_mu: Option<f64>,
    },
}

/// A client's update after its DP step.
#[derive(Debug, Clone, PartialEq)]
pub enum Privatized {
    /// Clipped (and, for local DP, noised) real values.
    Real(Vec<f32>),
    /// Distributed DP: rounded, noised integers for secure aggregation.
    Integers(Vec<i64>),
}

/// A DP step a client cannot carry out as sent: every parameter must be a
/// finite number in its range, or the noise could not be drawn.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DpRoundError {
    /// A parameter outside its range.
    #[error("{name} = {value} is not a finite number {range}")]
    OutOfRange {
        /// The parameter.
        name: &'static str,
        /// Its value.
        value: f64,
        /// What it must be.
        range: &'static str,
    },
}

/// An update the DP step cannot process.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PrivatizeError {
    /// The update has a NaN or an infinity (its index).
    #[error("update value {0} is NaN or infinite")]
    NonFinite(usize),
    /// Randomized rounding failed.
    #[error(transparent)]
    Rounding(#[from] noise::RoundingFailed),
    /// The step's parameters are invalid (see [`DpRound::validate`]).
    #[error(transparent)]
    Invalid(#[from] DpRoundError),
}

impl DpRound {
    /// The L2 bound updates are clipped to.
    pub fn clip_norm(&self) -> f64 {
        match *self {
            Self::Central { clip_norm, .. } | Self::Local { clip_norm, .. } => clip_norm,
            Self::Distributed { clip_norm, .. } => clip_norm,
        }
    }

    /// Values appended after the model's (the clipping indicator).
    pub fn extra_values(&self) -> usize {
        match *self {
            Self::Central { clip_indicator, .. } => usize::from(clip_indicator),
            Self::Distributed { indicator_mu, .. } => usize::from(indicator_mu.is_some()),
            Self::Local { .. } => 0,
        }
    }

    /// The same round with clip bound `c`. Distributed DP scales its
    /// granularity with it, so the integers, their norm bound and the noise
    /// (hence the accounting) stay the same.
    pub fn with_clip_norm(&self, c: f64) -> Self {
        let mut out = self.clone();
        match &mut out {
            Self::Central { clip_norm, .. } | Self::Local { clip_norm, .. } => *clip_norm = c,
            Self::Distributed {
                clip_norm,
                granularity,
                ..
            } => {
                *granularity *= c / *clip_norm;
                *clip_norm = c;
            }
        }
        out
    }

    /// Checks every parameter before any noise is drawn: a server's
    /// nonsense must be refused, never panic a node.
    pub fn validate(&self) -> Result<(), DpRoundError> {
        let check = |name, value: f64, positive: bool, max: f64| {
            let ok = value.is_finite()
                && value <= max
                && if positive { value > 0.0 } else { value >= 0.0 };
            if ok {
                Ok(())
            } else {
                Err(DpRoundError::OutOfRange {
                    name,
                    value,
                    range: if positive { "above 0" } else { "at least 0" },
                })
            }
        };
        check("clip_norm", self.clip_norm(), true, f64::MAX)?;
        match *self {
            Self::Central { .. } => Ok(()),
            Self::Local { noise_std, .. } => check("noise_std", noise_std, false, f64::MAX),
            Self::Distributed {
                granularity,
                rounded_norm,
                skellam_mu,
                indicator_mu,
                ..
            } => {
                check("granularity", granularity, true, f64::MAX)?;
                check("rounded_norm", rounded_norm, true, f64::MAX)?;
                check("skellam_mu", skellam_mu, false, noise::MAX_SKELLAM_MU)?;
                match indicator_mu {
                    Some(mu) => check("indicator_mu", mu, false, noise::MAX_SKELLAM_MU),
                    None => Ok(()),
                }
            }
        }
    }

    /// The client's DP step: clip on the global L2 norm, then noise as the
    /// mechanism says. `rng` must be a CSPRNG seeded from the OS. Invalid
    /// parameters are an error, never a panic in the noise samplers.
    pub fn privatize<R: rand::Rng + rand::CryptoRng + ?Sized>(
        &self,
        mut update: Vec<f32>,
        rng: &mut R,
    ) -> Result<(Privatized, clip::Clipped), PrivatizeError> {
        self.validate()?;
        if let Some(i) = update.iter().position(|v| !v.is_finite()) {
            return Err(PrivatizeError::NonFinite(i));
        }
        let clipped = clip::clip_l2(&mut update, self.clip_norm());
        let indicator = adaptive::indicator(&clipped);
        let out = match *self {
            Self::Central { clip_indicator, .. } => {
                if clip_indicator {
                    update.push(indicator as f32);
                }
                Privatized::Real(update)
            }
            Self::Local { noise_std, .. } => {
                noise::add_gaussian(&mut update, noise_std, rng);
                Privatized::Real(update)
            }
            Self::Distributed {
                granularity,
                rounded_norm,
                skellam_mu,
                indicator_mu,
                ..
            } => {
                let scaled: Vec<f64> = update.iter().map(|&v| f64::from(v) / granularity).collect();
                drop(update);
                let mut ints = noise::round_conditionally(&scaled, rounded_norm, rng)?;
                noise::add_skellam(&mut ints, skellam_mu, rng);
                if let Some(mu) = indicator_mu {
                    let mut bit = [(2.0 * indicator) as i64];
                    noise::add_skellam(&mut bit, mu, rng);
                    ints.push(bit[0]);
                }
                Privatized::Integers(ints)
            }
        };
        Ok((out, clipped))
    }
}

/// A value of Z_(2^bits) read as a signed integer in [-2^(bits-1), 2^(bits-1)).
pub fn centered(v: u32, bits: u32) -> i64 {
    let modulus = 1i64 << bits;
    let v = i64::from(v) & (modulus - 1);
    if v >= modulus / 2 { v - modulus } else { v }
}

/// A resolved DP plan: what clients do, what the server adds, and the
/// privacy cost (RDP at each order) of one round.
#[derive(Debug, Clone, PartialEq)]
pub struct DpPlan {
    /// The operator's settings.
    pub config: DpConfig,
    /// What each client does in a round.
    pub round: DpRound,
    /// Gaussian noise std the server adds to the sum (central DP), else 0.
    pub server_noise_std: f64,
    /// Noise multiplier in force (Gaussian-equivalent for distributed DP;
    /// per-round local multiplier for local DP).
    pub noise_multiplier: f64,
    /// Poisson sampling rate the accounting assumes.
    pub sampling_rate: f64,
    /// Divisor of the noisy sum (the expected cohort size); local DP
    /// averages over the contributors instead.
    pub denominator: Option<f64>,
    /// Distributed DP: rounds with fewer contributors are aborted.
    pub min_contributors: usize,
    /// Fewest clients a Poisson cohort needs for the round to run (0:
    /// every cohort runs, an empty one too); smaller ones are skipped, and
    /// charged like the rest.
    pub min_cohort: usize,
    /// Probability, per round at the planned population, that whether a
    /// round runs hinges on one client ([`gate::per_round`]).
    pub gate_per_round: f64,
    /// Adaptive clipping, with the std of the noise on the indicator sum
    /// (in clients; the server adds it under central DP, the clients'
    /// Skellam shares carry it under distributed DP).
    pub adaptive: Option<(AdaptiveClipping, f64)>,
    /// The RDP orders the ledger accounts at.
    pub orders: Vec<f64>,
    /// One round's RDP at each order.
    pub rdp_per_round: Vec<f64>,
    /// The budget the ledger enforces.
    pub budget: f64,
}

impl DpConfig {
    /// Checks the settings and computes the noise and the per-round privacy
    /// cost for sampling rate `q` over a population of `population` clients
    /// (so the expected cohort is q * population), a model of `dim`
    /// parameters, and at most `max_cohort` clients per round.
    pub fn plan(
        &self,
        q: f64,
        population: usize,
        dim: usize,
        max_cohort: usize,
        secure_aggregation: bool,
    ) -> Result<DpPlan, DpConfigError> {
        if !(self.clip_norm > 0.0 && self.clip_norm.is_finite()) {
            return Err(DpConfigError::ClipNorm(self.clip_norm));
        }
        rdp::check_delta(self.delta)?;
        rdp::check_sampling_rate(q)?;
        if self.planned_rounds == 0 {
            return Err(DpConfigError::PlannedRounds);
        }
        match self.noise {
            NoiseLevel::NoiseMultiplier(z) if !(z > 0.0 && z.is_finite()) => {
                return Err(DpConfigError::NoiseMultiplier(z));
            }
            NoiseLevel::TargetEpsilon(e) => rdp::check_epsilon(e)?,
            _ => {}
        }
        if let Some(b) = self.budget
            && !(b > 0.0 && b.is_finite())
        {
            return Err(DpConfigError::Budget(b));
        }
        if let Some(a) = &self.adaptive {
            a.check()?;
            if self.mechanism == Mechanism::Local {
                return Err(DpConfigError::AdaptiveWithLocal);
            }
        }
        let expected_cohort = (q * population as f64).max(1.0);
        let plan = match self.mechanism {
            Mechanism::Central => {
                // Without secure aggregation every cohort runs, even an
                // empty one (the server's noise alone); SecAgg+ needs a few.
                let min_cohort = if secure_aggregation {
                    crate::round::server::MIN_SECAGG_COHORT
                } else {
                    0
                };
                let gate = gate::per_round(population, q, min_cohort);
                self.plan_central(q, expected_cohort, min_cohort, gate)?
            }
            Mechanism::Local => self.plan_local(q)?,
            Mechanism::Distributed => {
                if !secure_aggregation {
                    return Err(DpConfigError::DistributedWithoutSecAgg);
                }
                self.plan_distributed(q, population, dim, max_cohort)?
            }
        };
        let total = plan.gate_per_round * self.planned_rounds as f64;
        let planned = plan.epsilon_after(self.planned_rounds);
        if !gate::fits(total, planned, self.delta) {
            return Err(DpConfigError::GatedSkips {
                min_cohort: plan.min_cohort,
                expected: expected_cohort,
                population,
                per_round: plan.gate_per_round,
                total,
                rounds: self.planned_rounds,
                delta: self.delta,
            });
        }
        Ok(plan)
    }

    /// No noise multiplier up to the largest reaches `epsilon`.
    fn unreachable(&self, epsilon: f64) -> AccountingError {
        AccountingError::Unreachable {
            epsilon,
            delta: self.delta,
            rounds: self.planned_rounds,
            max: rdp::MAX_NOISE_MULTIPLIER,
        }
    }

    fn budget_or(&self, fallback: f64) -> f64 {
        self.budget.unwrap_or(match self.noise {
            NoiseLevel::TargetEpsilon(e) if self.mechanism != Mechanism::Local => e,
            _ => fallback,
        })
    }

    /// Central DP. With adaptive clipping the update and the indicator sum
    /// form one Gaussian mechanism of joint multiplier
    /// (z^-2 + (2 sigma_b)^-2)^-1/2, which is what is accounted.
    fn plan_central(
        &self,
        q: f64,
        expected_cohort: f64,
        min_cohort: usize,
        gate: f64,
    ) -> Result<DpPlan, DpConfigError> {
        let count_std = self.adaptive.map(|a| a.count_noise_std(expected_cohort));
        let (z, z_joint) = match (self.noise, count_std) {
            (NoiseLevel::NoiseMultiplier(z), None) => (z, z),
            (NoiseLevel::NoiseMultiplier(z), Some(s)) => {
                (z, adaptive::joint_noise_multiplier(z, s))
            }
            (NoiseLevel::TargetEpsilon(e), count_std) => {
                let joint = if gate > 0.0 {
                    let orders = rdp::default_orders();
                    let eps = |z: f64| {
                        let step = rdp::sampled_gaussian(q, z, &orders);
                        planned_epsilon(&orders, &step, self.planned_rounds, self.delta, gate)
                    };
                    rdp::smallest_noise(e, eps).ok_or_else(|| self.unreachable(e))?
                } else {
                    rdp::gaussian_noise_multiplier(q, e, self.planned_rounds, self.delta)?
                };
                match count_std {
                    None => (joint, joint),
                    Some(s) => (adaptive::update_noise_multiplier(joint, s)?, joint),
                }
            }
        };
        let orders = rdp::default_orders();
        let rdp_per_round = rdp::sampled_gaussian(q, z_joint, &orders);
        let planned = planned_epsilon(
            &orders,
            &rdp_per_round,
            self.planned_rounds,
            self.delta,
            gate,
        );
        Ok(DpPlan {
            config: self.clone(),
            round: DpRound::Central {
                clip_norm: self.clip_norm,
                clip_indicator: self.adaptive.is_some(),
            },
            server_noise_std: z * self.clip_norm,
            noise_multiplier: z,
            sampling_rate: q,
            denominator: Some(expected_cohort),
            min_contributors: 1,
            min_cohort,
            gate_per_round: gate,
            adaptive: self.adaptive.zip(count_std),
            orders,
            rdp_per_round,
            budget: self.budget_or(planned),
        })
    }

    /// Local DP: the update may be replaced by any other of norm <= C, so
    /// the sensitivity is 2C; no amplification is claimed (the server knows
    /// who was sampled). The ledger composes the per-round guarantee over
    /// the rounds, as if a client took part in every one.
    fn plan_local(&self, q: f64) -> Result<DpPlan, DpConfigError> {
        let z = match self.noise {
            NoiseLevel::NoiseMultiplier(z) => z,
            NoiseLevel::TargetEpsilon(e) => rdp::gaussian_noise_multiplier(1.0, e, 1, self.delta)?,
        };
        let orders = rdp::default_orders();
        let rdp_per_round = rdp::sampled_gaussian(1.0, z, &orders);
        let planned = planned_epsilon(
            &orders,
            &rdp_per_round,
            self.planned_rounds,
            self.delta,
            0.0,
        );
        Ok(DpPlan {
            config: self.clone(),
            round: DpRound::Local {
                clip_norm: self.clip_norm,
                noise_std: z * 2.0 * self.clip_norm,
            },
            server_noise_std: 0.0,
            noise_multiplier: z,
            sampling_rate: q,
            denominator: None,
            min_contributors: 1,
            min_cohort: 1,
            gate_per_round: 0.0,
            adaptive: None,
            orders,
            rdp_per_round,
            budget: self.budget.unwrap_or(planned),
        })
    }

    /// Distributed DP with Skellam noise (Agarwal, Kairouz, Liu 2021).
    ///
    /// The integer norm bound `Delta2` is chosen as large as the modulus
    /// allows (finer rounding, less distortion): the sum of `max_cohort`
    /// vectors of norm `Delta2` plus a [`NOISE_TAIL_STDS`] noise tail must
    /// stay inside half the modulus, so the centred sum never wraps.
    /// Each client adds Sk(mu / (m - 1)), m the fewest contributors a round
    /// accepts: even if only m survive, the m - 1 clients other than any
    /// one of them carry Sk(mu), the noise the accounting assumes.
    fn plan_distributed(
        &self,
        q: f64,
        population: usize,
        dim: usize,
        max_cohort: usize,
    ) -> Result<DpPlan, DpConfigError> {
        let expected_cohort = (q * population as f64).max(1.0);
        let min_cohort = |m: usize| m.max(crate::round::server::MIN_SECAGG_COHORT);
        let gate_of = |m: usize| gate::per_round(population, q, min_cohort(m));
        // By default the largest m up to a fraction of the expected cohort
        // whose gate stays within its share of delta.
        let m = self.min_contributors.unwrap_or_else(|| {
            let most =
                ((DEFAULT_MIN_CONTRIBUTOR_FRACTION * expected_cohort).ceil() as usize).max(2);
            // The epsilon the gate will be paid at: the target, else the
            // budget, else a generous one.
            let at = match self.noise {
                NoiseLevel::TargetEpsilon(e) => e,
                NoiseLevel::NoiseMultiplier(_) => {
                    self.budget.unwrap_or(gate::DEFAULT_EPSILON_FOR_MINIMUM)
                }
            };
            let fits =
                |m: &usize| gate::fits(gate_of(*m) * self.planned_rounds as f64, at, self.delta);
            (2..=most).rev().find(fits).unwrap_or(2)
        });
        if m < 2 {
            return Err(DpConfigError::TooFewContributors(m));
        }
        let gate = gate_of(m);
        let cohort = max_cohort.max(m);
        let orders = rdp::integer_orders();
        // The indicator travels as +-1 (sensitivity 1) with Sk(2 sigma_b^2)
        // in all: std 2 sigma_b in integer units, sigma_b in clients.
        let count_std = self.adaptive.map(|a| a.count_noise_std(expected_cohort));
        let indicator_mu = count_std.map(|s| 2.0 * s * s);
        let cost = |z: f64, delta2: f64| -> Vec<f64> {
            let mu = z * z * delta2 * delta2 / 2.0;
            let l1 = (delta2 * delta2).min((dim as f64).sqrt() * delta2);
            let joint = |a: f64| {
                let update = rdp::skellam(mu, l1, delta2, &[a])[0];
                update + indicator_mu.map_or(0.0, |mu_b| rdp::skellam(mu_b, 1.0, 1.0, &[a])[0])
            };
            rdp::poisson_subsampled(q, |a| joint(a as f64), &orders)
        };
        // Headroom: cohort * Delta2 + tail * sqrt(2 mu cohort / (m - 1)) < 2^(bits-1)
        // with mu = z^2 Delta2^2 / 2, i.e. Delta2 * (cohort + tail * z * sqrt(cohort / (m - 1))).
        let half_modulus = 2f64.powi(DEFAULT_DP_BITS as i32 - 1);
        let max_norm_for = |z: f64| {
            half_modulus
                / (cohort as f64 + NOISE_TAIL_STDS * z * (cohort as f64 / (m - 1) as f64).sqrt())
        };
        // Scaled clip norm: half the headroom less sqrt(d), so the rounded
        // bound stays below half the headroom; the rounding adds about
        // sqrt(d)/2 to the norm, so insist the signal dominates it.
        let geometry = |z: f64| {
            let max_norm = max_norm_for(z);
            let scaled_clip = max_norm * 0.5 - (dim as f64).sqrt();
            (
                max_norm,
                scaled_clip,
                noise::rounded_norm_bound(scaled_clip.max(0.0), dim),
            )
        };
        let floor = 16.0 * (dim as f64).sqrt().max(1.0);
        let z = match self.noise {
            NoiseLevel::NoiseMultiplier(z) => z,
            NoiseLevel::TargetEpsilon(target) => {
                let eps = |z: f64| {
                    let (_, scaled_clip, delta2) = geometry(z);
                    if scaled_clip <= 0.0 {
                        return f64::INFINITY;
                    }
                    planned_epsilon(
                        &orders,
                        &cost(z, delta2),
                        self.planned_rounds,
                        self.delta,
                        gate,
                    )
                };
                rdp::smallest_noise(target, eps).ok_or_else(|| self.unreachable(target))?
            }
        };
        let (max_norm, scaled_clip, delta2) = geometry(z);
        if scaled_clip < floor {
            return Err(DpConfigError::NoHeadroom {
                cohort,
                bits: DEFAULT_DP_BITS,
                max_norm,
            });
        }
        let granularity = self.clip_norm / scaled_clip;
        let mu = z * z * delta2 * delta2 / 2.0;
        let rdp_per_round = cost(z, delta2);
        let planned = planned_epsilon(
            &orders,
            &rdp_per_round,
            self.planned_rounds,
            self.delta,
            gate,
        );
        Ok(DpPlan {
            config: self.clone(),
            round: DpRound::Distributed {
                clip_norm: self.clip_norm,
                granularity,
                rounded_norm: delta2,
                skellam_mu: mu / (m - 1) as f64,
                indicator_mu: indicator_mu.map(|mu_b| mu_b / (m - 1) as f64),
            },
            server_noise_std: 0.0,
            noise_multiplier: z,
            sampling_rate: q,
            denominator: Some(expected_cohort),
            min_contributors: m,
            min_cohort: min_cohort(m),
            gate_per_round: gate,
            adaptive: self.adaptive.zip(count_std),
            orders,
            rdp_per_round,
            budget: self.budget_or(planned),
        })
    }
}

impl DpPlan {
    /// Epsilon after `rounds` rounds of this plan.
    pub fn epsilon_after(&self, rounds: u64) -> f64 {
        planned_epsilon(
            &self.orders,
            &self.rdp_per_round,
            rounds,
            self.config.delta,
            self.gate_per_round,
        )
    }

    /// Logs the plan once at the start of a run.
    pub fn log(&self) {
        tracing::info!(
            mechanism = ?self.config.mechanism,
            noise_multiplier = self.noise_multiplier,
            planned_epsilon = self.epsilon_after(self.config.planned_rounds),
            budget = self.budget,
            delta = self.config.delta,
            "differential privacy on"
        );
    }

    /// A fresh ledger for this plan.
    pub fn ledger(&self) -> PrivacyLedger {
        PrivacyLedger::new(self.orders.clone(), self.config.delta, self.budget)
    }
}

/// Epsilon after `rounds` rounds costing `per_round`, each of whose
/// running hinges on one client with probability `gate`.
fn planned_epsilon(orders: &[f64], per_round: &[f64], rounds: u64, delta: f64, gate: f64) -> f64 {
    let total: Vec<f64> = per_round.iter().map(|r| r * rounds as f64).collect();
    gate::epsilon(orders, &total, delta, gate * rounds as f64)
}

#[cfg(test)]
mod tests;
