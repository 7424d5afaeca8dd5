//! The TLS types of a build without the `tls` feature: they have no values, so no connection
//! is ever TLS, and code written for both kinds of connection (a match on [`Conn::Tls`], an
//! `Option<RecordReader>`) compiles unchanged with its TLS branches provably unreachable.
//! Each method takes `&self` of a type that cannot exist, so its body is an empty match.
//!
//! [`Conn::Tls`]: super::Conn::Tls

use std::io::{self, Read, Write};
use std::net::TcpStream;

use super::{Need, TlsError};

/// A TLS connection; without the `tls` feature there are none.
#[derive(Debug)]
pub enum TlsStream {}

impl TlsStream {
    /// The parts, for a channel loop that does its own I/O.
    pub fn into_parts(self) -> (TcpStream, Sealer, RecordReader) {
        match self {}
    }

    /// The AEAD negotiated.
    pub fn suite(&self) -> &'static str {
        match *self {}
    }

    /// KeyUpdates (sent, received) so far.
    pub fn key_updates(&self) -> (u64, u64) {
        match *self {}
    }

    pub(crate) fn tcp(&self) -> &TcpStream {
        match *self {}
    }

    pub(crate) fn has_buffered(&self) -> bool {
        match *self {}
    }
}

impl Read for TlsStream {
    fn read(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        match *self {}
    }
}

impl Write for TlsStream {
    fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
        match *self {}
    }

    fn flush(&mut self) -> io::Result<()> {
        match *self {}
    }
}

/// The sending direction of a TLS connection; without the `tls` feature there are none.
#[derive(Debug)]
pub enum Sealer {}

impl Sealer {
    /// Plaintext bytes per record.
    pub fn record_size(&self) -> usize {
        match *self {}
    }

    /// KeyUpdates sent so far.
    pub fn key_updates(&self) -> u64 {
        match *self {}
    }

    /// Bytes on the wire for `plain` bytes of plaintext.
    pub fn sealed_len(&self, _plain: usize) -> usize {
        match *self {}
    }

    /// Update the sending key before the next record.
    pub fn request_key_update(&mut self) {
        match *self {}
    }

    /// Seal `pieces` into records appended to `out`.
    pub fn seal<'a, I>(&mut self, _pieces: I, _out: &mut Vec<u8>) -> Result<(), TlsError>
    where
        I: IntoIterator<Item = &'a [u8]>,
    {
        match *self {}
    }
}

/// The receiving direction of a TLS connection; without the `tls` feature there are none.
#[derive(Debug)]
pub enum RecordReader {}

// As the real reader (it owns the buffer a ring may write into: a channel that cannot reap
// a receive leaks it with `mem::forget`), so code that forgets one means the same in both
// builds.
impl Drop for RecordReader {
    fn drop(&mut self) {
        match *self {}
    }
}

impl RecordReader {
    /// The buffer the socket's ciphertext is received into (base, length).
    pub fn region(&mut self) -> (*mut u8, usize) {
        match *self {}
    }

    /// Records opened so far.
    pub fn records(&self) -> u64 {
        match *self {}
    }

    /// KeyUpdates received so far.
    pub fn key_updates(&self) -> u64 {
        match *self {}
    }

    /// Whether the peer asked for a KeyUpdate of this side's sending key (cleared).
    pub fn take_update_request(&mut self) -> bool {
        match *self {}
    }

    /// Authenticated plaintext not yet consumed.
    pub fn plaintext(&self) -> &[u8] {
        match *self {}
    }

    /// Mark `n` bytes of [`RecordReader::plaintext`] as used.
    pub fn consume(&mut self, _n: usize) {
        match *self {}
    }

    /// Whether the stream may end here.
    pub fn need(&self) -> Need {
        match *self {}
    }

    /// Free room for ciphertext.
    pub fn space(&mut self) -> &mut [u8] {
        match *self {}
    }

    /// `n` bytes of ciphertext were written into [`RecordReader::space`].
    pub fn filled(&mut self, _n: usize) {
        match *self {}
    }

    /// Open the next whole record, if one is buffered.
    pub fn open_next(&mut self) -> Result<bool, TlsError> {
        match *self {}
    }
}
