//! A node's own privacy policy, and its own privacy ledger.
//!
//! A hospital must be able to say "never send my update unless ...", and
//! not take the server's word for what a round does. The policy is fixed
//! when the node starts; every round is checked against it before the node
//! trains, again when the secure-aggregation setup arrives, and once more
//! when the update is about to leave. The ledger accounts only for noise
//! the node can rely on without trusting the server:
//!
//! - **local DP**: the node's own Gaussian noise, `z = noise_std / (2 *
//!   clip_norm)` (one released vector: any two clipped updates differ by at
//!   most twice the clip norm, the server's plan's sensitivity too);
//! - **distributed DP**: the Skellam shares of the other `m - 1` clients the
//!   round may be unmasked with at the least (`m = max(t + 1,
//!   min_survivors)`, which the node checks against the signed survivor
//!   set), as the server's plan assumes;
//! - **central DP** or none: nothing; the server adds the noise, if any.
//!
//! It never assumes amplification by sampling: the node knows when it was
//! picked, and a deviating server picks as it likes. So the node's epsilon
//! is at least the server's for the same rounds.

use serde::{Deserialize, Serialize};

use crate::dp::{DpRound, Mechanism, PrivacyLedger, rdp};
use crate::wire::{RoundConfig, SecAggParams};

/// The delta a node's ledger reports epsilon at, unless its policy says.
pub const DEFAULT_POLICY_DELTA: f64 = 1e-5;

/// What a round must promise before this node sends anything. The
/// default requires nothing (and the ledger still counts what is spent).
///
/// ```
/// use fedveil_proto::round::policy::NodePolicy;
/// let policy: NodePolicy = serde_json::from_str(
///     r#"{"require_secure_aggregation": true, "require_dp": "distributed", "max_epsilon": 8.0}"#,
/// )
/// .unwrap();
/// assert!(policy.validate().is_ok());
/// assert_eq!(policy.max_epsilon, Some(8.0));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodePolicy {
    /// Send updates only through secure aggregation.
    pub require_secure_aggregation: bool,
    /// Send updates only under this mechanism (`local` or `distributed`:
    /// noise the node adds itself).
    pub require_dp: Option<Mechanism>,
    /// The least noise multiplier a round may give this node, as its own
    /// accounting sees it (see the [module docs](self)).
    pub min_noise_multiplier: Option<f64>,
    /// The most epsilon this node spends, over all runs and servers.
    pub max_epsilon: Option<f64>,
    /// The delta the ledger reports epsilon at.
    pub delta: f64,
    /// The fewest clients whose inputs may be unmasked together with this
    /// node's (secure aggregation's `max(t + 1, min_survivors)`).
    pub min_cohort: Option<u32>,
    /// The least Shamir threshold accepted.
    pub min_threshold: Option<u32>,
}

impl Default for NodePolicy {
    fn default() -> Self {
        Self {
            require_secure_aggregation: false,
            require_dp: None,
            min_noise_multiplier: None,
            max_epsilon: None,
            delta: DEFAULT_POLICY_DELTA,
            min_cohort: None,
            min_threshold: None,
        }
    }
}

/// A policy that cannot be enforced as written.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// Central DP cannot be required: the server adds its noise, and a
    /// node cannot check that it did.
    #[error(
        "require_dp = \"central\" cannot be enforced by a node (the server adds that noise); require \"local\" or \"distributed\""
    )]
    CentralRequired,
    /// A number out of its range.
    #[error("{name} = {value} is not a finite number {range}")]
    OutOfRange {
        /// The setting.
        name: &'static str,
        /// Its value.
        value: f64,
        /// What it must be.
        range: &'static str,
    },
}

/// A round that would weaken the node's policy; the message names the rule.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyViolation {
    /// The round sends updates in the clear.
    #[error(
        "the node's policy requires secure aggregation (require_secure_aggregation); this round sends updates in the clear"
    )]
    SecureAggregationRequired,
    /// The round has no DP, or another mechanism.
    #[error("the node's policy requires {required} DP (require_dp); this round has {got}")]
    MechanismRequired {
        /// The mechanism required.
        required: Mechanism,
        /// What the round has ("no DP" or a mechanism).
        got: String,
    },
    /// Less noise than the policy's floor.
    #[error(
        "the node's policy requires a noise multiplier of at least {required} (min_noise_multiplier); this round gives the node {got:.4}"
    )]
    NoiseBelowFloor {
        /// The floor.
        required: f64,
        /// What the round gives, as the node accounts it.
        got: f64,
    },
    /// A budget is set, and the round has no noise the node can count.
    #[error(
        "the node's policy caps epsilon at {budget} (max_epsilon); this round has {got}, which the node cannot account for"
    )]
    Unaccountable {
        /// The cap.
        budget: f64,
        /// What the round has.
        got: String,
    },
    /// The round would take the node past its budget.
    #[error(
        "the node's policy caps epsilon at {budget} (max_epsilon, delta {delta:e}); this round would take it from {spent:.4} to {would_be:.4}"
    )]
    BudgetExhausted {
        /// Spent before it.
        spent: f64,
        /// After it.
        would_be: f64,
        /// The cap.
        budget: f64,
        /// The ledger's delta.
        delta: f64,
    },
    /// Fewer inputs may be unmasked together than the policy allows.
    #[error(
        "the node's policy requires at least {required} clients unmasked together (min_cohort); this round allows {got}"
    )]
    CohortBelowMinimum {
        /// The policy's minimum.
        required: u32,
        /// The round's `max(t + 1, min_survivors)`.
        got: usize,
    },
    /// A lower Shamir threshold than the policy allows.
    #[error(
        "the node's policy requires a secure-aggregation threshold of at least {required} (min_threshold); this round has {got}"
    )]
    ThresholdBelowMinimum {
        /// The policy's minimum.
        required: u32,
        /// The round's.
        got: u32,
    },
}

/// What one round costs this node, as it accounts it.
#[derive(Debug, Clone, PartialEq)]
pub enum RoundCost {
    /// Noise the node can count: its noise multiplier and RDP per order
    /// of [`rdp::integer_orders`].
    Noised {
        /// The Gaussian-equivalent noise multiplier.
        noise_multiplier: f64,
        /// RDP at each order.
        rdp: Vec<f64>,
    },
    /// No noise the node can count (no DP, central DP, or zero noise).
    Unprotected,
}

/// What a round's DP step costs the node; `secagg` is the round's SecAgg+
/// parameters (distributed DP needs them), `model_len` the values of the
/// update. `None` while distributed DP waits for its setup.
pub fn round_cost(
    dp: Option<&DpRound>,
    secagg: Option<&SecAggParams>,
    model_len: usize,
) -> Option<RoundCost> {
    let orders = rdp::integer_orders();
    let noised = |noise_multiplier: f64, rdp: Vec<f64>| {
        if noise_multiplier > 0.0 && rdp.iter().any(|r| r.is_finite()) {
            RoundCost::Noised {
                noise_multiplier,
                rdp,
            }
        } else {
            RoundCost::Unprotected
        }
    };
    match dp {
        None | Some(DpRound::Central { .. }) => Some(RoundCost::Unprotected),
        Some(&DpRound::Local {
            clip_norm,
            noise_std,
        }) => {
            let z = noise_std / (2.0 * clip_norm);
            Some(noised(z, rdp::sampled_gaussian(1.0, z, &orders)))
        }
        Some(&DpRound::Distributed {
            rounded_norm,
            skellam_mu,
            indicator_mu,
            ..
        }) => {
            let others = secagg?.fewest_inputs().saturating_sub(1) as f64;
            let mu = others * skellam_mu;
            let delta2 = rounded_norm;
            let l1 = (delta2 * delta2).min((model_len as f64).sqrt() * delta2);
            let mut cost = rdp::skellam(mu, l1, delta2, &orders);
            if let Some(mu_b) = indicator_mu {
                let b = rdp::skellam(others * mu_b, 1.0, 1.0, &orders);
                cost.iter_mut().zip(b).for_each(|(c, b)| *c += b);
            }
            Some(noised((2.0 * mu).sqrt() / delta2, cost))
        }
    }
}

fn describe(dp: Option<&DpRound>) -> String {
    match dp {
        None => "no DP".into(),
        Some(DpRound::Central { .. }) => "central DP".into(),
        Some(DpRound::Local { .. }) => "local DP".into(),
        Some(DpRound::Distributed { .. }) => "distributed DP".into(),
    }
}

fn mechanism(dp: &DpRound) -> Mechanism {
    match dp {
        DpRound::Central { .. } => Mechanism::Central,
        DpRound::Local { .. } => Mechanism::Local,
        DpRound::Distributed { .. } => Mechanism::Distributed,
    }
}

impl NodePolicy {
    /// Checks the policy itself.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.require_dp == Some(Mechanism::Central) {
            return Err(PolicyError::CentralRequired);
        }
        let positive = |name, v: Option<f64>| match v {
            Some(value) if !(value.is_finite() && value > 0.0) => Err(PolicyError::OutOfRange {
                name,
                value,
                range: "above 0",
            }),
            _ => Ok(()),
        };
        positive("min_noise_multiplier", self.min_noise_multiplier)?;
        positive("max_epsilon", self.max_epsilon)?;
        rdp::check_delta(self.delta).map_err(|_| PolicyError::OutOfRange {
            name: "delta",
            value: self.delta,
            range: "in (0, 1)",
        })?;
        Ok(())
    }

    /// Checks what the round start says.
    pub fn check_start(&self, config: &RoundConfig) -> Result<(), PolicyViolation> {
        if self.require_secure_aggregation && !config.secure_aggregation {
            return Err(PolicyViolation::SecureAggregationRequired);
        }
        if let Some(required) = self.require_dp
            && config.dp.as_ref().map(mechanism) != Some(required)
        {
            return Err(PolicyViolation::MechanismRequired {
                required,
                got: describe(config.dp.as_ref()),
            });
        }
        Ok(())
    }

    /// Checks the round's SecAgg+ parameters.
    pub fn check_secagg(&self, params: &SecAggParams) -> Result<(), PolicyViolation> {
        if let Some(required) = self.min_threshold
            && params.threshold < required
        {
            return Err(PolicyViolation::ThresholdBelowMinimum {
                required,
                got: params.threshold,
            });
        }
        if let Some(required) = self.min_cohort
            && params.fewest_inputs() < required as usize
        {
            return Err(PolicyViolation::CohortBelowMinimum {
                required,
                got: params.fewest_inputs(),
            });
        }
        Ok(())
    }

    /// Checks a round's cost against the noise floor and the budget left
    /// in `ledger`.
    pub fn check_cost(
        &self,
        cost: &RoundCost,
        dp: Option<&DpRound>,
        ledger: &NodeLedger,
    ) -> Result<(), PolicyViolation> {
        match cost {
            RoundCost::Unprotected => {
                if let Some(required) = self.min_noise_multiplier {
                    return Err(PolicyViolation::NoiseBelowFloor { required, got: 0.0 });
                }
                if let Some(budget) = self.max_epsilon {
                    return Err(PolicyViolation::Unaccountable {
                        budget,
                        got: describe(dp),
                    });
                }
                Ok(())
            }
            RoundCost::Noised {
                noise_multiplier,
                rdp,
            } => {
                if let Some(required) = self.min_noise_multiplier
                    && *noise_multiplier < required
                {
                    return Err(PolicyViolation::NoiseBelowFloor {
                        required,
                        got: *noise_multiplier,
                    });
                }
                if let Some(budget) = self.max_epsilon {
                    let would_be = ledger.privacy.epsilon_with(rdp, 0.0);
                    // NaN (a diverged bound) counts as over the budget.
                    if would_be.is_nan() || would_be > budget {
                        return Err(PolicyViolation::BudgetExhausted {
                            spent: ledger.privacy.epsilon(),
                            would_be,
                            budget,
                            delta: ledger.privacy.delta,
                        });
                    }
                }
                Ok(())
            }
        }
    }
}

/// The node's own record of what it has spent, over all runs and servers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeLedger {
    /// Rounds with noise the node can count, composed (RDP accountant).
    pub privacy: PrivacyLedger,
    /// Updates that left the node without noise it could count (no DP or
    /// central DP): their privacy rests on the server alone.
    pub unprotected_rounds: u64,
}

/// A node ledger kept at another delta than the policy's.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "the node's ledger reports epsilon at delta {kept:e}, the policy at {policy:e}: keep the delta, or start a new ledger (losing its record)"
)]
pub struct LedgerMismatch {
    /// The ledger's delta.
    pub kept: f64,
    /// The policy's.
    pub policy: f64,
}

impl NodeLedger {
    /// An empty ledger at `delta`.
    pub fn new(delta: f64) -> Self {
        Self {
            privacy: PrivacyLedger::new(rdp::integer_orders(), delta, f64::MAX),
            unprotected_rounds: 0,
        }
    }

    /// Checks that a loaded ledger accounts as `policy` does.
    pub fn check_against(&self, policy: &NodePolicy) -> Result<(), LedgerMismatch> {
        if self
            .privacy
            .compatible_with(&Self::new(policy.delta).privacy)
        {
            Ok(())
        } else {
            Err(LedgerMismatch {
                kept: self.privacy.delta,
                policy: policy.delta,
            })
        }
    }

    /// Checks `cost` against `policy` and this ledger, then records it;
    /// returns epsilon spent after it.
    pub fn charge(
        &mut self,
        round: u64,
        cost: &RoundCost,
        policy: &NodePolicy,
    ) -> Result<f64, PolicyViolation> {
        policy.check_cost(cost, None, self)?;
        Ok(self.record(round, cost))
    }

    /// Records that the update of `round` is leaving at `cost`, whatever a
    /// policy says; returns epsilon spent after it.
    pub fn record(&mut self, round: u64, cost: &RoundCost) -> f64 {
        match cost {
            RoundCost::Unprotected => self.unprotected_rounds += 1,
            RoundCost::Noised { rdp, .. } => {
                // The policy was checked before: the ledger's own budget
                // (f64::MAX) never refuses.
                let _ = self.privacy.charge(round, rdp, 0.0);
            }
        }
        self.privacy.epsilon()
    }

    /// Epsilon spent so far.
    pub fn epsilon(&self) -> f64 {
        self.privacy.epsilon()
    }
}

/// Why a round could not be charged.
#[derive(Debug, thiserror::Error)]
pub enum ChargeError {
    /// The charge would break the policy (the stored ledger may hold
    /// charges of the node's other sessions since this one last looked).
    #[error(transparent)]
    Policy(#[from] PolicyViolation),
    /// The ledger could not be kept.
    #[error("{0}")]
    Store(Box<dyn std::error::Error + Send + Sync>),
}

/// Where a node's ledger is kept. A charge must be durable before the
/// update leaves, and must build on the latest stored ledger, which other
/// sessions of the same node (other runs, other servers) may share: the
/// file store in `fedveil-client` locks, re-reads, charges, writes and
/// syncs.
pub trait LedgerStore: Send + std::fmt::Debug {
    /// Charges `cost` for `round` under `policy` to the stored ledger (see
    /// [`NodeLedger::charge`]); returns the ledger as stored after it.
    fn charge(
        &mut self,
        round: u64,
        cost: &RoundCost,
        policy: &NodePolicy,
    ) -> Result<NodeLedger, ChargeError>;
}

/// A ledger kept in memory only (tests, nodes without a directory).
#[derive(Debug)]
pub struct MemoryLedger(pub NodeLedger);

impl LedgerStore for MemoryLedger {
    fn charge(
        &mut self,
        round: u64,
        cost: &RoundCost,
        policy: &NodePolicy,
    ) -> Result<NodeLedger, ChargeError> {
        self.0.charge(round, cost, policy)?;
        Ok(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dp::{DpConfig, NoiseLevel};

    fn params(threshold: u32, min_survivors: u32) -> SecAggParams {
        SecAggParams {
            threshold,
            degree: 10,
            bits: 32,
            clip: 1.0,
            max_weight: 1,
            max_cohort: 100,
            min_survivors,
        }
    }

    /// The node's view of distributed DP matches the server's plan: the
    /// other m - 1 clients' Skellam shares carry the planned noise
    /// multiplier; and with no sampling to amplify, the node's epsilon is
    /// never below the server's.
    #[test]
    fn distributed_noise_as_the_node_counts_it_is_the_planned_noise() {
        let dim = 1000;
        let (m, q) = (10, 0.1);
        let plan = DpConfig {
            mechanism: Mechanism::Distributed,
            clip_norm: 1.0,
            noise: NoiseLevel::NoiseMultiplier(1.2),
            delta: 1e-5,
            planned_rounds: 10,
            budget: None,
            min_contributors: Some(m),
            adaptive: None,
        }
        .plan(q, 1000, dim, 200, true)
        .unwrap();
        let Some(RoundCost::Noised {
            noise_multiplier,
            rdp,
        }) = round_cost(Some(&plan.round), Some(&params(6, m as u32)), dim)
        else {
            panic!("distributed DP is noise the node can count")
        };
        assert!((noise_multiplier - 1.2).abs() < 1e-9, "{noise_multiplier}");
        let node = NodeLedger::new(1e-5);
        let mut server = crate::dp::PrivacyLedger::new(plan.orders.clone(), 1e-5, f64::MAX);
        server.charge(1, &plan.rdp_per_round, 0.0).unwrap();
        assert!(node.privacy.epsilon_with(&rdp, 0.0) > server.epsilon());
        // Before the setup the cost is not known; fewer guaranteed
        // contributors mean less noise.
        assert_eq!(round_cost(Some(&plan.round), None, dim), None);
        let Some(RoundCost::Noised {
            noise_multiplier: fewer,
            ..
        }) = round_cost(Some(&plan.round), Some(&params(2, 0)), dim)
        else {
            panic!()
        };
        assert!(fewer < noise_multiplier);
    }

    /// Local DP as the node counts it is the server's plan at q = 1, and
    /// never less than the plan's at any sampling rate.
    #[test]
    fn local_noise_as_the_node_counts_it_is_the_planned_noise() {
        for q in [1.0, 0.1] {
            let plan = DpConfig {
                mechanism: Mechanism::Local,
                clip_norm: 0.5,
                noise: NoiseLevel::NoiseMultiplier(1.5),
                delta: 1e-5,
                planned_rounds: 10,
                budget: None,
                min_contributors: None,
                adaptive: None,
            }
            .plan(q, 100, 10, 100, false)
            .unwrap();
            let Some(RoundCost::Noised {
                noise_multiplier,
                rdp,
            }) = round_cost(Some(&plan.round), None, 10)
            else {
                panic!("local DP is noise the node adds")
            };
            assert!((noise_multiplier - 1.5).abs() < 1e-12);
            let mut server = crate::dp::PrivacyLedger::new(plan.orders.clone(), 1e-5, f64::MAX);
            server.charge(1, &plan.rdp_per_round, 0.0).unwrap();
            let node = NodeLedger::new(1e-5).privacy.epsilon_with(&rdp, 0.0);
            // The node's coarser order grid may only add.
            assert!(
                node >= server.epsilon() * 0.999,
                "{node} vs {}",
                server.epsilon()
            );
            assert!(
                node < server.epsilon() * 1.05,
                "{node} vs {}",
                server.epsilon()
            );
        }
    }

    #[test]
    fn only_noise_the_node_adds_counts() {
        let central = DpRound::Central {
            clip_norm: 1.0,
            clip_indicator: false,
        };
        assert_eq!(
            round_cost(Some(&central), None, 10),
            Some(RoundCost::Unprotected)
        );
        assert_eq!(round_cost(None, None, 10), Some(RoundCost::Unprotected));
        let silent = DpRound::Local {
            clip_norm: 1.0,
            noise_std: 0.0,
        };
        assert_eq!(
            round_cost(Some(&silent), None, 10),
            Some(RoundCost::Unprotected)
        );
    }

    #[test]
    fn a_policy_a_node_cannot_enforce_is_refused() {
        let central = NodePolicy {
            require_dp: Some(Mechanism::Central),
            ..NodePolicy::default()
        };
        assert_eq!(central.validate(), Err(PolicyError::CentralRequired));
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let p = NodePolicy {
                max_epsilon: Some(bad),
                ..NodePolicy::default()
            };
            assert!(p.validate().is_err(), "{bad}");
        }
        let p = NodePolicy {
            delta: 1.0,
            ..NodePolicy::default()
        };
        assert!(p.validate().is_err());
    }
}
