//! Clipping on the global L2 norm of the whole update (all layers at once),
//! which is what bounds one client's influence on the sum.

/// What clipping did to one update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clipped {
    /// L2 norm before clipping.
    pub norm: f64,
    /// Factor the update was multiplied by (1 when already inside).
    pub scale: f64,
}

impl Clipped {
    /// Whether the update was scaled down.
    pub fn was_clipped(&self) -> bool {
        self.scale < 1.0
    }
}

/// The L2 norm of `v`, accumulated in f64.
pub fn l2_norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
}

/// Scales `update` so its L2 norm is at most `bound`; leaves it bit for bit
/// unchanged when already inside. Values must be finite (checked earlier).
///
/// The scale is shrunk by a few ulps so that f32 rounding of the scaled
/// values can never push the norm back above the bound.
pub fn clip_l2(update: &mut [f32], bound: f64) -> Clipped {
    let norm = l2_norm(update);
    if norm <= bound {
        return Clipped { norm, scale: 1.0 };
    }
    let scale = bound / norm * (1.0 - 4.0 * f64::from(f32::EPSILON));
    for x in update.iter_mut() {
        *x = (f64::from(*x) * scale) as f32;
    }
    Clipped { norm, scale }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};

    #[test]
    fn norm_after_clipping_is_within_the_bound() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
        for len in [1usize, 7, 1000, 100_000] {
            for bound in [1e-3, 0.5, 1.0, 10.0] {
                let mut v: Vec<f32> = (0..len).map(|_| rng.random_range(-3.0f32..3.0)).collect();
                let before = l2_norm(&v);
                let c = clip_l2(&mut v, bound);
                assert_eq!(c.norm, before);
                let after = l2_norm(&v);
                assert!(after <= bound, "len {len} bound {bound}: {after}");
                if c.was_clipped() {
                    assert!(
                        after > bound * 0.999,
                        "clipped too much: {after} vs {bound}"
                    );
                }
            }
        }
    }

    #[test]
    fn inside_the_bound_nothing_changes() {
        let v = vec![0.3f32, -0.4, 0.0, -0.0, 1e-40];
        let mut w = v.clone();
        let c = clip_l2(&mut w, 0.6);
        assert_eq!(c.scale, 1.0);
        assert!(v.iter().zip(&w).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn the_whole_update_is_clipped_together_not_per_layer() {
        // Two "layers" each of norm 1: global norm sqrt(2) > 1, so both shrink.
        let mut v = vec![1.0f32, 0.0, 0.0, 1.0];
        let c = clip_l2(&mut v, 1.0);
        assert!((c.norm - 2f64.sqrt()).abs() < 1e-12);
        assert!((v[0] - v[3]).abs() < 1e-7 && v[0] < 0.71);
    }
}
