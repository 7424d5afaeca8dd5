//! The sending side of one channel: one thread, one io_uring, one TCP connection, one page
//! compression engine ([`Accelerator`]).
//!
//! Packets are prepared in slots (header, length array, zbuf, iovecs, msghdr), at most
//! `depth` of them. A slot goes *compressing* (its pages' jobs submitted to the engine) →
//! *ready* (every job completed; iovecs and header built) → *sending* → free. Exactly one
//! SENDMSG is in flight on the socket at a time, so the byte stream keeps packet order even
//! when the kernel completes a send in pieces; the other slots compress meanwhile, so
//! compression overlaps sending. The stream follows QEMU's cadence: the init packet (written
//! by the session), an opening SYNC queued at construction, then each round's packets closed
//! by a SYNC (docs/wire-format.md, "Cadence"). The loop polls the engine's completions and the ring's
//! completions in the same turn and blocks only when neither can make progress. A slot (its
//! zbuf and the guest pages its iovecs point at) is reused only after its send's last
//! completion.

use std::collections::VecDeque;
use std::net::TcpStream;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, types};
use pagewire_transport::net::TcpChrono;
use pagewire_transport::ring::{advance_iovecs, Ring};
use pagewire_transport::wire::{self, Compression, HeaderFields};
use slab::Slab;
use tracing::trace;

use super::limit::RateLimit;
use super::pace::{Choice, Observation, Pacer, CHRONO_WINDOW, CLOSED_WINDOW};
use crate::accel::{Accelerator, Completion, JobDesc, Outcome, Path, Submit};
use crate::channel::stage::{Clear, SendStage};
use crate::codec::entropy::likely_incompressible;
use crate::codec::is_zero_page;
use crate::datamap::{covered, overlaps, DataProbe};
use crate::error::{ChannelError, ChannelErrorKind, Place};
use crate::memory::GuestRam;
use crate::pages::RoundPages;
use crate::stats::{ChannelStats, Progress};

/// A busy engine is asked this many more times before a page goes to the software fallback
/// (QEMU's multifd-qpl does the same).
pub const BUSY_RETRIES: u32 = 3;

/// IORING_SEND_ZC_REPORT_USAGE (ioprio of a SENDMSG_ZC): the notification reports whether the
/// kernel had to copy the data after all.
const SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
/// IORING_NOTIF_USAGE_ZC_COPIED, in a notification's result.
const NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;

/// Bits of a job tag that hold the page index; the slot key sits above them.
const TAG_SHIFT: u32 = 16;
/// How long codec auto's loop sleeps when it waits for the link ([`Choice::Wait`]) with no
/// send in flight to wait on.
const WAIT_STEP: Duration = Duration::from_micros(100);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Free,
    Compressing,
    Ready,
    Sending,
    /// Every byte was handed to the kernel by SENDMSG_ZC, but the kernel may still read the
    /// slot's buffers (and guest pages) until its notifications arrive.
    Notifying,
}

/// Zero-copy bookkeeping of one slot: a slot may be reused only once its send has completed
/// *and* every SENDMSG_ZC notification it is owed has arrived.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ZcTrack {
    /// Notifications announced (result CQE with F_MORE) and not yet received.
    pub notifs_owed: u32,
    /// The whole packet has been handed to the kernel.
    pub sent: bool,
}

impl ZcTrack {
    /// A result CQE: `more` is its IORING_CQE_F_MORE flag (a notification will follow);
    /// `done` whether no continuation of this send will be submitted (all sent, or failed).
    pub fn on_result(&mut self, more: bool, done: bool) {
        if more {
            self.notifs_owed += 1;
        }
        self.sent |= done;
    }
    /// A notification CQE.
    pub fn on_notif(&mut self) {
        self.notifs_owed = self.notifs_owed.saturating_sub(1);
    }
    /// Whether the slot's buffers are no longer referenced by the kernel.
    pub fn reusable(&self) -> bool {
        self.sent && self.notifs_owed == 0
    }
}

/// One packet being prepared or sent. Boxed so the msghdr and iovec pointers stay valid while
/// the kernel holds them.
struct Slot {
    state: State,
    block: usize,
    header: Vec<u8>,
    zlen_bytes: Vec<u8>,
    /// Per normal page: 0 while its job runs, `page_size` for raw, else the compressed length.
    zlens: Vec<u32>,
    /// Page i's compressed bytes go to `zbuf[i * page_size ..][.. page_size - 1]`.
    zbuf: Vec<u8>,
    /// Page i is copied to `copies[i * page_size ..]` before it is compressed (never compress
    /// guest memory in place: see `feed`).
    copies: Vec<u8>,
    batch: Vec<u64>,
    /// Normal offsets, then zero offsets (header order).
    offsets: Vec<u64>,
    zero: Vec<u64>,
    /// Guest address of each normal page.
    pages: Vec<*const u8>,
    /// Jobs submitted and not completed.
    jobs_left: usize,
    /// Pages submitted so far (the slot is fed while the engine has room).
    next: usize,
    iov: Vec<libc::iovec>,
    first: usize,
    remaining: usize,
    zc: ZcTrack,
    /// The packet as the stage prepared it for the wire (TLS records), when it is not sent
    /// from the pieces themselves.
    sealed: Vec<u8>,
    /// The stage has prepared this Ready packet (done ahead while an earlier send is in
    /// flight, else at submission; always in queue order).
    staged: bool,
    msg: libc::msghdr,
    /// Counters applied to the channel's stats when the send completes.
    pending: ChannelStats,
    /// The block drops sent pages: release this slot's normal pages once the kernel is done
    /// with them (when the slot is reused, or at the round's end).
    release: bool,
}

impl Slot {
    fn new(page_size: usize, ppp: usize) -> Box<Slot> {
        Box::new(Slot {
            state: State::Free,
            block: 0,
            header: vec![0; wire::header_len(ppp as u32)],
            zlen_bytes: vec![0; 4 * ppp],
            zlens: Vec::with_capacity(ppp),
            zbuf: vec![0; ppp * page_size],
            copies: vec![0; ppp * page_size],
            batch: Vec::with_capacity(ppp),
            offsets: Vec::with_capacity(ppp),
            zero: Vec::with_capacity(ppp),
            pages: Vec::with_capacity(ppp),
            jobs_left: 0,
            next: 0,
            iov: Vec::with_capacity(ppp + 2),
            first: 0,
            remaining: 0,
            zc: ZcTrack::default(),
            sealed: Vec::new(),
            staged: false,
            // SAFETY: msghdr is a plain C struct for which all-zero is a valid value.
            msg: unsafe { std::mem::zeroed() },
            pending: ChannelStats::default(),
            release: false,
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
    /// Use SENDMSG_ZC for packets of at least this many bytes (`None`: never).
    pub zero_copy_min: Option<usize>,
    /// Send pages a cheap sample deems incompressible raw, without a compression attempt.
    pub skip_incompressible: bool,
    /// Codec auto: decide page by page whether to compress or send raw ([`Pacer`]).
    pub adaptive: bool,
    /// The session's bandwidth cap, shared by its channels.
    pub limit: Option<Arc<RateLimit>>,
    /// This channel's share of the cap, bytes/s (codec auto takes it as the link's ceiling).
    pub link_share: Option<f64>,
    /// Ask the kernel which pages of a batch hold data before reading them; the others go
    /// as zero pages unread (`datamap`).
    pub find_holes: bool,
}

/// The sending end of one channel.
pub struct SendChannel {
    id: u16,
    stream: TcpStream,
    /// Created on the channel's own thread (SINGLE_ISSUER ties a ring to its creator).
    ring: Option<Ring>,
    set: SendSettings,
    accel: Option<Box<dyn Accelerator>>,
    /// Codec auto's stronger compressor, if it has a ladder ([`SendChannel::with_strong`]):
    /// run synchronously on this thread.
    strong: Option<Box<dyn Accelerator>>,
    slots: Slab<Box<Slot>>,
    free: Vec<usize>,
    ready: VecDeque<usize>,
    compressing: usize,
    /// The slot whose pages are being handed to the engine.
    feeding: Option<usize>,
    /// Codec auto asked to decide the feeding slot's next page later ([`Choice::Wait`]).
    waiting: bool,
    in_flight: Option<usize>,
    packet_num: Arc<AtomicU64>,
    packets: u64,
    done: Vec<Completion>,
    /// Names of the memory's blocks, by index (for headers).
    block_names: Vec<String>,
    /// SENDMSG_ZC in use (cleared when the ring or the socket refuses it).
    zc_on: bool,
    /// Asks the kernel which pages of a batch hold data.
    probe: DataProbe,
    /// The current batch's data ranges (block byte offsets).
    data: Vec<Range<u64>>,
    /// Between a ready slot and the ring: clear text or TLS sealing.
    stage: Box<dyn SendStage>,
    stats: ChannelStats,
    /// Codec auto's decisions (with `SendSettings::adaptive`).
    pacer: Option<Pacer>,
    /// Origin of the pacer's clock.
    epoch: Instant,
    /// The connection's TCP_INFO (chrono counters, the receiver's window) as last read, and
    /// when (pacer clock): read again once older than [`CHRONO_WINDOW`] (the receiver-window
    /// share samples no more often; the window itself only names why a page went raw before
    /// the rate is measured), so TCP_INFO (a getsockopt that takes the socket's lock) is read
    /// at most that often, not before every decision (one comes every 20-30 µs).
    chrono: Option<(f64, TcpChrono)>,
    /// Bytes the kernel has accepted from this channel's sends.
    handed: u64,
    /// The bandwidth cap is in debt until this instant: the next packet waits.
    limited_until: Option<Instant>,
}

// SAFETY: the raw pointers inside a SendChannel (msghdr, iovecs and page addresses in its
// slots) point into buffers the channel owns or into guest memory (a `Sync` mapping that
// outlives the session). A SendChannel is moved to its engine thread once and used only there.
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
    /// A channel over `stream` (whose init packet has been sent). `accel` compresses pages
    /// for the qpl framing (without one, every page is sent raw); it is unused for `none`.
    pub fn new(
        id: u16,
        stream: TcpStream,
        set: SendSettings,
        accel: Option<Box<dyn Accelerator>>,
        packet_num: Arc<AtomicU64>,
    ) -> Result<SendChannel, ChannelError> {
        let depth = set.depth.max(1);
        if set.pages_per_packet as u64 >= 1 << TAG_SHIFT {
            return Err(ChannelError {
                channel: id,
                place: Place::Init,
                kind: ChannelErrorKind::Io(std::io::Error::other("pages per packet too large")),
            });
        }
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
        let pacer = set.adaptive.then(|| {
            let p = Pacer::new(set.page_size);
            match set.link_share {
                Some(r) => p.with_ceiling(r),
                None => p,
            }
        });
        let mut chan = SendChannel {
            id,
            stream,
            ring: None,
            set,
            accel,
            strong: None,
            slots,
            free,
            ready: VecDeque::new(),
            compressing: 0,
            feeding: None,
            waiting: false,
            in_flight: None,
            packet_num,
            packets: 0,
            done: Vec::new(),
            block_names: Vec::new(),
            zc_on: false,
            probe: DataProbe::new(),
            data: Vec::new(),
            stage: Box::new(Clear),
            stats,
            pacer,
            epoch: Instant::now(),
            chrono: None,
            handed: 0,
            limited_until: None,
        };
        // The opening SYNC, as QEMU's source sends on every channel at setup
        // (`ram_save_setup` flushes and syncs multifd before the first page): a QEMU
        // destination's channel thread then waits for its main thread's matching flush, which
        // comes after RAM loading is set up. Queued first, it goes out ahead of any data.
        if let Some(key) = chan.free.pop() {
            chan.prepare_sync(key);
            chan.ready.push_back(key);
        }
        Ok(chan)
    }

    /// Use `stage` between ready slots and the ring (default: [`Clear`]).
    pub fn with_stage(mut self, stage: Box<dyn SendStage>) -> SendChannel {
        self.stage = stage;
        self
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
        mem: &GuestRam,
        round: &RoundPages,
        progress: &Progress,
        abort: &AtomicBool,
    ) -> Result<(), ChannelError> {
        if self.ring.is_none() {
            let ring = Ring::new(32).map_err(|e| self.err(e.into()))?;
            self.zc_on = self.set.zero_copy_min.is_some()
                && ring.features().send_zc
                && self.stage.zero_copy();
            if self.set.zero_copy_min.is_some() && !self.zc_on {
                tracing::info!(channel = self.id, "kernel lacks SENDMSG_ZC; using SENDMSG");
            }
            self.ring = Some(ring);
        }
        if self.block_names.len() != mem.blocks().len() {
            self.block_names = mem.blocks().iter().map(|b| b.name().to_string()).collect();
        }
        // Answers about holes are good for one round only.
        self.probe.begin_round();
        let mut exhausted = false;
        let mut sync_queued = false;
        loop {
            if abort.load(Ordering::Relaxed) {
                return Err(self.err(ChannelErrorKind::Aborted));
            }
            // Both completion sources, without blocking.
            self.reap(false, progress)?;
            self.poll_engine();
            self.feed();
            self.send_next()?;
            if std::mem::take(&mut self.waiting) {
                // Codec auto waits for the link to take some of its backlog (the rate is
                // being measured): on the send in flight, else a short sleep.
                if self.in_flight.is_some() {
                    self.reap(true, progress)?;
                } else {
                    std::thread::sleep(WAIT_STEP);
                    self.reap(false, progress)?;
                }
                continue;
            }
            let engine_has_room = self
                .accel
                .as_ref()
                .is_none_or(|a| a.in_flight() < a.capacity());
            // One slot is fed at a time (codec auto returns to this loop between pages).
            if !exhausted && engine_has_room && self.feeding.is_none() {
                if let Some(key) = self.free.pop() {
                    match self.start_packet(key, mem, round, progress) {
                        Ok(true) => continue,
                        Ok(false) => {
                            self.free.push(key);
                            exhausted = true;
                        }
                        Err(e) => {
                            self.free.push(key);
                            return Err(e);
                        }
                    }
                }
            }
            // The SYNC goes after every packet of the round, so only once none is compressing.
            if exhausted && !sync_queued && self.compressing == 0 {
                if let Some(key) = self.free.pop() {
                    self.prepare_sync(key);
                    self.ready.push_back(key);
                    sync_queued = true;
                    continue;
                }
            }
            if sync_queued && self.in_flight.is_none() && self.ready.is_empty() {
                if self.notifying() == 0 {
                    if let Some(p) = &self.pacer {
                        self.stats.link_rate = p.link_rate().unwrap_or(0.0);
                        self.stats.compress_rate = p.compress_rate();
                    }
                    let ps = self.set.page_size as u64;
                    for (_, slot) in self.slots.iter_mut() {
                        release_sent(slot, mem, ps);
                    }
                    return Ok(());
                }
                // The round's packets are all sent; their zero-copy notifications are not
                // all in: the guest pages stay referenced until they are.
                self.reap(true, progress)?;
                continue;
            }
            // While a send is in flight, prepare the next queued packet for the wire (seal it)
            // instead of waiting idle.
            if self.in_flight.is_some() && self.stage_ahead()? {
                continue;
            }
            if self.compressing > 0 {
                // Engine jobs in flight: keep both sources turning without sleeping on one.
                if self.in_flight.is_some() {
                    self.reap(false, progress)?;
                }
                std::hint::spin_loop();
                continue;
            }
            if self.in_flight.is_some() || self.notifying() > 0 {
                self.reap(true, progress)?;
            } else if let Some(until) = self.limited_until {
                // Only the bandwidth cap holds the next packet back.
                let wait = until.saturating_duration_since(Instant::now());
                std::thread::sleep(wait.min(Duration::from_millis(2)));
            }
        }
    }

    /// Hand the next ready packet to the kernel if none is in flight and the bandwidth cap
    /// allows it.
    fn send_next(&mut self) -> Result<(), ChannelError> {
        if self.in_flight.is_some() {
            return Ok(());
        }
        let Some(&key) = self.ready.front() else {
            self.limited_until = None;
            return Ok(());
        };
        if let Some(limit) = &self.set.limit {
            let bytes = self.slots.get(key).map_or(0, |s| iov_bytes(&s.iov));
            let now = Instant::now();
            if let Err(wait) = limit.take(bytes, now) {
                self.limited_until = Some(now + wait);
                return Ok(());
            }
        }
        self.limited_until = None;
        self.ready.pop_front();
        self.submit(key)
    }

    /// What the pacer sees now, apart from the socket's unsent bytes: the bytes of the send
    /// in flight not yet accepted by the kernel plus the ready packets behind it.
    fn backlog_outside_socket(&self) -> u64 {
        let in_flight = self
            .in_flight
            .and_then(|k| self.slots.get(k))
            .map_or(0, |s| s.remaining as u64);
        let ready: u64 = self
            .ready
            .iter()
            .filter_map(|&k| self.slots.get(k))
            .map(|s| iov_bytes(&s.iov))
            .sum();
        in_flight + ready
    }

    /// Start slot `key` on the next batch of `round`: zero pages listed, the others handed
    /// to the engine (or referenced raw). Where the round leaves out unwritten pages
    /// ([`RoundPages::skip_unwritten`]), pages known never written are in no packet, and a
    /// batch of nothing else is passed over. `Ok(false)`: the round has no more pages.
    fn start_packet(
        &mut self,
        key: usize,
        mem: &GuestRam,
        round: &RoundPages,
        progress: &Progress,
    ) -> Result<bool, ChannelError> {
        let ps = self.set.page_size as usize;
        let qpl = self.set.compression == Compression::Qpl;
        let Some(slot) = self.slots.get_mut(key) else {
            return Err(self.err(ChannelErrorKind::Aborted));
        };
        let slot: &mut Slot = slot;
        let skip = round.skip_unwritten();
        // The slot is free: the kernel no longer reads its previous packet's pages.
        release_sent(slot, mem, ps as u64);
        loop {
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
            slot.block = block_idx;
            slot.release = block.releases_after_send();
            slot.offsets.clear();
            slot.zero.clear();
            slot.zlens.clear();
            slot.pages.clear();
            // Which pages hold data, asked now, just before they are read: a page written after
            // this answer was dirtied, and a later round sends it (a map is never kept across
            // batches or rounds).
            let known = self.set.find_holes
                && self.probe.data_ranges(
                    block.contents(),
                    block.as_ptr() as usize,
                    block.len(),
                    &slot.batch,
                    ps as u64,
                    &mut self.data,
                );
            let hint = round.known_zero(block_idx);
            let batch_pages = slot.batch.len() as u64;
            if skip && known && self.data.is_empty() {
                // Nothing in the whole batch was ever written: no packet. Where the answer
                // covers a longer hole, the round's untaken chunks inside it are passed over
                // too (a sparse guest's holes cost one question to the kernel per hole).
                let mut n = batch_pages;
                if let Some(&last) = slot.batch.last() {
                    if let Some(end) = self.probe.hole_end(
                        block.contents(),
                        block.as_ptr() as usize,
                        last + ps as u64,
                    ) {
                        n += round.skip_until(block_idx, end);
                    }
                }
                count_left_out(&mut self.stats, ps as u64, n, n, progress);
                continue;
            }
            let (mut left_out, mut left_out_unread) = (0u64, 0u64);
            for &off in &slot.batch {
                let Some(ptr) = block.range_ptr(off, ps) else {
                    continue;
                };
                if (known && !overlaps(&self.data, off, ps as u64)) || covered(hint, off, ps as u64)
                {
                    // Never written (the kernel says) or declared empty (the VMM says): a zero
                    // page, not read; left out altogether where the receiver's memory is zero.
                    if skip {
                        left_out += 1;
                        left_out_unread += 1;
                    } else {
                        slot.zero.push(off);
                        self.stats.pages_zero_unread += 1;
                    }
                    continue;
                }
                // SAFETY: ptr..ptr+ps is inside the block, mapped readable for `mem`'s lifetime.
                // The guest may change the page while we read it; a torn page is resent by the
                // next round (DESIGN.md §2), so this read-only view is the documented window.
                let page = unsafe { std::slice::from_raw_parts(ptr, ps) };
                if is_zero_page(page) {
                    // Read and found zero: as right already on a zero receiver.
                    if skip {
                        left_out += 1;
                    } else {
                        slot.zero.push(off);
                    }
                } else {
                    slot.offsets.push(off);
                    slot.pages.push(ptr);
                    slot.zlens.push(ps as u32);
                }
            }
            count_left_out(
                &mut self.stats,
                ps as u64,
                left_out,
                left_out_unread,
                progress,
            );
            if slot.zero.is_empty() && slot.offsets.is_empty() {
                continue;
            }
            break;
        }
        slot.state = State::Compressing;
        slot.jobs_left = 0;
        slot.next = 0;
        self.compressing += 1;
        if qpl && self.accel.is_some() {
            for z in slot.zlens.iter_mut() {
                *z = 0;
            }
            self.feeding = Some(key);
            self.feed();
        } else {
            // Codec none, or no engine: every non-zero page goes raw.
            slot.next = slot.pages.len();
            self.finish_packet(key);
        }
        Ok(true)
    }

    /// Codec auto with a ladder: `engine` (compressing synchronously, e.g. the deflate codec's
    /// compressor behind QPL) takes the pages while the link's backlog is long and its better
    /// yield pays for its extra CPU ([`Pacer::with_strong`]). No effect without codec auto.
    pub fn with_strong(mut self, engine: Box<dyn Accelerator>) -> SendChannel {
        if let Some(p) = self.pacer.take() {
            self.pacer = Some(p.with_strong(self.set.pages_per_packet));
            self.strong = Some(engine);
        }
        self
    }

    /// Submit the feeding slot's next pages while the engine has room. A page the engine
    /// answers busy is asked again [`BUSY_RETRIES`] times, then compressed on the CPU.
    fn feed(&mut self) {
        let Some(key) = self.feeding else { return };
        let ps = self.set.page_size as usize;
        // Codec auto: what the link holds besides the socket's unsent bytes. Nothing is
        // submitted to the ring during this call, so it can only shrink meanwhile.
        let outside = if self.pacer.is_some() {
            self.backlog_outside_socket()
        } else {
            0
        };
        let handed = self.handed;
        let epoch = self.epoch;
        let fd = self.stream.as_fd();
        let (Some(accel), Some(slot)) = (self.accel.as_mut(), self.slots.get_mut(key)) else {
            self.feeding = None;
            return;
        };
        let slot: &mut Slot = slot;
        let started = Instant::now();
        // Once a page goes raw in this call, so do the rest: the backlog only shrinks until
        // the loop hands this packet to the kernel.
        let mut latched: Option<Choice> = None;
        while slot.next < slot.pages.len() && accel.in_flight() < accel.capacity() {
            let i = slot.next;
            let mut strong = false;
            if let Some(pacer) = self.pacer.as_mut() {
                let choice = latched.unwrap_or_else(|| {
                    // An ioctl failure reads as an empty socket: raw, the safe side.
                    let unsent = pagewire_transport::net::unsent_bytes(fd).unwrap_or(0);
                    let at = epoch.elapsed().as_secs_f64();
                    let chrono = match self.chrono {
                        Some((t, c)) if at - t < CHRONO_WINDOW && at >= t => c,
                        _ => {
                            let c = pagewire_transport::net::tcp_chrono(fd)
                                .ok()
                                .flatten()
                                .unwrap_or_default();
                            self.chrono = Some((at, c));
                            c
                        }
                    };
                    pacer.decide(&Observation {
                        at,
                        queued: unsent + outside,
                        drained: handed.saturating_sub(unsent),
                        busy_us: chrono.busy_us,
                        rwnd_limited_us: chrono.rwnd_limited_us,
                        window_closed: chrono.peer_window.is_some_and(|w| w < CLOSED_WINDOW),
                    })
                });
                if choice == Choice::Wait {
                    // The loop waits for the link to drain some of the backlog; this page is
                    // decided again then.
                    self.waiting = true;
                    break;
                }
                strong = choice == Choice::CompressStrong;
                if choice != Choice::Compress && !strong {
                    latched = Some(choice);
                    // zlens[i] is 0 while pending: page_size marks it raw.
                    if let Some(z) = slot.zlens.get_mut(i) {
                        *z = ps as u32;
                    }
                    self.stats.pages_raw_chosen += 1;
                    match choice {
                        Choice::RawLinkFast => self.stats.pages_raw_link_fast += 1,
                        Choice::RawReceiverBound => self.stats.pages_raw_receiver_bound += 1,
                        _ => {}
                    }
                    slot.next += 1;
                    continue;
                }
            }
            // Compress a private copy, never the guest page in place: the guest may rewrite the
            // page meanwhile, and a compressor reading its input twice would then emit a stream
            // that does not inflate to one page (the receiver would fail the session). The copy
            // is one 4 KiB memcpy next to a ~10 µs compression; a torn *copy* is harmless (the
            // change dirtied the page and the next round resends it).
            let Some(copy) = slot.copies.get_mut(i * ps..(i + 1) * ps) else {
                break;
            };
            // SAFETY: `slot.pages[i]` is `ps` bytes of guest memory, mapped readable for the
            // round; the guest may change it concurrently, which only makes the copy torn.
            unsafe { std::ptr::copy_nonoverlapping(slot.pages[i], copy.as_mut_ptr(), ps) };
            if self.set.skip_incompressible && likely_incompressible(copy) {
                if let Some(z) = slot.zlens.get_mut(i) {
                    *z = ps as u32;
                }
                self.stats.pages_skipped += 1;
                self.stats.pages_incompressible += 1;
                slot.next += 1;
                continue;
            }
            if let (true, Some(st)) = (strong, self.strong.as_mut()) {
                // The ladder's stronger compressor, here and now.
                let t = Instant::now();
                let (Some(out), Some(z)) = (
                    slot.zbuf.get_mut(i * ps..(i + 1) * ps - 1),
                    slot.zlens.get_mut(i),
                ) else {
                    break;
                };
                let o = st.fallback(copy, out);
                record(&mut self.stats, z, o, Path::Software, ps);
                if (*z as usize) < ps {
                    self.stats.pages_compressed_strong += 1;
                }
                if let Some(p) = self.pacer.as_mut() {
                    p.cost_strong(t.elapsed().as_secs_f64());
                    p.yielded_strong(*z as usize);
                }
                slot.next += 1;
                if started.elapsed() > Duration::from_micros(10) {
                    break;
                }
                continue;
            }
            let input = copy.as_ptr();
            let out = slot.zbuf[i * ps..].as_mut_ptr();
            let job = JobDesc {
                tag: ((key as u64) << TAG_SHIFT) | i as u64,
                input,
                in_len: ps,
                output: out,
                out_cap: ps - 1,
            };
            let mut busy = 0u32;
            // Wall time, not this thread's CPU time: on a host whose CPUs are contended (by
            // the receiver on loopback, by guests, by other work) a page takes longer to
            // compress than its CPU time, and that is what the link waits for. Measured with
            // CPU time on a loaded 2-core host, auto compressed 20-28 % of the pages at
            // 1 Gbit/s and was 1.07 x slower than none; with wall time it stays raw there.
            let t_job = self.pacer.as_ref().map(|_| Instant::now());
            loop {
                // SAFETY: the input is this slot's private copy of page i and the output its
                // zbuf region for page i; neither is touched until the job's completion is
                // polled (the slot stays Compressing until every job of it has completed).
                match unsafe { accel.submit(job) } {
                    Submit::Accepted => {
                        slot.jobs_left += 1;
                        break;
                    }
                    Submit::Busy if busy < BUSY_RETRIES => {
                        busy += 1;
                        self.stats.busy_retries += 1;
                    }
                    Submit::Busy => {
                        // Still busy after the retries: this page on the CPU now.
                        self.stats.busy_fallbacks += 1;
                        // SAFETY: as above; the fallback runs synchronously.
                        let (page, out) = unsafe {
                            (
                                std::slice::from_raw_parts(job.input, ps),
                                std::slice::from_raw_parts_mut(out, ps - 1),
                            )
                        };
                        let o = accel.fallback(page, out);
                        if let Some(z) = slot.zlens.get_mut(i) {
                            record(&mut self.stats, z, o, Path::Software, ps);
                            if let Some(p) = self.pacer.as_mut() {
                                p.yielded(*z as usize);
                            }
                        }
                        break;
                    }
                }
            }
            slot.next += 1;
            if let Some(pacer) = self.pacer.as_mut() {
                // Submission time is what a page costs this thread (all of a software
                // compression; next to nothing for an accelerator's job).
                if let Some(t) = t_job {
                    pacer.cost(t.elapsed().as_secs_f64());
                }
                if started.elapsed() > Duration::from_micros(10) {
                    // Back to the loop: reap sends so the next decision sees the link as is.
                    break;
                }
            }
        }
        if slot.next >= slot.pages.len() {
            self.feeding = None;
            if slot.jobs_left == 0 {
                self.finish_packet(key);
            }
        }
    }

    /// Take the engine's completions and finish every packet whose jobs are all done.
    fn poll_engine(&mut self) {
        let Some(accel) = self.accel.as_mut() else {
            return;
        };
        accel.poll(&mut self.done);
        let ps = self.set.page_size as usize;
        for c in std::mem::take(&mut self.done) {
            let key = (c.tag >> TAG_SHIFT) as usize;
            let i = (c.tag & ((1 << TAG_SHIFT) - 1)) as usize;
            let Some(slot) = self.slots.get_mut(key) else {
                continue;
            };
            if slot.state != State::Compressing {
                continue;
            }
            let Some(z) = slot.zlens.get_mut(i) else {
                continue;
            };
            record(&mut self.stats, z, c.outcome, c.path, ps);
            if let Some(p) = self.pacer.as_mut() {
                p.yielded(*z as usize);
            }
            slot.jobs_left = slot.jobs_left.saturating_sub(1);
            if slot.jobs_left == 0 && slot.next >= slot.pages.len() {
                self.finish_packet(key);
            }
        }
    }

    /// Every page of slot `key` is settled: build the iovecs, length array and header, and
    /// queue the packet.
    fn finish_packet(&mut self, key: usize) {
        let ps = self.set.page_size as usize;
        let ppp = self.set.pages_per_packet;
        let qpl = self.set.compression == Compression::Qpl;
        let flags = self.set.compression.flag();
        let packet_num = self.packet_num.fetch_add(1, Ordering::Relaxed);
        let id = self.id;
        let Some(slot) = self.slots.get_mut(key) else {
            return;
        };
        let slot: &mut Slot = slot;
        slot.iov.clear();
        slot.iov.push(libc::iovec {
            iov_base: slot.header.as_mut_ptr().cast(),
            iov_len: slot.header.len(),
        });
        slot.iov.push(libc::iovec {
            iov_base: slot.zlen_bytes.as_mut_ptr().cast(),
            iov_len: 0,
        });
        let mut compressed = 0u64;
        for (i, &page) in slot.pages.iter().enumerate() {
            let z = slot.zlens.get(i).copied().unwrap_or(ps as u32) as usize;
            let (src, len) = if z == ps || z == 0 {
                (page.cast_mut(), ps)
            } else {
                compressed += 1;
                (slot.zbuf[i * ps..].as_mut_ptr(), z)
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
        let normal = slot.pages.len() as u32;
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
            flags,
            pages_alloc: ppp,
            normal_pages: normal,
            next_packet_size: next_packet_size as u32,
            packet_num,
            zero_pages: zero,
        };
        // Block names were checked (1..=255 bytes, no NUL) when the memory was built.
        let block_name = self.block_names.get(slot.block).map_or("", String::as_str);
        wire::encode_header(&mut slot.header, &fields, block_name, &slot.offsets);
        slot.pending = ChannelStats {
            channel: id,
            packets: 1,
            pages_normal: normal as u64,
            pages_zero: zero as u64,
            pages_raw: normal as u64 - compressed,
            pages_compressed: compressed,
            memory_bytes: (normal as u64 + zero as u64) * ps as u64,
            wire_bytes: slot.header.len() as u64 + next_packet_size,
            ..Default::default()
        };
        slot.state = State::Ready;
        self.compressing = self.compressing.saturating_sub(1);
        self.ready.push_back(key);
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
        slot.state = State::Ready;
    }

    /// Let the stage prepare the first Ready packet in the queue it has not prepared yet (the
    /// queue is the send order, which TLS sequence numbers must follow). Returns whether
    /// there was one.
    fn stage_ahead(&mut self) -> Result<bool, ChannelError> {
        let Some(&key) = self
            .ready
            .iter()
            .find(|&&k| self.slots.get(k).is_some_and(|s| !s.staged))
        else {
            return Ok(false);
        };
        let Some(slot) = self.slots.get_mut(key) else {
            return Ok(false);
        };
        let slot: &mut Slot = slot;
        // SAFETY: as in `submit`: the Ready slot's iovecs point at its own buffers and at
        // guest pages valid for the round.
        if let Err(kind) = unsafe { self.stage.prepare(&mut slot.iov, &mut slot.sealed) } {
            return Err(self.err(kind));
        }
        slot.staged = true;
        self.stats.tls_key_updates = self.stage.key_updates();
        Ok(true)
    }

    fn submit(&mut self, key: usize) -> Result<(), ChannelError> {
        let fd = self.stream.as_raw_fd();
        let Some(slot) = self.slots.get_mut(key) else {
            return Err(self.err(ChannelErrorKind::Aborted));
        };
        let slot: &mut Slot = slot;
        if !slot.staged {
            // SAFETY: the slot's iovecs point at its own header, length array and zbuf and
            // at guest pages of the memory being sent, all valid while the slot is Ready.
            if let Err(kind) = unsafe { self.stage.prepare(&mut slot.iov, &mut slot.sealed) } {
                return Err(self.err(kind));
            }
            self.stats.tls_key_updates = self.stage.key_updates();
        }
        slot.staged = false;
        slot.first = 0;
        slot.remaining = slot.iov.iter().map(|v| v.iov_len).sum();
        slot.zc = ZcTrack::default();
        slot.state = State::Sending;
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
        let flags = (libc::MSG_NOSIGNAL | libc::MSG_WAITALL) as u32;
        let zc = self.zc_on
            && self
                .set
                .zero_copy_min
                .is_some_and(|min| slot.remaining >= min);
        let sqe = if zc {
            opcode::SendMsgZc::new(types::Fd(fd), &slot.msg)
                .flags(flags)
                .ioprio(SEND_ZC_REPORT_USAGE)
                .build()
                .user_data(key as u64)
        } else {
            opcode::SendMsg::new(types::Fd(fd), &slot.msg)
                .flags(flags)
                .build()
                .user_data(key as u64)
        };
        if zc {
            self.stats.zc_sends += 1;
        }
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

    /// Take ring completions (blocking for one if `block`), continue short sends, free slots.
    fn reap(&mut self, block: bool, progress: &Progress) -> Result<(), ChannelError> {
        let timeout = self.set.idle_timeout;
        let want = usize::from(block);
        let Some(ring) = self.ring.as_mut() else {
            return Err(self.err(ChannelErrorKind::Aborted));
        };
        let cqes: Vec<(u64, i32, u32)> = ring
            .wait(want, Some(timeout))
            .map_err(|e| ChannelError {
                channel: self.id,
                place: Place::Between {
                    index: self.packets,
                },
                kind: e.into(),
            })?
            .iter()
            .map(|c| (c.user_data(), c.result(), c.flags()))
            .collect();
        if block && cqes.is_empty() {
            return Err(self.err(ChannelErrorKind::Idle {
                secs: timeout.as_secs_f64(),
            }));
        }
        for (ud, res, flags) in cqes {
            let key = ud as usize;
            if io_uring::cqueue::notif(flags) {
                // A zero-copy notification: the kernel no longer reads that send's buffers.
                self.stats.zc_notifications += 1;
                if (res as u32) & NOTIF_USAGE_ZC_COPIED != 0 {
                    self.stats.zc_copied += 1;
                }
                let Some(slot) = self.slots.get_mut(key) else {
                    continue;
                };
                slot.zc.on_notif();
                if slot.state == State::Notifying && slot.zc.reusable() {
                    slot.state = State::Free;
                    self.free.push(key);
                }
                continue;
            }
            let more = io_uring::cqueue::more(flags);
            if res == -libc::EOPNOTSUPP && self.zc_on {
                // This socket cannot send zero-copy: plain SENDMSG from now on.
                tracing::info!(
                    channel = self.id,
                    "SENDMSG_ZC not supported on this socket; falling back to SENDMSG"
                );
                self.zc_on = false;
                let fd = self.stream.as_raw_fd();
                if let Some(slot) = self.slots.get_mut(key) {
                    slot.zc.on_result(more, false);
                }
                self.push_send(key, fd)?;
                continue;
            }
            if res < 0 {
                let e = std::io::Error::from_raw_os_error(-res);
                let kind = match -res {
                    libc::EPIPE | libc::ECONNRESET => ChannelErrorKind::Closed,
                    _ => ChannelErrorKind::Io(e),
                };
                // The operation is over (no continuation follows); only an announced
                // notification can still be owed.
                if let Some(slot) = self.slots.get_mut(key) {
                    slot.zc.on_result(more, true);
                }
                self.in_flight = None;
                return Err(self.err(kind));
            }
            let fd = self.stream.as_raw_fd();
            let Some(slot) = self.slots.get_mut(key) else {
                continue;
            };
            let slot: &mut Slot = slot;
            self.handed += res as u64;
            let left = advance_iovecs(&mut slot.iov, &mut slot.first, res as usize);
            slot.remaining = left;
            slot.zc.on_result(more, left == 0);
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
            if slot.zc.reusable() {
                slot.state = State::Free;
                self.free.push(key);
            } else {
                // Zero-copy: the kernel may still read these buffers; free on the notification.
                slot.state = State::Notifying;
            }
            self.send_next()?;
        }
        Ok(())
    }

    /// Slots waiting for zero-copy notifications.
    fn notifying(&self) -> usize {
        self.slots
            .iter()
            .filter(|(_, s)| s.state == State::Notifying)
            .count()
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

/// Bytes an iovec list covers.
fn iov_bytes(iov: &[libc::iovec]) -> u64 {
    iov.iter().map(|v| v.iov_len as u64).sum()
}

/// Count `pages` zero pages of a round left out of every packet (`unread` of them never read):
/// they are the round's zero pages as much as listed ones, so they count in `pages_zero`
/// (holes in `pages_zero_unread`) and `memory_bytes` too.
fn count_left_out(stats: &mut ChannelStats, ps: u64, pages: u64, unread: u64, progress: &Progress) {
    if pages == 0 {
        return;
    }
    stats.pages_left_out += pages;
    stats.pages_zero += pages;
    stats.pages_zero_unread += unread;
    stats.memory_bytes += pages * ps;
    progress.add(pages, 0);
}

/// Drop a sent slot's normal pages from a block that releases sent pages, in runs of
/// contiguous pages (one madvise per run).
fn release_sent(slot: &mut Slot, mem: &GuestRam, ps: u64) {
    if !std::mem::take(&mut slot.release) {
        return;
    }
    let Some(block) = mem.block(slot.block) else {
        return;
    };
    let normal = slot.offsets.get(..slot.pages.len()).unwrap_or_default();
    let mut run: Option<(u64, u64)> = None;
    for &off in normal {
        match run {
            Some((s, e)) if e == off => run = Some((s, e + ps)),
            _ => {
                if let Some((s, e)) = run {
                    block.release(s, (e - s) as usize);
                }
                run = Some((off, off + ps));
            }
        }
    }
    if let Some((s, e)) = run {
        block.release(s, (e - s) as usize);
    }
}

/// Count a settled page job and set its length-array entry.
fn record(stats: &mut ChannelStats, zlen: &mut u32, o: Outcome, path: Path, ps: usize) {
    match path {
        Path::Hardware => stats.jobs_hardware += 1,
        Path::Software => stats.jobs_software += 1,
    }
    *zlen = match o {
        Outcome::Compressed(n) if n > 0 && n < ps => n as u32,
        Outcome::Compressed(_) | Outcome::DidNotFit => {
            stats.pages_incompressible += 1;
            ps as u32
        }
        Outcome::Failed(_) => {
            stats.jobs_failed += 1;
            ps as u32
        }
    };
}

impl Drop for SendChannel {
    fn drop(&mut self) {
        // Engine jobs may still write into zbufs: let them finish (bounded) first.
        if let Some(accel) = self.accel.as_mut() {
            let mut sink = Vec::new();
            for _ in 0..1_000_000 {
                if accel.in_flight() == 0 {
                    break;
                }
                accel.poll(&mut sink);
                sink.clear();
                std::hint::spin_loop();
            }
            if accel.in_flight() > 0 {
                std::mem::forget(std::mem::take(&mut self.slots));
                return;
            }
        }
        // A send may still be in flight after an error: shut the socket so it completes at
        // once, then wait (bounded) for its completion before the slots are freed.
        let kernel_holds = |c: &SendChannel| {
            c.in_flight.is_some()
                || c.slots.iter().any(|(_, s)| {
                    matches!(s.state, State::Sending | State::Notifying) && !s.zc.reusable()
                })
        };
        if kernel_holds(self) && self.ring.is_some() {
            let _ = self.stream.shutdown(std::net::Shutdown::Both);
            for _ in 0..50 {
                let Some(ring) = self.ring.as_mut() else {
                    break;
                };
                let cqes: Vec<(u64, u32)> = match ring.wait(1, Some(Duration::from_millis(100))) {
                    Ok(c) => c.iter().map(|c| (c.user_data(), c.flags())).collect(),
                    Err(_) => break,
                };
                for (ud, flags) in cqes {
                    if let Some(slot) = self.slots.get_mut(ud as usize) {
                        if io_uring::cqueue::notif(flags) {
                            slot.zc.on_notif();
                        } else {
                            slot.zc.on_result(io_uring::cqueue::more(flags), true);
                            self.in_flight = None;
                        }
                    }
                }
                if !kernel_holds(self) {
                    break;
                }
            }
            if kernel_holds(self) {
                // The kernel still holds pointers into the slots: leak them rather than free
                // memory it may write to or read from.
                std::mem::forget(std::mem::take(&mut self.slots));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ZcTrack;

    /// A slot is reusable only after its send completed and every notification arrived,
    /// whatever the order of the completions.
    #[test]
    fn slot_reusable_only_after_last_notification() {
        // Plain SENDMSG: one result, no F_MORE.
        let mut t = ZcTrack::default();
        t.on_result(false, true);
        assert!(t.reusable());

        // Zero copy, short send continued: two results with F_MORE, then two notifications.
        let mut t = ZcTrack::default();
        t.on_result(true, false);
        assert!(!t.reusable(), "partly sent");
        t.on_result(true, true);
        assert!(
            !t.reusable(),
            "sent, but the kernel still references the buffers"
        );
        t.on_notif();
        assert!(!t.reusable(), "one notification still owed");
        t.on_notif();
        assert!(t.reusable());

        // A notification may overtake the last result.
        let mut t = ZcTrack::default();
        t.on_result(true, false);
        t.on_notif();
        assert!(!t.reusable(), "not all sent yet");
        t.on_result(true, true);
        assert!(!t.reusable());
        t.on_notif();
        assert!(t.reusable());
    }
}
