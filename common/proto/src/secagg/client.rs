//! The client side of one SecAgg+ round.

use std::collections::{BTreeMap, BTreeSet};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use curve25519_dalek::scalar::Scalar;
use rand::CryptoRng;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroize;

use super::encode::FixedPoint;
use super::{KeyAttestor, MIN_THRESHOLD, prg, shamir};
use crate::wire::{EncryptedShare, PeerKeys, RevealedShare, SecAgg, SecAggParams, SecAggSetup};

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
    /// Both share kinds asked for one peer: it would unmask that peer.
    #[error("asked to reveal both share kinds for peer {0}")]
    BothShareKinds(u64),
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
    AwaitUnmask,
    Done,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::AwaitPeerKeys => "peer-keys",
            Stage::AwaitPeerShares => "peer-shares",
            Stage::ReadyToMask => "masked-input",
            Stage::AwaitUnmask => "unmask",
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
    /// Starts the round: fresh keys and seeds; returns the advertise message.
    pub fn new<R: CryptoRng + ?Sized>(
        id: u64,
        round: u64,
        setup: &SecAggSetup,
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
            attestation: None,
        };
        keys.attestation = attestor.map(|a| a.attest(round, &keys));
        let client = Self {
            id,
            round,
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
        self.stage = Stage::AwaitUnmask;
        SecAgg::MaskedInput {
            round: self.round,
            masked,
        }
    }

    /// Reveals self-mask shares of `survivors` and mask-key shares of
    /// `dropped`. Answered once per round, and never for one peer in both.
    pub fn on_unmask_request(
        &mut self,
        survivors: &[u64],
        dropped: &[u64],
    ) -> Result<SecAgg, ClientError> {
        self.expect(Stage::AwaitUnmask, "unmask")?;
        let survivors_set: BTreeSet<u64> = survivors.iter().copied().collect();
        let needed = self.params.threshold as usize;
        if survivors_set.len() < needed {
            return Err(ClientError::TooFewSurvivors {
                have: survivors_set.len(),
                needed,
            });
        }
        if let Some(&both) = dropped.iter().find(|d| survivors_set.contains(d)) {
            return Err(ClientError::BothShareKinds(both));
        }
        let reveal = |ids: &[u64],
                      pick: fn(&Received) -> Scalar|
         -> Result<Vec<RevealedShare>, ClientError> {
            let mut seen = BTreeSet::new();
            ids.iter()
                .map(|&owner| {
                    if !seen.insert(owner) {
                        return Err(ClientError::DuplicatePeer(owner));
                    }
                    let r = self
                        .received
                        .get(&owner)
                        .ok_or(ClientError::UnknownPeer(owner))?;
                    Ok(RevealedShare {
                        owner,
                        share: pick(r).to_bytes(),
                    })
                })
                .collect()
        };
        let self_mask = reveal(survivors, |r| r.self_mask)?;
        let mask_key = reveal(dropped, |r| r.mask_key)?;
        self.stage = Stage::Done;
        Ok(SecAgg::UnmaskShares {
            round: self.round,
            self_mask,
            mask_key,
        })
    }
}
