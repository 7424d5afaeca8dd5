//! The receiver's front door: accepting connections and running their handshakes before
//! they belong to a session.
//!
//! One thread (`pw-door`) accepts for as long as the receiver serves, during a session too,
//! and hands every connection to its own short-lived handshake thread (`pw-handshake`, small
//! stacks). A connection says what it is with its first bytes: a control connection opens
//! with [`CONTROL_PREAMBLE`], a channel with its
//! token or init packet. Whatever a connection does before it has authenticated and said a
//! valid hello (control) or init packet (channel) — garbage, an HTTP request, a port scan,
//! silence — costs one logged line and a closed socket; it never ends the session and never
//! blocks other connections' handshakes. A second sender while a session runs is told at once
//! that this receiver is busy.
//!
//! Bounds: at most [`MAX_HANDSHAKES`] handshakes are pending (a further connection closes the
//! oldest pending one), at most twice that many handshake threads exist, and every pending
//! connection is closed when the handshake timeout (the idle timeout) has passed since it was
//! accepted, whatever it sends meanwhile. Memory per pending connection is bounded by the
//! largest control frame, whatever the peer claims, and arrives only as the peer's bytes do.

use std::cell::Cell;
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use pagewire_transport::control::{self, Hello, Message, CONTROL_PREAMBLE, MAC_LEN, NONCE_LEN};
use pagewire_transport::net;
use pagewire_transport::wire::{Field, InitPacket, WireError, INIT_PACKET_LEN};
use tracing::{debug, warn};

use crate::config::Config;
use crate::error::SessionError;
use crate::session::auth::{self, Secret};
use crate::session::tls::Acceptor;
use crate::threads::{self, Thread, ThreadHook, ThreadRole};
use pagewire_transport::tls::Conn;

/// Most handshakes pending at once; a further connection closes the oldest pending one.
pub const MAX_HANDSHAKES: usize = 64;
/// Most handshake threads at once (closed handshakes whose threads have not yet ended count).
const MAX_HANDSHAKE_THREADS: usize = 2 * MAX_HANDSHAKES;
/// Stack of a handshake thread (it parses at most one control frame).
const HANDSHAKE_STACK: usize = 128 << 10;
/// At most one log line per this period about connections closed under a flood.
const FLOOD_LOG_PERIOD: Duration = Duration::from_secs(1);

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

/// What the running session's channel connections must prove: they name its uuid and (with
/// a secret) carry a token over both nonces.
#[derive(Clone, Debug)]
pub(crate) struct Keys {
    pub uuid: [u8; 16],
    pub nonce_r: [u8; NONCE_LEN],
    /// The sender's hello nonce (zero without authentication).
    pub nonce_s: [u8; NONCE_LEN],
}

enum Outcome {
    Control(ControlCandidate),
    Channel(ChannelCandidate),
}

/// The pending handshakes: a handle on each socket (to close it at its deadline or under a
/// flood), oldest first, and the number of handshake threads alive.
#[derive(Default)]
struct Pending {
    next_id: u64,
    sockets: VecDeque<(u64, Instant, TcpStream)>,
    threads: usize,
}

/// What the door thread and the handshake threads share with the serving thread.
struct Shared {
    secret: Option<Secret>,
    insecure: bool,
    timeout: Duration,
    socket: net::SocketOptions,
    acceptor: Acceptor,
    /// The running session (`None` before its hello is accepted).
    keys: Mutex<Option<Keys>>,
    pending: Mutex<Pending>,
    watch: Arc<Mutex<Option<mpsc::Sender<Rejection>>>>,
    refused: AtomicU64,
    last_refusal_error: Mutex<Option<String>>,
    threads: ThreadHook,
    /// The door is stopping (`serve` ended): pending handshakes are cut short.
    closing: AtomicBool,
}

impl Shared {
    fn report(&self, peer: SocketAddr, error: SessionError) {
        self.refused.fetch_add(1, Ordering::SeqCst);
        report(&self.watch, &self.last_refusal_error, peer, error);
    }
}

/// Accepts connections on its own thread and runs their handshakes; the serving thread takes
/// the results with [`Door::next_control`] and [`Door::next_channel`]. Dropping the door
/// stops the thread and closes every pending connection.
pub(crate) struct Door {
    local: SocketAddr,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Outcome>,
    stop: UnixStream,
    thread: Option<Thread<()>>,
}

impl Door {
    /// Start accepting on `listener` (which must be non-blocking).
    pub fn open(
        listener: &TcpListener,
        cfg: &Config,
        watch: Arc<Mutex<Option<mpsc::Sender<Rejection>>>>,
    ) -> Result<Door, SessionError> {
        let internal =
            |what: &str, e: std::io::Error| SessionError::Internal(format!("{what}: {e}"));
        let local = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let listener = listener
            .try_clone()
            .map_err(|e| internal("front door listener", e))?;
        let (stop_rx, stop) =
            UnixStream::pair().map_err(|e| internal("front door stop pipe", e))?;
        let shared = Arc::new(Shared {
            secret: cfg.secret.clone(),
            insecure: cfg.insecure,
            timeout: cfg.idle_timeout,
            socket: cfg.socket,
            acceptor: Acceptor::new(cfg)?,
            keys: Mutex::new(None),
            pending: Mutex::new(Pending::default()),
            watch,
            refused: AtomicU64::new(0),
            last_refusal_error: Mutex::new(None),
            threads: cfg.threads.clone(),
            closing: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel();
        let sh = shared.clone();
        let thread = threads::spawn(
            &cfg.threads,
            ThreadRole::Door,
            "pw-door".into(),
            None,
            move || accept_loop(&listener, &stop_rx, &sh, &tx),
        )?;
        Ok(Door {
            local,
            shared,
            rx,
            stop,
            thread: Some(thread),
        })
    }

    /// The running session: from now on channel connections are checked against `keys`, and
    /// a control connection naming another session is told this receiver is busy.
    pub fn set_session(&self, keys: Keys) {
        if let Ok(mut k) = self.shared.keys.lock() {
            *k = Some(keys);
        }
    }

    /// Connections refused so far, and the last reason.
    pub fn refused(&self) -> (u64, Option<String>) {
        let last = self
            .shared
            .last_refusal_error
            .lock()
            .ok()
            .and_then(|g| g.clone());
        (self.shared.refused.load(Ordering::SeqCst), last)
    }

    /// Report a refusal decided by the session (e.g. a hello that does not fit this memory).
    pub fn refuse(&mut self, peer: SocketAddr, stream: &mut Conn, error: SessionError) {
        let error = tell_peer(stream, error);
        self.shared.report(peer, error);
    }

    /// Wait for the next control connection that authenticated and sent a hello.
    pub fn next_control(&mut self, deadline: Instant) -> Result<ControlCandidate, SessionError> {
        loop {
            match self.next(deadline)? {
                Outcome::Control(c) => return Ok(c),
                Outcome::Channel(c) => {
                    debug!(peer = %c.peer, "channel connection while no channel is awaited; closed")
                }
            }
        }
    }

    /// Wait for the next channel connection of the session set with [`Door::set_session`].
    pub fn next_channel(&mut self, deadline: Instant) -> Result<ChannelCandidate, SessionError> {
        loop {
            match self.next(deadline)? {
                Outcome::Channel(c) => return Ok(c),
                Outcome::Control(c) => {
                    let mut s = c.stream;
                    let e = SessionError::Handshake(format!(
                        "a control connection of this session from {} while its channels connect",
                        c.peer
                    ));
                    self.refuse(c.peer, &mut s, e);
                }
            }
        }
    }

    fn next(&mut self, deadline: Instant) -> Result<Outcome, SessionError> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(left) {
            Ok(o) => Ok(o),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                Err(SessionError::Net(net::NetError::AcceptTimeout {
                    addr: self.local,
                    secs: left.as_secs_f64(),
                }))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(SessionError::Internal("the front door thread ended".into()))
            }
        }
    }
}

impl Drop for Door {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        let _ = self.stop.write_all(&[1]);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Handshakes still pending end now (their threads see the sockets shut).
        if let Ok(p) = self.shared.pending.lock() {
            for (_, _, s) in &p.sockets {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// The door thread: accept until `stop` is readable; close pending handshakes at their
/// deadline.
fn accept_loop(
    listener: &TcpListener,
    stop: &UnixStream,
    shared: &Arc<Shared>,
    tx: &mpsc::Sender<Outcome>,
) {
    let fds = [listener.as_raw_fd(), stop.as_raw_fd()];
    // Often enough that a pending connection outlives its deadline by a quarter at most.
    let tick = (shared.timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut flood = FloodLog::default();
    loop {
        match net::wait_readable_any(&fds, tick) {
            Ok(Some(1)) => return,
            Ok(Some(_)) => match listener.accept() {
                Ok((stream, peer)) => admit(shared, tx, stream, peer, &mut flood),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) => {}
                // A connection reset before we took it, or out of descriptors: log and go on.
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
            },
            Ok(None) => {}
            Err(e) => {
                warn!(error = %e, "front door: poll failed");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        expire(shared);
        flood.flush();
    }
}

/// Close every pending connection whose handshake timeout has passed: its thread's next read
/// fails and it reports [`SessionError::HandshakeTimeout`].
fn expire(shared: &Shared) {
    let Ok(p) = shared.pending.lock() else { return };
    for (_, since, s) in &p.sockets {
        if since.elapsed() >= shared.timeout {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Counts of connections closed under a flood, logged at most once per [`FLOOD_LOG_PERIOD`].
#[derive(Default)]
struct FloodLog {
    evicted: u64,
    dropped: u64,
    since: Option<Instant>,
}

impl FloodLog {
    fn flush(&mut self) {
        let Some(since) = self.since else { return };
        if since.elapsed() < FLOOD_LOG_PERIOD {
            return;
        }
        warn!(
            evicted = self.evicted,
            dropped = self.dropped,
            "connection flood: {MAX_HANDSHAKES} handshakes pending; {} oldest pending connection(s) closed to make room, {} closed at once (handshake threads at their bound) in the last {:.1} s",
            self.evicted,
            self.dropped,
            since.elapsed().as_secs_f64()
        );
        *self = FloodLog::default();
    }

    fn note(&mut self, evicted: bool) {
        if evicted {
            self.evicted += 1;
        } else {
            self.dropped += 1;
        }
        self.since.get_or_insert_with(Instant::now);
    }
}

/// Start the handshake of a new connection, within the bounds.
fn admit(
    shared: &Arc<Shared>,
    tx: &mpsc::Sender<Outcome>,
    stream: TcpStream,
    peer: SocketAddr,
    flood: &mut FloodLog,
) {
    let id = {
        let Ok(mut p) = shared.pending.lock() else {
            return;
        };
        if p.threads >= MAX_HANDSHAKE_THREADS {
            // Closed handshakes have not finished exiting yet: a hard bound on threads.
            shared.refused.fetch_add(1, Ordering::SeqCst);
            flood.note(false);
            return;
        }
        if p.sockets.len() >= MAX_HANDSHAKES {
            // A flood: the oldest pending handshake makes room (its thread sees its socket
            // shut and ends). A real peer completes its handshake in a round trip, so it is
            // not the oldest for long; the flood's idle connections are.
            if let Some((_, _, old)) = p.sockets.pop_front() {
                let _ = old.shutdown(std::net::Shutdown::Both);
            }
            shared.refused.fetch_add(1, Ordering::SeqCst);
            flood.note(true);
        }
        let id = p.next_id;
        p.next_id += 1;
        match stream.try_clone() {
            Ok(h) => p.sockets.push_back((id, Instant::now(), h)),
            Err(e) => {
                warn!(%peer, error = %e, "cannot keep a handle on a new connection; closed");
                return;
            }
        }
        p.threads += 1;
        id
    };
    let sh = shared.clone();
    let tx = tx.clone();
    let hook = shared.threads.clone();
    let spawned = threads::spawn(
        &hook,
        ThreadRole::Handshake,
        "pw-handshake".into(),
        Some(HANDSHAKE_STACK),
        move || {
            let res = handshake(stream, peer, &sh);
            // Off the pending list (closing its handle) before the outcome is handed on, so a
            // deadline or a flood never shuts a connection that completed its handshake.
            finished(&sh, id);
            match res {
                Ok(o) => {
                    let _ = tx.send(o);
                }
                Err(e) => sh.report(peer, e),
            }
        },
    );
    if let Err(e) = spawned {
        finished(shared, id);
        warn!(%peer, error = %e, "cannot start a handshake thread; connection closed");
    }
}

/// A handshake ended: drop its handle (closing that descriptor) and its thread's count.
fn finished(shared: &Shared, id: u64) {
    if let Ok(mut p) = shared.pending.lock() {
        p.sockets.retain(|(i, _, _)| *i != id);
        p.threads = p.threads.saturating_sub(1);
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
             (set the shared secret (`secret`) on both sides, or `insecure` on the receiver for a trusted network)"
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

/// [`tell_peer`] on a connection whose peer still has bytes in flight (a TLS ClientHello):
/// half-close, then read (at most 64 KiB, for at most a second) until the peer closes, so the
/// kernel delivers the error instead of resetting the connection over unread bytes.
fn refuse_lingering(stream: &mut Conn, e: SessionError) -> SessionError {
    let e = tell_peer(stream, e);
    let mut tcp = stream.tcp();
    let _ = tcp.shutdown(std::net::Shutdown::Write);
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(1)));
    let mut sink = [0u8; 4096];
    let mut left = 64usize << 10;
    while left > 0 {
        match tcp.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
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

/// The handshake of one connection, on its own thread. Whatever fails once the handshake
/// timeout has passed (a read timed out, or the door closed the socket at the deadline) is
/// reported as [`SessionError::HandshakeTimeout`].
fn handshake(tcp: TcpStream, peer: SocketAddr, sh: &Shared) -> Result<Outcome, SessionError> {
    let started = Instant::now();
    let stage = Cell::new("the TLS handshake");
    match open(tcp, peer, sh, &stage) {
        // A failed proof stands; anything else past the deadline (a read that timed out, or
        // saw the socket the door shut at the deadline) is the handshake's timeout.
        Err(e) if started.elapsed() >= sh.timeout && !matches!(e, SessionError::Auth(_)) => {
            debug!(%peer, error = %e, "handshake past its deadline");
            Err(SessionError::HandshakeTimeout {
                peer: peer.to_string(),
                secs: sh.timeout.as_secs_f64(),
                waiting_for: stage.get(),
            })
        }
        // The door closed the socket because the receiver stopped serving, not because of
        // anything the peer did.
        Err(e) if sh.closing.load(Ordering::SeqCst) => {
            debug!(%peer, error = %e, "handshake cut short: the receiver stopped serving");
            Err(SessionError::Handshake(format!(
                "connection from {peer} closed: the receiver stopped serving before its handshake completed (still waiting for {})",
                stage.get()
            )))
        }
        other => other,
    }
}

/// True when `first` starts a TLS ClientHello record: content type 22, version 3.x, then a
/// `client_hello` handshake message shorter than 64 KiB. A channel's token matches it with
/// probability 2^-38, its init packet (magic `0x11223344`) never.
fn looks_like_client_hello(first: &[u8; CONTROL_PREAMBLE.len()]) -> bool {
    first[0] == 0x16
        && first[1] == 0x03
        && (1..=4).contains(&first[2])
        && first[5] == 0x01
        && first[6] == 0x00
}

/// The handshake proper; `stage` says what it waits for (for the timeout's message).
fn open(
    mut tcp: TcpStream,
    peer: SocketAddr,
    sh: &Shared,
    stage: &Cell<&'static str>,
) -> Result<Outcome, SessionError> {
    // Certificates authenticate a TLS peer as a shared secret does a clear-text one.
    let authenticated = sh.secret.is_some() || sh.acceptor.is_tls();
    if let Err(e) = peer_allowed_with(authenticated, sh.insecure, &peer) {
        return Err(tell_peer(&mut tcp, e));
    }
    net::configure(&tcp, &sh.socket)?;
    tcp.set_read_timeout(Some(sh.timeout))
        .map_err(control::ControlError::from)?;
    tcp.set_write_timeout(Some(sh.timeout))
        .map_err(control::ControlError::from)?;
    let mut stream = sh.acceptor.accept(tcp)?;
    stage.set("its first bytes");
    // The peer speaks first: a control connection's preamble, or a channel's token or init
    // packet.
    let mut first = [0u8; CONTROL_PREAMBLE.len()];
    stream.read_exact(&mut first).map_err(|e| {
        SessionError::Handshake(format!(
            "connection from {peer}: reading its first bytes: {e}"
        ))
    })?;
    if !stream.is_tls() && looks_like_client_hello(&first) {
        let why = if cfg!(feature = "tls") {
            "this receiver has no TLS credentials (`tls`)".to_string()
        } else {
            format!(
                "this receiver cannot speak TLS: {}",
                crate::session::tls::NOT_BUILT
            )
        };
        let e = SessionError::Handshake(format!(
            "connection from {peer} starts a TLS handshake, but {why}"
        ));
        return Err(refuse_lingering(&mut stream, e));
    }
    if first == CONTROL_PREAMBLE {
        stage.set("its hello");
        control_handshake(stream, peer, sh)
    } else {
        stage.set(if sh.secret.is_some() {
            "its channel token and init packet"
        } else {
            "its init packet"
        });
        channel_handshake(stream, peer, first, sh)
    }
}

/// A control connection after its preamble: challenge, hello, proof.
fn control_handshake(
    mut stream: Conn,
    peer: SocketAddr,
    sh: &Shared,
) -> Result<Outcome, SessionError> {
    let secret = sh.secret.as_ref();
    let nonce_r = auth::nonce()?;
    control::write_message(
        &mut stream,
        &Message::Challenge {
            nonce: nonce_r,
            secret_required: secret.is_some(),
        },
    )?;
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
    // While a session runs, only that session may open a control connection (post-copy's
    // resumption); any other sender is told at once.
    let running = sh.keys.lock().ok().and_then(|k| k.as_ref().map(|k| k.uuid));
    if running.is_some_and(|uuid| uuid != hello.uuid) {
        return Err(tell_peer(&mut stream, SessionError::Busy));
    }
    Ok(Outcome::Control(ControlCandidate {
        stream,
        peer,
        nonce_r,
        hello,
    }))
}

/// A channel connection: `first` holds its first bytes (of its token, or of its init packet
/// without a secret).
fn channel_handshake(
    mut stream: Conn,
    peer: SocketAddr,
    first: [u8; CONTROL_PREAMBLE.len()],
    sh: &Shared,
) -> Result<Outcome, SessionError> {
    let Some(keys) = sh.keys.lock().ok().and_then(|k| k.clone()) else {
        return Err(SessionError::Handshake(format!(
            "connection from {peer} is not a control connection (no pagewire control preamble) and no session is running for a channel to join"
        )));
    };
    let secret = sh.secret.as_ref();
    let read_init = |stream: &mut Conn, into: &mut [u8]| {
        stream.read_exact(into).map_err(|e| {
            SessionError::Handshake(format!(
                "channel connection from {peer}: reading init packet: {e}"
            ))
        })
    };
    // Both buffers are longer than the first bytes (constants).
    let n = first.len();
    let mut token = [0u8; MAC_LEN];
    let mut buf = [0u8; INIT_PACKET_LEN];
    if secret.is_some() {
        token[..n].copy_from_slice(&first);
        stream.read_exact(&mut token[n..]).map_err(|e| {
            SessionError::Auth(format!(
                "channel connection from {peer}: reading its token: {e}"
            ))
        })?;
        read_init(&mut stream, &mut buf)?;
    } else {
        buf[..n].copy_from_slice(&first);
        read_init(&mut stream, &mut buf[n..])?;
    }
    let init = InitPacket::parse(&buf).map_err(|source| SessionError::Init {
        peer: peer.to_string(),
        source,
    })?;
    if let Some(sec) = secret {
        if !sec.check_channel(
            &keys.nonce_r,
            &keys.nonce_s,
            &keys.uuid,
            init.channel_id,
            &token,
        ) {
            return Err(SessionError::Auth(format!(
                "channel connection from {peer}: its token does not match this receiver's shared secret"
            )));
        }
    }
    if init.uuid != keys.uuid {
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
