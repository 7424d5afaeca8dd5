//! The receiver's front door: accepting connections and running their handshakes before
//! they belong to a session.
//!
//! Every connection is handed to its own short-lived handshake thread (at most
//! [`MAX_HANDSHAKES`] at once, small stacks), bounded by the handshake timeout. Whatever a
//! connection does before it has authenticated and said a valid hello (control) or init packet
//! (channel) — garbage, an HTTP request, a port scan, silence — costs one logged line and a
//! closed socket; it never ends the session and never blocks other connections' handshakes.
//! Memory per pending connection is bounded by the largest control frame, whatever the peer
//! claims, and arrives only as the peer's bytes do.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use pagewire_transport::control::{self, Hello, Message, MAC_LEN, NONCE_LEN};
use pagewire_transport::net::{self, SocketOptions};
use pagewire_transport::wire::{Field, InitPacket, WireError, INIT_PACKET_LEN};
use tracing::{debug, warn};

use crate::config::Config;
use crate::error::SessionError;
use crate::session::auth::{self, Secret};
use crate::session::tls::Acceptor;
use pagewire_transport::tls::Conn;

/// Most handshakes in progress at once; further connections are closed at once.
pub const MAX_HANDSHAKES: usize = 64;
/// Stack of a handshake thread (it parses at most one control frame).
const HANDSHAKE_STACK: usize = 128 << 10;

/// A connection refused before it joined a session.
#[derive(Debug)]
pub struct Rejection {
    /// Who connected.
    pub peer: SocketAddr,
    /// Why it was refused.
    pub error: SessionError,
}

/// An authenticated control connection whose hello parsed.
#[derive(Debug)]
pub(crate) struct ControlCandidate {
    pub stream: Conn,
    pub peer: SocketAddr,
    pub nonce_r: [u8; NONCE_LEN],
    pub hello: Hello,
}

/// A channel connection whose token (if any) and init packet check out for the session.
#[derive(Debug)]
pub(crate) struct ChannelCandidate {
    pub stream: Conn,
    pub peer: SocketAddr,
    pub init: InitPacket,
}

/// What a handshake thread expects of a new connection.
#[derive(Clone)]
pub(crate) enum Expect {
    Control,
    Channel {
        uuid: [u8; 16],
        nonce_r: [u8; NONCE_LEN],
        /// The sender's hello nonce (zero without authentication).
        nonce_s: [u8; NONCE_LEN],
    },
}

enum Outcome {
    Control(ControlCandidate),
    Channel(ChannelCandidate),
}

/// Accepts connections and runs their handshakes on separate threads.
pub(crate) struct Door<'a> {
    listener: &'a TcpListener,
    cfg: &'a Config,
    acceptor: Acceptor,
    pending: Arc<AtomicUsize>,
    /// Handles on the pending handshakes' sockets, oldest first, to evict under a flood.
    inflight: std::collections::VecDeque<(u64, TcpStream)>,
    next_id: u64,
    done_ids: Arc<Mutex<Vec<u64>>>,
    tx: mpsc::Sender<Outcome>,
    rx: mpsc::Receiver<Outcome>,
    /// Handshake threads write a byte here after sending an outcome, so the serving thread's
    /// poll wakes at once (it also polls the listener).
    wake_rx: UnixStream,
    wake_tx: UnixStream,
    watch: Arc<Mutex<Option<mpsc::Sender<Rejection>>>>,
    refused: u64,
    /// Connections whose handshake thread refused them.
    handshakes_refused: Arc<std::sync::atomic::AtomicU64>,
    last_refusal_error: Arc<Mutex<Option<String>>>,
}

impl<'a> Door<'a> {
    pub fn new(
        listener: &'a TcpListener,
        cfg: &'a Config,
        watch: Arc<Mutex<Option<mpsc::Sender<Rejection>>>>,
    ) -> Result<Door<'a>, SessionError> {
        let (tx, rx) = mpsc::channel();
        let (wake_rx, wake_tx) =
            UnixStream::pair().map_err(|e| SessionError::Internal(format!("wake-up pipe: {e}")))?;
        wake_rx
            .set_nonblocking(true)
            .map_err(|e| SessionError::Internal(format!("wake-up pipe: {e}")))?;
        Ok(Door {
            listener,
            cfg,
            acceptor: Acceptor::new(cfg)?,
            pending: Arc::new(AtomicUsize::new(0)),
            inflight: std::collections::VecDeque::new(),
            next_id: 0,
            done_ids: Arc::new(Mutex::new(Vec::new())),
            tx,
            rx,
            watch,
            refused: 0,
            handshakes_refused: Arc::default(),
            last_refusal_error: Arc::new(Mutex::new(None)),
            wake_rx,
            wake_tx,
        })
    }

    /// Connections refused so far, and the last reason.
    pub fn refused(&self) -> (u64, Option<String>) {
        let last = self.last_refusal_error.lock().ok().and_then(|g| g.clone());
        (
            self.refused + self.handshakes_refused.load(Ordering::SeqCst),
            last,
        )
    }

    /// Report a refusal decided by the session (e.g. a hello that does not fit this memory).
    pub fn refuse(&mut self, peer: SocketAddr, stream: &mut Conn, error: SessionError) {
        let error = tell_peer(stream, error);
        self.refused += 1;
        report(&self.watch, &self.last_refusal_error, peer, error);
    }

    /// Wait for the next control connection that authenticated and sent a hello.
    pub fn next_control(&mut self, deadline: Instant) -> Result<ControlCandidate, SessionError> {
        loop {
            match self.next(deadline, &Expect::Control)? {
                Outcome::Control(c) => return Ok(c),
                Outcome::Channel(c) => {
                    debug!(peer = %c.peer, "channel connection before any session; closed")
                }
            }
        }
    }

    /// Wait for the next channel connection of the session `expect` describes.
    pub fn next_channel(
        &mut self,
        deadline: Instant,
        expect: &Expect,
    ) -> Result<ChannelCandidate, SessionError> {
        loop {
            match self.next(deadline, expect)? {
                Outcome::Channel(c) => return Ok(c),
                Outcome::Control(c) => {
                    let mut s = c.stream;
                    let e = SessionError::Handshake(format!(
                        "a session is already running; {} refused",
                        c.peer
                    ));
                    self.refuse(c.peer, &mut s, e);
                }
            }
        }
    }

    fn next(&mut self, deadline: Instant, expect: &Expect) -> Result<Outcome, SessionError> {
        let local = self
            .listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        loop {
            if let Ok(o) = self.rx.try_recv() {
                return Ok(o);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(SessionError::Net(net::NetError::AcceptTimeout {
                    addr: local,
                    secs: self.cfg.idle_timeout.as_secs_f64(),
                }));
            }
            let fds = [self.listener.as_raw_fd(), self.wake_rx.as_raw_fd()];
            let ready = net::wait_readable_any(&fds, left).map_err(|source| {
                SessionError::Net(net::NetError::Accept {
                    addr: local,
                    source,
                })
            })?;
            if ready == Some(1) {
                // A handshake finished: drain the wake-ups; its outcome is in the channel.
                let mut sink = [0u8; 64];
                while matches!((&self.wake_rx).read(&mut sink), Ok(n) if n > 0) {}
                continue;
            }
            if ready.is_none() {
                continue;
            }
            let (stream, peer) = match self.listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // A connection reset before we took it, or out of descriptors: log and go on.
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            self.forget_finished();
            if self.pending.load(Ordering::SeqCst) >= 2 * MAX_HANDSHAKES {
                // Evicted handshakes have not finished exiting yet: hard bound on threads.
                self.refused += 1;
                warn!(%peer, "handshake threads at their bound; connection closed");
                drop(stream);
                continue;
            }
            if self.pending.load(Ordering::SeqCst) >= MAX_HANDSHAKES {
                // A flood: the oldest pending handshake makes room (its thread sees its socket
                // shut and ends). A real peer completes its handshake in a round trip, so it
                // is not the oldest for long; the flood's idle connections are.
                if let Some((_, old)) = self.inflight.pop_front() {
                    let _ = old.shutdown(std::net::Shutdown::Both);
                }
                self.refused += 1;
                warn!(%peer, "{MAX_HANDSHAKES} handshakes in progress: the oldest was closed to make room");
            }
            self.spawn(stream, peer, expect.clone());
        }
    }

    /// Drop the handles of handshakes that have finished.
    fn forget_finished(&mut self) {
        let done: Vec<u64> = self
            .done_ids
            .lock()
            .map(|mut d| std::mem::take(&mut *d))
            .unwrap_or_default();
        if !done.is_empty() {
            self.inflight.retain(|(id, _)| !done.contains(id));
        }
    }

    fn spawn(&mut self, stream: TcpStream, peer: SocketAddr, expect: Expect) {
        let id = self.next_id;
        self.next_id += 1;
        if let Ok(h) = stream.try_clone() {
            self.inflight.push_back((id, h));
        }
        let done_ids = self.done_ids.clone();
        let pending = self.pending.clone();
        pending.fetch_add(1, Ordering::SeqCst);
        let tx = self.tx.clone();
        let wake = self.wake_tx.try_clone().ok();
        let watch = self.watch.clone();
        let last = self.last_refusal_error.clone();
        let secret = self.cfg.secret.clone();
        let insecure = self.cfg.insecure;
        let timeout = self.cfg.idle_timeout;
        let socket = self.cfg.socket;
        let acceptor = self.acceptor.clone();
        let handshakes_refused = self.handshakes_refused.clone();
        let spawned = std::thread::Builder::new()
            .name("pw-handshake".into())
            .stack_size(HANDSHAKE_STACK)
            .spawn(move || {
                let res = handshake(
                    stream,
                    peer,
                    &expect,
                    secret.as_ref(),
                    insecure,
                    timeout,
                    &socket,
                    &acceptor,
                );
                match res {
                    Ok(o) => {
                        let _ = tx.send(o);
                        if let Some(mut w) = wake {
                            let _ = w.write_all(&[1]);
                        }
                    }
                    Err(e) => {
                        handshakes_refused.fetch_add(1, Ordering::SeqCst);
                        report(&watch, &last, peer, e)
                    }
                }
                if let Ok(mut d) = done_ids.lock() {
                    d.push(id);
                }
                pending.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            warn!(%peer, error = %e, "cannot start a handshake thread; connection closed");
        }
    }
}

/// Without a shared secret, only loopback peers are accepted unless `insecure` is set.
pub(crate) fn peer_allowed_with(
    has_secret: bool,
    insecure: bool,
    peer: &SocketAddr,
) -> Result<(), SessionError> {
    if !has_secret && !insecure && !net::is_loopback(peer) {
        return Err(SessionError::Auth(format!(
            "refusing {peer}: it is not on loopback and no shared secret is configured \
             (use --secret-file on both sides, or --insecure on a trusted network)"
        )));
    }
    Ok(())
}

/// Tell the peer why (an `error` message, best effort) and hand the error back.
pub(crate) fn tell_peer<W: Write>(stream: &mut W, e: SessionError) -> SessionError {
    let _ = control::write_message(
        stream,
        &Message::Error {
            message: e.to_string(),
        },
    );
    e
}

/// Log a refusal (one line) and tell a watcher, if any.
fn report(
    watch: &Mutex<Option<mpsc::Sender<Rejection>>>,
    last: &Mutex<Option<String>>,
    peer: SocketAddr,
    error: SessionError,
) {
    warn!("connection from {peer} refused: {error}");
    if let Ok(mut l) = last.lock() {
        *l = Some(error.to_string());
    }
    if let Ok(w) = watch.lock() {
        if let Some(tx) = w.as_ref() {
            let _ = tx.send(Rejection { peer, error });
        }
    }
}

/// The handshake of one connection, on its own thread.
#[allow(clippy::too_many_arguments)] // the door's settings, copied into the thread one by one
fn handshake(
    mut tcp: TcpStream,
    peer: SocketAddr,
    expect: &Expect,
    secret: Option<&Secret>,
    insecure: bool,
    timeout: Duration,
    socket: &SocketOptions,
    acceptor: &Acceptor,
) -> Result<Outcome, SessionError> {
    // Certificates authenticate a TLS peer as a shared secret does a clear-text one.
    let authenticated = secret.is_some() || acceptor.is_tls();
    if let Err(e) = peer_allowed_with(authenticated, insecure, &peer) {
        return Err(tell_peer(&mut tcp, e));
    }
    net::configure(&tcp, socket)?;
    tcp.set_read_timeout(Some(timeout))
        .map_err(control::ControlError::from)?;
    tcp.set_write_timeout(Some(timeout))
        .map_err(control::ControlError::from)?;
    let mut stream = acceptor.accept(tcp)?;
    match expect {
        Expect::Control => {
            let nonce_r = auth::nonce()?;
            control::write_message(
                &mut stream,
                &Message::Challenge {
                    nonce: nonce_r,
                    secret_required: secret.is_some(),
                },
            )?;
            if !stream.is_tls() {
                let mut first = [0u8; 1];
                // A TLS ClientHello starts with a handshake record (0x16): say so rather than
                // "frame too large".
                match stream.tcp().peek(&mut first) {
                    Ok(1) if first[0] == 0x16 => {
                        return Err(SessionError::Handshake(format!(
                            "control connection from {peer} starts a TLS handshake, but this receiver has no TLS credentials (--tls-dir)"
                        )));
                    }
                    Ok(_) => {}
                    // Silence or a reset: what reading the hello would report.
                    Err(e) => return Err(control::ControlError::Io(e).into()),
                }
            }
            let hello = match control::read_message(&mut stream) {
                Ok(Message::Hello(h)) => h,
                Ok(Message::Error { message }) => return Err(SessionError::Peer(message)),
                Ok(other) => {
                    return Err(tell_peer(
                        &mut stream,
                        SessionError::Unexpected {
                            expected: "hello",
                            got: other.name(),
                        },
                    ))
                }
                Err(e) => return Err(tell_peer(&mut stream, e.into())),
            };
            match (secret, &hello.auth) {
                (None, _) => {}
                (Some(_), None) => {
                    let e = SessionError::Auth(format!(
                        "control connection from {peer}: the sender sent no proof of the shared secret"
                    ));
                    return Err(tell_peer(&mut stream, e));
                }
                (Some(sec), Some(a)) => {
                    if !sec.check_sender(&nonce_r, &a.nonce, &hello.uuid, &a.mac) {
                        let e = SessionError::Auth(format!(
                            "control connection from {peer}: the sender's proof does not match this receiver's shared secret"
                        ));
                        return Err(tell_peer(&mut stream, e));
                    }
                }
            }
            Ok(Outcome::Control(ControlCandidate {
                stream,
                peer,
                nonce_r,
                hello,
            }))
        }
        Expect::Channel {
            uuid,
            nonce_r,
            nonce_s,
        } => {
            let mut token = [0u8; MAC_LEN];
            if secret.is_some() {
                stream.read_exact(&mut token).map_err(|e| {
                    SessionError::Auth(format!(
                        "channel connection from {peer}: reading its token: {e}"
                    ))
                })?;
            }
            let mut buf = [0u8; INIT_PACKET_LEN];
            stream.read_exact(&mut buf).map_err(|e| {
                SessionError::Handshake(format!(
                    "channel connection from {peer}: reading init packet: {e}"
                ))
            })?;
            let init = InitPacket::parse(&buf).map_err(|source| SessionError::Init {
                peer: peer.to_string(),
                source,
            })?;
            if let Some(sec) = secret {
                if !sec.check_channel(nonce_r, nonce_s, uuid, init.channel_id, &token) {
                    return Err(SessionError::Auth(format!(
                        "channel connection from {peer}: its token does not match this receiver's shared secret"
                    )));
                }
            }
            if &init.uuid != uuid {
                return Err(SessionError::Init {
                    peer: peer.to_string(),
                    source: WireError::Invalid {
                        field: Field::Uuid,
                        detail: "not this session's uuid (a stray or stale connection)".into(),
                    },
                });
            }
            stream
                .tcp()
                .set_read_timeout(None)
                .map_err(control::ControlError::from)?;
            stream
                .tcp()
                .set_write_timeout(None)
                .map_err(control::ControlError::from)?;
            Ok(Outcome::Channel(ChannelCandidate { stream, peer, init }))
        }
    }
}
