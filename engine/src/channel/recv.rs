//! The receiving side of one channel: one thread, one io_uring, one TCP connection.
//!
//! Per packet: read the fixed-size header and validate every field (DESIGN.md §5) before
//! anything else of the packet lands in guest memory; for the qpl framing read and validate
//! the length array (in clear text the header's read takes up to a full length array more
//! of whatever has arrived, so a packet's header and length array usually cost one receive,
//! as a `none` packet's header does; bytes read ahead wait in the header buffer); then one
//! RECVMSG whose iovecs put raw pages straight into guest memory and compressed pages into
//! the zbuf; then inflate into guest memory. Every wait is bounded by the idle timeout, and
//! a peer that closes mid-packet is an error naming the channel, the packet and what was
//! being read.

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use io_uring::{opcode, types};
use pagewire_transport::ring::{advance_iovecs, Ring};
use pagewire_transport::tls::{Conn, Need, RecordReader, TlsError};
use pagewire_transport::wire::{self, BlockSpec, Compression, HeaderRules, PacketHeader};

use crate::channel::apply::{finish_packet, payload_iovecs};
use crate::codec::PageDecompressor;
use crate::error::{ChannelError, ChannelErrorKind, Place};
use crate::fresh::FreshMap;
use crate::memory::GuestRam;
use crate::stats::{ChannelStats, Progress};

/// What the channel's owner decides when a SYNC arrives or the stream ends.
pub trait RoundGate: Sync {
    /// Called after this channel has applied all of round `round` (1-based) and read its
    /// SYNC. Returns once every channel has done so, or an error to stop.
    fn synced(&self, channel: u16, round: u64) -> Result<(), ChannelErrorKind>;
    /// This channel's peer closed it cleanly: at a packet boundary, every round it carried
    /// ended by a SYNC.
    fn closed(&self, channel: u16);
    /// Whether the session failed elsewhere (stop at once).
    fn failed(&self) -> bool;
}

/// Settings of a receiving channel.
#[derive(Clone, Debug)]
pub struct RecvSettings {
    pub page_size: u32,
    pub pages_per_packet: u32,
    pub compression: Compression,
    pub blocks: Vec<BlockSpec>,
    pub idle_timeout: Duration,
    /// Read headers, length arrays and all-compressed payloads with READ_FIXED.
    pub registered_buffers: bool,
    /// Pages written so far, when the memory was all zero at the start (receiver-allocated):
    /// zero pages on fresh pages are left untouched. `None`: every zero page is checked.
    pub fresh: Option<Arc<FreshMap>>,
    /// The stream opens with a SYNC right after its init packet (the hello's
    /// `FEATURE_OPENING_SYNC`): the first packet must be that SYNC, and it ends no round.
    pub opening_sync: bool,
}

/// The receiving end of one channel.
pub struct RecvChannel {
    id: u16,
    stream: TcpStream,
    /// Created on the channel's own thread (SINGLE_ISSUER ties a ring to its creator).
    ring: Option<Ring>,
    set: RecvSettings,
    mem: Arc<GuestRam>,
    /// The packet header, and room after it for bytes read ahead (qpl framing in clear
    /// text: up to a full length array). `header_buf[ahead.0..ahead.1]` are bytes received
    /// past the current header and not consumed yet: the length array's, the payload's, the
    /// next packet's.
    header_buf: Vec<u8>,
    ahead: (usize, usize),
    /// Populating fresh pages ahead of a receive failed once (old kernel, small pages): off.
    populate_off: bool,
    zlen_buf: Vec<u8>,
    zbuf: Vec<u8>,
    header: PacketHeader,
    zlens: Vec<u32>,
    iov: Vec<libc::iovec>,
    msg: Box<libc::msghdr>,
    decomp: Box<dyn PageDecompressor>,
    packets: u64,
    /// Buffers registered with the ring (base, length), by registration index.
    fixed: Vec<(usize, usize)>,
    /// TLS: records are received into this reader's buffer and opened there; only their
    /// authenticated plaintext is copied to the packet's destinations (`None`: clear text,
    /// received straight into the destinations).
    tls: Option<RecordReader>,
    stats: ChannelStats,
}

// SAFETY: the raw pointers inside a RecvChannel (its msghdr and iovecs) point into buffers
// it owns or into guest memory it holds an Arc of. It is moved to its engine thread once and
// used only there.
unsafe impl Send for RecvChannel {}

impl std::fmt::Debug for RecvChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvChannel")
            .field("id", &self.id)
            .field("stats", &self.stats)
            .finish()
    }
}

enum Got {
    Full,
    /// EOF before the first byte.
    Eof,
}

impl RecvChannel {
    /// A channel over `stream`, whose init packet has been read and checked.
    pub fn new(
        id: u16,
        stream: TcpStream,
        set: RecvSettings,
        mem: Arc<GuestRam>,
        decomp: Box<dyn PageDecompressor>,
    ) -> Result<RecvChannel, ChannelError> {
        let ppp = set.pages_per_packet as usize;
        let ps = set.page_size as usize;
        // Read-ahead room for the qpl framing's length array (TLS: `with_tls` takes it away;
        // the record reader buffers there).
        let ahead_room = if set.compression == Compression::Qpl {
            4 * ppp
        } else {
            0
        };
        Ok(RecvChannel {
            id,
            stream,
            ring: None,
            header_buf: vec![0; wire::header_len(set.pages_per_packet) + ahead_room],
            ahead: (0, 0),
            populate_off: false,
            zlen_buf: vec![0; 4 * ppp],
            zbuf: vec![0; ppp * ps],
            header: PacketHeader {
                offsets: Vec::with_capacity(ppp),
                ..Default::default()
            },
            zlens: Vec::with_capacity(ppp),
            iov: Vec::with_capacity(ppp),
            // SAFETY: msghdr is a plain C struct for which all-zero is a valid value.
            msg: Box::new(unsafe { std::mem::zeroed() }),
            decomp,
            packets: 0,
            fixed: Vec::new(),
            tls: None,
            stats: ChannelStats {
                channel: id,
                wire_bytes: wire::INIT_PACKET_LEN as u64,
                ..Default::default()
            },
            set,
            mem,
        })
    }

    /// Counters so far.
    pub fn stats(&self) -> &ChannelStats {
        &self.stats
    }

    /// Receive TLS records through `reader` (from the connection's set-up, with whatever it
    /// has buffered) instead of clear text.
    pub fn with_tls(mut self, reader: Option<RecordReader>) -> RecvChannel {
        if reader.is_some() {
            self.header_buf
                .truncate(wire::header_len(self.set.pages_per_packet));
        }
        self.tls = reader;
        self
    }

    /// Record this thread's CPU time in the stats (call from the channel's thread).
    pub fn set_cpu_seconds(&mut self, secs: f64) {
        self.stats.cpu_seconds = secs;
    }

    /// Receive and apply packets until the stream ends cleanly (EOF between packets, no round
    /// left open) or an error.
    pub fn run(&mut self, gate: &dyn RoundGate, progress: &Progress) -> Result<(), ChannelError> {
        if self.ring.is_none() {
            let mut ring = Ring::new(8).map_err(|e| self.err(Place::Init, e.into()))?;
            if self.set.registered_buffers {
                let bufs = match self.tls.as_mut() {
                    // TLS: the kernel writes only ciphertext, into the record reader's buffer.
                    Some(rd) => {
                        let (base, len) = rd.region();
                        vec![libc::iovec {
                            iov_base: base.cast(),
                            iov_len: len,
                        }]
                    }
                    None => vec![
                        libc::iovec {
                            iov_base: self.header_buf.as_mut_ptr().cast(),
                            iov_len: self.header_buf.len(),
                        },
                        libc::iovec {
                            iov_base: self.zlen_buf.as_mut_ptr().cast(),
                            iov_len: self.zlen_buf.len(),
                        },
                        libc::iovec {
                            iov_base: self.zbuf.as_mut_ptr().cast(),
                            iov_len: self.zbuf.len(),
                        },
                    ],
                };
                // SAFETY: the buffers are owned by this channel (the record reader's too), never
                // resized after construction, and outlive the ring (dropped with the channel,
                // the ring first: `ring` is declared before the buffers and `tls`; see also
                // `drain_after_error` for leaks on errors).
                match unsafe { ring.register_buffers(&bufs) } {
                    Ok(()) => {
                        self.fixed = bufs
                            .iter()
                            .map(|b| (b.iov_base as usize, b.iov_len))
                            .collect()
                    }
                    Err(e) => tracing::warn!(
                        channel = self.id,
                        error = %e,
                        "cannot register receive buffers with io_uring (RLIMIT_MEMLOCK?); using unregistered reads"
                    ),
                }
            }
            self.ring = Some(ring);
        }
        let mut round = 0u64;
        // Packets applied since this channel's last SYNC.
        let mut open = 0u64;
        loop {
            if gate.failed() {
                return Err(self.err(
                    Place::Between {
                        index: self.packets,
                    },
                    ChannelErrorKind::Aborted,
                ));
            }
            let index = self.packets;
            let hlen = wire::header_len(self.set.pages_per_packet);
            // What the previous packet's read brought past its end starts this header.
            let (a, b) = self.ahead;
            if a < b {
                self.header_buf.copy_within(a..b, 0);
            }
            let have = b.saturating_sub(a);
            let (got, filled) = if have >= hlen {
                (Got::Full, have)
            } else {
                let cap = self.header_buf.len();
                // SAFETY: `have < hlen <= cap`: the destination stays inside header_buf.
                let ptr = unsafe { self.header_buf.as_mut_ptr().add(have) };
                let (got, n) =
                    self.recv_some(ptr, hlen - have, cap - have, have, Place::Header { index })?;
                (got, have + n)
            };
            // What lies past this header is read ahead.
            self.ahead = (hlen.min(filled), filled);
            match got {
                Got::Eof => {
                    if open > 0 {
                        let kind = ChannelErrorKind::OpenRound { packets: open };
                        return Err(self.err(Place::Between { index }, kind));
                    }
                    gate.closed(self.id);
                    return Ok(());
                }
                Got::Full => {}
            }
            let rules = HeaderRules {
                page_size: self.set.page_size,
                pages_per_packet: self.set.pages_per_packet,
                compression: self.set.compression,
                blocks: &self.set.blocks,
            };
            let header = self.header_buf.get(..hlen).unwrap_or_default();
            if let Err(e) = self.header.decode_into(header, &rules) {
                let place = match packet_num_of(header) {
                    Some(packet_num) => Place::Packet { index, packet_num },
                    None => Place::Header { index },
                };
                return Err(self.err(place, e.into()));
            }
            let place = Place::Packet {
                index,
                packet_num: self.header.packet_num,
            };
            self.packets += 1;
            self.stats.wire_bytes += hlen as u64 + self.header.next_packet_size as u64;
            let opening = self.set.opening_sync && index == 0;
            if self.header.is_sync() {
                self.stats.sync_packets += 1;
                if opening {
                    // QEMU's setup SYNC: nothing came before it, so no round ends.
                    continue;
                }
                round += 1;
                open = 0;
                gate.synced(self.id, round)
                    .map_err(|k| self.err(place, k))?;
                continue;
            }
            if opening {
                return Err(self.err(place, ChannelErrorKind::NoOpeningSync));
            }
            let normal = self.header.normal_pages;
            let qpl = self.set.compression == Compression::Qpl;
            if qpl && normal > 0 {
                let n = 4 * normal as usize;
                // Read ahead with the header: taken from there first.
                let took = self.take_ahead(n);
                let zptr = self.zlen_buf.as_mut_ptr();
                if took < n {
                    // SAFETY: took < n <= 4 × pages_per_packet = zlen_buf.len() (normal was
                    // checked against pages_alloc == pages_per_packet).
                    let zptr = unsafe { zptr.add(took) };
                    let got = self
                        .recv_exact(zptr, n - took, "length array", place)
                        .map_err(|e| counting_ahead(e, took))?;
                    if let Got::Eof = got {
                        return Err(self.err(
                            place,
                            ChannelErrorKind::ClosedMid {
                                what: "length array",
                                got: took,
                                need: n,
                            },
                        ));
                    }
                }
                let zl = self.zlen_buf.get(..n).unwrap_or_default();
                wire::decode_zlens(
                    zl,
                    normal,
                    self.set.page_size,
                    self.header.next_packet_size,
                    &mut self.zlens,
                )
                .map_err(|e| self.err(place, e.into()))?;
            } else {
                self.zlens.clear();
            }
            if normal > 0 {
                let zl = if qpl { Some(&self.zlens[..]) } else { None };
                if !payload_iovecs(
                    &self.mem,
                    &self.header,
                    zl,
                    self.set.page_size,
                    &mut self.zbuf,
                    &mut self.iov,
                ) {
                    return Err(self.err(
                        place,
                        ChannelErrorKind::Io(std::io::Error::other("internal: payload plan")),
                    ));
                }
                let need: usize = self.iov.iter().map(|v| v.iov_len).sum();
                self.claim_fresh().map_err(|k| self.err(place, k))?;
                // The header and the length array are checked: bytes of the payload read
                // ahead may land now.
                let early = self.ahead_into_iov(need);
                let rest = if early < need {
                    self.recv_iov(need - early, "payload", place)
                        .map_err(|e| counting_ahead(e, early))?
                } else {
                    Got::Full
                };
                if let Got::Eof = rest {
                    return Err(self.err(
                        place,
                        ChannelErrorKind::ClosedMid {
                            what: "payload",
                            got: early,
                            need,
                        },
                    ));
                }
            }
            finish_packet(
                &self.mem,
                &self.header,
                self.set.compression,
                &self.zlens,
                self.set.page_size,
                &self.zbuf,
                &mut *self.decomp,
                &mut self.stats,
                self.set.fresh.as_deref(),
            )
            .map_err(|e| {
                self.err(
                    place,
                    ChannelErrorKind::Codec {
                        page: e.page,
                        offset: e.offset,
                        source: e.source,
                    },
                )
            })?;
            open += 1;
            progress.add(
                normal as u64 + self.header.zero_pages as u64,
                hlen as u64 + self.header.next_packet_size as u64,
            );
        }
    }

    fn err(&self, place: Place, kind: ChannelErrorKind) -> ChannelError {
        ChannelError {
            channel: self.id,
            place,
            kind,
        }
    }

    fn recv_exact(
        &mut self,
        ptr: *mut u8,
        len: usize,
        what: &'static str,
        place: Place,
    ) -> Result<Got, ChannelError> {
        self.iov.clear();
        self.iov.push(libc::iovec {
            iov_base: ptr.cast(),
            iov_len: len,
        });
        self.recv_iov(len, what, place)
    }

    /// Receive exactly `need` bytes into `self.iov`, continuing short receives.
    fn recv_iov(
        &mut self,
        need: usize,
        what: &'static str,
        place: Place,
    ) -> Result<Got, ChannelError> {
        if self.tls.is_some() {
            return self.recv_tls(need, what, place);
        }
        self.recv_iov_min(need, what, place).map(|(g, _)| g)
    }

    /// Receive at least `min` bytes into `self.iov` (clear text), and whatever more has
    /// arrived up to the iovecs' size: one receive when `min` bytes are there already.
    /// Returns the bytes received.
    fn recv_iov_min(
        &mut self,
        min: usize,
        what: &'static str,
        place: Place,
    ) -> Result<(Got, usize), ChannelError> {
        let fd = self.stream.as_raw_fd();
        let mut first = 0usize;
        let mut got = 0usize;
        let timeout = self.set.idle_timeout;
        let total: usize = self.iov.iter().map(|v| v.iov_len).sum();
        let need = min;
        // MSG_WAITALL only when all of it is needed: otherwise take what is there.
        let wait_all = if min >= total {
            libc::MSG_WAITALL as u32
        } else {
            0
        };
        while got < need {
            let rest = &mut self.iov[first..];
            // One destination inside a registered buffer: READ_FIXED; anything else (guest
            // pages among the destinations): RECVMSG.
            let fixed = match rest {
                [one] => self.fixed.iter().position(|&(base, len)| {
                    let p = one.iov_base as usize;
                    p >= base && p + one.iov_len <= base + len
                }),
                _ => None,
            };
            let sqe = match (fixed, rest.first()) {
                (Some(index), Some(one)) => {
                    self.stats.reads_fixed += 1;
                    opcode::ReadFixed::new(
                        types::Fd(fd),
                        one.iov_base.cast(),
                        one.iov_len as u32,
                        index as u16,
                    )
                    .offset(u64::MAX)
                    .build()
                    .user_data(1)
                }
                _ => {
                    self.msg.msg_iov = rest.as_mut_ptr();
                    self.msg.msg_iovlen = rest.len();
                    opcode::RecvMsg::new(types::Fd(fd), &mut *self.msg)
                        .flags(wait_all)
                        .build()
                        .user_data(1)
                }
            };
            let Some(ring) = self.ring.as_mut() else {
                return Err(self.err(place, ChannelErrorKind::Aborted));
            };
            let id = self.id;
            // SAFETY: the msghdr (boxed), the iovec array and every buffer it points at (our
            // header/zlen/zbuf buffers, guest pages inside the memory we hold an Arc of) stay
            // valid and untouched until the completion is reaped below; on timeout or error
            // `drain_after_error` waits for the completion before anything is freed.
            unsafe { ring.push(&sqe) }.map_err(|e| ChannelError {
                channel: id,
                place,
                kind: e.into(),
            })?;
            let res = match ring.wait(1, Some(timeout)) {
                Ok(c) => c.first().map(|c| c.result()),
                Err(e) => {
                    self.drain_after_error();
                    return Err(self.err(place, e.into()));
                }
            };
            let Some(res) = res else {
                self.drain_after_error();
                return Err(self.err(
                    place,
                    ChannelErrorKind::Idle {
                        secs: timeout.as_secs_f64(),
                    },
                ));
            };
            if res < 0 {
                let e = std::io::Error::from_raw_os_error(-res);
                return Err(self.err(place, ChannelErrorKind::Io(e)));
            }
            if res == 0 {
                if got == 0 && what == "header" {
                    return Ok((Got::Eof, 0));
                }
                return Err(self.err(place, ChannelErrorKind::ClosedMid { what, got, need }));
            }
            got += res as usize;
            advance_iovecs(&mut self.iov, &mut first, res as usize);
        }
        Ok((Got::Full, got))
    }

    /// Receive the rest of a header (`min` bytes, `have` already in place) into `ptr`,
    /// taking up to `max` bytes if they have arrived. Returns the bytes received.
    fn recv_some(
        &mut self,
        ptr: *mut u8,
        min: usize,
        max: usize,
        have: usize,
        place: Place,
    ) -> Result<(Got, usize), ChannelError> {
        self.iov.clear();
        // TLS, or no room to read ahead: exactly what is needed.
        let exact = self.tls.is_some() || max <= min;
        self.iov.push(libc::iovec {
            iov_base: ptr.cast(),
            iov_len: if exact { min } else { max },
        });
        let r = if exact {
            (self.recv_iov(min, "header", place)?, min)
        } else {
            self.recv_iov_min(min, "header", place)?
        };
        match r {
            (Got::Eof, _) if have > 0 => Err(self.err(
                place,
                ChannelErrorKind::ClosedMid {
                    what: "header",
                    got: have,
                    need: have + min,
                },
            )),
            r => Ok(r),
        }
    }

    /// On fresh memory: claim this packet's still-fresh pages (counted against `max_memory`,
    /// refused over it before any data lands) and fault them in with one call per run of
    /// adjacent pages (MADV_POPULATE_WRITE); the kernel's copy into them (and the inflates)
    /// would otherwise take one page fault per page. Faulting in is best effort: a kernel
    /// without it, or a page size under the system's, just takes the faults.
    fn claim_fresh(&mut self) -> Result<(), ChannelErrorKind> {
        let Some(fresh) = self.set.fresh.as_deref() else {
            return Ok(());
        };
        let Some(block) = self.mem.block(self.header.block) else {
            return Ok(());
        };
        let ps = u64::from(self.set.page_size);
        let mut run: Option<(u64, u64)> = None;
        let mut off = self.populate_off;
        let mut flush = |r: (u64, u64)| {
            if off {
                return;
            }
            if let Err(e) = block.populate_range(r.0, (r.1 - r.0) as usize) {
                tracing::debug!(error = %e, "populating fresh pages ahead of a receive: off");
                off = true;
            }
        };
        let mut result = Ok(());
        for &o in self.header.normal_offsets() {
            match fresh.claim(self.header.block, o) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    result = Err(ChannelErrorKind::MemoryLimit {
                        committed: e.committed,
                        limit: e.limit,
                    });
                    break;
                }
            }
            run = match run {
                Some((a, b)) if b == o => Some((a, o + ps)),
                Some(r) => {
                    flush(r);
                    Some((o, o + ps))
                }
                None => Some((o, o + ps)),
            };
        }
        if result.is_ok() {
            if let Some(r) = run {
                flush(r);
            }
        }
        self.populate_off = off;
        result
    }

    /// Move up to `n` read-ahead bytes into the length-array buffer; returns how many.
    fn take_ahead(&mut self, n: usize) -> usize {
        let (a, b) = self.ahead;
        let k = n.min(b.saturating_sub(a)).min(self.zlen_buf.len());
        if let (Some(dst), Some(src)) = (self.zlen_buf.get_mut(..k), self.header_buf.get(a..a + k))
        {
            dst.copy_from_slice(src);
            self.ahead = (a + k, b);
            return k;
        }
        0
    }

    /// Copy read-ahead bytes into the start of `self.iov`'s destinations (at most `need`)
    /// and drop what they fill from `self.iov`; returns how many.
    fn ahead_into_iov(&mut self, need: usize) -> usize {
        let (a, b) = self.ahead;
        let k = need.min(b.saturating_sub(a));
        if k == 0 {
            return 0;
        }
        let mut src = a;
        let mut left = k;
        for v in self.iov.iter() {
            if left == 0 {
                break;
            }
            let n = left.min(v.iov_len);
            let Some(bytes) = self.header_buf.get(src..src + n) else {
                break;
            };
            // SAFETY: every iovec of the payload plan points at `iov_len` writable bytes inside
            // guest memory (a page the header named and `payload_iovecs` bounds-checked) or
            // the zbuf; `header_buf` is a separate allocation, so the ranges do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), v.iov_base.cast(), n) };
            src += n;
            left -= n;
        }
        let done = k - left;
        let mut first = 0usize;
        advance_iovecs(&mut self.iov, &mut first, done);
        self.iov.drain(..first.min(self.iov.len()));
        self.ahead = (a + done, b);
        done
    }

    /// [`RecvChannel::recv_iov`] under TLS: receive ciphertext into the reader's buffer, open
    /// whole records there, and copy their authenticated plaintext to `self.iov`'s
    /// destinations (guest pages, the zbuf, the header and length-array buffers): one write
    /// per byte, and nothing of a record whose tag does not verify.
    fn recv_tls(
        &mut self,
        need: usize,
        what: &'static str,
        place: Place,
    ) -> Result<Got, ChannelError> {
        let id = self.id;
        let mk = |kind: ChannelErrorKind| ChannelError {
            channel: id,
            place,
            kind,
        };
        let fd = self.stream.as_raw_fd();
        let timeout = self.set.idle_timeout;
        let mut first = 0usize;
        let mut got = 0usize;
        loop {
            let Some(rd) = self.tls.as_mut() else {
                return Err(mk(ChannelErrorKind::Aborted));
            };
            while got < need {
                if rd.plaintext().is_empty() {
                    if rd.open_next().map_err(|e| mk(e.into()))? {
                        continue;
                    }
                    break;
                }
                let Some(dst) = self.iov.get(first) else {
                    break;
                };
                let p = rd.plaintext();
                let n = p.len().min(dst.iov_len).min(need - got);
                // SAFETY: every iovec of a receive plan points at `iov_len` writable bytes
                // that nothing else accesses now (this channel's buffers, or guest pages of
                // the memory this channel holds an Arc of, inside their block: the plan was
                // built from a validated header). `p` is the reader's own buffer, disjoint.
                unsafe { std::ptr::copy_nonoverlapping(p.as_ptr(), dst.iov_base.cast::<u8>(), n) };
                rd.consume(n);
                got += n;
                advance_iovecs(&mut self.iov, &mut first, n);
            }
            self.stats.tls_key_updates = rd.key_updates();
            if got >= need {
                return Ok(Got::Full);
            }
            let space = rd.space();
            let (ptr, len) = (space.as_mut_ptr(), space.len());
            if len == 0 {
                return Err(mk(ChannelErrorKind::Io(std::io::Error::other(
                    "internal: TLS receive buffer full",
                ))));
            }
            let len = len.min(u32::MAX as usize);
            let fixed = self.fixed.iter().position(|&(base, blen)| {
                let p = ptr as usize;
                p >= base && p + len <= base + blen
            });
            let sqe = match fixed {
                Some(index) => {
                    self.stats.reads_fixed += 1;
                    opcode::ReadFixed::new(types::Fd(fd), ptr, len as u32, index as u16)
                        .offset(u64::MAX)
                        .build()
                        .user_data(1)
                }
                None => opcode::Recv::new(types::Fd(fd), ptr, len as u32)
                    .build()
                    .user_data(1),
            };
            let Some(ring) = self.ring.as_mut() else {
                return Err(mk(ChannelErrorKind::Aborted));
            };
            // SAFETY: `ptr..ptr+len` is the free tail of the reader's buffer, owned by this
            // channel and not touched until the completion is reaped below (on timeout or
            // error `drain_after_error` reaps it or leaks the reader).
            unsafe { ring.push(&sqe) }.map_err(|e| mk(e.into()))?;
            let res = match ring.wait(1, Some(timeout)) {
                Ok(c) => c.first().map(|c| c.result()),
                Err(e) => {
                    self.drain_after_error();
                    return Err(mk(e.into()));
                }
            };
            let Some(res) = res else {
                self.drain_after_error();
                return Err(mk(ChannelErrorKind::Idle {
                    secs: timeout.as_secs_f64(),
                }));
            };
            if res < 0 {
                return Err(mk(ChannelErrorKind::Io(std::io::Error::from_raw_os_error(
                    -res,
                ))));
            }
            let Some(rd) = self.tls.as_mut() else {
                return Err(mk(ChannelErrorKind::Aborted));
            };
            if res == 0 {
                return match rd.need() {
                    Need::Boundary if got == 0 && what == "header" => Ok(Got::Eof),
                    Need::Boundary => Err(mk(ChannelErrorKind::ClosedMid { what, got, need })),
                    Need::MidRecord { have, want } => {
                        Err(mk(TlsError::Truncated { have, want }.into()))
                    }
                };
            }
            rd.filled(res as usize);
        }
    }

    /// After a timed-out or failed wait the receive may still be in flight: shut the socket
    /// so it completes now, and reap it before the buffers can be reused or freed.
    fn drain_after_error(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        for _ in 0..50 {
            match ring.wait(1, Some(Duration::from_millis(100))) {
                Ok(c) if !c.is_empty() => return,
                Ok(_) => continue,
                Err(_) => break,
            }
        }
        // Still not completed: never free what the kernel may write to.
        tracing::error!(
            channel = self.id,
            "receive did not complete after shutdown; leaking its buffers"
        );
        std::mem::forget(std::mem::take(&mut self.zbuf));
        std::mem::forget(std::mem::take(&mut self.header_buf));
        std::mem::forget(std::mem::take(&mut self.zlen_buf));
        std::mem::forget(self.tls.take());
    }
}

/// A peer closing mid-way through something partly taken from read-ahead bytes: count those
/// in what was received and needed.
fn counting_ahead(mut e: ChannelError, ahead: usize) -> ChannelError {
    if let ChannelErrorKind::ClosedMid { got, need, .. } = &mut e.kind {
        *got += ahead;
        *need += ahead;
    }
    e
}

/// packet_num of a header whose fixed part is present (for error messages).
fn packet_num_of(buf: &[u8]) -> Option<u64> {
    let b: [u8; 8] = buf.get(24..32)?.try_into().ok()?;
    Some(u64::from_be_bytes(b))
}

/// A receiving channel's socket and record reader for a connection after its set-up (the
/// reader keeps whatever the set-up read past the init packet).
// Without the `tls` feature a TLS connection cannot exist: its arm is unreachable.
#[cfg_attr(not(feature = "tls"), allow(unreachable_code))]
pub fn for_receiving(conn: Conn) -> (TcpStream, Option<RecordReader>) {
    match conn {
        Conn::Clear(s) => (s, None),
        Conn::Tls(t) => {
            // The send direction is unused: a receiver sends nothing on a channel.
            let (tcp, _tx, rx) = t.into_parts();
            (tcp, Some(rx))
        }
    }
}
