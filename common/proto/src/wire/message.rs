//! The messages of the fedveil round protocol, version [`PROTOCOL_VERSION`].
//!
//! Every message is a small serde header plus, for the messages that carry a
//! model or an update, one bulk vector. The bulk vector is marked
//! `#[serde(skip)]` so it never goes through serde element by element: the
//! codec ([`super::codec`]) writes it as one raw little-endian blob after the
//! header and puts it back on decode.
//!
//! Every variable-length field (strings, byte strings, lists) decodes
//! through [`super::bounded`], so a length read from the wire never
//! allocates more than the frame holds. A new such field must too: the
//! length-forging test in `common/tests/wire_limits.rs` fails otherwise.

use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change to the messages or the frame layout.
pub const PROTOCOL_VERSION: u16 = 7;

/// Identifies a model architecture and its exact parameter layout.
///
/// Two peers agree on a model only if both the name and the shape signature
/// (a hash over every parameter's path and shape, in flattening order) match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// The model's name (for messages).
    #[serde(deserialize_with = "crate::wire::bounded::string")]
    pub name: String,
    /// Number of parameter values.
    pub param_count: u64,
    /// SHA-256 over the tensors' paths and shapes: equal models have equal signatures.
    pub shape_signature: [u8; 32],
}

/// What a client is asked to do in one round. Every client of a cohort gets
/// the same config, so the round is reproducible from it and the seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundConfig {
    /// Passes over the local data.
    pub local_epochs: u32,
    /// Examples per minibatch.
    pub batch_size: u32,
    /// Caps local training at this many minibatch steps (over all epochs),
    /// so clients with large shards do bounded work per round.
    pub max_local_steps: Option<u32>,
    /// Local learning rate.
    pub learning_rate: f32,
    /// Seeds the client's minibatch shuffling (mixed with the round and client).
    pub seed: u64,
    /// Updates go through SecAgg+; a [`SecAgg::Setup`] follows the round start.
    pub secure_aggregation: bool,
    /// The differential-privacy step every client applies to its update.
    pub dp: Option<crate::dp::DpRound>,
    /// FedProx (Li et al. 2020): weight mu of the proximal term
    /// (mu / 2) ||w - w_global||^2 in the local objective; 0 is plain SGD.
    pub prox_mu: f32,
    /// The optimizer of local training.
    pub local_optimizer: LocalOptimizer,
}

impl Default for RoundConfig {
    /// One epoch of plain SGD, batches of 20 at learning rate 0.05, seed 0,
    /// no secure aggregation, no DP.
    fn default() -> Self {
        Self {
            local_epochs: 1,
            batch_size: 20,
            max_local_steps: None,
            learning_rate: 0.05,
            seed: 0,
            secure_aggregation: false,
            dp: None,
            prox_mu: 0.0,
            local_optimizer: LocalOptimizer::Sgd,
        }
    }
}

/// The optimizer a client trains with locally. Its state (Adam's moments)
/// starts fresh every round, so nothing but the model crosses rounds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LocalOptimizer {
    /// Plain minibatch SGD.
    #[default]
    Sgd,
    /// Adam (Kingma and Ba 2015) with its usual betas (0.9, 0.999): what
    /// transformers trained from scratch need to learn in few local steps.
    Adam,
}

impl std::str::FromStr for LocalOptimizer {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sgd" => Ok(Self::Sgd),
            "adam" => Ok(Self::Adam),
            _ => Err(format!("unknown local optimizer {s:?} (sgd or adam)")),
        }
    }
}

impl std::fmt::Display for LocalOptimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Sgd => "sgd",
            Self::Adam => "adam",
        })
    }
}

/// Client → server: first message on a connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The client's protocol version.
    pub version: u16,
    /// Human-readable node name, for logs.
    #[serde(deserialize_with = "crate::wire::bounded::string")]
    pub node_name: String,
    /// The model the client is able to train.
    pub model: ModelSpec,
    /// Number of local training examples (informational; weights come with updates).
    pub num_examples: u64,
    /// What the client's data looks like; the server refuses a node whose
    /// data does not match its own.
    pub data: DataSpec,
}

/// What a party's data is, as far as the model is concerned: the shape of
/// an example, the task and its classes. Two parties must agree on all of
/// it, class order included, or their models would disagree on what an
/// output means. The default is "unspecified" (a user's own data that
/// describes nothing), which matches only itself.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DataSpec {
    /// Shape of one example, e.g. `[1, 28, 28]` or `[30]`.
    #[serde(deserialize_with = "crate::wire::bounded::vec")]
    pub example_shape: Vec<u32>,
    /// Classes of a classification; 0 for a regression.
    pub num_classes: u32,
    /// Class names in id order, when the data names them.
    #[serde(deserialize_with = "crate::wire::bounded::vec")]
    pub class_names: Vec<ClassName>,
    /// Token vocabulary of text data; 0 otherwise.
    pub vocab_size: u32,
}

/// A class name, bounded like every string from the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClassName(#[serde(deserialize_with = "crate::wire::bounded::string")] pub String);

impl std::fmt::Display for DataSpec {
    /// `examples [30], 2 classes (malignant, benign)`, `examples [10],
    /// regression`, `token sequences [64] over 80 tokens, 4 classes`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if *self == Self::default() {
            return f.write_str("unspecified data");
        }
        match self.vocab_size {
            0 => write!(f, "examples {:?}", self.example_shape)?,
            v => write!(
                f,
                "token sequences {:?} over {v} tokens",
                self.example_shape
            )?,
        }
        match self.num_classes {
            0 => f.write_str(", regression"),
            n => {
                write!(f, ", {n} classes")?;
                if !self.class_names.is_empty() {
                    let names: Vec<&str> = self.class_names.iter().map(|c| c.0.as_str()).collect();
                    write!(f, " ({})", names.join(", "))?;
                }
                Ok(())
            }
        }
    }
}

/// Server → client: the client is admitted; `client_id` names it in this run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The server's protocol version.
    pub version: u16,
    /// The id the server gave this connection.
    pub client_id: u64,
    /// The model the run trains.
    pub model: ModelSpec,
}

/// Secure-aggregation settings of a round (the same for the whole cohort).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecAggParams {
    /// Shamir threshold t: shares needed to reconstruct a client's secrets.
    pub threshold: u32,
    /// Neighbours per client k in the communication graph.
    pub degree: u32,
    /// Masked values live in Z_(2^bits).
    pub bits: u32,
    /// Update values are clipped to [-clip, clip] before encoding.
    pub clip: f32,
    /// Example counts are capped here and sent as count / max_weight.
    pub max_weight: u64,
    /// Largest cohort the encoding leaves headroom for.
    pub max_cohort: u32,
    /// Fewest clients whose inputs may be unmasked together (0: only the
    /// protocol's own t + 1). Distributed DP calibrates its noise to it.
    pub min_survivors: u32,
}

/// One client's SecAgg+ view of a round: the settings and its neighbours.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecAggSetup {
    /// The round's SecAgg+ parameters.
    pub params: SecAggParams,
    /// The client ids of this client's neighbours.
    #[serde(deserialize_with = "crate::wire::bounded::vec")]
    pub neighbours: Vec<u64>,
}

/// Server → client: train on this global model with this config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundStart {
    /// The round number.
    pub round: u64,
    /// What the round asks of every cohort member.
    pub config: RoundConfig,
    /// The global model as a flat parameter vector (the payload).
    #[serde(skip)]
    pub global_model: Vec<f32>,
}

/// Client → server: the result of local training for `round`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Update {
    /// The round it belongs to.
    pub round: u64,
    /// Weight of this update in FedAvg (the number of examples trained on).
    pub num_examples: u64,
    /// Mean training loss over the last local epoch.
    pub train_loss: f32,
    /// `local_model - global_model`, flattened (the payload).
    #[serde(skip)]
    pub delta: Vec<f32>,
}

/// Client → server: the received global model evaluated on the client's data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// The round it belongs to.
    pub round: u64,
    /// Examples evaluated.
    pub num_examples: u64,
    /// Mean loss.
    pub loss: f32,
    /// The task's metrics (accuracy, or MSE and MAE).
    pub scores: crate::metrics::TaskScores,
}

/// A client's public keys for one round: one for share encryption, one for
/// pairwise masks (X25519).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerKeys {
    /// The client id they belong to.
    pub id: u64,
    /// X25519 public key for encrypting shares.
    pub enc_pk: [u8; 32],
    /// X25519 public key for pairwise masks.
    pub mask_pk: [u8; 32],
    /// What the node was asked to train on: the [`crate::secagg::round_digest`]
    /// of the global model and round config it received. Neighbours whose
    /// digests differ refuse the round, so a server cannot single out one
    /// node with a model of its own (Pasquini et al., CCS 2022).
    pub round_digest: [u8; 32],
    /// The node's enrolled certificate and its signature over these keys
    /// and the round: peers check both before using the keys, so the
    /// server cannot substitute keys of its own.
    pub attestation: Option<KeyAttestation>,
}

/// A node's signature over its round keys (see [`crate::secagg::keys_message`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyAttestation {
    /// The node's client certificate (DER), issued by the server's CA.
    #[serde(deserialize_with = "crate::wire::bounded::bytes")]
    pub certificate: Vec<u8>,
    /// ECDSA P-256 / SHA-256 signature (ASN.1 DER).
    #[serde(deserialize_with = "crate::wire::bounded::bytes")]
    pub signature: Vec<u8>,
}

/// An AEAD-encrypted pair of Shamir shares between two clients, routed
/// through the server. `peer` is the recipient (client → server) or the
/// sender (server → client).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptedShare {
    /// The neighbour it is for (on the way in) or from (on the way out).
    pub peer: u64,
    /// The AEAD-sealed shares.
    #[serde(deserialize_with = "crate::wire::bounded::bytes")]
    pub ciphertext: Vec<u8>,
}

/// A share revealed for unmasking: of `owner`'s secret, held by the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevealedShare {
    /// Whose secret the share is of.
    pub owner: u64,
    /// The Shamir share.
    pub share: [u8; 32],
}

/// A neighbour's signature over a round's survivor set, forwarded by the
/// server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SurvivorSignature {
    /// The client that signed.
    pub signer: u64,
    /// Its signature.
    #[serde(deserialize_with = "crate::wire::bounded::bytes")]
    pub signature: Vec<u8>,
}

/// SecAgg+ messages after the round start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SecAgg {
    /// Server → client: this round's settings and my neighbours.
    Setup {
        /// The round.
        round: u64,
        /// Its settings.
        setup: SecAggSetup,
    },
    /// Client → server: my public keys.
    AdvertiseKeys {
        /// The round.
        round: u64,
        /// The keys, signed for enrolled nodes.
        keys: PeerKeys,
    },
    /// Server → client: my neighbours' public keys.
    PeerKeys {
        /// The round.
        round: u64,
        /// Each neighbour's keys.
        #[serde(deserialize_with = "crate::wire::bounded::vec")]
        peers: Vec<PeerKeys>,
    },
    /// Client → server: encrypted shares, one per neighbour.
    Shares {
        /// The round.
        round: u64,
        /// One per neighbour.
        #[serde(deserialize_with = "crate::wire::bounded::vec")]
        shares: Vec<EncryptedShare>,
    },
    /// Server → client: shares my neighbours made for me.
    PeerShares {
        /// The round.
        round: u64,
        /// One from each neighbour.
        #[serde(deserialize_with = "crate::wire::bounded::vec")]
        shares: Vec<EncryptedShare>,
    },
    /// Client → server: the masked, encoded update (the payload).
    MaskedInput {
        /// The round.
        round: u64,
        /// The masked values (travel as the frame's payload).
        #[serde(skip)]
        masked: Vec<u32>,
    },
    /// Server → client: every client whose masked input arrived (U3, in
    /// ascending order), for each of them to sign (Bonawitz et al.'s
    /// consistency check).
    ConsistencyCheck {
        /// The round.
        round: u64,
        /// The survivors, ascending.
        #[serde(deserialize_with = "crate::wire::bounded::vec")]
        survivors: Vec<u64>,
    },
    /// Client → server: my signature over the round and the survivor set
    /// (see [`crate::secagg::survivors_message`]); empty without an
    /// enrolled identity.
    SurvivorsSigned {
        /// The round.
        round: u64,
        /// The signature (ECDSA P-256 / SHA-256, ASN.1 DER).
        #[serde(deserialize_with = "crate::wire::bounded::bytes")]
        signature: Vec<u8>,
    },
    /// Server → client: my neighbours' signatures over the same survivor
    /// set; with at least t of them valid, I reveal my shares for it.
    UnmaskRequest {
        /// The round.
        round: u64,
        /// One per neighbour that signed.
        #[serde(deserialize_with = "crate::wire::bounded::vec")]
        signatures: Vec<SurvivorSignature>,
    },
    /// Client → server: self-mask shares of survivors, mask-key shares of
    /// dropped neighbours (never both for one peer).
    UnmaskShares {
        /// The round.
        round: u64,
        /// Shares of survivors' self-mask seeds.
        #[serde(deserialize_with = "crate::wire::bounded::vec")]
        self_mask: Vec<RevealedShare>,
        /// Shares of dropped neighbours' mask keys.
        #[serde(deserialize_with = "crate::wire::bounded::vec")]
        mask_key: Vec<RevealedShare>,
    },
}

impl SecAgg {
    /// The round the message belongs to.
    pub fn round(&self) -> u64 {
        match self {
            SecAgg::Setup { round, .. }
            | SecAgg::AdvertiseKeys { round, .. }
            | SecAgg::PeerKeys { round, .. }
            | SecAgg::Shares { round, .. }
            | SecAgg::PeerShares { round, .. }
            | SecAgg::MaskedInput { round, .. }
            | SecAgg::ConsistencyCheck { round, .. }
            | SecAgg::SurvivorsSigned { round, .. }
            | SecAgg::UnmaskRequest { round, .. }
            | SecAgg::UnmaskShares { round, .. } => *round,
        }
    }

    /// The message's name, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
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
        }
    }
}

/// Why a peer refused something. Stable numeric codes travel on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u16)]
pub enum ReasonCode {
    /// Peer speaks another protocol version.
    VersionMismatch = 1,
    /// Peer trains another model (name or shape signature differ).
    ModelMismatch = 2,
    /// A frame could not be decoded.
    MalformedFrame = 3,
    /// A frame or payload exceeds the configured limit.
    FrameTooLarge = 4,
    /// A message that is not allowed in the current state.
    UnexpectedMessage = 5,
    /// An update for a round that is not the current one (late or replayed).
    StaleRound = 6,
    /// A second update for the same round.
    DuplicateUpdate = 7,
    /// Update length differs from the model's parameter count.
    WrongLength = 8,
    /// Update contains NaN or infinite values (or values too large for
    /// any model update to have).
    NonFinite = 9,
    /// Sample count of zero or above the limit.
    BadWeight = 10,
    /// Client was not selected for this round.
    NotInCohort = 11,
    /// Too many clients are connected.
    ServerFull = 12,
    /// The server is shutting down or the run is over.
    Shutdown = 13,
    /// A secure-aggregation message that breaks the protocol (unknown peer,
    /// bad share, wrong stage).
    SecAggViolation = 14,
    /// Enrolment: the token is unknown (mistyped, or from another server).
    TokenUnknown = 15,
    /// Enrolment: the token was already used.
    TokenUsed = 16,
    /// Enrolment: the token has expired.
    TokenExpired = 17,
    /// Enrolment: the token was issued for another node name.
    TokenNameMismatch = 18,
    /// Enrolment: another enrolled node already has this name.
    NameTaken = 19,
    /// Enrolment: the certificate signing request is invalid.
    BadCsr = 20,
    /// The connection has no (or no acceptable) client certificate.
    NotEnrolled = 21,
    /// The node's certificate was revoked.
    Revoked = 22,
    /// The hello names another node than the client certificate.
    IdentityMismatch = 23,
    /// The same node is already connected.
    AlreadyConnected = 24,
    /// The server cannot enrol nodes (its CA key is not on this machine).
    EnrolmentDisabled = 25,
    /// The node's data (shape, task or classes) differs from the server's.
    DataMismatch = 26,
    /// Anything else; see the detail text.
    Internal = 100,
    /// Client → server: the client leaves the current round (it refuses
    /// what the round asks, or saw a peer or the server break SecAgg+) and
    /// stays in the run. Listed last: serde numbers variants in order.
    LeftRound = 27,
    /// Server → node: one more round would take the node past the
    /// server's population budget (epsilon over all its runs).
    BudgetSpent = 28,
    /// Server → node: renewal opens later in the certificate's life.
    RenewalTooEarly = 29,
}

/// Either side: a refusal with a reason code and a human-readable detail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorMessage {
    /// Why, as a reason code.
    pub code: ReasonCode,
    /// The explanation (bounded length).
    #[serde(deserialize_with = "crate::wire::bounded::string")]
    pub detail: String,
}

/// Server → client: the run has ended (or the client is no longer needed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Goodbye {
    /// Rounds the server completed.
    pub rounds_completed: u64,
    /// Why the session ends.
    #[serde(deserialize_with = "crate::wire::bounded::string")]
    pub reason: String,
}

/// Enrolling node → server, on an enrolment connection: a one-time token
/// and a CSR for the node's locally generated key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrolRequest {
    /// The node's protocol version.
    pub version: u16,
    /// The one-time token.
    #[serde(deserialize_with = "crate::wire::bounded::string")]
    pub token: String,
    /// The name to enrol as; `None` takes the name the token was issued for.
    #[serde(deserialize_with = "crate::wire::bounded::opt_string")]
    pub node_name: Option<String>,
    /// PKCS#10 certificate signing request (DER).
    #[serde(deserialize_with = "crate::wire::bounded::bytes")]
    pub csr: Vec<u8>,
}

/// Enrolled node → server, over its current mutual-TLS identity: a CSR
/// for a fresh key, to replace a certificate before it expires.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RenewRequest {
    /// The node's protocol version.
    pub version: u16,
    /// A CSR (DER) for the node's new key.
    #[serde(deserialize_with = "crate::wire::bounded::bytes")]
    pub csr: Vec<u8>,
}

/// Server → node: the issued client certificate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Enrolled {
    /// The client certificate (DER).
    #[serde(deserialize_with = "crate::wire::bounded::bytes")]
    pub certificate: Vec<u8>,
    /// The CA certificate (DER) the node trusts from now on.
    #[serde(deserialize_with = "crate::wire::bounded::bytes")]
    pub ca_certificate: Vec<u8>,
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// Client → server: the first message of a training connection.
    Hello(Hello),
    /// Server → client: admitted.
    Welcome(Welcome),
    /// Server → client: train this round.
    RoundStart(RoundStart),
    /// Client → server: a plaintext update.
    Update(Update),
    /// Client → server: the global model's scores on local data.
    Evaluation(Evaluation),
    /// Either way: a refusal, with a reason code.
    Error(ErrorMessage),
    /// Server → client: the run is over for this client.
    Goodbye(Goodbye),
    /// Either way: a SecAgg+ step.
    SecAgg(SecAgg),
    /// Node → server: enrol with a token.
    EnrolRequest(EnrolRequest),
    /// Node → server: renew the certificate.
    RenewRequest(RenewRequest),
    /// Server → node: the issued certificate.
    Enrolled(Enrolled),
}

/// A message's bulk vector, borrowed for encoding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Payload<'a> {
    /// f32 values (updates, global models).
    F32(&'a [f32]),
    /// u32 values (masked SecAgg+ inputs).
    U32(&'a [u32]),
}

impl Message {
    /// Short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Welcome(_) => "welcome",
            Message::RoundStart(_) => "round-start",
            Message::Update(_) => "update",
            Message::Evaluation(_) => "evaluation",
            Message::Error(_) => "error",
            Message::Goodbye(_) => "goodbye",
            Message::SecAgg(m) => m.kind(),
            Message::EnrolRequest(_) => "enrol-request",
            Message::RenewRequest(_) => "renew-request",
            Message::Enrolled(_) => "enrolled",
        }
    }

    /// The round a message belongs to, for the messages of a round.
    pub fn round(&self) -> Option<u64> {
        match self {
            Message::RoundStart(m) => Some(m.round),
            Message::Update(m) => Some(m.round),
            Message::Evaluation(m) => Some(m.round),
            Message::SecAgg(m) => Some(m.round()),
            _ => None,
        }
    }

    /// The bulk vector this message carries outside its serde header, if any.
    pub fn payload(&self) -> Option<Payload<'_>> {
        match self {
            Message::RoundStart(m) => Some(Payload::F32(&m.global_model)),
            Message::Update(m) => Some(Payload::F32(&m.delta)),
            Message::SecAgg(SecAgg::MaskedInput { masked, .. }) => Some(Payload::U32(masked)),
            _ => None,
        }
    }

    /// Puts a decoded payload (as raw 32-bit words) into place; returns
    /// false for messages without one.
    pub(crate) fn set_payload(&mut self, words: Vec<u32>) -> bool {
        match self {
            Message::RoundStart(m) => m.global_model = bytemuck::allocation::cast_vec(words),
            Message::Update(m) => m.delta = bytemuck::allocation::cast_vec(words),
            Message::SecAgg(SecAgg::MaskedInput { masked, .. }) => *masked = words,
            _ => return false,
        }
        true
    }

    /// An error message with `code` and `detail`.
    pub fn error(code: ReasonCode, detail: impl Into<String>) -> Self {
        Message::Error(ErrorMessage {
            code,
            detail: detail.into(),
        })
    }
}
