//! The wire: versioned messages and the codec that frames them.

pub mod bounded;
pub mod codec;
pub mod message;

pub use codec::{CodecError, EncodedFrame, FrameDecoder, FrameLimits, decode_one, encode};
pub use message::*;
