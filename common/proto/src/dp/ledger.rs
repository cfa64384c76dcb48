//! The privacy ledger: RDP spent so far, composed round by round, and the
//! budget it refuses to exceed. Serializable, so it can live in the
//! server's durable state.

use serde::{Deserialize, Serialize};

use super::{gate, rdp};

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
    /// Summed probability that one client decided whether a round ran
    /// (see [`super::gate`]); taken out of delta.
    #[serde(default)]
    pub gate: f64,
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
            gate: 0.0,
        }
    }

    /// Epsilon spent so far (0 before any round).
    pub fn epsilon(&self) -> f64 {
        if self.entries.is_empty() {
            return 0.0;
        }
        gate::epsilon(&self.orders, &self.rdp, self.delta, self.gate)
    }

    /// Epsilon after one more round costing `step` (RDP per order), whose
    /// running could hinge on one client with probability `gate`.
    pub fn epsilon_with(&self, step: &[f64], gate: f64) -> f64 {
        let total: Vec<f64> = self.rdp.iter().zip(step).map(|(a, b)| a + b).collect();
        gate::epsilon(&self.orders, &total, self.delta, self.gate + gate)
    }

    /// Charges round `round` if it fits the budget. A round is charged when
    /// its cohort is sampled, whether it then runs, is skipped for too
    /// small a cohort, or aborts: what clients sent may have leaked, and so
    /// may whether it ran (`gate`, see [`super::gate::per_round`]).
    pub fn charge(&mut self, round: u64, step: &[f64], gate: f64) -> Result<f64, BudgetExceeded> {
        assert_eq!(
            step.len(),
            self.orders.len(),
            "RDP vector on another order grid"
        );
        let would_be = self.epsilon_with(step, gate);
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
        self.gate += gate;
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

    /// The RDP orders the ledger accounts at.
    pub fn orders(&self) -> &[f64] {
        &self.orders
    }
}

/// `rdp` at `orders`, bounded at each of `target`'s orders from above: RDP
/// is non-decreasing in the order, so the value at the next order of the
/// source grid is a valid (conservative) bound; orders beyond the source
/// grid get `f64::MAX`.
pub fn project(orders: &[f64], rdp: &[f64], target: &[f64]) -> Vec<f64> {
    target
        .iter()
        .map(|&a| {
            orders
                .iter()
                .zip(rdp)
                .filter(|(o, _)| **o >= a)
                .min_by(|x, y| x.0.total_cmp(y.0))
                .map_or(f64::MAX, |(_, r)| r.min(f64::MAX))
        })
        .collect()
}

/// What one node has spent over every run of a server, whatever each run's
/// order grid and delta: RDP composed on [`rdp::integer_orders`], so
/// epsilon can be read at any delta. Kept in the server's node registry,
/// so that a new run name never starts a population afresh.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct NodeSpend {
    /// Composed RDP at each integer order (empty: nothing spent).
    pub rdp: Vec<f64>,
    /// Rounds charged.
    pub rounds: u64,
    /// Summed probability that the node decided whether a round ran (see
    /// [`super::gate`]).
    #[serde(default)]
    pub gate: f64,
}

impl NodeSpend {
    /// Adds one round costing `step` at `orders`, whose running hinged on
    /// the node with probability `gate`.
    pub fn add(&mut self, orders: &[f64], step: &[f64], gate: f64) {
        let grid = rdp::integer_orders();
        let step = project(orders, step, &grid);
        if self.rdp.len() != grid.len() {
            self.rdp = vec![0.0; grid.len()];
        }
        for (a, b) in self.rdp.iter_mut().zip(step) {
            *a = (*a + b).min(f64::MAX);
        }
        self.rounds += 1;
        self.gate += gate;
    }

    /// Epsilon at `delta` (0 before any round).
    pub fn epsilon(&self, delta: f64) -> f64 {
        if self.rounds == 0 {
            return 0.0;
        }
        gate::epsilon(&rdp::integer_orders(), &self.rdp, delta, self.gate)
    }

    /// Epsilon at `delta` after one more round costing `step` at `orders`.
    pub fn epsilon_with(&self, orders: &[f64], step: &[f64], gate: f64, delta: f64) -> f64 {
        let mut next = self.clone();
        next.add(orders, step, gate);
        next.epsilon(delta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs on different grids compose onto one, never below what either
    /// grid's own ledger says.
    #[test]
    fn spends_compose_across_grids_conservatively() {
        let (q, z, delta) = (0.1, 1.0, 1e-5);
        let fine = rdp::default_orders();
        let step = rdp::sampled_gaussian(q, z, &fine);
        let mut spend = NodeSpend::default();
        assert_eq!(spend.epsilon(delta), 0.0);
        let mut run = PrivacyLedger::new(fine.clone(), delta, f64::MAX);
        for round in 1..=20 {
            spend.add(&fine, &step, 0.0);
            run.charge(round, &step, 0.0).unwrap();
        }
        assert_eq!(spend.rounds, 20);
        let (per_node, per_run) = (spend.epsilon(delta), run.epsilon());
        assert!(per_node >= per_run, "{per_node} < {per_run}");
        assert!(per_node < per_run * 1.05, "{per_node} vs {per_run}");
        // A second run doubles the RDP: more epsilon, not a fresh start.
        for _ in 0..20 {
            spend.add(&fine, &step, 0.0);
        }
        assert!(spend.epsilon(delta) > per_node * 1.2);
        // Orders past the source grid are unbounded.
        assert_eq!(
            project(&[2.0, 3.0], &[0.5, 0.7], &[2.0, 2.5, 4.0]),
            vec![0.5, 0.7, f64::MAX]
        );
    }

    #[test]
    fn charges_until_the_budget_then_refuses() {
        let orders = rdp::default_orders();
        let step = rdp::sampled_gaussian(0.1, 1.0, &orders);
        let budget = rdp::gaussian_epsilon(0.1, 1.0, 10, 1e-5).unwrap();
        let mut ledger = PrivacyLedger::new(orders, 1e-5, budget * 1.0000001);
        assert_eq!(ledger.epsilon(), 0.0);
        let mut last = 0.0;
        for round in 1..=10 {
            let eps = ledger.charge(round, &step, 0.0).unwrap();
            assert!(eps > last);
            last = eps;
        }
        assert!((ledger.epsilon() - budget).abs() < 1e-9);
        let err = ledger.charge(11, &step, 0.0).unwrap_err();
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
