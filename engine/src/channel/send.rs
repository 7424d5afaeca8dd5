//! The sending side of one channel: one thread, one io_uring, one TCP connection.
//!
//! Packets are prepared in slots (header, length array, zbuf, iovecs, msghdr), at most
//! `depth` of them. Exactly one SENDMSG is in flight on the socket at a time, so the byte
//! stream keeps packet order even when the kernel completes a send in pieces; the other
//! slots are compressed and queued while it is in flight, so compression overlaps sending.
//! The loop reaps completions between packets and only blocks when it has nothing else to
//! do. A slot (its zbuf and the guest pages its iovecs point at) is reused only after its
//! send's last completion.

use std::collections::VecDeque;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use io_uring::{opcode, types};
use pagewire_transport::ring::{advance_iovecs, Ring};
use pagewire_transport::wire::{self, Compression, HeaderFields};
use slab::Slab;
use tracing::trace;

use crate::codec::{is_zero_page, PageCompressor};
use crate::error::{ChannelError, ChannelErrorKind, Place};
use crate::memory::GuestMemory;
use crate::pages::RoundPages;
use crate::stats::{ChannelStats, Progress};

/// One packet being prepared or sent. Boxed so the msghdr and iovec pointers stay valid while
/// the kernel holds them.
struct Slot {
    header: Vec<u8>,
    zlen_bytes: Vec<u8>,
    zlens: Vec<u32>,
    zbuf: Vec<u8>,
    batch: Vec<u64>,
    offsets: Vec<u64>,
    zero: Vec<u64>,
    iov: Vec<libc::iovec>,
    first: usize,
    remaining: usize,
    msg: libc::msghdr,
    /// Counters applied to the channel's stats when the send completes.
    pending: ChannelStats,
}

impl Slot {
    fn new(page_size: usize, ppp: usize) -> Box<Slot> {
        Box::new(Slot {
            header: vec![0; wire::header_len(ppp as u32)],
            zlen_bytes: vec![0; 4 * ppp],
            zlens: Vec::with_capacity(ppp),
            zbuf: vec![0; ppp * page_size],
            batch: Vec::with_capacity(ppp),
            offsets: Vec::with_capacity(ppp),
            zero: Vec::with_capacity(ppp),
            iov: Vec::with_capacity(ppp + 2),
            first: 0,
            remaining: 0,
            // SAFETY: msghdr is a plain C struct for which all-zero is a valid value.
            msg: unsafe { std::mem::zeroed() },
            pending: ChannelStats::default(),
        })
    }
}

/// Settings of a sending channel.
#[derive(Clone, Debug)]
pub struct SendSettings {
    pub page_size: u32,
    pub pages_per_packet: u32,
    pub compression: Compression,
    pub depth: usize,
    pub idle_timeout: Duration,
}

/// The sending end of one channel.
pub struct SendChannel {
    id: u16,
    stream: TcpStream,
    /// Created on the channel's own thread (SINGLE_ISSUER ties a ring to its creator).
    ring: Option<Ring>,
    set: SendSettings,
    compressor: Option<Box<dyn PageCompressor>>,
    slots: Slab<Box<Slot>>,
    free: Vec<usize>,
    ready: VecDeque<usize>,
    in_flight: Option<usize>,
    packet_num: Arc<AtomicU64>,
    packets: u64,
    stats: ChannelStats,
}

// SAFETY: the raw pointers inside a SendChannel (msghdr and iovecs in its slots) point into
// buffers the channel owns or into guest memory (a `Sync` mapping that outlives the session).
// A SendChannel is moved to its engine thread once and used only there.
unsafe impl Send for SendChannel {}

impl std::fmt::Debug for SendChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendChannel")
            .field("id", &self.id)
            .field("stats", &self.stats)
            .finish()
    }
}

impl SendChannel {
    /// A channel over `stream` (whose init packet has been sent). `compressor` must be given
    /// for the qpl framing and is ignored for `none`.
    pub fn new(
        id: u16,
        stream: TcpStream,
        set: SendSettings,
        compressor: Option<Box<dyn PageCompressor>>,
        packet_num: Arc<AtomicU64>,
    ) -> Result<SendChannel, ChannelError> {
        let depth = set.depth.max(1);
        let mut slots = Slab::with_capacity(depth);
        let free = (0..depth)
            .map(|_| {
                slots.insert(Slot::new(
                    set.page_size as usize,
                    set.pages_per_packet as usize,
                ))
            })
            .collect();
        let stats = ChannelStats {
            channel: id,
            wire_bytes: wire::INIT_PACKET_LEN as u64,
            ..Default::default()
        };
        Ok(SendChannel {
            id,
            stream,
            ring: None,
            set,
            compressor,
            slots,
            free,
            ready: VecDeque::new(),
            in_flight: None,
            packet_num,
            packets: 0,
            stats,
        })
    }

    /// Counters so far.
    pub fn stats(&self) -> &ChannelStats {
        &self.stats
    }

    fn err(&self, kind: ChannelErrorKind) -> ChannelError {
        ChannelError {
            channel: self.id,
            place: Place::Between {
                index: self.packets,
            },
            kind,
        }
    }

    /// Send every batch this channel can take from `round`, then a SYNC packet. Returns when
    /// the SYNC's send has completed.
    pub fn run_round(
        &mut self,
        mem: &GuestMemory,
        round: &RoundPages,
        progress: &Progress,
        abort: &AtomicBool,
    ) -> Result<(), ChannelError> {
        if self.ring.is_none() {
            self.ring = Some(Ring::new(32).map_err(|e| self.err(e.into()))?);
        }
        let mut exhausted = false;
        let mut sync_queued = false;
        loop {
            if abort.load(Ordering::Relaxed) {
                return Err(self.err(ChannelErrorKind::Aborted));
            }
            // Reap whatever completed, without blocking.
            self.reap(false, progress)?;
            if self.in_flight.is_none() {
                if let Some(key) = self.ready.pop_front() {
                    self.submit(key)?;
                }
            }
            if let Some(key) = self.free.pop() {
                if !exhausted {
                    match self.prepare(key, mem, round) {
                        Ok(true) => {
                            self.ready.push_back(key);
                            continue;
                        }
                        Ok(false) => exhausted = true,
                        Err(e) => {
                            self.free.push(key);
                            return Err(e);
                        }
                    }
                }
                if exhausted && !sync_queued {
                    self.prepare_sync(key);
                    self.ready.push_back(key);
                    sync_queued = true;
                    continue;
                }
                self.free.push(key);
            }
            if self.in_flight.is_none() && self.ready.is_empty() {
                if sync_queued {
                    return Ok(());
                }
                continue;
            }
            if self.in_flight.is_some() {
                self.reap(true, progress)?;
            }
        }
    }

    /// Fill slot `key` with the next batch of `round`. `Ok(false)`: the round has no more.
    fn prepare(
        &mut self,
        key: usize,
        mem: &GuestMemory,
        round: &RoundPages,
    ) -> Result<bool, ChannelError> {
        let ps = self.set.page_size as usize;
        let ppp = self.set.pages_per_packet;
        let qpl = self.set.compression == Compression::Qpl;
        let Some(slot) = self.slots.get_mut(key) else {
            return Err(self.err(ChannelErrorKind::Aborted));
        };
        let slot: &mut Slot = slot;
        let Some(block_idx) = round.next_batch(&mut slot.batch) else {
            return Ok(false);
        };
        let Some(block) = mem.block(block_idx) else {
            return Err(ChannelError {
                channel: self.id,
                place: Place::Between {
                    index: self.packets,
                },
                kind: ChannelErrorKind::Io(std::io::Error::other(
                    "round names a block the memory lacks",
                )),
            });
        };
        slot.offsets.clear();
        slot.zero.clear();
        slot.zlens.clear();
        slot.iov.clear();
        // Placeholders for the header and the length array; lengths set below.
        slot.iov.push(libc::iovec {
            iov_base: slot.header.as_mut_ptr().cast(),
            iov_len: slot.header.len(),
        });
        slot.iov.push(libc::iovec {
            iov_base: slot.zlen_bytes.as_mut_ptr().cast(),
            iov_len: 0,
        });
        let mut zpos = 0usize;
        let mut compressed = 0u64;
        for &off in &slot.batch {
            let Some(ptr) = block.range_ptr(off, ps) else {
                continue;
            };
            // SAFETY: ptr..ptr+ps is inside the block, mapped readable for `mem`'s lifetime.
            // The guest may change the page while we read it; a torn page is resent by the
            // next round (DESIGN.md §2), so this read-only view is the documented window.
            let page = unsafe { std::slice::from_raw_parts(ptr, ps) };
            if is_zero_page(page) {
                slot.zero.push(off);
                continue;
            }
            slot.offsets.push(off);
            let (src, len) = match (qpl, self.compressor.as_mut()) {
                (true, Some(c)) => {
                    let out = &mut slot.zbuf[zpos..zpos + ps - 1];
                    match c.compress(page, out) {
                        Some(n) if n > 0 && n < ps => {
                            let p = out.as_mut_ptr();
                            zpos += n;
                            compressed += 1;
                            slot.zlens.push(n as u32);
                            (p, n)
                        }
                        _ => {
                            slot.zlens.push(ps as u32);
                            (ptr, ps)
                        }
                    }
                }
                (true, None) => {
                    slot.zlens.push(ps as u32);
                    (ptr, ps)
                }
                (false, _) => (ptr, ps),
            };
            let n_iov = slot.iov.len();
            match slot.iov.last_mut() {
                Some(last)
                    if n_iov > 2
                        && (last.iov_base as *mut u8).wrapping_add(last.iov_len) == src =>
                {
                    last.iov_len += len
                }
                _ => slot.iov.push(libc::iovec {
                    iov_base: src.cast(),
                    iov_len: len,
                }),
            }
        }
        let normal = slot.offsets.len() as u32;
        let zero = slot.zero.len() as u32;
        slot.offsets.extend_from_slice(&slot.zero);
        let payload: u64 = slot.iov[2..].iter().map(|v| v.iov_len as u64).sum();
        let next_packet_size = if qpl {
            4 * normal as u64 + payload
        } else {
            payload
        };
        if qpl {
            let n = 4 * normal as usize;
            wire::encode_zlens(&mut slot.zlen_bytes[..n], &slot.zlens);
            slot.iov[1].iov_len = n;
        }
        let fields = HeaderFields {
            flags: self.set.compression.flag(),
            pages_alloc: ppp,
            normal_pages: normal,
            next_packet_size: next_packet_size as u32,
            packet_num: self.packet_num.fetch_add(1, Ordering::Relaxed),
            zero_pages: zero,
        };
        wire::encode_header(&mut slot.header, &fields, block.name(), &slot.offsets);
        slot.pending = ChannelStats {
            channel: self.id,
            packets: 1,
            pages_normal: normal as u64,
            pages_zero: zero as u64,
            pages_raw: normal as u64 - compressed,
            pages_compressed: compressed,
            memory_bytes: (normal as u64 + zero as u64) * ps as u64,
            wire_bytes: slot.header.len() as u64 + next_packet_size,
            ..Default::default()
        };
        Ok(true)
    }

    /// Fill slot `key` with a SYNC packet (flags SYNC alone, as QEMU sends it).
    fn prepare_sync(&mut self, key: usize) {
        let ppp = self.set.pages_per_packet;
        let packet_num = self.packet_num.fetch_add(1, Ordering::Relaxed);
        let id = self.id;
        let Some(slot) = self.slots.get_mut(key) else {
            return;
        };
        let fields = HeaderFields {
            flags: wire::FLAG_SYNC,
            pages_alloc: ppp,
            packet_num,
            ..Default::default()
        };
        wire::encode_header(&mut slot.header, &fields, "", &[]);
        slot.iov.clear();
        slot.iov.push(libc::iovec {
            iov_base: slot.header.as_mut_ptr().cast(),
            iov_len: slot.header.len(),
        });
        slot.pending = ChannelStats {
            channel: id,
            sync_packets: 1,
            wire_bytes: slot.header.len() as u64,
            ..Default::default()
        };
    }

    fn submit(&mut self, key: usize) -> Result<(), ChannelError> {
        let fd = self.stream.as_raw_fd();
        let Some(slot) = self.slots.get_mut(key) else {
            return Err(self.err(ChannelErrorKind::Aborted));
        };
        slot.first = 0;
        slot.remaining = slot.iov.iter().map(|v| v.iov_len).sum();
        self.in_flight = Some(key);
        self.push_send(key, fd)
    }

    fn push_send(&mut self, key: usize, fd: i32) -> Result<(), ChannelError> {
        let Some(slot) = self.slots.get_mut(key) else {
            return Err(self.err(ChannelErrorKind::Aborted));
        };
        let rest = &mut slot.iov[slot.first..];
        slot.msg.msg_iov = rest.as_mut_ptr();
        slot.msg.msg_iovlen = rest.len();
        let sqe = opcode::SendMsg::new(types::Fd(fd), &slot.msg)
            .flags((libc::MSG_NOSIGNAL | libc::MSG_WAITALL) as u32)
            .build()
            .user_data(key as u64);
        trace!(channel = self.id, key, bytes = slot.remaining, "sendmsg");
        let Some(ring) = self.ring.as_mut() else {
            return Err(self.err(ChannelErrorKind::Aborted));
        };
        // SAFETY: the msghdr, its iovec array, the header/zlen/zbuf buffers and the guest pages
        // all live in (or are pointed at by) the boxed slot, which is neither freed nor
        // reused until this send's completion is reaped (`in_flight` holds its key), and the
        // guest memory outlives the round.
        unsafe { ring.push(&sqe) }.map_err(|e| self.err(e.into()))
    }

    /// Take completions (blocking for one if `block`), continue short sends, free slots.
    fn reap(&mut self, block: bool, progress: &Progress) -> Result<(), ChannelError> {
        let timeout = self.set.idle_timeout;
        let want = usize::from(block);
        let Some(ring) = self.ring.as_mut() else {
            return Err(self.err(ChannelErrorKind::Aborted));
        };
        let cqes: Vec<(u64, i32)> = ring
            .wait(want, Some(timeout))
            .map_err(|e| ChannelError {
                channel: self.id,
                place: Place::Between {
                    index: self.packets,
                },
                kind: e.into(),
            })?
            .iter()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        if block && cqes.is_empty() {
            return Err(self.err(ChannelErrorKind::Idle {
                secs: timeout.as_secs_f64(),
            }));
        }
        for (ud, res) in cqes {
            let key = ud as usize;
            if res < 0 {
                let e = std::io::Error::from_raw_os_error(-res);
                let kind = match -res {
                    libc::EPIPE | libc::ECONNRESET => ChannelErrorKind::Closed,
                    _ => ChannelErrorKind::Io(e),
                };
                self.in_flight = None;
                return Err(self.err(kind));
            }
            let fd = self.stream.as_raw_fd();
            let Some(slot) = self.slots.get_mut(key) else {
                continue;
            };
            let slot: &mut Slot = slot;
            let left = advance_iovecs(&mut slot.iov, &mut slot.first, res as usize);
            slot.remaining = left;
            if left > 0 {
                trace!(channel = self.id, key, left, "short send, continuing");
                self.push_send(key, fd)?;
                continue;
            }
            let p = std::mem::take(&mut slot.pending);
            self.stats.add(&p);
            self.packets += p.packets + p.sync_packets;
            progress.add(p.pages_normal + p.pages_zero, p.wire_bytes);
            self.in_flight = None;
            self.free.push(key);
            if let Some(next) = self.ready.pop_front() {
                self.submit(next)?;
            }
        }
        Ok(())
    }

    /// Stop using the connection: shut it down so a peer blocked on it sees EOF.
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// Record this thread's CPU time in the stats (call from the channel's thread).
    pub fn set_cpu_seconds(&mut self, secs: f64) {
        self.stats.cpu_seconds = secs;
    }
}

impl Drop for SendChannel {
    fn drop(&mut self) {
        // A send may still be in flight after an error: shut the socket so it completes at
        // once, then wait (bounded) for its completion before the slots are freed.
        if let (Some(_), Some(ring)) = (self.in_flight, self.ring.as_mut()) {
            let _ = self.stream.shutdown(std::net::Shutdown::Both);
            for _ in 0..50 {
                match ring.wait(1, Some(Duration::from_millis(100))) {
                    Ok(c) if !c.is_empty() => {
                        self.in_flight = None;
                        break;
                    }
                    Ok(_) => continue,
                    Err(_) => break,
                }
            }
            if self.in_flight.is_some() {
                // The kernel still holds pointers into the slots: leak them rather than free
                // memory it may write to or read from.
                std::mem::forget(std::mem::take(&mut self.slots));
            }
        }
    }
}
