//! TLS 1.3 for the control connection and every channel: rustls runs the handshake (mutual
//! X.509 authentication), then pagewire's own record layer ([`record`]) seals and opens the
//! records with the keys rustls derived, so the engine can seal straight from guest memory
//! into its send buffers and open records in its receive buffers (see `docs/design.md`).
//!
//! * [`handshake`]: client and server handshakes over a blocking [`TcpStream`], ending with
//!   the traffic keys.
//! * [`record`]: sans-IO sealing and opening of records.
//! * [`Conn`]: a connection that is clear text or TLS, with blocking `Read`/`Write` (for the
//!   control protocol and channel set-up); the channel loops take its parts, and
//!   [`Conn::split`] gives its two directions to two threads ([`ReadHalf`], [`WriteHalf`]).
//!
//! Built without the crate's `tls` feature (no rustls, no aws-lc), `handshake` and `record`
//! are absent and [`TlsStream`], [`Sealer`] and [`RecordReader`] are types without values:
//! every [`Conn`] is [`Conn::Clear`], and code that matches on `Conn::Tls` or holds an
//! `Option<RecordReader>` compiles unchanged, its TLS branches provably never taken.

#[cfg(not(feature = "tls"))]
mod absent;
mod halves;
#[cfg(feature = "tls")]
pub mod handshake;
#[cfg(feature = "tls")]
pub mod record;

use std::io::{self, Read, Write};
use std::net::TcpStream;

use thiserror::Error;

#[cfg(not(feature = "tls"))]
pub use absent::{RecordReader, Sealer, TlsStream};
pub use halves::{ReadHalf, WriteHalf};
#[cfg(feature = "tls")]
pub use handshake::{client, server};
#[cfg(feature = "tls")]
pub use record::{Direction, RecordReader, Sealer, Suite};
/// The rustls this layer is built on (its key types build a [`Direction`]).
#[cfg(feature = "tls")]
pub use rustls;

/// Plaintext bytes per record by default (the largest TLS allows: per-record cost is noise).
#[cfg(feature = "tls")]
pub const DEFAULT_RECORD_SIZE: usize = record::MAX_PLAINTEXT;
/// Bytes of ciphertext a reader buffers (several records per receive).
#[cfg(feature = "tls")]
pub const READ_BUFFER: usize = 32 * (record::HEADER_LEN + record::MAX_BODY);

/// Where the next bytes of a [`RecordReader`] come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Nothing is buffered: the stream may end cleanly here.
    Boundary,
    /// A record is partly buffered (`have` of `want` bytes, header included).
    MidRecord { have: usize, want: usize },
}

/// Record-layer settings of a connection.
#[cfg(feature = "tls")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordConfig {
    /// Plaintext bytes per record (clamped to 1..=16384).
    pub record_size: usize,
    /// Records one key may protect (each side updates its sending key at half of it). Only
    /// tests lower it from [`record::MAX_RECORDS`], to see many key updates in a short session.
    #[doc(hidden)]
    pub records_per_key: u64,
}

#[cfg(feature = "tls")]
impl Default for RecordConfig {
    fn default() -> Self {
        RecordConfig {
            record_size: DEFAULT_RECORD_SIZE,
            records_per_key: record::MAX_RECORDS,
        }
    }
}

/// Errors of the TLS layer.
#[derive(Debug, Error)]
pub enum TlsError {
    #[cfg(feature = "tls")]
    #[error("TLS handshake failed: {0}")]
    Handshake(rustls::Error),
    #[error(
        "TLS: the peer does not speak TLS ({detail}); set `Config::tls` on both sides or on neither"
    )]
    NotTls { detail: String },
    #[cfg(feature = "tls")]
    #[error(
        "TLS: the peer sent alert '{0:?}' (it refused this side's certificate or the handshake)"
    )]
    Alert(rustls::AlertDescription),
    #[error("TLS: record {record} failed authentication: the stream was altered, reordered or cut in transit")]
    Auth { record: u64 },
    #[error("TLS: record {record} is malformed: {detail}")]
    BadRecord { record: u64, detail: String },
    #[error("TLS: the connection ended in the middle of a record ({have} of {want} bytes)")]
    Truncated { have: usize, want: usize },
    #[error("TLS: {limit} records under one key without a KeyUpdate, the most AES-GCM allows (RFC 8446 §5.5)")]
    KeyExhausted { limit: u64 },
    #[error("TLS set-up: {0}")]
    Setup(String),
    #[error("TLS I/O: {0}")]
    Io(#[from] io::Error),
}

/// Put back our own error types from inside an `io::Error` (what the `Read`/`Write` of a
/// connection return); any other error as [`TlsError::Io`].
pub fn unwrap_io(e: io::Error) -> TlsError {
    if e.get_ref().is_some_and(|i| i.is::<TlsError>()) {
        match e.into_inner().map(|i| i.downcast::<TlsError>()) {
            Some(Ok(t)) => *t,
            _ => TlsError::Setup("unreadable error".into()),
        }
    } else {
        TlsError::Io(e)
    }
}

impl From<TlsError> for io::Error {
    fn from(e: TlsError) -> io::Error {
        match e {
            TlsError::Io(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}

/// A TLS connection after its handshake: the socket, the sending direction's sealer and the
/// receiving direction's reader.
#[cfg(feature = "tls")]
#[derive(Debug)]
pub struct TlsStream {
    tcp: TcpStream,
    tx: Sealer,
    rx: RecordReader,
    /// Reused record buffer for `write`.
    out: Vec<u8>,
}

#[cfg(feature = "tls")]
impl TlsStream {
    pub(crate) fn new(tcp: TcpStream, tx: Sealer, rx: RecordReader) -> TlsStream {
        TlsStream {
            tcp,
            tx,
            rx,
            out: Vec::new(),
        }
    }

    /// The parts, for a channel loop that does its own I/O (the reader keeps whatever it
    /// has buffered beyond what was read so far).
    pub fn into_parts(mut self) -> (TcpStream, Sealer, RecordReader) {
        if self.rx.take_update_request() {
            self.tx.request_key_update();
        }
        (self.tcp, self.tx, self.rx)
    }

    /// The AEAD negotiated.
    pub fn suite(&self) -> &'static str {
        self.tx.suite()
    }

    /// KeyUpdates (sent, received) so far.
    pub fn key_updates(&self) -> (u64, u64) {
        (self.tx.key_updates(), self.rx.key_updates())
    }

    /// The socket.
    pub(crate) fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Whether decrypted bytes, or part of a record, wait in user space.
    pub(crate) fn has_buffered(&self) -> bool {
        !self.rx.plaintext().is_empty() || self.rx.need() != Need::Boundary
    }
}

#[cfg(feature = "tls")]
impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (tcp, rx, tx) = (&mut self.tcp, &mut self.rx, &mut self.tx);
        halves::read_records(tcp, rx, buf, || tx.request_key_update())
    }
}

#[cfg(feature = "tls")]
impl Write for TlsStream {
    /// Seals `buf` into records and writes them (a short socket write is finished here, so
    /// the return value is always `buf.len()`).
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut out = std::mem::take(&mut self.out);
        let res = self
            .tx
            .seal([buf], &mut out)
            .map_err(io::Error::from)
            .and_then(|()| self.tcp.write_all(&out));
        self.out = out;
        res.map(|()| buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

/// A control or channel connection: clear text, or TLS after its handshake (without the
/// `tls` feature, [`TlsStream`] has no values and every connection is `Clear`).
#[derive(Debug)]
pub enum Conn {
    Clear(TcpStream),
    Tls(Box<TlsStream>),
}

impl Conn {
    /// The socket (for timeouts, shutdown, polling).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Clear(s) => s,
            Conn::Tls(t) => t.tcp(),
        }
    }

    /// Whether decrypted bytes wait in user space (a poll on the socket would not see them).
    pub fn has_buffered(&self) -> bool {
        match self {
            Conn::Clear(_) => false,
            Conn::Tls(t) => t.has_buffered(),
        }
    }

    /// Whether this connection is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, Conn::Tls(_))
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Clear(s) => s.read(buf),
            Conn::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Clear(s) => s.write(buf),
            Conn::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Clear(s) => s.flush(),
            Conn::Tls(t) => t.flush(),
        }
    }
}
