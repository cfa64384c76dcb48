//! The server side of one SecAgg+ round.
//!
//! Stages advance when every expected client has answered, or when the
//! driver calls [`SecAggServer::advance`] after a stage timeout; clients
//! that did not answer (or were refused) drop out at that stage. Sets, as in
//! the papers: U1 advertised keys, U2 sent shares, U3 sent a masked input,
//! U4' signed the survivor set U3 (the consistency check), U4 answered the
//! unmask request.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use curve25519_dalek::scalar::Scalar;
use x25519_dalek::PublicKey;

use super::client::SHARE_CIPHERTEXT_LEN;
use super::client::x25519_secret;
use super::encode::FixedPoint;
use super::shamir::{self, Share};
use super::{MAX_SIGNATURE_LEN, ParamsError, SignatureCheck, graph, prg};
use crate::wire::{
    EncryptedShare, PeerKeys, ReasonCode, RevealedShare, SecAgg, SecAggParams, SecAggSetup,
    SurvivorSignature,
};

/// A client message the server refuses (the client is dropped from the round).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct Reject {
    /// Why, as a reason code.
    pub code: ReasonCode,
    /// The explanation sent back.
    pub detail: String,
}

fn reject(code: ReasonCode, detail: impl Into<String>) -> Reject {
    Reject {
        code,
        detail: detail.into(),
    }
}

fn violation(detail: impl Into<String>) -> Reject {
    reject(ReasonCode::SecAggViolation, detail)
}

/// Why a round could not produce a sum (the global model stays unchanged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Abort {
    /// Too few clients reached a stage.
    #[error("only {have} clients reached the {stage} stage; at least {needed} are needed")]
    TooFewClients {
        /// The stage.
        stage: &'static str,
        /// Clients that reached it.
        have: usize,
        /// Clients needed.
        needed: usize,
    },
    /// A client has too few surviving neighbours to unmask.
    #[error(
        "client {client} has {have} surviving neighbours, fewer than the threshold {threshold}"
    )]
    TooFewNeighbours {
        /// The client.
        client: u64,
        /// Its surviving neighbours.
        have: usize,
        /// The threshold.
        threshold: usize,
    },
    /// A secret could not be reconstructed from its shares.
    #[error("could not reconstruct the {what} of client {client}: {reason}")]
    Reconstruction {
        /// Whose secret.
        client: u64,
        /// Which secret (self-mask seed or mask key).
        what: &'static str,
        /// Why.
        reason: String,
    },
}

/// The unmasked result of a round.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// `sum(w_i * update_i) / sum(w_i)` over the survivors.
    pub mean: Vec<f32>,
    /// The unmasked integer sum (d values, then the weight), for audits.
    pub sum: Vec<u32>,
    /// Clients whose input is in the sum (U3).
    pub survivors: Vec<u64>,
    /// Clients that shared keys but sent no input (U2 \ U3).
    pub dropped: Vec<u64>,
    /// `sum(w_i)` in units of examples (`w_i * max_weight`).
    pub total_weight: f64,
}

/// The stages of a SecAgg+ round, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Clients advertise their public keys.
    AdvertiseKeys,
    /// Clients exchange encrypted shares.
    ShareKeys,
    /// Clients send their masked inputs.
    MaskedInput,
    /// Survivors sign the survivor set.
    ConsistencyCheck,
    /// Survivors reveal the shares that unmask the sum.
    Unmask,
    /// The sum is known (or the round aborted).
    Finished,
}

impl Stage {
    /// The stage's name, for logs and errors.
    pub fn name(self) -> &'static str {
        match self {
            Stage::AdvertiseKeys => "advertise-keys",
            Stage::ShareKeys => "share-keys",
            Stage::MaskedInput => "masked-input",
            Stage::ConsistencyCheck => "consistency-check",
            Stage::Unmask => "unmask",
            Stage::Finished => "finished",
        }
    }
}

/// One round of SecAgg+ on the server.
pub struct SecAggServer {
    round: u64,
    /// The [`super::round_digest`] every client's keys must carry.
    digest: [u8; 32],
    params: SecAggParams,
    graph: BTreeMap<u64, Vec<u64>>,
    /// Length of the masked vector: the model plus the weight.
    len: usize,
    stage: Stage,
    pending: BTreeSet<u64>,
    keys: BTreeMap<u64, PeerKeys>,
    /// Shares awaiting forwarding, by recipient: (sender, ciphertext).
    inbox: BTreeMap<u64, Vec<EncryptedShare>>,
    u2: BTreeSet<u64>,
    u3: BTreeSet<u64>,
    /// Survivors' signatures over U3 (U4' is their key set).
    signatures: BTreeMap<u64, Vec<u8>>,
    sum: Vec<u32>,
    self_mask_shares: BTreeMap<u64, Vec<Share>>,
    mask_key_shares: BTreeMap<u64, Vec<Share>>,
    u4: BTreeSet<u64>,
    outbox: VecDeque<(u64, SecAgg)>,
    values: FixedPoint,
    weights: FixedPoint,
    /// Checks signatures as they arrive (enrolled deployments).
    signatures_check: Option<Arc<dyn SignatureCheck>>,
}

impl SecAggServer {
    /// A round over `cohort` for a model of `model_len` parameters, whose
    /// round start has [`super::round_digest`] `digest`; returns the setup
    /// each client receives with its round start.
    pub fn new(
        round: u64,
        params: SecAggParams,
        cohort: &[u64],
        model_len: usize,
        graph_seed: u64,
        digest: [u8; 32],
    ) -> Result<(Self, Vec<(u64, SecAggSetup)>), ParamsError> {
        params.validate(cohort.len())?;
        let (values, weights) = params.encoders()?;
        let k = params.effective_degree(cohort.len()) as usize;
        let graph = graph::harary(cohort, k, graph_seed);
        let setups = graph
            .iter()
            .map(|(&id, nb)| {
                (
                    id,
                    SecAggSetup {
                        params: params.clone(),
                        neighbours: nb.clone(),
                    },
                )
            })
            .collect();
        Ok((
            Self {
                round,
                digest,
                params,
                pending: graph.keys().copied().collect(),
                graph,
                len: model_len + 1,
                stage: Stage::AdvertiseKeys,
                keys: BTreeMap::new(),
                inbox: BTreeMap::new(),
                u2: BTreeSet::new(),
                u3: BTreeSet::new(),
                signatures: BTreeMap::new(),
                sum: vec![0; model_len + 1],
                self_mask_shares: BTreeMap::new(),
                mask_key_shares: BTreeMap::new(),
                u4: BTreeSet::new(),
                outbox: VecDeque::new(),
                values,
                weights,
                signatures_check: None,
            },
            setups,
        ))
    }

    /// Verifies each client's key signature and survivor-set signature on
    /// arrival with `check`, against the certificate in its keys (which
    /// the caller must have matched to the connection's): a bad signature
    /// drops the client from the round instead of making each of its
    /// neighbours refuse it.
    pub fn with_signature_check(mut self, check: Arc<dyn SignatureCheck>) -> Self {
        self.signatures_check = Some(check);
        self
    }

    /// The stage the round is in.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// Clients the current stage still waits for.
    pub fn pending(&self) -> &BTreeSet<u64> {
        &self.pending
    }

    /// The next message to send, with its recipient.
    pub fn poll_transmit(&mut self) -> Option<(u64, SecAgg)> {
        self.outbox.pop_front()
    }

    /// The client left or was refused: it no longer counts for this stage.
    pub fn drop_client(&mut self, id: u64) {
        self.pending.remove(&id);
    }

    fn threshold(&self) -> usize {
        self.params.threshold as usize
    }

    fn is_neighbour(&self, a: u64, b: u64) -> bool {
        self.graph
            .get(&a)
            .is_some_and(|nb| nb.binary_search(&b).is_ok())
    }

    /// Feeds one client message. On `Err` the client is out of the round.
    pub fn handle(&mut self, from: u64, msg: SecAgg) -> Result<(), Reject> {
        if msg.round() != self.round {
            return Err(reject(
                ReasonCode::StaleRound,
                format!(
                    "secure-aggregation message for round {}, current round is {}",
                    msg.round(),
                    self.round
                ),
            ));
        }
        if !self.pending.contains(&from) {
            return Err(violation(format!(
                "client {from} sent a {} message in the {} stage, where none is expected from it",
                msg.kind(),
                self.stage.name()
            )));
        }
        let result = match (self.stage, msg) {
            (Stage::AdvertiseKeys, SecAgg::AdvertiseKeys { keys, .. }) => {
                if keys.id != from {
                    Err(violation(format!(
                        "client {from} advertised keys for client {}",
                        keys.id
                    )))
                } else if keys.round_digest != self.digest {
                    // Its neighbours would refuse the round over it.
                    Err(violation(format!(
                        "client {from} advertised keys for another model or round config than this round's"
                    )))
                } else if let Some(check) = &self.signatures_check
                    && !keys.attestation.as_ref().is_some_and(|a| {
                        check.verify(
                            &a.certificate,
                            &super::keys_message(self.round, &keys),
                            &a.signature,
                        )
                    })
                {
                    Err(violation(format!(
                        "client {from} advertised SecAgg keys whose signature does not verify under its certificate"
                    )))
                } else {
                    self.keys.insert(from, keys);
                    Ok(())
                }
            }
            (Stage::ShareKeys, SecAgg::Shares { shares, .. }) => self.on_shares(from, shares),
            (Stage::MaskedInput, SecAgg::MaskedInput { masked, .. }) => {
                self.on_masked(from, &masked)
            }
            (Stage::ConsistencyCheck, SecAgg::SurvivorsSigned { signature, .. }) => {
                if signature.len() > MAX_SIGNATURE_LEN {
                    Err(violation(format!(
                        "client {from} sent a survivor-set signature of {} bytes, more than {MAX_SIGNATURE_LEN}",
                        signature.len()
                    )))
                } else if let Some(check) = &self.signatures_check
                    && !self
                        .keys
                        .get(&from)
                        .and_then(|k| k.attestation.as_ref())
                        .is_some_and(|a| {
                            let survivors: Vec<u64> = self.u3.iter().copied().collect();
                            let message =
                                super::survivors_message(self.round, &self.digest, &survivors);
                            check.verify(&a.certificate, &message, &signature)
                        })
                {
                    Err(violation(format!(
                        "client {from} signed the survivor set with a signature that does not verify under its certificate"
                    )))
                } else {
                    self.signatures.insert(from, signature);
                    Ok(())
                }
            }
            (
                Stage::Unmask,
                SecAgg::UnmaskShares {
                    self_mask,
                    mask_key,
                    ..
                },
            ) => self.on_unmask(from, &self_mask, &mask_key),
            (stage, msg) => Err(violation(format!(
                "a {} message is not expected in the {} stage",
                msg.kind(),
                stage.name()
            ))),
        };
        self.pending.remove(&from);
        result
    }

    fn on_shares(&mut self, from: u64, shares: Vec<EncryptedShare>) -> Result<(), Reject> {
        let mut seen = BTreeSet::new();
        for s in &shares {
            if !self.is_neighbour(from, s.peer) || !self.keys.contains_key(&s.peer) {
                return Err(violation(format!(
                    "client {from} sent a share for unknown peer {}",
                    s.peer
                )));
            }
            if !seen.insert(s.peer) {
                return Err(violation(format!(
                    "client {from} sent two shares for peer {}",
                    s.peer
                )));
            }
        }
        if let Some(bad) = shares
            .iter()
            .find(|s| s.ciphertext.len() != SHARE_CIPHERTEXT_LEN)
        {
            return Err(violation(format!(
                "client {from} sent a share of {} bytes for peer {}, expected {SHARE_CIPHERTEXT_LEN}",
                bad.ciphertext.len(),
                bad.peer
            )));
        }
        // An honest client shares with every neighbour whose keys it was
        // sent; one that leaves some out would make them mask with fewer
        // peers than the threshold assumes.
        let expected = self.graph[&from]
            .iter()
            .filter(|n| self.keys.contains_key(n))
            .count();
        if seen.len() != expected {
            return Err(violation(format!(
                "client {from} shared with {} of its {expected} neighbours with keys",
                seen.len()
            )));
        }
        if seen.len() < self.threshold() {
            return Err(violation(format!(
                "client {from} shared with {} peers, below the threshold {}",
                seen.len(),
                self.threshold()
            )));
        }
        for s in shares {
            self.inbox.entry(s.peer).or_default().push(EncryptedShare {
                peer: from,
                ciphertext: s.ciphertext,
            });
        }
        self.u2.insert(from);
        Ok(())
    }

    fn on_masked(&mut self, from: u64, masked: &[u32]) -> Result<(), Reject> {
        if masked.len() != self.len {
            return Err(reject(
                ReasonCode::WrongLength,
                format!(
                    "masked input has {} values, expected {}",
                    masked.len(),
                    self.len
                ),
            ));
        }
        let modmask = prg::modulus_mask(self.params.bits);
        if let Some(i) = masked.iter().position(|&v| v > modmask) {
            return Err(violation(format!(
                "masked value at index {i} is outside Z_(2^{})",
                self.params.bits
            )));
        }
        for (s, &v) in self.sum.iter_mut().zip(masked) {
            *s = s.wrapping_add(v) & modmask;
        }
        self.u3.insert(from);
        Ok(())
    }

    fn on_unmask(
        &mut self,
        from: u64,
        self_mask: &[RevealedShare],
        mask_key: &[RevealedShare],
    ) -> Result<(), Reject> {
        let survivors: BTreeSet<u64> = self.neighbours_in(from, &self.u3);
        let dropped: BTreeSet<u64> = self.neighbours_in(from, &self.dropped_set());
        let check = |shares: &[RevealedShare],
                     expected: &BTreeSet<u64>,
                     kind: &str|
         -> Result<Vec<(u64, Scalar)>, Reject> {
            let got: BTreeSet<u64> = shares.iter().map(|s| s.owner).collect();
            if got.len() != shares.len() || &got != expected {
                return Err(violation(format!(
                    "client {from} revealed {kind} shares for the wrong peers"
                )));
            }
            shares
                .iter()
                .map(|s| {
                    Option::<Scalar>::from(Scalar::from_canonical_bytes(s.share))
                        .map(|y| (s.owner, y))
                        .ok_or_else(|| {
                            violation(format!("client {from} revealed a malformed {kind} share"))
                        })
                })
                .collect()
        };
        let a = check(self_mask, &survivors, "self-mask")?;
        let b = check(mask_key, &dropped, "mask-key")?;
        for (owner, y) in a {
            self.self_mask_shares
                .entry(owner)
                .or_default()
                .push(Share { x: from, y });
        }
        for (owner, y) in b {
            self.mask_key_shares
                .entry(owner)
                .or_default()
                .push(Share { x: from, y });
        }
        self.u4.insert(from);
        Ok(())
    }

    fn neighbours_in(&self, id: u64, set: &BTreeSet<u64>) -> BTreeSet<u64> {
        self.graph[&id]
            .iter()
            .copied()
            .filter(|p| set.contains(p))
            .collect()
    }

    fn dropped_set(&self) -> BTreeSet<u64> {
        self.u2.difference(&self.u3).copied().collect()
    }

    /// Ends the current stage (all answered, or the stage timed out) and
    /// queues the next stage's messages. Returns the outcome after unmasking.
    pub fn advance(&mut self) -> Result<Option<Outcome>, Abort> {
        let t = self.threshold();
        let result = match self.stage {
            Stage::AdvertiseKeys => {
                // Clients with fewer than t advertising neighbours cannot share
                // their secrets; removing them may starve others, so repeat.
                let mut u1: BTreeSet<u64> = self.keys.keys().copied().collect();
                loop {
                    let starved: Vec<u64> = u1
                        .iter()
                        .copied()
                        .filter(|&i| self.neighbours_in(i, &u1).len() < t)
                        .collect();
                    if starved.is_empty() {
                        break;
                    }
                    starved.iter().for_each(|i| {
                        u1.remove(i);
                    });
                }
                self.ensure_enough(&u1, "share-keys")?;
                for &i in &u1 {
                    let peers = self
                        .neighbours_in(i, &u1)
                        .iter()
                        .map(|p| self.keys[p].clone())
                        .collect();
                    self.outbox.push_back((
                        i,
                        SecAgg::PeerKeys {
                            round: self.round,
                            peers,
                        },
                    ));
                }
                self.keys.retain(|id, _| u1.contains(id));
                self.pending = u1;
                self.stage = Stage::ShareKeys;
                Ok(None)
            }
            Stage::ShareKeys => {
                let u2 = self.u2.clone();
                self.ensure_enough(&u2, "masked-input")?;
                let mut inbox = std::mem::take(&mut self.inbox);
                for &i in &u2 {
                    let shares = inbox
                        .remove(&i)
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|s| u2.contains(&s.peer))
                        .collect();
                    self.outbox.push_back((
                        i,
                        SecAgg::PeerShares {
                            round: self.round,
                            shares,
                        },
                    ));
                }
                self.pending = u2;
                self.stage = Stage::MaskedInput;
                Ok(None)
            }
            Stage::MaskedInput => {
                let u3 = self.u3.clone();
                self.ensure_enough(&u3, "unmask")?;
                let dropped = self.dropped_set();
                // Every secret we will need must have t potential holders in U3.
                for &j in u3.iter().chain(&dropped) {
                    let have = self.neighbours_in(j, &u3).len();
                    if have < t {
                        return self.abort(Abort::TooFewNeighbours {
                            client: j,
                            have,
                            threshold: t,
                        });
                    }
                }
                let survivors: Vec<u64> = u3.iter().copied().collect();
                for &i in &u3 {
                    self.outbox.push_back((
                        i,
                        SecAgg::ConsistencyCheck {
                            round: self.round,
                            survivors: survivors.clone(),
                        },
                    ));
                }
                self.pending = u3;
                self.stage = Stage::ConsistencyCheck;
                Ok(None)
            }
            Stage::ConsistencyCheck => {
                let signed: BTreeSet<u64> = self.signatures.keys().copied().collect();
                self.ensure_enough(&signed, "unmask")?;
                // Only signers are asked to reveal: every secret needed must
                // still have t holders among them.
                for &j in self.u3.iter().chain(&self.dropped_set()) {
                    let have = self.neighbours_in(j, &signed).len();
                    if have < t {
                        return self.abort(Abort::TooFewNeighbours {
                            client: j,
                            have,
                            threshold: t,
                        });
                    }
                }
                for &i in &signed {
                    let signatures = self
                        .neighbours_in(i, &signed)
                        .into_iter()
                        .map(|signer| SurvivorSignature {
                            signer,
                            signature: self.signatures[&signer].clone(),
                        })
                        .collect();
                    self.outbox.push_back((
                        i,
                        SecAgg::UnmaskRequest {
                            round: self.round,
                            signatures,
                        },
                    ));
                }
                self.pending = signed;
                self.stage = Stage::Unmask;
                Ok(None)
            }
            Stage::Unmask => self.unmask().map(Some),
            Stage::Finished => Ok(None),
        };
        if result.is_err() {
            self.stage = Stage::Finished;
        }
        result
    }

    fn abort<T>(&mut self, reason: Abort) -> Result<T, Abort> {
        self.stage = Stage::Finished;
        Err(reason)
    }

    fn ensure_enough(&self, set: &BTreeSet<u64>, stage: &'static str) -> Result<(), Abort> {
        let needed = self.params.fewest_inputs();
        if set.len() < needed {
            return Err(Abort::TooFewClients {
                stage,
                have: set.len(),
                needed,
            });
        }
        Ok(())
    }

    fn unmask(&mut self) -> Result<Outcome, Abort> {
        let t = self.threshold();
        let bits = self.params.bits;
        let dropped = self.dropped_set();
        // With more than t shares, the extras check the others: a
        // malicious client revealing a wrong share of a self-mask seed
        // (which, unlike a mask key, has no public key to check it against)
        // would otherwise corrupt the sum without a trace.
        let reconstruct = |shares: Option<&Vec<Share>>, client: u64, what: &'static str| {
            shamir::combine_checked(shares.map_or(&[][..], |v| v.as_slice()), t).map_err(|e| {
                Abort::Reconstruction {
                    client,
                    what,
                    reason: e.to_string(),
                }
            })
        };
        // Reconstruct every secret first (any failure aborts before the
        // sum is touched), then remove all masks in one parallel pass.
        let mut masks: Vec<prg::MaskJob> = Vec::new();
        for &j in &self.u3 {
            let seed = reconstruct(self.self_mask_shares.get(&j), j, "self-mask seed")?;
            masks.push((prg::self_mask_seed(&seed.to_bytes(), self.round, j), false));
        }
        for &j in &dropped {
            let secret = reconstruct(self.mask_key_shares.get(&j), j, "mask key")?;
            let sk = x25519_secret(&secret);
            if PublicKey::from(&sk).to_bytes() != self.keys[&j].mask_pk {
                return Err(Abort::Reconstruction {
                    client: j,
                    what: "mask key",
                    reason: "the reconstructed key does not match the advertised public key".into(),
                });
            }
            for k in self.neighbours_in(j, &self.u3) {
                let shared = sk.diffie_hellman(&PublicKey::from(self.keys[&k].mask_pk));
                let seed = prg::pairwise_seed(shared.as_bytes(), self.round, j, k);
                // k added +mask if k < j, -mask otherwise: undo it.
                masks.push((seed, k > j));
            }
        }
        let mut sum = std::mem::take(&mut self.sum);
        prg::apply_masks(&mut sum, &masks, bits);
        let n = self.u3.len() as u64;
        let weight = self.weights.decode_sum(sum[self.len - 1], n);
        let mean = sum[..self.len - 1]
            .iter()
            .map(|&s| (self.values.decode_sum(s, n) / weight) as f32)
            .collect();
        self.stage = Stage::Finished;
        Ok(Outcome {
            mean,
            sum,
            survivors: self.u3.iter().copied().collect(),
            dropped: dropped.into_iter().collect(),
            total_weight: weight * self.params.max_weight as f64,
        })
    }
}
