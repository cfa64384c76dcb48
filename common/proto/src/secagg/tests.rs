//! SecAgg+ end to end in memory: exactness under dropouts at every stage,
//! privacy properties, and tampering.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use super::client::{ClientError, SecAggClient};
use super::local::{Drops, run_round};
use super::server::{Abort, SecAggServer, Stage};
use super::*;
use crate::wire::{ReasonCode, SecAgg, SecAggSetup};

/// The round digest of the in-memory rounds here.
const DIGEST: [u8; 32] = [7; 32];

struct Run {
    result: Result<server::Outcome, Abort>,
    /// Plaintext integer sum of the survivors' encoded inputs.
    expected_sum: Option<Vec<u32>>,
    inputs: BTreeMap<u64, (Vec<f32>, u64)>,
}

fn inputs(ids: &[u64], d: usize, rng: &mut ChaCha20Rng) -> BTreeMap<u64, (Vec<f32>, u64)> {
    use rand::RngExt;
    ids.iter()
        .map(|&i| {
            let v = (0..d).map(|_| rng.random_range(-1.5f32..1.5)).collect();
            (i, (v, rng.random_range(1..20_000u64)))
        })
        .collect()
}

/// One in-memory round, plus the plaintext sum computed independently.
fn run(params: &SecAggParams, ids: &[u64], d: usize, drops: &Drops, seed: u64) -> Run {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let inputs = inputs(ids, d, &mut rng);
    let local = run_round(params, 9, &inputs, drops, seed, std::time::Instant::now);
    let expected_sum = local.result.as_ref().ok().map(|o| {
        assert_eq!(
            o.survivors.iter().copied().collect::<BTreeSet<_>>(),
            local.masked_by
        );
        let (vals, weights) = params.encoders().unwrap();
        let modmask = prg::modulus_mask(params.bits);
        let mut sum = vec![0u32; d + 1];
        for id in &o.survivors {
            let (v, n) = &inputs[id];
            let w = params.weight(*n);
            for (s, x) in sum.iter_mut().zip(v) {
                *s = s.wrapping_add(vals.encode((f64::from(*x) * w) as f32)) & modmask;
            }
            sum[d] = sum[d].wrapping_add(weights.encode(w as f32)) & modmask;
        }
        sum
    });
    Run {
        result: local.result,
        expected_sum,
        inputs,
    }
}

fn params(n: usize, k: u32, t: u32, bits: u32) -> SecAggParams {
    SecAggParams {
        threshold: t,
        degree: k,
        bits,
        clip: 2.0,
        max_weight: 20_000,
        max_cohort: n as u32,
        min_survivors: 0,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Whatever the cohort, graph, threshold, bit width and dropout pattern:
    /// the round either aborts cleanly or its unmasked sum equals the
    /// plaintext sum of the survivors' encodings, bit for bit.
    #[test]
    fn unmasked_sum_is_exact(
        n in 2usize..64,
        k_frac in 0.0f64..1.0,
        t_frac in 0.0f64..1.0,
        bits in prop::sample::select(vec![24u32, 28, 32]),
        drop_rate in 0.0f64..0.3,
        seed: u64,
    ) {
        let max_k = (n - 1) as u32;
        let mut k = 2 + ((max_k.saturating_sub(2)) as f64 * k_frac) as u32;
        if k + 1 < n as u32 && k % 2 == 1 { k -= 1; }
        let k = k.min(max_k).max(1);
        let t = (k / 2 + 1 + ((k - k / 2 - 1) as f64 * t_frac) as u32).min(k);
        let p = params(n, k, t, bits);
        prop_assume!(p.validate(n).is_ok());
        let ids: Vec<u64> = (0..n as u64).map(|i| 10 + 3 * i).collect();
        let mut rng = ChaCha20Rng::seed_from_u64(seed ^ 0xd0d0);
        let mut pick = |rate: f64| -> BTreeSet<u64> {
            use rand::RngExt;
            ids.iter().copied().filter(|_| rng.random_bool(rate)).collect()
        };
        let drops = Drops {
            before_keys: pick(drop_rate / 4.0),
            before_shares: pick(drop_rate / 4.0),
            before_masked: pick(drop_rate / 4.0),
            before_unmask: pick(drop_rate / 4.0),
        };
        let r = run(&p, &ids, 17, &drops, seed);
        if let Ok(o) = &r.result {
            prop_assert_eq!(&o.sum, r.expected_sum.as_ref().unwrap());
        }
        if drops.is_empty() {
            prop_assert!(r.result.is_ok(), "no dropouts must succeed: {:?}", r.result.err());
        }
    }
}

#[test]
fn survives_a_dropout_at_every_stage_and_decodes_the_weighted_mean() {
    let n = 30;
    let ids: Vec<u64> = (1..=n as u64).collect();
    let p = params(n, 16, 9, 32);
    let drops = Drops {
        before_keys: [3].into(),
        before_shares: [7].into(),
        before_masked: [11, 12].into(),
        before_unmask: [20].into(),
    };
    let r = run(&p, &ids, 50, &drops, 4);
    let o = r.result.unwrap();
    assert_eq!(&o.sum, r.expected_sum.as_ref().unwrap());
    assert_eq!(o.dropped, vec![11, 12]);
    assert_eq!(o.survivors.len(), n - 4);
    // The decoded mean is the weighted mean, up to fixed-point resolution.
    let total: f64 = o.survivors.iter().map(|i| p.weight(r.inputs[i].1)).sum();
    for e in 0..50 {
        let expected: f64 = o
            .survivors
            .iter()
            .map(|i| {
                let (v, n) = &r.inputs[i];
                f64::from(v[e].clamp(-2.0, 2.0)) * p.weight(*n)
            })
            .sum::<f64>()
            / total;
        assert!(
            (f64::from(o.mean[e]) - expected).abs() < 1e-4,
            "{e}: {} vs {expected}",
            o.mean[e]
        );
    }
    assert!((o.total_weight - total * p.max_weight as f64).abs() < 1.0);
}

#[test]
fn too_many_dropouts_abort_cleanly() {
    let ids: Vec<u64> = (1..=8).collect();
    let p = params(8, 4, 3, 32);
    let drops = Drops {
        before_masked: [1, 2, 3, 4, 5, 6].into(),
        ..Drops::default()
    };
    let r = run(&p, &ids, 5, &drops, 1);
    assert!(
        matches!(
            r.result,
            Err(Abort::TooFewClients { .. }) | Err(Abort::TooFewNeighbours { .. })
        ),
        "{:?}",
        r.result
    );
}

#[test]
fn unsafe_settings_are_refused() {
    assert!(matches!(
        params(10, 4, 2, 32).validate(10),
        Err(ParamsError::ThresholdTooLow { .. })
    ));
    assert!(matches!(
        params(10, 4, 5, 32).validate(10),
        Err(ParamsError::ThresholdTooHigh { .. })
    ));
    assert!(matches!(
        params(10, 3, 2, 32).validate(10),
        Err(ParamsError::BadDegree { .. })
    ));
    assert!(matches!(
        params(10, 4, 3, 12).validate(10),
        Err(ParamsError::Encoding(_))
    ));
    let mut p = params(10, 4, 3, 32);
    p.max_cohort = 5;
    assert!(matches!(
        p.validate(10),
        Err(ParamsError::CohortTooLarge { .. })
    ));
    // Two clients: one share would open either's secrets.
    assert!(matches!(
        params(2, 1, 1, 32).validate(2),
        Err(ParamsError::ThresholdBelowMinimum { t: 1 })
    ));
    for n in [3usize, 10, 100, 1000] {
        for dropout in [0.0, 0.1, 0.3] {
            SecAggParams::recommended(n, dropout).validate(n).unwrap();
        }
    }
    let p = SecAggParams::recommended(100, 0.1);
    assert_eq!((p.degree, p.threshold), (20, 11));
    // No dropout expected: the largest threshold.
    assert_eq!(SecAggParams::recommended(100, 0.0).threshold, 20);
    // The degree grows with the dropout rate until even t = k/2 + 1 holds:
    // a 500-client cohort at 30% dropout must not abort routinely.
    for n in [10usize, 100, 500, 2000] {
        for dropout in [0.0, 0.1, 0.3, 0.4] {
            let p = SecAggParams::recommended(n, dropout);
            let k = p.effective_degree(n);
            let abort = n as f64 * super::binomial_tail(k, dropout, k - p.threshold + 1);
            assert!(
                abort <= super::DEFAULT_ABORT_PROBABILITY || k as usize == n - 1,
                "n {n} dropout {dropout}: k {k} t {} abort {abort}",
                p.threshold
            );
        }
    }
    assert!(
        SecAggParams::recommended(500, 0.3).degree > SecAggParams::recommended(500, 0.1).degree
    );
}

#[test]
fn binomial_tail_is_exact_on_small_cases_and_finite_on_large_ones() {
    use super::binomial_tail;
    assert_eq!(binomial_tail(10, 0.3, 0), 1.0);
    assert!((binomial_tail(4, 0.5, 4) - 1.0 / 16.0).abs() < 1e-15);
    assert!((binomial_tail(4, 0.5, 3) - 5.0 / 16.0).abs() < 1e-15);
    assert!((binomial_tail(3, 0.2, 1) - (1.0 - 0.8f64.powi(3))).abs() < 1e-15);
    assert_eq!(binomial_tail(5, 0.0, 1), 0.0);
    // C(2000, 1000) overflows f64; the log-space sum must not.
    let half = binomial_tail(2000, 0.5, 1000);
    assert!(half.is_finite() && (half - 0.5).abs() < 0.01, "{half}");
}

/// Drives one honest client to the point where it has masked its input.
fn masked_client(n: usize, seed: u64) -> (SecAggServer, BTreeMap<u64, SecAggClient>, ChaCha20Rng) {
    let ids: Vec<u64> = (1..=n as u64).collect();
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let (mut server, setups) =
        SecAggServer::new(1, params(n, 4, 3, 32), &ids, 8, seed, DIGEST).unwrap();
    let mut clients = BTreeMap::new();
    for (id, s) in &setups {
        let (c, adv) = SecAggClient::new(*id, 1, s, DIGEST, &mut rng, None).unwrap();
        server.handle(*id, adv).unwrap();
        clients.insert(*id, c);
    }
    server.advance().unwrap();
    (server, clients, rng)
}

/// Every client answers the peer keys the server sent it; their shares,
/// by sender, not yet delivered.
fn answer_peer_keys(
    server: &mut SecAggServer,
    clients: &mut BTreeMap<u64, SecAggClient>,
    rng: &mut ChaCha20Rng,
) -> BTreeMap<u64, SecAgg> {
    let msgs: Vec<(u64, SecAgg)> = std::iter::from_fn(|| server.poll_transmit()).collect();
    msgs.into_iter()
        .map(|(to, m)| {
            let SecAgg::PeerKeys { peers, .. } = m else {
                panic!("expected peer keys")
            };
            let shares = clients
                .get_mut(&to)
                .unwrap()
                .on_peer_keys(peers, rng, None)
                .unwrap();
            (to, shares)
        })
        .collect()
}

/// Every client answers its peer keys with shares; the server moves on.
fn share_all(
    server: &mut SecAggServer,
    clients: &mut BTreeMap<u64, SecAggClient>,
    rng: &mut ChaCha20Rng,
) {
    for (from, shares) in answer_peer_keys(server, clients, rng) {
        server.handle(from, shares).unwrap();
    }
    server.advance().unwrap();
}

/// The survivor set is checked and signed once; the reveals follow from it,
/// so no request can ask for both share kinds of one peer.
#[test]
fn a_client_signs_one_survivor_set_and_reveals_by_it_alone() {
    let (mut server, mut clients, mut rng) = masked_client(6, 2);
    share_all(&mut server, &mut clients, &mut rng);
    let mut msgs = Vec::new();
    while let Some(m) = server.poll_transmit() {
        msgs.push(m);
    }
    let (to, SecAgg::PeerShares { shares, .. }) = msgs.remove(0) else {
        panic!()
    };
    let c = clients.get_mut(&to).unwrap();
    let senders: Vec<u64> = shares.iter().map(|s| s.peer).collect();
    let peer = senders[0];
    c.on_peer_shares(shares).unwrap();
    c.mask(&[0.0; 8], 10, 8).unwrap();
    let mut all: Vec<u64> = senders.iter().copied().chain([to]).collect();
    all.sort_unstable();
    // Not the one signed form of a set.
    let mut shuffled = all.clone();
    shuffled.reverse();
    assert_eq!(
        c.on_consistency_check(shuffled, None),
        Err(ClientError::MalformedSurvivors)
    );
    // A set without this client, which sent its input.
    let without_me: Vec<u64> = all.iter().copied().filter(|&i| i != to).collect();
    assert_eq!(
        c.on_consistency_check(without_me, None),
        Err(ClientError::NotASurvivor)
    );
    // Fewer inputs than the round may unmask together (t + 1 = 4).
    let mut too_few: Vec<u64> = all
        .iter()
        .copied()
        .filter(|&i| i == to || senders[..2].contains(&i))
        .collect();
    assert_eq!(
        c.on_consistency_check(too_few.clone(), None),
        Err(ClientError::TooFewInputs { have: 3, needed: 4 })
    );
    // Fewer surviving neighbours than the threshold (3), which an honest
    // server aborts on instead.
    let stranger = (1..=6).find(|i| *i != to && !senders.contains(i)).unwrap();
    too_few.push(stranger);
    too_few.sort_unstable();
    assert_eq!(
        c.on_consistency_check(too_few, None),
        Err(ClientError::TooFewSurvivors { have: 2, needed: 3 })
    );
    // `peer` dropped: its mask-key share is revealed, every other
    // neighbour's self-mask share, and nothing else.
    let survivors: Vec<u64> = all.iter().copied().filter(|&i| i != peer).collect();
    let signed = c.on_consistency_check(survivors.clone(), None).unwrap();
    assert!(matches!(signed, SecAgg::SurvivorsSigned { .. }));
    assert!(matches!(
        c.on_consistency_check(all.clone(), None),
        Err(ClientError::WrongStage { .. })
    ));
    let SecAgg::UnmaskShares {
        self_mask,
        mask_key,
        ..
    } = c.on_unmask_request(&[], None).unwrap()
    else {
        panic!("expected unmask shares")
    };
    let owners = |v: &[crate::wire::RevealedShare]| v.iter().map(|s| s.owner).collect::<Vec<_>>();
    assert_eq!(owners(&mask_key), vec![peer]);
    assert_eq!(owners(&self_mask), senders[1..].to_vec());
    // ... and only once.
    assert!(matches!(
        c.on_unmask_request(&[], None),
        Err(ClientError::WrongStage { .. })
    ));
}

#[test]
fn masked_input_looks_uniform() {
    // An all-zero update is as far from uniform as inputs get; after masking,
    // the top byte of each value must pass a chi-square test.
    let (mut server, mut clients, mut rng) = masked_client(5, 3);
    share_all(&mut server, &mut clients, &mut rng);
    let (to, SecAgg::PeerShares { shares, .. }) = server.poll_transmit().unwrap() else {
        panic!()
    };
    let c = clients.get_mut(&to).unwrap();
    c.on_peer_shares(shares).unwrap();
    let d = 200_000;
    let SecAgg::MaskedInput { masked, .. } = c.mask(&vec![0.0; d], 100, d).unwrap() else {
        panic!()
    };
    let mut buckets = [0f64; 256];
    for v in &masked[..d] {
        buckets[(v >> 24) as usize] += 1.0;
    }
    let expected = d as f64 / 256.0;
    let chi2: f64 = buckets
        .iter()
        .map(|&o| (o - expected).powi(2) / expected)
        .sum();
    // 255 degrees of freedom: the 99.9th percentile is about 330.
    assert!(chi2 < 330.0, "chi-square {chi2}");
    // Without masks every value would be the encoding of 0.
    let zero = params(5, 4, 3, 32).encoders().unwrap().0.encode(0.0);
    assert!(masked[..d].iter().filter(|&&v| v == zero).count() < 5);
}

#[test]
fn tampering_is_refused_with_specific_errors() {
    let (mut server, mut clients, mut rng) = masked_client(6, 4);
    // Replay: a message from an earlier round.
    let err = server
        .handle(
            1,
            SecAgg::Shares {
                round: 0,
                shares: vec![],
            },
        )
        .unwrap_err();
    assert_eq!(err.code, ReasonCode::StaleRound);
    let mut shares_of = answer_peer_keys(&mut server, &mut clients, &mut rng);
    // A share for a peer that is not a neighbour.
    let SecAgg::Shares { round, mut shares } = shares_of.remove(&1).unwrap() else {
        panic!()
    };
    let genuine = shares.clone();
    shares[0].peer = 999;
    let err = server
        .handle(1, SecAgg::Shares { round, shares })
        .unwrap_err();
    assert_eq!(err.code, ReasonCode::SecAggViolation);
    assert!(err.detail.contains("unknown peer 999"), "{}", err.detail);
    // Client 1 is out of this stage; a second try is refused too.
    assert!(
        server
            .handle(
                1,
                SecAgg::Shares {
                    round,
                    shares: genuine
                }
            )
            .is_err()
    );
    for (id, s) in shares_of {
        server.handle(id, s).unwrap();
    }
    server.advance().unwrap();
    let mut msgs = Vec::new();
    while let Some(m) = server.poll_transmit() {
        msgs.push(m);
    }
    // A bad AEAD tag: flip one ciphertext bit.
    let (to, SecAgg::PeerShares { mut shares, .. }) = msgs.remove(0) else {
        panic!()
    };
    let from = shares[0].peer;
    shares[0].ciphertext[3] ^= 1;
    let c = clients.get_mut(&to).unwrap();
    assert_eq!(c.on_peer_shares(shares), Err(ClientError::BadShare(from)));
    // A wrong-length masked input.
    let (to, SecAgg::PeerShares { shares, .. }) = msgs.remove(0) else {
        panic!()
    };
    let c = clients.get_mut(&to).unwrap();
    c.on_peer_shares(shares).unwrap();
    let SecAgg::MaskedInput { round, mut masked } = c.mask(&[0.5; 8], 3, 8).unwrap() else {
        panic!()
    };
    masked.pop();
    let err = server
        .handle(to, SecAgg::MaskedInput { round, masked })
        .unwrap_err();
    assert_eq!(err.code, ReasonCode::WrongLength);
    assert_eq!(server.stage(), Stage::MaskedInput);
    // A client cannot mask a NaN update.
    let (to, SecAgg::PeerShares { shares, .. }) = msgs.remove(0) else {
        panic!()
    };
    let c = clients.get_mut(&to).unwrap();
    c.on_peer_shares(shares).unwrap();
    assert_eq!(c.mask(&[f32::NAN; 8], 3, 8), Err(ClientError::NonFinite(0)));
}

/// What a deviating server could send to weaken one client's protection:
/// each setup is refused before the client makes a key.
#[test]
fn a_setup_that_would_not_protect_the_client_is_refused() {
    use super::client::SetupError;
    let ids: Vec<u64> = (1..=7).collect();
    let (_, setups) = SecAggServer::new(1, params(7, 4, 3, 32), &ids, 8, 5, DIGEST).unwrap();
    let (id, honest) = setups[0].clone();
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    assert!(SecAggClient::new(id, 1, &honest, DIGEST, &mut rng, None).is_ok());
    let refused = |tamper: &dyn Fn(&mut SecAggSetup)| {
        let mut setup = honest.clone();
        tamper(&mut setup);
        match SecAggClient::new(
            id,
            1,
            &setup,
            DIGEST,
            &mut ChaCha20Rng::seed_from_u64(1),
            None,
        ) {
            Err(ClientError::UnsafeSetup(why)) => why,
            Err(other) => panic!("expected an unsafe setup, got {other}"),
            Ok(_) => panic!("an unsafe setup was accepted: {setup:?}"),
        }
    };
    // One share would open the secrets: a single colluding neighbour.
    assert_eq!(
        refused(&|s| s.params.threshold = 1),
        SetupError::ThresholdBelowMinimum(1)
    );
    // Two halves of the neighbours could each meet the threshold.
    assert_eq!(
        refused(&|s| s.params.threshold = 2),
        SetupError::ThresholdTooLow { t: 2, k: 4 }
    );
    assert_eq!(
        refused(&|s| s.params.threshold = 5),
        SetupError::ThresholdAboveNeighbours { t: 5, k: 4 }
    );
    assert_eq!(
        refused(&|s| s.neighbours[0] = id),
        SetupError::SelfNeighbour
    );
    let twice = honest.neighbours[1];
    assert_eq!(
        refused(&|s| s.neighbours[0] = twice),
        SetupError::DuplicateNeighbour(twice)
    );
    assert!(matches!(
        refused(&|s| s.params.bits = 8),
        SetupError::Encoding(_)
    ));
}

/// A server that forwards fewer shares than the threshold (none at all,
/// say) would leave the input under its self mask alone, which the server
/// can then reconstruct: the client sends no masked input.
#[test]
fn a_client_with_fewer_shares_than_the_threshold_sends_no_masked_input() {
    let (mut server, mut clients, mut rng) = masked_client(6, 3);
    share_all(&mut server, &mut clients, &mut rng);
    let msgs: Vec<(u64, SecAgg)> = std::iter::from_fn(|| server.poll_transmit()).collect();
    let (to, SecAgg::PeerShares { mut shares, .. }) = msgs[0].clone() else {
        panic!("expected peer shares")
    };
    let c = clients.get_mut(&to).unwrap();
    shares.truncate(2);
    assert_eq!(
        c.on_peer_shares(shares),
        Err(ClientError::TooFewShares { have: 2, needed: 3 })
    );
    assert_eq!(
        c.on_peer_shares(Vec::new()),
        Err(ClientError::TooFewShares { have: 0, needed: 3 })
    );
    assert!(!c.ready_to_mask());
    assert!(matches!(
        c.mask(&[0.5; 8], 3, 8),
        Err(ClientError::WrongStage { .. })
    ));
}

/// The server forwards only well-formed shares, and only from a client
/// that shared with every neighbour whose keys it was sent.
#[test]
fn malformed_or_partial_shares_are_refused_before_they_are_forwarded() {
    let (mut server, mut clients, mut rng) = masked_client(6, 4);
    let mut shares_of = answer_peer_keys(&mut server, &mut clients, &mut rng);
    // A share of the wrong size is refused before it is forwarded.
    let SecAgg::Shares { round, mut shares } = shares_of.remove(&2).unwrap() else {
        panic!()
    };
    shares[1].ciphertext.push(0);
    let err = server
        .handle(2, SecAgg::Shares { round, shares })
        .unwrap_err();
    assert_eq!(err.code, ReasonCode::SecAggViolation);
    assert!(err.detail.contains("81 bytes"), "{}", err.detail);
    // Sharing with only some neighbours (still as many as the threshold)
    // would leave the others masking with fewer peers: refused.
    let SecAgg::Shares { round, mut shares } = shares_of.remove(&3).unwrap() else {
        panic!()
    };
    shares.pop();
    let err = server
        .handle(3, SecAgg::Shares { round, shares })
        .unwrap_err();
    assert_eq!(err.code, ReasonCode::SecAggViolation);
    assert!(
        err.detail.contains("shared with 3 of its 4"),
        "{}",
        err.detail
    );
}

/// A client that reveals a wrong share of a survivor's self-mask seed
/// (which no public key can check) is caught by the extra shares, and the
/// round aborts instead of unmasking a corrupted sum.
#[test]
fn a_wrong_revealed_share_is_detected_not_summed() {
    let (mut server, mut clients, mut rng) = masked_client(6, 8);
    share_all(&mut server, &mut clients, &mut rng);
    let msgs: Vec<(u64, SecAgg)> = std::iter::from_fn(|| server.poll_transmit()).collect();
    for (to, m) in msgs {
        let SecAgg::PeerShares { shares, .. } = m else {
            panic!("expected peer shares")
        };
        let c = clients.get_mut(&to).unwrap();
        c.on_peer_shares(shares).unwrap();
        let masked = c.mask(&[0.25; 8], 10, 8).unwrap();
        server.handle(to, masked).unwrap();
    }
    server.advance().unwrap();
    sign_all(&mut server, &mut clients, &BTreeMap::new());
    let msgs: Vec<(u64, SecAgg)> = std::iter::from_fn(|| server.poll_transmit()).collect();
    for (i, (to, m)) in msgs.into_iter().enumerate() {
        let SecAgg::UnmaskRequest { signatures, .. } = m else {
            panic!("expected an unmask request")
        };
        let mut reply = clients
            .get_mut(&to)
            .unwrap()
            .on_unmask_request(&signatures, None)
            .unwrap();
        if i == 0
            && let SecAgg::UnmaskShares { self_mask, .. } = &mut reply
        {
            self_mask[0].share[0] ^= 1;
        }
        server.handle(to, reply).unwrap();
    }
    match server.advance() {
        Err(Abort::Reconstruction { what, reason, .. }) => {
            assert_eq!(what, "self-mask seed");
            assert!(
                reason.contains("does not lie on the polynomial"),
                "{reason}"
            );
        }
        other => panic!("expected a detected bad share, got {other:?}"),
    }
}

/// Stands in for an enrolled identity: "signs" by attaching its
/// certificate bytes, and reads a peer's name from them.
#[derive(Debug)]
pub(crate) struct TagAttestor {
    pub(crate) name: String,
    pub(crate) certificate: Vec<u8>,
}

/// The test double's "signature": the certificate and a hash of the message.
fn tag(certificate: &[u8], message: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    let mut t = certificate.to_vec();
    t.extend_from_slice(&sha2::Sha256::digest(message));
    t
}

/// The server's side of the test double: a tag verifies when it is the
/// certificate and the message's hash.
#[derive(Debug)]
pub(crate) struct TagCheck;

impl crate::secagg::SignatureCheck for TagCheck {
    fn verify(&self, certificate: &[u8], message: &[u8], signature: &[u8]) -> bool {
        signature == tag(certificate, message)
    }
}

impl crate::secagg::KeyAttestor for TagAttestor {
    fn attest(&self, round: u64, keys: &crate::wire::PeerKeys) -> crate::wire::KeyAttestation {
        crate::wire::KeyAttestation {
            certificate: self.certificate.clone(),
            signature: tag(&self.certificate, &crate::secagg::keys_message(round, keys)),
        }
    }
    fn verify(
        &self,
        _round: u64,
        keys: &crate::wire::PeerKeys,
    ) -> Result<String, crate::secagg::AttestationError> {
        use crate::secagg::AttestationError;
        let att = keys
            .attestation
            .as_ref()
            .ok_or(AttestationError::Unsigned)?;
        String::from_utf8(att.certificate.clone())
            .map_err(|e| AttestationError::Certificate(e.to_string()))
    }
    fn sign_survivors(&self, message: &[u8]) -> Vec<u8> {
        tag(&self.certificate, message)
    }
    fn verify_survivors(
        &self,
        certificate: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), crate::secagg::AttestationError> {
        if signature == tag(certificate, message) {
            Ok(())
        } else {
            Err(crate::secagg::AttestationError::BadSignature(
                String::from_utf8_lossy(certificate).into_owned(),
            ))
        }
    }
    fn identity(&self) -> &str {
        &self.name
    }
}

/// Every client answers the consistency check the server sent it (with its
/// attestor, if it has one); the server moves on to the unmask requests.
fn sign_all(
    server: &mut SecAggServer,
    clients: &mut BTreeMap<u64, SecAggClient>,
    attestors: &BTreeMap<u64, TagAttestor>,
) {
    let msgs: Vec<(u64, SecAgg)> = std::iter::from_fn(|| server.poll_transmit()).collect();
    for (to, m) in msgs {
        let SecAgg::ConsistencyCheck { survivors, .. } = m else {
            panic!("expected a consistency check")
        };
        let a = attestors.get(&to).map(|a| a as &dyn KeyAttestor);
        let signed = clients
            .get_mut(&to)
            .unwrap()
            .on_consistency_check(survivors, a)
            .unwrap();
        server.handle(to, signed).unwrap();
    }
    server.advance().unwrap();
}

fn tag_attestor(id: u64) -> TagAttestor {
    TagAttestor {
        name: format!("node-{id}"),
        certificate: format!("node-{id}").into_bytes(),
    }
}

/// `n` clients with identities through the masked input (k = 4, t = 3);
/// the server's consistency checks are queued.
fn attested_masked(
    n: u64,
) -> (
    SecAggServer,
    BTreeMap<u64, SecAggClient>,
    BTreeMap<u64, TagAttestor>,
) {
    let ids: Vec<u64> = (1..=n).collect();
    let mut rng = ChaCha20Rng::seed_from_u64(n);
    let (mut server, setups) =
        SecAggServer::new(1, params(n as usize, 4, 3, 32), &ids, 8, 3, DIGEST).unwrap();
    let attestors: BTreeMap<u64, TagAttestor> = ids.iter().map(|&i| (i, tag_attestor(i))).collect();
    let mut clients = BTreeMap::new();
    for (id, s) in &setups {
        let (c, adv) =
            SecAggClient::new(*id, 1, s, DIGEST, &mut rng, Some(&attestors[id])).unwrap();
        server.handle(*id, adv).unwrap();
        clients.insert(*id, c);
    }
    server.advance().unwrap();
    let msgs: Vec<(u64, SecAgg)> = std::iter::from_fn(|| server.poll_transmit()).collect();
    for (to, m) in msgs {
        let SecAgg::PeerKeys { peers, .. } = m else {
            panic!("expected peer keys")
        };
        let a = &attestors[&to];
        let shares = clients
            .get_mut(&to)
            .unwrap()
            .on_peer_keys(peers, &mut rng, Some(a))
            .unwrap();
        server.handle(to, shares).unwrap();
    }
    server.advance().unwrap();
    let msgs: Vec<(u64, SecAgg)> = std::iter::from_fn(|| server.poll_transmit()).collect();
    for (to, m) in msgs {
        let SecAgg::PeerShares { shares, .. } = m else {
            panic!("expected peer shares")
        };
        let c = clients.get_mut(&to).unwrap();
        c.on_peer_shares(shares).unwrap();
        server
            .handle(to, c.mask(&[0.5; 8], 10, 8).unwrap())
            .unwrap();
    }
    server.advance().unwrap();
    (server, clients, attestors)
}

/// Bonawitz et al.'s consistency check: a deviating server that tells one
/// client that a neighbour dropped (to collect that neighbour's mask key
/// from it while the others reveal its self mask) cannot show that client
/// t neighbours' signatures over the set it signed, and the client
/// reveals nothing. The honest view goes on.
#[test]
fn a_client_told_another_survivor_set_than_its_neighbours_reveals_nothing() {
    let (mut server, mut clients, attestors) = attested_masked(6);
    let checks: Vec<(u64, SecAgg)> = std::iter::from_fn(|| server.poll_transmit()).collect();
    let victim = checks[0].0;
    for (to, m) in checks {
        let SecAgg::ConsistencyCheck { mut survivors, .. } = m else {
            panic!("expected a consistency check")
        };
        if to == victim {
            let target = *survivors.iter().find(|&&i| i != victim).unwrap();
            survivors.retain(|&i| i != target);
        }
        let signed = clients
            .get_mut(&to)
            .unwrap()
            .on_consistency_check(survivors, Some(&attestors[&to]))
            .unwrap();
        server.handle(to, signed).unwrap();
    }
    server.advance().unwrap();
    let requests: Vec<(u64, SecAgg)> = std::iter::from_fn(|| server.poll_transmit()).collect();
    assert_eq!(requests.len(), 6);
    for (to, m) in requests {
        let SecAgg::UnmaskRequest { signatures, .. } = m else {
            panic!("expected an unmask request")
        };
        let reply = clients
            .get_mut(&to)
            .unwrap()
            .on_unmask_request(&signatures, Some(&attestors[&to]));
        if to == victim {
            assert_eq!(
                reply,
                Err(ClientError::TooFewSignatures {
                    valid: 0,
                    needed: 3
                })
            );
        } else {
            // Each has 4 neighbours; only the victim's signature (if it is
            // one of them) is over another set.
            assert!(reply.is_ok(), "client {to}: {reply:?}");
        }
    }
}

/// Signatures the server made up, or a neighbour's replayed from another
/// signer, do not count.
#[test]
fn forged_or_misattributed_survivor_signatures_do_not_count() {
    let (mut server, mut clients, attestors) = attested_masked(6);
    sign_all(&mut server, &mut clients, &attestors);
    let (to, SecAgg::UnmaskRequest { mut signatures, .. }) = server.poll_transmit().unwrap() else {
        panic!("expected an unmask request")
    };
    // One garbage signature, one neighbour's signature passed off as
    // another's: 2 of 4 left, below t = 3.
    signatures[0].signature = vec![0; 70];
    let moved = signatures[1].signature.clone();
    signatures[2].signature = moved;
    let reply = clients
        .get_mut(&to)
        .unwrap()
        .on_unmask_request(&signatures, Some(&attestors[&to]));
    assert_eq!(
        reply,
        Err(ClientError::TooFewSignatures {
            valid: 2,
            needed: 3
        })
    );
}

/// Pasquini et al.: a server that sends one client another model (or
/// round config) is found out by its neighbours, who refuse its keys; an
/// honest server refuses such keys itself before forwarding them.
#[test]
fn keys_made_for_another_model_are_refused_by_peers_and_server() {
    let ids: Vec<u64> = (1..=5).collect();
    let mut rng = ChaCha20Rng::seed_from_u64(4);
    let (mut server, setups) =
        SecAggServer::new(1, params(5, 4, 3, 32), &ids, 8, 3, DIGEST).unwrap();
    let mut advs = BTreeMap::new();
    let mut clients = BTreeMap::new();
    for (id, s) in &setups {
        // Client 5 was sent a model of its own.
        let digest = if *id == 5 { [8; 32] } else { DIGEST };
        let (c, adv) = SecAggClient::new(*id, 1, s, digest, &mut rng, None).unwrap();
        advs.insert(*id, adv);
        clients.insert(*id, c);
    }
    let keys = |id: u64| match &advs[&id] {
        SecAgg::AdvertiseKeys { keys, .. } => keys.clone(),
        _ => unreachable!(),
    };
    let err = server.handle(5, advs[&5].clone()).unwrap_err();
    assert_eq!(err.code, ReasonCode::SecAggViolation);
    assert!(err.detail.contains("another model"), "{}", err.detail);
    // A deviating server forwards them anyway: the neighbour refuses.
    let peers: Vec<_> = [2, 3, 4, 5].into_iter().map(keys).collect();
    assert!(matches!(
        clients
            .get_mut(&1)
            .unwrap()
            .on_peer_keys(peers, &mut rng, None),
        Err(ClientError::RoundMismatch(5))
    ));
}

/// A neighbour list longer than the stated degree is refused.
#[test]
fn more_neighbours_than_the_degree_is_an_unsafe_setup() {
    let setup = SecAggSetup {
        params: params(9, 4, 3, 32),
        neighbours: vec![2, 3, 4, 5, 6],
    };
    let got = SecAggClient::new(
        1,
        1,
        &setup,
        DIGEST,
        &mut ChaCha20Rng::seed_from_u64(1),
        None,
    )
    .err();
    assert_eq!(
        got,
        Some(ClientError::UnsafeSetup(
            super::client::SetupError::AboveDegree { k: 5, degree: 4 }
        ))
    );
}
