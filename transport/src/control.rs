//! pagewire's control-connection protocol, version 1 (documented in docs/wire-format.md).
//!
//! The control connection carries the session's hello, the round markers, the end of the
//! session and errors. Every message is one frame:
//!
//! ```text
//! u32 length (big-endian, of type + body, 1..=MAX_FRAME) | u8 type | body
//! ```
//!
//! Encoding and decoding are sans-IO ([`Message::encode`], [`Message::decode`]); the blocking
//! helpers [`read_message`] / [`write_message`] wrap them for a `std::io` stream (the control
//! connection carries a few hundred bytes per round, so it does not need io_uring).

use std::io::{Read, Write};

use thiserror::Error;

use crate::wire::{BlockSpec, Compression, MAX_BLOCK_NAME};

/// First four bytes of a hello body.
pub const HELLO_MAGIC: [u8; 4] = *b"PWCP";
/// The control protocol version this build speaks.
pub const CONTROL_VERSION: u16 = 1;
/// Largest frame (type + body) either side accepts.
pub const MAX_FRAME: usize = 1 << 20;
/// Longest error message carried (longer ones are truncated by the sender).
pub const MAX_ERROR_MESSAGE: usize = 4096;
/// Most channels in a session.
pub const MAX_CHANNELS: u16 = 255;
/// Most pages per packet a session may use (bounds the header a receiver reads).
pub const MAX_PAGES_PER_PACKET: u32 = 1024;
/// Most memory blocks in a session.
pub const MAX_BLOCKS: usize = 4096;

/// Message type bytes.
pub mod msg_type {
    pub const HELLO: u8 = 1;
    pub const HELLO_OK: u8 = 2;
    pub const ROUND_END: u8 = 3;
    pub const ROUND_DONE: u8 = 4;
    pub const END: u8 = 5;
    pub const END_OK: u8 = 6;
    pub const ERROR: u8 = 7;
}

/// The session's parameters, sent by the sender as the first message.
///
/// Body layout: magic "PWCP", version u16, uuid [16], page_size u32, pages_per_packet u32,
/// compression u32 (the multifd flag value, 0x00 or 0x08), channels u16, features u32
/// (must be 0 in version 1), block count u16, then per block: name length u8 (1..=255),
/// name bytes (UTF-8, no NUL), size u64.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub uuid: [u8; 16],
    pub page_size: u32,
    pub pages_per_packet: u32,
    pub compression: Compression,
    pub channels: u16,
    pub blocks: Vec<BlockSpec>,
}

impl Hello {
    /// Check the hello's own consistency: page size a power of two in 512..=65536,
    /// pages_per_packet in 1..=MAX_PAGES_PER_PACKET, compression None or Qpl, channels in
    /// 1..=MAX_CHANNELS, 1..=MAX_BLOCKS blocks with unique non-empty names of at most
    /// MAX_BLOCK_NAME bytes without NUL, sizes non-zero multiples of page_size.
    pub fn validate(&self) -> Result<(), ControlError> {
        todo!()
    }
}

/// One control message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Sender → receiver, first message.
    Hello(Hello),
    /// Receiver → sender: hello accepted; channels may connect.
    HelloOk,
    /// Sender → receiver: every channel has sent its SYNC for `round`. Body: round u64.
    RoundEnd { round: u64 },
    /// Receiver → sender: every page of `round` is in guest memory. Body: round u64.
    RoundDone { round: u64 },
    /// Sender → receiver: no more rounds; the session is over once acknowledged.
    End,
    /// Receiver → sender: end acknowledged, everything applied.
    EndOk,
    /// Either direction: the session failed. Body: UTF-8 text, at most MAX_ERROR_MESSAGE bytes.
    Error { message: String },
}

/// Errors of the control protocol.
#[derive(Debug, Error)]
pub enum ControlError {
    #[error("control connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("control connection closed by peer")]
    Closed,
    #[error("control frame of {len} bytes (limit {limit})")]
    FrameTooLarge { len: usize, limit: usize },
    #[error("unknown control message type {0}")]
    UnknownType(u8),
    #[error("control message {msg}: truncated")]
    Truncated { msg: &'static str },
    #[error("control message {msg}: {extra} trailing bytes")]
    Trailing { msg: &'static str, extra: usize },
    #[error("hello: bad magic {0:02x?} (not a pagewire control connection)")]
    BadMagic([u8; 4]),
    #[error("hello: control protocol version {got} not supported (this build speaks {supported})")]
    UnsupportedVersion { got: u16, supported: u16 },
    #[error("{msg}: field {field}: {detail}")]
    Invalid { msg: &'static str, field: &'static str, detail: String },
}

impl Message {
    /// A whole frame: length, type, body.
    pub fn encode(&self) -> Vec<u8> {
        todo!()
    }

    /// Decode one frame's type + body (the bytes after the length word). Validates a Hello
    /// with [`Hello::validate`]. Never panics, whatever the bytes.
    pub fn decode(frame: &[u8]) -> Result<Message, ControlError> {
        todo!()
    }

    /// Short name for logs ("hello", "round-end", ...).
    pub fn name(&self) -> &'static str {
        todo!()
    }
}

/// Read one message: the length word (rejecting 0 and > MAX_FRAME before allocating), then the
/// frame. EOF before the first byte is [`ControlError::Closed`]; EOF inside a frame is
/// [`ControlError::Truncated`]. Timeouts are the stream's (set with `set_read_timeout`).
pub fn read_message<R: Read>(r: &mut R) -> Result<Message, ControlError> {
    todo!()
}

/// Write one message as a single frame.
pub fn write_message<W: Write>(w: &mut W, msg: &Message) -> Result<(), ControlError> {
    todo!()
}
