//! Rényi differential privacy accounting.
//!
//! - The Poisson-subsampled Gaussian mechanism, exactly as analysed by
//!   Mironov, Talwar and Zhang (2019, "Rényi Differential Privacy of the
//!   Sampled Gaussian Mechanism"): a closed sum at integer orders and the
//!   two-sided erfc series at fractional ones.
//! - The Skellam mechanism (Agarwal, Kairouz and Liu, NeurIPS 2021,
//!   Theorem 3.5), amplified by Poisson subsampling with the general upper
//!   bound of Zhu and Wang (ICML 2019, Theorem 6), at integer orders.
//! - Conversion to (epsilon, delta) with the tight bound of Canonne, Kamath
//!   and Steinke (2020, Proposition 12), minimised over the order grid.
//!
//! Neighbouring datasets differ by adding or removing one client (user-level
//! privacy). Every approximation here errs upwards: epsilon may be slightly
//! over-reported, never under-reported.

/// The order grid of Google's `dp_accounting` (1.1..10.9 by 0.1, 11..63,
/// 128, 256, 512, 1024), so results can be compared one to one.
pub fn default_orders() -> Vec<f64> {
    let mut orders: Vec<f64> = (1..100).map(|x| 1.0 + f64::from(x) / 10.0).collect();
    orders.extend((11..64).map(f64::from));
    orders.extend([128.0, 256.0, 512.0, 1024.0]);
    orders
}

/// Integer orders only (2..=64, 128, 256, 512, 1024), for mechanisms whose
/// subsampled bound is stated at integer orders.
pub fn integer_orders() -> Vec<f64> {
    let mut orders: Vec<f64> = (2..=64).map(f64::from).collect();
    orders.extend([128.0, 256.0, 512.0, 1024.0]);
    orders
}

/// Why a privacy computation cannot be done.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AccountingError {
    /// A sampling rate outside (0, 1].
    #[error("sampling rate must be in (0, 1], got {0}")]
    SamplingRate(f64),
    /// A noise multiplier that is not positive and finite.
    #[error("noise multiplier must be positive and finite, got {0}")]
    NoiseMultiplier(f64),
    /// A delta outside (0, 1).
    #[error("delta must be in (0, 1), got {0}")]
    Delta(f64),
    /// An epsilon that is not positive and finite.
    #[error("epsilon must be positive and finite, got {0}")]
    Epsilon(f64),
    /// Zero rounds.
    #[error("the number of rounds must be at least 1")]
    Rounds,
    /// No noise multiplier in the search range reaches the target.
    #[error(
        "no noise multiplier up to {max} reaches epsilon {epsilon} at delta {delta} over {rounds} rounds"
    )]
    Unreachable {
        /// The target epsilon.
        epsilon: f64,
        /// At this delta.
        delta: f64,
        /// Over this many rounds.
        rounds: u64,
        /// The largest multiplier tried.
        max: f64,
    },
}

/// Checks a sampling rate is in (0, 1].
pub fn check_sampling_rate(q: f64) -> Result<(), AccountingError> {
    if q > 0.0 && q <= 1.0 {
        Ok(())
    } else {
        Err(AccountingError::SamplingRate(q))
    }
}

/// Checks a noise multiplier is positive and finite.
pub fn check_noise_multiplier(z: f64) -> Result<(), AccountingError> {
    if z > 0.0 && z.is_finite() {
        Ok(())
    } else {
        Err(AccountingError::NoiseMultiplier(z))
    }
}

/// Checks a delta is in (0, 1).
pub fn check_delta(delta: f64) -> Result<(), AccountingError> {
    if delta > 0.0 && delta < 1.0 {
        Ok(())
    } else {
        Err(AccountingError::Delta(delta))
    }
}

/// Checks an epsilon is positive and finite.
pub fn check_epsilon(epsilon: f64) -> Result<(), AccountingError> {
    if epsilon > 0.0 && epsilon.is_finite() {
        Ok(())
    } else {
        Err(AccountingError::Epsilon(epsilon))
    }
}

/// RDP of one step of the Poisson-subsampled Gaussian mechanism with
/// sampling rate `q` and noise multiplier `z` (noise std / L2 sensitivity),
/// at each order. `f64::INFINITY` where the series does not converge.
pub fn sampled_gaussian(q: f64, z: f64, orders: &[f64]) -> Vec<f64> {
    orders
        .iter()
        .map(|&alpha| {
            if q == 0.0 {
                0.0
            } else if z == 0.0 || alpha.is_infinite() {
                f64::INFINITY
            } else if q >= 1.0 {
                alpha / (2.0 * z * z)
            } else if alpha.fract() == 0.0 {
                log_a_int(q, z, alpha as u64) / (alpha - 1.0)
            } else {
                log_a_frac(q, z, alpha) / (alpha - 1.0)
            }
        })
        .collect()
}

/// RDP of the Skellam mechanism Sk(mu) = Poisson(mu) - Poisson(mu) per
/// coordinate, for integer-valued queries with L1 and L2 sensitivities
/// `l1` and `l2` (Agarwal et al. 2021, Theorem 3.5).
pub fn skellam(mu: f64, l1: f64, l2: f64, orders: &[f64]) -> Vec<f64> {
    orders
        .iter()
        .map(|&alpha| {
            let gaussian_like = alpha * l2 * l2 / (4.0 * mu);
            let correction = (((2.0 * alpha - 1.0) * l2 * l2 + 6.0 * l1) / (16.0 * mu * mu))
                .min(3.0 * l1 / (4.0 * mu));
            gaussian_like + correction
        })
        .collect()
}

/// Amplification of any mechanism's RDP by Poisson subsampling at rate `q`
/// (Zhu and Wang 2019, Theorem 6, the general upper bound). `rdp_at` gives
/// the unsampled mechanism's RDP at an integer order >= 2; only integer
/// orders are bounded (others get infinity and drop out of the minimum).
pub fn poisson_subsampled(q: f64, rdp_at: impl Fn(u64) -> f64, orders: &[f64]) -> Vec<f64> {
    orders
        .iter()
        .map(|&alpha| {
            if alpha.fract() != 0.0 || alpha < 2.0 {
                return f64::INFINITY;
            }
            let a = alpha as u64;
            if q >= 1.0 {
                return rdp_at(a);
            }
            let (ln_q, ln_1mq) = (q.ln(), (-q).ln_1p());
            let af = alpha;
            // l = 0 and 1 together: (1-q)^(a-1) (a q - q + 1).
            let mut log_sum = (af - 1.0) * ln_1mq + (af * q - q + 1.0).ln();
            // l = 2: C(a,2) q^2 (1-q)^(a-2) e^(eps(2)).
            log_sum = log_add(
                log_sum,
                log_comb(af, 2.0) + 2.0 * ln_q + (af - 2.0) * ln_1mq + rdp_at(2),
            );
            for l in 3..=a {
                let lf = l as f64;
                let term = 3f64.ln()
                    + log_comb(af, lf)
                    + (af - lf) * ln_1mq
                    + lf * ln_q
                    + (lf - 1.0) * rdp_at(l);
                log_sum = log_add(log_sum, term);
            }
            log_sum / (af - 1.0)
        })
        .collect()
}

/// The smallest epsilon over the orders for this delta, and its order
/// (Canonne, Kamath, Steinke 2020, Proposition 12; the KL bound where it
/// already gives 0).
pub fn epsilon(orders: &[f64], rdp: &[f64], delta: f64) -> (f64, f64) {
    let mut best = (f64::INFINITY, f64::NAN);
    for (&alpha, &r) in orders.iter().zip(rdp) {
        let eps = if r.is_nan() {
            f64::INFINITY
        } else if r <= 0.0 || delta * delta + (-r).exp_m1() > 0.0 {
            0.0
        } else if alpha > 1.01 {
            r + (-1.0 / alpha).ln_1p() - (delta * alpha).ln() / (alpha - 1.0)
        } else {
            f64::INFINITY
        };
        if eps < best.0 {
            best = (eps, alpha);
        }
    }
    (best.0.max(0.0), best.1)
}

/// Epsilon after `rounds` identical steps of the Poisson-subsampled Gaussian.
pub fn gaussian_epsilon(q: f64, z: f64, rounds: u64, delta: f64) -> Result<f64, AccountingError> {
    check_sampling_rate(q)?;
    check_noise_multiplier(z)?;
    check_delta(delta)?;
    if rounds == 0 {
        return Err(AccountingError::Rounds);
    }
    let orders = default_orders();
    let rdp: Vec<f64> = sampled_gaussian(q, z, &orders)
        .into_iter()
        .map(|r| r * rounds as f64)
        .collect();
    Ok(epsilon(&orders, &rdp, delta).0)
}

/// Largest noise multiplier searched by [`gaussian_noise_multiplier`].
pub const MAX_NOISE_MULTIPLIER: f64 = 1e4;

/// The smallest noise multiplier whose epsilon after `rounds` steps at rate
/// `q` is at most `target` (bisection to 1e-6 relative, rounded upwards so the
/// guarantee holds).
pub fn gaussian_noise_multiplier(
    q: f64,
    target: f64,
    rounds: u64,
    delta: f64,
) -> Result<f64, AccountingError> {
    check_sampling_rate(q)?;
    check_epsilon(target)?;
    check_delta(delta)?;
    if rounds == 0 {
        return Err(AccountingError::Rounds);
    }
    let eps = |z: f64| gaussian_epsilon(q, z, rounds, delta).unwrap_or(f64::INFINITY);
    smallest_noise(target, eps).ok_or(AccountingError::Unreachable {
        epsilon: target,
        delta,
        rounds,
        max: MAX_NOISE_MULTIPLIER,
    })
}

/// The smallest noise multiplier z <= [`MAX_NOISE_MULTIPLIER`] with
/// `eps(z) <= target`, for `eps` decreasing in z: doubling, then bisection
/// to 1e-6 relative, returning the upper end so the target always holds.
pub fn smallest_noise(target: f64, eps: impl Fn(f64) -> f64) -> Option<f64> {
    let mut hi = 1.0;
    while eps(hi) > target {
        hi *= 2.0;
        if hi > MAX_NOISE_MULTIPLIER {
            return None;
        }
    }
    let mut lo = 0.0;
    while hi - lo > 1e-6 * hi {
        let mid = 0.5 * (lo + hi);
        if eps(mid) > target {
            lo = mid
        } else {
            hi = mid
        }
    }
    Some(hi)
}

/// log(A_alpha) at an integer order (Mironov et al. 2019, Section 3.1).
fn log_a_int(q: f64, z: f64, alpha: u64) -> f64 {
    let (ln_q, ln_1mq) = (q.ln(), (-q).ln_1p());
    let af = alpha as f64;
    (0..=alpha).fold(f64::NEG_INFINITY, |acc, i| {
        let i = i as f64;
        let term = log_comb(af, i) + i * ln_q + (af - i) * ln_1mq + (i * i - i) / (2.0 * z * z);
        log_add(acc, term)
    })
}

/// Terms of the fractional-order series before it is declared divergent
/// (the order is then left out of the minimum).
const MAX_FRACTIONAL_TERMS: usize = 1000;

/// log(A_alpha) at a fractional order (Mironov et al. 2019, Section 3.3):
/// the integral split at z0, each half a series of erfc-weighted terms.
/// Generalised binomial coefficients are taken in absolute value, which
/// can only make A larger (the conservative side).
fn log_a_frac(q: f64, z: f64, alpha: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = z * z * (1.0 / q - 1.0).ln() + 0.5;
    let (ln_q, ln_1mq) = (q.ln(), (-q).ln_1p());
    let (mut last_s0, mut last_s1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let sqrt2z = std::f64::consts::SQRT_2 * z;
    for i in 0..MAX_FRACTIONAL_TERMS {
        let i = i as f64;
        let coeff = log_comb(alpha, i);
        let j = alpha - i;
        let log_t0 = coeff + i * ln_q + j * ln_1mq;
        let log_t1 = coeff + j * ln_q + i * ln_1mq;
        let log_e0 = 0.5f64.ln() + log_erfc((i - z0) / sqrt2z);
        let log_e1 = 0.5f64.ln() + log_erfc((z0 - j) / sqrt2z);
        let log_s0 = log_t0 + (i * i - i) / (2.0 * z * z) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * z * z) + log_e1;
        log_a0 = log_add(log_a0, log_s0);
        log_a1 = log_add(log_a1, log_s1);
        let total = log_add(log_a0, log_a1);
        if log_s0 < last_s0 && log_s1 < last_s1 && log_s0.max(log_s1) < total - 30.0 {
            return total;
        }
        last_s0 = log_s0;
        last_s1 = log_s1;
    }
    f64::INFINITY
}

/// log(exp(a) + exp(b)) without overflow.
fn log_add(a: f64, b: f64) -> f64 {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        hi
    } else {
        (lo - hi).exp().ln_1p() + hi
    }
}

/// log |C(n, k)| for real n, k via log-gamma (absolute values for the
/// generalised coefficients of fractional n).
fn log_comb(n: f64, k: f64) -> f64 {
    libm::lgamma(n + 1.0) - libm::lgamma(k + 1.0) - libm::lgamma(n - k + 1.0)
}

/// log(erfc(x)), accurate where erfc underflows (asymptotic series).
fn log_erfc(x: f64) -> f64 {
    let r = libm::erfc(x);
    if r > 1e-300 {
        return r.ln();
    }
    let x2 = x * x;
    -0.5 * std::f64::consts::PI.ln() - x.ln() - x2 - 0.5 / x2 + 0.625 / (x2 * x2)
        - 37.0 / 24.0 / (x2 * x2 * x2)
        + 353.0 / 64.0 / (x2 * x2 * x2 * x2)
}

#[cfg(test)]
mod tests;
