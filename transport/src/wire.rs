//! QEMU multifd channel format, version 1 (sans-IO).
//!
//! Everything here turns bytes into validated values and values into bytes; nothing does I/O.
//! Layouts (all integers big-endian, structures packed) are documented in
//! `docs/wire-format.md` and pinned by the unit tests at the bottom of this file.
//!
//! Validation follows DESIGN.md §5: every field of a header is checked before any payload
//! byte is read, and every error names the field (the caller adds channel and packet).

use thiserror::Error;

/// Magic number at the start of every multifd packet.
pub const MAGIC: u32 = 0x1122_3344;
/// The multifd version pagewire speaks.
pub const VERSION: u32 = 1;
/// Size of the channel init packet.
pub const INIT_PACKET_LEN: usize = 64;
/// Fixed part of a RAM packet header (before the offset array).
pub const HEADER_FIXED_LEN: usize = 320;
/// Size of the NUL-padded memory block name field.
pub const BLOCK_NAME_LEN: usize = 256;
/// Longest block name that fits (byte 255 is always NUL).
pub const MAX_BLOCK_NAME: usize = BLOCK_NAME_LEN - 1;

/// Flag: this packet ends a round on its channel.
pub const FLAG_SYNC: u32 = 0x01;
/// Mask of the compression field in `flags`.
pub const FLAG_COMPRESSION_MASK: u32 = 0x3E;
/// Flag: device state packet (not RAM). pagewire does not accept these.
pub const FLAG_DEVICE_STATE: u32 = 0x40;
/// Every flag bit pagewire knows about.
pub const FLAGS_KNOWN: u32 = FLAG_SYNC | FLAG_COMPRESSION_MASK | FLAG_DEVICE_STATE;

/// Length of a RAM packet header for `pages_per_packet` pages (always full size).
pub const fn header_len(pages_per_packet: u32) -> usize {
    HEADER_FIXED_LEN + 8 * pages_per_packet as usize
}

/// The compression field of the flags word.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Compression {
    /// 0x00: raw pages.
    None,
    /// 0x02: QEMU zlib (one stream per channel; decoded by nobody here).
    Zlib,
    /// 0x04: QEMU zstd (one stream per channel; decoded by nobody here).
    Zstd,
    /// 0x08: QPL framing: length array, then per-page raw DEFLATE or raw page.
    Qpl,
    /// 0x10: UADK.
    Uadk,
    /// 0x20: QATzip.
    Qatzip,
}

impl Compression {
    /// The bits this compression sets in `flags`.
    pub const fn flag(self) -> u32 {
        todo!()
    }
    /// The compression named by `flags & FLAG_COMPRESSION_MASK`; `None` for a value that is
    /// not exactly one known method (e.g. two bits set).
    pub fn from_flags(flags: u32) -> Option<Compression> {
        todo!()
    }
    /// Lower-case name as QEMU spells it ("none", "zlib", "zstd", "qpl", "uadk", "qatzip").
    pub const fn name(self) -> &'static str {
        todo!()
    }
}

/// Which header field a validation error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Magic,
    Version,
    Flags,
    Uuid,
    ChannelId,
    Reserved,
    PagesAlloc,
    NormalPages,
    ZeroPages,
    NextPacketSize,
    BlockName,
    Offset,
    Zlen,
}

impl std::fmt::Display for Field {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        todo!("snake_case field name as in docs/wire-format.md, e.g. next_packet_size")
    }
}

/// A multifd packet that breaks a rule. Every variant names the field; the caller adds the
/// channel and packet number.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WireError {
    /// A buffer shorter than the structure it should hold.
    #[error("{what}: need {need} bytes, got {got}")]
    Short { what: &'static str, need: usize, got: usize },
    /// A field holds a value the rules forbid; `detail` says what was expected.
    #[error("field {field}: {detail}")]
    Invalid { field: Field, detail: String },
}

impl WireError {
    /// The field this error is about (`None` for [`WireError::Short`]).
    pub fn field(&self) -> Option<Field> {
        todo!()
    }
}

/// The 64-byte packet that opens every channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitPacket {
    pub uuid: [u8; 16],
    pub channel_id: u8,
}

impl InitPacket {
    /// The 64 bytes on the wire: magic, version, uuid, id, 39 zero bytes.
    pub fn encode(&self) -> [u8; INIT_PACKET_LEN] {
        todo!()
    }

    /// Parse and check what can be checked without a session: length, magic, version.
    /// (QEMU leaves the 39 trailing bytes unspecified in theory; pagewire does not check them
    /// on parse so it stays compatible, but always writes zeros.)
    pub fn parse(buf: &[u8]) -> Result<InitPacket, WireError> {
        todo!()
    }

    /// Check against the session: uuid equal to `uuid`, `channel_id < channels`.
    pub fn check(&self, uuid: &[u8; 16], channels: u32) -> Result<(), WireError> {
        todo!()
    }
}

/// A memory block as the header rules see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockSpec {
    /// Block name, at most [`MAX_BLOCK_NAME`] bytes, no NUL.
    pub name: String,
    /// Size in bytes, a multiple of the page size.
    pub size: u64,
}

/// What a receiver knows about its session, against which headers are checked.
#[derive(Clone, Copy, Debug)]
pub struct HeaderRules<'a> {
    /// Page size in bytes (power of two, 512..=65536).
    pub page_size: u32,
    /// Expected `pages_alloc` (== pages_per_packet of the session).
    pub pages_per_packet: u32,
    /// Compression the session uses; checked only on packets that carry pages.
    pub compression: Compression,
    /// Known memory blocks; a header's block name must be one of them.
    pub blocks: &'a [BlockSpec],
}

/// A validated RAM packet header. Reusable: [`PacketHeader::decode_into`] overwrites it
/// without allocating once `offsets` has grown to `pages_per_packet`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PacketHeader {
    pub flags: u32,
    pub pages_alloc: u32,
    pub normal_pages: u32,
    pub next_packet_size: u32,
    pub packet_num: u64,
    pub zero_pages: u32,
    /// Index into `HeaderRules::blocks`; meaningless when the packet carries no pages.
    pub block: usize,
    /// `normal_pages` offsets followed by `zero_pages` offsets (only the used entries).
    pub offsets: Vec<u64>,
}

impl PacketHeader {
    /// True when the SYNC flag is set.
    pub fn is_sync(&self) -> bool {
        self.flags & FLAG_SYNC != 0
    }
    /// Offsets of the pages whose data follows.
    pub fn normal_offsets(&self) -> &[u64] {
        &self.offsets[..self.normal_pages as usize]
    }
    /// Offsets of the all-zero pages.
    pub fn zero_offsets(&self) -> &[u64] {
        &self.offsets[self.normal_pages as usize..]
    }

    /// Decode and validate a whole header (`buf.len()` must be exactly
    /// `header_len(rules.pages_per_packet)`) into `self`.
    ///
    /// Checks, in this order, each failing with the named field: magic, version, flags (no
    /// unknown bits, no device state, compression field one known value), pages_alloc ==
    /// pages_per_packet, normal + zero <= pages_alloc (no overflow), SYNC carries no pages,
    /// compression equal to the session's when pages > 0, next_packet_size consistent with
    /// the framing as far as the header allows (none: == normal × page_size; qpl:
    /// 4 × normal <= n <= 4 × normal + normal × page_size; no pages: 0), block name
    /// NUL-terminated within 256 bytes and known (when pages > 0), every used offset
    /// page-aligned and offset + page_size <= block size (no overflow).
    /// On error `self` is left in an unspecified but valid state.
    pub fn decode_into(&mut self, buf: &[u8], rules: &HeaderRules<'_>) -> Result<(), WireError> {
        todo!()
    }
}

/// The fields a sender fills in; offsets and block name passed separately to
/// [`encode_header`] so the hot path allocates nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeaderFields {
    pub flags: u32,
    pub pages_alloc: u32,
    pub normal_pages: u32,
    pub next_packet_size: u32,
    pub packet_num: u64,
    pub zero_pages: u32,
}

/// Write a full-size header into `buf` (`buf.len()` must be `header_len(fields.pages_alloc)`):
/// the fields, reserved zero, `block_name` NUL padded, then `offsets` (normal first, then
/// zero; `offsets.len() == normal + zero <= pages_alloc`), unused offset slots zero.
///
/// Panics only on caller bugs (wrong buffer length, name too long, too many offsets): these
/// are the sender's own values, never a peer's.
pub fn encode_header(buf: &mut [u8], fields: &HeaderFields, block_name: &str, offsets: &[u64]) {
    todo!()
}

/// Parse the qpl framing's length array: `normal` big-endian u32 from `buf` (exactly
/// `4 × normal` bytes) into `out` (cleared first). Each must satisfy 1 <= zlen <= page_size
/// (field Zlen, naming the page index), and `4 × normal + Σ zlen` must equal
/// `next_packet_size` (field NextPacketSize). Returns Σ zlen.
pub fn decode_zlens(
    buf: &[u8],
    normal: u32,
    page_size: u32,
    next_packet_size: u32,
    out: &mut Vec<u32>,
) -> Result<u64, WireError> {
    todo!()
}

/// Write `zlens` as big-endian u32 into `buf` (`buf.len() == 4 × zlens.len()`).
pub fn encode_zlens(buf: &mut [u8], zlens: &[u32]) {
    todo!()
}
