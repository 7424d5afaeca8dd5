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
        match self {
            Compression::None => 0x00,
            Compression::Zlib => 0x02,
            Compression::Zstd => 0x04,
            Compression::Qpl => 0x08,
            Compression::Uadk => 0x10,
            Compression::Qatzip => 0x20,
        }
    }
    /// The compression named by `flags & FLAG_COMPRESSION_MASK`; `None` for a value that is
    /// not exactly one known method (e.g. two bits set).
    pub fn from_flags(flags: u32) -> Option<Compression> {
        match flags & FLAG_COMPRESSION_MASK {
            0x00 => Some(Compression::None),
            0x02 => Some(Compression::Zlib),
            0x04 => Some(Compression::Zstd),
            0x08 => Some(Compression::Qpl),
            0x10 => Some(Compression::Uadk),
            0x20 => Some(Compression::Qatzip),
            _ => None,
        }
    }
    /// Lower-case name as QEMU spells it ("none", "zlib", "zstd", "qpl", "uadk", "qatzip").
    pub const fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
            Compression::Qpl => "qpl",
            Compression::Uadk => "uadk",
            Compression::Qatzip => "qatzip",
        }
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
        f.write_str(match self {
            Field::Magic => "magic",
            Field::Version => "version",
            Field::Flags => "flags",
            Field::Uuid => "uuid",
            Field::ChannelId => "channel_id",
            Field::Reserved => "reserved",
            Field::PagesAlloc => "pages_alloc",
            Field::NormalPages => "normal_pages",
            Field::ZeroPages => "zero_pages",
            Field::NextPacketSize => "next_packet_size",
            Field::BlockName => "block_name",
            Field::Offset => "offset",
            Field::Zlen => "zlen",
        })
    }
}

/// A multifd packet that breaks a rule. Every variant names the field; the caller adds the
/// channel and packet number.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WireError {
    /// A buffer shorter than the structure it should hold.
    #[error("{what}: need {need} bytes, got {got}")]
    Short {
        what: &'static str,
        need: usize,
        got: usize,
    },
    /// A field holds a value the rules forbid; `detail` says what was expected.
    #[error("field {field}: {detail}")]
    Invalid { field: Field, detail: String },
}

impl WireError {
    /// The field this error is about (`None` for [`WireError::Short`]).
    pub fn field(&self) -> Option<Field> {
        match self {
            WireError::Short { .. } => None,
            WireError::Invalid { field, .. } => Some(*field),
        }
    }

    fn invalid(field: Field, detail: String) -> WireError {
        WireError::Invalid { field, detail }
    }
}

// Byte offsets shared by the init packet and the RAM header.
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 4;
// Init packet.
const OFF_INIT_UUID: usize = 8;
const OFF_INIT_CHANNEL: usize = 24;
// RAM header.
const OFF_FLAGS: usize = 8;
const OFF_PAGES_ALLOC: usize = 12;
const OFF_NORMAL_PAGES: usize = 16;
const OFF_NEXT_PACKET_SIZE: usize = 20;
const OFF_PACKET_NUM: usize = 24;
const OFF_ZERO_PAGES: usize = 32;
const OFF_RESERVED: usize = 36;
const OFF_BLOCK_NAME: usize = 64;
const OFF_OFFSETS: usize = HEADER_FIXED_LEN;

/// Big-endian u32 at `at`, `None` when `buf` is too short (never panics).
fn get_u32(buf: &[u8], at: usize) -> Option<u32> {
    let b = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes(b.try_into().ok()?))
}

/// Big-endian u64 at `at`, `None` when `buf` is too short (never panics).
fn get_u64(buf: &[u8], at: usize) -> Option<u64> {
    let b = buf.get(at..at.checked_add(8)?)?;
    Some(u64::from_be_bytes(b.try_into().ok()?))
}

/// Lower-case hex of a uuid, 8-4-4-4-12 as usual.
fn fmt_uuid(u: &[u8; 16]) -> String {
    let mut s = String::with_capacity(36);
    for (i, b) in u.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// A peer-supplied name shown to an operator: lossy UTF-8, control characters escaped.
fn fmt_name(bytes: &[u8]) -> String {
    format!("\"{}\"", String::from_utf8_lossy(bytes).escape_debug())
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
        let mut b = [0u8; INIT_PACKET_LEN];
        b[OFF_MAGIC..OFF_MAGIC + 4].copy_from_slice(&MAGIC.to_be_bytes());
        b[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&VERSION.to_be_bytes());
        b[OFF_INIT_UUID..OFF_INIT_UUID + 16].copy_from_slice(&self.uuid);
        b[OFF_INIT_CHANNEL] = self.channel_id;
        b
    }

    /// Parse and check what can be checked without a session: length, magic, version.
    /// (QEMU leaves the 39 trailing bytes unspecified in theory; pagewire does not check them
    /// on parse so it stays compatible, but always writes zeros.)
    pub fn parse(buf: &[u8]) -> Result<InitPacket, WireError> {
        let short = || WireError::Short {
            what: "channel init packet",
            need: INIT_PACKET_LEN,
            got: buf.len(),
        };
        if buf.len() != INIT_PACKET_LEN {
            return Err(short());
        }
        check_magic_version(buf)?;
        let uuid: [u8; 16] = buf
            .get(OFF_INIT_UUID..OFF_INIT_UUID + 16)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(short)?;
        let channel_id = *buf.get(OFF_INIT_CHANNEL).ok_or_else(short)?;
        Ok(InitPacket { uuid, channel_id })
    }

    /// Check against the session: uuid equal to `uuid`, `channel_id < channels`.
    pub fn check(&self, uuid: &[u8; 16], channels: u32) -> Result<(), WireError> {
        if self.uuid != *uuid {
            return Err(WireError::invalid(
                Field::Uuid,
                format!(
                    "{}, expected this session's {}",
                    fmt_uuid(&self.uuid),
                    fmt_uuid(uuid)
                ),
            ));
        }
        if u32::from(self.channel_id) >= channels {
            return Err(WireError::invalid(
                Field::ChannelId,
                format!(
                    "{}, expected less than {channels} (the session's channel count)",
                    self.channel_id
                ),
            ));
        }
        Ok(())
    }
}

/// Magic and version, common to the init packet and the RAM header (`buf` holds at least 8
/// bytes; a shorter one fails as a wrong magic/version rather than panicking).
fn check_magic_version(buf: &[u8]) -> Result<(), WireError> {
    let magic = get_u32(buf, OFF_MAGIC).unwrap_or(0);
    if magic != MAGIC {
        return Err(WireError::invalid(
            Field::Magic,
            format!("{magic:#010x}, expected {MAGIC:#010x}"),
        ));
    }
    let version = get_u32(buf, OFF_VERSION).unwrap_or(0);
    if version != VERSION {
        return Err(WireError::invalid(
            Field::Version,
            format!("{version}, expected {VERSION}"),
        ));
    }
    Ok(())
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
    ///
    /// One exemption, for QEMU compatibility: a SYNC packet may carry `pages_alloc == 0`
    /// (QEMU >= 9.2 zeroes everything in its SYNC but magic, version, flags and packet_num).
    /// On error `self` is left in an unspecified but valid state.
    pub fn decode_into(&mut self, buf: &[u8], rules: &HeaderRules<'_>) -> Result<(), WireError> {
        let need = header_len(rules.pages_per_packet);
        let short = || WireError::Short {
            what: "RAM packet header",
            need,
            got: buf.len(),
        };
        if buf.len() != need {
            return Err(short());
        }
        check_magic_version(buf)?;
        let rd32 = |at| get_u32(buf, at).ok_or_else(short);
        let flags = rd32(OFF_FLAGS)?;
        let pages_alloc = rd32(OFF_PAGES_ALLOC)?;
        let normal = rd32(OFF_NORMAL_PAGES)?;
        let next_packet_size = rd32(OFF_NEXT_PACKET_SIZE)?;
        let packet_num = get_u64(buf, OFF_PACKET_NUM).ok_or_else(short)?;
        let zero = rd32(OFF_ZERO_PAGES)?;

        // Flags: known bits only, no device state, one compression method.
        let unknown = flags & !FLAGS_KNOWN;
        if unknown != 0 {
            return Err(WireError::invalid(
                Field::Flags,
                format!(
                    "{flags:#010x} has unknown bits {unknown:#010x} (known bits: {FLAGS_KNOWN:#04x})"
                ),
            ));
        }
        if flags & FLAG_DEVICE_STATE != 0 {
            return Err(WireError::invalid(
                Field::Flags,
                format!(
                    "{flags:#010x} has the device state bit {FLAG_DEVICE_STATE:#04x}; only RAM packets are accepted"
                ),
            ));
        }
        let Some(compression) = Compression::from_flags(flags) else {
            return Err(WireError::invalid(
                Field::Flags,
                format!(
                    "{flags:#010x}: compression field {:#04x} is not one known method (expected one of 0x00, 0x02, 0x04, 0x08, 0x10, 0x20)",
                    flags & FLAG_COMPRESSION_MASK
                ),
            ));
        };

        // QEMU >= 9.2 zeroes its SYNC packet except magic, version, flags and packet_num, so a
        // SYNC may carry pages_alloc 0 (QEMU's own receiver only checks pages_alloc <= its
        // page count).
        let sync_without_alloc = flags & FLAG_SYNC != 0 && pages_alloc == 0;
        if pages_alloc != rules.pages_per_packet && !sync_without_alloc {
            return Err(WireError::invalid(
                Field::PagesAlloc,
                format!(
                    "{pages_alloc}, expected {} (the session's pages per packet)",
                    rules.pages_per_packet
                ),
            ));
        }
        if normal > pages_alloc {
            return Err(WireError::invalid(
                Field::NormalPages,
                format!("{normal}, but pages_alloc is {pages_alloc}"),
            ));
        }
        // u64: normal + zero cannot overflow.
        let pages = u64::from(normal) + u64::from(zero);
        if pages > u64::from(pages_alloc) {
            return Err(WireError::invalid(
                Field::ZeroPages,
                format!(
                    "{zero}, but normal_pages {normal} + zero_pages {zero} = {pages} exceeds pages_alloc {pages_alloc}"
                ),
            ));
        }
        if flags & FLAG_SYNC != 0 && pages != 0 {
            return Err(WireError::invalid(
                Field::Flags,
                format!(
                    "{flags:#010x} has SYNC ({FLAG_SYNC:#04x}) on a packet with {normal} normal and {zero} zero pages; a SYNC packet carries no pages"
                ),
            ));
        }
        if pages != 0 && compression != rules.compression {
            return Err(WireError::invalid(
                Field::Flags,
                format!(
                    "{flags:#010x}: compression {} ({:#04x}), but the session uses {} ({:#04x})",
                    compression.name(),
                    compression.flag(),
                    rules.compression.name(),
                    rules.compression.flag()
                ),
            ));
        }
        check_next_packet_size(
            next_packet_size,
            normal,
            pages,
            compression,
            rules.page_size,
        )?;

        // Block name: NUL-terminated within its 256 bytes; known when the packet has pages.
        let name_field = buf
            .get(OFF_BLOCK_NAME..OFF_BLOCK_NAME + BLOCK_NAME_LEN)
            .ok_or_else(short)?;
        let Some(name_len) = name_field.iter().position(|&b| b == 0) else {
            return Err(WireError::invalid(
                Field::BlockName,
                format!(
                    "not NUL-terminated within its {BLOCK_NAME_LEN} bytes (starts {})",
                    fmt_name(name_field.get(..32).unwrap_or(name_field))
                ),
            ));
        };
        let name = name_field.get(..name_len).unwrap_or(name_field);
        self.offsets.clear();
        if pages == 0 {
            self.block = 0;
        } else {
            // Packets of one block usually follow each other: try the previous block first.
            let block = match rules.blocks.get(self.block) {
                Some(b) if b.name.as_bytes() == name => self.block,
                _ => rules
                    .blocks
                    .iter()
                    .position(|b| b.name.as_bytes() == name)
                    .ok_or_else(|| {
                        WireError::invalid(
                            Field::BlockName,
                            format!("{} is not a memory block of this session", fmt_name(name)),
                        )
                    })?,
            };
            let block_size = rules.blocks.get(block).map_or(0, |b| b.size);
            let page_size = u64::from(rules.page_size);
            let offsets = buf.get(OFF_OFFSETS..).ok_or_else(short)?;
            // `pages <= pages_alloc <= pages_per_packet` and the buffer holds exactly
            // `pages_per_packet` slots, so the iterator yields `pages` entries.
            for (i, slot) in offsets.chunks_exact(8).take(pages as usize).enumerate() {
                let offset = get_u64(slot, 0).ok_or_else(short)?;
                let kind = if (i as u64) < u64::from(normal) {
                    "normal"
                } else {
                    "zero"
                };
                if offset.checked_rem(page_size) != Some(0) {
                    return Err(WireError::invalid(
                        Field::Offset,
                        format!(
                            "page {i} ({kind}): {offset:#x} is not a multiple of page_size {page_size}"
                        ),
                    ));
                }
                match offset.checked_add(page_size) {
                    None => {
                        return Err(WireError::invalid(
                            Field::Offset,
                            format!("page {i} ({kind}): {offset:#x} + page_size {page_size} overflows u64"),
                        ))
                    }
                    Some(end) if end > block_size => {
                        return Err(WireError::invalid(
                            Field::Offset,
                            format!(
                                "page {i} ({kind}): {offset:#x} + page_size {page_size} = {end:#x} is past the end of block {} of size {block_size:#x}",
                                fmt_name(name)
                            ),
                        ))
                    }
                    Some(_) => {}
                }
                self.offsets.push(offset);
            }
            if self.offsets.len() as u64 != pages {
                return Err(short());
            }
            self.block = block;
        }
        self.flags = flags;
        self.pages_alloc = pages_alloc;
        self.normal_pages = normal;
        self.next_packet_size = next_packet_size;
        self.packet_num = packet_num;
        self.zero_pages = zero;
        Ok(())
    }
}

/// next_packet_size against the framing implied by the header (u64 arithmetic throughout).
fn check_next_packet_size(
    size: u32,
    normal: u32,
    pages: u64,
    compression: Compression,
    page_size: u32,
) -> Result<(), WireError> {
    let n = u64::from(size);
    let normal64 = u64::from(normal);
    let ps = u64::from(page_size);
    let err = |detail: String| Err(WireError::invalid(Field::NextPacketSize, detail));
    if pages == 0 {
        if n != 0 {
            return err(format!("{n} on a packet without pages, expected 0"));
        }
        return Ok(());
    }
    match compression {
        Compression::None => {
            let want = normal64 * ps;
            if n != want {
                return err(format!(
                    "{n}, expected normal_pages {normal} x page_size {ps} = {want} (no compression)"
                ));
            }
        }
        // QEMU's UADK uses the same length-array framing as QPL.
        Compression::Qpl | Compression::Uadk => {
            let lo = 4 * normal64;
            let hi = lo + normal64 * ps;
            if n < lo || n > hi {
                return err(format!(
                    "{n}, expected 4 x normal_pages {normal} + 1..={ps} bytes per page = {lo}..={hi} ({} framing)",
                    compression.name()
                ));
            }
        }
        // One compressed stream per channel: only a bound can be checked (a stream that
        // never expands by more than 2x plus one page; pagewire does not decode these).
        Compression::Zlib | Compression::Zstd | Compression::Qatzip => {
            let hi = 2 * normal64 * ps + ps;
            if n > hi {
                return err(format!(
                    "{n}, expected at most 2 x normal_pages {normal} x page_size {ps} + page_size = {hi} ({} framing)",
                    compression.name()
                ));
            }
        }
    }
    Ok(())
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
    assert_eq!(
        buf.len(),
        header_len(fields.pages_alloc),
        "encode_header: buffer length does not match pages_alloc {}",
        fields.pages_alloc
    );
    assert!(
        block_name.len() <= MAX_BLOCK_NAME && !block_name.as_bytes().contains(&0),
        "encode_header: block name of {} bytes (at most {MAX_BLOCK_NAME}, no NUL)",
        block_name.len()
    );
    let pages = u64::from(fields.normal_pages) + u64::from(fields.zero_pages);
    assert!(
        offsets.len() as u64 == pages && pages <= u64::from(fields.pages_alloc),
        "encode_header: {} offsets for {} normal + {} zero pages, pages_alloc {}",
        offsets.len(),
        fields.normal_pages,
        fields.zero_pages,
        fields.pages_alloc
    );
    let (fixed, slots) = buf.split_at_mut(HEADER_FIXED_LEN);
    fixed[OFF_MAGIC..OFF_MAGIC + 4].copy_from_slice(&MAGIC.to_be_bytes());
    fixed[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&VERSION.to_be_bytes());
    fixed[OFF_FLAGS..OFF_FLAGS + 4].copy_from_slice(&fields.flags.to_be_bytes());
    fixed[OFF_PAGES_ALLOC..OFF_PAGES_ALLOC + 4].copy_from_slice(&fields.pages_alloc.to_be_bytes());
    fixed[OFF_NORMAL_PAGES..OFF_NORMAL_PAGES + 4]
        .copy_from_slice(&fields.normal_pages.to_be_bytes());
    fixed[OFF_NEXT_PACKET_SIZE..OFF_NEXT_PACKET_SIZE + 4]
        .copy_from_slice(&fields.next_packet_size.to_be_bytes());
    fixed[OFF_PACKET_NUM..OFF_PACKET_NUM + 8].copy_from_slice(&fields.packet_num.to_be_bytes());
    fixed[OFF_ZERO_PAGES..OFF_ZERO_PAGES + 4].copy_from_slice(&fields.zero_pages.to_be_bytes());
    fixed[OFF_RESERVED..OFF_BLOCK_NAME].fill(0);
    let name = &mut fixed[OFF_BLOCK_NAME..OFF_BLOCK_NAME + BLOCK_NAME_LEN];
    name[..block_name.len()].copy_from_slice(block_name.as_bytes());
    name[block_name.len()..].fill(0);
    let (used, unused) = slots.split_at_mut(8 * offsets.len());
    for (slot, off) in used.chunks_exact_mut(8).zip(offsets) {
        slot.copy_from_slice(&off.to_be_bytes());
    }
    unused.fill(0);
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
    out.clear();
    let normal64 = u64::from(normal);
    if buf.len() as u64 != 4 * normal64 {
        return Err(WireError::Short {
            what: "qpl length array",
            need: (4 * normal64).try_into().unwrap_or(usize::MAX),
            got: buf.len(),
        });
    }
    // Bounded by the caller's buffer, whose length was just checked.
    out.reserve(buf.len() / 4);
    let mut sum: u64 = 0;
    for (i, b) in buf.chunks_exact(4).enumerate() {
        let zlen = get_u32(b, 0).unwrap_or(0);
        if zlen == 0 || zlen > page_size {
            return Err(WireError::invalid(
                Field::Zlen,
                format!("page {i}: {zlen}, expected 1..={page_size}"),
            ));
        }
        sum += u64::from(zlen);
        out.push(zlen);
    }
    let total = 4 * normal64 + sum;
    if total != u64::from(next_packet_size) {
        return Err(WireError::invalid(
            Field::NextPacketSize,
            format!(
                "{next_packet_size}, but 4 x normal_pages {normal} + sum of zlen {sum} = {total}"
            ),
        ));
    }
    Ok(sum)
}

/// Write `zlens` as big-endian u32 into `buf` (`buf.len() == 4 × zlens.len()`).
pub fn encode_zlens(buf: &mut [u8], zlens: &[u32]) {
    assert_eq!(
        buf.len(),
        4 * zlens.len(),
        "encode_zlens: buffer of {} bytes for {} lengths",
        buf.len(),
        zlens.len()
    );
    for (slot, z) in buf.chunks_exact_mut(4).zip(zlens) {
        slot.copy_from_slice(&z.to_be_bytes());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PS: u32 = 4096;
    const PPP: u32 = 4;
    const RAM_SIZE: u64 = 1 << 20;
    const BIOS_SIZE: u64 = 256 << 10;

    fn blocks() -> Vec<BlockSpec> {
        vec![
            BlockSpec {
                name: "pc.ram".into(),
                size: RAM_SIZE,
            },
            BlockSpec {
                name: "pc.bios".into(),
                size: BIOS_SIZE,
            },
        ]
    }

    fn rules(blocks: &[BlockSpec], compression: Compression) -> HeaderRules<'_> {
        HeaderRules {
            page_size: PS,
            pages_per_packet: PPP,
            compression,
            blocks,
        }
    }

    /// A header built byte by byte at the documented offsets, independent of `encode_header`.
    #[derive(Clone)]
    struct Raw {
        flags: u32,
        pages_alloc: u32,
        normal: u32,
        next_packet_size: u32,
        packet_num: u64,
        zero: u32,
        name: Vec<u8>,
        offsets: Vec<u64>,
    }

    impl Raw {
        /// A valid qpl packet of pc.ram: 2 normal pages (zlen 100 + 4096), 1 zero page.
        fn qpl() -> Raw {
            Raw {
                flags: 0x08,
                pages_alloc: PPP,
                normal: 2,
                next_packet_size: 8 + 100 + 4096,
                packet_num: 7,
                zero: 1,
                name: b"pc.ram".to_vec(),
                offsets: vec![0x3000, 0x1000, 0x2000],
            }
        }
        fn bytes(&self) -> Vec<u8> {
            let mut b = vec![0u8; 320 + 8 * PPP as usize];
            b[0..4].copy_from_slice(&0x1122_3344u32.to_be_bytes());
            b[4..8].copy_from_slice(&1u32.to_be_bytes());
            b[8..12].copy_from_slice(&self.flags.to_be_bytes());
            b[12..16].copy_from_slice(&self.pages_alloc.to_be_bytes());
            b[16..20].copy_from_slice(&self.normal.to_be_bytes());
            b[20..24].copy_from_slice(&self.next_packet_size.to_be_bytes());
            b[24..32].copy_from_slice(&self.packet_num.to_be_bytes());
            b[32..36].copy_from_slice(&self.zero.to_be_bytes());
            b[64..64 + self.name.len()].copy_from_slice(&self.name);
            for (i, o) in self.offsets.iter().enumerate() {
                b[320 + 8 * i..328 + 8 * i].copy_from_slice(&o.to_be_bytes());
            }
            b
        }
        fn decode(&self, compression: Compression) -> Result<PacketHeader, WireError> {
            let blocks = blocks();
            let mut h = PacketHeader::default();
            h.decode_into(&self.bytes(), &rules(&blocks, compression))
                .map(|()| h)
        }
        fn field(&self, compression: Compression) -> Option<Field> {
            match self.decode(compression) {
                Ok(h) => panic!("expected an error, decoded {h:?}"),
                Err(e) => e.field(),
            }
        }
    }

    fn sync() -> Raw {
        Raw {
            flags: FLAG_SYNC,
            pages_alloc: PPP,
            normal: 0,
            next_packet_size: 0,
            packet_num: 9,
            zero: 0,
            name: Vec::new(),
            offsets: Vec::new(),
        }
    }

    // ---- layout -------------------------------------------------------------------------

    #[test]
    fn header_len_values() {
        assert_eq!(header_len(128), 1344);
        assert_eq!(header_len(0), 320);
        assert_eq!(header_len(4), 352);
    }

    #[test]
    fn encode_header_layout_is_pinned() {
        let fields = HeaderFields {
            flags: 0x0000_0008,
            pages_alloc: 4,
            normal_pages: 2,
            next_packet_size: 0x0102_0304,
            packet_num: 0x0506_0708_090a_0b0c,
            zero_pages: 1,
        };
        let mut buf = vec![0xAAu8; header_len(4)];
        encode_header(
            &mut buf,
            &fields,
            "pc.ram",
            &[0x1000, 0xff_0000_2000, 0x3000],
        );

        let mut want = vec![0u8; 352];
        want[0..4].copy_from_slice(&[0x11, 0x22, 0x33, 0x44]); // magic
        want[4..8].copy_from_slice(&[0, 0, 0, 1]); // version
        want[8..12].copy_from_slice(&[0, 0, 0, 0x08]); // flags
        want[12..16].copy_from_slice(&[0, 0, 0, 4]); // pages_alloc
        want[16..20].copy_from_slice(&[0, 0, 0, 2]); // normal_pages
        want[20..24].copy_from_slice(&[1, 2, 3, 4]); // next_packet_size
        want[24..32].copy_from_slice(&[5, 6, 7, 8, 9, 0xa, 0xb, 0xc]); // packet_num
        want[32..36].copy_from_slice(&[0, 0, 0, 1]); // zero_pages
                                                     // 36..64 reserved: zero
        want[64..70].copy_from_slice(b"pc.ram"); // block name, NUL padded to 320
        want[320..328].copy_from_slice(&[0, 0, 0, 0, 0, 0, 0x10, 0]);
        want[328..336].copy_from_slice(&[0, 0, 0, 0xff, 0, 0, 0x20, 0]);
        want[336..344].copy_from_slice(&[0, 0, 0, 0, 0, 0, 0x30, 0]);
        // 344..352: the unused fourth slot, zero
        assert_eq!(buf, want);
    }

    #[test]
    fn encode_header_full_size_with_no_pages_zeroes_everything_else() {
        let fields = HeaderFields {
            flags: FLAG_SYNC,
            pages_alloc: 128,
            packet_num: 3,
            ..HeaderFields::default()
        };
        let mut buf = vec![0x55u8; 1344];
        encode_header(&mut buf, &fields, "", &[]);
        assert_eq!(
            &buf[0..12],
            &[0x11, 0x22, 0x33, 0x44, 0, 0, 0, 1, 0, 0, 0, 1]
        );
        assert_eq!(&buf[12..16], &[0, 0, 0, 128]);
        assert_eq!(&buf[24..32], &[0, 0, 0, 0, 0, 0, 0, 3]);
        assert!(buf[16..24].iter().all(|&b| b == 0));
        assert!(buf[32..].iter().all(|&b| b == 0));
    }

    #[test]
    fn hand_built_header_decodes() {
        let h = Raw::qpl().decode(Compression::Qpl).unwrap();
        assert_eq!(h.flags, 0x08);
        assert_eq!(h.pages_alloc, PPP);
        assert_eq!(h.normal_pages, 2);
        assert_eq!(h.zero_pages, 1);
        assert_eq!(h.next_packet_size, 8 + 100 + 4096);
        assert_eq!(h.packet_num, 7);
        assert_eq!(h.block, 0);
        assert_eq!(h.normal_offsets(), &[0x3000, 0x1000]);
        assert_eq!(h.zero_offsets(), &[0x2000]);
        assert!(!h.is_sync());
    }

    #[test]
    fn encode_decode_round_trip() {
        let blocks = blocks();
        let r = rules(&blocks, Compression::None);
        let fields = HeaderFields {
            flags: Compression::None.flag(),
            pages_alloc: PPP,
            normal_pages: 3,
            next_packet_size: 3 * PS,
            packet_num: u64::MAX,
            zero_pages: 1,
        };
        let offsets = [BIOS_SIZE - 4096, 0, 0x8000, 0x1000];
        let mut buf = vec![0u8; header_len(PPP)];
        encode_header(&mut buf, &fields, "pc.bios", &offsets);
        let mut h = PacketHeader::default();
        h.decode_into(&buf, &r).unwrap();
        assert_eq!(h.block, 1);
        assert_eq!(h.offsets, offsets);
        assert_eq!(
            (
                h.flags,
                h.pages_alloc,
                h.normal_pages,
                h.next_packet_size,
                h.packet_num,
                h.zero_pages
            ),
            (0, PPP, 3, 3 * PS, u64::MAX, 1)
        );
    }

    #[test]
    fn init_packet_layout_is_pinned() {
        let uuid: [u8; 16] = core::array::from_fn(|i| i as u8 + 1);
        let p = InitPacket {
            uuid,
            channel_id: 7,
        };
        let b = p.encode();
        let mut want = [0u8; 64];
        want[0..4].copy_from_slice(&[0x11, 0x22, 0x33, 0x44]);
        want[4..8].copy_from_slice(&[0, 0, 0, 1]);
        want[8..24].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]);
        want[24] = 7;
        assert_eq!(b, want);
        assert_eq!(InitPacket::parse(&b), Ok(p));
        p.check(&uuid, 8).unwrap();
    }

    #[test]
    fn init_packet_ignores_trailing_bytes_content() {
        let mut b = InitPacket {
            uuid: [9; 16],
            channel_id: 0,
        }
        .encode();
        b[25..].fill(0xEE);
        assert_eq!(InitPacket::parse(&b).unwrap().uuid, [9; 16]);
    }

    #[test]
    fn init_packet_wrong_length_is_short() {
        let b = InitPacket {
            uuid: [0; 16],
            channel_id: 0,
        }
        .encode();
        for len in [0, 8, 63, 65] {
            let mut v = b.to_vec();
            v.resize(len, 0);
            let e = InitPacket::parse(&v).unwrap_err();
            assert_eq!(
                e,
                WireError::Short {
                    what: "channel init packet",
                    need: 64,
                    got: len
                }
            );
        }
    }

    #[test]
    fn init_packet_wrong_magic_and_version() {
        let good = InitPacket {
            uuid: [1; 16],
            channel_id: 1,
        }
        .encode();
        let mut b = good;
        b[3] = 0x45;
        let e = InitPacket::parse(&b).unwrap_err();
        assert_eq!(e.field(), Some(Field::Magic));
        assert_eq!(
            e.to_string(),
            "field magic: 0x11223345, expected 0x11223344"
        );
        let mut b = good;
        b[7] = 2;
        assert_eq!(
            InitPacket::parse(&b).unwrap_err().field(),
            Some(Field::Version)
        );
    }

    #[test]
    fn init_packet_wrong_uuid() {
        let p = InitPacket {
            uuid: [1; 16],
            channel_id: 0,
        };
        let e = p.check(&[2; 16], 4).unwrap_err();
        assert_eq!(e.field(), Some(Field::Uuid));
        assert!(e.to_string().contains("01010101-0101"), "{e}");
    }

    #[test]
    fn init_packet_channel_id_equal_to_channels() {
        let uuid = [3; 16];
        let p = InitPacket {
            uuid,
            channel_id: 4,
        };
        assert_eq!(
            p.check(&uuid, 4).unwrap_err().field(),
            Some(Field::ChannelId)
        );
        assert_eq!(
            p.check(&uuid, 0).unwrap_err().field(),
            Some(Field::ChannelId)
        );
        p.check(&uuid, 5).unwrap();
        let p = InitPacket {
            uuid,
            channel_id: 255,
        };
        assert_eq!(
            p.check(&uuid, 255).unwrap_err().field(),
            Some(Field::ChannelId)
        );
        p.check(&uuid, 256).unwrap();
    }

    // ---- names --------------------------------------------------------------------------

    #[test]
    fn field_display_names() {
        let all = [
            (Field::Magic, "magic"),
            (Field::Version, "version"),
            (Field::Flags, "flags"),
            (Field::Uuid, "uuid"),
            (Field::ChannelId, "channel_id"),
            (Field::Reserved, "reserved"),
            (Field::PagesAlloc, "pages_alloc"),
            (Field::NormalPages, "normal_pages"),
            (Field::ZeroPages, "zero_pages"),
            (Field::NextPacketSize, "next_packet_size"),
            (Field::BlockName, "block_name"),
            (Field::Offset, "offset"),
            (Field::Zlen, "zlen"),
        ];
        for (f, name) in all {
            assert_eq!(f.to_string(), name);
        }
    }

    #[test]
    fn compression_flags_and_names() {
        let all = [
            (Compression::None, 0x00, "none"),
            (Compression::Zlib, 0x02, "zlib"),
            (Compression::Zstd, 0x04, "zstd"),
            (Compression::Qpl, 0x08, "qpl"),
            (Compression::Uadk, 0x10, "uadk"),
            (Compression::Qatzip, 0x20, "qatzip"),
        ];
        for (c, flag, name) in all {
            assert_eq!(c.flag(), flag);
            assert_eq!(c.name(), name);
            assert_eq!(Compression::from_flags(flag), Some(c));
            // Bits outside the compression mask do not matter.
            assert_eq!(
                Compression::from_flags(flag | FLAG_SYNC | 0x8000_0000),
                Some(c)
            );
        }
        assert_eq!(Compression::from_flags(0x0A), None);
        assert_eq!(Compression::from_flags(0x3E), None);
    }

    #[test]
    fn short_error_has_no_field() {
        let e = WireError::Short {
            what: "x",
            need: 2,
            got: 1,
        };
        assert_eq!(e.field(), None);
        assert_eq!(e.to_string(), "x: need 2 bytes, got 1");
    }

    // ---- header checks, one per rule ----------------------------------------------------

    #[test]
    fn header_wrong_length() {
        let blocks = blocks();
        let r = rules(&blocks, Compression::Qpl);
        let good = Raw::qpl().bytes();
        let mut h = PacketHeader::default();
        for len in [0, 7, 320, good.len() - 1, good.len() + 1, good.len() + 8] {
            let mut b = good.clone();
            b.resize(len, 0);
            let e = h.decode_into(&b, &r).unwrap_err();
            assert_eq!(
                e,
                WireError::Short {
                    what: "RAM packet header",
                    need: 352,
                    got: len
                }
            );
        }
    }

    #[test]
    fn header_magic() {
        let mut b = Raw::qpl().bytes();
        b[0] = 0x12;
        let blocks = blocks();
        let e = PacketHeader::default()
            .decode_into(&b, &rules(&blocks, Compression::Qpl))
            .unwrap_err();
        assert_eq!(e.field(), Some(Field::Magic));
    }

    #[test]
    fn header_version() {
        let mut b = Raw::qpl().bytes();
        b[7] = 2;
        let blocks = blocks();
        let e = PacketHeader::default()
            .decode_into(&b, &rules(&blocks, Compression::Qpl))
            .unwrap_err();
        assert_eq!(e.field(), Some(Field::Version));
        assert_eq!(e.to_string(), "field version: 2, expected 1");
    }

    #[test]
    fn header_unknown_flag_bit() {
        for bit in [0x80, 0x100, 0x8000_0000] {
            let raw = Raw {
                flags: 0x08 | bit,
                ..Raw::qpl()
            };
            assert_eq!(raw.field(Compression::Qpl), Some(Field::Flags));
            // Also on a packet without pages.
            let raw = Raw {
                flags: FLAG_SYNC | bit,
                ..sync()
            };
            assert_eq!(raw.field(Compression::Qpl), Some(Field::Flags));
        }
    }

    #[test]
    fn header_device_state_flag() {
        let raw = Raw {
            flags: 0x08 | FLAG_DEVICE_STATE,
            ..Raw::qpl()
        };
        assert_eq!(raw.field(Compression::Qpl), Some(Field::Flags));
        let raw = Raw {
            flags: FLAG_DEVICE_STATE,
            ..sync()
        };
        assert_eq!(raw.field(Compression::Qpl), Some(Field::Flags));
    }

    #[test]
    fn header_two_compression_bits() {
        let raw = Raw {
            flags: 0x0A,
            ..Raw::qpl()
        };
        assert_eq!(raw.field(Compression::Qpl), Some(Field::Flags));
        // Even on a packet without pages.
        let raw = Raw {
            flags: FLAG_SYNC | 0x0C,
            ..sync()
        };
        assert_eq!(raw.field(Compression::Qpl), Some(Field::Flags));
    }

    #[test]
    fn header_compression_mismatch_on_packet_with_pages() {
        let raw = Raw::qpl();
        let e = raw.decode(Compression::None).unwrap_err();
        assert_eq!(e.field(), Some(Field::Flags));
        assert!(
            e.to_string()
                .contains("qpl (0x08), but the session uses none"),
            "{e}"
        );
        // Zero pages only: still a packet with pages.
        let raw = Raw {
            flags: Compression::Zlib.flag(),
            normal: 0,
            zero: 1,
            next_packet_size: 0,
            offsets: vec![0],
            ..Raw::qpl()
        };
        assert_eq!(raw.field(Compression::Qpl), Some(Field::Flags));
    }

    #[test]
    fn header_without_pages_accepts_any_compression_and_empty_name() {
        // QEMU's SYNC: flags 0x01 alone, only packet_num set.
        let h = sync().decode(Compression::Qpl).unwrap();
        assert!(h.is_sync());
        assert_eq!(h.packet_num, 9);
        assert!(h.offsets.is_empty());
        assert!(h.normal_offsets().is_empty() && h.zero_offsets().is_empty());
        for flags in [0x00, 0x02, 0x09, 0x21] {
            let raw = Raw { flags, ..sync() };
            raw.decode(Compression::None).unwrap();
        }
        // An unknown name on an empty packet is not looked up.
        let raw = Raw {
            name: b"nonexistent".to_vec(),
            ..sync()
        };
        raw.decode(Compression::Qpl).unwrap();
    }

    #[test]
    fn header_pages_alloc_mismatch() {
        for pages_alloc in [0, PPP - 1, PPP + 1, u32::MAX] {
            let raw = Raw {
                pages_alloc,
                ..Raw::qpl()
            };
            assert_eq!(raw.field(Compression::Qpl), Some(Field::PagesAlloc));
            // A packet without pages and without SYNC gets no exemption.
            let raw = Raw {
                flags: 0x08,
                pages_alloc,
                ..sync()
            };
            assert_eq!(raw.field(Compression::Qpl), Some(Field::PagesAlloc));
        }
        // A SYNC must say 0 or the session's value.
        let raw = Raw {
            pages_alloc: PPP + 1,
            ..sync()
        };
        assert_eq!(raw.field(Compression::Qpl), Some(Field::PagesAlloc));
    }

    #[test]
    fn qemu_sync_packet_is_accepted() {
        // QEMU >= 9.2 multifd_send_fill_packet(): memset 0, then only magic, version,
        // flags = SYNC, next_packet_size = 0 and packet_num; pages_alloc stays 0.
        let mut b = vec![0u8; header_len(PPP)];
        b[0..4].copy_from_slice(&[0x11, 0x22, 0x33, 0x44]);
        b[4..8].copy_from_slice(&[0, 0, 0, 1]);
        b[8..12].copy_from_slice(&[0, 0, 0, 1]);
        b[24..32].copy_from_slice(&[0, 0, 0, 0, 0, 0, 0x01, 0x2c]);
        let blocks = blocks();
        let mut h = PacketHeader::default();
        h.decode_into(&b, &rules(&blocks, Compression::Qpl))
            .unwrap();
        assert!(h.is_sync());
        assert_eq!((h.pages_alloc, h.packet_num, h.offsets.len()), (0, 300, 0));
        // ...but such a SYNC still carries no pages.
        b[16..20].copy_from_slice(&[0, 0, 0, 1]);
        let e = h
            .decode_into(&b, &rules(&blocks, Compression::Qpl))
            .unwrap_err();
        assert_eq!(e.field(), Some(Field::NormalPages));
    }

    #[test]
    fn header_normal_pages_over_pages_alloc() {
        let raw = Raw {
            normal: PPP + 1,
            zero: 0,
            ..Raw::qpl()
        };
        assert_eq!(raw.field(Compression::Qpl), Some(Field::NormalPages));
        let raw = Raw {
            normal: u32::MAX,
            zero: 0,
            ..Raw::qpl()
        };
        assert_eq!(raw.field(Compression::Qpl), Some(Field::NormalPages));
    }

    #[test]
    fn header_normal_plus_zero_over_pages_alloc() {
        let raw = Raw {
            normal: 2,
            zero: 3,
            ..Raw::qpl()
        };
        assert_eq!(raw.field(Compression::Qpl), Some(Field::ZeroPages));
        // 1 + u32::MAX wraps to 0 in u32 arithmetic: must still be caught.
        let raw = Raw {
            normal: 1,
            zero: u32::MAX,
            ..Raw::qpl()
        };
        let e = raw.decode(Compression::Qpl).unwrap_err();
        assert_eq!(e.field(), Some(Field::ZeroPages));
        assert!(
            e.to_string().contains("= 4294967296 exceeds pages_alloc 4"),
            "{e}"
        );
        let raw = Raw {
            normal: 0,
            zero: u32::MAX,
            ..sync()
        };
        assert_eq!(raw.field(Compression::Qpl), Some(Field::ZeroPages));
    }

    #[test]
    fn header_exactly_pages_alloc_pages_is_fine() {
        let raw = Raw {
            flags: 0,
            normal: 1,
            zero: 3,
            next_packet_size: PS,
            offsets: vec![0, 0x1000, 0x2000, 0x3000],
            ..Raw::qpl()
        };
        let h = raw.decode(Compression::None).unwrap();
        assert_eq!(h.zero_offsets(), &[0x1000, 0x2000, 0x3000]);
    }

    #[test]
    fn header_sync_with_pages() {
        let raw = Raw {
            flags: FLAG_SYNC | 0x08,
            ..Raw::qpl()
        };
        assert_eq!(raw.field(Compression::Qpl), Some(Field::Flags));
        let raw = Raw {
            flags: FLAG_SYNC | 0x08,
            normal: 0,
            zero: 1,
            next_packet_size: 0,
            ..Raw::qpl()
        };
        assert_eq!(raw.field(Compression::Qpl), Some(Field::Flags));
    }

    #[test]
    fn header_next_packet_size_none() {
        let good = Raw {
            flags: 0,
            next_packet_size: 2 * PS,
            ..Raw::qpl()
        };
        good.decode(Compression::None).unwrap();
        for n in [0, 2 * PS - 1, 2 * PS + 1, u32::MAX] {
            let raw = Raw {
                next_packet_size: n,
                ..good.clone()
            };
            let e = raw.decode(Compression::None).unwrap_err();
            assert_eq!(e.field(), Some(Field::NextPacketSize), "{n}");
        }
    }

    #[test]
    fn header_next_packet_size_qpl_range() {
        // 2 normal pages: 8..=8 + 2 x 4096.
        for n in [8 + 2, 8 + 2 * PS] {
            Raw {
                next_packet_size: n,
                ..Raw::qpl()
            }
            .decode(Compression::Qpl)
            .unwrap();
        }
        for n in [0, 7, 8 + 2 * PS + 1, u32::MAX] {
            let raw = Raw {
                next_packet_size: n,
                ..Raw::qpl()
            };
            let e = raw.decode(Compression::Qpl).unwrap_err();
            assert_eq!(e.field(), Some(Field::NextPacketSize), "{n}");
            assert!(e.to_string().contains("8..=8200"), "{e}");
        }
        // Zero pages only: no payload at all.
        let raw = Raw {
            normal: 0,
            zero: 1,
            next_packet_size: 4,
            offsets: vec![0],
            ..Raw::qpl()
        };
        assert_eq!(raw.field(Compression::Qpl), Some(Field::NextPacketSize));
    }

    #[test]
    fn header_next_packet_size_nonzero_on_empty_packet() {
        let raw = Raw {
            next_packet_size: 1,
            ..sync()
        };
        assert_eq!(raw.field(Compression::Qpl), Some(Field::NextPacketSize));
        let raw = Raw {
            flags: 0x08,
            next_packet_size: 4,
            ..sync()
        };
        assert_eq!(raw.field(Compression::Qpl), Some(Field::NextPacketSize));
    }

    #[test]
    fn header_block_name_not_nul_terminated() {
        let raw = Raw {
            name: vec![b'a'; 256],
            ..Raw::qpl()
        };
        assert_eq!(raw.field(Compression::Qpl), Some(Field::BlockName));
        // Checked on empty packets too.
        let raw = Raw {
            name: vec![b'a'; 256],
            ..sync()
        };
        assert_eq!(raw.field(Compression::Qpl), Some(Field::BlockName));
        // 255 bytes + NUL is the longest legal name (unknown here, so BlockName anyway,
        // but for the other reason).
        let raw = Raw {
            name: vec![b'a'; 255],
            ..Raw::qpl()
        };
        let e = raw.decode(Compression::Qpl).unwrap_err();
        assert!(e.to_string().contains("is not a memory block"), "{e}");
    }

    #[test]
    fn header_unknown_block() {
        for name in [&b"pc.rom"[..], b"", b"pc.ram\xff\n"] {
            let raw = Raw {
                name: name.to_vec(),
                ..Raw::qpl()
            };
            let e = raw.decode(Compression::Qpl).unwrap_err();
            assert_eq!(e.field(), Some(Field::BlockName));
        }
        let e = Raw {
            name: b"pc.r\"om\n".to_vec(),
            ..Raw::qpl()
        }
        .decode(Compression::Qpl)
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "field block_name: \"pc.r\\\"om\\n\" is not a memory block of this session"
        );
    }

    #[test]
    fn header_bytes_after_name_nul_and_reserved_are_ignored() {
        let mut b = Raw::qpl().bytes();
        b[36..64].fill(0xFF); // reserved: QEMU compatibility
        b[64 + 7..64 + 20].fill(b'x'); // after the terminating NUL
        b[352 - 8..].fill(0xFF); // unused offset slot (stale in QEMU's reused buffers)
        let blocks = blocks();
        let mut h = PacketHeader::default();
        h.decode_into(&b, &rules(&blocks, Compression::Qpl))
            .unwrap();
        assert_eq!(h.offsets, [0x3000, 0x1000, 0x2000]);
    }

    #[test]
    fn header_offset_unaligned() {
        let raw = Raw {
            offsets: vec![0x3000, 0x1001, 0x2000],
            ..Raw::qpl()
        };
        let e = raw.decode(Compression::Qpl).unwrap_err();
        assert_eq!(e.field(), Some(Field::Offset));
        assert!(e.to_string().contains("page 1 (normal): 0x1001"), "{e}");
        // A zero page's offset is checked as well.
        let raw = Raw {
            offsets: vec![0x3000, 0x1000, 0x2800],
            ..Raw::qpl()
        };
        let e = raw.decode(Compression::Qpl).unwrap_err();
        assert_eq!(e.field(), Some(Field::Offset));
        assert!(e.to_string().contains("page 2 (zero)"), "{e}");
    }

    #[test]
    fn header_offset_past_end() {
        // The last page of the block is fine, one further is not.
        Raw {
            offsets: vec![RAM_SIZE - 4096, 0, 0],
            ..Raw::qpl()
        }
        .decode(Compression::Qpl)
        .unwrap();
        let raw = Raw {
            offsets: vec![0, RAM_SIZE, 0],
            ..Raw::qpl()
        };
        let e = raw.decode(Compression::Qpl).unwrap_err();
        assert_eq!(e.field(), Some(Field::Offset));
        assert!(e.to_string().contains("page 1 (normal)"), "{e}");
        assert!(
            e.to_string().contains("past the end of block \"pc.ram\""),
            "{e}"
        );
        // Within pc.ram but not within pc.bios.
        let raw = Raw {
            name: b"pc.bios".to_vec(),
            offsets: vec![0, 0, BIOS_SIZE],
            ..Raw::qpl()
        };
        assert_eq!(raw.field(Compression::Qpl), Some(Field::Offset));
    }

    #[test]
    fn header_offset_plus_page_size_overflows() {
        let top = u64::MAX - u64::from(PS) + 1; // aligned, + page_size wraps to 0
        let raw = Raw {
            offsets: vec![0, top, 0],
            ..Raw::qpl()
        };
        let e = raw.decode(Compression::Qpl).unwrap_err();
        assert_eq!(e.field(), Some(Field::Offset));
        assert!(e.to_string().contains("overflows u64"), "{e}");
    }

    #[test]
    fn decode_into_reuses_its_vec_and_switches_blocks() {
        let blocks = blocks();
        let r = rules(&blocks, Compression::Qpl);
        let mut h = PacketHeader::default();
        h.decode_into(&Raw::qpl().bytes(), &r).unwrap();
        let cap = h.offsets.capacity();
        let ptr = h.offsets.as_ptr();
        let bios = Raw {
            name: b"pc.bios".to_vec(),
            offsets: vec![0x1000, 0, 0x2000],
            ..Raw::qpl()
        };
        h.decode_into(&bios.bytes(), &r).unwrap();
        assert_eq!(h.block, 1);
        h.decode_into(&Raw::qpl().bytes(), &r).unwrap();
        assert_eq!(h.block, 0);
        h.decode_into(&sync().bytes(), &r).unwrap();
        assert_eq!(h.offsets.len(), 0);
        h.decode_into(&Raw::qpl().bytes(), &r).unwrap();
        assert_eq!((h.offsets.capacity(), h.offsets.as_ptr()), (cap, ptr));
        // An error followed by a good packet decodes the good one correctly.
        let _ = h.decode_into(
            &Raw {
                normal: 9,
                ..Raw::qpl()
            }
            .bytes(),
            &r,
        );
        h.decode_into(&Raw::qpl().bytes(), &r).unwrap();
        assert_eq!(h.offsets, [0x3000, 0x1000, 0x2000]);
    }

    // ---- zlens --------------------------------------------------------------------------

    #[test]
    fn zlens_layout_and_round_trip() {
        let mut buf = [0u8; 12];
        encode_zlens(&mut buf, &[1, 0x1000, 0x0102_0304]);
        assert_eq!(buf, [0, 0, 0, 1, 0, 0, 0x10, 0, 1, 2, 3, 4]);
        let mut buf = [0u8; 8];
        encode_zlens(&mut buf, &[100, 4096]);
        let mut out = vec![77];
        let sum = decode_zlens(&buf, 2, PS, 8 + 4196, &mut out).unwrap();
        assert_eq!(sum, 4196);
        assert_eq!(out, [100, 4096]);
        // No normal pages: empty array, sum 0.
        assert_eq!(decode_zlens(&[], 0, PS, 0, &mut out), Ok(0));
        assert!(out.is_empty());
    }

    #[test]
    fn zlens_wrong_buffer_length() {
        let mut out = Vec::new();
        let e = decode_zlens(&[0; 7], 2, PS, 100, &mut out).unwrap_err();
        assert_eq!(
            e,
            WireError::Short {
                what: "qpl length array",
                need: 8,
                got: 7
            }
        );
        assert!(decode_zlens(&[0; 12], 2, PS, 100, &mut out).is_err());
    }

    #[test]
    fn zlen_zero() {
        let mut buf = [0u8; 12];
        encode_zlens(&mut buf, &[10, 0, 10]);
        let e = decode_zlens(&buf, 3, PS, 32, &mut Vec::new()).unwrap_err();
        assert_eq!(e.field(), Some(Field::Zlen));
        assert_eq!(e.to_string(), "field zlen: page 1: 0, expected 1..=4096");
    }

    #[test]
    fn zlen_over_page_size() {
        let mut buf = [0u8; 8];
        encode_zlens(&mut buf, &[PS + 1, 10]);
        let e = decode_zlens(&buf, 2, PS, 8 + PS + 11, &mut Vec::new()).unwrap_err();
        assert_eq!(e.field(), Some(Field::Zlen));
        assert!(e.to_string().contains("page 0: 4097"), "{e}");
        encode_zlens(&mut buf, &[10, u32::MAX]);
        let e = decode_zlens(&buf, 2, PS, 0, &mut Vec::new()).unwrap_err();
        assert_eq!(e.field(), Some(Field::Zlen));
    }

    #[test]
    fn zlen_sum_mismatch() {
        let mut buf = [0u8; 16];
        encode_zlens(&mut buf, &[254, 250, 250, 250]);
        let e = decode_zlens(&buf, 4, PS, 1000, &mut Vec::new()).unwrap_err();
        assert_eq!(e.field(), Some(Field::NextPacketSize));
        assert_eq!(
            e.to_string(),
            "field next_packet_size: 1000, but 4 x normal_pages 4 + sum of zlen 1004 = 1020"
        );
        // Sums past u32 do not wrap: 8 + 2 x (2^32 - 1) = 2^33 + 6, which is 6 in u32.
        let mut buf = [0u8; 8];
        encode_zlens(&mut buf, &[u32::MAX, u32::MAX]);
        let e = decode_zlens(&buf, 2, u32::MAX, 6, &mut Vec::new()).unwrap_err();
        assert_eq!(e.field(), Some(Field::NextPacketSize));
    }

    // ---- properties ---------------------------------------------------------------------

    /// A random valid header for the test rules, as (fields, block name, offsets).
    fn valid_header() -> impl Strategy<Value = (HeaderFields, String, Vec<u64>)> {
        (
            0..=PPP,
            any::<u64>(),
            any::<bool>(),
            any::<bool>(),
            any::<u64>(),
        )
            .prop_flat_map(|(pages, packet_num, qpl, bios, seed)| {
                let (name, size) = if bios {
                    ("pc.bios", BIOS_SIZE)
                } else {
                    ("pc.ram", RAM_SIZE)
                };
                let slots = size / u64::from(PS);
                (
                    0..=pages,
                    proptest::collection::vec(0..slots, pages as usize),
                    Just((pages, packet_num, qpl, name, seed)),
                )
                    .prop_map(
                        move |(normal, idx, (pages, packet_num, qpl, name, seed))| {
                            let zero = pages - normal;
                            let (flags, nps) = if pages == 0 {
                                (FLAG_SYNC | if qpl { 0x08 } else { 0 }, 0)
                            } else if qpl {
                                let extra = (seed % (u64::from(normal) * u64::from(PS) + 1)) as u32;
                                (0x08, 4 * normal + extra.max(normal))
                            } else {
                                (0x00, normal * PS)
                            };
                            let fields = HeaderFields {
                                flags,
                                pages_alloc: PPP,
                                normal_pages: normal,
                                next_packet_size: nps,
                                packet_num,
                                zero_pages: zero,
                            };
                            let offsets = idx.iter().map(|i| i * u64::from(PS)).collect();
                            (fields, name.to_string(), offsets)
                        },
                    )
            })
    }

    proptest! {
        #[test]
        fn header_round_trip((fields, name, offsets) in valid_header()) {
            let blocks = blocks();
            let compression = Compression::from_flags(fields.flags).unwrap();
            let r = rules(&blocks, compression);
            let mut buf = vec![0xCC; header_len(PPP)];
            encode_header(&mut buf, &fields, &name, &offsets);
            prop_assert!(buf[36..64].iter().all(|&b| b == 0));
            let mut h = PacketHeader::default();
            h.decode_into(&buf, &r).unwrap();
            prop_assert_eq!(h.flags, fields.flags);
            prop_assert_eq!(h.pages_alloc, fields.pages_alloc);
            prop_assert_eq!(h.normal_pages, fields.normal_pages);
            prop_assert_eq!(h.zero_pages, fields.zero_pages);
            prop_assert_eq!(h.next_packet_size, fields.next_packet_size);
            prop_assert_eq!(h.packet_num, fields.packet_num);
            prop_assert_eq!(&h.offsets, &offsets);
            if !offsets.is_empty() {
                prop_assert_eq!(&blocks[h.block].name, &name);
            }
        }

        #[test]
        fn header_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400),
                                      ppp in 0u32..8, comp in 0usize..6) {
            let blocks = blocks();
            let all = [Compression::None, Compression::Zlib, Compression::Zstd,
                       Compression::Qpl, Compression::Uadk, Compression::Qatzip];
            let r = HeaderRules { page_size: PS, pages_per_packet: ppp, compression: all[comp], blocks: &blocks };
            let mut h = PacketHeader::default();
            let _ = h.decode_into(&bytes, &r);
            let mut b = bytes.clone();
            b.resize(header_len(ppp), 0);
            let _ = h.decode_into(&b, &r);
        }

        #[test]
        fn mutated_header_decode_never_panics(
            (fields, name, offsets) in valid_header(),
            edits in proptest::collection::vec((0usize..352, any::<u8>()), 1..8)) {
            let blocks = blocks();
            let mut buf = vec![0; header_len(PPP)];
            encode_header(&mut buf, &fields, &name, &offsets);
            for (at, v) in edits {
                buf[at] = v;
            }
            let mut h = PacketHeader::default();
            for c in [Compression::None, Compression::Qpl, Compression::Zlib, Compression::Uadk] {
                if h.decode_into(&buf, &rules(&blocks, c)).is_ok() {
                    // Whatever was accepted obeys the rules.
                    prop_assert!(u64::from(h.normal_pages) + u64::from(h.zero_pages) <= u64::from(PPP));
                    prop_assert_eq!(h.offsets.len(), (h.normal_pages + h.zero_pages) as usize);
                    for &o in &h.offsets {
                        prop_assert!(o % u64::from(PS) == 0 && o + u64::from(PS) <= blocks[h.block].size);
                    }
                }
            }
        }

        #[test]
        fn init_packet_parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80),
                                          channels in any::<u32>()) {
            if let Ok(p) = InitPacket::parse(&bytes) {
                prop_assert_eq!(&p.encode()[..25], &bytes[..25]);
                let _ = p.check(&[0; 16], channels);
            }
        }

        #[test]
        fn init_packet_round_trip(uuid in any::<[u8; 16]>(), id in any::<u8>()) {
            let p = InitPacket { uuid, channel_id: id };
            prop_assert_eq!(InitPacket::parse(&p.encode()), Ok(p));
        }

        #[test]
        fn zlens_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64),
                                     normal in any::<u32>(), page_size in any::<u32>(),
                                     nps in any::<u32>()) {
            let mut out = Vec::new();
            let _ = decode_zlens(&bytes, normal, page_size, nps, &mut out);
            let n = (bytes.len() / 4) as u32;
            let _ = decode_zlens(&bytes[..4 * n as usize], n, page_size, nps, &mut out);
        }

        #[test]
        fn zlens_round_trip(zl in proptest::collection::vec(1..=PS, 0..64)) {
            let mut buf = vec![0; 4 * zl.len()];
            encode_zlens(&mut buf, &zl);
            let sum: u64 = zl.iter().map(|&z| u64::from(z)).sum();
            let nps = u32::try_from(4 * zl.len() as u64 + sum).unwrap();
            let mut out = Vec::new();
            prop_assert_eq!(decode_zlens(&buf, zl.len() as u32, PS, nps, &mut out), Ok(sum));
            prop_assert_eq!(out, zl);
        }
    }
}
