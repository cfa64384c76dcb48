//! Streaming weighted averaging: each update is folded into a running sum as
//! it arrives, so the server holds O(model size) memory however many clients
//! report. The sums are exact fixed-point integers, so the result does not
//! depend on the order in which updates arrive: the same updates give the
//! same mean to the last bit, which is what makes a seeded run reproducible
//! (floating-point sums in arrival order would not be).

/// Why an update could not be added.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AggregateError {
    /// The update has the wrong length.
    #[error("update has {got} values, the model has {expected}")]
    WrongLength {
        /// Its length.
        got: usize,
        /// The model's.
        expected: usize,
    },
    /// The update has a NaN or an infinity.
    #[error("update contains a non-finite value at index {index}")]
    NonFinite {
        /// Where.
        index: usize,
    },
    /// A weighted value beyond any real model update.
    #[error(
        "update value at index {index} times its weight exceeds {MAX_WEIGHTED_MAGNITUDE:e}, beyond any model update"
    )]
    OutOfRange {
        /// Where.
        index: usize,
    },
    /// A weight that is not positive and finite.
    #[error("weight {0} is not a positive finite number")]
    BadWeight(f64),
}

/// The largest |weight × value| one term may have. With terms below 2^62,
/// an `i128` sum with 64 fractional bits cannot overflow before 2^65 terms.
pub const MAX_WEIGHTED_MAGNITUDE: f64 = (1u64 << 62) as f64;

/// Fractional bits of [`ExactSum`]: resolution 2^-64 (about 5e-20).
pub const FRAC_BITS: i32 = 64;

/// An order-independent sum of `f64` terms: each term is rounded once to a
/// fixed-point integer with [`FRAC_BITS`] fractional bits, and integers add
/// associatively. Terms must be finite and below [`MAX_WEIGHTED_MAGNITUDE`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExactSum(i128);

impl ExactSum {
    /// Adds `x`, or returns `false` (changing nothing) if it is out of range.
    pub fn add(&mut self, x: f64) -> bool {
        match to_fixed(x) {
            Some(v) => {
                self.0 += v;
                true
            }
            None => false,
        }
    }

    /// The sum, correctly rounded.
    pub fn value(&self) -> f64 {
        self.0 as f64 / 2f64.powi(FRAC_BITS)
    }
}

/// `x` as a fixed-point integer (round half away from zero), from its bits
/// so that it costs a few integer operations; `None` when not finite or
/// too large.
fn to_fixed(x: f64) -> Option<i128> {
    if !x.is_finite() || x.abs() >= MAX_WEIGHTED_MAGNITUDE {
        return None;
    }
    let bits = x.to_bits();
    let biased = ((bits >> 52) & 0x7ff) as i32;
    let fraction = bits & ((1u64 << 52) - 1);
    // x = mantissa × 2^exponent
    let (mantissa, exponent) = if biased == 0 {
        (fraction, -1074)
    } else {
        (fraction | (1u64 << 52), biased - 1075)
    };
    let shift = exponent + FRAC_BITS;
    let magnitude = if shift >= 0 {
        // |x| < 2^62 keeps this below 2^126.
        i128::from(mantissa) << shift
    } else if shift > -54 {
        let s = -shift;
        i128::from((mantissa >> (s - 1)).div_ceil(2))
    } else {
        0
    };
    Some(if bits >> 63 == 1 {
        -magnitude
    } else {
        magnitude
    })
}

/// Running `sum(w_i * x_i)` and `sum(w_i)`, exactly (see [`ExactSum`]).
#[derive(Debug, Clone)]
pub struct WeightedMean {
    sum: Vec<ExactSum>,
    total_weight: ExactSum,
    count: usize,
}

impl WeightedMean {
    /// An empty mean of `len` values.
    pub fn new(len: usize) -> Self {
        Self {
            sum: vec![ExactSum::default(); len],
            total_weight: ExactSum::default(),
            count: 0,
        }
    }

    /// Checks an update without adding it (length, finiteness).
    pub fn validate(&self, values: &[f32]) -> Result<(), AggregateError> {
        if values.len() != self.sum.len() {
            return Err(AggregateError::WrongLength {
                got: values.len(),
                expected: self.sum.len(),
            });
        }
        if let Some(index) = values.iter().position(|v| !v.is_finite()) {
            return Err(AggregateError::NonFinite { index });
        }
        Ok(())
    }

    /// Adds `weight * values`. Nothing changes if the update is refused.
    pub fn add(&mut self, values: &[f32], weight: f64) -> Result<(), AggregateError> {
        if !(weight > 0.0 && weight < MAX_WEIGHTED_MAGNITUDE) {
            return Err(AggregateError::BadWeight(weight));
        }
        self.validate(values)?;
        // The product of an f32 and a weight below 2^29 is exact in f64.
        let term = |v: f32| weight * f64::from(v);
        if let Some(index) = values
            .iter()
            .position(|&v| term(v).abs() >= MAX_WEIGHTED_MAGNITUDE)
        {
            return Err(AggregateError::OutOfRange { index });
        }
        for (s, &v) in self.sum.iter_mut().zip(values) {
            s.0 += to_fixed(term(v)).expect("finite and in range, checked above");
        }
        self.total_weight.add(weight);
        self.count += 1;
        Ok(())
    }

    /// Updates added.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Sum of their weights.
    pub fn total_weight(&self) -> f64 {
        self.total_weight.value()
    }

    /// The weighted mean, or `None` if nothing was added.
    pub fn mean(&self) -> Option<Vec<f32>> {
        let total = self.total_weight();
        (self.count > 0).then(|| {
            self.sum
                .iter()
                .map(|s| (s.value() / total) as f32)
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_mean_matches_definition() {
        let mut m = WeightedMean::new(3);
        m.add(&[1.0, 2.0, 3.0], 1.0).unwrap();
        m.add(&[3.0, 2.0, -1.0], 3.0).unwrap();
        assert_eq!(m.mean().unwrap(), vec![2.5, 2.0, 0.0]);
        assert_eq!(m.count(), 2);
        assert_eq!(m.total_weight(), 4.0);
    }

    #[test]
    fn refuses_bad_updates_without_changing_state() {
        let mut m = WeightedMean::new(2);
        m.add(&[1.0, 1.0], 2.0).unwrap();
        assert_eq!(
            m.add(&[1.0], 1.0),
            Err(AggregateError::WrongLength {
                got: 1,
                expected: 2
            })
        );
        assert_eq!(
            m.add(&[1.0, f32::NAN], 1.0),
            Err(AggregateError::NonFinite { index: 1 })
        );
        assert_eq!(
            m.add(&[f32::INFINITY, 0.0], 1.0),
            Err(AggregateError::NonFinite { index: 0 })
        );
        assert!(m.add(&[1.0, 1.0], 0.0).is_err());
        assert!(m.add(&[1.0, 1.0], f64::NAN).is_err());
        assert_eq!(m.mean().unwrap(), vec![1.0, 1.0]);
        assert_eq!(m.count(), 1);
    }

    #[test]
    fn the_mean_does_not_depend_on_the_order_of_arrival() {
        use rand::seq::SliceRandom;
        use rand::{RngExt, SeedableRng};
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
        let dim = 2000;
        let updates: Vec<(Vec<f32>, f64)> = (0..40)
            .map(|_| {
                let scale = 10f32.powi(rng.random_range(-6..3));
                let v = (0..dim)
                    .map(|_| rng.random_range(-1.0..1.0) * scale)
                    .collect();
                (v, f64::from(rng.random_range(1u32..5000)))
            })
            .collect();
        let mean_in = |order: &[usize]| {
            let mut m = WeightedMean::new(dim);
            for &i in order {
                m.add(&updates[i].0, updates[i].1).unwrap();
            }
            m.mean().unwrap()
        };
        let naive_in = |order: &[usize]| {
            let mut sum = vec![0f64; dim];
            let mut total = 0f64;
            for &i in order {
                for (s, &v) in sum.iter_mut().zip(&updates[i].0) {
                    *s += updates[i].1 * f64::from(v);
                }
                total += updates[i].1;
            }
            sum.iter().map(|s| s / total).collect::<Vec<f64>>()
        };
        let forward: Vec<usize> = (0..updates.len()).collect();
        let expected = mean_in(&forward);
        let mut order = forward.clone();
        let mut naive_differed = false;
        for _ in 0..5 {
            order.shuffle(&mut rng);
            let got = mean_in(&order);
            assert!(
                got.iter()
                    .zip(&expected)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "the mean changed with the order of arrival"
            );
            naive_differed |= naive_in(&order) != naive_in(&forward);
        }
        // Float sums of this data depend on the order (the final rounding
        // to f32 hides that almost always, but not always); the exact mean
        // agrees with the float one to f32 precision.
        assert!(
            naive_differed,
            "pick data on which float sums depend on order"
        );
        for (a, b) in expected.iter().zip(naive_in(&forward)) {
            let b = b as f32;
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-12), "{a} vs {b}");
        }
    }

    #[test]
    fn exact_sums_round_each_term_once() {
        let mut s = ExactSum::default();
        for x in [0.1, 0.2, 0.3, -0.6, 1e-30, -1e-30, 3.0e15] {
            assert!(s.add(x));
        }
        assert_eq!(s.value(), 3.0e15);
        assert_eq!(to_fixed(1.0), Some(1i128 << 64));
        assert_eq!(to_fixed(-0.5), Some(-(1i128 << 63)));
        assert_eq!(to_fixed(f64::MIN_POSITIVE), Some(0));
        assert_eq!(to_fixed(1.5 * 2f64.powi(-64)), Some(2));
        assert!(!s.add(f64::NAN) && !s.add(MAX_WEIGHTED_MAGNITUDE) && !s.add(-1e300));
        assert_eq!(s.value(), 3.0e15, "refused terms change nothing");
    }

    #[test]
    fn refuses_values_beyond_the_exact_range() {
        let mut m = WeightedMean::new(2);
        m.add(&[1.0, 2.0], 1.0).unwrap();
        assert_eq!(
            m.add(&[1.0, 1e18], 10.0),
            Err(AggregateError::OutOfRange { index: 1 })
        );
        assert_eq!(m.mean().unwrap(), vec![1.0, 2.0]);
        assert_eq!(m.count(), 1);
    }

    #[test]
    fn empty_has_no_mean() {
        assert!(WeightedMean::new(4).mean().is_none());
    }
}
