//! The receiving side of a session: accept the control connection and the channels, run one
//! receiving engine thread per channel, and enforce the round barrier.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use pagewire_transport::control::{self, Hello, Message};
use pagewire_transport::net;
use pagewire_transport::tls::Conn;

use crate::threads::{self, ThreadRole};
use pagewire_transport::wire::{BlockSpec, Compression};
use tracing::{debug, info, info_span, warn};

use crate::channel::recv::{RecvChannel, RecvSettings, RoundGate};
use crate::codec::{DeflateDecompressor, PageDecompressor};
use crate::config::{Config, Decoder, ReceiverConfig};
use crate::error::{ChannelErrorKind, SessionError};
use crate::fresh::FreshMap;
use crate::memory::GuestRam;
use crate::postcopy::dest::{Announced, DestArgs};
use crate::postcopy::{PostcopyHook, PostcopyStart, PostcopyStats};
use crate::session::handshake::{self, Door, Keys, Rejection};
use crate::stats::{thread_cpu_seconds, Progress, SessionStats};

/// Most device-state bytes one session may carry.
pub const MAX_STATE_TOTAL: usize = 16 << 20;

/// Where a receiver puts the pages.
#[derive(Debug)]
pub enum ReceiveInto {
    /// Anonymous memory laid out as the sender's hello says (bounded by `ReceiverConfig::max_memory`).
    Allocate,
    /// The embedding VMM's memory; the hello's layout must match it (same names and sizes).
    Memory(Arc<GuestRam>),
}

/// What a finished session leaves.
#[derive(Debug)]
pub struct Received {
    /// The guest memory, now holding the sender's pages.
    pub memory: Arc<GuestRam>,
    /// Counters.
    pub stats: SessionStats,
    /// The session's uuid.
    pub uuid: [u8; 16],
    /// Device state the sender sent ([`crate::Sender::send_state`]), in order.
    pub state: Vec<Vec<u8>>,
    /// Post-copy counters, when the sender switched to post-copy.
    pub postcopy: Option<Box<PostcopyStats>>,
}

/// The receiving side of a migration: listens, then serves one session at a time.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use pagewire::{ReceiverConfig, Receiver, ReceiveInto};
/// let receiver = Receiver::bind("127.0.0.1:4444".parse()?, ReceiverConfig::default())?;
/// let done = receiver.serve(ReceiveInto::Allocate)?;
/// println!("{} bytes in {:.2} s", done.stats.total.memory_bytes, done.stats.seconds);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Receiver {
    listener: TcpListener,
    cfg: Config,
    progress: Arc<Progress>,
    accept_timeout: Option<Duration>,
    watch: Arc<Mutex<Option<mpsc::Sender<Rejection>>>>,
    postcopy_hook: PostcopyHook,
}

/// How long [`Receiver::serve`] waits for a session to start unless told otherwise
/// ([`Receiver::set_accept_timeout`]).
pub const DEFAULT_ACCEPT_TIMEOUT: Duration = Duration::from_secs(600);

/// A session that failed on a network symptom (a channel reset, a closed connection) may
/// have been abandoned by the source, which says so on the control connection before it
/// closes the channels: read what is there (briefly) and prefer its word.
fn abandoned(control: &mut Conn, e: SessionError) -> SessionError {
    if matches!(
        e,
        SessionError::Abandoned { .. } | SessionError::Peer(_) | SessionError::Commit(_)
    ) {
        return e;
    }
    super::peer_last_word(control, |m| match m {
        Message::Abandon { reason } => Some(SessionError::Abandoned { reason }),
        _ => None,
    })
    .unwrap_or(e)
}

/// What the control loop needs to run post-copy.
struct PostcopyCtx<'a> {
    door: &'a mut Door,
    hello: &'a Hello,
    memory: &'a Arc<GuestRam>,
    announced: Announced,
    stats: Option<Box<PostcopyStats>>,
}

impl Receiver {
    /// Listen on `addr`.
    pub fn bind(addr: SocketAddr, cfg: ReceiverConfig) -> Result<Receiver, SessionError> {
        let cfg = cfg.session();
        let listener = net::listen(addr)?;
        Ok(Receiver {
            listener,
            cfg,
            progress: Arc::new(Progress::default()),
            accept_timeout: Some(DEFAULT_ACCEPT_TIMEOUT),
            watch: Arc::new(Mutex::new(None)),
            postcopy_hook: PostcopyHook::default(),
        })
    }

    /// Called when the sender switches to post-copy ([`crate::Sender::switch_to_postcopy`]):
    /// guest memory is registered with userfaultfd and the guest may run on it at once
    /// (start it from the callback, e.g. by signalling the VMM's thread; do not block in it).
    /// A page the guest touches before it has arrived is fetched first; `serve` returns once
    /// every page is placed.
    pub fn on_postcopy(&mut self, f: impl Fn(PostcopyStart) + Send + Sync + 'static) {
        self.postcopy_hook = PostcopyHook(Some(Arc::new(f)));
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, SessionError> {
        self.listener.local_addr().map_err(|source| {
            SessionError::Net(net::NetError::Accept {
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                source,
            })
        })
    }

    /// Give up if no sender's session starts within `t` ([`SessionError::NoSession`] or a
    /// timeout); `None` waits indefinitely. Default: [`DEFAULT_ACCEPT_TIMEOUT`] (10 minutes),
    /// so a destination whose source never comes does not hold its memory for ever.
    pub fn set_accept_timeout(&mut self, t: Option<Duration>) {
        self.accept_timeout = t;
    }

    /// Connections refused before they joined a session (bad handshake, wrong secret, a hello
    /// that does not fit, strangers on the channel phase), as they happen. Each is also logged.
    pub fn watch_rejections(&self) -> mpsc::Receiver<Rejection> {
        let (tx, rx) = mpsc::channel();
        if let Ok(mut w) = self.watch.lock() {
            *w = Some(tx);
        }
        rx
    }

    /// Live counters of the session being served.
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// Serve one session: hello, channels, rounds, end. Returns once the sender has ended the
    /// session and every page is in memory, or with the first error (which is also sent to
    /// the sender).
    pub fn serve(&self, into: ReceiveInto) -> Result<Received, SessionError> {
        self.serve_and_commit(into, |_, _| Ok(()))
    }

    /// [`Receiver::serve`], with a last step before the sender is told the session completed:
    /// once every page is in memory and the sender has ended the session, `commit` runs with
    /// the memory and the device state (write the memory out, load the state, start the
    /// guest's devices...). Only when it returns `Ok` does the sender's
    /// [`Sender::finish`](crate::Sender::finish) return `Ok`; an error is sent to the sender
    /// (its `finish` fails with it) and returned here as [`SessionError::Commit`]. While it
    /// runs the sender is told every third of the idle timeout that the destination is still
    /// committing, so `commit` may take longer than the idle timeout (writing a large image).
    pub fn serve_and_commit<F>(
        &self,
        into: ReceiveInto,
        commit: F,
    ) -> Result<Received, SessionError>
    where
        F: FnOnce(&GuestRam, &[Vec<u8>]) -> Result<(), CommitError> + Send,
    {
        let mut commit = Some(commit);
        let span = info_span!("recv");
        let _g = span.enter();
        let wait = self
            .accept_timeout
            .unwrap_or(Duration::from_secs(365 * 24 * 3600));
        let deadline = Instant::now() + wait;
        let local = self
            .listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        self.listener.set_nonblocking(true).map_err(|source| {
            SessionError::Net(net::NetError::Accept {
                addr: local,
                source,
            })
        })?;
        let mut door = Door::open(&self.listener, &self.cfg, self.watch.clone())?;
        // 1. A control connection that authenticated and whose hello fits this receiver.
        //    Anything else is refused (one logged line) and the receiver keeps waiting.
        let (mut control, peer, nonce_r, hello, memory) = loop {
            let c = match door.next_control(deadline) {
                Ok(c) => c,
                Err(e) => return Err(no_session(e, wait, &door)),
            };
            let mut stream = c.stream;
            match self.check_hello(&c.hello, &into) {
                Ok(m) => break (stream, c.peer, c.nonce_r, c.hello, m),
                Err(e) => door.refuse(c.peer, &mut stream, e),
            }
        };
        info!(%peer, tls = control.is_tls(), "control connection");
        if !control.is_tls() && !net::is_loopback(&peer) {
            warn!(
                %peer,
                "{}: guest memory arrives from {peer} in clear text{}",
                crate::session::tls::CLEAR_BECAUSE,
                if self.cfg.secret.is_some() {
                    " (the shared secret authenticates the peers but encrypts nothing)"
                } else {
                    ""
                }
            );
        }
        let proof = match (&self.cfg.secret, &hello.auth) {
            (Some(sec), Some(a)) => Some(sec.receiver_proof(&nonce_r, &a.nonce, &hello.uuid)),
            _ => None,
        };
        control
            .tcp()
            .set_read_timeout(Some(self.cfg.idle_timeout))
            .map_err(control::ControlError::from)?;
        // Channels may connect as soon as the sender reads hello-ok.
        door.set_session(Keys {
            uuid: hello.uuid,
            nonce_r,
            nonce_s: hello
                .auth
                .as_ref()
                .map_or([0; control::NONCE_LEN], |a| a.nonce),
        });
        // Memory this receiver mapped itself is all zero and unwritten.
        let fresh = matches!(into, ReceiveInto::Allocate);
        control::write_message(&mut control, &Message::HelloOk { proof, fresh })?;
        info!(
            channels = hello.channels,
            page_size = hello.page_size,
            compression = hello.compression.name(),
            memory = memory.total_len(),
            "hello accepted"
        );

        // 2. Its channels. Strangers are refused as above; a connection that knows the
        //    session (uuid, token) but breaks a rule ends the session.
        let streams = match self.accept_channels(&mut door, &hello) {
            Ok(s) => s,
            Err(e) => return Err(reject(&mut control, e)),
        };
        let blocks: Vec<BlockSpec> = memory
            .blocks()
            .iter()
            .map(|b| BlockSpec {
                name: b.name().into(),
                size: b.len() as u64,
            })
            .collect();
        let set = RecvSettings {
            page_size: hello.page_size,
            pages_per_packet: hello.pages_per_packet,
            compression: hello.compression,
            blocks,
            idle_timeout: self.cfg.idle_timeout,
            registered_buffers: self.cfg.registered_buffers,
            // Memory this receiver mapped itself is all zero until a packet writes it.
            fresh: matches!(into, ReceiveInto::Allocate)
                .then(|| Arc::new(FreshMap::new(&memory, hello.page_size, self.cfg.max_memory))),
            opening_sync: hello.opening_sync,
        };
        let gate = Gate::new(hello.channels, &streams, &control);
        let started = Instant::now();
        let mut chans = Vec::with_capacity(streams.len());
        for (id, stream) in streams.into_iter().enumerate() {
            let decoder = match decoder_for(self.cfg.decoder) {
                Ok(d) => d,
                Err(e) => return Err(reject(&mut control, e)),
            };
            let (stream, stage) = crate::channel::recv::for_receiving(stream);
            match RecvChannel::new(id as u16, stream, set.clone(), memory.clone(), decoder) {
                Ok(c) => chans.push(c.with_tls(stage)),
                Err(e) => return Err(reject(&mut control, e.into())),
            }
        }

        let progress = &self.progress;
        let gate_ref = &gate;
        let mut states: Vec<Vec<u8>> = Vec::new();
        let mut pc = PostcopyCtx {
            door: &mut door,
            hello: &hello,
            memory: &memory,
            announced: Announced::default(),
            stats: None,
        };
        let (result, stats) = std::thread::scope(|s| {
            let handles: Vec<_> = chans
                .into_iter()
                .map(|mut chan| {
                    let id = chan.stats().channel;
                    threads::spawn_scoped(
                        s,
                        &self.cfg.threads,
                        ThreadRole::RecvChannel,
                        format!("pw-recv-{id}"),
                        move || {
                            let span = info_span!("channel", id);
                            let _g = span.enter();
                            crate::pin::apply(&self.cfg.pinning, id);
                            let cpu0 = thread_cpu_seconds();
                            let res = chan.run(gate_ref, progress);
                            chan.set_cpu_seconds(thread_cpu_seconds() - cpu0);
                            if let Err(e) = res {
                                if !matches!(e.kind, ChannelErrorKind::Aborted) {
                                    gate_ref.fail(e.into());
                                }
                            }
                            chan.stats().clone()
                        },
                    )
                })
                .collect();
            // A channel that could not start (its hook failed) fails the session: the others
            // are told through the gate and end.
            let handles: Vec<_> = handles
                .into_iter()
                .filter_map(|h| h.map_err(|e| gate_ref.fail(e.into())).ok())
                .collect();
            let control_result =
                self.control_loop(&mut control, gate_ref, &mut states, &mut pc, &mut commit);
            if let Err(e) = control_result {
                gate_ref.fail(e);
            }
            let mut stats = Vec::new();
            for h in handles {
                match h.join() {
                    Ok(st) => stats.push(st),
                    Err(_) => {
                        gate_ref.fail(SessionError::Internal("a channel thread panicked".into()))
                    }
                }
            }
            (gate_ref.take_error(), stats)
        });
        let postcopy_stats = pc.stats.take();
        let result = result.map(|e| abandoned(&mut control, e));
        match result {
            Some(e) => {
                let msg = e.to_string();
                debug!(error = %msg, "session failed");
                let _ = control::write_message(&mut control, &Message::Error { message: msg });
                Err(e)
            }
            None => {
                let rounds = gate.completed();
                Ok(Received {
                    memory,
                    stats: SessionStats::sum(stats, rounds, started.elapsed().as_secs_f64()),
                    uuid: hello.uuid,
                    state: states,
                    postcopy: postcopy_stats,
                })
            }
        }
    }

    fn check_hello(
        &self,
        hello: &Hello,
        into: &ReceiveInto,
    ) -> Result<Arc<GuestRam>, SessionError> {
        if let Some(mine) = &self.cfg.vm_uuid {
            if *mine != hello.uuid {
                return Err(SessionError::Handshake(format!(
                    "the sender migrates VM {} but this receiver expects VM {}",
                    crate::config::format_uuid(&hello.uuid),
                    crate::config::format_uuid(mine)
                )));
            }
        }
        if !matches!(hello.compression, Compression::None | Compression::Qpl) {
            return Err(SessionError::Handshake(format!(
                "compression {} is not supported (pagewire decodes none and qpl framing)",
                hello.compression.name()
            )));
        }
        let layout: Vec<(String, u64)> = hello
            .blocks
            .iter()
            .map(|b| (b.name.clone(), b.size))
            .collect();
        match into {
            ReceiveInto::Allocate => {
                // Pages never written cost nothing (mapped MAP_NORESERVE, never faulted in):
                // `max_memory` bounds what the session commits (counted page by page as data
                // lands), and the guest's size only the map's bookkeeping (a bit per page).
                let max = self.cfg.max_memory;
                let bound = if self.cfg.prealloc {
                    max
                } else {
                    max.saturating_mul(crate::config::MAX_SIZE_PER_COMMITTED)
                };
                let mem = GuestRam::anonymous(&layout, bound).map_err(|e| match e {
                    crate::memory::MemoryError::TooLarge { requested, .. } => {
                        SessionError::Handshake(if self.cfg.prealloc {
                            format!(
                                "the sender's guest memory is {requested} bytes, over this receiver's max_memory of {max} bytes (prealloc commits all of it)"
                            )
                        } else {
                            format!(
                                "the sender's guest memory is {requested} bytes, over {bound} bytes, the most this receiver maps ({} x its max_memory of {max} bytes)",
                                crate::config::MAX_SIZE_PER_COMMITTED
                            )
                        })
                    }
                    e => e.into(),
                })?;
                if self.cfg.prealloc {
                    let t = std::time::Instant::now();
                    for b in mem.blocks() {
                        b.populate().map_err(|e| {
                            SessionError::Internal(format!(
                                "prealloc: populating block '{}' ({} bytes): {e}",
                                b.name(),
                                b.len()
                            ))
                        })?;
                    }
                    tracing::info!(
                        bytes = mem.total_len(),
                        seconds = t.elapsed().as_secs_f64(),
                        "destination memory populated (prealloc)"
                    );
                }
                Ok(Arc::new(mem))
            }
            ReceiveInto::Memory(mem) => {
                for b in &hello.blocks {
                    match mem.find(&b.name).and_then(|i| mem.block(i)) {
                        Some(mine) if mine.len() as u64 == b.size && mine.is_writable() => {}
                        Some(mine) if !mine.is_writable() => {
                            return Err(SessionError::Handshake(format!(
                                "block '{}' is read-only here",
                                b.name
                            )))
                        }
                        Some(mine) => {
                            return Err(SessionError::Handshake(format!(
                                "block '{}' is {} bytes on the sender but {} here",
                                b.name,
                                b.size,
                                mine.len()
                            )))
                        }
                        None => {
                            return Err(SessionError::Handshake(format!(
                                "block '{}' does not exist here",
                                b.name
                            )))
                        }
                    }
                }
                if mem.blocks().len() != hello.blocks.len() {
                    return Err(SessionError::Handshake(format!(
                        "sender has {} memory blocks, this receiver {}",
                        hello.blocks.len(),
                        mem.blocks().len()
                    )));
                }
                Ok(mem.clone())
            }
        }
    }

    /// Accept `hello.channels` channel connections; return the streams ordered by channel id.
    fn accept_channels(&self, door: &mut Door, hello: &Hello) -> Result<Vec<Conn>, SessionError> {
        let n = hello.channels as usize;
        let mut slots: Vec<Option<Conn>> = (0..n).map(|_| None).collect();
        let deadline = Instant::now() + self.cfg.idle_timeout;
        for got in 0..n {
            let c = door.next_channel(deadline).map_err(|e| match e {
                SessionError::Net(net::NetError::AcceptTimeout { .. }) => {
                    SessionError::Timeout(format!(
                        "only {got} of {n} channels connected within {:.1} s",
                        self.cfg.idle_timeout.as_secs_f64()
                    ))
                }
                other => other,
            })?;
            let peer = c.peer;
            c.init
                .check(&hello.uuid, n as u32)
                .map_err(|source| SessionError::Init {
                    peer: peer.to_string(),
                    source,
                })?;
            let slot = slots.get_mut(c.init.channel_id as usize).ok_or_else(|| {
                SessionError::Handshake(format!(
                    "channel connection from {peer}: channel id {} out of range",
                    c.init.channel_id
                ))
            })?;
            if slot.is_some() {
                return Err(SessionError::Init {
                    peer: peer.to_string(),
                    source: pagewire_transport::wire::WireError::Invalid {
                        field: pagewire_transport::wire::Field::ChannelId,
                        detail: format!("channel {} connected twice", c.init.channel_id),
                    },
                });
            }
            debug!(channel = c.init.channel_id, %peer, "channel connected");
            *slot = Some(c.stream);
        }
        Ok(slots.into_iter().flatten().collect())
    }

    fn control_loop<F>(
        &self,
        control: &mut Conn,
        gate: &Gate,
        states: &mut Vec<Vec<u8>>,
        pc: &mut PostcopyCtx<'_>,
        commit: &mut Option<F>,
    ) -> Result<(), SessionError>
    where
        F: FnOnce(&GuestRam, &[Vec<u8>]) -> Result<(), CommitError> + Send,
    {
        // Rounds can take long, so the control connection may be silent for as long as the
        // channels make progress (their idle timeouts bound a stalled sender). Once a channel
        // has closed, the sender owes its End within the idle timeout. A failing channel shuts
        // this socket's read side, which wakes the wait.
        let idle = self.cfg.idle_timeout;
        control
            .tcp()
            .set_read_timeout(Some(idle))
            .map_err(control::ControlError::from)?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(control.tcp());
        let mut last = 0u64;
        loop {
            loop {
                if gate.has_failed() {
                    return Ok(());
                }
                // A TLS record may hold more than the message just read.
                if control.has_buffered() {
                    break;
                }
                if net::wait_readable(fd, Duration::from_millis(200))
                    .map_err(control::ControlError::from)?
                {
                    break;
                }
                if gate.closed_since().is_some_and(|t| t.elapsed() > idle) {
                    return Err(SessionError::Timeout(format!(
                        "the sender closed its channels but sent no end within {:.1} s",
                        idle.as_secs_f64()
                    )));
                }
            }
            let msg = match control::read_message(control) {
                Ok(m) => m,
                Err(_) if gate.has_failed() => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            match msg {
                Message::RoundEnd { round } => {
                    if round != last + 1 {
                        return Err(SessionError::Handshake(format!(
                            "round-end for round {round} after round {last}"
                        )));
                    }
                    if !gate.wait_completed(round) {
                        return Ok(());
                    }
                    control::write_message(control, &Message::RoundDone { round })?;
                    debug!(round, "round applied");
                    last = round;
                }
                Message::State { data } => {
                    let held: usize = states.iter().map(Vec::len).sum();
                    if held + data.len() > MAX_STATE_TOTAL {
                        return Err(SessionError::Handshake(format!(
                            "device state beyond {MAX_STATE_TOTAL} bytes in one session"
                        )));
                    }
                    debug!(bytes = data.len(), "device state received");
                    states.push(data);
                }
                Message::End => {
                    // The sender closes its channels before End: EndOk only once every
                    // channel has ended cleanly, so every page it carried is applied.
                    let (closed, n) = gate.wait_closed(self.cfg.idle_timeout);
                    if closed < n {
                        return Err(SessionError::Timeout(format!(
                            "end received but {} of {n} channels still open after {:.1} s",
                            n - closed,
                            self.cfg.idle_timeout.as_secs_f64()
                        )));
                    }
                    return self.commit_and_end(control, pc.memory, states, commit);
                }
                Message::Abandon { reason } => return Err(SessionError::Abandoned { reason }),
                Message::PostcopyPages { block, runs } => {
                    pc.announced
                        .add(pc.memory, pc.hello.page_size, block, runs)?;
                }
                Message::Postcopy { background } => {
                    // The sender closed its pre-copy channels before switching.
                    let (closed, n) = gate.wait_closed(self.cfg.idle_timeout);
                    if closed < n {
                        return Err(SessionError::Timeout(format!(
                            "post-copy: {} of {n} pre-copy channels still open after {:.1} s",
                            n - closed,
                            self.cfg.idle_timeout.as_secs_f64()
                        )));
                    }
                    let args = DestArgs {
                        memory: pc.memory,
                        hello: pc.hello,
                        cfg: &self.cfg,
                        hook: &self.postcopy_hook,
                        state: states,
                    };
                    let st = crate::postcopy::dest::run(
                        pc.door,
                        control,
                        args,
                        &pc.announced,
                        background,
                    )?;
                    pc.stats = Some(Box::new(st));
                    return match control::read_message(control)? {
                        Message::End => self.commit_and_end(control, pc.memory, states, commit),
                        Message::Error { message } => Err(SessionError::Peer(message)),
                        other => Err(SessionError::Unexpected {
                            expected: "end",
                            got: other.name(),
                        }),
                    };
                }
                Message::Error { message } => return Err(SessionError::Peer(message)),
                other => {
                    return Err(SessionError::Unexpected {
                        expected: "round-end or end",
                        got: other.name(),
                    })
                }
            }
        }
    }
}

impl Receiver {
    /// The session's last step on this side: run the embedder's commit (telling the sender
    /// every third of the idle timeout that it is still running), then `EndOk`.
    fn commit_and_end<F>(
        &self,
        control: &mut Conn,
        memory: &GuestRam,
        states: &[Vec<u8>],
        commit: &mut Option<F>,
    ) -> Result<(), SessionError>
    where
        F: FnOnce(&GuestRam, &[Vec<u8>]) -> Result<(), CommitError> + Send,
    {
        let Some(commit) = commit.take() else {
            return Err(SessionError::Internal("the session ended twice".into()));
        };
        let beat = (self.cfg.idle_timeout / 3).max(Duration::from_millis(10));
        std::thread::scope(|s| {
            let (tx, rx) = mpsc::channel();
            let worker = threads::spawn_scoped(
                s,
                &self.cfg.threads,
                ThreadRole::Commit,
                "pw-commit".into(),
                move || {
                    let _ = tx.send(commit(memory, states));
                },
            )?;
            let result = loop {
                match rx.recv_timeout(beat) {
                    Ok(r) => break r.map_err(|e| SessionError::Commit(e.to_string())),
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        debug!("still committing: end-pending");
                        // A sender that went away cannot be told; the commit goes on.
                        let _ = control::write_message(control, &Message::EndPending);
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        break Err(SessionError::Internal("the commit step panicked".into()))
                    }
                }
            };
            let _ = worker.join();
            result
        })?;
        control::write_message(control, &Message::EndOk)?;
        Ok(())
    }
}

/// What an embedder's commit step ([`Receiver::serve_and_commit`]) may fail with.
pub type CommitError = Box<dyn std::error::Error + Send + Sync>;

/// Without a shared secret, a receiver accepts only loopback peers unless `insecure` is set.
pub fn peer_allowed(cfg: &Config, peer: &SocketAddr) -> Result<(), SessionError> {
    // TLS client certificates authenticate a peer as a shared secret does.
    handshake::peer_allowed_with(
        cfg.secret.is_some() || cfg.tls.is_some(),
        cfg.insecure,
        peer,
    )
}

/// The page decoder `d` asks for.
pub fn decoder_for(d: Decoder) -> Result<Box<dyn PageDecompressor>, SessionError> {
    let qpl = |software_only| -> Result<Box<dyn PageDecompressor>, SessionError> {
        Ok(crate::accel::qpl::decompressor(software_only)?)
    };
    match d {
        Decoder::Builtin => Ok(Box::new(DeflateDecompressor::new())),
        Decoder::Qpl => qpl(false),
        Decoder::Auto if crate::accel::qpl::hardware_available() => qpl(false),
        Decoder::Auto => Ok(Box::new(DeflateDecompressor::new())),
    }
}

/// The error for "no session came": the wait's own error, or, when connections were refused
/// meanwhile, how many and why the last one was.
fn no_session(e: SessionError, waited: Duration, door: &Door) -> SessionError {
    match door.refused() {
        (0, _) | (_, None) => match e {
            // The whole wait, not the last call's share of it.
            SessionError::Net(net::NetError::AcceptTimeout { addr, .. }) => {
                SessionError::Net(net::NetError::AcceptTimeout {
                    addr,
                    secs: waited.as_secs_f64(),
                })
            }
            e => e,
        },
        (refused, Some(last)) => SessionError::NoSession {
            waited: waited.as_secs_f64(),
            refused,
            last,
        },
    }
}

/// Send an error to the sender (best effort) and return it.
fn reject(control: &mut Conn, e: SessionError) -> SessionError {
    debug!(error = %e, "rejecting session");
    handshake::tell_peer(control, e)
}

#[derive(Debug, Default)]
struct GateState {
    arrived: u16,
    completed: u64,
    closed: u16,
    /// When the first channel closed cleanly.
    closed_at: Option<Instant>,
    error: Option<SessionError>,
}

/// The round barrier plus the session's shared failure state.
struct Gate {
    channels: u16,
    state: Mutex<GateState>,
    cv: Condvar,
    failed: AtomicBool,
    sockets: Vec<TcpStream>,
    control: Option<TcpStream>,
}

impl Gate {
    fn new(channels: u16, streams: &[Conn], control: &Conn) -> Gate {
        Gate {
            channels,
            state: Mutex::new(GateState::default()),
            cv: Condvar::new(),
            failed: AtomicBool::new(false),
            sockets: streams
                .iter()
                .filter_map(|s| s.tcp().try_clone().ok())
                .collect(),
            control: control.tcp().try_clone().ok(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record the first error, wake everyone, shut every channel down and the control
    /// connection's read side (the error is still written to the sender).
    fn fail(&self, e: SessionError) {
        {
            let mut st = self.lock();
            // The source's word that it abandoned the migration explains the channels'
            // errors that come with it, whichever is seen first.
            if st.error.is_none() || matches!(e, SessionError::Abandoned { .. }) {
                st.error = Some(e);
            }
        }
        self.failed.store(true, Ordering::SeqCst);
        self.cv.notify_all();
        for s in &self.sockets {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        if let Some(c) = &self.control {
            let _ = c.shutdown(std::net::Shutdown::Read);
        }
    }

    fn has_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    fn take_error(&self) -> Option<SessionError> {
        self.lock().error.take()
    }

    fn completed(&self) -> u64 {
        self.lock().completed
    }

    /// When the first channel closed cleanly, if one has.
    fn closed_since(&self) -> Option<Instant> {
        self.lock().closed_at
    }

    /// Wait (at most `t`) until every channel has closed cleanly; returns (closed, channels).
    fn wait_closed(&self, t: Duration) -> (u16, u16) {
        let deadline = Instant::now() + t;
        let mut st = self.lock();
        while st.closed < self.channels && !self.has_failed() && Instant::now() < deadline {
            st = self
                .cv
                .wait_timeout(st, Duration::from_millis(100))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        (st.closed, self.channels)
    }

    /// Wait until round `round` is complete on every channel; false if the session failed.
    fn wait_completed(&self, round: u64) -> bool {
        let mut st = self.lock();
        while st.completed < round && !self.has_failed() {
            st = self
                .cv
                .wait_timeout(st, Duration::from_millis(200))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        st.completed >= round
    }
}

impl RoundGate for Gate {
    fn synced(&self, _channel: u16, round: u64) -> Result<(), ChannelErrorKind> {
        let mut st = self.lock();
        if round != st.completed + 1 {
            return Err(ChannelErrorKind::Io(std::io::Error::other(format!(
                "SYNC for round {round} while round {} is open",
                st.completed + 1
            ))));
        }
        st.arrived += 1;
        if st.arrived >= self.channels {
            st.arrived = 0;
            st.completed = round;
            self.cv.notify_all();
            return Ok(());
        }
        while st.completed < round {
            if self.has_failed() {
                return Err(ChannelErrorKind::Aborted);
            }
            st = self
                .cv
                .wait_timeout(st, Duration::from_millis(200))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        Ok(())
    }

    fn closed(&self, _channel: u16) {
        {
            let mut st = self.lock();
            st.closed += 1;
            st.closed_at.get_or_insert_with(Instant::now);
        }
        self.cv.notify_all();
    }

    fn failed(&self) -> bool {
        self.has_failed()
    }
}
