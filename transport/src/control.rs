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
/// The control protocol version this build speaks (3: the control connection opens with
/// [`CONTROL_PREAMBLE`]).
pub const CONTROL_VERSION: u16 = 3;
/// The first bytes a sender writes on a control connection (after TLS, when used), before it
/// reads the receiver's challenge. They tell a receiver at once that the connection is a
/// control connection and not a channel (whose first bytes are a token or an init packet,
/// `0x11223344...`), so a receiver serving a session can answer a second sender "busy" at
/// once instead of waiting for a channel's init packet that never comes.
pub const CONTROL_PREAMBLE: [u8; 8] = *b"PWCTRL\r\n";
/// Length of the session nonces.
pub const NONCE_LEN: usize = 32;
/// Length of an HMAC-SHA256 tag.
pub const MAC_LEN: usize = 32;
/// Hello feature bit: the hello carries the sender's nonce and its HMAC proof.
pub const FEATURE_AUTH: u32 = 1;
/// Hello feature bit: every channel opens with a SYNC packet right after its init packet, as
/// QEMU's source does at setup (docs/wire-format.md, "Cadence"). That SYNC ends no round.
pub const FEATURE_OPENING_SYNC: u32 = 2;
/// Every feature bit this build understands.
pub const KNOWN_FEATURES: u32 = FEATURE_AUTH | FEATURE_OPENING_SYNC;
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
    pub const CHALLENGE: u8 = 8;
    pub const STATE: u8 = 9;
    pub const POSTCOPY_PAGES: u8 = 10;
    pub const POSTCOPY: u8 = 11;
    pub const POSTCOPY_READY: u8 = 12;
    pub const POSTCOPY_DONE: u8 = 13;
    pub const POSTCOPY_RECONNECT: u8 = 14;
    pub const END_PENDING: u8 = 15;
    pub const ABANDON: u8 = 16;
}

/// The sender's half of the handshake's authentication, carried at the end of a hello when
/// the `FEATURE_AUTH` bit is set: its own fresh nonce and an HMAC-SHA256 proof that it knows
/// the shared secret, computed over the receiver's challenge nonce (see the engine's
/// `session::auth`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HelloAuth {
    pub nonce: [u8; NONCE_LEN],
    pub mac: [u8; MAC_LEN],
}

/// The session's parameters, sent by the sender as the first message.
///
/// Body layout: magic "PWCP", version u16, uuid \[16\], page_size u32, pages_per_packet u32,
/// compression u32 (the multifd flag value, 0x00 or 0x08), channels u16, features u32
/// (any of `FEATURE_AUTH`, `FEATURE_OPENING_SYNC`), block count u16, then per block: name length u8 (1..=255),
/// name bytes (UTF-8, no NUL), size u64; then, with `FEATURE_AUTH`, the sender's nonce \[32\]
/// and its proof \[32\].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub uuid: [u8; 16],
    pub page_size: u32,
    pub pages_per_packet: u32,
    pub compression: Compression,
    pub channels: u16,
    pub blocks: Vec<BlockSpec>,
    /// Present when the sender authenticates (a shared secret is configured).
    pub auth: Option<HelloAuth>,
    /// Every channel opens with a SYNC after its init packet (`FEATURE_OPENING_SYNC`).
    pub opening_sync: bool,
}

impl Hello {
    /// Check the hello's own consistency: page size a power of two in 512..=65536,
    /// pages_per_packet in 1..=MAX_PAGES_PER_PACKET, compression None or Qpl, channels in
    /// 1..=MAX_CHANNELS, 1..=MAX_BLOCKS blocks with unique non-empty names of at most
    /// MAX_BLOCK_NAME bytes without NUL, sizes non-zero multiples of page_size.
    pub fn validate(&self) -> Result<(), ControlError> {
        let ps = self.page_size;
        if !ps.is_power_of_two() || !(512..=65536).contains(&ps) {
            return Err(invalid(
                "hello",
                "page_size",
                format!("{ps}, expected a power of two in 512..=65536"),
            ));
        }
        if !(1..=MAX_PAGES_PER_PACKET).contains(&self.pages_per_packet) {
            return Err(invalid(
                "hello",
                "pages_per_packet",
                format!(
                    "{}, expected 1..={MAX_PAGES_PER_PACKET}",
                    self.pages_per_packet
                ),
            ));
        }
        if !matches!(self.compression, Compression::None | Compression::Qpl) {
            return Err(invalid(
                "hello",
                "compression",
                format!(
                    "{} ({:#04x}), expected none (0x00) or qpl (0x08)",
                    self.compression.name(),
                    self.compression.flag()
                ),
            ));
        }
        if !(1..=MAX_CHANNELS).contains(&self.channels) {
            return Err(invalid(
                "hello",
                "channels",
                format!("{}, expected 1..={MAX_CHANNELS}", self.channels),
            ));
        }
        if !(1..=MAX_BLOCKS).contains(&self.blocks.len()) {
            return Err(invalid(
                "hello",
                "block_count",
                format!("{}, expected 1..={MAX_BLOCKS}", self.blocks.len()),
            ));
        }
        let mut seen = std::collections::HashSet::with_capacity(self.blocks.len());
        for (i, b) in self.blocks.iter().enumerate() {
            if b.name.is_empty() || b.name.len() > MAX_BLOCK_NAME || b.name.contains('\0') {
                return Err(invalid(
                    "hello",
                    "block_name",
                    format!(
                        "block {i}: {:?} ({} bytes), expected 1..={MAX_BLOCK_NAME} bytes without NUL",
                        b.name,
                        b.name.len()
                    ),
                ));
            }
            if !seen.insert(b.name.as_str()) {
                return Err(invalid(
                    "hello",
                    "block_name",
                    format!("block {i}: {:?} appears twice", b.name),
                ));
            }
            if b.size == 0 || b.size % u64::from(ps) != 0 {
                return Err(invalid(
                    "hello",
                    "block_size",
                    format!(
                        "block {i} {:?}: {}, expected a non-zero multiple of page_size {ps}",
                        b.name, b.size
                    ),
                ));
            }
        }
        // A hello must fit in one frame (4096 blocks of 255-byte names would not).
        let frame = 1 + self.body_len();
        if frame > MAX_FRAME {
            return Err(invalid(
                "hello",
                "block_count",
                format!(
                    "{} blocks make a {frame}-byte hello, over the {MAX_FRAME}-byte frame limit",
                    self.blocks.len()
                ),
            ));
        }
        Ok(())
    }

    /// Bytes of the body before the block list.
    const FIXED_BODY: usize = 4 + 2 + 16 + 4 + 4 + 4 + 2 + 4 + 2;

    /// Body length as [`Hello::encode_body`] writes it.
    fn body_len(&self) -> usize {
        let blocks = self.blocks.len().min(usize::from(u16::MAX));
        Self::FIXED_BODY
            + self.blocks[..blocks]
                .iter()
                .map(|b| 1 + b.name.len().min(usize::from(u8::MAX)) + 8)
                .sum::<usize>()
            + if self.auth.is_some() {
                NONCE_LEN + MAC_LEN
            } else {
                0
            }
    }

    /// Append the body. Does not validate: a name longer than 255 bytes or more than
    /// 65535 blocks are cut (the receiver's validation then rejects the hello).
    fn encode_body(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&HELLO_MAGIC);
        out.extend_from_slice(&CONTROL_VERSION.to_be_bytes());
        out.extend_from_slice(&self.uuid);
        out.extend_from_slice(&self.page_size.to_be_bytes());
        out.extend_from_slice(&self.pages_per_packet.to_be_bytes());
        out.extend_from_slice(&self.compression.flag().to_be_bytes());
        out.extend_from_slice(&self.channels.to_be_bytes());
        let mut features = 0;
        if self.auth.is_some() {
            features |= FEATURE_AUTH;
        }
        if self.opening_sync {
            features |= FEATURE_OPENING_SYNC;
        }
        out.extend_from_slice(&features.to_be_bytes());
        let count = self.blocks.len().min(usize::from(u16::MAX));
        // `count <= u16::MAX` by the line above.
        out.extend_from_slice(&(count as u16).to_be_bytes());
        for b in &self.blocks[..count] {
            let name = b.name.as_bytes();
            let name = &name[..name.len().min(usize::from(u8::MAX))];
            // `name.len() <= u8::MAX` by the line above.
            out.push(name.len() as u8);
            out.extend_from_slice(name);
            out.extend_from_slice(&b.size.to_be_bytes());
        }
        if let Some(a) = &self.auth {
            out.extend_from_slice(&a.nonce);
            out.extend_from_slice(&a.mac);
        }
    }

    /// Parse a body (everything after the type byte); checks magic, version, features,
    /// compression and the block count bound, then [`Hello::validate`].
    fn decode_body(body: &[u8]) -> Result<Hello, ControlError> {
        let mut r = Cursor::new(body, "hello");
        let magic: [u8; 4] = r.array()?;
        if magic != HELLO_MAGIC {
            return Err(ControlError::BadMagic(magic));
        }
        let version = r.u16()?;
        if version != CONTROL_VERSION {
            return Err(ControlError::UnsupportedVersion {
                got: version,
                supported: CONTROL_VERSION,
            });
        }
        let uuid: [u8; 16] = r.array()?;
        let page_size = r.u32()?;
        let pages_per_packet = r.u32()?;
        let compression = match r.u32()? {
            0x00 => Compression::None,
            0x08 => Compression::Qpl,
            other => {
                return Err(invalid(
                    "hello",
                    "compression",
                    format!("{other:#x}, expected 0x00 (none) or 0x08 (qpl)"),
                ))
            }
        };
        let channels = r.u16()?;
        let features = r.u32()?;
        if features & !KNOWN_FEATURES != 0 {
            return Err(invalid(
                "hello",
                "features",
                format!(
                    "{features:#x}, expected bits of {KNOWN_FEATURES:#x} only in control protocol version {CONTROL_VERSION}"
                ),
            ));
        }
        let count = usize::from(r.u16()?);
        if !(1..=MAX_BLOCKS).contains(&count) {
            return Err(invalid(
                "hello",
                "block_count",
                format!("{count}, expected 1..={MAX_BLOCKS}"),
            ));
        }
        // Bounded by MAX_BLOCKS just above.
        let mut blocks = Vec::with_capacity(count);
        for i in 0..count {
            let len = usize::from(r.u8()?);
            let raw = r.bytes(len)?;
            let name = std::str::from_utf8(raw).map_err(|e| {
                invalid(
                    "hello",
                    "block_name",
                    format!(
                        "block {i}: not UTF-8 ({e}): {:?}",
                        String::from_utf8_lossy(raw)
                    ),
                )
            })?;
            let size = r.u64()?;
            blocks.push(BlockSpec {
                name: name.to_owned(),
                size,
            });
        }
        let auth = if features & FEATURE_AUTH != 0 {
            Some(HelloAuth {
                nonce: r.array()?,
                mac: r.array()?,
            })
        } else {
            None
        };
        r.finish()?;
        let hello = Hello {
            uuid,
            page_size,
            pages_per_packet,
            compression,
            channels,
            blocks,
            auth,
            opening_sync: features & FEATURE_OPENING_SYNC != 0,
        };
        hello.validate()?;
        Ok(hello)
    }
}

fn invalid(msg: &'static str, field: &'static str, detail: String) -> ControlError {
    ControlError::Invalid { msg, field, detail }
}

/// Bounds-checked big-endian reader over a message body.
struct Cursor<'a> {
    buf: &'a [u8],
    msg: &'static str,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8], msg: &'static str) -> Self {
        Cursor { buf, msg }
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], ControlError> {
        if n > self.buf.len() {
            return Err(ControlError::Truncated { msg: self.msg });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], ControlError> {
        let b = self.bytes(N)?;
        b.try_into()
            .map_err(|_| ControlError::Truncated { msg: self.msg })
    }
    fn u8(&mut self) -> Result<u8, ControlError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, ControlError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, ControlError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, ControlError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    /// Every byte consumed, or a Trailing error.
    fn finish(self) -> Result<(), ControlError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ControlError::Trailing {
                msg: self.msg,
                extra: self.buf.len(),
            })
        }
    }
}

/// Name of a message type byte, for errors about a frame whose body is not decoded yet.
fn type_name(t: u8) -> &'static str {
    match t {
        msg_type::HELLO => "hello",
        msg_type::HELLO_OK => "hello-ok",
        msg_type::ROUND_END => "round-end",
        msg_type::ROUND_DONE => "round-done",
        msg_type::END => "end",
        msg_type::END_OK => "end-ok",
        msg_type::ERROR => "error",
        msg_type::CHALLENGE => "challenge",
        msg_type::STATE => "state",
        msg_type::POSTCOPY_PAGES => "postcopy-pages",
        msg_type::POSTCOPY => "postcopy",
        msg_type::POSTCOPY_READY => "postcopy-ready",
        msg_type::POSTCOPY_DONE => "postcopy-done",
        msg_type::POSTCOPY_RECONNECT => "postcopy-reconnect",
        msg_type::END_PENDING => "end-pending",
        msg_type::ABANDON => "abandon",
        _ => "frame",
    }
}

/// A text body (an error message, a reason): UTF-8, at most [`MAX_ERROR_MESSAGE`] bytes.
fn text(body: &[u8], msg: &'static str, field: &'static str) -> Result<String, ControlError> {
    if body.len() > MAX_ERROR_MESSAGE {
        return Err(invalid(
            msg,
            field,
            format!("{} bytes, expected at most {MAX_ERROR_MESSAGE}", body.len()),
        ));
    }
    std::str::from_utf8(body)
        .map(str::to_owned)
        .map_err(|e| invalid(msg, field, format!("not UTF-8 ({e})")))
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char boundary.
fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1; // terminates: 0 is always a char boundary
    }
    &s[..end]
}

/// One control message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Sender → receiver, first message.
    Hello(Hello),
    /// Sender → receiver: opaque device state (e.g. vCPU registers) the VMM sends with the
    /// last round, before `End`. Body: the bytes (at most `MAX_FRAME - 1`).
    State { data: Vec<u8> },
    /// Receiver → sender, first message on every control connection: a fresh nonce the
    /// sender's proof must cover, and whether a shared secret is required. Body: nonce \[32\],
    /// flags u8 (bit 0: secret required; other bits 0).
    Challenge {
        nonce: [u8; NONCE_LEN],
        secret_required: bool,
    },
    /// Receiver → sender: hello accepted; channels may connect. Body: flags u8 (bit 0:
    /// `fresh`, the receiver's memory is all zero and unwritten, so the sender's first round
    /// may leave out pages it knows were never written; other bits 0), then (when the hello
    /// authenticated) the receiver's own proof \[32\] over the sender's nonce.
    HelloOk {
        proof: Option<[u8; MAC_LEN]>,
        fresh: bool,
    },
    /// Sender → receiver: every channel has sent its SYNC for `round`. Body: round u64.
    RoundEnd { round: u64 },
    /// Receiver → sender: every page of `round` is in guest memory. Body: round u64.
    RoundDone { round: u64 },
    /// Sender → receiver: no more rounds; the session is over once acknowledged.
    End,
    /// Receiver → sender: end acknowledged, everything applied.
    EndOk,
    /// Receiver → sender, after `End` and before `EndOk`: every page is applied and the
    /// receiving side is still committing what it received (e.g. writing it to disk, loading
    /// the device state); sent at least once per third of the idle timeout so the sender keeps
    /// waiting for `EndOk` (or `Error`). Body: empty.
    EndPending,
    /// Either direction: the session failed. Body: UTF-8 text, at most MAX_ERROR_MESSAGE bytes.
    Error { message: String },
    /// Sender → receiver: the source abandoned the migration (its VMM gave up converging, or
    /// cancelled); the guest keeps running on the source, and the destination discards what
    /// it received. Sent before the channels close. Body: the reason, UTF-8 text, at most
    /// MAX_ERROR_MESSAGE bytes.
    Abandon { reason: String },
    /// Sender → receiver, before `Postcopy`: pages of block `block` that the destination does
    /// not hold yet (or holds stale) and that post-copy will deliver; the receiver discards
    /// them. Body: block u32, then runs of (first page offset u64, page count u64).
    PostcopyPages { block: u32, runs: Vec<(u64, u64)> },
    /// Sender → receiver: switch to post-copy; one urgent connection and `background`
    /// background connections follow. Body: background u16.
    Postcopy { background: u16 },
    /// Receiver → sender: pages discarded and memory registered; the sender now opens the
    /// post-copy connections. Body: empty.
    PostcopyReady,
    /// Receiver → sender: every post-copy page is placed. Body: empty.
    PostcopyDone,
    /// Sender → receiver: the post-copy connections broke; new ones follow once the receiver
    /// has answered with the pages it still lacks (`PostcopyPages`, receiver → sender) and
    /// `PostcopyReady`. Body: empty.
    PostcopyReconnect,
}

/// Most runs one `PostcopyPages` message carries (a frame stays below [`MAX_FRAME`]).
pub const MAX_POSTCOPY_RUNS: usize = (MAX_FRAME - 8) / 16;

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
    Invalid {
        msg: &'static str,
        field: &'static str,
        detail: String,
    },
}

impl Message {
    /// A whole frame: length, type, body.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16);
        out.extend_from_slice(&[0; 4]); // length, patched below
        out.push(self.type_byte());
        match self {
            Message::Hello(h) => {
                out.reserve(h.body_len());
                h.encode_body(&mut out);
            }
            Message::RoundEnd { round } | Message::RoundDone { round } => {
                out.extend_from_slice(&round.to_be_bytes());
            }
            Message::HelloOk { proof, fresh } => {
                out.push(u8::from(*fresh));
                if let Some(p) = proof {
                    out.extend_from_slice(p);
                }
            }
            Message::Challenge {
                nonce,
                secret_required,
            } => {
                out.extend_from_slice(nonce);
                out.push(u8::from(*secret_required));
            }
            Message::State { data } => out.extend_from_slice(data),
            Message::End
            | Message::EndOk
            | Message::EndPending
            | Message::PostcopyReady
            | Message::PostcopyDone
            | Message::PostcopyReconnect => {}
            Message::PostcopyPages { block, runs } => {
                out.extend_from_slice(&block.to_be_bytes());
                for (off, n) in runs {
                    out.extend_from_slice(&off.to_be_bytes());
                    out.extend_from_slice(&n.to_be_bytes());
                }
            }
            Message::Postcopy { background } => out.extend_from_slice(&background.to_be_bytes()),
            Message::Error { message } => {
                out.extend_from_slice(truncate_utf8(message, MAX_ERROR_MESSAGE).as_bytes());
            }
            Message::Abandon { reason } => {
                out.extend_from_slice(truncate_utf8(reason, MAX_ERROR_MESSAGE).as_bytes());
            }
        }
        // A frame is at most 1 + body; a hello that passed validate() fits in MAX_FRAME; an
        // unvalidated one is at most ~16 MiB (65535 blocks x 264 bytes), within u32.
        let len = u32::try_from(out.len() - 4).unwrap_or(u32::MAX);
        out[..4].copy_from_slice(&len.to_be_bytes());
        out
    }

    fn type_byte(&self) -> u8 {
        match self {
            Message::Hello(_) => msg_type::HELLO,
            Message::HelloOk { .. } => msg_type::HELLO_OK,
            Message::Challenge { .. } => msg_type::CHALLENGE,
            Message::State { .. } => msg_type::STATE,
            Message::RoundEnd { .. } => msg_type::ROUND_END,
            Message::RoundDone { .. } => msg_type::ROUND_DONE,
            Message::End => msg_type::END,
            Message::EndOk => msg_type::END_OK,
            Message::EndPending => msg_type::END_PENDING,
            Message::Error { .. } => msg_type::ERROR,
            Message::Abandon { .. } => msg_type::ABANDON,
            Message::PostcopyPages { .. } => msg_type::POSTCOPY_PAGES,
            Message::Postcopy { .. } => msg_type::POSTCOPY,
            Message::PostcopyReady => msg_type::POSTCOPY_READY,
            Message::PostcopyDone => msg_type::POSTCOPY_DONE,
            Message::PostcopyReconnect => msg_type::POSTCOPY_RECONNECT,
        }
    }

    /// Decode one frame's type + body (the bytes after the length word). Validates a Hello
    /// with [`Hello::validate`]. Never panics, whatever the bytes.
    pub fn decode(frame: &[u8]) -> Result<Message, ControlError> {
        let Some((&t, body)) = frame.split_first() else {
            return Err(ControlError::Truncated { msg: "frame" });
        };
        if frame.len() > MAX_FRAME {
            return Err(ControlError::FrameTooLarge {
                len: frame.len(),
                limit: MAX_FRAME,
            });
        }
        let name = type_name(t);
        let empty = |m: Message| {
            Cursor::new(body, name).finish()?;
            Ok(m)
        };
        let round = || -> Result<u64, ControlError> {
            let mut r = Cursor::new(body, name);
            let round = r.u64()?;
            r.finish()?;
            Ok(round)
        };
        match t {
            msg_type::HELLO => Ok(Message::Hello(Hello::decode_body(body)?)),
            msg_type::HELLO_OK => {
                let mut r = Cursor::new(body, name);
                let flags = r.u8()?;
                if flags > 1 {
                    return Err(invalid(
                        "hello-ok",
                        "flags",
                        format!("{flags:#04x}, expected 0 or 1"),
                    ));
                }
                let fresh = flags == 1;
                match body.len() - 1 {
                    0 => Ok(Message::HelloOk { proof: None, fresh }),
                    MAC_LEN => {
                        let proof = r.array()?;
                        r.finish()?;
                        Ok(Message::HelloOk {
                            proof: Some(proof),
                            fresh,
                        })
                    }
                    n => Err(invalid(
                        "hello-ok",
                        "proof",
                        format!("{n} bytes, expected 0 or {MAC_LEN}"),
                    )),
                }
            }
            msg_type::STATE => Ok(Message::State {
                data: body.to_vec(),
            }),
            msg_type::CHALLENGE => {
                let mut r = Cursor::new(body, name);
                let nonce = r.array()?;
                let flags = r.u8()?;
                r.finish()?;
                if flags & !1 != 0 {
                    return Err(invalid(
                        "challenge",
                        "flags",
                        format!("{flags:#x}, expected 0 or 1"),
                    ));
                }
                Ok(Message::Challenge {
                    nonce,
                    secret_required: flags & 1 != 0,
                })
            }
            msg_type::ROUND_END => Ok(Message::RoundEnd { round: round()? }),
            msg_type::ROUND_DONE => Ok(Message::RoundDone { round: round()? }),
            msg_type::END => empty(Message::End),
            msg_type::END_OK => empty(Message::EndOk),
            msg_type::END_PENDING => empty(Message::EndPending),
            msg_type::POSTCOPY_READY => empty(Message::PostcopyReady),
            msg_type::POSTCOPY_DONE => empty(Message::PostcopyDone),
            msg_type::POSTCOPY_RECONNECT => empty(Message::PostcopyReconnect),
            msg_type::POSTCOPY => {
                let mut r = Cursor::new(body, name);
                let background = r.u16()?;
                r.finish()?;
                Ok(Message::Postcopy { background })
            }
            msg_type::POSTCOPY_PAGES => {
                let mut r = Cursor::new(body, name);
                let block = r.u32()?;
                let rest = body.len() - 4;
                if rest % 16 != 0 {
                    return Err(invalid(
                        "postcopy-pages",
                        "runs",
                        format!("{rest} bytes, not a multiple of 16"),
                    ));
                }
                let mut runs = Vec::with_capacity(rest / 16);
                for _ in 0..rest / 16 {
                    let off = r.u64()?;
                    let n = r.u64()?;
                    runs.push((off, n));
                }
                r.finish()?;
                Ok(Message::PostcopyPages { block, runs })
            }
            msg_type::ERROR => Ok(Message::Error {
                message: text(body, "error", "message")?,
            }),
            msg_type::ABANDON => Ok(Message::Abandon {
                reason: text(body, "abandon", "reason")?,
            }),
            other => Err(ControlError::UnknownType(other)),
        }
    }

    /// Short name for logs ("hello", "round-end", ...).
    pub fn name(&self) -> &'static str {
        type_name(self.type_byte())
    }
}

/// Read one message: the length word (rejecting 0 and > MAX_FRAME before allocating), then the
/// frame. EOF before the first byte is [`ControlError::Closed`]; EOF inside a frame is
/// [`ControlError::Truncated`]. Timeouts are the stream's (set with `set_read_timeout`).
pub fn read_message<R: Read>(r: &mut R) -> Result<Message, ControlError> {
    let mut len_buf = [0u8; 4];
    let mut got = 0;
    while got < len_buf.len() {
        match r.read(&mut len_buf[got..]) {
            Ok(0) if got == 0 => return Err(ControlError::Closed),
            Ok(0) => return Err(ControlError::Truncated { msg: "frame" }),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ControlError::Io(e)),
        }
    }
    let len = u32::from_be_bytes(len_buf) as usize;
    if len == 0 {
        return Err(invalid(
            "frame",
            "length",
            format!("0, expected 1..={MAX_FRAME}"),
        ));
    }
    if len > MAX_FRAME {
        return Err(ControlError::FrameTooLarge {
            len,
            limit: MAX_FRAME,
        });
    }
    // Grows with the bytes that actually arrive (never more than `len <= MAX_FRAME`).
    let mut frame = Vec::new();
    r.take(len as u64).read_to_end(&mut frame)?;
    if frame.len() < len {
        let msg = frame.first().map_or("frame", |&t| type_name(t));
        return Err(ControlError::Truncated { msg });
    }
    Message::decode(&frame)
}

/// Write the [`CONTROL_PREAMBLE`]: a sender's first bytes on a control connection.
pub fn write_preamble<W: Write>(w: &mut W) -> Result<(), ControlError> {
    w.write_all(&CONTROL_PREAMBLE)?;
    w.flush()?;
    Ok(())
}

/// Read and check the [`CONTROL_PREAMBLE`] (a receiver-side helper for peers that know the
/// connection is a control connection; the receiver's front door reads the first bytes itself
/// to tell control connections from channels).
pub fn read_preamble<R: Read>(r: &mut R) -> Result<(), ControlError> {
    let mut got = [0u8; CONTROL_PREAMBLE.len()];
    r.read_exact(&mut got).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ControlError::Truncated { msg: "preamble" },
        _ => ControlError::Io(e),
    })?;
    if got != CONTROL_PREAMBLE {
        return Err(invalid(
            "preamble",
            "bytes",
            format!("{got:02x?}, expected {CONTROL_PREAMBLE:02x?} (\"PWCTRL\\r\\n\")"),
        ));
    }
    Ok(())
}

/// Write one message as a single frame.
pub fn write_message<W: Write>(w: &mut W, msg: &Message) -> Result<(), ControlError> {
    w.write_all(&msg.encode())?;
    w.flush()?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io;

    fn hello() -> Hello {
        Hello {
            uuid: core::array::from_fn(|i| 0xA0 + i as u8),
            page_size: 4096,
            pages_per_packet: 128,
            compression: Compression::Qpl,
            channels: 2,
            blocks: vec![
                BlockSpec {
                    name: "pc.ram".into(),
                    size: 0x4000_0000,
                },
                BlockSpec {
                    name: "é".into(),
                    size: 0x1000,
                },
            ],
            auth: None,
            opening_sync: false,
        }
    }

    #[test]
    fn postcopy_messages_round_trip_and_reject_bad_bodies() {
        let msgs = [
            Message::PostcopyPages {
                block: 3,
                runs: vec![(0, 1), (0x2000, 7)],
            },
            Message::PostcopyPages {
                block: 0,
                runs: vec![],
            },
            Message::Postcopy { background: 2 },
            Message::PostcopyReady,
            Message::PostcopyDone,
            Message::PostcopyReconnect,
        ];
        for m in msgs {
            let enc = m.encode();
            assert_eq!(Message::decode(&enc[4..]).unwrap(), m);
        }
        let mut body = 1u32.to_be_bytes().to_vec();
        body.extend_from_slice(&[0; 15]);
        assert!(matches!(
            Message::decode(&frame(msg_type::POSTCOPY_PAGES, &body)[4..]),
            Err(ControlError::Invalid { field: "runs", .. })
        ));
        assert!(Message::decode(&frame(msg_type::POSTCOPY_PAGES, &[0; 3])[4..]).is_err());
        assert!(Message::decode(&frame(msg_type::POSTCOPY, &[0; 3])[4..]).is_err());
        assert!(Message::decode(&frame(msg_type::POSTCOPY_DONE, &[0])[4..]).is_err());
    }

    /// The frame `Message::encode` should produce, built by hand.
    fn frame(t: u8, body: &[u8]) -> Vec<u8> {
        let mut v = ((1 + body.len()) as u32).to_be_bytes().to_vec();
        v.push(t);
        v.extend_from_slice(body);
        v
    }

    fn invalid_field(r: Result<impl std::fmt::Debug, ControlError>) -> &'static str {
        match r {
            Err(ControlError::Invalid { field, .. }) => field,
            other => panic!("expected an Invalid error, got {other:?}"),
        }
    }

    // ---- layout -------------------------------------------------------------------------

    #[test]
    fn hello_layout_is_pinned() {
        let mut body = Vec::new();
        body.extend_from_slice(b"PWCP");
        body.extend_from_slice(&[0, 3]); // version
        body.extend_from_slice(&hello().uuid);
        body.extend_from_slice(&[0, 0, 0x10, 0]); // page_size
        body.extend_from_slice(&[0, 0, 0, 128]); // pages_per_packet
        body.extend_from_slice(&[0, 0, 0, 0x08]); // compression
        body.extend_from_slice(&[0, 2]); // channels
        body.extend_from_slice(&[0, 0, 0, 0]); // features
        body.extend_from_slice(&[0, 2]); // block count
        body.push(6);
        body.extend_from_slice(b"pc.ram");
        body.extend_from_slice(&[0, 0, 0, 0, 0x40, 0, 0, 0]);
        body.push(2);
        body.extend_from_slice(&[0xC3, 0xA9]);
        body.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x10, 0]);
        assert_eq!(body.len(), 42 + 15 + 11);
        let want = frame(1, &body);
        let msg = Message::Hello(hello());
        assert_eq!(msg.encode(), want);
        assert_eq!(Message::decode(&want[4..]).unwrap(), msg);
        // With authentication: feature bit 1, then the sender's nonce and proof at the end.
        let mut auth_body = body.clone();
        auth_body[36..40].copy_from_slice(&[0, 0, 0, 1]);
        auth_body.extend_from_slice(&[0x11; 32]);
        auth_body.extend_from_slice(&[0x22; 32]);
        let h = Hello {
            auth: Some(HelloAuth {
                nonce: [0x11; 32],
                mac: [0x22; 32],
            }),
            ..hello()
        };
        assert_eq!(Message::Hello(h.clone()).encode(), frame(1, &auth_body));
        assert_eq!(
            Message::decode(&frame(1, &auth_body)[4..]).unwrap(),
            Message::Hello(h)
        );
        // The feature bit without the 64 bytes is truncated.
        let mut short = body.clone();
        short[36..40].copy_from_slice(&[0, 0, 0, 1]);
        assert!(matches!(
            Message::decode(&frame(1, &short)[4..]),
            Err(ControlError::Truncated { .. })
        ));
        // Opening SYNC: feature bit 2, nothing more in the body.
        let mut sync_body = body.clone();
        sync_body[36..40].copy_from_slice(&[0, 0, 0, 2]);
        let h = Hello {
            opening_sync: true,
            ..hello()
        };
        assert_eq!(Message::Hello(h.clone()).encode(), frame(1, &sync_body));
        assert_eq!(
            Message::decode(&frame(1, &sync_body)[4..]).unwrap(),
            Message::Hello(h)
        );
    }

    #[test]
    fn challenge_and_hello_ok_layouts() {
        let c = Message::Challenge {
            nonce: [5; 32],
            secret_required: true,
        };
        let mut body = vec![5u8; 32];
        body.push(1);
        assert_eq!(c.encode(), frame(8, &body));
        assert_eq!(Message::decode(&frame(8, &body)[4..]).unwrap(), c);
        body[32] = 2;
        assert_eq!(
            invalid_field(Message::decode(&frame(8, &body)[4..])),
            "flags"
        );
        let ok = Message::HelloOk {
            proof: Some([9; 32]),
            fresh: true,
        };
        let mut body = vec![1];
        body.extend_from_slice(&[9; 32]);
        assert_eq!(ok.encode(), frame(2, &body));
        assert_eq!(Message::decode(&frame(2, &body)[4..]).unwrap(), ok);
        assert_eq!(
            invalid_field(Message::decode(&frame(2, &[0, 9, 9, 9, 9, 9])[4..])),
            "proof"
        );
        assert_eq!(
            invalid_field(Message::decode(&frame(2, &[2])[4..])),
            "flags"
        );
        assert!(matches!(
            Message::decode(&frame(2, &[])[4..]),
            Err(ControlError::Truncated { .. })
        ));
    }

    #[test]
    fn small_messages_layout_is_pinned() {
        let cases = [
            (
                Message::HelloOk {
                    proof: None,
                    fresh: false,
                },
                vec![0, 0, 0, 2, 2, 0],
            ),
            (
                Message::RoundEnd {
                    round: 0x0102_0304_0506_0708,
                },
                vec![0, 0, 0, 9, 3, 1, 2, 3, 4, 5, 6, 7, 8],
            ),
            (
                Message::RoundDone { round: 5 },
                vec![0, 0, 0, 9, 4, 0, 0, 0, 0, 0, 0, 0, 5],
            ),
            (Message::End, vec![0, 0, 0, 1, 5]),
            (Message::EndOk, vec![0, 0, 0, 1, 6]),
            (Message::EndPending, vec![0, 0, 0, 1, 15]),
            (
                Message::Error {
                    message: "no".into(),
                },
                vec![0, 0, 0, 3, 7, b'n', b'o'],
            ),
            (
                Message::Error {
                    message: String::new(),
                },
                vec![0, 0, 0, 1, 7],
            ),
            (
                Message::Abandon {
                    reason: "gave up".into(),
                },
                vec![0, 0, 0, 8, 16, b'g', b'a', b'v', b'e', b' ', b'u', b'p'],
            ),
        ];
        for (msg, bytes) in cases {
            assert_eq!(msg.encode(), bytes, "{msg:?}");
            assert_eq!(Message::decode(&bytes[4..]).unwrap(), msg);
        }
    }

    #[test]
    fn an_abandon_reason_is_bounded_utf8() {
        let mut f = vec![16u8];
        f.extend_from_slice(&[0xff, 0xfe]);
        assert_eq!(invalid_field(Message::decode(&f)), "reason");
        let mut f = vec![16u8];
        f.extend(std::iter::repeat_n(b'x', MAX_ERROR_MESSAGE + 1));
        assert_eq!(invalid_field(Message::decode(&f)), "reason");
        // Encoding cuts an over-long reason at a char boundary.
        let long = "é".repeat(MAX_ERROR_MESSAGE);
        let enc = Message::Abandon { reason: long }.encode();
        let Ok(Message::Abandon { reason }) = Message::decode(&enc[4..]) else {
            panic!("decodes");
        };
        assert!(reason.len() <= MAX_ERROR_MESSAGE && reason.chars().all(|c| c == 'é'));
    }

    #[test]
    fn names() {
        let all = [
            (Message::Hello(hello()), "hello"),
            (
                Message::HelloOk {
                    proof: None,
                    fresh: true,
                },
                "hello-ok",
            ),
            (Message::RoundEnd { round: 0 }, "round-end"),
            (Message::RoundDone { round: 0 }, "round-done"),
            (Message::End, "end"),
            (Message::EndOk, "end-ok"),
            (Message::EndPending, "end-pending"),
            (
                Message::Error {
                    message: "x".into(),
                },
                "error",
            ),
            (Message::Abandon { reason: "x".into() }, "abandon"),
        ];
        for (m, n) in all {
            assert_eq!(m.name(), n);
        }
    }

    // ---- hello validation ---------------------------------------------------------------

    #[test]
    fn hello_validate_accepts_good() {
        hello().validate().unwrap();
        let h = Hello {
            page_size: 512,
            pages_per_packet: 1,
            compression: Compression::None,
            channels: MAX_CHANNELS,
            blocks: vec![BlockSpec {
                name: "x".repeat(MAX_BLOCK_NAME),
                size: 512,
            }],
            ..hello()
        };
        h.validate().unwrap();
        let h = Hello {
            page_size: 65536,
            pages_per_packet: MAX_PAGES_PER_PACKET,
            blocks: vec![BlockSpec {
                name: "a".into(),
                size: 65536,
            }],
            ..hello()
        };
        h.validate().unwrap();
    }

    #[test]
    fn hello_validate_page_size() {
        for ps in [0, 256, 4095, 4097, 3 << 12, 131072, u32::MAX] {
            let h = Hello {
                page_size: ps,
                ..hello()
            };
            assert_eq!(invalid_field(h.validate()), "page_size", "{ps}");
        }
    }

    #[test]
    fn hello_validate_pages_per_packet() {
        for n in [0, MAX_PAGES_PER_PACKET + 1, u32::MAX] {
            let h = Hello {
                pages_per_packet: n,
                ..hello()
            };
            assert_eq!(invalid_field(h.validate()), "pages_per_packet");
        }
    }

    #[test]
    fn hello_validate_compression() {
        for c in [
            Compression::Zlib,
            Compression::Zstd,
            Compression::Uadk,
            Compression::Qatzip,
        ] {
            let h = Hello {
                compression: c,
                ..hello()
            };
            assert_eq!(invalid_field(h.validate()), "compression");
        }
    }

    #[test]
    fn hello_validate_channels() {
        for c in [0, MAX_CHANNELS + 1, u16::MAX] {
            let h = Hello {
                channels: c,
                ..hello()
            };
            assert_eq!(invalid_field(h.validate()), "channels");
        }
    }

    #[test]
    fn hello_validate_blocks() {
        let with = |blocks: Vec<BlockSpec>| Hello { blocks, ..hello() }.validate();
        let b = |name: &str, size: u64| BlockSpec {
            name: name.into(),
            size,
        };
        assert_eq!(invalid_field(with(vec![])), "block_count");
        let many = (0..=MAX_BLOCKS).map(|i| b(&i.to_string(), 4096)).collect();
        assert_eq!(invalid_field(with(many)), "block_count");
        assert_eq!(invalid_field(with(vec![b("", 4096)])), "block_name");
        assert_eq!(invalid_field(with(vec![b("a\0b", 4096)])), "block_name");
        let long = "x".repeat(MAX_BLOCK_NAME + 1);
        assert_eq!(invalid_field(with(vec![b(&long, 4096)])), "block_name");
        assert_eq!(
            invalid_field(with(vec![b("a", 4096), b("b", 4096), b("a", 8192)])),
            "block_name"
        );
        assert_eq!(invalid_field(with(vec![b("a", 0)])), "block_size");
        assert_eq!(invalid_field(with(vec![b("a", 4096 + 512)])), "block_size");
        // MAX_BLOCKS blocks with short names fit in a frame...
        let ok = (0..MAX_BLOCKS).map(|i| b(&i.to_string(), 4096)).collect();
        with(ok).unwrap();
        // ... with 255-byte names they would not.
        let big = (0..MAX_BLOCKS)
            .map(|i| b(&format!("{i:0>255}"), 4096))
            .collect();
        let e = with(big).unwrap_err();
        assert!(e.to_string().contains("frame limit"), "{e}");
    }

    // ---- decoding errors ----------------------------------------------------------------

    fn hello_body() -> Vec<u8> {
        Message::Hello(hello()).encode()[5..].to_vec()
    }

    fn decode_hello_body(body: &[u8]) -> Result<Message, ControlError> {
        let mut f = vec![msg_type::HELLO];
        f.extend_from_slice(body);
        Message::decode(&f)
    }

    #[test]
    fn hello_bad_magic() {
        let mut b = hello_body();
        b[..4].copy_from_slice(b"GET ");
        match decode_hello_body(&b) {
            Err(ControlError::BadMagic(m)) => assert_eq!(&m, b"GET "),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn hello_unsupported_version() {
        let mut b = hello_body();
        b[4..6].copy_from_slice(&1u16.to_be_bytes());
        let e = decode_hello_body(&b).unwrap_err();
        assert!(
            matches!(
                e,
                ControlError::UnsupportedVersion {
                    got: 1,
                    supported: 3
                }
            ),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "hello: control protocol version 1 not supported (this build speaks 3)"
        );
    }

    #[test]
    fn preamble_round_trips_and_anything_else_is_refused() {
        let mut out = Vec::new();
        write_preamble(&mut out).unwrap();
        assert_eq!(out, b"PWCTRL\r\n");
        read_preamble(&mut &out[..]).unwrap();
        let e = read_preamble(&mut &b"GET / HT"[..]).unwrap_err();
        assert!(e.to_string().contains("preamble"), "{e}");
        assert!(matches!(
            read_preamble(&mut &b"PWC"[..]),
            Err(ControlError::Truncated { msg: "preamble" })
        ));
    }

    #[test]
    fn hello_compression_on_the_wire() {
        // Offset of compression in the body: 4 + 2 + 16 + 4 + 4 = 30.
        for (v, ok) in [
            (0x00u32, true),
            (0x08, true),
            (0x02, false),
            (0x0A, false),
            (1, false),
        ] {
            let mut b = hello_body();
            b[30..34].copy_from_slice(&v.to_be_bytes());
            let r = decode_hello_body(&b);
            if ok {
                r.unwrap();
            } else {
                assert_eq!(invalid_field(r), "compression");
            }
        }
    }

    #[test]
    fn hello_unknown_features_refused() {
        for bits in [4u32, 0x8000_0000, !KNOWN_FEATURES] {
            let mut b = hello_body();
            b[36..40].copy_from_slice(&bits.to_be_bytes());
            assert_eq!(invalid_field(decode_hello_body(&b)), "features");
        }
    }

    #[test]
    fn hello_block_count_bounds_before_allocating() {
        for count in [0u16, MAX_BLOCKS as u16 + 1, u16::MAX] {
            let mut b = hello_body();
            b[40..42].copy_from_slice(&count.to_be_bytes());
            assert_eq!(invalid_field(decode_hello_body(&b)), "block_count");
        }
    }

    #[test]
    fn hello_block_name_not_utf8() {
        let mut b = hello_body();
        b[43] = 0xFF; // first byte of "pc.ram"
        assert_eq!(invalid_field(decode_hello_body(&b)), "block_name");
    }

    #[test]
    fn hello_is_validated_on_decode() {
        let h = Hello {
            page_size: 1000,
            ..hello()
        };
        let f = Message::Hello(h).encode();
        assert_eq!(invalid_field(Message::decode(&f[4..])), "page_size");
        // A zero-length name decodes, then fails validation.
        let mut b = hello_body();
        b.truncate(42);
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0x10, 0]);
        b[40..42].copy_from_slice(&1u16.to_be_bytes());
        assert_eq!(invalid_field(decode_hello_body(&b)), "block_name");
    }

    #[test]
    fn every_truncated_hello_is_truncated() {
        let b = hello_body();
        for len in 0..b.len() {
            match decode_hello_body(&b[..len]) {
                Err(ControlError::Truncated { msg: "hello" }) => {}
                other => panic!("prefix {len}: {other:?}"),
            }
        }
    }

    #[test]
    fn trailing_bytes() {
        let mut b = hello_body();
        b.push(0);
        assert!(matches!(
            decode_hello_body(&b),
            Err(ControlError::Trailing {
                msg: "hello",
                extra: 1
            })
        ));
        let mut challenge = vec![8u8];
        challenge.extend_from_slice(&[0; 33]);
        challenge.push(7);
        let cases: [(&[u8], &str, usize); 5] = [
            (&challenge, "challenge", 1),
            (&[3, 0, 0, 0, 0, 0, 0, 0, 1, 9, 9], "round-end", 2),
            (&[4, 0, 0, 0, 0, 0, 0, 0, 1, 9], "round-done", 1),
            (&[5, 1, 2, 3], "end", 3),
            (&[6, 0], "end-ok", 1),
        ];
        for (f, name, extra) in cases {
            match Message::decode(f) {
                Err(ControlError::Trailing { msg, extra: x }) => {
                    assert_eq!((msg, x), (name, extra))
                }
                other => panic!("{f:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn truncated_round() {
        assert!(matches!(
            Message::decode(&[3, 0, 0, 0]),
            Err(ControlError::Truncated { msg: "round-end" })
        ));
        assert!(matches!(
            Message::decode(&[4]),
            Err(ControlError::Truncated { msg: "round-done" })
        ));
    }

    #[test]
    fn unknown_type_and_empty_frame() {
        for t in [0u8, 17, 0xFF] {
            assert!(matches!(
                Message::decode(&[t, 1, 2]),
                Err(ControlError::UnknownType(x)) if x == t
            ));
        }
        assert!(matches!(
            Message::decode(&[]),
            Err(ControlError::Truncated { msg: "frame" })
        ));
        assert!(matches!(
            Message::decode(&vec![2; MAX_FRAME + 1]),
            Err(ControlError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn error_message_rules() {
        // Not UTF-8.
        assert_eq!(invalid_field(Message::decode(&[7, b'a', 0xC3])), "message");
        // Longer than MAX_ERROR_MESSAGE.
        let mut f = vec![7];
        f.extend(std::iter::repeat_n(b'a', MAX_ERROR_MESSAGE + 1));
        assert_eq!(invalid_field(Message::decode(&f)), "message");
        f.pop();
        Message::decode(&f).unwrap();
    }

    #[test]
    fn error_message_encode_truncates_at_char_boundary() {
        // 4095 ASCII bytes then a 2-byte char: the char would straddle the limit.
        let mut s = "a".repeat(MAX_ERROR_MESSAGE - 1);
        s.push('é');
        s.push_str("tail");
        let f = Message::Error { message: s }.encode();
        let Message::Error { message } = Message::decode(&f[4..]).unwrap() else {
            panic!()
        };
        assert_eq!(message, "a".repeat(MAX_ERROR_MESSAGE - 1));
        // Exactly at the limit: kept whole.
        let s = "é".repeat(MAX_ERROR_MESSAGE / 2);
        let f = Message::Error { message: s.clone() }.encode();
        assert_eq!(
            Message::decode(&f[4..]).unwrap(),
            Message::Error { message: s }
        );
    }

    #[test]
    fn error_display_names_message_field_and_value() {
        let e = invalid_field(
            Hello {
                channels: 0,
                ..hello()
            }
            .validate(),
        );
        assert_eq!(e, "channels");
        let e = Hello {
            channels: 0,
            ..hello()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.to_string(), "hello: field channels: 0, expected 1..=255");
    }

    // ---- blocking helpers ---------------------------------------------------------------

    #[test]
    fn write_then_read_sequence() {
        let msgs = [
            Message::Hello(hello()),
            Message::HelloOk {
                proof: None,
                fresh: false,
            },
            Message::RoundEnd { round: 1 },
            Message::RoundDone { round: 1 },
            Message::End,
            Message::EndOk,
            Message::EndPending,
            Message::Error {
                message: "bye".into(),
            },
        ];
        let mut wire = Vec::new();
        for m in &msgs {
            write_message(&mut wire, m).unwrap();
        }
        let mut r = io::Cursor::new(wire);
        for m in &msgs {
            assert_eq!(&read_message(&mut r).unwrap(), m);
        }
        assert!(matches!(read_message(&mut r), Err(ControlError::Closed)));
    }

    /// Hands out one byte per read and an Interrupted error before every byte.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        interrupt: bool,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.interrupt = !self.interrupt;
            if self.interrupt {
                return Err(io::ErrorKind::Interrupted.into());
            }
            match (self.data.get(self.pos), buf.first_mut()) {
                (Some(&b), Some(slot)) => {
                    *slot = b;
                    self.pos += 1;
                    Ok(1)
                }
                _ => Ok(0),
            }
        }
    }

    #[test]
    fn read_message_handles_short_reads_and_interrupts() {
        let data = Message::Hello(hello()).encode();
        let mut r = Trickle {
            data,
            pos: 0,
            interrupt: false,
        };
        assert_eq!(read_message(&mut r).unwrap(), Message::Hello(hello()));
        assert!(matches!(read_message(&mut r), Err(ControlError::Closed)));
    }

    #[test]
    fn read_message_eof_cases() {
        let read = |b: &[u8]| read_message(&mut io::Cursor::new(b.to_vec()));
        assert!(matches!(read(&[]), Err(ControlError::Closed)));
        for cut in 1..4 {
            assert!(matches!(
                read(&[0, 0, 0, 9][..cut]),
                Err(ControlError::Truncated { msg: "frame" })
            ));
        }
        // Length read, nothing else.
        assert!(matches!(
            read(&[0, 0, 0, 9]),
            Err(ControlError::Truncated { msg: "frame" })
        ));
        // Type read, body cut.
        assert!(matches!(
            read(&[0, 0, 0, 9, 3, 0, 0]),
            Err(ControlError::Truncated { msg: "round-end" })
        ));
        let f = Message::Hello(hello()).encode();
        assert!(matches!(
            read(&f[..f.len() - 1]),
            Err(ControlError::Truncated { msg: "hello" })
        ));
    }

    #[test]
    fn read_message_rejects_bad_lengths_before_reading() {
        let read = |b: &[u8]| read_message(&mut io::Cursor::new(b.to_vec()));
        assert_eq!(invalid_field(read(&[0, 0, 0, 0, 2])), "length");
        match read(&[0xFF, 0xFF, 0xFF, 0xFF]) {
            Err(ControlError::FrameTooLarge { len, limit }) => {
                assert_eq!((len, limit), (u32::MAX as usize, MAX_FRAME))
            }
            other => panic!("{other:?}"),
        }
        let len = (MAX_FRAME as u32 + 1).to_be_bytes();
        assert!(matches!(
            read(&len),
            Err(ControlError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn read_message_passes_io_errors() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::ErrorKind::WouldBlock.into())
            }
        }
        assert!(matches!(
            read_message(&mut Failing),
            Err(ControlError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock
        ));
    }

    // ---- properties ---------------------------------------------------------------------

    fn valid_hello() -> impl Strategy<Value = Hello> {
        (
            any::<[u8; 16]>(),
            9u32..=16,
            1..=MAX_PAGES_PER_PACKET,
            any::<bool>(),
            1..=MAX_CHANNELS,
            proptest::collection::btree_map("[a-zA-Z0-9._/é-]{1,40}", 1u64..1 << 20, 1..20),
        )
            .prop_map(|(uuid, shift, ppp, qpl, channels, blocks)| {
                let page_size = 1u32 << shift;
                Hello {
                    uuid,
                    page_size,
                    pages_per_packet: ppp,
                    compression: if qpl {
                        Compression::Qpl
                    } else {
                        Compression::None
                    },
                    channels,
                    blocks: blocks
                        .into_iter()
                        .map(|(name, pages)| BlockSpec {
                            name,
                            size: pages * u64::from(page_size),
                        })
                        .collect(),
                    auth: if qpl {
                        Some(HelloAuth {
                            nonce: [uuid[0]; NONCE_LEN],
                            mac: [uuid[1]; MAC_LEN],
                        })
                    } else {
                        None
                    },
                    opening_sync: uuid[2] & 1 == 1,
                }
            })
    }

    proptest! {
        #[test]
        fn hello_round_trip(h in valid_hello()) {
            h.validate().unwrap();
            let f = Message::Hello(h.clone()).encode();
            prop_assert_eq!(u32::from_be_bytes(f[..4].try_into().unwrap()) as usize, f.len() - 4);
            prop_assert_eq!(Message::decode(&f[4..]).unwrap(), Message::Hello(h.clone()));
            prop_assert_eq!(read_message(&mut io::Cursor::new(f)).unwrap(), Message::Hello(h));
        }

        #[test]
        fn small_messages_round_trip(round in any::<u64>(), text in ".{0,64}") {
            for m in [Message::RoundEnd { round }, Message::RoundDone { round },
                      Message::Error { message: text.clone() }] {
                let f = m.encode();
                prop_assert_eq!(Message::decode(&f[4..]).unwrap(), m);
            }
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Message::decode(&bytes);
            let _ = read_message(&mut io::Cursor::new(&bytes));
        }

        #[test]
        fn decode_mutated_hello_never_panics(
            h in valid_hello(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)) {
            let mut f = Message::Hello(h).encode();
            for (at, v) in edits {
                let i = at.index(f.len());
                f[i] = v;
            }
            if let Ok(Message::Hello(h)) = Message::decode(&f[4..]) {
                prop_assert!(h.validate().is_ok());
            }
            let _ = read_message(&mut io::Cursor::new(&f));
        }
    }
}
