//! Framing and encoding: the one place that knows the byte layout.
//!
//! A frame is
//!
//! ```text
//! magic "FVL\0" | version u16 | header_len u32 | payload_len u64 | header | payload
//! ```
//!
//! (integers little-endian). The header is the message encoded with bincode
//! 2 in fixed-int mode (varints would inflate random integers by 25%); the
//! payload is the message's bulk vector as raw little-endian `f32`s, written
//! and read without per-element work.
//!
//! Every byte is the peer's and hostile until checked. What is checked, and
//! when:
//!
//! 1. **The 18-byte prefix**, before anything past it is kept: the magic
//!    and the protocol version as soon as their bytes arrive, then
//!    `header_len` against [`FrameLimits::max_header_bytes`] and
//!    `payload_len` against [`FrameLimits::max_payload_bytes`] (and that it
//!    is whole `f32`s).
//! 2. **The header bytes** are buffered as they arrive, never more than
//!    `header_len`, and decoded only when all of them are there, from that
//!    slice alone. Every length inside the header (a string, a byte string,
//!    a list) is checked against the bytes that remain in it before it
//!    allocates anything ([`super::bounded`]), so a claimed 2^50-byte
//!    string is [`CodecError::HeaderOverrun`], not an allocation; bincode's
//!    own decode limit ([`HEADER_BYTES_CEILING`]) backs this up. The header
//!    must decode to exactly one message with no bytes left over, and carry
//!    a payload exactly when its kind has one.
//! 3. **The payload** buffer grows with the bytes that actually arrive
//!    (never beyond the `payload_len` already checked), so a frame that
//!    claims a large payload and stalls holds only what it sent.
//!
//! Any failure poisons the decoder: the stream is out of sync and the
//! connection must be dropped. Messages completed before the bad frame are
//! still delivered.
//!
//! [`FrameDecoder`] is sans-IO: feed it whatever bytes arrived, poll complete
//! messages out. The transport never parses anything itself.

use std::borrow::Cow;

use super::message::{Message, PROTOCOL_VERSION, Payload, ReasonCode};

/// Four bytes that open every frame, so garbage is caught at once.
pub const FRAME_MAGIC: [u8; 4] = *b"FVL\0";
/// Bytes before the header: magic, version, header length, payload length.
pub const FRAME_PREFIX_LEN: usize = 4 + 2 + 4 + 8;
/// Default cap on a header. Most are tiny; the largest is a SecAgg+ peer
/// list, about 0.6 KiB per neighbour with its certificate and signature.
pub const DEFAULT_MAX_HEADER_BYTES: u32 = 256 * 1024;
/// Default cap on a payload: 1 GiB, i.e. a 268M-parameter f32 model.
pub const DEFAULT_MAX_PAYLOAD_BYTES: u64 = 1 << 30;
/// The largest header any decoder accepts, whatever its limits say: bincode
/// decodes headers under this limit, a backstop should a field ever decode
/// without [`super::bounded`].
pub const HEADER_BYTES_CEILING: u32 = 4 << 20;
/// Cap on an enrolment or renewal frame, both ways: a token and a CSR, or
/// two certificates, are well under 4 KiB. Enrolment messages carry no
/// payload.
pub const ENROL_MAX_HEADER_BYTES: u32 = 16 * 1024;

/// Size limits a decoder enforces. Servers set `max_payload_bytes` to the
/// exact model size, so an oversized update is refused before it is read.
///
/// ```
/// use fedveil_proto::wire::{CodecError, FrameLimits, decode_one};
///
/// // The prefix of a frame that claims a 4 GiB header.
/// let mut frame = b"FVL\0".to_vec();
/// frame.extend_from_slice(&fedveil_proto::wire::PROTOCOL_VERSION.to_le_bytes());
/// frame.extend_from_slice(&u32::MAX.to_le_bytes());
/// frame.extend_from_slice(&0u64.to_le_bytes());
/// let err = decode_one(&frame, FrameLimits::enrolment()).unwrap_err();
/// assert!(matches!(err, CodecError::HeaderTooLarge { .. }));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// Largest header accepted; values above [`HEADER_BYTES_CEILING`] act
    /// as the ceiling.
    pub max_header_bytes: u32,
    /// Largest payload accepted (sized for the model).
    pub max_payload_bytes: u64,
}

impl Default for FrameLimits {
    fn default() -> Self {
        Self {
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
        }
    }
}

/// Values an update may carry beyond the model's: the secure-aggregation
/// weight and the adaptive-clipping indicator.
pub const MAX_APPENDED_VALUES: u64 = 2;

impl FrameLimits {
    /// Limits for the first frame of a training connection: a hello, which
    /// carries no payload, so an unadmitted peer cannot make the server
    /// buffer a model-sized frame.
    pub fn hello() -> Self {
        Self {
            max_payload_bytes: 0,
            ..Self::default()
        }
    }

    /// Limits for a peer exchanging models of `param_count` parameters: the
    /// largest payload is a masked update (the model plus what
    /// [`MAX_APPENDED_VALUES`] allows).
    pub fn for_model(param_count: u64) -> Self {
        Self {
            max_payload_bytes: param_count
                .saturating_add(MAX_APPENDED_VALUES)
                .saturating_mul(4),
            ..Self::default()
        }
    }

    /// Limits of an enrolment connection, for the server and the node
    /// alike: small headers ([`ENROL_MAX_HEADER_BYTES`]) and no payload.
    pub fn enrolment() -> Self {
        Self {
            max_header_bytes: ENROL_MAX_HEADER_BYTES,
            max_payload_bytes: 0,
        }
    }

    /// The header limit in force: the configured one, at most the ceiling.
    fn header_bytes(&self) -> u32 {
        self.max_header_bytes.min(HEADER_BYTES_CEILING)
    }
}

/// Why bytes could not be turned into a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The frame does not start with fedveil's magic bytes.
    #[error("not a fedveil frame (bad magic bytes {0:02x?})")]
    BadMagic([u8; 4]),
    /// The peer speaks another protocol version.
    #[error("peer speaks protocol version {got}, this build speaks {PROTOCOL_VERSION}")]
    UnsupportedVersion {
        /// The peer's version.
        got: u16,
    },
    /// The header is over its limit.
    #[error("frame header of {len} bytes exceeds the limit of {max}")]
    HeaderTooLarge {
        /// The header's claimed length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// The payload is over its limit.
    #[error("frame payload of {len} bytes exceeds the limit of {max}")]
    PayloadTooLarge {
        /// The payload's claimed length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The payload is not a whole number of 4-byte values.
    #[error("frame payload of {0} bytes is not a whole number of f32 values")]
    PayloadMisaligned(u64),
    /// The header does not decode as a message.
    #[error("malformed frame header: {0}")]
    MalformedHeader(String),
    /// A length inside the header points past its end.
    #[error(
        "frame header of {header_len} bytes ends inside a field (a length claims more bytes than remain)"
    )]
    HeaderOverrun {
        /// The header's length.
        header_len: usize,
    },
    /// The header has bytes after the message.
    #[error("header has {trailing} bytes after the message")]
    TrailingHeaderBytes {
        /// How many.
        trailing: usize,
    },
    /// A payload where none belongs, or none where one must be.
    #[error("a {kind} message must {} a payload", if *.expected { "carry" } else { "not carry" })]
    PayloadPresence {
        /// The message kind.
        kind: &'static str,
        /// Whether it must carry one.
        expected: bool,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({buffered} bytes buffered)")]
    Truncated {
        /// Bytes buffered when it ended.
        buffered: usize,
    },
    /// Not exactly one frame where one was expected.
    #[error("{0} frames where exactly one was expected")]
    FrameCount(usize),
    /// The message could not be encoded.
    #[error("could not encode message: {0}")]
    Encode(String),
}

impl CodecError {
    /// The wire reason code a peer is told when its bytes fail to decode.
    pub fn reason(&self) -> ReasonCode {
        match self {
            CodecError::UnsupportedVersion { .. } => ReasonCode::VersionMismatch,
            CodecError::HeaderTooLarge { .. } | CodecError::PayloadTooLarge { .. } => {
                ReasonCode::FrameTooLarge
            }
            _ => ReasonCode::MalformedFrame,
        }
    }
}

type FixedInt = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Fixint,
    bincode::config::NoLimit,
>;

fn bincode_config() -> FixedInt {
    bincode::config::standard().with_fixed_int_encoding()
}

/// Decoding adds a limit: bincode counts every byte it reads and every
/// length it claims against it (see the module doc).
fn bincode_decode_config() -> impl bincode::config::Config {
    bincode_config().with_limit::<{ HEADER_BYTES_CEILING as usize }>()
}

/// An encoded frame: the small head (prefix and header) and the payload
/// bytes, kept apart so a large model is written without being copied.
pub struct EncodedFrame<'a> {
    /// Prefix and header bytes.
    pub head: Vec<u8>,
    /// Payload bytes (borrowed when no conversion was needed).
    pub payload: Cow<'a, [u8]>,
}

impl EncodedFrame<'_> {
    /// Total bytes on the wire.
    pub fn len(&self) -> usize {
        self.head.len() + self.payload.len()
    }

    /// Whether the frame has no bytes (never: the head is always there).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole frame in one buffer (tests and small messages).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        out.extend_from_slice(&self.head);
        out.extend_from_slice(&self.payload);
        out
    }
}

/// Encodes `msg` into a frame.
pub fn encode(msg: &Message) -> Result<EncodedFrame<'_>, CodecError> {
    let header = bincode::serde::encode_to_vec(msg, bincode_config())
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    let payload = match msg.payload() {
        Some(Payload::F32(v)) => f32s_to_le_bytes(v),
        Some(Payload::U32(v)) => u32s_to_le_bytes(v),
        None => Cow::Borrowed(&[][..]),
    };
    let header_len =
        u32::try_from(header.len()).map_err(|_| CodecError::Encode("header over 4 GiB".into()))?;
    let mut head = Vec::with_capacity(FRAME_PREFIX_LEN + header.len());
    head.extend_from_slice(&FRAME_MAGIC);
    head.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    head.extend_from_slice(&header_len.to_le_bytes());
    head.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    head.extend_from_slice(&header);
    Ok(EncodedFrame { head, payload })
}

/// `f32`s as little-endian bytes; borrowed on little-endian machines.
pub fn f32s_to_le_bytes(values: &[f32]) -> Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        Cow::Borrowed(bytemuck::cast_slice(values))
    } else {
        Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

/// `u32`s as little-endian bytes; borrowed on little-endian machines.
pub fn u32s_to_le_bytes(values: &[u32]) -> Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        Cow::Borrowed(bytemuck::cast_slice(values))
    } else {
        Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

#[derive(Debug)]
enum DecodeState {
    /// Collecting the fixed-size prefix.
    Prefix,
    /// Collecting `header_len` header bytes; the payload length is known.
    Header {
        header_len: usize,
        payload_len: usize,
    },
    /// Filling the payload of an already decoded header.
    Payload {
        message: Box<Message>,
        payload: PayloadBuffer,
    },
}

/// A payload being received: raw 32-bit words (f32 messages reinterpret
/// them without a copy), grown with the bytes that arrive, never past the
/// length the prefix declared and the limits allowed.
#[derive(Debug)]
struct PayloadBuffer {
    words: Vec<u32>,
    total_words: usize,
    /// Bytes of a word split across two pushes.
    partial: [u8; 4],
    partial_len: usize,
}

impl PayloadBuffer {
    fn new(total_words: usize) -> Self {
        Self {
            words: Vec::new(),
            total_words,
            partial: [0; 4],
            partial_len: 0,
        }
    }

    fn is_complete(&self) -> bool {
        self.words.len() == self.total_words
    }

    /// Takes what it can of `bytes`; returns how many it took.
    fn fill(&mut self, bytes: &[u8]) -> usize {
        let want = (self.total_words - self.words.len()) * 4 - self.partial_len;
        let bytes = &bytes[..want.min(bytes.len())];
        let mut rest = bytes;
        if self.partial_len > 0 {
            let n = (4 - self.partial_len).min(rest.len());
            self.partial[self.partial_len..self.partial_len + n].copy_from_slice(&rest[..n]);
            self.partial_len += n;
            rest = &rest[n..];
            if self.partial_len < 4 {
                return bytes.len();
            }
            self.grow_for(1);
            self.words.push(u32::from_ne_bytes(self.partial));
            self.partial_len = 0;
        }
        let whole = rest.len() / 4;
        if whole > 0 {
            self.grow_for(whole);
            let start = self.words.len();
            self.words.resize(start + whole, 0);
            let target: &mut [u8] = bytemuck::cast_slice_mut(&mut self.words[start..]);
            target.copy_from_slice(&rest[..whole * 4]);
            rest = &rest[whole * 4..];
        }
        self.partial[..rest.len()].copy_from_slice(rest);
        self.partial_len = rest.len();
        bytes.len()
    }

    /// Reserves room for `more` words: doubling (so a large model costs few
    /// reallocations), but never past the declared total.
    fn grow_for(&mut self, more: usize) {
        let needed = self.words.len() + more;
        if needed > self.words.capacity() {
            let target = needed
                .max(self.words.capacity().saturating_mul(2))
                .min(self.total_words);
            self.words.reserve_exact(target - self.words.len());
        }
    }
}

/// Incremental, sans-IO frame decoder.
///
/// After an error the decoder is poisoned (the stream is out of sync), and
/// every later call returns the same error: the connection must be dropped.
#[derive(Debug)]
pub struct FrameDecoder {
    limits: FrameLimits,
    /// Limits of the first frame only, when they differ.
    first: Option<FrameLimits>,
    /// Frames decoded so far.
    frames: u64,
    /// Bytes of the unfinished frame taken so far (prefix included).
    frame_bytes: usize,
    buf: Vec<u8>,
    state: DecodeState,
    poisoned: Option<CodecError>,
}

impl FrameDecoder {
    /// A decoder that refuses anything over `limits`.
    pub fn new(limits: FrameLimits) -> Self {
        Self {
            limits,
            first: None,
            frames: 0,
            frame_bytes: 0,
            buf: Vec::new(),
            state: DecodeState::Prefix,
            poisoned: None,
        }
    }

    /// A decoder whose first frame must fit `first` (see
    /// [`FrameLimits::hello`]) and every later one `limits`.
    pub fn with_first_frame(first: FrameLimits, limits: FrameLimits) -> Self {
        Self {
            first: Some(first),
            ..Self::new(limits)
        }
    }

    /// The limits the next frame is held to.
    fn current(&self) -> FrameLimits {
        match self.first {
            Some(first) if self.frames == 0 => first,
            _ => self.limits,
        }
    }

    /// The limits it enforces.
    pub fn limits(&self) -> FrameLimits {
        self.limits
    }

    /// Feeds bytes and returns every message they complete.
    ///
    /// When the bytes complete some messages and then break a frame, the
    /// messages are returned and the error comes from the next call (to
    /// `push` or [`Self::finish`]): the outcome does not depend on how the
    /// stream was split.
    pub fn push(&mut self, mut bytes: &[u8]) -> Result<Vec<Message>, CodecError> {
        if let Some(err) = &self.poisoned {
            return Err(err.clone());
        }
        let mut out = Vec::new();
        while !bytes.is_empty() {
            match self.step(bytes) {
                Ok((used, msg)) => {
                    self.frame_bytes += used;
                    if let Some(msg) = msg {
                        // A step ends where its frame ends.
                        self.frame_bytes = 0;
                        self.frames += 1;
                        out.push(msg);
                    }
                    bytes = &bytes[used..];
                }
                Err(err) => {
                    self.poisoned = Some(err.clone());
                    if out.is_empty() {
                        return Err(err);
                    }
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Call when the stream ends: errors if it ended in the middle of a frame.
    pub fn finish(&self) -> Result<(), CodecError> {
        if let Some(err) = &self.poisoned {
            return Err(err.clone());
        }
        match self.frame_bytes {
            0 => Ok(()),
            buffered => Err(CodecError::Truncated { buffered }),
        }
    }

    /// Consumes a prefix of `bytes`; returns how much and any finished message.
    fn step(&mut self, bytes: &[u8]) -> Result<(usize, Option<Message>), CodecError> {
        match &mut self.state {
            DecodeState::Prefix => {
                let used = fill(&mut self.buf, bytes, FRAME_PREFIX_LEN);
                if self.buf.len() < FRAME_PREFIX_LEN {
                    // Garbage is refused as soon as it shows.
                    check_magic_and_version(&self.buf)?;
                    return Ok((used, None));
                }
                let (header_len, payload_len) = self.parse_prefix()?;
                self.buf.clear();
                self.state = DecodeState::Header {
                    header_len,
                    payload_len,
                };
                Ok((used, self.complete_if_ready()?))
            }
            DecodeState::Header { header_len, .. } => {
                let used = fill(&mut self.buf, bytes, *header_len);
                Ok((used, self.complete_if_ready()?))
            }
            DecodeState::Payload { payload, .. } => {
                let n = payload.fill(bytes);
                Ok((n, self.complete_if_ready()?))
            }
        }
    }

    fn parse_prefix(&self) -> Result<(usize, usize), CodecError> {
        let b = &self.buf;
        check_magic_and_version(b)?;
        let header_len = u32::from_le_bytes(b[6..10].try_into().expect("4 bytes"));
        let payload_len = u64::from_le_bytes(b[10..18].try_into().expect("8 bytes"));
        let limits = self.current();
        if header_len > limits.header_bytes() {
            return Err(CodecError::HeaderTooLarge {
                len: header_len,
                max: limits.header_bytes(),
            });
        }
        if payload_len > limits.max_payload_bytes {
            return Err(CodecError::PayloadTooLarge {
                len: payload_len,
                max: limits.max_payload_bytes,
            });
        }
        if payload_len % 4 != 0 {
            return Err(CodecError::PayloadMisaligned(payload_len));
        }
        let payload_len =
            usize::try_from(payload_len).map_err(|_| CodecError::PayloadTooLarge {
                len: payload_len,
                max: usize::MAX as u64,
            })?;
        Ok((header_len as usize, payload_len))
    }

    /// Advances the state when the current part is complete.
    fn complete_if_ready(&mut self) -> Result<Option<Message>, CodecError> {
        loop {
            match &mut self.state {
                DecodeState::Prefix => return Ok(None),
                DecodeState::Header {
                    header_len,
                    payload_len,
                } => {
                    if self.buf.len() < *header_len {
                        return Ok(None);
                    }
                    let payload_len = *payload_len;
                    let message = decode_header(&self.buf)?;
                    self.buf.clear();
                    let carries = message.payload().is_some();
                    if !carries && payload_len > 0 {
                        return Err(CodecError::PayloadPresence {
                            kind: message.kind(),
                            expected: false,
                        });
                    }
                    if !carries {
                        self.state = DecodeState::Prefix;
                        return Ok(Some(message));
                    }
                    self.state = DecodeState::Payload {
                        message: Box::new(message),
                        payload: PayloadBuffer::new(payload_len / 4),
                    };
                }
                DecodeState::Payload { payload, .. } => {
                    if !payload.is_complete() {
                        return Ok(None);
                    }
                    let DecodeState::Payload {
                        mut message,
                        payload,
                    } = std::mem::replace(&mut self.state, DecodeState::Prefix)
                    else {
                        unreachable!("state checked above")
                    };
                    let mut values = payload.words;
                    if cfg!(target_endian = "big") {
                        for v in &mut values {
                            *v = v.swap_bytes();
                        }
                    }
                    let placed = message.set_payload(values);
                    debug_assert!(placed, "payload message");
                    return Ok(Some(*message));
                }
            }
        }
    }
}

/// Checks the magic and the version as far as `prefix` holds them.
fn check_magic_and_version(prefix: &[u8]) -> Result<(), CodecError> {
    if let Some(magic) = prefix.get(0..4) {
        let magic: [u8; 4] = magic.try_into().expect("4 bytes");
        if magic != FRAME_MAGIC {
            return Err(CodecError::BadMagic(magic));
        }
    }
    if let Some(&[lo, hi]) = prefix.get(4..6) {
        let version = u16::from_le_bytes([lo, hi]);
        if version != PROTOCOL_VERSION {
            return Err(CodecError::UnsupportedVersion { got: version });
        }
    }
    Ok(())
}

/// Appends up to `want - buf.len()` bytes; returns how many were taken.
fn fill(buf: &mut Vec<u8>, bytes: &[u8], want: usize) -> usize {
    let n = want.saturating_sub(buf.len()).min(bytes.len());
    buf.extend_from_slice(&bytes[..n]);
    n
}

fn decode_header(bytes: &[u8]) -> Result<Message, CodecError> {
    use bincode::error::DecodeError;
    let (msg, used): (Message, usize) =
        bincode::serde::decode_from_slice(bytes, bincode_decode_config()).map_err(|e| match e {
            DecodeError::UnexpectedEnd { .. } | DecodeError::LimitExceeded => {
                CodecError::HeaderOverrun {
                    header_len: bytes.len(),
                }
            }
            other => CodecError::MalformedHeader(other.to_string()),
        })?;
    if used != bytes.len() {
        return Err(CodecError::TrailingHeaderBytes {
            trailing: bytes.len() - used,
        });
    }
    Ok(msg)
}

/// Decodes exactly one complete frame (tests, tools).
pub fn decode_one(bytes: &[u8], limits: FrameLimits) -> Result<Message, CodecError> {
    let mut decoder = FrameDecoder::new(limits);
    let mut msgs = decoder.push(bytes)?;
    decoder.finish()?;
    match msgs.len() {
        1 => Ok(msgs.pop().expect("one")),
        0 => Err(CodecError::FrameCount(0)),
        n => Err(CodecError::FrameCount(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::message::*;

    /// Before its hello is in, a peer cannot send a frame with a payload,
    /// however it splits it; after it, the model's limits apply.
    #[test]
    fn the_first_frame_is_held_to_the_hello_limits() {
        let hello = all_kinds().remove(0);
        let mut d = FrameDecoder::with_first_frame(FrameLimits::hello(), FrameLimits::for_model(3));
        let first = encode(&update(3)).unwrap().to_vec();
        assert!(matches!(
            d.push(&first[..20]),
            Err(CodecError::PayloadTooLarge { max: 0, .. })
        ));
        let mut d = FrameDecoder::with_first_frame(FrameLimits::hello(), FrameLimits::for_model(3));
        let mut stream = encode(&hello).unwrap().to_vec();
        stream.extend(encode(&update(3)).unwrap().to_vec());
        let got = d.push(&stream).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1], update(3));
    }

    fn update(n: usize) -> Message {
        Message::Update(Update {
            round: 7,
            num_examples: 600,
            train_loss: 0.25,
            delta: (0..n).map(|i| i as f32 * 0.5 - 3.0).collect(),
        })
    }

    fn all_kinds() -> Vec<Message> {
        let spec = ModelSpec {
            name: "cnn".into(),
            param_count: 3,
            shape_signature: [9; 32],
        };
        vec![
            Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                node_name: "node-a".into(),
                model: spec.clone(),
                num_examples: 10,
                data: DataSpec {
                    example_shape: vec![1, 28, 28],
                    num_classes: 2,
                    class_names: vec![ClassName("cat".into()), ClassName("dog".into())],
                    vocab_size: 0,
                },
            }),
            Message::Welcome(Welcome {
                version: PROTOCOL_VERSION,
                client_id: 4,
                model: spec,
            }),
            Message::RoundStart(RoundStart {
                round: 1,
                config: RoundConfig {
                    local_epochs: 5,
                    batch_size: 10,
                    max_local_steps: None,
                    learning_rate: 0.05,
                    seed: 42,
                    secure_aggregation: false,
                    dp: None,
                    prox_mu: 0.0,
                    local_optimizer: LocalOptimizer::Adam,
                },
                global_model: vec![1.0, -2.0, f32::MIN_POSITIVE],
            }),
            update(3),
            Message::Evaluation(Evaluation {
                round: 1,
                num_examples: 5,
                loss: 0.5,
                scores: crate::metrics::TaskScores::classification(0.9),
            }),
            Message::error(ReasonCode::WrongLength, "nope"),
            Message::Goodbye(Goodbye {
                rounds_completed: 3,
                reason: "done".into(),
            }),
            Message::SecAgg(SecAgg::MaskedInput {
                round: 2,
                masked: vec![0, u32::MAX, 7],
            }),
            Message::SecAgg(SecAgg::Shares {
                round: 2,
                shares: vec![EncryptedShare {
                    peer: 4,
                    ciphertext: vec![1, 2, 3],
                }],
            }),
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for msg in all_kinds() {
            let bytes = encode(&msg).unwrap().to_vec();
            assert_eq!(decode_one(&bytes, FrameLimits::default()).unwrap(), msg);
        }
    }

    #[test]
    fn payload_is_raw_little_endian_and_bit_exact() {
        let values = vec![f32::MIN, -0.0, 1.5e-40, f32::MAX, 3.25];
        let msg = Message::Update(Update {
            round: 1,
            num_examples: 1,
            train_loss: 0.0,
            delta: values.clone(),
        });
        let frame = encode(&msg).unwrap();
        assert_eq!(frame.payload.len(), values.len() * 4);
        assert_eq!(&frame.payload[12..16], &f32::MAX.to_le_bytes());
        let Message::Update(back) = decode_one(&frame.to_vec(), FrameLimits::default()).unwrap()
        else {
            panic!("wrong kind")
        };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back.delta), bits(&values));
    }

    #[test]
    fn decodes_any_split_of_a_stream() {
        let msgs = all_kinds();
        let stream: Vec<u8> = msgs
            .iter()
            .flat_map(|m| encode(m).unwrap().to_vec())
            .collect();
        for chunk in [1, 2, 3, 7, 17, 64, stream.len()] {
            let mut dec = FrameDecoder::new(FrameLimits::default());
            let mut got = Vec::new();
            for part in stream.chunks(chunk) {
                got.extend(dec.push(part).unwrap());
            }
            dec.finish().unwrap();
            assert_eq!(got, msgs, "chunk size {chunk}");
        }
    }

    #[test]
    fn rejects_garbage() {
        let err = decode_one(b"GET / HTTP/1.1\r\n\r\n", FrameLimits::default()).unwrap_err();
        assert!(matches!(err, CodecError::BadMagic(_)), "{err}");
        assert_eq!(err.reason(), ReasonCode::MalformedFrame);
    }

    #[test]
    fn rejects_oversized_payload_before_reading_it() {
        let bytes = encode(&update(100)).unwrap().to_vec();
        let limits = FrameLimits::for_model(97);
        let mut dec = FrameDecoder::new(limits);
        // The prefix alone is enough to refuse.
        let err = dec.push(&bytes[..FRAME_PREFIX_LEN]).unwrap_err();
        assert_eq!(err, CodecError::PayloadTooLarge { len: 400, max: 396 });
        assert_eq!(err.reason(), ReasonCode::FrameTooLarge);
        // Poisoned: later bytes are refused too.
        assert!(dec.push(&bytes[FRAME_PREFIX_LEN..]).is_err());
    }

    #[test]
    fn rejects_oversized_header() {
        let msg = Message::error(ReasonCode::Internal, "x".repeat(200));
        let bytes = encode(&msg).unwrap();
        let limits = FrameLimits {
            max_header_bytes: 100,
            ..FrameLimits::default()
        };
        let err = decode_one(&bytes.to_vec(), limits).unwrap_err();
        assert!(matches!(err, CodecError::HeaderTooLarge { max: 100, .. }));
    }

    #[test]
    fn rejects_wrong_version_and_misaligned_payload() {
        let mut bytes = encode(&update(2)).unwrap().to_vec();
        bytes[4] = 99;
        assert_eq!(
            decode_one(&bytes, FrameLimits::default()).unwrap_err(),
            CodecError::UnsupportedVersion { got: 99 }
        );
        let mut bytes = encode(&update(2)).unwrap().to_vec();
        bytes[10] = 7; // payload length 7
        assert_eq!(
            decode_one(&bytes, FrameLimits::default()).unwrap_err(),
            CodecError::PayloadMisaligned(7)
        );
    }

    #[test]
    fn rejects_corrupt_header_and_truncation() {
        let mut bytes = encode(&update(2)).unwrap().to_vec();
        bytes[FRAME_PREFIX_LEN] = 0xee; // enum tag out of range
        let err = decode_one(&bytes, FrameLimits::default()).unwrap_err();
        assert!(matches!(err, CodecError::MalformedHeader(_)), "{err}");

        let bytes = encode(&update(2)).unwrap().to_vec();
        let err = decode_one(&bytes[..bytes.len() - 1], FrameLimits::default()).unwrap_err();
        assert!(matches!(err, CodecError::Truncated { .. }), "{err}");
    }

    #[test]
    fn rejects_payload_on_a_message_without_one() {
        let msg = Message::error(ReasonCode::Internal, "x");
        let mut frame = encode(&msg).unwrap();
        frame.head[10] = 4;
        let mut bytes = frame.to_vec();
        bytes.extend_from_slice(&[0; 4]);
        let err = decode_one(&bytes, FrameLimits::default()).unwrap_err();
        assert!(matches!(
            err,
            CodecError::PayloadPresence {
                expected: false,
                ..
            }
        ));
    }

    #[test]
    fn a_stream_ending_before_the_payload_is_truncated() {
        // Before any payload byte: the header alone is no message.
        let msg = update(2);
        let frame = encode(&msg).unwrap();
        let mut dec = FrameDecoder::new(FrameLimits::default());
        assert!(dec.push(&frame.head).unwrap().is_empty());
        assert_eq!(
            dec.finish(),
            Err(CodecError::Truncated {
                buffered: frame.head.len()
            })
        );
    }

    #[test]
    fn messages_before_a_bad_frame_are_delivered_then_the_error() {
        let good = encode(&update(3)).unwrap().to_vec();
        let mut bytes = good.clone();
        bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let mut dec = FrameDecoder::new(FrameLimits::default());
        assert_eq!(dec.push(&bytes).unwrap(), vec![update(3)]);
        let err = CodecError::BadMagic(*b"GET ");
        assert_eq!(dec.finish(), Err(err.clone()));
        assert_eq!(dec.push(&[]), Err(err.clone()));
        assert_eq!(dec.push(&good), Err(err));
    }

    #[test]
    fn a_payload_split_inside_its_words_reassembles() {
        let msg = update(5);
        let bytes = encode(&msg).unwrap().to_vec();
        // Every byte once, in pieces of 1 to 5 bytes: most words of the
        // payload arrive in two pieces.
        let mut dec = FrameDecoder::new(FrameLimits::default());
        let mut got = Vec::new();
        let mut at = 0;
        for step in [1, 2, 3, 4, 5].iter().cycle() {
            if at >= bytes.len() {
                break;
            }
            let end = (at + step).min(bytes.len());
            got.extend(dec.push(&bytes[at..end]).unwrap());
            at = end;
        }
        dec.finish().unwrap();
        assert_eq!(got, vec![msg]);
    }

    #[test]
    fn fixed_int_header_stays_small() {
        // A varint config would vary; fixed-int keeps headers predictable.
        let msg = update(0);
        let frame = encode(&msg).unwrap();
        assert!(
            frame.head.len() < FRAME_PREFIX_LEN + 64,
            "{}",
            frame.head.len()
        );
    }
}
