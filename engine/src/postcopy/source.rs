//! The source side of post-copy: serves page requests on the urgent connection and streams
//! the remaining pages on the background connections, nearest to the latest fault first.

use crate::threads::{self, Thread, ThreadRole};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pagewire_transport::control::{self, Message, MAX_POSTCOPY_RUNS};
use pagewire_transport::net;
use pagewire_transport::tls::{Conn, ReadHalf, WriteHalf};
use pagewire_transport::wire::{self, Compression, HeaderFields, InitPacket};
use tracing::{debug, info, info_span, warn};

use super::squeeze::Squeeze;
use super::{PageRequest, PostcopyError, MAX_BACKGROUND, REQUEST_LEN};
use crate::channel::limit::RateLimit;
use crate::codec::{is_zero_page, DeflateCompressor, PageCompressor};
use crate::config::Config;
use crate::error::SessionError;
use crate::memory::GuestRam;
use crate::pages::BlockPages;
use crate::session::greet::{greet, Greeting};
use crate::session::send::{Link, Precopied};
use crate::stats::SessionStats;
use crate::Sender;

/// Counters of the source side of post-copy.
#[derive(Clone, Debug, Default)]
pub struct PostcopySourceStats {
    /// Pre-copy rounds before the switch.
    pub precopy: SessionStats,
    /// Pages post-copy had to deliver.
    pub pages: u64,
    /// Pages sent on the background connections.
    pub pages_background: u64,
    /// Page requests served on the urgent connection.
    pub requests: u64,
    /// Pages sent on the urgent connection after a requested page, as its neighbours (a
    /// guest reading memory in order: see [`URGENT_NEIGHBOURS`]).
    pub pages_neighbours: u64,
    /// Bytes written on post-copy connections.
    pub wire_bytes: u64,
    /// Seconds from the switch until the destination reported every page placed.
    pub seconds: f64,
    /// Times the post-copy connections broke and were replaced.
    pub reconnects: u32,
}

/// Which pages still have to go, and where the background streams continue.
struct Sched {
    /// Per block: bit set = not sent yet.
    todo: Vec<Vec<u64>>,
    npages: Vec<u64>,
    /// (block, page) the background streams continue from.
    cursor: (usize, u64),
    left: u64,
}

impl Sched {
    /// Mark (block, page) sent (a request is being served); background continues after it.
    fn urgent(&mut self, block: usize, page: u64) {
        if let Some(w) = self
            .todo
            .get_mut(block)
            .and_then(|t| t.get_mut((page / 64) as usize))
        {
            let m = 1u64 << (page % 64);
            if *w & m != 0 {
                *w &= !m;
                self.left -= 1;
            }
        }
        self.cursor = (block, page + 1);
    }

    /// The unsent pages right after `page` in `block`, up to `max` and only as long as they
    /// run on without a gap (one placement at the destination), marked sent; the background
    /// streams continue after them. Their byte offsets into `out`.
    fn neighbours(
        &mut self,
        block: usize,
        page: u64,
        max: usize,
        page_size: u64,
        out: &mut Vec<u64>,
    ) {
        out.clear();
        let (Some(bits), Some(&n)) = (self.todo.get_mut(block), self.npages.get(block)) else {
            return;
        };
        let mut p = page + 1;
        while p < n && out.len() < max {
            let Some(w) = bits.get_mut((p / 64) as usize) else {
                break;
            };
            let m = 1u64 << (p % 64);
            if *w & m == 0 {
                break;
            }
            *w &= !m;
            self.left -= 1;
            out.push(p * page_size);
            p += 1;
        }
        if !out.is_empty() {
            self.cursor = (block, p);
        }
    }

    /// Up to `max` unsent pages of one block from the cursor on (wrapping), marked sent.
    fn next_batch(&mut self, max: usize, page_size: u64, out: &mut Vec<u64>) -> Option<usize> {
        out.clear();
        let nblocks = self.todo.len();
        let mut tried = 0;
        while self.left > 0 && tried <= nblocks {
            let (b, start) = self.cursor;
            let (Some(bits), Some(&n)) = (self.todo.get_mut(b), self.npages.get(b)) else {
                self.cursor = (0, 0);
                tried += 1;
                continue;
            };
            let mut p = start;
            while p < n && out.len() < max {
                let wi = (p / 64) as usize;
                let Some(w) = bits.get_mut(wi) else { break };
                let rest = *w >> (p % 64);
                if rest == 0 {
                    p = (wi as u64 + 1) * 64;
                    continue;
                }
                p += rest.trailing_zeros() as u64;
                if p >= n {
                    break;
                }
                *w &= !(1u64 << (p % 64));
                self.left -= 1;
                out.push(p * page_size);
                p += 1;
            }
            if !out.is_empty() {
                self.cursor = (b, p);
                return Some(b);
            }
            // This block is done from `start` on; the next one (wrapping to the start of
            // the blocks picks up pages before an earlier cursor jump).
            self.cursor = if b + 1 < nblocks { (b + 1, 0) } else { (0, 0) };
            if start == 0 {
                tried += 1;
            }
        }
        None
    }
}

struct Shared {
    sched: Mutex<Sched>,
    stop: AtomicBool,
    error: Mutex<Option<PostcopyError>>,
    requests: AtomicU64,
    pages_background: AtomicU64,
    pages_neighbours: AtomicU64,
    wire_bytes: AtomicU64,
    /// Bytes/s the background streams measure the link draining (0: not yet): the urgent
    /// connection's compression decision uses it.
    link_rate: AtomicU64,
    packet_num: AtomicU64,
    /// A post-copy connection broke (the session may reconnect).
    broken: AtomicBool,
    /// The session's bandwidth cap (`SenderConfig::max_bandwidth`), as in pre-copy, shared by the
    /// urgent and background connections; answers to page requests go first ([`pace`]).
    limit: Option<RateLimit>,
}

impl Shared {
    fn fail(&self, e: PostcopyError) {
        if let Ok(mut g) = self.error.lock() {
            if g.is_none() {
                *g = Some(e);
            }
        }
        self.stop.store(true, Ordering::SeqCst);
    }
    fn take_error(&self) -> Option<PostcopyError> {
        self.error.lock().ok().and_then(|mut g| g.take())
    }
}

/// The sending side of a session in post-copy. Made by [`Sender::switch_to_postcopy`].
pub struct PostcopySender {
    cfg: Config,
    control: Conn,
    shared: Arc<Shared>,
    urgent: Option<(TcpStream, Thread<()>)>,
    background: Vec<(TcpStream, Thread<()>)>,
    pages: u64,
    precopy: SessionStats,
    switched: Instant,
    mem: Arc<GuestRam>,
    link: Link,
    reconnects: u32,
}

impl std::fmt::Debug for PostcopySender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostcopySender")
            .field("pages", &self.pages)
            .field("background", &self.background.len())
            .finish()
    }
}

impl Sender {
    /// Switch this session to post-copy after the pre-copy rounds sent so far (none: pure
    /// post-copy). `remaining` names, per block, the pages the destination does not hold
    /// with their current contents: pages never sent and pages dirtied since they were
    /// sent (`BlockPages::All` for pure post-copy). The guest must be paused here from now
    /// on; it resumes on the destination once this returns.
    ///
    /// The destination discards those pages, registers its memory with userfaultfd and may
    /// run the guest; this side serves its page requests and streams the rest. Call
    /// [`PostcopySender::finish`] to wait until every page is placed.
    pub fn switch_to_postcopy(
        self,
        remaining: Vec<(usize, BlockPages)>,
    ) -> Result<PostcopySender, SessionError> {
        let span = info_span!("postcopy-send");
        let _g = span.enter();
        // Check everything that can be refused before the pre-copy channels close.
        let ps = self.config().page_size as u64;
        let channels = self.config().channels;
        let background = channels.min(MAX_BACKGROUND);
        if channels as u32 + 1 + background as u32 > 256 {
            return Err(SessionError::Config(format!(
                "post-copy needs channel ids up to {}; at most 127 channels",
                channels as u32 + background as u32
            )));
        }
        let sched = build_sched(self.memory(), remaining, ps)?;
        let pre = self.close_precopy()?;
        let Precopied {
            cfg,
            mem,
            mut control,
            link,
            stats,
        } = pre;
        let switched = Instant::now();
        let pages = sched.left;
        // 1. Which pages will come, block by block, as runs.
        for (b, bits) in sched.todo.iter().enumerate() {
            let runs = runs_of(bits, sched.npages.get(b).copied().unwrap_or(0), ps);
            for chunk in runs.chunks(MAX_POSTCOPY_RUNS) {
                control::write_message(
                    &mut control,
                    &Message::PostcopyPages {
                        block: b as u32,
                        runs: chunk.to_vec(),
                    },
                )?;
            }
        }
        control::write_message(&mut control, &Message::Postcopy { background })?;
        // 2. The destination is ready (pages discarded, memory registered): only now open the
        //    post-copy connections, so that none can be taken for a pre-copy channel.
        match control::read_message(&mut control)? {
            Message::PostcopyReady => {}
            Message::Error { message } => return Err(SessionError::Peer(message)),
            other => {
                return Err(SessionError::Unexpected {
                    expected: "postcopy-ready",
                    got: other.name(),
                })
            }
        }
        // 3. The urgent connection, then the background connections.
        let mut conns = Vec::new();
        for i in 0..=background {
            let id = cfg.channels + i;
            conns.push(open(&link, &cfg, id)?);
        }
        info!(pages, background, "post-copy: destination ready");
        let shared = Arc::new(Shared {
            sched: Mutex::new(sched),
            stop: AtomicBool::new(false),
            error: Mutex::new(None),
            requests: AtomicU64::new(0),
            pages_background: AtomicU64::new(0),
            pages_neighbours: AtomicU64::new(0),
            link_rate: AtomicU64::new(0),
            wire_bytes: AtomicU64::new(0),
            packet_num: AtomicU64::new(0),
            broken: AtomicBool::new(false),
            limit: cfg
                .max_bandwidth
                .map(|rate| RateLimit::new(rate, Instant::now())),
        });
        let mut sender = PostcopySender {
            cfg,
            control,
            shared,
            urgent: None,
            background: Vec::new(),
            pages,
            precopy: stats,
            switched,
            mem,
            link,
            reconnects: 0,
        };
        sender.start(conns)?;
        Ok(sender)
    }
}

/// How often the post-copy connections may break and be replaced in one session.
pub const MAX_RECONNECTS: u32 = 3;

/// What a post-copy thread's error means: a broken connection can be replaced, anything
/// else (a refused request, an internal error) fails the session.
fn report(sh: &Shared, e: PostcopyError) {
    if sh.stop.load(Ordering::SeqCst) {
        return;
    }
    if matches!(e, PostcopyError::Io { .. }) {
        warn!(error = %e, "post-copy connection broken");
        sh.broken.store(true, Ordering::SeqCst);
    } else {
        sh.fail(e);
    }
}

impl PostcopySender {
    /// Start the urgent thread on `conns[0]` and a background thread on each other one.
    fn start(&mut self, conns: Vec<Conn>) -> Result<(), SessionError> {
        let hook = self.cfg.threads.clone();
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            threads::spawn(&hook, ThreadRole::PostcopySend, name, None, f)
        };
        for (i, conn) in conns.into_iter().enumerate() {
            let keep = conn.tcp().try_clone().map_err(net_err)?;
            let (r, w) = conn.split().map_err(net_err)?;
            let (m, sh, c) = (self.mem.clone(), self.shared.clone(), self.cfg.clone());
            if i == 0 {
                let h = spawn(
                    "pw-pc-urgent".into(),
                    Box::new(move || {
                        if let Err(e) = serve_requests(r, w, &m, &sh, &c) {
                            report(&sh, e);
                        }
                    }),
                )?;
                self.urgent = Some((keep, h));
            } else {
                let h = spawn(
                    format!("pw-pc-bg-{i}"),
                    Box::new(move || {
                        if let Err(e) = stream_background(w, &m, &sh, &c) {
                            report(&sh, e);
                        }
                    }),
                )?;
                self.background.push((keep, h));
            }
        }
        Ok(())
    }

    /// The post-copy connections broke: stop their threads, ask the destination which pages
    /// it still lacks, and carry on over new connections (authenticated like the first).
    fn reconnect(&mut self) -> Result<(), SessionError> {
        self.reconnects += 1;
        if self.reconnects > MAX_RECONNECTS {
            return Err(PostcopyError::Protocol(format!(
                "the post-copy connections broke {} times",
                self.reconnects
            ))
            .into());
        }
        self.shared.stop.store(true, Ordering::SeqCst);
        self.stop_threads();
        self.shared.stop.store(false, Ordering::SeqCst);
        self.shared.broken.store(false, Ordering::SeqCst);
        info!(attempt = self.reconnects, "post-copy: reconnecting");
        let missing = match self.missing_pages() {
            Ok(m) => m,
            // The control connection is gone too: resume it, then ask again.
            Err(SessionError::Control(e)) => {
                warn!(error = %e, "post-copy: control connection broken");
                self.resume_control()?;
                self.missing_pages()?
            }
            Err(e) => return Err(e),
        };
        if let Ok(mut sched) = self.shared.sched.lock() {
            for bits in sched.todo.iter_mut() {
                bits.iter_mut().for_each(|w| *w = 0);
            }
            let mut left = 0;
            for (b, first, n) in missing {
                if let Some(bits) = sched.todo.get_mut(b) {
                    for p in first..first + n {
                        if let Some(w) = bits.get_mut((p / 64) as usize) {
                            if *w & (1 << (p % 64)) == 0 {
                                *w |= 1 << (p % 64);
                                left += 1;
                            }
                        }
                    }
                }
            }
            sched.left = left;
        }
        let mut conns = Vec::new();
        let background = self.cfg.channels.min(MAX_BACKGROUND);
        for i in 0..=background {
            conns.push(open(&self.link, &self.cfg, self.cfg.channels + i)?);
        }
        self.start(conns)
    }

    /// Ask the destination which pages it still lacks (`postcopy-reconnect`, answered by
    /// `postcopy-pages` runs and `postcopy-ready`), each run checked against the guest.
    fn missing_pages(&mut self) -> Result<Vec<(usize, u64, u64)>, SessionError> {
        control::write_message(&mut self.control, &Message::PostcopyReconnect)?;
        let ps = self.cfg.page_size as u64;
        let mut missing: Vec<(usize, u64, u64)> = Vec::new();
        let limit = self.mem.total_len() / ps;
        loop {
            match control::read_message(&mut self.control)? {
                Message::PostcopyPages { block, runs } => {
                    let npages = self
                        .mem
                        .block(block as usize)
                        .map(|b| b.len() as u64 / ps)
                        .ok_or_else(|| {
                            PostcopyError::Protocol(format!(
                                "postcopy-pages from the destination: block {block} out of range"
                            ))
                        })?;
                    if (missing.len() + runs.len()) as u64 > limit {
                        return Err(PostcopyError::Protocol(
                            "postcopy-pages from the destination: more runs than pages".into(),
                        )
                        .into());
                    }
                    for (off, n) in runs {
                        if off % ps != 0
                            || n == 0
                            || (off / ps).checked_add(n).is_none_or(|e| e > npages)
                        {
                            return Err(PostcopyError::Protocol(format!(
                                "postcopy-pages from the destination: run of {n} pages at {off:#x} outside block {block}"
                            ))
                            .into());
                        }
                        missing.push((block as usize, off / ps, n));
                    }
                }
                Message::PostcopyReady => break,
                Message::Error { message } => return Err(SessionError::Peer(message)),
                other => {
                    return Err(SessionError::Unexpected {
                        expected: "postcopy-pages or postcopy-ready",
                        got: other.name(),
                    })
                }
            }
        }
        Ok(missing)
    }

    /// The control connection broke: open a new one to the same receiver and prove it is the
    /// same session (the hello again, with the session's uuid and, with a secret, a proof over
    /// the receiver's fresh nonce). The post-copy connections are replaced next.
    fn resume_control(&mut self) -> Result<(), SessionError> {
        info!("post-copy: control connection lost; resuming the session");
        let mut c =
            self.link
                .dialer
                .connect(self.link.addr, &self.cfg.socket, self.cfg.idle_timeout)?;
        c.tcp()
            .set_read_timeout(Some(self.cfg.idle_timeout))
            .map_err(control::ControlError::from)?;
        let greeted = greet(
            &mut c,
            self.cfg.secret.as_ref(),
            self.link.hello.clone(),
            Greeting::Resume,
        )?;
        self.control = c;
        self.link.nonce_r = greeted.nonce_r;
        self.link.nonce_s = greeted.nonce_s();
        Ok(())
    }

    /// Pages post-copy delivers.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Wait until the destination reports every page placed, then end the session. A bad
    /// page request or a broken connection fails it (and is reported to the destination).
    pub fn finish(mut self) -> Result<PostcopySourceStats, SessionError> {
        let r = self.wait_done();
        self.shared.stop.store(true, Ordering::SeqCst);
        self.stop_threads();
        if let Err(e) = r {
            let _ = control::write_message(
                &mut self.control,
                &Message::Error {
                    message: e.to_string(),
                },
            );
            return Err(e);
        }
        let seconds = self.switched.elapsed().as_secs_f64();
        crate::session::end_session(&mut self.control)?;
        Ok(PostcopySourceStats {
            precopy: std::mem::take(&mut self.precopy),
            pages: self.pages,
            pages_background: self.shared.pages_background.load(Ordering::Relaxed),
            pages_neighbours: self.shared.pages_neighbours.load(Ordering::Relaxed),
            requests: self.shared.requests.load(Ordering::Relaxed),
            wire_bytes: self.shared.wire_bytes.load(Ordering::Relaxed),
            seconds,
            reconnects: self.reconnects,
        })
    }

    fn wait_done(&mut self) -> Result<(), SessionError> {
        let idle = self.cfg.idle_timeout;
        let mut last = (u64::MAX, Instant::now());
        loop {
            if let Some(e) = self.shared.take_error() {
                return Err(e.into());
            }
            if self.shared.broken.load(Ordering::SeqCst) {
                self.reconnect()?;
                last = (u64::MAX, Instant::now());
                continue;
            }
            let moved = self.shared.wire_bytes.load(Ordering::Relaxed);
            if moved != last.0 {
                last = (moved, Instant::now());
            } else if last.1.elapsed() > idle {
                return Err(SessionError::Timeout(format!(
                    "post-copy: nothing sent and no completion for {:.1} s",
                    idle.as_secs_f64()
                )));
            }
            // The control connection's fd is read each turn: a resume replaces the
            // connection, and the old fd's number is reused by the next socket opened (the
            // new urgent connection), which a stale copy would poll instead. Decrypted bytes
            // waiting in user space are not on the socket.
            if !self.control.has_buffered()
                && !net::wait_readable(self.control.tcp().as_raw_fd(), Duration::from_millis(50))
                    .map_err(control::ControlError::from)?
            {
                continue;
            }
            let msg = match control::read_message(&mut self.control) {
                Ok(m) => m,
                Err(e) if self.reconnects < MAX_RECONNECTS => {
                    warn!(error = %e, "post-copy: control connection broken");
                    self.resume_control()?;
                    self.reconnect()?;
                    last = (u64::MAX, Instant::now());
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            match msg {
                Message::PostcopyDone => {
                    debug!("destination placed every page");
                    return Ok(());
                }
                Message::Error { message } => return Err(SessionError::Peer(message)),
                other => {
                    return Err(SessionError::Unexpected {
                        expected: "postcopy-done",
                        got: other.name(),
                    })
                }
            }
        }
    }

    fn stop_threads(&mut self) {
        if let Some((s, h)) = self.urgent.take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
            if h.join().is_err() {
                warn!("post-copy urgent thread panicked");
            }
        }
        for (s, h) in std::mem::take(&mut self.background) {
            let _ = s.shutdown(std::net::Shutdown::Both);
            if h.join().is_err() {
                warn!("post-copy background thread panicked");
            }
        }
    }
}

impl Drop for PostcopySender {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.stop_threads();
    }
}

fn net_err(e: std::io::Error) -> SessionError {
    SessionError::Control(control::ControlError::Io(e))
}

/// Open one post-copy connection: TLS handshake (when the session has TLS), token (with a
/// secret) and init packet, like a channel.
fn open(link: &Link, cfg: &Config, id: u16) -> Result<Conn, SessionError> {
    let mut stream = link
        .dialer
        .connect(link.addr, &cfg.socket, cfg.idle_timeout)?;
    if let Some(secret) = &cfg.secret {
        let token = secret.channel_token(&link.nonce_r, &link.nonce_s, &link.uuid, id as u8);
        stream.write_all(&token).map_err(|e| {
            SessionError::Handshake(format!("post-copy connection {id}: sending its token: {e}"))
        })?;
    }
    let init = InitPacket {
        uuid: link.uuid,
        channel_id: id as u8,
    };
    stream.write_all(&init.encode()).map_err(|e| {
        SessionError::Handshake(format!(
            "post-copy connection {id}: sending init packet: {e}"
        ))
    })?;
    Ok(stream)
}

fn build_sched(
    mem: &GuestRam,
    remaining: Vec<(usize, BlockPages)>,
    ps: u64,
) -> Result<Sched, SessionError> {
    let npages: Vec<u64> = mem.blocks().iter().map(|b| b.len() as u64 / ps).collect();
    let mut todo: Vec<Vec<u64>> = npages
        .iter()
        .map(|&n| vec![0u64; n.div_ceil(64) as usize])
        .collect();
    let bad = |d: String| SessionError::Config(format!("post-copy pages: {d}"));
    for (b, sel) in remaining {
        let (Some(bits), Some(&n)) = (todo.get_mut(b), npages.get(b)) else {
            return Err(bad(format!("block {b} does not exist")));
        };
        let mut set = |p: u64| {
            if let Some(w) = bits.get_mut((p / 64) as usize) {
                *w |= 1 << (p % 64);
            }
        };
        match sel {
            BlockPages::All => (0..n).for_each(&mut set),
            BlockPages::Offsets(v) => {
                for o in v {
                    if o % ps != 0 || o / ps >= n {
                        return Err(bad(format!("offset {o:#x} not a page of block {b}")));
                    }
                    set(o / ps);
                }
            }
            BlockPages::Bitmap(words) => {
                for (wi, &w) in words.iter().enumerate() {
                    let mut bits = w;
                    while bits != 0 {
                        let p = wi as u64 * 64 + bits.trailing_zeros() as u64;
                        if p < n {
                            set(p);
                        }
                        bits &= bits - 1;
                    }
                }
            }
        }
    }
    let left = todo.iter().flatten().map(|w| w.count_ones() as u64).sum();
    Ok(Sched {
        todo,
        npages,
        cursor: (0, 0),
        left,
    })
}

/// Runs of set bits as (first page offset, page count).
fn runs_of(bits: &[u64], n: u64, ps: u64) -> Vec<(u64, u64)> {
    let mut runs = Vec::new();
    let mut start: Option<u64> = None;
    for p in 0..=n {
        let on = p < n
            && bits
                .get((p / 64) as usize)
                .is_some_and(|w| w >> (p % 64) & 1 == 1);
        match (on, start) {
            (true, None) => start = Some(p),
            (false, Some(s)) => {
                runs.push((s * ps, p - s));
                start = None;
            }
            _ => {}
        }
    }
    runs
}

/// The bytes of one page of the (paused) source guest.
fn page(mem: &GuestRam, block: usize, off: u64, ps: usize) -> Option<&[u8]> {
    let p = mem.block(block)?.range_ptr(off, ps)?;
    // SAFETY: inside the block (range_ptr checked), mapped while `mem` lives. In post-copy the
    // guest is paused on the source, so nothing writes the page while the slice lives.
    Some(unsafe { std::slice::from_raw_parts(p, ps) })
}

/// Writes the packets of one post-copy connection: raw in a session without compression;
/// otherwise in the qpl framing (a length per normal page, then each page DEFLATE or raw),
/// each packet compressed or not as [`Squeeze`] decides.
struct Packer {
    squeeze: Squeeze,
    /// The urgent connection: its link rate is the one the background streams measure.
    urgent: bool,
    hdr: Vec<u8>,
    zip: Option<Zip>,
}

/// A compressing connection's compressor and buffers.
struct Zip {
    compressor: DeflateCompressor,
    /// Compressed pages, back to back.
    out: Vec<u8>,
    lens: Vec<u32>,
    len_bytes: Vec<u8>,
}

impl Packer {
    fn new(cfg: &Config, urgent: bool) -> Result<Packer, PostcopyError> {
        let squeeze = Squeeze::new(cfg.codec, cfg.max_bandwidth, !urgent);
        let ppp = cfg.pages_per_packet as usize;
        let zip = if squeeze.framed() {
            Some(Zip {
                compressor: DeflateCompressor::new(cfg.level)
                    .map_err(|e| PostcopyError::Protocol(format!("post-copy compressor: {e}")))?,
                out: vec![0u8; ppp * cfg.page_size as usize],
                lens: Vec::with_capacity(ppp),
                len_bytes: Vec::with_capacity(4 * ppp),
            })
        } else {
            None
        };
        Ok(Packer {
            squeeze,
            urgent,
            hdr: vec![0u8; wire::header_len(cfg.pages_per_packet)],
            zip,
        })
    }

    /// Write one packet of the pages at offsets `batch` of `block` (zero pages as such).
    /// Waits for the session's cap first ([`pace`]; `whole`: a background packet).
    /// `Ok(false)` when the session stopped meanwhile (nothing written).
    #[allow(clippy::too_many_arguments)] // the packet's pages and the connection
    fn send(
        &mut self,
        stream: &mut WriteHalf,
        shared: &Shared,
        cfg: &Config,
        mem: &GuestRam,
        block: usize,
        batch: &[u64],
        whole: bool,
    ) -> std::io::Result<bool> {
        let ps = cfg.page_size as usize;
        let Some(name) = mem.block(block).map(|b| b.name()) else {
            return Ok(true);
        };
        // Normal pages first (with their bytes), then zero pages: the header's order.
        let mut offs: Vec<u64> = Vec::with_capacity(batch.len());
        let mut zero: Vec<u64> = Vec::new();
        let mut pages: Vec<&[u8]> = Vec::with_capacity(batch.len());
        for &off in batch {
            let Some(data) = page(mem, block, off, ps) else {
                continue;
            };
            if is_zero_page(data) {
                zero.push(off);
            } else {
                offs.push(off);
                pages.push(data);
            }
        }
        let normal = offs.len();
        offs.extend_from_slice(&zero);
        let mut fields = HeaderFields {
            flags: Compression::None.flag(),
            pages_alloc: cfg.pages_per_packet,
            normal_pages: normal as u32,
            next_packet_size: (pages.len() * ps) as u32,
            packet_num: 0,
            zero_pages: zero.len() as u32,
        };
        let mut pieces: Vec<&[u8]> = Vec::with_capacity(2 + pages.len());
        let total;
        match self.zip.as_mut() {
            None => {
                total = (self.hdr.len() + pages.len() * ps) as u64;
                pieces.extend_from_slice(&pages);
            }
            Some(zip) => {
                if self.urgent {
                    let rate = shared.link_rate.load(Ordering::Relaxed);
                    self.squeeze.set_link(rate as f64);
                }
                let compress = self.squeeze.compress_next() && !pages.is_empty();
                // The compressor's own cost: this thread's CPU time (a loaded host's
                // preemptions would make it look slower than it is).
                let cpu = crate::stats::thread_cpu_seconds();
                zip.lens.clear();
                let mut used = 0usize;
                for data in &pages {
                    let z = match (compress, zip.out.get_mut(used..used + ps - 1)) {
                        (true, Some(out)) => zip.compressor.compress(data, out),
                        _ => None,
                    };
                    match z {
                        Some(n) => {
                            zip.lens.push(n as u32);
                            used += n;
                        }
                        None => zip.lens.push(ps as u32),
                    }
                }
                let body: u64 = zip.lens.iter().map(|&l| u64::from(l)).sum();
                if compress {
                    let took = (crate::stats::thread_cpu_seconds() - cpu).max(0.0);
                    self.squeeze.compressed(
                        (pages.len() * ps) as u64,
                        body,
                        Duration::from_secs_f64(took),
                    );
                } else {
                    self.squeeze.sent_raw();
                }
                zip.len_bytes.resize(4 * zip.lens.len(), 0);
                wire::encode_zlens(&mut zip.len_bytes, &zip.lens);
                fields.flags = Compression::Qpl.flag();
                fields.next_packet_size = (zip.len_bytes.len() as u64 + body) as u32;
                total = self.hdr.len() as u64 + zip.len_bytes.len() as u64 + body;
                pieces.push(&zip.len_bytes);
                let mut at = 0usize;
                for (data, &len) in pages.iter().zip(zip.lens.iter()) {
                    let len = len as usize;
                    if len == ps {
                        pieces.push(data);
                    } else if let Some(z) = zip.out.get(at..at + len) {
                        pieces.push(z);
                        at += len;
                    }
                }
            }
        }
        let t = Instant::now();
        if !pace(shared, total, whole) {
            return Ok(false);
        }
        fields.packet_num = shared.packet_num.fetch_add(1, Ordering::Relaxed);
        wire::encode_header(&mut self.hdr, &fields, name, &offs);
        pieces.insert(0, &self.hdr);
        stream.write_pieces(&pieces)?;
        self.squeeze.wrote(total, t.elapsed());
        if !self.urgent {
            if let Some(rate) = self.squeeze.link() {
                shared.link_rate.store(rate as u64, Ordering::Relaxed);
            }
        }
        shared.wire_bytes.fetch_add(total, Ordering::Relaxed);
        Ok(true)
    }
}

/// Wait until the session's cap (`SenderConfig::max_bandwidth`; none: no wait) lets `bytes` go.
/// Background packets (`whole`) wait until the bucket holds all of them and so never put it
/// in debt: an answer to a page request waits only for the answers before it, when the
/// guest's faults alone fill the link. False when the session stops meanwhile.
fn pace(shared: &Shared, bytes: u64, whole: bool) -> bool {
    let Some(limit) = &shared.limit else {
        return true;
    };
    loop {
        let now = Instant::now();
        let r = if whole {
            limit.take_whole(bytes, now)
        } else {
            limit.take(bytes, now)
        };
        let Err(wait) = r else { return true };
        if shared.stop.load(Ordering::SeqCst) {
            return false;
        }
        std::thread::sleep(wait.min(Duration::from_millis(10)));
    }
}

/// Most pages sent after a requested page as its neighbours, in a packet of their own right
/// after the page's (so the requested page never waits for them): 15 pages, 60 KiB, about
/// 50 µs of a 10 Gbit/s link before the next answer.
pub const URGENT_NEIGHBOURS: usize = 15;

/// A request at most this many pages after the previous one in the same block shows a guest
/// reading in order, and its answer brings [`URGENT_NEIGHBOURS`] neighbours; a guest jumping
/// about gets its pages alone (neighbours would only delay its next answer).
pub const NEIGHBOUR_WINDOW: u64 = 4 * URGENT_NEIGHBOURS as u64;

/// The urgent connection: read page requests, validate each, answer each with its page and,
/// for a guest reading in order, its unsent neighbours.
fn serve_requests(
    mut requests: ReadHalf,
    mut stream: WriteHalf,
    mem: &GuestRam,
    shared: &Shared,
    cfg: &Config,
) -> Result<(), PostcopyError> {
    super::fault_path_thread(&cfg.postcopy_cpus);
    let ps = cfg.page_size as usize;
    let sizes: Vec<u64> = mem.blocks().iter().map(|b| b.len() as u64).collect();
    let mut packer = Packer::new(cfg, true)?;
    let mut req = [0u8; REQUEST_LEN];
    let io = |e| super::conn_error("urgent connection", e);
    let mut index = 0u64;
    let mut last: Option<(usize, u64)> = None;
    let mut near = Vec::new();
    loop {
        let mut got = 0;
        while got < REQUEST_LEN {
            match requests.read(&mut req[got..]) {
                // The destination never closes this connection first: outside the session's
                // end (when the stop flag makes this moot) it means the connection broke.
                Ok(0) if got == 0 => return Err(io(std::io::ErrorKind::UnexpectedEof.into())),
                Ok(0) => {
                    return Err(PostcopyError::Protocol(format!(
                        "urgent connection closed inside page request #{index}"
                    )))
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io(e)),
            }
        }
        let (block, off) = PageRequest::decode(&req, &sizes, cfg.page_size)
            .map_err(|detail| PostcopyError::BadRequest { index, detail })?;
        index += 1;
        let page_index = off / ps as u64;
        let in_order = last.is_some_and(|(b, p)| {
            b == block && page_index > p && page_index - p <= NEIGHBOUR_WINDOW
        });
        last = Some((block, page_index));
        if let Ok(mut s) = shared.sched.lock() {
            s.urgent(block, page_index);
            if in_order {
                s.neighbours(block, page_index, URGENT_NEIGHBOURS, ps as u64, &mut near);
            } else {
                near.clear();
            }
        }
        let sent = packer.send(&mut stream, shared, cfg, mem, block, &[off], false);
        if !sent.map_err(io)? {
            return Ok(());
        }
        shared.requests.fetch_add(1, Ordering::Relaxed);
        if near.is_empty() {
            continue;
        }
        // The neighbours (one run of `block`), in a packet of their own.
        let sent = packer.send(&mut stream, shared, cfg, mem, block, &near, false);
        if !sent.map_err(io)? {
            return Ok(());
        }
        shared
            .pages_neighbours
            .fetch_add(near.len() as u64, Ordering::Relaxed);
    }
}

/// A background connection: packets of the pages nobody asked for yet, until none is left.
fn stream_background(
    mut stream: WriteHalf,
    mem: &GuestRam,
    shared: &Shared,
    cfg: &Config,
) -> Result<(), PostcopyError> {
    super::background_thread(&cfg.postcopy_cpus);
    let ps = cfg.page_size as usize;
    let ppp = cfg.pages_per_packet as usize;
    let mut packer = Packer::new(cfg, false)?;
    let mut batch = Vec::new();
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        let block = match shared.sched.lock() {
            Ok(mut s) => s.next_batch(ppp, ps as u64, &mut batch),
            Err(_) => None,
        };
        let Some(block) = block else { break };
        let sent = packer
            .send(&mut stream, shared, cfg, mem, block, &batch, true)
            .map_err(|e| super::conn_error("background connection", e))?;
        if !sent {
            // Stopped: the batch is not lost; a reconnect asks the destination what it lacks.
            return Ok(());
        }
        shared
            .pages_background
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
    }
    let _ = stream.tcp().shutdown(std::net::Shutdown::Write);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    fn sched(n: u64, set: &[u64]) -> Sched {
        let mut bits = vec![0u64; n.div_ceil(64) as usize];
        for &p in set {
            bits[(p / 64) as usize] |= 1 << (p % 64);
        }
        Sched {
            todo: vec![bits],
            npages: vec![n],
            cursor: (0, 0),
            left: set.len() as u64,
        }
    }

    #[test]
    fn background_follows_the_latest_fault_and_covers_everything_once() {
        let all: Vec<u64> = (0..300).collect();
        let mut s = sched(300, &all);
        let mut out = Vec::new();
        assert_eq!(s.next_batch(4, 1, &mut out), Some(0));
        assert_eq!(out, [0, 1, 2, 3]);
        s.urgent(0, 200);
        assert_eq!(s.next_batch(4, 1, &mut out), Some(0));
        assert_eq!(out, [201, 202, 203, 204], "continues after the fault");
        let mut seen: Vec<u64> = vec![0, 1, 2, 3, 200, 201, 202, 203, 204];
        while s.next_batch(7, 1, &mut out).is_some() {
            seen.extend_from_slice(&out);
        }
        seen.sort_unstable();
        assert_eq!(seen, all, "every page exactly once");
        assert_eq!(s.left, 0);
    }

    #[test]
    fn neighbours_are_the_unsent_run_after_the_page_and_never_sent_twice() {
        let set: Vec<u64> = (0..100).filter(|&p| p != 30).collect();
        let mut s = sched(100, &set);
        let mut near = Vec::new();
        s.urgent(0, 10);
        s.neighbours(0, 10, 15, 1, &mut near);
        assert_eq!(
            near,
            (11..26).collect::<Vec<_>>(),
            "15 pages after the fault"
        );
        assert_eq!(s.left, 99 - 1 - 15);
        s.urgent(0, 26);
        s.neighbours(0, 26, 15, 1, &mut near);
        assert_eq!(near, [27, 28, 29], "the run stops at a page already sent");
        let mut out = Vec::new();
        assert_eq!(s.next_batch(4, 1, &mut out), Some(0));
        assert_eq!(out, [31, 32, 33, 34], "the background continues after them");
        s.neighbours(0, 98, 15, 1, &mut near);
        assert_eq!(near, [99], "the run stops at the end of the block");
        s.neighbours(0, 12, 15, 1, &mut near);
        assert!(near.is_empty(), "sent pages are not sent again");
        let mut seen = vec![10, 26, 99, 27, 28, 29, 31, 32, 33, 34];
        seen.extend(11..26);
        while s.next_batch(7, 1, &mut out).is_some() {
            seen.extend_from_slice(&out);
        }
        seen.sort_unstable();
        assert_eq!(seen, set, "every page exactly once");
    }

    #[test]
    fn runs_cover_set_bits() {
        let s = sched(130, &[0, 1, 2, 64, 65, 129]);
        assert_eq!(
            runs_of(&s.todo[0], 130, 4096),
            [(0, 3), (64 * 4096, 2), (129 * 4096, 1)]
        );
    }
}
