//! The privacy ledger: RDP spent so far, composed round by round, and the
//! budget it refuses to exceed. Serializable, so it can live in the
//! server's durable state.

use serde::{Deserialize, Serialize};

use super::rdp;

/// One charged round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// The round.
    pub round: u64,
    /// Epsilon spent after this round (cumulative).
    pub epsilon: f64,
}

/// A round the ledger refuses: it would take epsilon past the budget.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "round {round} would raise epsilon from {spent:.4} to {would_be:.4}, over the budget {budget} (delta {delta:e}); stopping"
)]
pub struct BudgetExceeded {
    /// The round refused.
    pub round: u64,
    /// Epsilon spent before it.
    pub spent: f64,
    /// Epsilon after it.
    pub would_be: f64,
    /// The budget.
    pub budget: f64,
    /// The delta epsilon is given at.
    pub delta: f64,
}

/// The privacy a run has spent: the RDP of every charged round, composed, and the epsilon after each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrivacyLedger {
    orders: Vec<f64>,
    /// Composed RDP at each order.
    rdp: Vec<f64>,
    /// The delta epsilon is reported at.
    pub delta: f64,
    /// The largest epsilon the run may spend.
    pub budget: f64,
    /// Every charged round, in order.
    pub entries: Vec<LedgerEntry>,
}

impl PrivacyLedger {
    /// An empty ledger accounting at RDP `orders`.
    pub fn new(orders: Vec<f64>, delta: f64, budget: f64) -> Self {
        let rdp = vec![0.0; orders.len()];
        Self {
            orders,
            rdp,
            delta,
            budget,
            entries: Vec::new(),
        }
    }

    /// Epsilon spent so far (0 before any round).
    pub fn epsilon(&self) -> f64 {
        if self.entries.is_empty() {
            return 0.0;
        }
        rdp::epsilon(&self.orders, &self.rdp, self.delta).0
    }

    /// Epsilon after one more round costing `step` (RDP per order).
    pub fn epsilon_with(&self, step: &[f64]) -> f64 {
        let total: Vec<f64> = self.rdp.iter().zip(step).map(|(a, b)| a + b).collect();
        rdp::epsilon(&self.orders, &total, self.delta).0
    }

    /// Charges round `round` if it fits the budget. A round is charged when
    /// its cohort is sampled, whether or not it completes: an aborted round
    /// may still have leaked through what clients sent.
    pub fn charge(&mut self, round: u64, step: &[f64]) -> Result<f64, BudgetExceeded> {
        assert_eq!(
            step.len(),
            self.orders.len(),
            "RDP vector on another order grid"
        );
        let would_be = self.epsilon_with(step);
        if would_be > self.budget {
            return Err(BudgetExceeded {
                round,
                spent: self.epsilon(),
                would_be,
                budget: self.budget,
                delta: self.delta,
            });
        }
        // Orders where a bound diverged stay at f64::MAX (huge, out of the
        // minimum) rather than infinity, which JSON cannot hold.
        for (a, b) in self.rdp.iter_mut().zip(step) {
            *a = (*a + b).min(f64::MAX);
        }
        self.entries.push(LedgerEntry {
            round,
            epsilon: would_be,
        });
        Ok(would_be)
    }

    /// Whether `other` was kept on the same order grid and delta, so it can
    /// continue this one.
    pub fn compatible_with(&self, other: &Self) -> bool {
        self.orders == other.orders && self.delta == other.delta
    }

    /// Rounds charged so far.
    pub fn rounds_charged(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_until_the_budget_then_refuses() {
        let orders = rdp::default_orders();
        let step = rdp::sampled_gaussian(0.1, 1.0, &orders);
        let budget = rdp::gaussian_epsilon(0.1, 1.0, 10, 1e-5).unwrap();
        let mut ledger = PrivacyLedger::new(orders, 1e-5, budget * 1.0000001);
        assert_eq!(ledger.epsilon(), 0.0);
        let mut last = 0.0;
        for round in 1..=10 {
            let eps = ledger.charge(round, &step).unwrap();
            assert!(eps > last);
            last = eps;
        }
        assert!((ledger.epsilon() - budget).abs() < 1e-9);
        let err = ledger.charge(11, &step).unwrap_err();
        assert_eq!(err.round, 11);
        assert!(err.would_be > budget);
        // A refused round changes nothing.
        assert_eq!(ledger.rounds_charged(), 10);
        assert!((ledger.epsilon() - budget).abs() < 1e-9);
        // The ledger survives a serde round trip unchanged.
        let json = serde_json::to_string(&ledger).unwrap();
        let back: PrivacyLedger = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ledger);
    }
}
