//! The sending side of a session: control connection, N channel threads, rounds.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use pagewire_transport::control::{self, Hello, Message};
use pagewire_transport::net;
use pagewire_transport::wire::{BlockSpec, Compression, InitPacket};
use tracing::{debug, info, info_span, warn};

use crate::accel::software::SoftwareDeflate;
use crate::accel::Accelerator;
use crate::channel::limit::RateLimit;
use crate::channel::send::{SendChannel, SendSettings};
use crate::codec::CodecKind;
use crate::config::{Config, SenderConfig, ZeroCopy, ZERO_COPY_AUTO_MIN};
use crate::error::{ChannelError, SessionError};
use crate::memory::GuestRam;
use crate::pages::RoundPages;
use crate::session::greet::{greet, Greeting};
use crate::session::tls::Dialer;
use crate::stats::{thread_cpu_seconds, ChannelStats, Progress, SessionStats};
use crate::threads::{self, Thread, ThreadRole};
use pagewire_transport::tls::Conn;

/// Largest device state one [`Sender::send_state`] call carries (one control frame).
pub const MAX_STATE: usize = control::MAX_FRAME - 1;

enum Cmd {
    Round(Arc<RoundPages>),
}

type Reply = (u16, Result<ChannelStats, ChannelError>);

struct Worker {
    tx: mpsc::Sender<Cmd>,
    handle: Thread<()>,
}

/// Stops a running session from another thread.
#[derive(Clone, Debug)]
pub struct AbortHandle {
    /// Channels must stop (set by abort() and by any failure).
    flag: Arc<AtomicBool>,
    /// abort() was called by the user.
    user: Arc<AtomicBool>,
    /// Control connection first, then the channels.
    sockets: Arc<Mutex<Vec<TcpStream>>>,
}

impl AbortHandle {
    fn new() -> AbortHandle {
        AbortHandle {
            flag: Arc::new(AtomicBool::new(false)),
            user: Arc::new(AtomicBool::new(false)),
            sockets: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Stop every channel promptly: the running round fails with [`SessionError::Aborted`],
    /// and the destination is told the source abandoned the migration
    /// ([`SessionError::Abandoned`] there) by the thread that runs the round (or by dropping
    /// the [`Sender`], between rounds).
    pub fn abort(&self) {
        self.user.store(true, Ordering::SeqCst);
        self.stop(1);
    }

    /// Whether abort was called.
    pub fn is_aborted(&self) -> bool {
        self.user.load(Ordering::SeqCst)
    }

    /// Set the stop flag and shut down the sockets from index `from` on (1: keep the control
    /// connection open to read the receiver's error).
    fn stop(&self, from: usize) {
        self.flag.store(true, Ordering::SeqCst);
        if let Ok(socks) = self.sockets.lock() {
            for s in socks.iter().skip(from) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// The sending side of a migration session.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use pagewire::{GuestRam, Block, Sender, SenderConfig, RoundPages};
/// let ram = Block::anonymous("pc.ram", 64 << 20)?;
/// let mem = Arc::new(GuestRam::new(vec![ram])?);
/// let mut sender = Sender::connect("127.0.0.1:4444".parse()?, SenderConfig::default(), mem.clone())?;
/// sender.send_round(RoundPages::all(&[64 << 20], 4096, 128))?;
/// let stats = sender.finish()?;
/// println!("{:.2} GB/s", stats.gbps());
/// # Ok(()) }
/// ```
pub struct Sender {
    cfg: Config,
    /// As the embedder gave them.
    settings: SenderConfig,
    mem: Arc<GuestRam>,
    control: Conn,
    workers: Vec<Worker>,
    replies: mpsc::Receiver<Reply>,
    progress: Arc<Progress>,
    abort: AbortHandle,
    totals: Vec<ChannelStats>,
    rounds: u64,
    /// The receiver's memory was all zero and unwritten at the start (hello-ok): the first
    /// round leaves out the pages known never written.
    receiver_fresh: bool,
    started: Instant,
    failed: bool,
    /// What post-copy needs to open more connections of this session.
    link: Link,
}

/// The session's identity, for connections opened after the handshake (post-copy).
#[derive(Clone)]
pub(crate) struct Link {
    pub addr: SocketAddr,
    pub uuid: [u8; 16],
    pub nonce_r: [u8; control::NONCE_LEN],
    /// The sender's hello nonce (zero without a secret): channel tokens cover it too.
    pub nonce_s: [u8; control::NONCE_LEN],
    /// The session's hello without its proof (a resumed control connection repeats it).
    pub hello: Hello,
    /// Opens connections as the session's first ones were (TLS handshake, if configured).
    pub dialer: Dialer,
}

/// A sender whose pre-copy channels have closed cleanly (see `Sender::close_precopy`).
pub(crate) struct Precopied {
    pub cfg: Config,
    pub mem: Arc<GuestRam>,
    pub control: Conn,
    pub link: Link,
    pub stats: SessionStats,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("rounds", &self.rounds)
            .field("channels", &self.workers.len())
            .finish()
    }
}

impl Sender {
    /// Connect to a receiver at `addr`: control connection, hello, then `cfg.channels`
    /// channel connections each opened by its init packet; one engine thread per channel.
    pub fn connect(
        addr: SocketAddr,
        cfg: SenderConfig,
        mem: Arc<GuestRam>,
    ) -> Result<Sender, SessionError> {
        let session = cfg.session();
        let engines = (0..cfg.channels)
            .map(|_| engine_for(&session))
            .collect::<Result<Vec<_>, _>>()?;
        Sender::open(addr, cfg, session, mem, engines)
    }

    /// Like [`Sender::connect`], with the page-compression engine of each channel given by
    /// the caller (`engines[i]` for channel i; `None` sends every page raw): how the tests
    /// inject faults. Not part of the API.
    #[doc(hidden)]
    pub fn connect_with_engines(
        addr: SocketAddr,
        settings: SenderConfig,
        mem: Arc<GuestRam>,
        engines: Vec<Option<Box<dyn Accelerator>>>,
    ) -> Result<Sender, SessionError> {
        let session = settings.session();
        Sender::open(addr, settings, session, mem, engines)
    }

    /// Connect with `settings` as the embedder gave them and `cfg`, the session's settings
    /// made of them.
    fn open(
        addr: SocketAddr,
        settings: SenderConfig,
        cfg: Config,
        mem: Arc<GuestRam>,
        engines: Vec<Option<Box<dyn Accelerator>>>,
    ) -> Result<Sender, SessionError> {
        let span = info_span!("send", %addr);
        let _g = span.enter();
        validate_config(&cfg)?;
        mem.check_page_size(cfg.page_size)?;
        if engines.len() != cfg.channels as usize {
            return Err(SessionError::Config(format!(
                "{} compression engines for {} channels",
                engines.len(),
                cfg.channels
            )));
        }
        let mut engines = engines.into_iter();
        let compression = match cfg.codec {
            CodecKind::None => Compression::None,
            CodecKind::Deflate | CodecKind::Qpl | CodecKind::Auto => Compression::Qpl,
        };
        // The VM's identity when the embedder gives one; otherwise a random one per session.
        let uuid = match cfg.vm_uuid {
            Some(u) => u,
            None => {
                let mut u = [0u8; 16];
                getrandom::fill(&mut u)
                    .map_err(|e| SessionError::Internal(format!("random uuid: {e}")))?;
                u
            }
        };
        let dialer = Dialer::new(&cfg, &addr)?;
        let mut control = dialer.connect(addr, &cfg.socket, cfg.idle_timeout)?;
        control
            .tcp()
            .set_read_timeout(Some(cfg.idle_timeout))
            .map_err(control::ControlError::from)?;
        let hello = Hello {
            uuid,
            page_size: cfg.page_size,
            pages_per_packet: cfg.pages_per_packet,
            compression,
            channels: cfg.channels,
            blocks: mem
                .blocks()
                .iter()
                .map(|b| BlockSpec {
                    name: b.name().into(),
                    size: b.len() as u64,
                })
                .collect(),
            auth: None,
            // Every channel opens with a SYNC (SendChannel::new queues it), as QEMU's does.
            opening_sync: true,
        };
        // A resumed control connection repeats the hello (with a fresh proof).
        let resume_hello = hello.clone();
        let greeting = Greeting::First {
            tls: cfg.tls.is_some(),
            idle_timeout: cfg.idle_timeout,
        };
        let greeted = greet(&mut control, cfg.secret.as_ref(), hello, greeting)?;
        let (nonce_r, nonce_s) = (greeted.nonce_r, greeted.nonce_s());
        let auth = greeted.auth;
        let receiver_fresh = greeted.fresh;
        info!(
            channels = cfg.channels,
            codec = cfg.codec.name(),
            memory = mem.total_len(),
            "session accepted"
        );

        let abort = AbortHandle::new();
        if let Ok(mut s) = abort.sockets.lock() {
            if let Ok(c) = control.tcp().try_clone() {
                s.push(c);
            }
        }
        let packet_num = Arc::new(AtomicU64::new(0));
        let progress = Arc::new(Progress::default());
        let limit = cfg
            .max_bandwidth
            .map(|rate| Arc::new(RateLimit::new(rate, Instant::now())));
        let (reply_tx, replies) = mpsc::channel::<Reply>();
        let mut workers = Vec::new();
        // Codec auto with qpl picked: deflate as the stronger rung (for the pages a slow link
        // waits for anyway).
        let ladder_picked =
            cfg.codec == CodecKind::Auto && crate::codec::auto_ladder(cfg.auto_compressor);
        for id in 0..cfg.channels {
            let mut stream = dialer.connect(addr, &cfg.socket, cfg.idle_timeout)?;
            if let Some((secret, nonce_s)) = &auth {
                let token = secret.channel_token(&nonce_r, nonce_s, &uuid, id as u8);
                std::io::Write::write_all(&mut stream, &token).map_err(|e| {
                    SessionError::Handshake(format!(
                        "channel {id}: sending its authentication token: {e}"
                    ))
                })?;
            }
            let init = InitPacket {
                uuid,
                channel_id: id as u8,
            };
            std::io::Write::write_all(&mut stream, &init.encode()).map_err(|e| {
                SessionError::Handshake(format!("channel {id}: sending init packet: {e}"))
            })?;
            if let (Ok(mut s), Ok(c)) = (abort.sockets.lock(), stream.tcp().try_clone()) {
                s.push(c);
            }
            let compressor = engines.next().flatten();
            let compressor_name = compressor.as_ref().map(|e| e.name());
            if let Some(e) = &compressor {
                info!(channel = id, engine = e.name(), "compression engine");
            }
            let zero_copy_min = match cfg.zero_copy {
                ZeroCopy::Off => None,
                ZeroCopy::On => Some(0),
                // Zero copy pays only for large sends, and loopback copies anyway.
                ZeroCopy::Auto if net::is_loopback(&addr) => None,
                ZeroCopy::Auto => Some(ZERO_COPY_AUTO_MIN),
            };
            let set = SendSettings {
                zero_copy_min,
                skip_incompressible: cfg.skip_incompressible,
                adaptive: cfg.codec == CodecKind::Auto,
                limit: limit.clone(),
                link_share: limit
                    .as_ref()
                    .map(|l| l.rate() / f64::from(cfg.channels.max(1))),
                find_holes: cfg.find_holes,
                page_size: cfg.page_size,
                pages_per_packet: cfg.pages_per_packet,
                compression,
                depth: cfg.depth,
                idle_timeout: cfg.idle_timeout,
            };
            let (stream, stage) = crate::channel::stage::for_sending(stream);
            let mut chan = SendChannel::new(id, stream, set, compressor, packet_num.clone())?
                .with_stage(stage);
            if ladder_picked && compressor_name.is_some_and(|n| n != "deflate") {
                chan = chan.with_strong(Box::new(SoftwareDeflate::new(cfg.level)?));
            }
            let (tx, rx) = mpsc::channel::<Cmd>();
            let reply = reply_tx.clone();
            let mem = mem.clone();
            let progress = progress.clone();
            let flag = abort.flag.clone();
            let pinning = cfg.pinning.clone();
            let handle = threads::spawn(
                &cfg.threads,
                ThreadRole::SendChannel,
                format!("pw-send-{id}"),
                None,
                move || channel_thread(chan, rx, reply, mem, progress, flag, pinning),
            )?;
            workers.push(Worker { tx, handle });
        }
        Ok(Sender {
            cfg,
            settings,
            mem,
            control,
            workers,
            replies,
            progress,
            abort,
            totals: Vec::new(),
            rounds: 0,
            receiver_fresh,
            started: Instant::now(),
            failed: false,
            link: Link {
                addr,
                uuid,
                nonce_r,
                nonce_s,
                hello: resume_hello,
                dialer,
            },
        })
    }

    /// Close the pre-copy channels cleanly (every round was acknowledged) and hand over what
    /// post-copy needs.
    pub(crate) fn close_precopy(mut self) -> Result<Precopied, SessionError> {
        if self.failed {
            return Err(SessionError::Config("session already failed".into()));
        }
        // The control connection goes to post-copy; what stays behind is a handle of its
        // socket that nothing writes (the session is marked failed, its workers are gone).
        let placeholder = self
            .control
            .tcp()
            .try_clone()
            .map_err(|e| SessionError::Control(control::ControlError::Io(e)))?;
        let control = std::mem::replace(&mut self.control, Conn::Clear(placeholder));
        self.failed = true;
        if let Ok(socks) = self.abort.sockets.lock() {
            for s in socks.iter().skip(1) {
                let _ = s.shutdown(std::net::Shutdown::Write);
            }
        }
        for w in std::mem::take(&mut self.workers) {
            drop(w.tx);
            if w.handle.join().is_err() {
                warn!("a channel thread panicked while stopping");
            }
        }
        let totals = std::mem::take(&mut self.totals);
        Ok(Precopied {
            cfg: self.cfg.clone(),
            mem: self.mem.clone(),
            control,
            link: self.link.clone(),
            stats: SessionStats::sum(totals, self.rounds, self.started.elapsed().as_secs_f64()),
        })
    }

    /// Live counters.
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// A handle that stops the session from another thread.
    pub fn abort_handle(&self) -> AbortHandle {
        self.abort.clone()
    }

    /// The guest memory being sent.
    pub fn memory(&self) -> &Arc<GuestRam> {
        &self.mem
    }

    /// The session's settings.
    pub fn config(&self) -> &SenderConfig {
        &self.settings
    }

    /// Send one round: the channels share `pages` (each takes packet-sized batches until none
    /// are left), each ends with a SYNC, and the call returns when the receiver reports every
    /// page of the round applied. Returns the round's counters.
    pub fn send_round(&mut self, pages: RoundPages) -> Result<SessionStats, SessionError> {
        if self.failed {
            return Err(SessionError::Config("session already failed".into()));
        }
        let round = self.rounds + 1;
        let span = info_span!("round", round);
        let _g = span.enter();
        let t0 = Instant::now();
        let mut pages = pages;
        // Nothing was sent before the first round: where the receiver's memory is all zero,
        // a page never written on this side is already right there.
        pages.set_skip_unwritten(round == 1 && self.receiver_fresh);
        let pages = Arc::new(pages);
        debug!(pages = pages.pages(), "round starts");
        for w in &self.workers {
            if w.tx.send(Cmd::Round(pages.clone())).is_err() {
                return Err(self.fail(SessionError::Internal("channel thread gone".into())));
            }
        }
        let mut per_channel = vec![ChannelStats::default(); self.workers.len()];
        let mut first_err: Option<ChannelError> = None;
        for _ in 0..self.workers.len() {
            match self.replies.recv() {
                Ok((id, Ok(s))) => {
                    if let Some(slot) = per_channel.get_mut(id as usize) {
                        *slot = s;
                    }
                }
                Ok((_, Err(e))) => {
                    if first_err.is_none() {
                        // Stop the other channels now rather than after their rounds.
                        self.abort.stop(1);
                        first_err = Some(e);
                    }
                }
                Err(_) => {
                    return Err(self.fail(SessionError::Internal("channel thread died".into())))
                }
            }
        }
        // A file truncated under its mapping: its missing pages were sent as zeros (holes past
        // the end) or failed the channel (EFAULT). Either way the round is not the guest's
        // memory; say why to both ends instead of a symptom.
        if let Err(e) = self.mem.check_files() {
            let err = SessionError::Memory(e);
            let _ = control::write_message(
                &mut self.control,
                &Message::Error {
                    message: format!("the sender failed: {err}"),
                },
            );
            self.failed = true;
            self.abort.stop(1);
            return Err(err);
        }
        if let Some(e) = first_err {
            let err = if self.abort.is_aborted() {
                SessionError::Aborted
            } else {
                e.into()
            };
            return Err(self.fail(err));
        }
        if let Err(e) = control::write_message(&mut self.control, &Message::RoundEnd { round }) {
            return Err(self.fail(e.into()));
        }
        match control::read_message(&mut self.control) {
            Ok(Message::RoundDone { round: r }) if r == round => {}
            Ok(Message::Error { message }) => return Err(self.fail(SessionError::Peer(message))),
            Ok(other) => {
                return Err(self.fail(SessionError::Unexpected {
                    expected: "round-done",
                    got: other.name(),
                }))
            }
            Err(e) => return Err(self.fail(e.into())),
        }
        self.rounds = round;
        let delta: Vec<ChannelStats> = per_channel
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let prev = self.totals.get(i).cloned().unwrap_or_default();
                s.since(&prev)
            })
            .collect();
        self.totals = per_channel;
        let stats = SessionStats::sum(delta, 1, t0.elapsed().as_secs_f64());
        info!(
            pages = stats.total.memory_bytes / self.cfg.page_size as u64,
            seconds = stats.seconds,
            gbps = stats.gbps(),
            "round done"
        );
        Ok(stats)
    }

    /// Record a failure: stop the channels and prefer the receiver's own account of what went
    /// wrong (an Error message on the control connection) over our symptom.
    fn fail(&mut self, err: SessionError) -> SessionError {
        self.failed = true;
        self.abort.stop(1);
        if self.abort.is_aborted() {
            self.tell_abandoned("the source aborted the migration");
            return SessionError::Aborted;
        }
        if matches!(err, SessionError::Peer(_)) {
            return err;
        }
        super::peer_last_word(&mut self.control, |m| match m {
            Message::Error { message } => Some(SessionError::Peer(message)),
            _ => None,
        })
        .unwrap_or(err)
    }

    /// Send opaque device state (vCPU registers, device models: whatever the destination VMM
    /// needs to resume) over the control connection, in order with the rounds: call it after
    /// the last round, before [`Sender::finish`]. At most [`MAX_STATE`] bytes per call.
    pub fn send_state(&mut self, data: &[u8]) -> Result<(), SessionError> {
        if self.failed {
            return Err(SessionError::Config("session already failed".into()));
        }
        if data.len() > MAX_STATE {
            return Err(SessionError::Config(format!(
                "device state of {} bytes (limit {MAX_STATE})",
                data.len()
            )));
        }
        control::write_message(
            &mut self.control,
            &Message::State {
                data: data.to_vec(),
            },
        )?;
        Ok(())
    }

    /// Abandon the migration: tell the destination (which fails its session with
    /// [`SessionError::Abandoned`], `reason` included, rather than a network error), then
    /// close the session. The guest keeps running here; call it when the VMM gives up
    /// converging or its user cancels. (Dropping an unfinished `Sender` does the same with a
    /// generic reason; [`AbortHandle::abort`] from another thread too.)
    pub fn abandon(mut self, reason: &str) {
        if !self.failed {
            self.tell_abandoned(reason);
        }
    }

    /// Best effort: `Abandon` on the control connection (bounded by a short write timeout),
    /// then wait briefly for the destination to close it, so it reads the message before it
    /// sees the channels close. Marks the session failed (nothing more is sent).
    fn tell_abandoned(&mut self, reason: &str) {
        self.failed = true;
        let _ = self
            .control
            .tcp()
            .set_write_timeout(Some(super::LAST_WORD_WAIT));
        let sent = control::write_message(
            &mut self.control,
            &Message::Abandon {
                reason: reason.into(),
            },
        );
        if sent.is_err() {
            return;
        }
        info!(reason, "migration abandoned; the destination was told");
        // Until it closes: then it has read the message.
        super::peer_last_word(&mut self.control, |_| None::<()>);
    }

    /// End the session: End on the control connection, wait for the receiver's EndOk (for as
    /// long as the receiver says it is still committing), close the channels. Returns the
    /// whole session's counters. `Ok` means the destination has every page and completed;
    /// [`SessionError::Unconfirmed`] that its answer was lost, so the outcome is unknown.
    pub fn finish(mut self) -> Result<SessionStats, SessionError> {
        if self.failed {
            return Err(SessionError::Config("session already failed".into()));
        }
        let t_end = Instant::now();
        // Close every channel (FIN after the last packet) before End: the receiver answers
        // EndOk once each channel has ended cleanly at a packet boundary.
        if let Ok(socks) = self.abort.sockets.lock() {
            for s in socks.iter().skip(1) {
                let _ = s.shutdown(std::net::Shutdown::Write);
            }
        }
        super::end_session(&mut self.control)?;
        let end_seconds = t_end.elapsed().as_secs_f64();
        let seconds = self.started.elapsed().as_secs_f64();
        let workers = std::mem::take(&mut self.workers);
        for w in workers {
            drop(w.tx);
            if w.handle.join().is_err() {
                warn!("a channel thread panicked while stopping");
            }
        }
        let totals = std::mem::take(&mut self.totals);
        let mut stats = SessionStats::sum(totals, self.rounds, seconds);
        stats.end_seconds = end_seconds;
        Ok(stats)
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        // Unfinished session (error or early drop): stop channels, let threads exit. Dropped
        // before finishing and not failed: the destination is told the source gave up.
        if !self.workers.is_empty() && !self.failed {
            self.tell_abandoned(if self.abort.is_aborted() {
                "the source aborted the migration"
            } else {
                "the source dropped the session before finishing it"
            });
        }
        if !self.workers.is_empty() {
            self.abort.stop(0);
            for w in std::mem::take(&mut self.workers) {
                drop(w.tx);
                let _ = w.handle.join();
            }
        }
    }
}

fn channel_thread(
    mut chan: SendChannel,
    rx: mpsc::Receiver<Cmd>,
    reply: mpsc::Sender<Reply>,
    mem: Arc<GuestRam>,
    progress: Arc<Progress>,
    abort: Arc<AtomicBool>,
    pinning: crate::pin::Pinning,
) {
    let id = chan.stats().channel;
    let span = info_span!("channel", id);
    let _g = span.enter();
    crate::pin::apply(&pinning, id);
    let cpu0 = thread_cpu_seconds();
    while let Ok(Cmd::Round(pages)) = rx.recv() {
        let res = chan.run_round(&mem, &pages, &progress, &abort);
        chan.set_cpu_seconds(thread_cpu_seconds() - cpu0);
        let failed = res.is_err();
        let _ = reply.send((id, res.map(|()| chan.stats().clone())));
        if failed {
            chan.shutdown();
            break;
        }
    }
}

/// The page-compression engine `cfg` asks for (one per channel).
pub fn engine_for(cfg: &Config) -> Result<Option<Box<dyn Accelerator>>, SessionError> {
    Ok(match cfg.codec {
        CodecKind::None => None,
        CodecKind::Deflate => Some(Box::new(SoftwareDeflate::new(cfg.level)?)),
        CodecKind::Qpl => {
            let mut s = cfg.qpl;
            s.hw_jobs = cfg.pages_per_packet as usize;
            Some(crate::accel::qpl::compressor(s)?)
        }
        // The compressor behind auto: qpl where libqpl loads (or when asked for), else deflate.
        CodecKind::Auto => match crate::codec::resolve_auto(cfg.auto_compressor).0 {
            CodecKind::Qpl => {
                let mut s = cfg.qpl;
                s.hw_jobs = cfg.pages_per_packet as usize;
                Some(crate::accel::qpl::compressor(s)?)
            }
            _ => Some(Box::new(SoftwareDeflate::new(cfg.level)?)),
        },
    })
}

pub(crate) fn validate_config(cfg: &Config) -> Result<(), SessionError> {
    if !cfg.page_size.is_power_of_two() || !(512..=65536).contains(&cfg.page_size) {
        return Err(SessionError::Config(format!(
            "page size {} is not a power of two in 512..=65536",
            cfg.page_size
        )));
    }
    if cfg.pages_per_packet == 0 || cfg.pages_per_packet > 1000 {
        return Err(SessionError::Config(format!(
            "pages per packet {} not in 1..=1000",
            cfg.pages_per_packet
        )));
    }
    if cfg.channels == 0 || cfg.channels > control::MAX_CHANNELS {
        return Err(SessionError::Config(format!(
            "channels {} not in 1..={}",
            cfg.channels,
            control::MAX_CHANNELS
        )));
    }
    if cfg.max_bandwidth == Some(0) {
        return Err(SessionError::Config(
            "max bandwidth 0: give a positive rate, or no cap".into(),
        ));
    }
    if cfg.depth == 0 || cfg.depth > 64 {
        return Err(SessionError::Config(format!(
            "depth {} not in 1..=64",
            cfg.depth
        )));
    }
    Ok(())
}
