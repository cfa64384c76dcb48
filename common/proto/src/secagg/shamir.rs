//! Shamir secret sharing over the prime field of curve25519 scalars
//! (order 2^252 + ...), using `curve25519-dalek`'s constant-time `Scalar`.
//!
//! Why in-house: the whole scheme is polynomial evaluation and Lagrange
//! interpolation, ~50 lines over a field type that is audited and constant
//! time; it adds no dependency (x25519-dalek already sits on this field).
//! Secrets are field elements: SecAgg+ draws its seeds and mask keys as
//! random scalars, so nothing needs chunking. Share x-coordinates are the
//! holders' client ids (never 0).

use curve25519_dalek::scalar::Scalar;
use rand::CryptoRng;

/// One share: the polynomial evaluated at `x`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// The x-coordinate (never 0).
    pub x: u64,
    /// The polynomial's value there.
    pub y: Scalar,
}

/// Why shares could not be made or combined.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShamirError {
    /// A threshold outside 1..=n.
    #[error("threshold {t} must be in 1..={n}")]
    BadThreshold {
        /// The threshold.
        t: usize,
        /// The number of shares.
        n: usize,
    },
    /// A share at x = 0, where the secret is.
    #[error("share x-coordinate 0 is reserved for the secret")]
    ZeroX,
    /// Two shares at the same x.
    #[error("two shares have the same x-coordinate {0}")]
    DuplicateX(u64),
    /// A share that does not lie on the polynomial of the others.
    #[error("the share at x = {x} does not lie on the polynomial of the others")]
    Inconsistent {
        /// Its x-coordinate (the holder's client id).
        x: u64,
    },
    /// Fewer shares than the threshold.
    #[error("need {needed} shares, have {have}")]
    TooFewShares {
        /// The threshold.
        needed: usize,
        /// Shares given.
        have: usize,
    },
}

/// Splits `secret` into one share per holder in `xs`, any `t` of which
/// reconstruct it and fewer reveal nothing.
pub fn split<R: CryptoRng + ?Sized>(
    secret: &Scalar,
    t: usize,
    xs: &[u64],
    rng: &mut R,
) -> Result<Vec<Share>, ShamirError> {
    if t == 0 || t > xs.len() {
        return Err(ShamirError::BadThreshold { t, n: xs.len() });
    }
    check_xs(xs.iter().copied())?;
    // f(z) = secret + c1 z + ... + c_{t-1} z^{t-1}
    let mut coefficients = Vec::with_capacity(t);
    coefficients.push(*secret);
    coefficients.extend((1..t).map(|_| Scalar::random(rng)));
    Ok(xs
        .iter()
        .map(|&x| {
            let z = Scalar::from(x);
            let y = coefficients
                .iter()
                .rev()
                .fold(Scalar::ZERO, |acc, c| acc * z + c);
            Share { x, y }
        })
        .collect())
}

/// Reconstructs the secret from at least `t` shares (extra shares are
/// ignored; which ones are used does not matter for honest shares).
pub fn combine(shares: &[Share], t: usize) -> Result<Scalar, ShamirError> {
    let used = first(shares, t)?;
    check_xs(used.iter().map(|s| s.x))?;
    Ok(Lagrange::through(used).at(Scalar::ZERO))
}

/// [`combine`], also checking that every share beyond the first `t` lies
/// on the polynomial the first `t` define: with more than `t` shares, a
/// wrong one (a malicious holder's) is detected instead of silently giving
/// a wrong secret.
pub fn combine_checked(shares: &[Share], t: usize) -> Result<Scalar, ShamirError> {
    let used = first(shares, t)?;
    check_xs(shares.iter().map(|s| s.x))?;
    // In coefficient form, each extra share costs t multiplications
    // (Horner) instead of a Lagrange evaluation's t^2.
    let coefficients = Lagrange::through(used).coefficients();
    let at = |x: Scalar| {
        coefficients
            .iter()
            .rev()
            .fold(Scalar::ZERO, |y, c| y * x + c)
    };
    match shares[t..].iter().find(|e| at(Scalar::from(e.x)) != e.y) {
        Some(bad) => Err(ShamirError::Inconsistent { x: bad.x }),
        None => Ok(coefficients[0]),
    }
}

/// The first `t` shares, or why there are not enough.
fn first(shares: &[Share], t: usize) -> Result<&[Share], ShamirError> {
    if shares.len() < t || t == 0 {
        return Err(ShamirError::TooFewShares {
            needed: t.max(1),
            have: shares.len(),
        });
    }
    Ok(&shares[..t])
}

/// The polynomial through some points (distinct, nonzero x), in Lagrange
/// form, with its denominators inverted once so that evaluating it at
/// further points costs multiplications only.
struct Lagrange<'a> {
    points: &'a [Share],
    /// `1 / prod_{j != i} (x_i - x_j)` for each point i.
    inv_den: Vec<Scalar>,
}

impl<'a> Lagrange<'a> {
    fn through(points: &'a [Share]) -> Self {
        let inv_den = points
            .iter()
            .enumerate()
            .map(|(i, si)| {
                let xi = Scalar::from(si.x);
                points
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != i)
                    .fold(Scalar::ONE, |d, (_, sj)| d * (xi - Scalar::from(sj.x)))
                    .invert()
            })
            .collect();
        Self { points, inv_den }
    }

    /// The coefficients, lowest degree first: with `M(x) = prod_j (x - x_j)`,
    /// each basis polynomial is `M(x) / (x - x_i)` (synthetic division) times
    /// its inverted denominator.
    fn coefficients(&self) -> Vec<Scalar> {
        let t = self.points.len();
        let mut master = vec![Scalar::ZERO; t + 1];
        master[0] = Scalar::ONE;
        for (k, p) in self.points.iter().enumerate() {
            let xj = Scalar::from(p.x);
            for d in (1..=k + 1).rev() {
                master[d] = master[d - 1] - xj * master[d];
            }
            master[0] = -xj * master[0];
        }
        let mut out = vec![Scalar::ZERO; t];
        let mut basis = vec![Scalar::ZERO; t];
        for (si, inv) in self.points.iter().zip(&self.inv_den) {
            let xi = Scalar::from(si.x);
            basis[t - 1] = master[t];
            for d in (1..t).rev() {
                basis[d - 1] = master[d] + xi * basis[d];
            }
            let scale = si.y * inv;
            for (o, b) in out.iter_mut().zip(&basis) {
                *o += scale * b;
            }
        }
        out
    }

    /// `sum_i y_i * prod_{j != i} (x - x_j) / (x_i - x_j)`.
    fn at(&self, x: Scalar) -> Scalar {
        let mut y = Scalar::ZERO;
        for (i, (si, inv)) in self.points.iter().zip(&self.inv_den).enumerate() {
            let num = self
                .points
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .fold(Scalar::ONE, |n, (_, sj)| n * (x - Scalar::from(sj.x)));
            y += si.y * num * inv;
        }
        y
    }
}

fn check_xs(xs: impl Iterator<Item = u64>) -> Result<(), ShamirError> {
    let mut seen = std::collections::BTreeSet::new();
    for x in xs {
        if x == 0 {
            return Err(ShamirError::ZeroX);
        }
        if !seen.insert(x) {
            return Err(ShamirError::DuplicateX(x));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    proptest! {
        #[test]
        fn any_t_shares_reconstruct(seed: u64, n in 1usize..20, t_frac in 0.0f64..1.0, pick_seed: u64) {
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let t = 1 + ((n - 1) as f64 * t_frac) as usize;
            let secret = Scalar::random(&mut rng);
            let xs: Vec<u64> = (1..=n as u64).map(|i| i * 7 + 3).collect();
            let mut shares = split(&secret, t, &xs, &mut rng).unwrap();
            let mut pick = ChaCha20Rng::seed_from_u64(pick_seed);
            rand::seq::SliceRandom::shuffle(shares.as_mut_slice(), &mut pick);
            prop_assert_eq!(combine(&shares[..t], t).unwrap(), secret);
            prop_assert_eq!(combine(&shares, t).unwrap(), secret);
            prop_assert_eq!(combine_checked(&shares, t).unwrap(), secret);
        }

        /// With more shares than the threshold, any one wrong share (among
        /// the first t or the extras) is detected.
        #[test]
        fn one_wrong_share_among_more_than_t_is_detected(
            seed: u64,
            n in 2usize..20,
            t_frac in 0.0f64..1.0,
            bad_frac in 0.0f64..1.0,
        ) {
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let t = 1 + ((n - 2) as f64 * t_frac) as usize;
            let secret = Scalar::random(&mut rng);
            let xs: Vec<u64> = (1..=n as u64).collect();
            let mut shares = split(&secret, t, &xs, &mut rng).unwrap();
            let bad = ((n - 1) as f64 * bad_frac) as usize;
            shares[bad].y += Scalar::ONE;
            let got = combine_checked(&shares, t);
            prop_assert!(
                matches!(got, Err(ShamirError::Inconsistent { .. })),
                "a wrong share went unnoticed: {:?}",
                got
            );
        }
    }

    #[test]
    fn fewer_than_t_shares_do_not_reconstruct() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let secret = Scalar::random(&mut rng);
        let shares = split(&secret, 3, &[1, 2, 3, 4], &mut rng).unwrap();
        assert!(matches!(
            combine(&shares[..2], 3),
            Err(ShamirError::TooFewShares { .. })
        ));
        // Interpolating two shares as if t were 2 gives some other value.
        assert_ne!(combine(&shares[..2], 2).unwrap(), secret);
    }

    #[test]
    fn bad_parameters_are_refused() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let s = Scalar::ONE;
        assert!(split(&s, 0, &[1, 2], &mut rng).is_err());
        assert!(split(&s, 3, &[1, 2], &mut rng).is_err());
        assert_eq!(split(&s, 1, &[0, 2], &mut rng), Err(ShamirError::ZeroX));
        assert_eq!(
            split(&s, 1, &[2, 2], &mut rng),
            Err(ShamirError::DuplicateX(2))
        );
    }
}
