//! Offline decoding of recorded multifd channel streams (QEMU's or pagewire's) into guest
//! memory.
//!
//! Each capture is one channel's byte stream, starting with its init packet. Packets are
//! validated with the same rules as the live receiver and applied with the same code
//! (the channels' `apply` module). Rounds are respected: every capture is applied up to its
//! next SYNC before any capture goes past it, so a page resent in a later round on one
//! channel is never overwritten by its older copy from another channel.
//!
//! Streams that open with a SYNC right after their init packet (QEMU's setup SYNC, and
//! pagewire's since it follows QEMU's cadence) are recognised when *every* capture opens that
//! way: that SYNC ends no round. Older recordings without it decode as before. (A recording
//! without opening SYNCs whose every channel carried nothing in the first round would be
//! counted one round short; the decoded memory is the same either way.)

use std::io::{self, Read};

use pagewire_transport::control::MAX_PAGES_PER_PACKET;
use pagewire_transport::wire::{
    self, BlockSpec, Compression, HeaderRules, InitPacket, PacketHeader, HEADER_FIXED_LEN,
    INIT_PACKET_LEN,
};
use serde::Serialize;
use thiserror::Error;

use crate::channel::apply::{finish_packet, payload_iovecs};
use crate::codec::DeflateDecompressor;
use crate::error::{ChannelError, ChannelErrorKind, Place};
use crate::memory::GuestRam;
use crate::stats::ChannelStats;

/// Errors of the decoder.
#[derive(Debug, Error)]
pub enum DecodeError {
    #[error("capture '{capture}': {source}")]
    Channel {
        capture: String,
        source: ChannelError,
    },
    #[error("capture '{capture}': init packet: {source}")]
    Init {
        capture: String,
        source: wire::WireError,
    },
    #[error("capture '{capture}': {detail}")]
    Stream { capture: String, detail: String },
    #[error("capture '{capture}': {source}")]
    Io { capture: String, source: io::Error },
}

/// Counters of a decode.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DecodeStats {
    /// Rounds seen (SYNC packets per channel, the most of any channel, less the opening
    /// SYNC where the streams have one).
    pub rounds: u64,
    /// Every stream opened with a SYNC right after its init packet (QEMU's cadence).
    pub opening_sync: bool,
    /// Compression found in the streams ("none" or "qpl").
    pub compression: String,
    /// Pages per packet found in the streams.
    pub pages_per_packet: u32,
    /// Sum over channels.
    pub total: ChannelStats,
    /// Per channel.
    pub channels: Vec<ChannelStats>,
}

struct Stream<R> {
    name: String,
    reader: R,
    channel: u16,
    packets: u64,
    done: bool,
    stats: ChannelStats,
    rounds: u64,
    /// The first packet after the init packet was a SYNC.
    opened_with_sync: bool,
}

/// Decode `captures` (name, reader) into `mem` with pages of `page_size` bytes.
pub fn decode_streams<R: Read>(
    mem: &GuestRam,
    captures: Vec<(String, R)>,
    page_size: u32,
) -> Result<DecodeStats, DecodeError> {
    decode_streams_with(mem, captures, page_size, None)
}

/// [`decode_streams`] with the streams' pages per packet given (`None`: learned from the first
/// header that names it; a QEMU SYNC, which names none, before any other header is taken to be
/// QEMU's 512 KiB packet size).
pub fn decode_streams_with<R: Read>(
    mem: &GuestRam,
    captures: Vec<(String, R)>,
    page_size: u32,
    pages_per_packet: Option<u32>,
) -> Result<DecodeStats, DecodeError> {
    let mut streams = Vec::with_capacity(captures.len());
    let mut uuid: Option<[u8; 16]> = None;
    for (name, mut reader) in captures {
        let mut buf = [0u8; INIT_PACKET_LEN];
        read_full(&mut reader, &mut buf, &name, Place::Init, 0, "init packet")?
            .then_some(())
            .ok_or_else(|| DecodeError::Stream {
                capture: name.clone(),
                detail: "empty capture (no init packet)".into(),
            })?;
        let init = InitPacket::parse(&buf).map_err(|source| DecodeError::Init {
            capture: name.clone(),
            source,
        })?;
        match uuid {
            None => uuid = Some(init.uuid),
            Some(u) if u != init.uuid => {
                return Err(DecodeError::Init {
                    capture: name,
                    source: wire::WireError::Invalid {
                        field: wire::Field::Uuid,
                        detail: "differs from the first capture's uuid (not the same session)"
                            .into(),
                    },
                })
            }
            Some(_) => {}
        }
        let channel = init.channel_id as u16;
        if streams.iter().any(|s: &Stream<R>| s.channel == channel) {
            return Err(DecodeError::Init {
                capture: name,
                source: wire::WireError::Invalid {
                    field: wire::Field::ChannelId,
                    detail: format!("channel {channel} appears in two captures"),
                },
            });
        }
        streams.push(Stream {
            name,
            reader,
            channel,
            packets: 0,
            done: false,
            stats: ChannelStats {
                channel,
                wire_bytes: INIT_PACKET_LEN as u64,
                ..Default::default()
            },
            rounds: 0,
            opened_with_sync: false,
        });
    }
    let blocks: Vec<BlockSpec> = mem
        .blocks()
        .iter()
        .map(|b| BlockSpec {
            name: b.name().into(),
            size: b.len() as u64,
        })
        .collect();
    let mut st = State {
        page_size,
        ppp: pages_per_packet,
        compression: None,
        blocks,
        header: PacketHeader::default(),
        hbuf: Vec::new(),
        zlen_buf: Vec::new(),
        zlens: Vec::new(),
        zbuf: Vec::new(),
        iov: Vec::new(),
        decomp: DeflateDecompressor::new(),
    };
    // Round by round: each stream up to its next SYNC (or its end).
    while streams.iter().any(|s| !s.done) {
        for s in streams.iter_mut().filter(|s| !s.done) {
            st.run_to_sync(mem, s)?;
        }
    }
    let opening_sync = !streams.is_empty() && streams.iter().all(|s| s.opened_with_sync);
    let syncs = streams.iter().map(|s| s.rounds).max().unwrap_or(0);
    let mut out = DecodeStats {
        rounds: syncs.saturating_sub(u64::from(opening_sync)),
        opening_sync,
        compression: st.compression.map_or("none", |c| c.name()).to_string(),
        pages_per_packet: st.ppp.unwrap_or(0),
        ..Default::default()
    };
    streams.sort_by_key(|s| s.channel);
    for s in streams {
        out.total.add(&s.stats);
        out.channels.push(s.stats);
    }
    Ok(out)
}

/// QEMU's multifd packet size (MULTIFD_PACKET_SIZE): pages per packet = this / page size.
const QEMU_PACKET_BYTES: u32 = 512 * 1024;

struct State {
    page_size: u32,
    ppp: Option<u32>,
    compression: Option<Compression>,
    blocks: Vec<BlockSpec>,
    header: PacketHeader,
    hbuf: Vec<u8>,
    zlen_buf: Vec<u8>,
    zlens: Vec<u32>,
    zbuf: Vec<u8>,
    iov: Vec<libc::iovec>,
    decomp: DeflateDecompressor,
}

fn be32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_be_bytes)
}

impl State {
    fn run_to_sync<R: Read>(
        &mut self,
        mem: &GuestRam,
        s: &mut Stream<R>,
    ) -> Result<(), DecodeError> {
        let cerr = |s: &Stream<R>, place, kind| DecodeError::Channel {
            capture: s.name.clone(),
            source: ChannelError {
                channel: s.channel,
                place,
                kind,
            },
        };
        loop {
            let index = s.packets;
            let mut fixed = [0u8; HEADER_FIXED_LEN];
            if !read_full(
                &mut s.reader,
                &mut fixed,
                &s.name,
                Place::Header { index },
                s.channel,
                "header",
            )? {
                s.done = true;
                return Ok(());
            }
            // The header's length depends on pages per packet: learn it from the first header
            // that names it and hold every later one to it. QEMU (>= 9.2) sends SYNC packets at
            // full length with pages_alloc = 0; one before any other header is taken to be
            // QEMU's size (its 512 KiB packets), which the next header then confirms or not.
            let pages_alloc = be32(&fixed, 12);
            let qemu_sync = pages_alloc == 0 && be32(&fixed, 8) & wire::FLAG_SYNC != 0;
            let ppp = match self.ppp {
                Some(p) => p,
                None if qemu_sync => (QEMU_PACKET_BYTES / self.page_size.max(1)).max(1),
                None => *self.ppp.insert(pages_alloc),
            };
            if ppp == 0 || ppp > MAX_PAGES_PER_PACKET {
                return Err(cerr(
                    s,
                    Place::Header { index },
                    wire::WireError::Invalid {
                        field: wire::Field::PagesAlloc,
                        detail: format!("{ppp} not in 1..={MAX_PAGES_PER_PACKET}"),
                    }
                    .into(),
                ));
            }
            let hlen = wire::header_len(ppp);
            self.hbuf.resize(hlen, 0);
            self.hbuf[..HEADER_FIXED_LEN].copy_from_slice(&fixed);
            if (pages_alloc == ppp || qemu_sync)
                && !read_full(
                    &mut s.reader,
                    &mut self.hbuf[HEADER_FIXED_LEN..],
                    &s.name,
                    Place::Header { index },
                    s.channel,
                    "header",
                )?
            {
                return Err(cerr(
                    s,
                    Place::Header { index },
                    ChannelErrorKind::ClosedMid {
                        what: "header",
                        got: HEADER_FIXED_LEN,
                        need: hlen,
                    },
                ));
            }
            // Compression: the first packet that carries pages sets it.
            let has_pages = be32(&fixed, 16) != 0 || be32(&fixed, 32) != 0;
            if self.compression.is_none() && has_pages {
                match Compression::from_flags(be32(&fixed, 8)) {
                    Some(c @ (Compression::None | Compression::Qpl)) => self.compression = Some(c),
                    Some(other) => {
                        return Err(DecodeError::Stream {
                            capture: s.name.clone(),
                            detail: format!(
                            "compression {} streams cannot be decoded (only none and qpl framing)",
                            other.name()
                        ),
                        })
                    }
                    None => {} // decode_into reports the bad flags.
                }
            }
            let compression = self.compression.unwrap_or(Compression::None);
            let rules = HeaderRules {
                page_size: self.page_size,
                pages_per_packet: ppp,
                compression,
                blocks: &self.blocks,
            };
            let packet_num = u64::from_be_bytes(fixed[24..32].try_into().unwrap_or([0; 8]));
            let place = Place::Packet { index, packet_num };
            self.header
                .decode_into(&self.hbuf, &rules)
                .map_err(|e| cerr(s, place, e.into()))?;
            s.packets += 1;
            s.stats.wire_bytes += hlen as u64 + self.header.next_packet_size as u64;
            if self.header.is_sync() {
                s.stats.sync_packets += 1;
                s.rounds += 1;
                s.opened_with_sync |= index == 0;
                return Ok(());
            }
            let normal = self.header.normal_pages;
            let qpl = compression == Compression::Qpl;
            self.zlens.clear();
            if qpl && normal > 0 {
                let n = 4 * normal as usize;
                self.zlen_buf.resize(n, 0);
                if !read_full(
                    &mut s.reader,
                    &mut self.zlen_buf,
                    &s.name,
                    place,
                    s.channel,
                    "length array",
                )? {
                    return Err(cerr(
                        s,
                        place,
                        ChannelErrorKind::ClosedMid {
                            what: "length array",
                            got: 0,
                            need: n,
                        },
                    ));
                }
                wire::decode_zlens(
                    &self.zlen_buf,
                    normal,
                    self.page_size,
                    self.header.next_packet_size,
                    &mut self.zlens,
                )
                .map_err(|e| cerr(s, place, e.into()))?;
            }
            if normal > 0 {
                self.zbuf.resize(ppp as usize * self.page_size as usize, 0);
                let zl = if qpl { Some(&self.zlens[..]) } else { None };
                if !payload_iovecs(
                    mem,
                    &self.header,
                    zl,
                    self.page_size,
                    &mut self.zbuf,
                    &mut self.iov,
                ) {
                    return Err(cerr(
                        s,
                        place,
                        ChannelErrorKind::Io(io::Error::other("internal: payload plan")),
                    ));
                }
                let need: usize = self.iov.iter().map(|v| v.iov_len).sum();
                let mut got = 0usize;
                for v in &self.iov {
                    // SAFETY: payload_iovecs built every iovec inside guest memory (checked
                    // with range_ptr against the block) or inside `self.zbuf`; both stay
                    // valid and are not otherwise borrowed during this loop.
                    let dst =
                        unsafe { std::slice::from_raw_parts_mut(v.iov_base as *mut u8, v.iov_len) };
                    if !read_full(&mut s.reader, dst, &s.name, place, s.channel, "payload")? {
                        return Err(cerr(
                            s,
                            place,
                            ChannelErrorKind::ClosedMid {
                                what: "payload",
                                got,
                                need,
                            },
                        ));
                    }
                    got += v.iov_len;
                }
            }
            finish_packet(
                mem,
                &self.header,
                compression,
                &self.zlens,
                self.page_size,
                &self.zbuf,
                &mut self.decomp,
                &mut s.stats,
                None,
            )
            .map_err(|e| {
                cerr(
                    s,
                    place,
                    ChannelErrorKind::Codec {
                        page: e.page,
                        offset: e.offset,
                        source: e.source,
                    },
                )
            })?;
        }
    }
}

/// Fill `buf` entirely. `Ok(false)` on EOF before the first byte; EOF after some bytes is a
/// truncation error.
fn read_full<R: Read>(
    r: &mut R,
    buf: &mut [u8],
    name: &str,
    place: Place,
    channel: u16,
    what: &'static str,
) -> Result<bool, DecodeError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => {
                return Err(DecodeError::Channel {
                    capture: name.to_string(),
                    source: ChannelError {
                        channel,
                        place,
                        kind: ChannelErrorKind::ClosedMid {
                            what,
                            got,
                            need: buf.len(),
                        },
                    },
                })
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(DecodeError::Io {
                    capture: name.to_string(),
                    source,
                })
            }
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Block;
    use pagewire_transport::wire::{encode_header, HeaderFields, FLAG_SYNC, MAGIC, VERSION};

    /// QEMU >= 9.2's SYNC: full length, every field zero but magic, version, flags, packet_num.
    fn qemu_sync(packet_num: u64) -> Vec<u8> {
        let mut h = vec![0u8; wire::header_len(128)];
        h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&VERSION.to_be_bytes());
        h[8..12].copy_from_slice(&FLAG_SYNC.to_be_bytes());
        h[24..32].copy_from_slice(&packet_num.to_be_bytes());
        h
    }

    fn raw_packet(packet_num: u64, offset: u64, fill: u8) -> Vec<u8> {
        let mut h = vec![0u8; wire::header_len(128)];
        let f = HeaderFields {
            flags: 0,
            pages_alloc: 128,
            normal_pages: 1,
            next_packet_size: 4096,
            packet_num,
            zero_pages: 0,
        };
        encode_header(&mut h, &f, "pc.ram", &[offset]);
        h.extend_from_slice(&[fill; 4096]);
        h
    }

    /// QEMU-style SYNC packets (pages_alloc = 0) first, in the middle and last.
    #[test]
    fn qemu_sync_packets_anywhere_in_a_stream() {
        let mut stream = InitPacket {
            uuid: [1; 16],
            channel_id: 0,
        }
        .encode()
        .to_vec();
        stream.extend(qemu_sync(0));
        stream.extend(raw_packet(1, 4096, 0xAA));
        stream.extend(qemu_sync(2));
        stream.extend(raw_packet(3, 8192, 0xBB));
        stream.extend(qemu_sync(4));
        let mem =
            GuestRam::new(vec![Block::anonymous("pc.ram", 16 * 4096).expect("map")]).expect("mem");
        let st =
            decode_streams(&mem, vec![("qemu".to_string(), &stream[..])], 4096).expect("decodes");
        // The first SYNC is the opening one (QEMU's setup SYNC): two rounds, three SYNCs.
        assert!(st.opening_sync);
        assert_eq!(st.rounds, 2);
        assert_eq!(st.total.sync_packets, 3);
        assert_eq!(st.pages_per_packet, 128);
        let b = mem.block(0).expect("block").to_vec();
        assert!(b[4096..8192].iter().all(|&x| x == 0xAA));
        assert!(b[8192..12288].iter().all(|&x| x == 0xBB));
    }

    fn init(channel_id: u8) -> Vec<u8> {
        InitPacket {
            uuid: [1; 16],
            channel_id,
        }
        .encode()
        .to_vec()
    }

    /// QEMU's captured layout of a one-round migration on each channel: `sync, data…, sync,
    /// sync` (setup, the pass over the dirty bitmap, completion). Decoded as two rounds (the
    /// pass, and a completion that carried nothing) with the data in place.
    #[test]
    fn qemu_one_round_cadence() {
        let mut a = init(0);
        a.extend(qemu_sync(0));
        a.extend(raw_packet(1, 0, 0x11));
        a.extend(raw_packet(2, 4096, 0x22));
        a.extend(qemu_sync(5));
        a.extend(qemu_sync(7));
        let mut b = init(1);
        b.extend(qemu_sync(0));
        b.extend(raw_packet(3, 8192, 0x33));
        b.extend(qemu_sync(6));
        b.extend(qemu_sync(8));
        let mem =
            GuestRam::new(vec![Block::anonymous("pc.ram", 16 * 4096).expect("map")]).expect("mem");
        let caps = vec![("b".to_string(), &b[..]), ("a".to_string(), &a[..])];
        let st = decode_streams(&mem, caps, 4096).expect("decodes");
        assert!(st.opening_sync);
        assert_eq!(st.rounds, 2);
        assert_eq!(
            st.channels
                .iter()
                .map(|c| c.sync_packets)
                .collect::<Vec<_>>(),
            [3, 3]
        );
        let m = mem.block(0).expect("block").to_vec();
        assert!(m[..4096].iter().all(|&x| x == 0x11));
        assert!(m[4096..8192].iter().all(|&x| x == 0x22));
        assert!(m[8192..12288].iter().all(|&x| x == 0x33));
    }

    /// A recording without opening SYNCs in which one channel carried nothing in round 1 (its
    /// stream starts with round 1's SYNC): not taken for an opening SYNC, so round 2's copy of
    /// a page on that channel still wins over round 1's copy on the other.
    #[test]
    fn old_recording_with_an_empty_first_round_on_one_channel() {
        // Channel 0: round 1 writes page 0 (old); round 2 nothing.
        let mut a = init(0);
        a.extend(raw_packet(0, 0, 0x01));
        a.extend(qemu_sync(1));
        a.extend(qemu_sync(4));
        // Channel 1: round 1 nothing; round 2 rewrites page 0 (new).
        let mut b = init(1);
        b.extend(qemu_sync(2));
        b.extend(raw_packet(3, 0, 0x02));
        b.extend(qemu_sync(5));
        let mem =
            GuestRam::new(vec![Block::anonymous("pc.ram", 16 * 4096).expect("map")]).expect("mem");
        // Channel 1 first: with its first SYNC misread as an opening one, round 2's page would
        // be applied before channel 0's round 1 copy and then overwritten.
        let caps = vec![("b".to_string(), &b[..]), ("a".to_string(), &a[..])];
        let st = decode_streams(&mem, caps, 4096).expect("decodes");
        assert!(!st.opening_sync);
        assert_eq!(st.rounds, 2);
        let m = mem.block(0).expect("block").to_vec();
        assert!(m[..4096].iter().all(|&x| x == 0x02), "round 2's copy wins");
    }
}
