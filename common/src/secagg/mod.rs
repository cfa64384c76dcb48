//! SecAgg+ (Bell et al., CCS 2020; after Bonawitz et al., CCS 2017) as
//! sans-IO state machines: the server learns the sum of the cohort's
//! updates and nothing else about any one of them.
//!
//! Per round, each client:
//! 1. advertises two fresh X25519 public keys (share encryption, masks);
//! 2. Shamir-shares its self-mask seed and its mask secret key t-of-k among
//!    its k graph neighbours, each share AEAD-encrypted (ChaCha20-Poly1305,
//!    key from X25519 + HKDF) and routed through the server;
//! 3. encodes `weight * update` and `weight` in fixed point (headroom so the
//!    cohort sum never wraps), adds its self mask and the signed pairwise
//!    masks (ChaCha20 keystreams under HKDF of the full shared secret), and
//!    sends the result;
//! 4. reveals, for each neighbour, either its self-mask share (the neighbour
//!    survived) or its mask-key share (it dropped out), never both.
//!
//! The server sums masked inputs as they arrive (O(d) memory), rebuilds the
//! self masks of survivors and the pairwise masks of dropped clients from
//! t shares each, and removes them. Threat model: see `docs/SECURITY.md`.

pub mod client;
pub mod encode;
pub mod graph;
pub mod local;
pub mod prg;
pub mod server;
pub mod shamir;

pub use crate::wire::SecAggParams;
use encode::{EncodeError, FixedPoint};

/// Default modulus: values live in Z_(2^32).
pub const DEFAULT_BITS: u32 = 32;
/// Default clip range of update values (after weighting).
pub const DEFAULT_CLIP: f32 = 1.0;
/// Default cap on the example count an update is weighted by.
pub const DEFAULT_MAX_WEIGHT: u64 = 10_000;
/// Default dropout rate the threshold is chosen for.
pub const DEFAULT_EXPECTED_DROPOUT: f64 = 0.1;
/// Target chance that a round aborts because some client lost too many
/// neighbours at the expected dropout rate.
pub const DEFAULT_ABORT_PROBABILITY: f64 = 1e-3;

/// P[X >= j] for X ~ Binomial(k, p).
fn binomial_tail(k: u32, p: f64, j: u32) -> f64 {
    let mut total = 0.0;
    let mut coeff = 1.0f64; // C(k, i)
    for i in 0..=k {
        if i > 0 {
            coeff *= f64::from(k - i + 1) / f64::from(i);
        }
        if i >= j {
            total += coeff * p.powi(i as i32) * (1.0 - p).powi((k - i) as i32);
        }
    }
    total
}

/// Settings that cannot protect anyone, or cannot work.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParamsError {
    #[error(
        "threshold t = {t} must exceed half the degree k = {k} (t > k/2), or the server could learn both share kinds of one client"
    )]
    ThresholdTooLow { t: u32, k: u32 },
    #[error("threshold t = {t} exceeds the degree k = {k}")]
    ThresholdTooHigh { t: u32, k: u32 },
    #[error(
        "degree k = {k} must be at least 1 and even when below the cohort size minus one ({n} clients)"
    )]
    BadDegree { k: u32, n: usize },
    #[error("max_weight must be at least 1")]
    BadMaxWeight,
    #[error("cohort of {n} exceeds max_cohort {max}")]
    CohortTooLarge { n: usize, max: u32 },
    #[error(transparent)]
    Encoding(#[from] EncodeError),
}

impl SecAggParams {
    /// Safe defaults for a cohort of `n` with an expected dropout rate:
    /// degree ~3 log2(n) (the complete graph for small cohorts), and the
    /// largest threshold t > k/2 such that, with each client dropping out
    /// independently at that rate, the chance that any client keeps fewer
    /// than t neighbours stays below [`DEFAULT_ABORT_PROBABILITY`].
    pub fn recommended(n: usize, expected_dropout: f64) -> Self {
        let n = n.max(2);
        let log = (n as f64).log2();
        let mut k = ((3.0 * log).ceil() as usize).max(2);
        k += k % 2;
        let k = if k + 1 >= n { n - 1 } else { k } as u32;
        let p = expected_dropout.clamp(0.0, 0.99);
        // Smallest margin m (lost neighbours tolerated) with
        // n * P[Binomial(k, p) > m] at most the target.
        let margin = (0..=k)
            .find(|&m| n as f64 * binomial_tail(k, p, m + 1) <= DEFAULT_ABORT_PROBABILITY)
            .unwrap_or(k);
        let t = (k / 2 + 1).max(k.saturating_sub(margin)).min(k);
        Self {
            threshold: t,
            degree: k,
            bits: DEFAULT_BITS,
            clip: DEFAULT_CLIP,
            max_weight: DEFAULT_MAX_WEIGHT,
            max_cohort: n as u32,
        }
    }

    /// The degree actually used for a cohort of `n` (at most n - 1).
    pub fn effective_degree(&self, n: usize) -> u32 {
        self.degree.min(n.saturating_sub(1) as u32)
    }

    pub fn validate(&self, n: usize) -> Result<(), ParamsError> {
        let k = self.effective_degree(n);
        let complete = k as usize + 1 >= n;
        if k == 0 || (!complete && k % 2 == 1) {
            return Err(ParamsError::BadDegree { k: self.degree, n });
        }
        if 2 * self.threshold <= k {
            return Err(ParamsError::ThresholdTooLow {
                t: self.threshold,
                k,
            });
        }
        if self.threshold > k {
            return Err(ParamsError::ThresholdTooHigh {
                t: self.threshold,
                k,
            });
        }
        if self.max_weight == 0 {
            return Err(ParamsError::BadMaxWeight);
        }
        if n > self.max_cohort as usize {
            return Err(ParamsError::CohortTooLarge {
                n,
                max: self.max_cohort,
            });
        }
        self.encoders()?;
        Ok(())
    }

    /// Encoders for update values and for the weight (clip 1: weights are
    /// in (0, 1]).
    pub fn encoders(&self) -> Result<(FixedPoint, FixedPoint), EncodeError> {
        let cohort = self.max_cohort as usize;
        Ok((
            FixedPoint::new(self.clip, self.bits, cohort)?,
            FixedPoint::new(1.0, self.bits, cohort)?,
        ))
    }

    /// A client's weight in (0, 1]: its example count over `max_weight`.
    pub fn weight(&self, num_examples: u64) -> f64 {
        num_examples.clamp(1, self.max_weight) as f64 / self.max_weight as f64
    }
}

#[cfg(test)]
mod tests;
