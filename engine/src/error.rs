//! Errors of the engine: one per layer (channel, session), each naming what a user needs to
//! find the fault: channel, packet, field.

use std::io;

use thiserror::Error;

// Every error type a pagewire call can return, or one of them can hold, is nameable here.
pub use crate::accel::qpl::QplSetupError;
pub use crate::codec::CodecError;
pub use crate::dirty::DirtyError;
pub use crate::driver::DriverError;
pub use crate::memory::MemoryError;
pub use crate::postcopy::PostcopyError;
pub use crate::session::tls::CredentialsError;
pub use crate::threads::{HookError, SpawnError};
pub use crate::uffd::UffdError;
pub use pagewire_transport::control::ControlError;
pub use pagewire_transport::net::NetError;
pub use pagewire_transport::ring::RingError;
pub use pagewire_transport::tls::TlsError;
pub use pagewire_transport::wire::WireError;

/// Where in a channel's stream an error happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// The channel's init packet.
    Init,
    /// Packet `index` (0-based, counted on this channel) before its header parsed.
    Header { index: u64 },
    /// Packet `index` on this channel, whose header carries `packet_num`.
    Packet { index: u64, packet_num: u64 },
    /// Between packets, after `index` packets.
    Between { index: u64 },
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Init => write!(f, "init packet"),
            Place::Header { index } => write!(f, "packet #{index} header"),
            Place::Packet { index, packet_num } => {
                write!(f, "packet #{index} (packet_num {packet_num})")
            }
            Place::Between { index } => write!(f, "after packet #{index}"),
        }
    }
}

/// What went wrong on a channel.
#[derive(Debug, Error)]
pub enum ChannelErrorKind {
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("page {page} (offset {offset:#x}): {source}")]
    Codec {
        page: usize,
        offset: u64,
        source: CodecError,
    },
    #[error("peer closed the connection mid-{what} ({got} of {need} bytes received)")]
    ClosedMid {
        what: &'static str,
        got: usize,
        need: usize,
    },
    #[error("peer closed the connection before the session ended")]
    Closed,
    #[error(
        "peer closed the channel with {packets} packet(s) after its last SYNC (round not ended)"
    )]
    OpenRound { packets: u64 },
    #[error("field flags: expected the opening SYNC the hello announced, got a packet with pages")]
    NoOpeningSync,
    #[error("peer idle for {secs:.1} s (idle timeout)")]
    Idle { secs: f64 },
    #[error("socket: {0}")]
    Io(#[source] io::Error),
    #[error("{0}")]
    Ring(#[from] RingError),
    #[error("stopped: the session failed elsewhere")]
    Aborted,
    /// Receiver-allocated memory: the pages written so far would take the committed memory
    /// over `ReceiverConfig::max_memory`.
    #[error(
        "the sender's data would commit {committed} bytes of guest memory, over this receiver's limit of {limit} bytes (max_memory; pages never written cost nothing)"
    )]
    MemoryLimit { committed: u64, limit: u64 },
    #[error("{0}")]
    Tls(#[from] pagewire_transport::tls::TlsError),
}

/// An error on one channel.
#[derive(Debug, Error)]
#[error("channel {channel}, {place}: {kind}")]
pub struct ChannelError {
    pub channel: u16,
    pub place: Place,
    #[source]
    pub kind: ChannelErrorKind,
}

/// Errors of a session (sender or receiver).
#[derive(Debug, Error)]
pub enum SessionError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("qpl: {0}")]
    Qpl(#[from] crate::accel::qpl::QplSetupError),
    #[error(transparent)]
    Postcopy(#[from] crate::postcopy::PostcopyError),
    #[error(transparent)]
    Credentials(#[from] crate::session::tls::CredentialsError),
    #[error(transparent)]
    Tls(#[from] pagewire_transport::tls::TlsError),
    /// The peer's hello or handshake does not fit this side.
    #[error("handshake: {0}")]
    Handshake(String),
    /// A channel connection's init packet is wrong.
    #[error("channel connection from {peer}: {source}")]
    Init { peer: String, source: WireError },
    /// A peer failed authentication, or the two sides disagree on using a secret.
    #[error("authentication failed: {0}")]
    Auth(String),
    /// The peer reported an error and ended the session.
    #[error("peer reported: {0}")]
    Peer(String),
    /// The peer said something out of order.
    #[error("control: expected {expected}, got {got}")]
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
    /// No session came before the accept timeout, and connections were refused meanwhile.
    #[error("no session within {waited:.1} s: {refused} connection(s) refused, the last because: {last}")]
    NoSession {
        waited: f64,
        refused: u64,
        last: String,
    },
    /// Receiver: a connection did not complete its handshake (control preamble, challenge
    /// and hello; or a channel's token and init packet) within the handshake timeout (the
    /// idle timeout), counted from when it was accepted; it was closed.
    #[error("connection from {peer} did not complete its handshake within {secs:.1} s (still waiting for {waiting_for}); closed")]
    HandshakeTimeout {
        peer: String,
        secs: f64,
        /// What the receiver was waiting for: "its first bytes", "its hello", ...
        waiting_for: &'static str,
    },
    /// Receiver: a control connection for another session arrived while a session runs;
    /// a receiver serves one session at a time. A sender sees this text as the peer's error.
    #[error("this receiver is busy with another session (one at a time); try again when it ends")]
    Busy,
    /// A peer did not do what the protocol requires in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// Configuration not usable.
    #[error("configuration: {0}")]
    Config(String),
    /// A thread could not be started, or the embedder's [`ThreadHook`](crate::threads::ThreadHook)
    /// failed on it (it ran nothing else).
    #[error(transparent)]
    Thread(#[from] crate::threads::SpawnError),
    /// A thread of the session died unexpectedly (a bug).
    #[error("internal: {0}")]
    Internal(String),
    /// `abort()` was called.
    #[error("session aborted")]
    Aborted,
    /// Receiver: the source abandoned the migration ([`crate::Sender::abandon`], a driver
    /// that gave up, a cancelled or dropped session): its guest keeps running there, and
    /// what arrived here is to be discarded. Not a network failure.
    #[error("the source abandoned the migration: {reason}")]
    Abandoned {
        /// The source's reason.
        reason: String,
    },
    /// Sender: every round was acknowledged and `End` was sent, but the receiver's answer
    /// (`EndOk` or an error) did not arrive. The destination may hold everything and have
    /// completed, or may have failed while committing: this side cannot know.
    #[error(
        "outcome unknown: every round was acknowledged and the end was sent, but the \
         destination's confirmation did not arrive ({0}); it may or may not have completed"
    )]
    Unconfirmed(String),
    /// Receiver: every page arrived, but committing what was received (the embedder's commit
    /// step, e.g. writing the memory to a file) failed; the sender was told.
    #[error("the session's data arrived but could not be committed: {0}")]
    Commit(String),
}

impl SessionError {
    /// True when the session's outcome on the other side is unknown
    /// ([`SessionError::Unconfirmed`]): a sender should neither discard the source (the
    /// destination may not have completed) nor assume failure (it may have).
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, SessionError::Unconfirmed(_))
    }
}
