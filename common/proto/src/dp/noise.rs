//! Noise samplers. All randomness comes from the caller's cryptographically
//! secure RNG (ChaCha20 seeded from the OS in production).
//!
//! Floating-point pitfalls (Mironov, CCS 2012): textbook samplers produce
//! floats whose low-order bits depend on the input, which can reveal it.
//! - Distributed DP works on integers end to end: the update is randomly
//!   rounded to integers and Skellam noise is the difference of two
//!   integer Poisson draws, so no float ever carries the noise.
//! - The Gaussian mechanisms sample in f64 (ziggurat) and *snap* each noisy
//!   value to a power-of-two grid about 2^20 times finer than the noise
//!   scale: the bits below the grid, where the float artefacts live, are
//!   discarded before anything leaves the device or the server.

use rand::{CryptoRng, Rng, RngExt};
use rand_distr::{Distribution, Normal, Poisson};

/// Resolution of snapped Gaussian outputs relative to the noise std.
pub const SNAP_BITS_BELOW_STD: i32 = 20;

/// Most attempts of conditional randomized rounding before giving up
/// (each succeeds with probability at least 1 - e^-0.5 ~ 0.39).
pub const MAX_ROUNDING_ATTEMPTS: usize = 200;

/// Adds N(0, std^2) to every value (computed in f64), snapped to a
/// power-of-two grid, rounded to f32.
pub fn add_gaussian<R: Rng + CryptoRng + ?Sized>(values: &mut [f32], std: f64, rng: &mut R) {
    add_gaussian_f64(values, std, rng, |v, x| *v = x as f32);
}

/// As [`add_gaussian`], for an f64 accumulator (the server's running sum).
pub fn add_gaussian_to_sum<R: Rng + CryptoRng + ?Sized>(values: &mut [f64], std: f64, rng: &mut R) {
    add_gaussian_f64(values, std, rng, |v, x| *v = x);
}

fn add_gaussian_f64<T: Copy + Into<f64>, R: Rng + CryptoRng + ?Sized>(
    values: &mut [T],
    std: f64,
    rng: &mut R,
    store: impl Fn(&mut T, f64),
) {
    if std == 0.0 {
        return;
    }
    let normal = Normal::new(0.0, std).expect("std is finite and positive (validated)");
    let grid = snap_grid(std);
    for v in values.iter_mut() {
        let noisy = (*v).into() + normal.sample(rng);
        store(v, (noisy / grid).round() * grid);
    }
}

/// The snapping grid for noise of this std: a power of two.
pub fn snap_grid(std: f64) -> f64 {
    2f64.powi(std.log2().floor() as i32 - SNAP_BITS_BELOW_STD)
}

/// Largest Skellam parameter the Poisson sampler takes.
pub const MAX_SKELLAM_MU: f64 = Poisson::<f64>::MAX_LAMBDA;

/// One draw of Sk(mu) = Poisson(mu) - Poisson(mu) per value, added in place.
pub fn add_skellam<R: Rng + CryptoRng + ?Sized>(values: &mut [i64], mu: f64, rng: &mut R) {
    if mu == 0.0 {
        return;
    }
    let poisson = Poisson::new(mu).expect("mu is finite, positive and below Poisson::MAX_LAMBDA");
    for v in values.iter_mut() {
        let a: f64 = poisson.sample(rng);
        let b: f64 = poisson.sample(rng);
        *v += a as i64 - b as i64;
    }
}

/// Randomized rounding could not meet the norm bound (practically
/// impossible for a bound from [`rounded_norm_bound`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("randomized rounding exceeded the norm bound {bound} in {attempts} attempts")]
pub struct RoundingFailed {
    /// The norm bound.
    pub bound: f64,
    /// Attempts made.
    pub attempts: usize,
}

/// Unbiased randomized rounding of each value to an adjacent integer
/// (up with probability equal to the fractional part), repeated until the
/// L2 norm of the result is at most `bound` (conditional rounding, Kairouz,
/// Liu and Steinke 2021), so `bound` is a hard sensitivity.
pub fn round_conditionally<R: Rng + CryptoRng + ?Sized>(
    values: &[f64],
    bound: f64,
    rng: &mut R,
) -> Result<Vec<i64>, RoundingFailed> {
    let mut out = vec![0i64; values.len()];
    for _ in 0..MAX_ROUNDING_ATTEMPTS {
        let mut norm_sq = 0.0;
        for (o, &x) in out.iter_mut().zip(values) {
            let floor = x.floor();
            let up = rng.random::<f64>() < x - floor;
            let r = floor + if up { 1.0 } else { 0.0 };
            norm_sq += r * r;
            *o = r as i64;
        }
        if norm_sq.sqrt() <= bound {
            return Ok(out);
        }
    }
    Err(RoundingFailed {
        bound,
        attempts: MAX_ROUNDING_ATTEMPTS,
    })
}

/// The L2 norm bound for conditional rounding of a vector of norm at most
/// `norm` in `dim` dimensions: plain randomized rounding stays below it with
/// probability at least 1 - beta, beta = e^-0.5 (Kairouz et al. 2021).
pub fn rounded_norm_bound(norm: f64, dim: usize) -> f64 {
    let d = dim as f64;
    let beta: f64 = (-0.5f64).exp();
    (norm * norm + d / 4.0 + (2.0 * (1.0 / beta).ln()).sqrt() * (norm + d.sqrt() / 2.0)).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    fn variance(v: &[f64]) -> (f64, f64) {
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        (
            mean,
            v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0),
        )
    }

    #[test]
    fn gaussian_noise_has_the_requested_variance() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let n = 200_000;
        for std in [0.01, 1.0, 30.0] {
            let mut v = vec![0.0f32; n];
            add_gaussian(&mut v, std, &mut rng);
            let (mean, var) = variance(&v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>());
            // Standard error of the variance estimate: var * sqrt(2 / n) ~ 0.3%.
            assert!(
                (var / (std * std) - 1.0).abs() < 0.02,
                "std {std}: var {var}"
            );
            assert!(
                mean.abs() < 5.0 * std / (n as f64).sqrt(),
                "std {std}: mean {mean}"
            );
            let grid = snap_grid(std);
            assert!(
                v.iter()
                    .all(|&x| (f64::from(x) / grid).fract() == 0.0 || x.abs() > 1e3)
            );
        }
    }

    #[test]
    fn noise_is_added_to_the_values_not_replacing_them() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let mut v = vec![100.0f64; 50_000];
        add_gaussian_to_sum(&mut v, 0.5, &mut rng);
        let (mean, var) = variance(&v);
        assert!((mean - 100.0).abs() < 0.02 && (var / 0.25 - 1.0).abs() < 0.05);
    }

    #[test]
    fn skellam_noise_has_variance_two_mu() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        for mu in [0.5, 20.0, 1e6] {
            let mut v = vec![0i64; 100_000];
            add_skellam(&mut v, mu, &mut rng);
            let (mean, var) = variance(&v.iter().map(|&x| x as f64).collect::<Vec<_>>());
            assert!((var / (2.0 * mu) - 1.0).abs() < 0.03, "mu {mu}: var {var}");
            assert!(
                mean.abs() < 5.0 * (2.0 * mu / 1e5).sqrt(),
                "mu {mu}: mean {mean}"
            );
        }
    }

    #[test]
    fn randomized_rounding_is_unbiased_and_respects_the_bound() {
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let x = [0.3, -1.7, 2.0, -0.5, 1e-3];
        let n = 100_000;
        let mut sums = [0f64; 5];
        for _ in 0..n {
            let r = round_conditionally(&x, 1e9, &mut rng).unwrap();
            for (s, v) in sums.iter_mut().zip(&r) {
                *s += *v as f64;
            }
        }
        for (s, x) in sums.iter().zip(x) {
            assert!((s / n as f64 - x).abs() < 0.01, "{x}: {}", s / n as f64);
        }
        // A real bound: a 10k-dim vector of norm 100.
        let d = 10_000;
        let v: Vec<f64> = (0..d)
            .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 } * 100.0 / (d as f64).sqrt() + 0.37)
            .collect();
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let bound = rounded_norm_bound(norm, d);
        for _ in 0..20 {
            let r = round_conditionally(&v, bound, &mut rng).unwrap();
            let rn = r.iter().map(|&x| (x * x) as f64).sum::<f64>().sqrt();
            assert!(rn <= bound);
        }
        assert!(matches!(
            round_conditionally(&[0.5; 100], 1.0, &mut rng),
            Err(RoundingFailed { .. })
        ));
    }
}
