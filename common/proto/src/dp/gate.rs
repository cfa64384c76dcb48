//! Rounds skipped for too small a Poisson cohort, accounted for.
//!
//! A DP round runs only when its Poisson cohort holds at least the fewest
//! clients it can run with, `m` (distributed DP's noise is split over `m`;
//! SecAgg+ needs a few). Whether a round runs can then hinge on one
//! client: when exactly `m - 1` others are sampled, it runs if and only if
//! that client is. The accountant charges every round *attempt*, run or
//! skipped, as a Poisson-subsampled mechanism at rate `q`, which bounds
//! the run outside that event; the event itself, of probability at most
//! `q · P[Bin(n, q) = m - 1]` per attempt (n the others), goes to delta:
//! the run is `(ε, δ' + e^ε · G)`-DP, `G` the sum of those probabilities
//! and `δ'` what the RDP conversion uses. [`epsilon`] reports the smallest
//! ε at the configured δ with that share taken out.

/// The most of delta the planned rounds' gate may take (`e^ε · G`, see
/// the module docs); a configuration whose gate would take more is refused.
pub const MAX_SHARE_OF_DELTA: f64 = 0.1;

/// The epsilon a default minimum cohort is sized for when neither a target
/// nor a budget says (a larger epsilon makes the gate dearer).
pub const DEFAULT_EPSILON_FOR_MINIMUM: f64 = 10.0;

/// Whether a gate of summed probability `total`, paid at `epsilon`, fits
/// within [`MAX_SHARE_OF_DELTA`] of `delta`.
pub fn fits(total: f64, epsilon: f64, delta: f64) -> bool {
    total == 0.0 || (epsilon.is_finite() && epsilon.exp() * total <= MAX_SHARE_OF_DELTA * delta)
}

/// Probability, per round attempt, that whether the round runs hinges on
/// one client: a population of `population` clients (that one included,
/// or not: the larger is taken), sampling rate `q`, rounds that need
/// `min_cohort` clients. Zero when every cohort runs (`min_cohort` 0).
///
/// ```
/// use fedveil_proto::dp::gate;
///
/// assert_eq!(gate::per_round(100, 0.1, 0), 0.0);
/// // Everyone sampled, more than the minimum: nobody decides.
/// assert_eq!(gate::per_round(10, 1.0, 3), 0.0);
/// // Ten expected of 100, at least two: 0.1 * P[Bin(99, 0.1) = 1].
/// let p = gate::per_round(100, 0.1, 2);
/// assert!((p - 0.1 * 99.0 * 0.1 * 0.9f64.powi(98)).abs() < 1e-12, "{p}");
/// ```
pub fn per_round(population: usize, q: f64, min_cohort: usize) -> f64 {
    let Some(k) = min_cohort.checked_sub(1) else {
        return 0.0;
    };
    let others = population.saturating_sub(1);
    q * binomial_pmf(others, q, k).max(binomial_pmf(population, q, k))
}

/// `P[Bin(n, q) = k]`, in log space so large `n` neither overflows nor
/// underflows early.
fn binomial_pmf(n: usize, q: f64, k: usize) -> f64 {
    if k > n {
        return 0.0;
    }
    if q >= 1.0 {
        return if k == n { 1.0 } else { 0.0 };
    }
    if q <= 0.0 {
        return if k == 0 { 1.0 } else { 0.0 };
    }
    let ln_choose: f64 = (1..=k).map(|i| ((n - k + i) as f64 / i as f64).ln()).sum();
    (ln_choose + k as f64 * q.ln() + (n - k) as f64 * (-q).ln_1p()).exp()
}

/// Epsilon at `delta` of RDP `rdp` (at `orders`) with `gate` (the summed
/// [`per_round`] probabilities) taken out of delta: the smallest ε with
/// `ε ≥ ε_rdp(delta - e^ε · gate)`, or infinity when the gate leaves no
/// delta to convert at.
///
/// ```
/// use fedveil_proto::dp::{gate, rdp};
///
/// let orders = rdp::default_orders();
/// let step: Vec<f64> = rdp::sampled_gaussian(0.01, 1.1, &orders);
/// let total: Vec<f64> = step.iter().map(|r| r * 100.0).collect();
/// let plain = rdp::epsilon(&orders, &total, 1e-5).0;
/// assert_eq!(gate::epsilon(&orders, &total, 1e-5, 0.0), plain);
/// let gated = gate::epsilon(&orders, &total, 1e-5, 1e-8);
/// assert!(gated > plain && gated < plain * 1.05, "{plain} {gated}");
/// assert!(gate::epsilon(&orders, &total, 1e-5, 1e-5).is_infinite());
/// ```
pub fn epsilon(orders: &[f64], rdp: &[f64], delta: f64, gate: f64) -> f64 {
    let at = |d: f64| super::rdp::epsilon(orders, rdp, d).0;
    let mut eps = at(delta);
    if gate <= 0.0 {
        return eps;
    }
    // eps_{k+1} = h(eps_k), h increasing and h(eps_0) >= eps_0: the
    // sequence rises to the least fixed point, every point of which
    // satisfies the bound; stop once a candidate provably does.
    for _ in 0..200 {
        let left = delta - eps.exp() * gate;
        if left.is_nan() || left <= 0.0 {
            return f64::INFINITY;
        }
        let next = at(left);
        if next <= eps {
            return eps;
        }
        // Near the fixed point, step just past it and check.
        eps = if next - eps <= 1e-9 * next {
            next * (1.0 + 1e-9)
        } else {
            next
        };
    }
    f64::INFINITY
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pmf_matches_direct_products() {
        let direct = |n: u64, q: f64, k: u64| {
            let choose = (0..k).fold(1.0, |c, i| c * (n - i) as f64 / (i + 1) as f64);
            choose * q.powi(k as i32) * (1.0 - q).powi((n - k) as i32)
        };
        for (n, q, k) in [(99, 0.1, 4), (10, 0.5, 5), (7, 0.8, 2), (1000, 0.05, 30)] {
            let got = binomial_pmf(n as usize, q, k as usize);
            let want = direct(n, q, k);
            assert!(
                (got - want).abs() <= 1e-12 + 1e-9 * want,
                "{n} {q} {k}: {got} {want}"
            );
        }
        assert_eq!(binomial_pmf(3, 0.5, 4), 0.0);
    }

    /// The reported epsilon satisfies the bound it claims, and grows with
    /// the gate.
    #[test]
    fn gated_epsilon_is_a_valid_fixed_point() {
        let orders = crate::dp::rdp::default_orders();
        let step = crate::dp::rdp::sampled_gaussian(0.01, 1.1, &orders);
        let total: Vec<f64> = step.iter().map(|r| r * 100.0).collect();
        let delta = 1e-5;
        let mut last = 0.0;
        for gate in [0.0, 1e-11, 1e-10, 1e-9, 1e-8] {
            let eps = epsilon(&orders, &total, delta, gate);
            assert!(eps >= last, "{gate}: {eps} < {last}");
            let left = delta - eps.exp() * gate;
            assert!(left > 0.0);
            assert!(eps >= crate::dp::rdp::epsilon(&orders, &total, left).0);
            last = eps;
        }
        assert!(epsilon(&orders, &total, delta, 1e-5).is_infinite());
    }
}
