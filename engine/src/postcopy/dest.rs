//! The destination side of post-copy: discard the pages that will come, register guest
//! memory with userfaultfd, turn faults into page requests, and place every arriving page
//! with UFFDIO_COPY from the connection's own buffer (never a receive into registered memory).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use pagewire_transport::control::{self, Hello, Message, NONCE_LEN};
use pagewire_transport::net;
use pagewire_transport::tls::{Conn, ReadHalf, WriteHalf};
use pagewire_transport::wire::{self, BlockSpec, Compression, HeaderRules, PacketHeader};
use tracing::{debug, info, info_span, warn};

use super::{AtomicBitmap, Latencies, PageRequest, PostcopyError, MAX_BACKGROUND};
use crate::config::Config;
use crate::error::SessionError;
use crate::memory::GuestRam;
use crate::session::handshake::{Door, Keys};
use crate::threads::{self, ThreadRole};
use crate::uffd::{discard, Uffd, Wakeup};

/// What the embedder gets when post-copy starts on the destination: the memory to run the
/// guest on (pages it touches that have not arrived are fetched first) and the device state
/// sent so far.
#[derive(Debug)]
pub struct PostcopyStart {
    /// Guest memory, registered with userfaultfd; run the guest on it now.
    pub memory: Arc<GuestRam>,
    /// Device state sent before the switch ([`crate::Sender::send_state`]), in order.
    pub state: Vec<Vec<u8>>,
    /// Pages still to arrive.
    pub pages: u64,
}

type HookFn = dyn Fn(PostcopyStart) + Send + Sync;

/// The embedder's callback for the start of post-copy ([`crate::Receiver::on_postcopy`]).
#[derive(Clone, Default)]
pub struct PostcopyHook(pub(crate) Option<Arc<HookFn>>);

impl std::fmt::Debug for PostcopyHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "PostcopyHook(set)"
        } else {
            "PostcopyHook(none)"
        })
    }
}

/// Counters of the destination side of post-copy.
#[derive(Clone, Debug, Default)]
pub struct PostcopyStats {
    /// Pages post-copy delivered (missing at the switch).
    pub pages: u64,
    /// Fault events read.
    pub faults: u64,
    /// Page requests sent on the urgent connection.
    pub requests: u64,
    /// Pages placed from the urgent connection.
    pub pages_urgent: u64,
    /// Pages placed from the background connections.
    pub pages_background: u64,
    /// Pages that arrived after they had been placed (a request raced the background).
    pub duplicates: u64,
    /// Per fault: fault read → page placed.
    pub latency: Latencies,
    /// Seconds from the switch until the last page was placed.
    pub seconds: f64,
    /// Bytes received on post-copy connections.
    pub wire_bytes: u64,
    /// Only user-space faults are caught (unprivileged userfaultfd).
    pub user_mode_only: bool,
    /// Times the post-copy connections broke and were replaced.
    pub reconnects: u32,
}

/// What the receiver's control loop hands to [`run`].
pub(crate) struct DestArgs<'a> {
    pub memory: &'a Arc<GuestRam>,
    pub hello: &'a Hello,
    pub cfg: &'a Config,
    pub hook: &'a PostcopyHook,
    pub state: &'a [Vec<u8>],
}

/// The pages a sender announced (`PostcopyPages`), validated and bounded.
#[derive(Debug, Default)]
pub(crate) struct Announced {
    runs: Vec<(usize, u64, u64)>,
}

impl Announced {
    /// Add one message's runs; every run must be page-aligned pages inside its block, and no
    /// more runs than the memory has pages.
    pub(crate) fn add(
        &mut self,
        mem: &GuestRam,
        page_size: u32,
        block: u32,
        runs: Vec<(u64, u64)>,
    ) -> Result<(), SessionError> {
        let ps = page_size as u64;
        let bad = |d: String| SessionError::Handshake(format!("postcopy-pages: {d}"));
        let b = mem.block(block as usize).ok_or_else(|| {
            bad(format!(
                "block {block} out of range ({} blocks)",
                mem.blocks().len()
            ))
        })?;
        let npages = b.len() as u64 / ps;
        let limit = mem.total_len() / ps;
        if (self.runs.len() + runs.len()) as u64 > limit {
            return Err(bad(format!("more runs than the memory's {limit} pages")));
        }
        for (off, n) in runs {
            if off % ps != 0 || n == 0 || (off / ps).checked_add(n).is_none_or(|end| end > npages) {
                return Err(bad(format!(
                    "run of {n} pages at {off:#x} is not inside block {block} ({} bytes) in whole pages",
                    b.len()
                )));
            }
            self.runs.push((block as usize, off, n));
        }
        Ok(())
    }
}

struct Placer<'a> {
    uffd: &'a Uffd,
    mem: &'a GuestRam,
    ps: usize,
    present: Vec<AtomicBitmap>,
    placed: AtomicU64,
    to_place: u64,
    requested: Mutex<HashMap<(usize, u64), Instant>>,
    latency: Mutex<Latencies>,
    done: Condvar,
    done_lock: Mutex<()>,
    stop: AtomicBool,
    failed: AtomicBool,
    error: Mutex<Option<PostcopyError>>,
    faults: AtomicU64,
    requests: AtomicU64,
    pages_urgent: AtomicU64,
    pages_background: AtomicU64,
    duplicates: AtomicU64,
    wire_bytes: AtomicU64,
    /// The current post-copy connections (to shut them down).
    sockets: Mutex<Vec<TcpStream>>,
    /// Where the fault thread writes requests (none while the connections are replaced).
    requests_out: Mutex<Option<WriteHalf>>,
    /// A post-copy connection broke: the sender will replace them (`PostcopyReconnect`).
    broken: AtomicBool,
    /// Ends the fault thread's wait at once when the session is over.
    wakeup: Wakeup,
}

impl Placer<'_> {
    fn fail(&self, e: PostcopyError) {
        if self.stop.load(Ordering::SeqCst) {
            debug!(error = %e, "after the last page (ignored)");
            return;
        }
        if matches!(e, PostcopyError::Io { .. }) {
            // A broken connection: placed pages stay, faulting threads wait, and the sender
            // replaces the connections.
            if !self.broken.swap(true, Ordering::SeqCst) {
                warn!(error = %e, "post-copy connection broken; waiting for the sender to reconnect");
            }
            self.shut_connections();
        } else {
            if let Ok(mut g) = self.error.lock() {
                if g.is_none() {
                    *g = Some(e);
                }
            }
            self.failed.store(true, Ordering::SeqCst);
            self.shut_connections();
        }
        let _g = self.done_lock.lock();
        self.done.notify_all();
    }

    fn shut_connections(&self) {
        if let Ok(mut out) = self.requests_out.lock() {
            *out = None;
        }
        if let Ok(socks) = self.sockets.lock() {
            for s in socks.iter() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    fn record_latency(&self, t: Instant) {
        if let Ok(mut l) = self.latency.lock() {
            l.record(t.elapsed());
        }
    }

    /// Place `data` (whole pages) at `off` in `block`, waking whoever waits there.
    fn place(
        &self,
        block: usize,
        off: u64,
        data: &[u8],
        urgent: bool,
    ) -> Result<(), PostcopyError> {
        let ps = self.ps as u64;
        let (Some(b), Some(present)) = (self.mem.block(block), self.present.get(block)) else {
            return Err(PostcopyError::Protocol(format!(
                "block {block} out of range"
            )));
        };
        let Some(dst) = b.range_ptr(off, data.len()) else {
            return Err(PostcopyError::Protocol(format!(
                "{} bytes at {off:#x} outside block {block}",
                data.len()
            )));
        };
        let first = off / ps;
        let n = data.len() as u64 / ps;
        if (first..first + n).all(|p| present.get(p)) {
            self.duplicates.fetch_add(n, Ordering::Relaxed);
            return Ok(());
        }
        // SAFETY: `dst..dst + data.len()` is inside block `block` (range_ptr checked), and the
        // whole block is registered with this uffd for the life of the placer.
        let r = unsafe { self.uffd.copy(dst, data, self.ps) }?;
        self.duplicates
            .fetch_add((r.existed / self.ps) as u64, Ordering::Relaxed);
        let mut newly = 0u64;
        let mut waited = Vec::new();
        for p in first..first + n {
            if present.set(p) {
                newly += 1;
                waited.push(p);
            }
        }
        if newly == 0 {
            return Ok(());
        }
        if let Ok(mut m) = self.requested.lock() {
            if !m.is_empty() {
                for p in waited {
                    if let Some(t) = m.remove(&(block, p)) {
                        self.record_latency(t);
                    }
                }
            }
        }
        let counter = if urgent {
            &self.pages_urgent
        } else {
            &self.pages_background
        };
        counter.fetch_add(newly, Ordering::Relaxed);
        if self.placed.fetch_add(newly, Ordering::AcqRel) + newly >= self.to_place {
            let _g = self.done_lock.lock();
            self.done.notify_all();
        }
        Ok(())
    }

    /// Place runs of consecutive offsets with one UFFDIO_COPY each; `data` holds the pages in
    /// `offs` order.
    fn place_runs(
        &self,
        block: usize,
        offs: &[u64],
        data: &[u8],
        urgent: bool,
    ) -> Result<(), PostcopyError> {
        let ps = self.ps;
        let mut i = 0;
        while i < offs.len() {
            let mut j = i + 1;
            while j < offs.len() && offs.get(j) == offs.get(j - 1).map(|o| o + ps as u64).as_ref() {
                j += 1;
            }
            let (Some(&off), Some(src)) = (offs.get(i), data.get(i * ps..j * ps)) else {
                return Err(PostcopyError::Protocol(
                    "internal: run outside buffer".into(),
                ));
            };
            self.place(block, off, src, urgent)?;
            i = j;
        }
        Ok(())
    }

    /// Where guest address `a` is: (block, page index).
    fn locate(&self, a: u64) -> Option<(usize, u64)> {
        self.mem.blocks().iter().enumerate().find_map(|(i, b)| {
            let base = b.as_ptr() as u64;
            (a >= base && a < base + b.len() as u64).then(|| (i, (a - base) / self.ps as u64))
        })
    }
}

/// Read exactly `buf.len()` bytes; `Ok(false)` on EOF before the first byte.
fn read_full(stream: &mut impl Read, buf: &mut [u8]) -> std::io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match stream.read(buf.get_mut(got..).unwrap_or_default()) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("peer closed mid-packet ({got} of {} bytes)", buf.len()),
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Receive packets on one post-copy connection and place their pages, until EOF.
fn receive(
    mut stream: ReadHalf,
    placer: &Placer<'_>,
    blocks: &[BlockSpec],
    ppp: u32,
    urgent: bool,
    framing: Compression,
    cfg: &Config,
) -> Result<(), PostcopyError> {
    let cpus = &cfg.postcopy_cpus;
    if urgent {
        super::fault_path_thread(cpus);
    } else {
        super::background_thread(cpus);
    }
    let what = if urgent {
        "urgent connection"
    } else {
        "background connection"
    };
    let ps = placer.ps;
    // Packets come in the session's framing: the qpl framing when its codec compresses (a
    // length per page, each page DEFLATE or raw), raw otherwise.
    let rules = HeaderRules {
        page_size: ps as u32,
        pages_per_packet: ppp,
        compression: framing,
        blocks,
    };
    let mut decoder = match framing {
        Compression::Qpl => Some(
            crate::session::recv::decoder_for(cfg.decoder)
                .map_err(|e| PostcopyError::Decoder(e.to_string()))?,
        ),
        _ => None,
    };
    let mut lens = Vec::new();
    let mut len_bytes = vec![0u8; 4 * ppp as usize];
    let mut zipped = vec![
        0u8;
        if decoder.is_some() {
            ppp as usize * ps
        } else {
            0
        }
    ];
    let mut hdr = vec![0u8; wire::header_len(ppp)];
    let mut staging = vec![0u8; ppp as usize * ps];
    let zeros = vec![0u8; ppp as usize * ps];
    let mut header = PacketHeader::default();
    let mut index = 0u64;
    let io = |e| super::conn_error(what, e);
    loop {
        if !read_full(&mut stream, &mut hdr).map_err(io)? {
            if urgent && !placer.stop.load(Ordering::SeqCst) {
                // The source never closes the urgent connection before the last page.
                return Err(io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            return Ok(());
        }
        header
            .decode_into(&hdr, &rules)
            .map_err(|source| PostcopyError::Wire {
                what,
                index,
                source,
            })?;
        if header.is_sync() {
            return Err(PostcopyError::Protocol(format!(
                "{what}, packet #{index}: SYNC (post-copy streams have none)"
            )));
        }
        let normal = header.normal_pages as usize;
        let internal = || PostcopyError::Protocol("internal: packet larger than buffer".into());
        let body = match decoder.as_mut() {
            Some(d) if normal > 0 => {
                let lb = len_bytes.get_mut(..4 * normal).ok_or_else(internal)?;
                if !read_full(&mut stream, lb).map_err(io)? {
                    return Err(io(std::io::ErrorKind::UnexpectedEof.into()));
                }
                let sum = wire::decode_zlens(
                    lb,
                    normal as u32,
                    ps as u32,
                    header.next_packet_size,
                    &mut lens,
                )
                .map_err(|source| PostcopyError::Wire {
                    what,
                    index,
                    source,
                })?;
                // Each length is at most a page: the pages fit the buffer.
                let z = zipped.get_mut(..sum as usize).ok_or_else(internal)?;
                if !read_full(&mut stream, z).map_err(io)? {
                    return Err(io(std::io::ErrorKind::UnexpectedEof.into()));
                }
                let mut at = 0usize;
                for (page, &len) in lens.iter().enumerate() {
                    let len = len as usize;
                    let (Some(src), Some(dst)) = (
                        z.get(at..at + len),
                        staging.get_mut(page * ps..(page + 1) * ps),
                    ) else {
                        return Err(internal());
                    };
                    if len == ps {
                        dst.copy_from_slice(src);
                    } else {
                        d.decompress(src, dst)
                            .map_err(|source| PostcopyError::Decode {
                                what,
                                index,
                                page,
                                source,
                            })?;
                    }
                    at += len;
                }
                4 * normal + sum as usize
            }
            _ => {
                let payload = staging.get_mut(..normal * ps).ok_or_else(internal)?;
                if normal > 0 && !read_full(&mut stream, payload).map_err(io)? {
                    return Err(io(std::io::ErrorKind::UnexpectedEof.into()));
                }
                normal * ps
            }
        };
        placer.place_runs(header.block, header.normal_offsets(), &staging, urgent)?;
        placer.place_runs(header.block, header.zero_offsets(), &zeros, urgent)?;
        placer
            .wire_bytes
            .fetch_add((hdr.len() + body) as u64, Ordering::Relaxed);
        index += 1;
    }
}

/// Read faults; request each missing page once on the urgent connection; wake threads
/// whose page is already there.
fn serve_faults(placer: &Placer<'_>, cpus: &crate::pin::PostcopyCpus) -> Result<(), PostcopyError> {
    super::fault_path_thread(cpus);
    let mut addrs = Vec::new();
    let mut wanted = Vec::new();
    let ps = placer.ps as u64;
    while !placer.stop.load(Ordering::SeqCst) && !placer.failed.load(Ordering::SeqCst) {
        addrs.clear();
        placer
            .uffd
            .read_faults(Duration::from_millis(50), &mut addrs, Some(&placer.wakeup))?;
        let t = Instant::now();
        wanted.clear();
        for &a in &addrs {
            placer.faults.fetch_add(1, Ordering::Relaxed);
            let Some((block, page)) = placer.locate(a) else {
                warn!(address = a, "fault outside guest memory (ignored)");
                continue;
            };
            let new = match placer.requested.lock() {
                Ok(mut m) => {
                    let fresh = !m.contains_key(&(block, page));
                    m.entry((block, page)).or_insert(t);
                    fresh
                }
                Err(_) => true,
            };
            if placer.present.get(block).is_some_and(|b| b.get(page)) {
                // Placed meanwhile (that placement woke it, unless it queued after): wake.
                if let Some(t0) = placer
                    .requested
                    .lock()
                    .ok()
                    .and_then(|mut m| m.remove(&(block, page)))
                {
                    placer.record_latency(t0);
                }
                let base = placer.mem.block(block).map_or(0, |b| b.as_ptr() as u64);
                placer.uffd.wake(base + page * ps, ps)?;
                continue;
            }
            if new {
                wanted.push((block, page));
            }
        }
        // Faults read together go as one write. While the connections are being replaced
        // the requests stay outstanding and are sent on the new urgent connection.
        placer.send_requests(&wanted);
    }
    Ok(())
}

impl Placer<'_> {
    /// Write page requests for `pages` (block, page index) on the urgent connection in one
    /// write, if there is a connection; a failed write marks the connections broken (the
    /// requests stay outstanding).
    fn send_requests(&self, pages: &[(usize, u64)]) {
        if pages.is_empty() {
            return;
        }
        let mut bytes = Vec::with_capacity(pages.len() * super::REQUEST_LEN);
        for &(block, page) in pages {
            let req = PageRequest {
                block: block as u32,
                offset: page * self.ps as u64,
            };
            bytes.extend_from_slice(&req.encode());
        }
        let r = match self.requests_out.lock() {
            Ok(mut out) => match out.as_mut() {
                Some(s) => s.write_all(&bytes),
                None => return,
            },
            Err(_) => return,
        };
        match r {
            Ok(()) => {
                self.requests
                    .fetch_add(pages.len() as u64, Ordering::Relaxed);
            }
            Err(e) => self.fail(super::conn_error("urgent connection (requests)", e)),
        }
    }
}

/// Accept the urgent and `background` background connections of this session (ids
/// `first_id ..= first_id + background`); returns them urgent first.
fn accept_connections(
    door: &mut Door,
    first_id: u32,
    background: u16,
    idle: Duration,
) -> Result<Vec<Conn>, SessionError> {
    let n = 1 + background as usize;
    let mut slots: Vec<Option<Conn>> = (0..n).map(|_| None).collect();
    let deadline = Instant::now() + idle;
    for _ in 0..n {
        let c = door.next_channel(deadline)?;
        let id = c.init.channel_id as u32;
        let slot = id
            .checked_sub(first_id)
            .and_then(|i| slots.get_mut(i as usize))
            .ok_or_else(|| {
                SessionError::Handshake(format!(
                    "post-copy connection from {}: id {id} not in {first_id}..={}",
                    c.peer,
                    first_id + background as u32
                ))
            })?;
        if slot.is_some() {
            return Err(SessionError::Handshake(format!(
                "post-copy connection id {id} connected twice"
            )));
        }
        *slot = Some(c.stream);
    }
    let streams: Vec<Conn> = slots.into_iter().flatten().collect();
    for (i, c) in streams.iter().enumerate() {
        let s = c.tcp();
        // The urgent connection may be idle for as long as the guest does not fault; a
        // background stream idle for `idle` while pages are missing is a failure, and so is
        // a source that stops reading requests.
        let read = if i == 0 { None } else { Some(idle) };
        s.set_read_timeout(read)
            .and_then(|()| s.set_write_timeout(Some(idle)))
            .map_err(|e| SessionError::Control(e.into()))?;
    }
    Ok(streams)
}

/// Hand the new connections to the placer: sockets to shut down, the request writer (the
/// urgent connection's sending half); then re-send every request still outstanding. Returns
/// the connections' receiving halves, urgent first.
fn install(placer: &Placer<'_>, streams: Vec<Conn>) -> Result<Vec<ReadHalf>, SessionError> {
    let net = |e: std::io::Error| SessionError::Control(e.into());
    let mut socks = Vec::with_capacity(streams.len());
    let mut readers = Vec::with_capacity(streams.len());
    let mut out = None;
    for (i, conn) in streams.into_iter().enumerate() {
        socks.push(conn.tcp().try_clone().map_err(net)?);
        let (r, w) = conn.split().map_err(net)?;
        readers.push(r);
        if i == 0 {
            out = Some(w);
        }
    }
    if let Ok(mut g) = placer.sockets.lock() {
        *g = socks;
    }
    if let Ok(mut g) = placer.requests_out.lock() {
        *g = out;
    }
    let outstanding: Vec<(usize, u64)> = placer
        .requested
        .lock()
        .map(|m| m.keys().copied().collect())
        .unwrap_or_default();
    let missing: Vec<(usize, u64)> = outstanding
        .into_iter()
        .filter(|&(block, page)| !placer.present.get(block).is_some_and(|b| b.get(page)))
        .collect();
    placer.send_requests(&missing);
    Ok(readers)
}

/// Wait (up to the idle timeout) for the sender to come back on a new control connection:
/// the front door authenticates it as for a new session; its hello must be this session's
/// (same uuid and parameters). Replaces `control`; the door then expects the new post-copy
/// connections' tokens over the new receiver and sender nonces.
fn accept_resume(
    door: &mut Door,
    control: &mut Conn,
    hello: &Hello,
    cfg: &Config,
    closed: bool,
    missing: u64,
) -> Result<(), SessionError> {
    // A source that closed its control connection has a short grace to come back; one that
    // went silent (the network) the idle timeout.
    let wait = if closed {
        SOURCE_GONE_GRACE.min(cfg.idle_timeout)
    } else {
        cfg.idle_timeout
    };
    let deadline = Instant::now() + wait;
    let plain = |h: &Hello| Hello {
        auth: None,
        ..h.clone()
    };
    loop {
        let c = door.next_control(deadline).map_err(|e| match e {
            SessionError::Net(net::NetError::AcceptTimeout { .. }) if closed => {
                PostcopyError::SourceGone {
                    waited: wait.as_secs_f64(),
                    missing,
                }
                .into()
            }
            SessionError::Net(net::NetError::AcceptTimeout { .. }) => SessionError::Timeout(format!(
                "post-copy: the control connection broke and the sender did not resume within {:.1} s",
                wait.as_secs_f64()
            )),
            other => other,
        })?;
        let mut stream = c.stream;
        if plain(&c.hello) != plain(hello) {
            door.refuse(
                c.peer,
                &mut stream,
                SessionError::Handshake(
                    "a session is in post-copy here; only it may resume".into(),
                ),
            );
            continue;
        }
        let proof = match (&cfg.secret, &c.hello.auth) {
            (Some(sec), Some(a)) => Some(sec.receiver_proof(&c.nonce_r, &a.nonce, &hello.uuid)),
            _ => None,
        };
        stream
            .tcp()
            .set_read_timeout(Some(cfg.idle_timeout))
            .map_err(control::ControlError::from)?;
        door.set_session(Keys {
            uuid: hello.uuid,
            nonce_r: c.nonce_r,
            nonce_s: c.hello.auth.as_ref().map_or([0; NONCE_LEN], |a| a.nonce),
        });
        // Resuming: the memory holds the session's pages by now.
        control::write_message(
            &mut stream,
            &Message::HelloOk {
                proof,
                fresh: false,
            },
        )?;
        info!(peer = %c.peer, "post-copy: control connection resumed");
        *control = stream;
        return Ok(());
    }
}

/// Runs of pages still missing, per block, as `PostcopyPages` messages.
fn missing_runs(placer: &Placer<'_>) -> Vec<Message> {
    let mut msgs = Vec::new();
    let ps = placer.ps as u64;
    for (b, bits) in placer.present.iter().enumerate() {
        let n = placer.mem.block(b).map_or(0, |blk| blk.len() as u64 / ps);
        let mut runs = Vec::new();
        let mut start: Option<u64> = None;
        for p in 0..=n {
            let missing = p < n && !bits.get(p);
            match (missing, start) {
                (true, None) => start = Some(p),
                (false, Some(s0)) => {
                    runs.push((s0 * ps, p - s0));
                    start = None;
                }
                _ => {}
            }
        }
        for chunk in runs.chunks(control::MAX_POSTCOPY_RUNS) {
            msgs.push(Message::PostcopyPages {
                block: b as u32,
                runs: chunk.to_vec(),
            });
        }
    }
    msgs
}

/// The destination's post-copy phase, run by the receiver's control loop when `Postcopy`
/// arrives. Returns once every page is placed and `PostcopyDone` is sent.
pub(crate) fn run(
    door: &mut Door,
    control: &mut Conn,
    args: DestArgs<'_>,
    announced: &Announced,
    background: u16,
) -> Result<PostcopyStats, SessionError> {
    let span = info_span!("postcopy-recv");
    let _g = span.enter();
    let switched = Instant::now();
    let DestArgs {
        memory,
        hello,
        cfg,
        hook,
        state,
    } = args;
    let first_id = hello.channels as u32;
    if background == 0 || background > MAX_BACKGROUND || first_id + 1 + background as u32 > 256 {
        return Err(SessionError::Handshake(format!(
            "postcopy: {background} background connections (1..={MAX_BACKGROUND}, channel ids below 256)"
        )));
    }
    let ps = hello.page_size as usize;
    // 1. The announced pages become missing; every other page is present.
    let present: Vec<AtomicBitmap> = memory
        .blocks()
        .iter()
        .map(|b| AtomicBitmap::new((b.len() / ps) as u64, true))
        .collect();
    let mut to_place = 0u64;
    for &(b, off, n) in &announced.runs {
        let (Some(block), Some(bits)) = (memory.block(b), present.get(b)) else {
            continue; // validated in Announced::add
        };
        for p in off / ps as u64..off / ps as u64 + n {
            if bits.clear(p) {
                to_place += 1;
            }
        }
        let Some(ptr) = block.range_ptr(off, n as usize * ps) else {
            continue;
        };
        // SAFETY: inside the block (range_ptr checked); the sender resends these pages, so
        // their current contents are not needed, and no channel writes them any more (the
        // pre-copy channels have closed).
        unsafe { discard(ptr, n as usize * ps) }.map_err(PostcopyError::from)?;
    }
    // 2. Register every block.
    let uffd = Uffd::new().map_err(PostcopyError::from)?;
    for b in memory.blocks() {
        // SAFETY: the block stays mapped while `memory` lives (which outlives the uffd, or
        // the uffd is leaked on failure); its missing pages are exactly the announced ones,
        // which this function places before it returns successfully.
        unsafe { uffd.register(b.as_ptr(), b.len()) }.map_err(PostcopyError::from)?;
    }
    // 3. The urgent and background connections (the sender opens them after this).
    control::write_message(control, &Message::PostcopyReady)?;
    let idle = cfg.idle_timeout;
    let streams = accept_connections(door, first_id, background, idle)?;
    info!(pages = to_place, background, "post-copy: guest may run");

    let placer = Placer {
        uffd: &uffd,
        mem: memory,
        ps,
        present,
        placed: AtomicU64::new(0),
        to_place,
        requested: Mutex::new(HashMap::new()),
        latency: Mutex::new(Latencies::default()),
        done: Condvar::new(),
        done_lock: Mutex::new(()),
        stop: AtomicBool::new(false),
        failed: AtomicBool::new(false),
        error: Mutex::new(None),
        faults: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        pages_urgent: AtomicU64::new(0),
        pages_background: AtomicU64::new(0),
        duplicates: AtomicU64::new(0),
        wire_bytes: AtomicU64::new(0),
        sockets: Mutex::new(Vec::new()),
        requests_out: Mutex::new(None),
        broken: AtomicBool::new(false),
        wakeup: Wakeup::new().map_err(|e| SessionError::Internal(format!("eventfd: {e}")))?,
    };
    let streams = install(&placer, streams)?;
    let blocks: Vec<BlockSpec> = memory
        .blocks()
        .iter()
        .map(|b| BlockSpec {
            name: b.name().into(),
            size: b.len() as u64,
        })
        .collect();
    let ppp = hello.pages_per_packet;
    let placer_ref = &placer;
    let blocks_ref = &blocks[..];
    let cpus = &cfg.postcopy_cpus;
    let framing = hello.compression;
    let mut reconnects = 0u32;
    let mut lost = false;
    let mut lost_closed = false;
    let result = std::thread::scope(|s| {
        let spawn_receivers = |streams: Vec<ReadHalf>| {
            let mut handles = Vec::new();
            for (i, stream) in streams.into_iter().enumerate() {
                let urgent = i == 0;
                let h = threads::spawn_scoped(
                    s,
                    &cfg.threads,
                    ThreadRole::PostcopyRecv,
                    format!("pw-pc-recv-{i}"),
                    move || {
                        if let Err(e) =
                            receive(stream, placer_ref, blocks_ref, ppp, urgent, framing, cfg)
                        {
                            placer_ref.fail(e);
                        }
                    },
                );
                // A reader that could not start fails the phase (not a broken connection
                // to wait out).
                handles.push(h.map_err(|e| placer_ref.fail(e.into())));
            }
            handles
        };
        let mut receivers = spawn_receivers(streams);
        let faults = threads::spawn_scoped(
            s,
            &cfg.threads,
            ThreadRole::PostcopyFaults,
            "pw-pc-faults".into(),
            move || {
                if let Err(e) = serve_faults(placer_ref, cpus) {
                    placer_ref.fail(e);
                }
            },
        )
        .map_err(|e| placer_ref.fail(e.into()));
        if let Some(h) = &hook.0 {
            h(PostcopyStart {
                memory: memory.clone(),
                state: state.to_vec(),
                pages: to_place,
            });
        }
        let r = loop {
            let asked = match wait_placed(placer_ref, control, idle) {
                Ok(Waited::Placed) => break Ok(()),
                Ok(Waited::Broken { asked }) => asked,
                Ok(Waited::ControlLost { closed }) => {
                    lost = true;
                    lost_closed = closed;
                    false
                }
                Err(e) => break Err(e),
            };
            // The connections broke: keep every placed page (faulting threads keep
            // waiting), drop the connections, and let the sender replace them.
            reconnects += 1;
            if reconnects > super::source::MAX_RECONNECTS {
                break Err(PostcopyError::Protocol(format!(
                    "the post-copy connections broke {reconnects} times"
                ))
                .into());
            }
            placer_ref.broken.store(true, Ordering::SeqCst);
            placer_ref.shut_connections();
            for h in receivers.drain(..).flatten() {
                let _ = h.join();
            }
            placer_ref.broken.store(false, Ordering::SeqCst);
            let mut step = || -> Result<Vec<ReadHalf>, SessionError> {
                if !asked {
                    let mut resumed = false;
                    loop {
                        if lost {
                            // The control connection broke too: the sender comes back on a
                            // new one, authenticated like the first, naming this session.
                            let missing = placer_ref
                                .to_place
                                .saturating_sub(placer_ref.placed.load(Ordering::Acquire));
                            accept_resume(door, control, hello, cfg, lost_closed, missing)?;
                            resumed = true;
                            lost = false;
                        }
                        match control::read_message(control) {
                            Ok(Message::PostcopyReconnect) => break,
                            Ok(Message::Error { message }) => {
                                return Err(SessionError::Peer(message))
                            }
                            Ok(other) => {
                                return Err(SessionError::Unexpected {
                                    expected: "postcopy-reconnect",
                                    got: other.name(),
                                })
                            }
                            Err(e) if !resumed => {
                                warn!(error = %e, "post-copy: control connection broken");
                                lost = true;
                                lost_closed = peer_closed(&e);
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
                for m in missing_runs(placer_ref) {
                    control::write_message(control, &m)?;
                }
                control::write_message(control, &Message::PostcopyReady)?;
                let streams = accept_connections(door, first_id, background, idle)?;
                install(placer_ref, streams)
            };
            match step() {
                Ok(streams) => {
                    info!(reconnects, "post-copy: connections replaced");
                    receivers = spawn_receivers(streams);
                }
                Err(e) => break Err(e),
            }
        };
        let placed_at = switched.elapsed();
        // From here on a closing connection is the session's end, not a break.
        placer_ref.stop.store(true, Ordering::SeqCst);
        placer_ref.wakeup.wake();
        let r = r.and_then(|()| {
            // The source then closes the post-copy connections, which ends the receiving
            // threads.
            control::write_message(control, &Message::PostcopyDone).map_err(SessionError::from)
        });
        if r.is_err() {
            placer_ref.shut_connections();
        }
        for h in receivers.into_iter().flatten() {
            let _ = h.join();
        }
        if let Ok(h) = faults {
            let _ = h.join();
        }
        r.map(|()| placed_at)
    });
    let failed = result.is_err() || placer.failed.load(Ordering::SeqCst);
    let stats = PostcopyStats {
        pages: to_place,
        faults: placer.faults.load(Ordering::Relaxed),
        requests: placer.requests.load(Ordering::Relaxed),
        pages_urgent: placer.pages_urgent.load(Ordering::Relaxed),
        pages_background: placer.pages_background.load(Ordering::Relaxed),
        duplicates: placer.duplicates.load(Ordering::Relaxed),
        latency: placer.latency.lock().map(|l| l.clone()).unwrap_or_default(),
        seconds: result
            .as_ref()
            .map_or(switched.elapsed(), |t| *t)
            .as_secs_f64(),
        wire_bytes: placer.wire_bytes.load(Ordering::Relaxed),
        user_mode_only: uffd.user_mode_only(),
        reconnects,
    };
    let err = placer.error.lock().ok().and_then(|mut g| g.take());
    drop(placer);
    if failed {
        // Some pages never arrived. Keep the registration (leak the fd): a guest thread
        // touching a missing page keeps waiting instead of reading a zero-filled page.
        warn!("post-copy failed: guest memory stays registered; missing pages block their readers");
        std::mem::forget(uffd);
        return Err(match (result, err) {
            (Err(e), _) => e,
            (Ok(_), Some(e)) => e.into(),
            (Ok(_), None) => SessionError::Internal("post-copy failed".into()),
        });
    }
    info!(
        pages = stats.pages,
        requests = stats.requests,
        seconds = stats.seconds,
        "post-copy: every page placed"
    );
    Ok(stats)
}

/// How [`wait_placed`] ended.
enum Waited {
    /// Every page is placed.
    Placed,
    /// The post-copy connections broke (`asked`: the sender's `postcopy-reconnect` has
    /// already been read).
    Broken { asked: bool },
    /// The control connection broke (the post-copy connections are replaced as well).
    /// `closed`: by the source's end (EOF or reset), not by silence.
    ControlLost { closed: bool },
}

/// How long a source whose control connection closed (EOF or reset: its process closed it,
/// or died and its kernel did) has to come back before the destination gives it up. A source
/// that is alive and reachable reconnects at once; one whose network is down cannot anyway,
/// and a source that was killed never will: past this, the guest cannot continue.
pub const SOURCE_GONE_GRACE: Duration = Duration::from_millis(1500);

/// Whether a control connection's error is its peer closing it (EOF, reset), rather than a
/// silence or a local failure.
fn peer_closed(e: &control::ControlError) -> bool {
    match e {
        control::ControlError::Closed | control::ControlError::Truncated { .. } => true,
        control::ControlError::Io(io) => matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::UnexpectedEof
        ),
        _ => false,
    }
}

/// Wait until every page is placed, a thread fails, the connections break, the sender
/// reports an error or asks to reconnect on the control connection, or nothing arrives for
/// `idle`.
fn wait_placed(
    placer: &Placer<'_>,
    control: &mut Conn,
    idle: Duration,
) -> Result<Waited, SessionError> {
    let fd = control.tcp().as_raw_fd();
    let mut last = (u64::MAX, Instant::now());
    loop {
        if placer.failed.load(Ordering::SeqCst) {
            let e = placer.error.lock().ok().and_then(|mut g| g.take());
            return Err(e.map_or(
                SessionError::Internal("post-copy failed".into()),
                Into::into,
            ));
        }
        let placed = placer.placed.load(Ordering::Acquire);
        if placed >= placer.to_place {
            return Ok(Waited::Placed);
        }
        if placer.broken.load(Ordering::SeqCst) {
            return Ok(Waited::Broken { asked: false });
        }
        let bytes = placer.wire_bytes.load(Ordering::Relaxed);
        if bytes != last.0 {
            last = (bytes, Instant::now());
        } else if last.1.elapsed() > idle {
            return Err(SessionError::Timeout(format!(
                "post-copy: {} of {} pages placed and nothing arrived for {:.1} s",
                placed,
                placer.to_place,
                idle.as_secs_f64()
            )));
        }
        {
            let g = placer.done_lock.lock().unwrap_or_else(|p| p.into_inner());
            if placer.placed.load(Ordering::Acquire) < placer.to_place
                && !placer.broken.load(Ordering::SeqCst)
            {
                let _ = placer.done.wait_timeout(g, Duration::from_millis(50));
            }
        }
        if control.has_buffered()
            || net::wait_readable(fd, Duration::ZERO).map_err(control::ControlError::from)?
        {
            return match control::read_message(control) {
                Ok(Message::PostcopyReconnect) => Ok(Waited::Broken { asked: true }),
                Ok(Message::Error { message }) => Err(SessionError::Peer(message)),
                Ok(other) => Err(SessionError::Unexpected {
                    expected: "nothing during post-copy",
                    got: other.name(),
                }),
                Err(e) => {
                    warn!(error = %e, "post-copy: control connection broken");
                    Ok(Waited::ControlLost {
                        closed: peer_closed(&e),
                    })
                }
            };
        }
    }
}
