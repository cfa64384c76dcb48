//! Fixed-point encoding of real vectors into Z_(2^bits), with headroom so
//! the sum over a whole cohort never wraps.
//!
//! A value is clipped to `[-clip, clip]`, shifted to `[0, 2 clip]` and
//! scaled to an integer in `[0, 2^value_bits - 1]`, where
//! `value_bits = bits - ceil(log2(max_cohort))`. The sum of at most
//! `max_cohort` such integers is below `2^bits`, so the modular sum the
//! server unmasks equals the integer sum exactly, and decoding subtracts the
//! shift once per contributor.

/// An encoder for one value range and one cohort bound.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FixedPoint {
    /// Values are clamped to plus or minus this.
    pub clip: f32,
    /// Bits of the modulus.
    pub bits: u32,
    /// Bits each value is encoded in (the rest is headroom for the sum).
    pub value_bits: u32,
    scale: f64,
}

/// Fewest bits per encoded value we accept (resolution 2 clip / 2^8).
pub const MIN_VALUE_BITS: u32 = 8;

/// A configuration that could wrap or is meaningless.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EncodeError {
    /// A clip range that is not positive and finite.
    #[error("clip range {0} must be a positive finite number")]
    BadClip(f32),
    /// Modulus bits outside 16..=32.
    #[error("modulus bits {0} must be in 16..=32")]
    BadBits(u32),
    /// Too few bits are left per value.
    #[error(
        "{bits} bits leave {value_bits} bits per value for a cohort of up to {max_cohort}; \
         need at least {MIN_VALUE_BITS} (use more bits or a smaller cohort)"
    )]
    NoHeadroom {
        /// Bits of the modulus.
        bits: u32,
        /// The cohort the sum must fit.
        max_cohort: usize,
        /// Bits left per value.
        value_bits: i64,
    },
}

impl FixedPoint {
    /// An encoder whose sum over `max_cohort` clients cannot wrap.
    pub fn new(clip: f32, bits: u32, max_cohort: usize) -> Result<Self, EncodeError> {
        if !(clip > 0.0 && clip.is_finite()) {
            return Err(EncodeError::BadClip(clip));
        }
        if !(16..=32).contains(&bits) {
            return Err(EncodeError::BadBits(bits));
        }
        let headroom = usize::BITS - max_cohort.max(1).saturating_sub(1).leading_zeros();
        let value_bits = i64::from(bits) - i64::from(headroom);
        if value_bits < i64::from(MIN_VALUE_BITS) {
            return Err(EncodeError::NoHeadroom {
                bits,
                max_cohort,
                value_bits,
            });
        }
        let value_bits = value_bits as u32;
        let scale = ((1u64 << value_bits) - 1) as f64 / (2.0 * f64::from(clip));
        Ok(Self {
            clip,
            bits,
            value_bits,
            scale,
        })
    }

    /// The integer for `x` (non-finite values must be refused before this).
    pub fn encode(&self, x: f32) -> u32 {
        let c = f64::from(self.clip);
        let shifted = (f64::from(x).clamp(-c, c) + c) * self.scale;
        shifted.round() as u32
    }

    /// The real sum behind `sum`, the integer sum of `count` encodings.
    pub fn decode_sum(&self, sum: u32, count: u64) -> f64 {
        f64::from(sum) / self.scale - count as f64 * f64::from(self.clip)
    }

    /// Largest error of one encoded value (half a step).
    pub fn resolution(&self) -> f64 {
        0.5 / self.scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headroom_prevents_wrapping() {
        let fp = FixedPoint::new(1.0, 32, 1000).unwrap();
        assert_eq!(fp.value_bits, 22);
        let max = fp.encode(f32::MAX);
        assert_eq!(max, (1 << 22) - 1);
        assert!((max as u64) * 1000 < 1 << 32);
        assert_eq!(fp.encode(-5.0), 0);
        assert!((fp.decode_sum(fp.encode(0.25), 1) - 0.25).abs() <= fp.resolution());
        let sum = (0..1000).fold(0u32, |s, _| s.wrapping_add(fp.encode(0.9)));
        assert!((fp.decode_sum(sum, 1000) - 900.0).abs() <= 1000.0 * fp.resolution());
    }

    #[test]
    fn refuses_configs_that_could_wrap() {
        assert!(matches!(
            FixedPoint::new(1.0, 16, 1 << 9),
            Err(EncodeError::NoHeadroom { .. })
        ));
        assert!(FixedPoint::new(1.0, 16, 1 << 8).is_ok());
        assert!(FixedPoint::new(0.0, 32, 10).is_err());
        assert!(FixedPoint::new(f32::NAN, 32, 10).is_err());
        assert!(FixedPoint::new(1.0, 40, 10).is_err());
    }
}
