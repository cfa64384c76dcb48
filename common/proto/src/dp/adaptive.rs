//! Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021):
//! the clip bound follows a target quantile of the clients' update norms.
//!
//! Each client of a round appends one value to its update: +1/2 if its
//! norm was within the bound, -1/2 if it was clipped. The noised sum of
//! these indicators, over the expected cohort size, estimates the fraction
//! b of unclipped updates, and the bound moves geometrically:
//! `C <- C * exp(-eta * (b - gamma))`. Centring at 1/2 makes the
//! indicator's sensitivity 1/2, so count noise of std `sigma_b` acts as a
//! Gaussian mechanism of multiplier `2 sigma_b`; the accountant charges it
//! together with the update's noise (one joint mechanism per round).

use serde::{Deserialize, Serialize};

use super::DpConfigError;
use super::clip::Clipped;

/// Quantile of update norms the bound tracks (the paper's default, the median).
pub const DEFAULT_TARGET_QUANTILE: f64 = 0.5;
/// Step size of the geometric update (the paper's default).
pub const DEFAULT_CLIP_LEARNING_RATE: f64 = 0.2;
/// Count noise std as a fraction of the expected cohort (the paper's
/// recommendation, m / 20).
pub const DEFAULT_COUNT_NOISE_FRACTION: f64 = 0.05;

/// How far adaptive clipping may move the bound: it stays within the
/// configured clip norm divided or multiplied by this, whatever the
/// (noisy, and possibly manipulated) indicators say.
pub const ADAPTIVE_CLIP_SPAN: f64 = 100.0;

/// The operator's adaptive-clipping settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveClipping {
    /// The quantile of update norms the bound should track (e.g. 0.5).
    pub target_quantile: f64,
    /// Step size of the geometric update of the bound.
    pub learning_rate: f64,
    /// Std of the noise on the indicator sum, in clients (default: the
    /// expected cohort / 20).
    pub count_noise_std: Option<f64>,
}

impl Default for AdaptiveClipping {
    fn default() -> Self {
        Self {
            target_quantile: DEFAULT_TARGET_QUANTILE,
            learning_rate: DEFAULT_CLIP_LEARNING_RATE,
            count_noise_std: None,
        }
    }
}

impl AdaptiveClipping {
    /// Checks the settings are in range.
    pub fn check(&self) -> Result<(), DpConfigError> {
        if !(self.target_quantile > 0.0 && self.target_quantile < 1.0) {
            return Err(DpConfigError::Adaptive(format!(
                "target quantile must be in (0, 1), got {}",
                self.target_quantile
            )));
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Err(DpConfigError::Adaptive(format!(
                "clip learning rate must be positive and finite, got {}",
                self.learning_rate
            )));
        }
        if let Some(s) = self.count_noise_std
            && !(s > 0.0 && s.is_finite())
        {
            return Err(DpConfigError::Adaptive(format!(
                "count noise std must be positive and finite, got {s}"
            )));
        }
        Ok(())
    }

    /// The count noise std for an expected cohort of `expected_cohort`.
    pub fn count_noise_std(&self, expected_cohort: f64) -> f64 {
        self.count_noise_std
            .unwrap_or(DEFAULT_COUNT_NOISE_FRACTION * expected_cohort)
    }

    /// The bound for the next round, from the noisy fraction of unclipped
    /// updates (clamped to [0, 1], so one round moves the bound by at most
    /// a factor `exp(eta * max(gamma, 1 - gamma))`, whatever a client sends).
    pub fn next_clip_norm(&self, clip_norm: f64, unclipped_fraction: f64) -> f64 {
        let b = if unclipped_fraction.is_nan() {
            self.target_quantile
        } else {
            unclipped_fraction.clamp(0.0, 1.0)
        };
        clip_norm * (-self.learning_rate * (b - self.target_quantile)).exp()
    }
}

/// `bound`, clamped to within [`ADAPTIVE_CLIP_SPAN`] of the configured
/// clip norm `initial`.
///
/// ```
/// use fedveil_proto::dp::adaptive::{ADAPTIVE_CLIP_SPAN, within_span};
/// assert_eq!(within_span(1.0, 1e9), ADAPTIVE_CLIP_SPAN);
/// assert_eq!(within_span(1.0, 0.5), 0.5);
/// assert_eq!(within_span(2.0, 1e-9), 2.0 / ADAPTIVE_CLIP_SPAN);
/// ```
pub fn within_span(initial: f64, bound: f64) -> f64 {
    bound.clamp(initial / ADAPTIVE_CLIP_SPAN, initial * ADAPTIVE_CLIP_SPAN)
}

/// A client's clipping indicator: +1/2 when its update was within the bound.
pub fn indicator(clipped: &Clipped) -> f64 {
    if clipped.was_clipped() { -0.5 } else { 0.5 }
}

/// The noise multiplier of the update that, together with count noise of
/// multiplier `2 sigma_b`, gives the joint Gaussian mechanism multiplier
/// `z_total` (Andrew et al., Theorem 1: z^-2 = z_update^-2 + (2 sigma_b)^-2).
pub fn update_noise_multiplier(z_total: f64, count_noise_std: f64) -> Result<f64, DpConfigError> {
    let count = 2.0 * count_noise_std;
    let rest = z_total.powi(-2) - count.powi(-2);
    if rest <= 0.0 {
        return Err(DpConfigError::Adaptive(format!(
            "the count noise (std {count_noise_std}) alone spends more than the target allows \
             (noise multiplier {z_total:.4}); raise the count noise std"
        )));
    }
    Ok(rest.powf(-0.5))
}

/// The joint multiplier of update noise `z_update` and count noise
/// `sigma_b`.
pub fn joint_noise_multiplier(z_update: f64, count_noise_std: f64) -> f64 {
    (z_update.powi(-2) + (2.0 * count_noise_std).powi(-2)).powf(-0.5)
}
