//! The client side of one SecAgg+ round.

use std::collections::{BTreeMap, BTreeSet};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use curve25519_dalek::scalar::Scalar;
use rand::CryptoRng;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroize;

use super::encode::FixedPoint;
use super::{KeyAttestor, MIN_THRESHOLD, prg, shamir, survivors_message};
use crate::wire::{
    EncryptedShare, PeerKeys, RevealedShare, SecAgg, SecAggParams, SecAggSetup, SurvivorSignature,
};

/// Bytes of a share-pair plaintext: self-mask share then mask-key share.
const SHARE_PAIR_LEN: usize = 64;
/// Bytes of an encrypted share pair: the plaintext and the 16-byte
/// Poly1305 tag. The server refuses any other size before forwarding.
pub const SHARE_CIPHERTEXT_LEN: usize = SHARE_PAIR_LEN + 16;

/// A protocol violation seen by a client; the client refuses to go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// A message for another stage than the current one.
    #[error("message for stage {got} while in stage {expected}")]
    WrongStage {
        /// The message's stage.
        got: &'static str,
        /// The current stage.
        expected: &'static str,
    },
    /// Keys or shares of a client that is not a neighbour.
    #[error("peer {0} is not one of my neighbours")]
    UnknownPeer(u64),
    /// A neighbour listed twice.
    #[error("peer {0} appears twice")]
    DuplicatePeer(u64),
    /// Too few neighbours for the threshold.
    #[error("only {have} neighbours advertised keys; the threshold needs {needed}")]
    TooFewPeers {
        /// Neighbours with keys.
        have: usize,
        /// The threshold.
        needed: usize,
    },
    /// A share that fails authentication.
    #[error("share from peer {0} failed authentication (bad AEAD tag or wrong sender)")]
    BadShare(u64),
    /// A neighbour was sent another global model or round config than
    /// this client: the server may be singling one of us out.
    #[error(
        "peer {0} was sent another model or round config than this client (round digests differ)"
    )]
    RoundMismatch(u64),
    /// The survivor set of the consistency check is not in ascending
    /// order without repeats, so it has no single signed form.
    #[error("the survivor set is not strictly ascending")]
    MalformedSurvivors,
    /// The survivor set is smaller than the fewest inputs the round's
    /// parameters allow unmasked together (t + 1, or `min_survivors`):
    /// unmasking so few would expose more than the round promised, and
    /// distributed DP noise is calibrated to that minimum.
    #[error("the survivor set holds {have} clients; the round allows no fewer than {needed}")]
    TooFewInputs {
        /// Survivors named.
        have: usize,
        /// The fewest allowed.
        needed: usize,
    },
    /// The consistency check leaves this client out, though it sent its
    /// masked input.
    #[error("the survivor set leaves out this client, which sent its masked input")]
    NotASurvivor,
    /// Fewer neighbours signed the same survivor set than the threshold:
    /// the server may be telling clients different stories about who
    /// survived.
    #[error(
        "only {valid} neighbours signed the survivor set this client signed; the threshold is {needed}"
    )]
    TooFewSignatures {
        /// Valid signatures from distinct surviving neighbours.
        valid: usize,
        /// The threshold.
        needed: usize,
    },
    /// An update of the wrong length.
    #[error("the update has {got} values, expected {expected}")]
    WrongLength {
        /// Its length.
        got: usize,
        /// The round's.
        expected: usize,
    },
    /// An update with a NaN or an infinity (its index).
    #[error("the update has a non-finite value at index {0}")]
    NonFinite(usize),
    /// The round's parameters are invalid.
    #[error("invalid parameters: {0}")]
    Params(String),
    /// A peer's keys are not signed by an enrolled node.
    #[error("keys of peer {peer} are not from an enrolled node: {reason}")]
    BadAttestation {
        /// The peer.
        peer: u64,
        /// Why the signature is not trusted.
        reason: super::AttestationError,
    },
    /// The server's setup would not protect this client's input: a
    /// threshold one colluder or half the neighbours could meet, or a
    /// malformed neighbour list.
    #[error("unsafe secure-aggregation setup from the server: {0}")]
    UnsafeSetup(SetupError),
    /// Fewer neighbours sent shares than the threshold: masking with so
    /// few pairwise masks would let the server strip them and read the
    /// input under its self mask alone.
    #[error(
        "only {have} neighbours sent shares; the threshold is {needed}, so this client will not send its masked input"
    )]
    TooFewShares {
        /// Neighbours whose shares arrived.
        have: usize,
        /// The threshold.
        needed: usize,
    },
    /// An unmask request naming fewer survivors than the threshold (an
    /// honest server aborts such a round instead).
    #[error("the unmask request names {have} surviving neighbours, below the threshold {needed}")]
    TooFewSurvivors {
        /// Survivors named.
        have: usize,
        /// The threshold.
        needed: usize,
    },
    /// One node behind two peers (or behind a peer and us).
    #[error("node {name} appears as more than one peer (or as myself)")]
    DuplicateIdentity {
        /// The node.
        name: String,
    },
}

/// What makes a server's setup unsafe for the client that receives it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// A threshold below [`MIN_THRESHOLD`]: one colluding neighbour
    /// would hold enough shares.
    #[error("threshold {0} is below the minimum of {MIN_THRESHOLD}")]
    ThresholdBelowMinimum(u32),
    /// At most half the neighbours meet the threshold, so the server could
    /// get both share kinds of one client from two halves.
    #[error("threshold {t} is at most half of the {k} neighbours")]
    ThresholdTooLow {
        /// The threshold.
        t: u32,
        /// Neighbours.
        k: usize,
    },
    /// More shares needed than there are neighbours to hold them.
    #[error("threshold {t} exceeds the {k} neighbours")]
    ThresholdAboveNeighbours {
        /// The threshold.
        t: u32,
        /// Neighbours.
        k: usize,
    },
    /// More neighbours than the degree the parameters state.
    #[error("{k} neighbours exceed the stated degree {degree}")]
    AboveDegree {
        /// Neighbours.
        k: usize,
        /// The stated degree.
        degree: u32,
    },
    /// The neighbour list holds this client.
    #[error("the neighbour list holds this client")]
    SelfNeighbour,
    /// A neighbour listed twice.
    #[error("neighbour {0} is listed twice")]
    DuplicateNeighbour(u64),
    /// The encoding parameters are invalid.
    #[error("{0}")]
    Encoding(String),
}

/// Checks what the server sent before any key is made: SecAgg+'s
/// guarantees rest on these, so a client never takes them on trust.
fn check_setup(id: u64, setup: &SecAggSetup) -> Result<(), SetupError> {
    let mut seen = BTreeSet::new();
    for &n in &setup.neighbours {
        if n == id {
            return Err(SetupError::SelfNeighbour);
        }
        if !seen.insert(n) {
            return Err(SetupError::DuplicateNeighbour(n));
        }
    }
    let (t, k) = (setup.params.threshold, setup.neighbours.len());
    if k > setup.params.degree as usize {
        return Err(SetupError::AboveDegree {
            k,
            degree: setup.params.degree,
        });
    }
    if t < MIN_THRESHOLD {
        return Err(SetupError::ThresholdBelowMinimum(t));
    }
    if 2 * t as usize <= k {
        return Err(SetupError::ThresholdTooLow { t, k });
    }
    if t as usize > k {
        return Err(SetupError::ThresholdAboveNeighbours { t, k });
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    AwaitPeerKeys,
    AwaitPeerShares,
    ReadyToMask,
    AwaitConsistencyCheck,
    AwaitUnmaskRequest,
    Done,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::AwaitPeerKeys => "peer-keys",
            Stage::AwaitPeerShares => "peer-shares",
            Stage::ReadyToMask => "masked-input",
            Stage::AwaitConsistencyCheck => "consistency-check",
            Stage::AwaitUnmaskRequest => "unmask",
            Stage::Done => "done",
        }
    }
}

struct Received {
    self_mask: Scalar,
    mask_key: Scalar,
}

/// One client's SecAgg+ state for one round.
pub struct SecAggClient {
    id: u64,
    round: u64,
    /// What this client was asked to train ([`super::round_digest`]).
    digest: [u8; 32],
    params: SecAggParams,
    neighbours: BTreeSet<u64>,
    enc_sk: StaticSecret,
    mask_secret: Scalar,
    self_seed: Scalar,
    stage: Stage,
    peers: BTreeMap<u64, PeerKeys>,
    received: BTreeMap<u64, Received>,
    values: FixedPoint,
    weights: FixedPoint,
    /// The survivor set this client signed.
    survivors: Vec<u64>,
}

impl Drop for SecAggClient {
    fn drop(&mut self) {
        self.mask_secret.zeroize();
        self.self_seed.zeroize();
    }
}

/// The X25519 secret whose bytes are the canonical encoding of `s`.
/// Secrets are drawn as scalars so Shamir sharing covers them exactly.
pub(crate) fn x25519_secret(s: &Scalar) -> StaticSecret {
    StaticSecret::from(s.to_bytes())
}

/// The nonce of the (unique per round and pair) share message from → to.
fn share_nonce(from: u64, to: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[0] = if from < to { 1 } else { 2 };
    Nonce::from(n)
}

fn share_aad(round: u64, from: u64, to: u64) -> [u8; 24] {
    let mut aad = [0u8; 24];
    aad[..8].copy_from_slice(&round.to_le_bytes());
    aad[8..16].copy_from_slice(&from.to_le_bytes());
    aad[16..].copy_from_slice(&to.to_le_bytes());
    aad
}

pub(crate) fn share_cipher(
    my_enc: &StaticSecret,
    their_enc: &[u8; 32],
    round: u64,
    a: u64,
    b: u64,
) -> ChaCha20Poly1305 {
    let shared = my_enc.diffie_hellman(&PublicKey::from(*their_enc));
    let key = prg::share_key(shared.as_bytes(), round, a, b);
    ChaCha20Poly1305::new(&Key::from(key))
}

impl SecAggClient {
    /// Starts the round: fresh keys and seeds; returns the advertise
    /// message. `digest` is the [`super::round_digest`] of the round start
    /// this client received.
    pub fn new<R: CryptoRng + ?Sized>(
        id: u64,
        round: u64,
        setup: &SecAggSetup,
        digest: [u8; 32],
        rng: &mut R,
        attestor: Option<&dyn KeyAttestor>,
    ) -> Result<(Self, SecAgg), ClientError> {
        check_setup(id, setup).map_err(ClientError::UnsafeSetup)?;
        let (values, weights) = setup
            .params
            .encoders()
            .map_err(|e| ClientError::UnsafeSetup(SetupError::Encoding(e.to_string())))?;
        let enc_sk = StaticSecret::random_from_rng(rng);
        let mask_secret = Scalar::random(rng);
        let self_seed = Scalar::random(rng);
        let mut keys = PeerKeys {
            id,
            enc_pk: PublicKey::from(&enc_sk).to_bytes(),
            mask_pk: PublicKey::from(&x25519_secret(&mask_secret)).to_bytes(),
            round_digest: digest,
            attestation: None,
        };
        keys.attestation = attestor.map(|a| a.attest(round, &keys));
        let client = Self {
            id,
            round,
            digest,
            params: setup.params.clone(),
            neighbours: setup.neighbours.iter().copied().collect(),
            enc_sk,
            mask_secret,
            self_seed,
            stage: Stage::AwaitPeerKeys,
            peers: BTreeMap::new(),
            received: BTreeMap::new(),
            values,
            weights,
            survivors: Vec::new(),
        };
        Ok((client, SecAgg::AdvertiseKeys { round, keys }))
    }

    /// The round this client is in.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// Whether the masked input can be computed (shares are in).
    pub fn ready_to_mask(&self) -> bool {
        self.stage == Stage::ReadyToMask
    }

    fn expect(&self, stage: Stage, got: &'static str) -> Result<(), ClientError> {
        if self.stage == stage {
            Ok(())
        } else {
            Err(ClientError::WrongStage {
                got,
                expected: self.stage.name(),
            })
        }
    }

    /// Neighbours' keys arrived: share our secrets among them. With an
    /// `attestor`, every peer's keys must be signed by a distinct enrolled
    /// node other than this one.
    pub fn on_peer_keys<R: CryptoRng + ?Sized>(
        &mut self,
        peers: Vec<PeerKeys>,
        rng: &mut R,
        attestor: Option<&dyn KeyAttestor>,
    ) -> Result<SecAgg, ClientError> {
        self.expect(Stage::AwaitPeerKeys, "peer-keys")?;
        let mut names = std::collections::BTreeSet::new();
        if let Some(a) = attestor {
            names.insert(a.identity().to_owned());
        }
        for p in peers {
            if !self.neighbours.contains(&p.id) {
                return Err(ClientError::UnknownPeer(p.id));
            }
            if let Some(a) = attestor {
                let name = a
                    .verify(self.round, &p)
                    .map_err(|reason| ClientError::BadAttestation { peer: p.id, reason })?;
                if !names.insert(name.clone()) {
                    return Err(ClientError::DuplicateIdentity { name });
                }
            }
            if p.round_digest != self.digest {
                return Err(ClientError::RoundMismatch(p.id));
            }
            if self.peers.insert(p.id, p.clone()).is_some() {
                return Err(ClientError::DuplicatePeer(p.id));
            }
        }
        let t = self.params.threshold as usize;
        if self.peers.len() < t {
            return Err(ClientError::TooFewPeers {
                have: self.peers.len(),
                needed: t,
            });
        }
        let holders: Vec<u64> = self.peers.keys().copied().collect();
        let split = |secret: &Scalar, rng: &mut R| {
            shamir::split(secret, t, &holders, rng).map_err(|e| ClientError::Params(e.to_string()))
        };
        let self_shares = split(&self.self_seed, rng)?;
        let key_shares = split(&self.mask_secret, rng)?;
        let mut shares = Vec::with_capacity(holders.len());
        for ((peer, s), k) in holders.iter().zip(&self_shares).zip(&key_shares) {
            let mut plain = [0u8; SHARE_PAIR_LEN];
            plain[..32].copy_from_slice(s.y.as_bytes());
            plain[32..].copy_from_slice(k.y.as_bytes());
            let cipher = share_cipher(
                &self.enc_sk,
                &self.peers[peer].enc_pk,
                self.round,
                self.id,
                *peer,
            );
            let aad = share_aad(self.round, self.id, *peer);
            let ciphertext = cipher
                .encrypt(
                    &share_nonce(self.id, *peer),
                    Payload {
                        msg: &plain,
                        aad: &aad,
                    },
                )
                .expect("encrypting a short buffer cannot fail");
            plain.zeroize();
            shares.push(EncryptedShare {
                peer: *peer,
                ciphertext,
            });
        }
        self.stage = Stage::AwaitPeerShares;
        Ok(SecAgg::Shares {
            round: self.round,
            shares,
        })
    }

    /// Shares made for us arrived; the senders are the peers we mask with.
    pub fn on_peer_shares(&mut self, shares: Vec<EncryptedShare>) -> Result<(), ClientError> {
        self.expect(Stage::AwaitPeerShares, "peer-shares")?;
        let mut received = BTreeMap::new();
        for s in shares {
            let Some(peer) = self.peers.get(&s.peer) else {
                return Err(ClientError::UnknownPeer(s.peer));
            };
            if received.contains_key(&s.peer) {
                return Err(ClientError::DuplicatePeer(s.peer));
            }
            let cipher = share_cipher(&self.enc_sk, &peer.enc_pk, self.round, s.peer, self.id);
            let aad = share_aad(self.round, s.peer, self.id);
            let mut plain = cipher
                .decrypt(
                    &share_nonce(s.peer, self.id),
                    Payload {
                        msg: &s.ciphertext,
                        aad: &aad,
                    },
                )
                .map_err(|_| ClientError::BadShare(s.peer))?;
            let scalar = |bytes: &[u8]| {
                Option::<Scalar>::from(Scalar::from_canonical_bytes(
                    bytes.try_into().expect("32 bytes"),
                ))
                .ok_or(ClientError::BadShare(s.peer))
            };
            if plain.len() != SHARE_PAIR_LEN {
                return Err(ClientError::BadShare(s.peer));
            }
            let pair = Received {
                self_mask: scalar(&plain[..32])?,
                mask_key: scalar(&plain[32..])?,
            };
            plain.zeroize();
            received.insert(s.peer, pair);
        }
        let needed = self.params.threshold as usize;
        if received.len() < needed {
            return Err(ClientError::TooFewShares {
                have: received.len(),
                needed,
            });
        }
        self.received = received;
        self.stage = Stage::ReadyToMask;
        Ok(())
    }

    /// Encodes, weights and masks `update`; `expected_len` is the model size.
    pub fn mask(
        &mut self,
        update: &[f32],
        num_examples: u64,
        expected_len: usize,
    ) -> Result<SecAgg, ClientError> {
        self.expect(Stage::ReadyToMask, "masked-input")?;
        if update.len() != expected_len {
            return Err(ClientError::WrongLength {
                got: update.len(),
                expected: expected_len,
            });
        }
        if let Some(i) = update.iter().position(|v| !v.is_finite()) {
            return Err(ClientError::NonFinite(i));
        }
        let w = self.params.weight(num_examples);
        let mut encoded: Vec<u32> = update
            .iter()
            .map(|&v| self.values.encode((f64::from(v) * w) as f32))
            .collect();
        encoded.push(self.weights.encode(w as f32));
        Ok(self.mask_encoded(encoded))
    }

    /// Masks integers that are already final (distributed DP: rounded,
    /// noised), each taken mod 2^bits, with a count of 1 in the weight slot,
    /// so the server unmasks their exact sum and the number of contributors.
    pub fn mask_integers(
        &mut self,
        values: &[i64],
        expected_len: usize,
    ) -> Result<SecAgg, ClientError> {
        self.expect(Stage::ReadyToMask, "masked-input")?;
        if values.len() != expected_len {
            return Err(ClientError::WrongLength {
                got: values.len(),
                expected: expected_len,
            });
        }
        let modulus = 1i128 << self.params.bits;
        let mut encoded: Vec<u32> = values
            .iter()
            .map(|&v| i128::from(v).rem_euclid(modulus) as u32)
            .collect();
        encoded.push(1);
        Ok(self.mask_encoded(encoded))
    }

    /// Adds the self mask and the pairwise masks to an encoded input.
    fn mask_encoded(&mut self, mut masked: Vec<u32>) -> SecAgg {
        let bits = self.params.bits;
        let own = prg::self_mask_seed(&self.self_seed.to_bytes(), self.round, self.id);
        let mut masks = vec![(own, true)];
        let mask_sk = x25519_secret(&self.mask_secret);
        for &peer in self.received.keys() {
            let shared = mask_sk.diffie_hellman(&PublicKey::from(self.peers[&peer].mask_pk));
            let seed = prg::pairwise_seed(shared.as_bytes(), self.round, self.id, peer);
            masks.push((seed, self.id < peer));
        }
        prg::apply_masks(&mut masked, &masks, bits);
        for (seed, _) in &mut masks {
            seed.zeroize();
        }
        self.stage = Stage::AwaitConsistencyCheck;
        SecAgg::MaskedInput {
            round: self.round,
            masked,
        }
    }

    /// The server announced who survived (U3): checks that the set is
    /// well formed, holds this client and at least t of its neighbours,
    /// and signs it. Answered once per round.
    pub fn on_consistency_check(
        &mut self,
        survivors: Vec<u64>,
        attestor: Option<&dyn KeyAttestor>,
    ) -> Result<SecAgg, ClientError> {
        self.expect(Stage::AwaitConsistencyCheck, "consistency-check")?;
        if survivors.windows(2).any(|w| w[0] >= w[1]) {
            return Err(ClientError::MalformedSurvivors);
        }
        if survivors.binary_search(&self.id).is_err() {
            return Err(ClientError::NotASurvivor);
        }
        let fewest = self.params.fewest_inputs();
        if survivors.len() < fewest {
            return Err(ClientError::TooFewInputs {
                have: survivors.len(),
                needed: fewest,
            });
        }
        let surviving = self
            .received
            .keys()
            .filter(|p| survivors.binary_search(p).is_ok())
            .count();
        let needed = self.params.threshold as usize;
        if surviving < needed {
            return Err(ClientError::TooFewSurvivors {
                have: surviving,
                needed,
            });
        }
        let signature = attestor.map_or_else(Vec::new, |a| {
            a.sign_survivors(&survivors_message(self.round, &self.digest, &survivors))
        });
        self.survivors = survivors;
        self.stage = Stage::AwaitUnmaskRequest;
        Ok(SecAgg::SurvivorsSigned {
            round: self.round,
            signature,
        })
    }

    /// Reveals, for every neighbour whose shares this client holds, the
    /// self-mask share if the signed survivor set holds it and the mask-key
    /// share otherwise: never both, by construction. With an `attestor`,
    /// at least t distinct surviving neighbours must first have signed the
    /// very set this client signed (Bonawitz et al.'s consistency check),
    /// so a server cannot tell one neighbour "X survived" and another "X
    /// dropped" and collect both of X's secrets.
    pub fn on_unmask_request(
        &mut self,
        signatures: &[SurvivorSignature],
        attestor: Option<&dyn KeyAttestor>,
    ) -> Result<SecAgg, ClientError> {
        self.expect(Stage::AwaitUnmaskRequest, "unmask")?;
        let needed = self.params.threshold as usize;
        if let Some(a) = attestor {
            let message = survivors_message(self.round, &self.digest, &self.survivors);
            let mut valid = BTreeSet::new();
            for s in signatures {
                let certificate = self
                    .peers
                    .get(&s.signer)
                    .filter(|_| self.survivors.binary_search(&s.signer).is_ok())
                    .and_then(|p| p.attestation.as_ref())
                    .map(|att| att.certificate.as_slice());
                if let Some(cert) = certificate
                    && a.verify_survivors(cert, &message, &s.signature).is_ok()
                {
                    valid.insert(s.signer);
                }
            }
            if valid.len() < needed {
                return Err(ClientError::TooFewSignatures {
                    valid: valid.len(),
                    needed,
                });
            }
        }
        let (mut self_mask, mut mask_key) = (Vec::new(), Vec::new());
        for (&owner, r) in &self.received {
            if self.survivors.binary_search(&owner).is_ok() {
                self_mask.push(RevealedShare {
                    owner,
                    share: r.self_mask.to_bytes(),
                });
            } else {
                mask_key.push(RevealedShare {
                    owner,
                    share: r.mask_key.to_bytes(),
                });
            }
        }
        self.stage = Stage::Done;
        Ok(SecAgg::UnmaskShares {
            round: self.round,
            self_mask,
            mask_key,
        })
    }
}
