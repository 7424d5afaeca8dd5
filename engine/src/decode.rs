//! Offline decoding of recorded multifd channel streams (QEMU's or pagewire's) into guest
//! memory.
//!
//! Each capture is one channel's byte stream, starting with its init packet. Packets are
//! validated with the same rules as the live receiver and applied with the same code
//! ([`crate::channel::apply`]). Rounds are respected: every capture is applied up to its
//! next SYNC before any capture goes past it, so a page resent in a later round on one
//! channel is never overwritten by its older copy from another channel.

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
use crate::memory::GuestMemory;
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
    /// Rounds seen (SYNC packets per channel, the most of any channel).
    pub rounds: u64,
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
}

/// Decode `captures` (name, reader) into `mem` with pages of `page_size` bytes.
pub fn decode_streams<R: Read>(
    mem: &GuestMemory,
    captures: Vec<(String, R)>,
    page_size: u32,
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
        ppp: None,
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
    let mut out = DecodeStats {
        rounds: streams.iter().map(|s| s.rounds).max().unwrap_or(0),
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
        mem: &GuestMemory,
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
            // The header's length depends on pages_alloc: learn it from the first header and
            // hold every later one to it.
            let pages_alloc = be32(&fixed, 12);
            let ppp = *self.ppp.get_or_insert(pages_alloc);
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
            if pages_alloc == ppp
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
