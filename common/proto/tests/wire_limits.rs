//! The codec against hostile bytes: arbitrary input split arbitrarily,
//! every length of every message kind forged, and payloads that never
//! arrive. A counting allocator measures what each decode allocates, so a
//! claimed length that reserves memory by itself fails here (this test
//! binary has its own global allocator; the crate's unit tests do not).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use fedveil_proto::dp::DpRound;
use fedveil_proto::wire::codec::{FRAME_PREFIX_LEN, HEADER_BYTES_CEILING};
use fedveil_proto::wire::*;
use proptest::prelude::*;

// ---------------------------------------------------------------------------
// Measuring allocations

/// Counts the bytes live on the current thread and their peak.
struct Counting;

thread_local! {
    static LIVE: Cell<i64> = const { Cell::new(0) };
    static PEAK: Cell<i64> = const { Cell::new(0) };
}

fn note(delta: i64) {
    // `try_with`: allocations during thread teardown are not counted.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call forwards to `System` unchanged; only counters change.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            note(layout.size() as i64);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            note(layout.size() as i64);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        note(-(layout.size() as i64));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // The old and the new block may both exist for a moment.
            note(new_size as i64);
            note(-(layout.size() as i64));
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result and the most bytes it had allocated at
/// any one time (beyond what was live before).
fn peak_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    let peak = PEAK.with(Cell::get) - base;
    (out, peak.max(0) as usize)
}

/// The most a decode of `fed` bytes may allocate: a small constant (a
/// sequence's first reservation) plus a multiple of the bytes it was given.
/// Decoded values take more memory than their encoding (a `Message` is
/// larger than the smallest frame; vectors grow by doubling), hence the
/// factor; what it excludes is memory out of proportion to the input, such
/// as a claimed length taken at its word.
fn allowance(fed: usize) -> usize {
    16 * 1024 + 16 * fed
}

// ---------------------------------------------------------------------------
// Messages of every kind

/// Every message kind, by name. `kind_of` below names each with an
/// exhaustive match, so a new variant does not compile until it is
/// covered here.
const KINDS: [&str; 20] = [
    "hello",
    "welcome",
    "round-start",
    "update",
    "evaluation",
    "error",
    "goodbye",
    "secagg-setup",
    "secagg-advertise-keys",
    "secagg-peer-keys",
    "secagg-shares",
    "secagg-peer-shares",
    "secagg-masked-input",
    "secagg-consistency-check",
    "secagg-survivors-signed",
    "secagg-unmask-request",
    "secagg-unmask-shares",
    "enrol-request",
    "renew-request",
    "enrolled",
];

/// An exhaustive match over the message kinds (no wildcard arm).
fn kind_of(m: &Message) -> &'static str {
    match m {
        Message::Hello(_) => "hello",
        Message::Welcome(_) => "welcome",
        Message::RoundStart(_) => "round-start",
        Message::Update(_) => "update",
        Message::Evaluation(_) => "evaluation",
        Message::Error(_) => "error",
        Message::Goodbye(_) => "goodbye",
        Message::SecAgg(s) => match s {
            SecAgg::Setup { .. } => "secagg-setup",
            SecAgg::AdvertiseKeys { .. } => "secagg-advertise-keys",
            SecAgg::PeerKeys { .. } => "secagg-peer-keys",
            SecAgg::Shares { .. } => "secagg-shares",
            SecAgg::PeerShares { .. } => "secagg-peer-shares",
            SecAgg::MaskedInput { .. } => "secagg-masked-input",
            SecAgg::ConsistencyCheck { .. } => "secagg-consistency-check",
            SecAgg::SurvivorsSigned { .. } => "secagg-survivors-signed",
            SecAgg::UnmaskRequest { .. } => "secagg-unmask-request",
            SecAgg::UnmaskShares { .. } => "secagg-unmask-shares",
        },
        Message::EnrolRequest(_) => "enrol-request",
        Message::RenewRequest(_) => "renew-request",
        Message::Enrolled(_) => "enrolled",
    }
}

const REASONS: [ReasonCode; 30] = [
    ReasonCode::VersionMismatch,
    ReasonCode::ModelMismatch,
    ReasonCode::MalformedFrame,
    ReasonCode::FrameTooLarge,
    ReasonCode::UnexpectedMessage,
    ReasonCode::StaleRound,
    ReasonCode::DuplicateUpdate,
    ReasonCode::WrongLength,
    ReasonCode::NonFinite,
    ReasonCode::BadWeight,
    ReasonCode::NotInCohort,
    ReasonCode::ServerFull,
    ReasonCode::Shutdown,
    ReasonCode::SecAggViolation,
    ReasonCode::TokenUnknown,
    ReasonCode::TokenUsed,
    ReasonCode::TokenExpired,
    ReasonCode::TokenNameMismatch,
    ReasonCode::NameTaken,
    ReasonCode::BadCsr,
    ReasonCode::NotEnrolled,
    ReasonCode::Revoked,
    ReasonCode::IdentityMismatch,
    ReasonCode::AlreadyConnected,
    ReasonCode::EnrolmentDisabled,
    ReasonCode::DataMismatch,
    ReasonCode::Internal,
    ReasonCode::LeftRound,
    ReasonCode::BudgetSpent,
    ReasonCode::RenewalTooEarly,
];

fn text() -> impl Strategy<Value = String> {
    // Multi-byte characters included: lengths are in bytes.
    "[a-zA-Z0-9 _.ä€-]{0,40}"
}

fn data_spec() -> impl Strategy<Value = DataSpec> {
    (
        prop::collection::vec(any::<u32>(), 0..4),
        any::<u32>(),
        prop::collection::vec(text().prop_map(ClassName), 0..4),
        any::<u32>(),
    )
        .prop_map(
            |(example_shape, num_classes, class_names, vocab_size)| DataSpec {
                example_shape,
                num_classes,
                class_names,
                vocab_size,
            },
        )
}

fn blob() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..200)
}

fn ids() -> impl Strategy<Value = Vec<u64>> {
    prop::collection::vec(any::<u64>(), 0..20)
}

fn spec() -> impl Strategy<Value = ModelSpec> {
    (text(), any::<u64>(), any::<[u8; 32]>()).prop_map(|(name, param_count, shape_signature)| {
        ModelSpec {
            name,
            param_count,
            shape_signature,
        }
    })
}

fn dp_round() -> impl Strategy<Value = Option<DpRound>> {
    let f = any::<f64>;
    prop_oneof![
        Just(None),
        (f(), any::<bool>()).prop_map(|(clip_norm, clip_indicator)| Some(DpRound::Central {
            clip_norm,
            clip_indicator
        })),
        (f(), f()).prop_map(|(clip_norm, noise_std)| Some(DpRound::Local {
            clip_norm,
            noise_std
        })),
        (f(), f(), f(), f(), prop::option::of(f())).prop_map(|(a, b, c, d, e)| Some(
            DpRound::Distributed {
                clip_norm: a,
                granularity: b,
                rounded_norm: c,
                skellam_mu: d,
                indicator_mu: e,
            }
        )),
    ]
}

fn round_config() -> impl Strategy<Value = RoundConfig> {
    (
        (any::<u32>(), any::<u32>(), prop::option::of(any::<u32>())),
        (any::<f32>(), any::<u64>(), any::<bool>()),
        (dp_round(), any::<f32>(), any::<bool>()),
    )
        .prop_map(
            |((e, b, steps), (lr, seed, secure), (dp, mu, adam))| RoundConfig {
                local_epochs: e,
                batch_size: b,
                max_local_steps: steps,
                learning_rate: lr,
                seed,
                secure_aggregation: secure,
                dp,
                prox_mu: mu,
                local_optimizer: if adam {
                    LocalOptimizer::Adam
                } else {
                    LocalOptimizer::Sgd
                },
            },
        )
}

fn peer_keys() -> impl Strategy<Value = PeerKeys> {
    (
        any::<u64>(),
        any::<[u8; 32]>(),
        any::<[u8; 32]>(),
        any::<[u8; 32]>(),
        prop::option::of((blob(), blob())),
    )
        .prop_map(|(id, enc_pk, mask_pk, round_digest, att)| PeerKeys {
            id,
            enc_pk,
            mask_pk,
            round_digest,
            attestation: att.map(|(certificate, signature)| KeyAttestation {
                certificate,
                signature,
            }),
        })
}

fn shares() -> impl Strategy<Value = Vec<EncryptedShare>> {
    prop::collection::vec(
        (any::<u64>(), blob()).prop_map(|(peer, ciphertext)| EncryptedShare { peer, ciphertext }),
        0..8,
    )
}

fn revealed() -> impl Strategy<Value = Vec<RevealedShare>> {
    prop::collection::vec(
        (any::<u64>(), any::<[u8; 32]>()).prop_map(|(owner, share)| RevealedShare { owner, share }),
        0..8,
    )
}

fn floats() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(any::<f32>(), 0..64)
}

fn secagg() -> impl Strategy<Value = SecAgg> {
    let r = any::<u64>;
    let params = (
        (any::<u32>(), any::<u32>(), any::<u32>(), any::<f32>()),
        (any::<u64>(), any::<u32>(), any::<u32>()),
    )
        .prop_map(
            |((threshold, degree, bits, clip), (max_weight, max_cohort, min_survivors))| {
                SecAggParams {
                    threshold,
                    degree,
                    bits,
                    clip,
                    max_weight,
                    max_cohort,
                    min_survivors,
                }
            },
        );
    prop_oneof![
        (r(), params, ids()).prop_map(|(round, params, neighbours)| SecAgg::Setup {
            round,
            setup: SecAggSetup { params, neighbours }
        }),
        (r(), peer_keys()).prop_map(|(round, keys)| SecAgg::AdvertiseKeys { round, keys }),
        (r(), prop::collection::vec(peer_keys(), 0..5))
            .prop_map(|(round, peers)| SecAgg::PeerKeys { round, peers }),
        (r(), shares()).prop_map(|(round, shares)| SecAgg::Shares { round, shares }),
        (r(), shares()).prop_map(|(round, shares)| SecAgg::PeerShares { round, shares }),
        (r(), prop::collection::vec(any::<u32>(), 0..64))
            .prop_map(|(round, masked)| SecAgg::MaskedInput { round, masked }),
        (r(), ids()).prop_map(|(round, survivors)| SecAgg::ConsistencyCheck { round, survivors }),
        (r(), blob()).prop_map(|(round, signature)| SecAgg::SurvivorsSigned { round, signature }),
        (
            r(),
            prop::collection::vec(
                (any::<u64>(), blob())
                    .prop_map(|(signer, signature)| SurvivorSignature { signer, signature }),
                0..5
            )
        )
            .prop_map(|(round, signatures)| SecAgg::UnmaskRequest { round, signatures }),
        (r(), revealed(), revealed()).prop_map(|(round, self_mask, mask_key)| {
            SecAgg::UnmaskShares {
                round,
                self_mask,
                mask_key,
            }
        }),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    let v = any::<u16>;
    prop_oneof![
        (v(), text(), spec(), any::<u64>(), data_spec()).prop_map(
            |(version, node_name, model, n, data)| {
                Message::Hello(Hello {
                    version,
                    node_name,
                    model,
                    num_examples: n,
                    data,
                })
            }
        ),
        (v(), any::<u64>(), spec()).prop_map(|(version, client_id, model)| Message::Welcome(
            Welcome {
                version,
                client_id,
                model
            }
        )),
        (any::<u64>(), round_config(), floats()).prop_map(|(round, config, global_model)| {
            Message::RoundStart(RoundStart {
                round,
                config,
                global_model,
            })
        }),
        (any::<u64>(), any::<u64>(), any::<f32>(), floats()).prop_map(|(round, n, loss, delta)| {
            Message::Update(Update {
                round,
                num_examples: n,
                train_loss: loss,
                delta,
            })
        }),
        (
            any::<u64>(),
            any::<u64>(),
            any::<f32>(),
            any::<(Option<f32>, Option<f32>, Option<f32>)>()
        )
            .prop_map(|(round, n, l, (accuracy, mse, mae))| {
                Message::Evaluation(Evaluation {
                    round,
                    num_examples: n,
                    loss: l,
                    scores: fedveil_proto::metrics::TaskScores { accuracy, mse, mae },
                })
            }),
        (0..REASONS.len(), text()).prop_map(|(i, detail)| Message::error(REASONS[i], detail)),
        (any::<u64>(), text()).prop_map(|(rounds_completed, reason)| Message::Goodbye(Goodbye {
            rounds_completed,
            reason
        })),
        secagg().prop_map(Message::SecAgg),
        (v(), text(), prop::option::of(text()), blob()).prop_map(|(version, token, name, csr)| {
            Message::EnrolRequest(EnrolRequest {
                version,
                token,
                node_name: name,
                csr,
            })
        }),
        (v(), blob())
            .prop_map(|(version, csr)| Message::RenewRequest(RenewRequest { version, csr })),
        (blob(), blob()).prop_map(|(certificate, ca_certificate)| Message::Enrolled(Enrolled {
            certificate,
            ca_certificate
        })),
    ]
}

/// A message's frame; encoding is injective, so equal frames mean equal
/// messages, bit for bit (NaNs included, which `PartialEq` cannot say).
fn frame(m: &Message) -> Vec<u8> {
    encode(m).expect("encodable").to_vec()
}

/// Everything a decoder makes of `chunks`: the frames of the messages it
/// returned, then how it ended.
type Outcome = (Vec<Vec<u8>>, Result<(), CodecError>);

fn decode_chunks<'a>(limits: FrameLimits, chunks: impl IntoIterator<Item = &'a [u8]>) -> Outcome {
    let mut decoder = FrameDecoder::new(limits);
    let mut frames = Vec::new();
    for chunk in chunks {
        match decoder.push(chunk) {
            Ok(msgs) => frames.extend(msgs.iter().map(frame)),
            Err(err) => return (frames, Err(err)),
        }
    }
    let end = decoder.finish();
    (frames, end)
}

/// Splits `bytes` at the cut points (taken modulo its length).
fn split<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts
        .iter()
        .map(|c| c % (bytes.len() + 1))
        .chain([0, bytes.len()])
        .collect();
    at.sort_unstable();
    at.dedup();
    at.windows(2).map(|w| &bytes[w[0]..w[1]]).collect()
}

// ---------------------------------------------------------------------------
// Hostile input

/// Bytes worth decoding: noise; a valid prefix with random lengths and
/// noise after it; valid frames with bytes overwritten.
fn hostile_bytes() -> impl Strategy<Value = Vec<u8>> {
    let noise = prop::collection::vec(any::<u8>(), 0..600);
    let prefixed = (
        prop_oneof![Just(PROTOCOL_VERSION), any::<u16>()],
        prop_oneof![0u32..300, any::<u32>()],
        prop_oneof![0u64..300, any::<u64>()],
        prop::collection::vec(any::<u8>(), 0..600),
    )
        .prop_map(|(version, header_len, payload_len, rest)| {
            let mut b = b"FVL\0".to_vec();
            b.extend_from_slice(&version.to_le_bytes());
            b.extend_from_slice(&header_len.to_le_bytes());
            b.extend_from_slice(&payload_len.to_le_bytes());
            b.extend_from_slice(&rest);
            b
        });
    let mutated = (
        prop::collection::vec(message(), 1..4),
        prop::collection::vec((any::<usize>(), any::<u64>(), 1usize..=8), 0..6),
    )
        .prop_map(|(msgs, edits)| {
            let mut b: Vec<u8> = msgs.iter().flat_map(frame).collect();
            for (at, value, width) in edits {
                let at = at % b.len();
                let end = (at + width).min(b.len());
                b[at..end].copy_from_slice(&value.to_le_bytes()[..end - at]);
            }
            b
        });
    prop_oneof![noise, prefixed, mutated]
}

fn limits() -> impl Strategy<Value = FrameLimits> {
    prop_oneof![
        Just(FrameLimits::default()),
        Just(FrameLimits::enrolment()),
        Just(FrameLimits::for_model(40)),
        (0u32..400, 0u64..400).prop_map(|(h, p)| FrameLimits {
            max_header_bytes: h,
            max_payload_bytes: p,
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever the bytes and however they are split, the decoder does not
    /// panic, allocates in proportion to what it was given, and reaches the
    /// same outcome as when given everything at once, which `decode_one`
    /// agrees with.
    #[test]
    fn arbitrary_bytes_in_arbitrary_chunks(
        bytes in hostile_bytes(),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
        limits in limits(),
    ) {
        let chunks = split(&bytes, &cuts);
        let (chunked, peak) = peak_allocation(|| decode_chunks(limits, chunks.iter().copied()));
        prop_assert!(
            peak <= allowance(bytes.len()),
            "decoding {} bytes allocated {peak} bytes at once", bytes.len()
        );
        let whole = decode_chunks(limits, [bytes.as_slice()]);
        prop_assert_eq!(&chunked, &whole);
        let one = decode_one(&bytes, limits);
        match (&one, &whole) {
            (Ok(m), (frames, Ok(()))) => prop_assert_eq!(frames, &vec![frame(m)]),
            (Err(a), (frames, Ok(()))) => {
                prop_assert_ne!(frames.len(), 1);
                prop_assert_eq!(a, &CodecError::FrameCount(frames.len()));
            }
            (Ok(_), (_, Err(_))) => prop_assert!(false, "decode_one accepted a broken stream"),
            (Err(a), (_, Err(b))) => prop_assert_eq!(a, b),
        }
    }

    /// Every message kind survives encoding and decoding bit for bit, alone
    /// and in a stream split anywhere.
    #[test]
    fn every_message_kind_round_trips(
        msgs in prop::collection::vec(message(), 1..5),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        for m in &msgs {
            let bytes = frame(m);
            let back = decode_one(&bytes, FrameLimits::default()).expect("decodes");
            prop_assert_eq!(kind_of(&back), kind_of(m));
            prop_assert_eq!(&frame(&back), &bytes);
            // Any strict prefix of a frame is a truncated frame.
            let cut = cuts.first().map_or(1, |c| 1 + c % (bytes.len() - 1));
            prop_assert_eq!(
                decode_one(&bytes[..cut], FrameLimits::default()),
                Err(CodecError::Truncated { buffered: cut })
            );
        }
        let stream: Vec<u8> = msgs.iter().flat_map(frame).collect();
        let (frames, end) = decode_chunks(FrameLimits::default(), split(&stream, &cuts));
        prop_assert_eq!(end, Ok(()));
        prop_assert_eq!(frames, msgs.iter().map(frame).collect::<Vec<_>>());
    }
}

#[test]
fn the_strategy_covers_every_message_kind() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let kinds: std::collections::BTreeSet<&str> = KINDS.into_iter().collect();
    let mut runner = TestRunner::deterministic();
    let strategy = message();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..5_000 {
        seen.insert(kind_of(&strategy.new_tree(&mut runner).unwrap().current()));
    }
    assert_eq!(seen, kinds);
    // `kind_of` agrees with the crate's own names.
    for _ in 0..500 {
        let m = strategy.new_tree(&mut runner).unwrap().current();
        assert_eq!(kind_of(&m), m.kind());
    }
}

// ---------------------------------------------------------------------------
// Forged lengths

/// One message of each kind, with every string, byte string and list
/// non-empty, so every length field is there to forge.
fn one_of_each() -> Vec<Message> {
    let spec = ModelSpec {
        name: "cnn".into(),
        param_count: 3,
        shape_signature: [9; 32],
    };
    let keys = PeerKeys {
        id: 3,
        enc_pk: [1; 32],
        mask_pk: [2; 32],
        round_digest: [3; 32],
        attestation: Some(KeyAttestation {
            certificate: vec![7; 20],
            signature: vec![8; 10],
        }),
    };
    let share = EncryptedShare {
        peer: 4,
        ciphertext: vec![5; 12],
    };
    let revealed = RevealedShare {
        owner: 4,
        share: [6; 32],
    };
    let params = SecAggParams {
        threshold: 2,
        degree: 3,
        bits: 32,
        clip: 1.0,
        max_weight: 100,
        max_cohort: 10,
        min_survivors: 0,
    };
    let config = RoundConfig {
        local_epochs: 1,
        batch_size: 10,
        max_local_steps: Some(5),
        learning_rate: 0.1,
        seed: 1,
        secure_aggregation: true,
        dp: Some(DpRound::Distributed {
            clip_norm: 1.0,
            granularity: 0.1,
            rounded_norm: 3.0,
            skellam_mu: 2.0,
            indicator_mu: Some(1.0),
        }),
        prox_mu: 0.0,
        local_optimizer: LocalOptimizer::Sgd,
    };
    let msgs = vec![
        Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            node_name: "node-a".into(),
            model: spec.clone(),
            num_examples: 10,
            data: DataSpec::default(),
        }),
        Message::Welcome(Welcome {
            version: PROTOCOL_VERSION,
            client_id: 1,
            model: spec,
        }),
        Message::RoundStart(RoundStart {
            round: 1,
            config,
            global_model: vec![1.0, 2.0, 3.0],
        }),
        Message::Update(Update {
            round: 1,
            num_examples: 5,
            train_loss: 0.5,
            delta: vec![0.5; 3],
        }),
        Message::Evaluation(Evaluation {
            round: 1,
            num_examples: 5,
            loss: 0.5,
            scores: fedveil_proto::metrics::TaskScores::classification(0.5),
        }),
        Message::error(ReasonCode::Internal, "detail"),
        Message::Goodbye(Goodbye {
            rounds_completed: 2,
            reason: "done".into(),
        }),
        Message::SecAgg(SecAgg::Setup {
            round: 1,
            setup: SecAggSetup {
                params,
                neighbours: vec![1, 2, 3],
            },
        }),
        Message::SecAgg(SecAgg::AdvertiseKeys {
            round: 1,
            keys: keys.clone(),
        }),
        Message::SecAgg(SecAgg::PeerKeys {
            round: 1,
            peers: vec![keys.clone(), keys],
        }),
        Message::SecAgg(SecAgg::Shares {
            round: 1,
            shares: vec![share.clone(), share.clone()],
        }),
        Message::SecAgg(SecAgg::PeerShares {
            round: 1,
            shares: vec![share],
        }),
        Message::SecAgg(SecAgg::MaskedInput {
            round: 1,
            masked: vec![1, 2, 3],
        }),
        Message::SecAgg(SecAgg::ConsistencyCheck {
            round: 1,
            survivors: vec![1, 2],
        }),
        Message::SecAgg(SecAgg::SurvivorsSigned {
            round: 1,
            signature: vec![4; 70],
        }),
        Message::SecAgg(SecAgg::UnmaskRequest {
            round: 1,
            signatures: vec![
                SurvivorSignature {
                    signer: 1,
                    signature: vec![4; 70],
                },
                SurvivorSignature {
                    signer: 2,
                    signature: vec![5; 70],
                },
            ],
        }),
        Message::SecAgg(SecAgg::UnmaskShares {
            round: 1,
            self_mask: vec![revealed, revealed],
            mask_key: vec![revealed],
        }),
        Message::EnrolRequest(EnrolRequest {
            version: PROTOCOL_VERSION,
            token: "ab".repeat(32),
            node_name: Some("alpha".into()),
            csr: vec![0x30; 40],
        }),
        Message::RenewRequest(RenewRequest {
            version: PROTOCOL_VERSION,
            csr: vec![0x30; 40],
        }),
        Message::Enrolled(Enrolled {
            certificate: vec![0x30; 40],
            ca_certificate: vec![0x30; 40],
        }),
    ];
    let kinds: Vec<&str> = msgs.iter().map(kind_of).collect();
    assert_eq!(kinds, KINDS);
    msgs
}

/// Overwrites each 8-byte window of each header with lengths a forger
/// would claim. In fixed-int mode every length is a `u64`, so each length
/// field of each kind is hit; whatever the decoder makes of it, it must
/// not allocate for the claim.
#[test]
fn no_forged_length_in_any_message_allocates() {
    let mut forged = 0usize;
    for m in one_of_each() {
        let bytes = frame(&m);
        let payload_at = bytes.len()
            - m.payload().map_or(0, |p| match p {
                Payload::F32(v) => v.len() * 4,
                Payload::U32(v) => v.len() * 4,
            });
        for at in FRAME_PREFIX_LEN..payload_at.saturating_sub(7) {
            let remaining = (payload_at - at - 8) as u64;
            for claim in [
                1 << 50,
                u64::MAX,
                1 << 31,
                1 << 20,
                remaining + 1,
                remaining + 4096,
            ] {
                let mut b = bytes.clone();
                b[at..at + 8].copy_from_slice(&claim.to_le_bytes());
                let (result, peak) =
                    peak_allocation(|| decode_one(&b, FrameLimits::default()).map(|_| ()));
                assert!(
                    peak <= allowance(b.len()),
                    "{}: a claim of {claim} at byte {at} allocated {peak} bytes ({result:?})",
                    m.kind()
                );
                forged += 1;
            }
        }
    }
    assert!(forged > 1000, "{forged} forgeries");
}

/// The frame from the report: an enrolment request whose token claims
/// 2^50 bytes, 32 bytes in all. It aborted the server. It was sent in
/// protocol version 4; a current peer refuses that version outright, and
/// the same frame in the current version fails on its header.
#[test]
fn the_reported_32_byte_frame_is_an_error_not_an_allocation() {
    let hex = "46564c00 0400 0e000000 0000000000000000 08000000 0400 0000000000000400";
    let mut bytes: Vec<u8> = hex
        .split_whitespace()
        .flat_map(|group| {
            (0..group.len())
                .step_by(2)
                .map(move |i| u8::from_str_radix(&group[i..i + 2], 16).unwrap())
        })
        .collect();
    assert_eq!(bytes.len(), 32);
    assert_eq!(
        decode_one(&bytes, FrameLimits::enrolment()),
        Err(CodecError::UnsupportedVersion { got: 4 })
    );
    bytes[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    for limits in [FrameLimits::enrolment(), FrameLimits::default()] {
        let (result, peak) = peak_allocation(|| decode_one(&bytes, limits));
        assert_eq!(result, Err(CodecError::HeaderOverrun { header_len: 14 }));
        assert_eq!(result.unwrap_err().reason(), ReasonCode::MalformedFrame);
        assert!(peak < 4096, "allocated {peak} bytes");
    }
}

/// A frame may claim the largest payload its limits allow and then send
/// almost nothing: the decoder holds what arrived, not what was claimed.
#[test]
fn a_claimed_payload_is_not_reserved_before_it_arrives() {
    let limits = FrameLimits::default();
    let mut head = encode(&Message::Update(Update {
        round: 1,
        num_examples: 1,
        train_loss: 0.0,
        delta: Vec::new(),
    }))
    .unwrap()
    .head;
    head[10..18].copy_from_slice(&limits.max_payload_bytes.to_le_bytes());
    let mut decoder = FrameDecoder::new(limits);
    let (result, peak) = peak_allocation(|| {
        let mut msgs = decoder.push(&head).unwrap();
        for _ in 0..100 {
            msgs.extend(decoder.push(&[7; 1001]).unwrap());
        }
        msgs
    });
    assert!(result.is_empty());
    let fed = head.len() + 100 * 1001;
    assert!(
        peak <= allowance(fed),
        "holding {fed} bytes of a 1 GiB claim took {peak} bytes"
    );
    assert_eq!(
        decoder.finish(),
        Err(CodecError::Truncated {
            buffered: head.len() + 100 * 1001
        })
    );
}

/// Header limits above the ceiling act as the ceiling.
#[test]
fn header_limits_stop_at_the_ceiling() {
    let limits = FrameLimits {
        max_header_bytes: u32::MAX,
        max_payload_bytes: 0,
    };
    let mut prefix = b"FVL\0".to_vec();
    prefix.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    prefix.extend_from_slice(&(HEADER_BYTES_CEILING + 1).to_le_bytes());
    prefix.extend_from_slice(&0u64.to_le_bytes());
    assert_eq!(
        FrameDecoder::new(limits).push(&prefix),
        Err(CodecError::HeaderTooLarge {
            len: HEADER_BYTES_CEILING + 1,
            max: HEADER_BYTES_CEILING
        })
    );
}
