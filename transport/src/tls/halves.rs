//! A connection split into its two directions, each usable from its own thread: post-copy
//! reads pages on a connection while another thread writes page requests on it.
//!
//! Clear text: two handles of the socket. TLS: the reading half owns the
//! [`RecordReader`], the writing half the [`Sealer`]; a KeyUpdate the peer asks for
//! (`update_requested`) is passed from the reader to the writer through a shared flag,
//! which the writer honours before its next record, as one [`TlsStream`] does.
//!
//! [`TlsStream`]: super::TlsStream

use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::{Conn, Need, RecordReader, Sealer, TlsError};

/// The receiving direction of a split [`Conn`].
#[derive(Debug)]
pub struct ReadHalf {
    tcp: TcpStream,
    rx: Option<RecordReader>,
    update: Arc<AtomicBool>,
}

/// The sending direction of a split [`Conn`].
#[derive(Debug)]
pub struct WriteHalf {
    tcp: TcpStream,
    tx: Option<Sealer>,
    update: Arc<AtomicBool>,
    /// Reused buffer of sealed records.
    out: Vec<u8>,
}

impl Conn {
    /// Split into a reading and a writing half (the reader keeps whatever the connection
    /// had buffered). Fails only if the socket cannot be duplicated.
    // Without the `tls` feature a TLS connection cannot exist: its arm is unreachable.
    #[cfg_attr(not(feature = "tls"), allow(unreachable_code))]
    pub fn split(self) -> io::Result<(ReadHalf, WriteHalf)> {
        let update = Arc::new(AtomicBool::new(false));
        let (tcp, tx, rx) = match self {
            Conn::Clear(s) => (s, None, None),
            Conn::Tls(t) => {
                let (tcp, tx, rx) = t.into_parts();
                (tcp, Some(tx), Some(rx))
            }
        };
        let read = ReadHalf {
            tcp: tcp.try_clone()?,
            rx,
            update: update.clone(),
        };
        let write = WriteHalf {
            tcp,
            tx,
            update,
            out: Vec::new(),
        };
        Ok((read, write))
    }
}

impl ReadHalf {
    /// The socket (timeouts, shutdown).
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }
}

impl Read for ReadHalf {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(rx) = self.rx.as_mut() else {
            return self.tcp.read(buf);
        };
        let update = &self.update;
        read_records(&mut self.tcp, rx, buf, || {
            update.store(true, Ordering::Release)
        })
    }
}

impl WriteHalf {
    /// The socket (timeouts, shutdown).
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Write `pieces` as one message: one vectored write loop in clear text; sealed in one
    /// pass (straight from the pieces into records) and written with TLS.
    pub fn write_pieces(&mut self, pieces: &[&[u8]]) -> io::Result<()> {
        let Some(tx) = self.tx.as_mut() else {
            let mut iov: Vec<IoSlice<'_>> = pieces.iter().map(|p| IoSlice::new(p)).collect();
            let mut slices = &mut iov[..];
            while !slices.is_empty() {
                let n = self.tcp.write_vectored(slices)?;
                if n == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                IoSlice::advance_slices(&mut slices, n);
            }
            return Ok(());
        };
        if self.update.swap(false, Ordering::AcqRel) {
            tx.request_key_update();
        }
        self.out.clear();
        tx.seal(pieces.iter().copied(), &mut self.out)?;
        self.tcp.write_all(&self.out)
    }
}

impl Write for WriteHalf {
    /// Writes all of `buf` (sealed, with TLS), so the return value is always `buf.len()`.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.write_pieces(&[buf]).map(|()| buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

/// Read plaintext of a TLS connection into `buf`: what `rx` holds opened, else the next
/// record (reading the socket as needed). `Ok(0)` only at a record boundary; `on_update`
/// runs when the peer asks this side to update its sending key.
pub(crate) fn read_records(
    tcp: &mut TcpStream,
    rx: &mut RecordReader,
    buf: &mut [u8],
    mut on_update: impl FnMut(),
) -> io::Result<usize> {
    if buf.is_empty() {
        return Ok(0);
    }
    loop {
        let p = rx.plaintext();
        if !p.is_empty() {
            let n = p.len().min(buf.len());
            if let (Some(dst), Some(src)) = (buf.get_mut(..n), p.get(..n)) {
                dst.copy_from_slice(src);
            }
            rx.consume(n);
            return Ok(n);
        }
        if rx.open_next()? {
            if rx.take_update_request() {
                on_update();
            }
            continue;
        }
        let n = tcp.read(rx.space())?;
        if n == 0 {
            return match rx.need() {
                Need::Boundary => Ok(0),
                Need::MidRecord { have, want } => Err(TlsError::Truncated { have, want }.into()),
            };
        }
        rx.filled(n);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn clear_halves_carry_both_directions_at_once() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let (mut ar, mut aw) = Conn::Clear(a).split().unwrap();
        let (mut br, mut bw) = Conn::Clear(b).split().unwrap();
        let t = std::thread::spawn(move || {
            let mut got = [0u8; 6];
            br.read_exact(&mut got).unwrap();
            bw.write_pieces(&[b"pong", &got[..2]]).unwrap();
            got
        });
        aw.write_pieces(&[b"pi", b"ng", b"!!"]).unwrap();
        let mut back = [0u8; 6];
        ar.read_exact(&mut back).unwrap();
        assert_eq!(&t.join().unwrap(), b"ping!!");
        assert_eq!(&back, b"pongpi");
    }
}
