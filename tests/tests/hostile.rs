//! Hostile bytes over real QUIC on loopback. An unauthenticated peer on the
//! enrolment ALPN (which needs no client certificate) sends malformed,
//! oversized, truncated and wrong-version frames, forged lengths in every
//! kind of header, and floods of connections; so does an enrolled node on
//! its training connection. After each, the server must still run and a
//! real node must still enrol and complete a round. The other way round, a
//! hostile server must not crash a node, training or enrolling.

use std::time::Duration;

use fedveil_client::enrol::{self, EnrolmentError};
use fedveil_client::{ClientError, ClientOptions, ClientReport};
use fedveil_net::pki;
use fedveil_net::quic::{self, MessageReader, NetError, ServerIdentity};
use fedveil_proto::round::Event;
use fedveil_proto::wire::codec::FRAME_PREFIX_LEN;
use fedveil_proto::wire::{
    CodecError, EnrolRequest, Enrolled, FrameLimits, Goodbye, Hello, Message, ModelSpec,
    PROTOCOL_VERSION, ReasonCode, SecAgg, Update, Welcome, encode,
};
use fedveil_tests::{Deployment, deploy_with, endpoint};
use tokio::task::JoinHandle;

/// How long the attacker waits for the server's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
/// How long an honest node may take to enrol and complete a round.
const ROUND_TIMEOUT: Duration = Duration::from_secs(60);

/// A frame prefix with any version and lengths.
fn prefix(version: u16, header_len: u32, payload_len: u64) -> Vec<u8> {
    let mut b = b"FVL\0".to_vec();
    b.extend_from_slice(&version.to_le_bytes());
    b.extend_from_slice(&header_len.to_le_bytes());
    b.extend_from_slice(&payload_len.to_le_bytes());
    b
}

fn frame(msg: &Message) -> Vec<u8> {
    encode(msg).unwrap().to_vec()
}

/// The frame of `msg` with the length field that reads `len` (it must
/// occur once in the header) replaced by `claim`.
fn forged(msg: &Message, len: u64, claim: u64) -> Vec<u8> {
    let mut bytes = frame(msg);
    let header_len = u32::from_le_bytes(bytes[6..10].try_into().unwrap()) as usize;
    let header = FRAME_PREFIX_LEN..FRAME_PREFIX_LEN + header_len;
    let needle = len.to_le_bytes();
    let hits: Vec<usize> = bytes[header.clone()]
        .windows(8)
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| header.start + i)
        .collect();
    assert_eq!(hits.len(), 1, "{}: length {len} at {hits:?}", msg.kind());
    bytes[hits[0]..hits[0] + 8].copy_from_slice(&claim.to_le_bytes());
    bytes
}

/// A string of a length that occurs nowhere else in a header.
fn marked(len: usize) -> String {
    "m".repeat(len)
}

/// The 32-byte frame of the report (an enrolment request whose token
/// claims 2^50 bytes), in this build's protocol version: it was sent in
/// version 4, which a current peer refuses before reading the header.
const REPORTED_FRAME: [u8; 32] = {
    let mut frame = [
        0x46, 0x56, 0x4c, 0x00, 0x04, 0x00, 0x0e, 0x00, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0x08,
        0x00, 0x00, 0x00, 0x04, 0x00, 0, 0, 0, 0, 0, 0, 0x04, 0x00,
    ];
    let version = PROTOCOL_VERSION.to_le_bytes();
    frame[4] = version[0];
    frame[5] = version[1];
    frame
};

fn model_spec() -> ModelSpec {
    ModelSpec {
        name: marked(77),
        param_count: 3,
        shape_signature: [9; 32],
    }
}

/// Every kind of header with a length in it, each length forged.
fn forged_lengths() -> Vec<(String, Vec<u8>)> {
    let claims = [1u64 << 50, u64::MAX, 1 << 31];
    let cases: Vec<(Message, u64)> = vec![
        (
            Message::EnrolRequest(EnrolRequest {
                version: PROTOCOL_VERSION,
                token: marked(71),
                node_name: None,
                csr: vec![1; 10],
            }),
            71,
        ),
        (
            Message::EnrolRequest(EnrolRequest {
                version: PROTOCOL_VERSION,
                token: "t".into(),
                node_name: Some(marked(73)),
                csr: vec![1; 10],
            }),
            73,
        ),
        (
            Message::EnrolRequest(EnrolRequest {
                version: PROTOCOL_VERSION,
                token: "t".into(),
                node_name: None,
                csr: vec![1; 79],
            }),
            79,
        ),
        (
            Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                node_name: marked(83),
                model: model_spec(),
                num_examples: 1,
                data: Default::default(),
            }),
            83,
        ),
        (
            Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                node_name: "n".into(),
                model: model_spec(),
                num_examples: 1,
                data: Default::default(),
            }),
            77,
        ),
        (
            Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                node_name: "n".into(),
                model: model_spec(),
                num_examples: 1,
                data: fedveil_proto::wire::DataSpec {
                    class_names: vec![fedveil_proto::wire::ClassName(marked(101))],
                    ..Default::default()
                },
            }),
            101,
        ),
        (
            Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                node_name: "n".into(),
                model: model_spec(),
                num_examples: 1,
                data: fedveil_proto::wire::DataSpec {
                    example_shape: vec![1; 103],
                    ..Default::default()
                },
            }),
            103,
        ),
        (Message::error(ReasonCode::Internal, marked(89)), 89),
        (
            Message::Goodbye(Goodbye {
                rounds_completed: 1,
                reason: marked(97),
            }),
            97,
        ),
        (
            Message::SecAgg(SecAgg::ConsistencyCheck {
                round: 1,
                survivors: vec![5; 101],
            }),
            101,
        ),
        (
            Message::Enrolled(Enrolled {
                certificate: vec![2; 103],
                ca_certificate: vec![],
            }),
            103,
        ),
    ];
    let mut out = Vec::new();
    for (msg, len) in &cases {
        for claim in claims {
            out.push((
                format!("{} with a length of {len} claimed as {claim}", msg.kind()),
                forged(msg, *len, claim),
            ));
        }
    }
    out
}

/// What the attacker saw.
#[derive(Debug, PartialEq)]
enum Answer {
    /// An error message with this reason, then the close.
    Refused(ReasonCode),
    /// Another message (the bytes were a valid request).
    Answered(&'static str),
    /// The connection closed without a message.
    Closed,
}

async fn read_answer(recv: quinn::RecvStream) -> Answer {
    let mut reader = MessageReader::new(recv, FrameLimits::enrolment());
    match tokio::time::timeout(ANSWER_TIMEOUT, reader.next()).await {
        Ok(Ok(Some(Message::Error(e)))) => Answer::Refused(e.code),
        Ok(Ok(Some(other))) => Answer::Answered(other.kind()),
        Ok(Ok(None)) | Ok(Err(_)) => Answer::Closed,
        Err(_) => panic!("the server neither answered nor closed in {ANSWER_TIMEOUT:?}"),
    }
}

/// An anonymous enrolment connection, as anyone on the network can open.
async fn enrolment_connection(d: &Deployment, client: &quinn::Endpoint) -> quinn::Connection {
    let tls = quic::enrol_client_config(d.fingerprint, None).unwrap();
    client
        .connect_with(tls, d.addr, "localhost")
        .unwrap()
        .await
        .unwrap()
}

/// Sends `bytes` on a fresh enrolment connection (and ends the stream if
/// `finish`), then reads the server's answer.
async fn send_unauthenticated(d: &Deployment, bytes: &[u8], finish: bool) -> Answer {
    let client = endpoint();
    let conn = enrolment_connection(d, &client).await;
    let (mut send, recv) = conn.open_bi().await.unwrap();
    // The server may refuse and close before it has read everything.
    let _ = send.write_all(bytes).await;
    if finish {
        let _ = send.finish();
    }
    read_answer(recv).await
}

type Node = JoinHandle<Result<ClientReport, ClientError>>;

/// Enrols a fresh node and has it train until it has completed a round;
/// the node stays in the run.
async fn honest_node_completes_a_round(d: &Deployment, name: &str) -> Node {
    let identity = tokio::time::timeout(ROUND_TIMEOUT, d.enrol(&d.token(name)))
        .await
        .unwrap_or_else(|_| panic!("{name}: enrolment timed out"))
        .unwrap_or_else(|e| panic!("{name}: enrolment failed: {e}"));
    let opts = ClientOptions::enrolled(d.addr, "localhost", &identity).unwrap();
    let trainer = d.trainer(name.len() as u64);
    let task = tokio::spawn(async move { fedveil_client::run(&endpoint(), &opts, trainer).await });
    let deadline = tokio::time::Instant::now() + ROUND_TIMEOUT;
    let mut id = None;
    let mut accepted = false;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let event = d
            .next_event(left)
            .await
            .unwrap_or_else(|| panic!("{name}: no completed round in {ROUND_TIMEOUT:?}"));
        match event {
            Event::Joined {
                id: joined,
                node_name,
            } if node_name == name => id = Some(joined),
            Event::UpdateAccepted { id: from, .. } if Some(from) == id => accepted = true,
            Event::RoundCompleted(summary)
                if accepted && summary.contributors.contains(&id.unwrap()) =>
            {
                return task;
            }
            _ => {}
        }
    }
}

/// A server that runs until the test ends, one CNN step per node a round.
fn long_running(tag: &str) -> Deployment {
    deploy_with(tag, |config| {
        config.rounds = 1_000_000;
        config.max_failed_rounds = 1_000_000;
        config.round.max_local_steps = Some(1);
    })
}

fn still_running(d: &Deployment, honest: &[Node], after: &str) {
    assert!(!d.run.is_finished(), "the server stopped after: {after}");
    assert!(
        honest.iter().all(|h| !h.is_finished()),
        "an honest node left after: {after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_enrolment_frames_stop_neither_the_server_nor_its_nodes() {
    let d = long_running("hostile-enrol");
    let honest = vec![honest_node_completes_a_round(&d, "honest-first").await];

    let version = PROTOCOL_VERSION;
    let mut attacks: Vec<(String, Vec<u8>, bool, Answer)> = vec![
        (
            "the reported 32-byte frame".into(),
            REPORTED_FRAME.to_vec(),
            false,
            Answer::Refused(ReasonCode::MalformedFrame),
        ),
        (
            "an HTTP request".into(),
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            true,
            Answer::Refused(ReasonCode::MalformedFrame),
        ),
        (
            "a header claiming 4 GiB".into(),
            prefix(version, u32::MAX, 0),
            false,
            Answer::Refused(ReasonCode::FrameTooLarge),
        ),
        (
            "a payload claiming 2^63 bytes".into(),
            prefix(version, 8, 1 << 63),
            false,
            Answer::Refused(ReasonCode::FrameTooLarge),
        ),
        (
            "a header one byte over the enrolment limit, sent in full".into(),
            {
                let n = fedveil_proto::wire::codec::ENROL_MAX_HEADER_BYTES + 1;
                let mut b = prefix(version, n, 0);
                b.resize(b.len() + n as usize, 0xab);
                b
            },
            true,
            Answer::Refused(ReasonCode::FrameTooLarge),
        ),
        (
            "protocol version 3".into(),
            {
                let mut b = frame(&Message::error(ReasonCode::Internal, "x"));
                b[4..6].copy_from_slice(&3u16.to_le_bytes());
                b
            },
            false,
            Answer::Refused(ReasonCode::VersionMismatch),
        ),
        (
            "protocol version 65535".into(),
            prefix(u16::MAX, 8, 0),
            false,
            Answer::Refused(ReasonCode::VersionMismatch),
        ),
        (
            "a prefix alone, then the end of the stream".into(),
            prefix(version, 40, 0),
            true,
            Answer::Refused(ReasonCode::MalformedFrame),
        ),
        (
            "half a request, then the end of the stream".into(),
            {
                let b = REPORTED_FRAME;
                b[..FRAME_PREFIX_LEN + 5].to_vec()
            },
            true,
            Answer::Refused(ReasonCode::MalformedFrame),
        ),
        (
            "an enum tag out of range".into(),
            {
                let mut b = prefix(version, 4, 0);
                b.extend_from_slice(&0xffff_ffffu32.to_le_bytes());
                b
            },
            false,
            Answer::Refused(ReasonCode::MalformedFrame),
        ),
        (
            "trailing bytes after the message".into(),
            {
                let mut header =
                    frame(&Message::error(ReasonCode::Internal, "x"))[FRAME_PREFIX_LEN..].to_vec();
                header.extend_from_slice(&[0; 5]);
                let mut b = prefix(version, header.len() as u32, 0);
                b.extend_from_slice(&header);
                b
            },
            false,
            Answer::Refused(ReasonCode::MalformedFrame),
        ),
        (
            "a training message on the enrolment connection".into(),
            frame(&Message::Update(Update {
                round: 1,
                num_examples: 1,
                train_loss: 0.0,
                delta: vec![],
            })),
            false,
            Answer::Refused(ReasonCode::UnexpectedMessage),
        ),
        (
            "1 KiB of noise".into(),
            (0..1024u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
            true,
            Answer::Refused(ReasonCode::MalformedFrame),
        ),
    ];
    for (name, bytes) in forged_lengths() {
        attacks.push((
            name,
            bytes,
            false,
            Answer::Refused(ReasonCode::MalformedFrame),
        ));
    }

    assert!(attacks.len() > 35, "{} attacks", attacks.len());
    for (i, (name, bytes, finish, want)) in attacks.into_iter().enumerate() {
        let got = send_unauthenticated(&d, &bytes, finish).await;
        assert_eq!(got, want, "{name}");
        still_running(&d, &honest, &name);
        // A new node enrols and completes a round next to the first one,
        // then leaves (so the rounds stay small).
        let newcomer = honest_node_completes_a_round(&d, &format!("honest-{i}")).await;
        assert!(!newcomer.is_finished(), "the node after {name} left");
        newcomer.abort();
    }
    still_running(&d, &honest, "every hostile frame");
}

/// Connections by the hundred: some send the reported frame, some hold a
/// half-sent frame open, some never open a stream. While they are held, a
/// node still enrols and completes a round; the held ones are closed by
/// the server's deadline, not left open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_connections_does_not_stop_enrolment_or_rounds() {
    let d = long_running("hostile-flood");
    let honest = vec![honest_node_completes_a_round(&d, "honest-before").await];
    let client = endpoint();
    const EACH: usize = 60;

    let mut refused = Vec::new();
    for _ in 0..EACH {
        let client = client.clone();
        let tls = quic::enrol_client_config(d.fingerprint, None).unwrap();
        let addr = d.addr;
        refused.push(tokio::spawn(async move {
            let conn = client.connect_with(tls, addr, "localhost").unwrap().await?;
            let (mut send, recv) = conn.open_bi().await?;
            let _ = send.write_all(&REPORTED_FRAME).await;
            Ok::<_, quinn::ConnectionError>(read_answer(recv).await)
        }));
    }
    let mut held = Vec::new();
    for i in 0..2 * EACH {
        let conn = enrolment_connection(&d, &client).await;
        if i % 2 == 0 {
            let (mut send, _recv) = conn.open_bi().await.unwrap();
            send.write_all(&REPORTED_FRAME[..FRAME_PREFIX_LEN + 3])
                .await
                .unwrap();
            held.push((conn, Some(send)));
        } else {
            held.push((conn, None));
        }
    }
    for task in refused {
        let answer = task
            .await
            .unwrap()
            .expect("the server accepts the connection");
        assert_eq!(answer, Answer::Refused(ReasonCode::MalformedFrame));
    }
    still_running(&d, &honest, "the flood");
    let mut honest = honest;
    honest.push(honest_node_completes_a_round(&d, "honest-during-flood").await);

    // Every held connection is closed by the server, within its deadlines
    // for a request (enrolment) and a stream (training).
    let reap = fedveil_server::enrol::ENROL_REQUEST_TIMEOUT
        .max(fedveil_server::driver::HELLO_TIMEOUT)
        + Duration::from_secs(20);
    for (conn, _send) in &held {
        tokio::time::timeout(reap, conn.closed())
            .await
            .expect("the server closes a connection that sends no request");
    }
    still_running(&d, &honest, "the held connections");
    honest.push(honest_node_completes_a_round(&d, "honest-after-flood").await);
    still_running(&d, &honest, "the flood, at the end");
}

/// An enrolled node is authenticated, not trusted: forged lengths and
/// oversized or stalled payloads on its training connection cost it the
/// connection and nobody else anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolled_node_sending_hostile_frames_is_dropped_alone() {
    let d = long_running("hostile-node");
    let mut honest = vec![honest_node_completes_a_round(&d, "honest-first").await];
    let mallory = d.enrol(&d.token("mallory")).await.unwrap();
    let tls = quic::client_config(&mallory.ca_pem(), Some(&mallory)).unwrap();
    let client = endpoint();
    let hello = Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        node_name: "mallory".into(),
        model: model_spec(),
        num_examples: 10,
        // The server's kind of data, so that the model is what differs.
        data: d.split.test.spec(),
    });
    let param_count = {
        // The server's model: what a real node of this deployment trains.
        let trainer = d.trainer(0);
        trainer.spec().param_count
    };
    let update_claiming = |payload_len: u64| {
        let mut b = frame(&Message::Update(Update {
            round: 1,
            num_examples: 1,
            train_loss: 0.0,
            delta: vec![],
        }));
        b[10..18].copy_from_slice(&payload_len.to_le_bytes());
        b
    };
    let attacks: Vec<(&str, Vec<u8>, ReasonCode)> = vec![
        (
            "a hello whose name claims 2^50 bytes",
            forged(
                &Message::Hello(Hello {
                    version: PROTOCOL_VERSION,
                    node_name: marked(83),
                    model: model_spec(),
                    num_examples: 1,
                    data: Default::default(),
                }),
                83,
                1 << 50,
            ),
            ReasonCode::MalformedFrame,
        ),
        (
            "an update claiming more than the model",
            update_claiming((param_count + 100) * 4),
            ReasonCode::FrameTooLarge,
        ),
        (
            // Before its hello a connection may send no payload at all, so
            // a half-sent model-sized frame is refused at its prefix.
            "an update claiming the whole model before any hello, then the end of the stream",
            update_claiming(param_count * 4),
            ReasonCode::FrameTooLarge,
        ),
    ];
    for (name, bytes, want) in attacks {
        let conn = client
            .connect_with(tls.clone(), d.addr, "localhost")
            .unwrap()
            .await
            .unwrap();
        let (mut send, recv) = conn.open_bi().await.unwrap();
        let _ = send.write_all(&bytes).await;
        let _ = send.finish();
        let mut reader = MessageReader::new(recv, FrameLimits::default());
        let code = loop {
            match tokio::time::timeout(ANSWER_TIMEOUT, reader.next()).await {
                Ok(Ok(Some(Message::Error(e)))) => break e.code,
                Ok(Ok(Some(_))) => continue,
                other => panic!("{name}: expected a refusal, got {other:?}"),
            }
        };
        assert_eq!(code, want, "{name}");
        still_running(&d, &honest, name);
    }
    // The same node, well-behaved, is admitted again.
    let conn = client
        .connect_with(tls, d.addr, "localhost")
        .unwrap()
        .await
        .unwrap();
    let (mut send, recv) = conn.open_bi().await.unwrap();
    quic::write_message(&mut send, &hello).await.unwrap();
    let mut reader = MessageReader::new(recv, FrameLimits::default());
    let answer = tokio::time::timeout(ANSWER_TIMEOUT, reader.next()).await;
    assert!(
        matches!(&answer, Ok(Ok(Some(Message::Error(e)))) if e.code == ReasonCode::ModelMismatch),
        "a hello for another model is refused as such: {answer:?}"
    );
    honest.push(honest_node_completes_a_round(&d, "honest-after").await);
    still_running(&d, &honest, "the hostile node");
}

/// A server that answers the first request with `answer` (raw bytes).
async fn hostile_server(answer: Vec<u8>) -> (std::net::SocketAddr, ServerIdentity) {
    let identity = ServerIdentity::generate(&["localhost".into()]).unwrap();
    let tls = quic::server_config(&identity, None).unwrap();
    let server = quinn::Endpoint::server(tls, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let conn = incoming.await?;
                let (mut send, recv) = conn.accept_bi().await?;
                let mut reader = MessageReader::new(recv, FrameLimits::default());
                let _ = reader.next().await;
                send.write_all(&answer).await?;
                conn.closed().await;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            });
        }
    });
    (addr, identity)
}

/// The same bytes that aborted the server aborted a node: a node must
/// refuse them with an error and go on living.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_server_cannot_crash_a_node() {
    let split = fedveil_tests::synthetic();
    let welcome = Message::Welcome(Welcome {
        version: PROTOCOL_VERSION,
        client_id: 1,
        model: model_spec(),
    });
    let answers: Vec<(&str, Vec<u8>)> = vec![
        (
            "a welcome whose model name claims 2^50 bytes",
            forged(&welcome, 77, 1 << 50),
        ),
        (
            "an error whose detail claims 2^62 bytes",
            forged(
                &Message::error(ReasonCode::Internal, marked(89)),
                89,
                1 << 62,
            ),
        ),
        ("a round start claiming a payload far beyond the model", {
            let mut b = prefix(PROTOCOL_VERSION, 8, 1 << 40);
            b.extend_from_slice(&[0; 8]);
            b
        }),
    ];
    for (name, answer) in answers {
        let (addr, identity) = hostile_server(answer).await;
        let mut opts = ClientOptions::new(addr, "localhost", "victim");
        opts.tls = Some(quic::client_config(&identity.ca_cert_pem, None).unwrap());
        opts.retry.attempts = 1;
        let result = tokio::time::timeout(
            ANSWER_TIMEOUT,
            fedveil_client::run(&endpoint(), &opts, fedveil_tests::trainer(&split, 0)),
        )
        .await
        .unwrap_or_else(|_| panic!("{name}: the node hung"));
        assert!(
            matches!(
                &result,
                Err(ClientError::Net(NetError::Codec(
                    CodecError::HeaderOverrun { .. } | CodecError::PayloadTooLarge { .. }
                )))
            ),
            "{name}: {result:?}"
        );
    }

    // Enrolment: the certificate in the answer claims 2^60 bytes.
    let enrolled = Message::Enrolled(Enrolled {
        certificate: vec![2; 103],
        ca_certificate: vec![],
    });
    let (addr, identity) = hostile_server(forged(&enrolled, 103, 1 << 60)).await;
    let fingerprint = pki::parse_fingerprint(&identity.ca_fingerprint()).unwrap();
    let result = enrol::enrol(&endpoint(), addr, "localhost", fingerprint, "token", None).await;
    assert!(
        matches!(
            &result,
            Err(EnrolmentError::Net(NetError::Codec(
                CodecError::HeaderOverrun { .. }
            )))
        ),
        "{result:?}"
    );
}

/// Forges every share it sends in its first secure round: the right size
/// and for the right neighbours, so the server forwards them, but with
/// flipped ciphertext bits that only the recipients can detect.
#[derive(Debug, Default)]
struct ForgeFirstShares {
    forged: std::sync::atomic::AtomicBool,
}

impl fedveil_client::FaultHook for ForgeFirstShares {
    fn before_send(&self, message: &Message) -> fedveil_client::Fault {
        use std::sync::atomic::Ordering;
        match message {
            Message::SecAgg(SecAgg::Shares { round, shares })
                if !self.forged.swap(true, Ordering::SeqCst) =>
            {
                let mut shares = shares.clone();
                for s in &mut shares {
                    s.ciphertext[0] ^= 1;
                }
                fedveil_client::Fault::Replace(Box::new(Message::SecAgg(SecAgg::Shares {
                    round: *round,
                    shares,
                })))
            }
            _ => fedveil_client::Fault::Send,
        }
    }
}

/// One enrolled node that forges its shares costs the honest nodes one
/// round, not the run: each neighbour detects the bad share, leaves that
/// round and tells the server, and every later round completes with all of
/// them (before, each honest node's session ended on the bad share).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_forging_shares_costs_a_round_not_the_run() {
    let d = deploy_with("forged-shares", |config| secure_rounds(config, 3, 5));
    let names = ["ann", "bob", "cat", "dan", "mallory"];
    let nodes = run_nodes(&d, &names, |name| {
        (name == "mallory").then(|| {
            std::sync::Arc::new(ForgeFirstShares::default())
                as std::sync::Arc<dyn fedveil_client::FaultHook>
        })
    })
    .await;
    // Three rounds must complete; the forged one fails first.
    let rounds = outcomes(&d, 4).await;
    assert_eq!(rounds[0].1, None, "the forged round fails: {rounds:?}");
    assert!(
        rounds[1..].iter().all(|(_, c)| *c == Some(5)),
        "every later round completes with all five: {rounds:?}"
    );
    for report in finished(nodes).await {
        let (name, report) = report;
        let report = report.unwrap_or_else(|e| panic!("{name} left the run: {e}"));
        assert!(report.rounds_trained >= 3, "{name}: {report:?}");
    }
}

/// One enrolled identity opening many connections that never say hello
/// (each sends one byte of a frame and stops): beyond the per-node cap
/// they are refused at once, the others are closed when their hello is
/// due, and an honest node trains through it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_say_hello_are_capped_then_closed() {
    let limits = fedveil_server::ConnectionLimits {
        hello_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let cap = limits.max_unadmitted_per_node;
    let d = fedveil_tests::deploy_limited("silent", limits, |config| {
        config.rounds = 1;
        config.min_clients = 1;
        config.round.max_local_steps = Some(1);
    });
    let identity = d.enrol(&d.token("mallory")).await.unwrap();
    let tls = ClientOptions::enrolled(d.addr, "localhost", &identity)
        .unwrap()
        .tls
        .unwrap();
    let client = endpoint();
    let mut conns = Vec::new();
    for _ in 0..cap + 3 {
        let c = client
            .connect_with(tls.clone(), d.addr, "localhost")
            .unwrap()
            .await
            .unwrap();
        let (mut send, _recv) = c.open_bi().await.unwrap();
        send.write_all(b"F").await.unwrap();
        conns.push((c, send));
    }
    let (mut refused, mut silent) = (0, 0);
    for (c, _send) in &conns {
        match tokio::time::timeout(Duration::from_secs(20), c.closed()).await {
            Ok(quinn::ConnectionError::ApplicationClosed(close)) => {
                let why = String::from_utf8_lossy(&close.reason);
                if why.contains("already has connections waiting") {
                    refused += 1;
                } else if why.contains("no hello in time") {
                    silent += 1;
                } else {
                    panic!("unexpected close: {why}");
                }
            }
            other => panic!("expected the server to close, got {other:?}"),
        }
    }
    assert_eq!((refused, silent), (3, cap));
    let honest = honest_node_completes_a_round(&d, "ann").await;
    honest.await.unwrap().unwrap();
}

/// Secure rounds of one training step, `rounds` of them to complete, each
/// waiting for `nodes` nodes; as many may fail.
fn secure_rounds(config: &mut fedveil_proto::round::CoordinatorConfig, rounds: u64, nodes: usize) {
    config.rounds = rounds;
    config.min_clients = nodes;
    config.max_failed_rounds = rounds;
    config.round.max_local_steps = Some(1);
    config.round.secure_aggregation = true;
    config.secagg = Some(fedveil_proto::round::server::SecAggConfig::default());
}

/// Each node's outcome once its run ends.
async fn finished(
    nodes: Vec<(&'static str, Node)>,
) -> Vec<(&'static str, Result<ClientReport, ClientError>)> {
    let mut out = Vec::new();
    for (name, node) in nodes {
        let report = tokio::time::timeout(ROUND_TIMEOUT, node)
            .await
            .unwrap_or_else(|_| panic!("{name} did not finish"))
            .unwrap();
        out.push((name, report));
    }
    out
}

/// What one node sent, by round and message kind: a spy on honest nodes.
#[derive(Debug, Default)]
struct Sent(std::sync::Mutex<Vec<(u64, &'static str)>>);

impl Sent {
    fn kinds_in(&self, round: u64) -> Vec<&'static str> {
        let sent = self.0.lock().unwrap();
        sent.iter()
            .filter(|(r, _)| *r == round)
            .map(|(_, k)| *k)
            .collect()
    }
}

impl fedveil_client::FaultHook for Sent {
    fn before_send(&self, message: &Message) -> fedveil_client::Fault {
        let (round, kind) = match message {
            Message::SecAgg(m) => (m.round(), m.kind()),
            Message::Update(u) => (u.round, "update"),
            other => (0, other.kind()),
        };
        self.0.lock().unwrap().push((round, kind));
        fedveil_client::Fault::Send
    }
}

/// Enrols `names` and runs each as a real node, `hook(name)` seeing what
/// it sends.
async fn run_nodes(
    d: &Deployment,
    names: &[&'static str],
    hook: impl Fn(&str) -> Option<std::sync::Arc<dyn fedveil_client::FaultHook>>,
) -> Vec<(&'static str, Node)> {
    let mut nodes = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let identity = d.enrol(&d.token(name)).await.unwrap();
        let mut opts = ClientOptions::enrolled(d.addr, "localhost", &identity).unwrap();
        opts.faults = hook(name);
        let trainer = d.trainer(i as u64);
        nodes.push((
            *name,
            tokio::spawn(async move { fedveil_client::run(&endpoint(), &opts, trainer).await }),
        ));
    }
    nodes
}

/// Plays the run until `rounds` rounds have ended; returns each round's
/// outcome (its contributors, or `None` for a failed round).
async fn outcomes(d: &Deployment, rounds: usize) -> Vec<(u64, Option<usize>)> {
    let mut out = Vec::new();
    while out.len() < rounds {
        match d.next_event(ROUND_TIMEOUT).await {
            Some(Event::RoundFailed { round, .. }) => out.push((round, None)),
            Some(Event::RoundCompleted(s)) => out.push((s.round, Some(s.contributors.len()))),
            Some(Event::Finished { .. }) | None => break,
            Some(_) => {}
        }
    }
    out
}

/// Each round, one enrolled node breaks SecAgg+ another way: keys whose
/// signature does not verify, shares of the wrong size, shares far too
/// large, no shares, shares for only some neighbours, a survivor-set
/// signature that does not verify. The server drops it alone each time:
/// every round completes with the honest nodes' inputs, and no honest
/// node leaves a round or the run.
#[derive(Debug)]
struct Mallory;

impl fedveil_client::FaultHook for Mallory {
    fn before_send(&self, message: &Message) -> fedveil_client::Fault {
        let Message::SecAgg(m) = message else {
            return fedveil_client::Fault::Send;
        };
        let mut m = m.clone();
        let round = m.round();
        match (&mut m, round) {
            (SecAgg::AdvertiseKeys { keys, .. }, 1) => {
                keys.attestation.as_mut().unwrap().signature[8] ^= 1;
            }
            (SecAgg::Shares { shares, .. }, 2) => {
                for s in shares {
                    s.ciphertext.truncate(10);
                }
            }
            (SecAgg::Shares { shares, .. }, 3) => {
                for s in shares {
                    s.ciphertext.resize(4 * 1024, 7);
                }
            }
            (SecAgg::Shares { shares, .. }, 4) => shares.clear(),
            (SecAgg::Shares { shares, .. }, 5) => shares.truncate(1),
            (SecAgg::SurvivorsSigned { signature, .. }, 6) => signature[8] ^= 1,
            _ => return fedveil_client::Fault::Send,
        }
        fedveil_client::Fault::Replace(Box::new(Message::SecAgg(m)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_malicious_node_costs_only_itself_in_secure_rounds() {
    let d = deploy_with("mallory-secagg", |config| secure_rounds(config, 7, 6));
    let names = ["ann", "bob", "cat", "dan", "eve", "mallory"];
    let spies: std::collections::HashMap<&str, std::sync::Arc<Sent>> = names[..5]
        .iter()
        .map(|n| (*n, Default::default()))
        .collect();
    let nodes = run_nodes(&d, &names, |name| {
        if name == "mallory" {
            Some(std::sync::Arc::new(Mallory))
        } else {
            Some(spies[name].clone())
        }
    })
    .await;
    let rounds = outcomes(&d, 7).await;
    let failed: Vec<u64> = rounds
        .iter()
        .filter(|(_, c)| c.is_none())
        .map(|(r, _)| *r)
        .collect();
    assert!(failed.is_empty(), "rounds {failed:?} failed: {rounds:?}");
    assert!(
        rounds.iter().all(|(_, c)| c.unwrap() >= 5),
        "the honest five contribute to every round: {rounds:?}"
    );
    for (name, spy) in &spies {
        for round in 1..=7 {
            let kinds = spy.kinds_in(round);
            assert!(
                kinds.contains(&"secagg-unmask-shares"),
                "{name} did not complete round {round}: {kinds:?} (rounds {rounds:?}, sent {:?})",
                spy.0.lock().unwrap()
            );
        }
        assert!(
            !spy.kinds_in(0).contains(&"error"),
            "{name} left a round: {:?}",
            spy.0.lock().unwrap()
        );
    }
    for (name, report) in finished(nodes).await {
        if name != "mallory" {
            assert!(report.is_ok(), "{name} left the run: {report:?}");
        }
    }
}

/// A node that never reads while it sends small frames: one report of an
/// error a round is heard, the rest are refused, and the refusals queue
/// up behind the round starts it never reads. The server closes it when
/// its outbound queue is full instead of holding messages for it without
/// end, and the honest node trains on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_never_reads_is_closed_when_its_queue_is_full() {
    let limits = fedveil_server::ConnectionLimits {
        max_outbound_queued: 4,
        ..Default::default()
    };
    let d = fedveil_tests::deploy_limited("not-reading", limits, |config| {
        config.rounds = 1_000_000;
        config.min_clients = 1;
        config.max_failed_rounds = 1_000_000;
        // Only a full queue may close it here.
        config.max_refusals_per_round = u32::MAX;
        config.round.max_local_steps = Some(1);
    });
    let honest = vec![honest_node_completes_a_round(&d, "ann").await];
    let mallory = d.enrol(&d.token("mallory")).await.unwrap();
    let tls = ClientOptions::enrolled(d.addr, "localhost", &mallory)
        .unwrap()
        .tls
        .unwrap();
    let conn = endpoint()
        .connect_with(tls, d.addr, "localhost")
        .unwrap()
        .await
        .unwrap();
    let (mut send, _never_read) = conn.open_bi().await.unwrap();
    let hello = Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        node_name: "mallory".into(),
        model: d.trainer(0).spec().clone(),
        num_examples: 10,
        data: d.split.test.spec(),
    });
    quic::write_message(&mut send, &hello).await.unwrap();
    let flood = tokio::spawn(async move {
        let report = Message::error(ReasonCode::LeftRound, "cannot train".to_owned());
        loop {
            if quic::write_message(&mut send, &report).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let closed = tokio::time::timeout(Duration::from_secs(120), conn.closed())
        .await
        .expect("the server closes a node that never reads");
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            let why = String::from_utf8_lossy(&close.reason);
            assert!(why.contains("does not read"), "{why}");
        }
        other => panic!("expected the server to close, got {other:?}"),
    }
    flood.abort();
    still_running(&d, &honest, "a node that never reads");
    let honest = honest_node_completes_a_round(&d, "bob").await;
    assert!(!honest.is_finished());
}

/// A deviating server, driving real nodes over QUIC: the real server with
/// a fault hook on what it sends. Round by round it weakens the SecAgg+
/// parameters, starves one node of shares, announces too small a survivor
/// set, and strips the consistency-check signatures. The nodes refuse each
/// deviation before it could expose an input: no masked input without t
/// shares, no unmask shares without a valid survivor set signed by t
/// neighbours. They stay in the run, and a faithful round then completes.
#[derive(Debug, Default)]
struct Deviating {
    starved: std::sync::Mutex<Option<u64>>,
}

impl fedveil_server::ServerFaultHook for Deviating {
    fn before_send(&self, to: u64, message: &Message) -> Option<Message> {
        let Message::SecAgg(m) = message else {
            return None;
        };
        let mut m = m.clone();
        let round = m.round();
        match (&mut m, round) {
            (SecAgg::Setup { setup, .. }, 1) => setup.params.threshold = 1,
            (SecAgg::PeerShares { shares, .. }, 2) => {
                let mut starved = self.starved.lock().unwrap();
                if *starved.get_or_insert(to) != to {
                    return None;
                }
                shares.truncate(1);
            }
            (SecAgg::ConsistencyCheck { survivors, .. }, 3) => survivors.truncate(2),
            (SecAgg::UnmaskRequest { signatures, .. }, 4) => signatures.truncate(1),
            _ => return None,
        }
        Some(Message::SecAgg(m))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_refuse_a_deviating_server_and_stay_in_the_run() {
    let names = ["ann", "bob", "cat", "dan", "eve"];
    let d = fedveil_tests::deploy_built(
        "deviating",
        |b| b.faults(std::sync::Arc::new(Deviating::default())),
        |config| secure_rounds(config, 5, 5),
    );
    let spies: std::collections::HashMap<&str, std::sync::Arc<Sent>> =
        names.iter().map(|n| (*n, Default::default())).collect();
    let nodes = run_nodes(&d, &names, |name| Some(spies[name].clone())).await;
    let rounds = outcomes(&d, 5).await;
    let sent = |round: u64, kind: &str| {
        spies
            .values()
            .filter(|s| s.kinds_in(round).contains(&kind))
            .count()
    };
    // Round 1, t = 1: nobody advertises keys under it.
    assert_eq!(rounds[0], (1, None), "{rounds:?}");
    assert_eq!(sent(1, "secagg-advertise-keys"), 0);
    // Round 2: the starved node sends no masked input; the others complete.
    assert_eq!(sent(2, "secagg-masked-input"), 4);
    assert_eq!(rounds[1], (2, Some(4)), "{rounds:?}");
    // Rounds 3 and 4: nobody reveals a share.
    assert_eq!(rounds[2], (3, None), "{rounds:?}");
    assert_eq!(sent(3, "secagg-unmask-shares"), 0);
    assert_eq!(rounds[3], (4, None), "{rounds:?}");
    assert_eq!(sent(4, "secagg-unmask-shares"), 0);
    // A faithful round: everyone is still there.
    assert_eq!(rounds[4], (5, Some(5)), "{rounds:?}");
    for (name, report) in finished(nodes).await {
        assert!(report.is_ok(), "{name} left the run: {report:?}");
    }
}
