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
use crate::wire::{KeyAttestation, PeerKeys};
use encode::{EncodeError, FixedPoint};

/// Binds a client's round messages to its enrolled identity. The client
/// signs its own keys; before using a neighbour's keys it checks their
/// signature and that the signing certificate chains to the deployment's
/// CA, so a server cannot slip in keys of nodes that were never enrolled.
/// Before revealing shares it also signs the survivor set the server
/// announced and checks its neighbours' signatures over the same set.
pub trait KeyAttestor: Send + Sync + std::fmt::Debug {
    /// Signs `keys` (with `attestation` still unset) for `round`.
    fn attest(&self, round: u64, keys: &PeerKeys) -> KeyAttestation;
    /// Checks `keys.attestation` for `round`; returns the signer's node name.
    fn verify(&self, round: u64, keys: &PeerKeys) -> Result<String, AttestationError>;
    /// Signs a [`survivors_message`].
    fn sign_survivors(&self, message: &[u8]) -> Vec<u8>;
    /// Checks a [`survivors_message`] signature made with the key of
    /// `certificate` (one [`KeyAttestor::verify`] already accepted).
    fn verify_survivors(
        &self,
        certificate: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), AttestationError>;
    /// This node's own name.
    fn identity(&self) -> &str;
}

/// What the server checks of the signatures a node makes with the key of
/// the certificate its connection authenticated with (TLS already chained
/// that certificate to the CA): a node whose keys or survivor-set
/// signature do not verify is dropped at once, so its neighbours never
/// have to refuse the round over it.
pub trait SignatureCheck: Send + Sync + std::fmt::Debug {
    /// Whether `signature` over `message` was made with `certificate`'s key.
    fn verify(&self, certificate: &[u8], message: &[u8], signature: &[u8]) -> bool;
}

/// Why a peer's round keys are not trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AttestationError {
    /// The keys came without a signature.
    #[error("the keys carry no signature")]
    Unsigned,
    /// The signer's certificate is not a valid node certificate of the
    /// deployment's CA.
    #[error("{0}")]
    Certificate(String),
    /// The signature does not verify under the certificate's key.
    #[error("bad signature from node {0}")]
    BadSignature(String),
}

/// Domain separation of the keys signature.
const KEYS_CONTEXT: &[u8] = b"fedveil secagg keys v2\0";
/// Domain separation of the survivor-set signature.
const SURVIVORS_CONTEXT: &[u8] = b"fedveil secagg survivors v1\0";
/// Domain separation of the round digest.
const DIGEST_CONTEXT: &[u8] = b"fedveil round digest v1\0";

/// The bytes a node signs for its round keys: a domain-separation
/// context, the round, the client id the server assigned, both keys and
/// the round digest.
pub fn keys_message(round: u64, keys: &PeerKeys) -> Vec<u8> {
    let mut m = Vec::with_capacity(KEYS_CONTEXT.len() + 16 + 96);
    m.extend_from_slice(KEYS_CONTEXT);
    m.extend_from_slice(&round.to_le_bytes());
    m.extend_from_slice(&keys.id.to_le_bytes());
    m.extend_from_slice(&keys.enc_pk);
    m.extend_from_slice(&keys.mask_pk);
    m.extend_from_slice(&keys.round_digest);
    m
}

/// The bytes a survivor signs in the consistency check: a context, the
/// round, its digest (so a signature never carries over to another run or
/// model) and the ascending survivor ids.
pub fn survivors_message(round: u64, digest: &[u8; 32], survivors: &[u64]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SURVIVORS_CONTEXT.len() + 48 + 8 * survivors.len());
    m.extend_from_slice(SURVIVORS_CONTEXT);
    m.extend_from_slice(&round.to_le_bytes());
    m.extend_from_slice(digest);
    m.extend_from_slice(&(survivors.len() as u64).to_le_bytes());
    for id in survivors {
        m.extend_from_slice(&id.to_le_bytes());
    }
    m
}

/// SHA-256 over what a round asks a client to train: the round, its
/// config and the global model, bit for bit. Every cohort member of an
/// honest server computes the same digest.
///
/// ```
/// use fedveil_proto::secagg::round_digest;
/// use fedveil_proto::wire::RoundConfig;
/// let config = RoundConfig::default();
/// let a = round_digest(3, &config, &[0.5, -1.0]);
/// assert_eq!(a, round_digest(3, &config, &[0.5, -1.0]));
/// assert_ne!(a, round_digest(3, &config, &[0.5, -1.0000001]));
/// assert_ne!(a, round_digest(4, &config, &[0.5, -1.0]));
/// ```
pub fn round_digest(round: u64, config: &crate::wire::RoundConfig, model: &[f32]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let config = bincode::serde::encode_to_vec(config, bincode::config::standard())
        .expect("a round config always serializes");
    let mut h = Sha256::new();
    h.update(DIGEST_CONTEXT);
    h.update(round.to_le_bytes());
    h.update((config.len() as u64).to_le_bytes());
    h.update(&config);
    h.update((model.len() as u64).to_le_bytes());
    h.update(crate::wire::codec::f32s_to_le_bytes(model));
    h.finalize().into()
}

/// Longest survivor-set signature the server forwards (an ECDSA P-256
/// signature in DER is at most 72 bytes): each is sent to every signing
/// neighbour, so an unbounded one would multiply one client's bytes by k.
pub const MAX_SIGNATURE_LEN: usize = 128;

/// Fewest shares a client's secrets may be reconstructed from: with one,
/// a single colluding neighbour would hold them.
pub const MIN_THRESHOLD: u32 = 2;

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

/// P[X >= j] for X ~ Binomial(k, p), summed in log space so large degrees
/// neither overflow the binomial coefficient nor underflow the powers.
fn binomial_tail(k: u32, p: f64, j: u32) -> f64 {
    if j == 0 {
        return 1.0;
    }
    if p <= 0.0 {
        return 0.0;
    }
    if p >= 1.0 {
        return if j <= k { 1.0 } else { 0.0 };
    }
    let (ln_p, ln_q) = (p.ln(), (1.0 - p).ln());
    let mut ln_coeff = 0.0f64; // ln C(k, i)
    let mut total = 0.0;
    for i in 0..=k {
        if i > 0 {
            ln_coeff += f64::from(k - i + 1).ln() - f64::from(i).ln();
        }
        if i >= j {
            total += (ln_coeff + f64::from(i) * ln_p + f64::from(k - i) * ln_q).exp();
        }
    }
    total.min(1.0)
}

/// Settings that cannot protect anyone, or cannot work.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParamsError {
    /// A threshold below [`MIN_THRESHOLD`].
    #[error(
        "threshold t = {t} is below the minimum of {MIN_THRESHOLD}: one colluding neighbour would hold enough shares"
    )]
    ThresholdBelowMinimum {
        /// The threshold.
        t: u32,
    },
    /// The threshold is at most half the degree.
    #[error(
        "threshold t = {t} must exceed half the degree k = {k} (t > k/2), or the server could learn both share kinds of one client"
    )]
    ThresholdTooLow {
        /// The threshold.
        t: u32,
        /// The degree.
        k: u32,
    },
    /// The threshold exceeds the degree.
    #[error("threshold t = {t} exceeds the degree k = {k}")]
    ThresholdTooHigh {
        /// The threshold.
        t: u32,
        /// The degree.
        k: u32,
    },
    /// A degree that is zero, or odd below the cohort size minus one.
    #[error(
        "degree k = {k} must be at least 1 and even when below the cohort size minus one ({n} clients)"
    )]
    BadDegree {
        /// The degree.
        k: u32,
        /// The cohort size.
        n: usize,
    },
    /// A maximum weight of 0.
    #[error("max_weight must be at least 1")]
    BadMaxWeight,
    /// A cohort larger than the encoding allows.
    #[error("cohort of {n} exceeds max_cohort {max}")]
    CohortTooLarge {
        /// The cohort size.
        n: usize,
        /// The largest cohort.
        max: u32,
    },
    /// A cohort smaller than the minimum of survivors.
    #[error("a cohort of {n} can never reach the minimum of {min} survivors")]
    MinSurvivorsAboveCohort {
        /// The cohort size.
        n: usize,
        /// The minimum of survivors.
        min: u32,
    },
    /// The encoding is invalid.
    #[error(transparent)]
    Encoding(#[from] EncodeError),
}

impl SecAggParams {
    /// The fewest inputs a round may unmask together: t + 1, or
    /// `min_survivors` when that is more. The server aborts below it; each
    /// client refuses a survivor set below it.
    pub fn fewest_inputs(&self) -> usize {
        (self.threshold as usize + 1).max(self.min_survivors as usize)
    }

    /// Safe defaults for a cohort of `n` with an expected dropout rate.
    ///
    /// Degree: at least ~3 log2(n) (Bell et al.), grown until even the
    /// smallest safe threshold t = k/2 + 1 is met with high probability:
    /// with each client dropping out independently at that rate, the chance
    /// that any client keeps fewer than t neighbours stays below
    /// [`DEFAULT_ABORT_PROBABILITY`]. Small cohorts use the complete graph.
    /// Threshold: the largest t > k/2 that still meets that target (a
    /// higher t takes more colluders to unmask anyone).
    pub fn recommended(n: usize, expected_dropout: f64) -> Self {
        let n = n.max(2);
        let p = expected_dropout.clamp(0.0, 0.99);
        let complete = (n - 1) as u32;
        // Chance that some client loses more than `margin` of k neighbours.
        let abort = |k: u32, margin: u32| n as f64 * binomial_tail(k, p, margin + 1);
        let mut k = ((3.0 * (n as f64).log2()).ceil() as u32).max(2);
        k += k % 2;
        while k < complete && abort(k, k - (k / 2 + 1)) > DEFAULT_ABORT_PROBABILITY {
            k += 2;
        }
        let k = k.min(complete);
        let margin = (0..=k)
            .find(|&m| abort(k, m) <= DEFAULT_ABORT_PROBABILITY)
            .unwrap_or(k);
        let t = (k / 2 + 1).max(k.saturating_sub(margin)).min(k);
        Self {
            threshold: t,
            degree: k,
            bits: DEFAULT_BITS,
            clip: DEFAULT_CLIP,
            max_weight: DEFAULT_MAX_WEIGHT,
            max_cohort: n as u32,
            min_survivors: 0,
        }
    }

    /// The degree actually used for a cohort of `n` (at most n - 1).
    pub fn effective_degree(&self, n: usize) -> u32 {
        self.degree.min(n.saturating_sub(1) as u32)
    }

    /// Checks the parameters for a cohort of `n`.
    pub fn validate(&self, n: usize) -> Result<(), ParamsError> {
        let k = self.effective_degree(n);
        let complete = k as usize + 1 >= n;
        if k == 0 || (!complete && k % 2 == 1) {
            return Err(ParamsError::BadDegree { k: self.degree, n });
        }
        if self.threshold < MIN_THRESHOLD {
            return Err(ParamsError::ThresholdBelowMinimum { t: self.threshold });
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
        if self.min_survivors as usize > n {
            return Err(ParamsError::MinSurvivorsAboveCohort {
                n,
                min: self.min_survivors,
            });
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
pub(crate) mod tests;
