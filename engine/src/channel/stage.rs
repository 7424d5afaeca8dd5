//! What happens to a ready packet between its slot and the ring.
//!
//! A sending channel hands every ready packet — its iovecs over the header, the length
//! array, guest pages and compressed pages — to its [`SendStage`] before the first send.
//! [`Clear`] sends the pieces as they are (and lets the kernel read them in place with
//! SENDMSG_ZC); [`TlsSeal`] seals them into TLS records in the slot's own buffer, reading
//! each piece once, and the ring sends that buffer. A kernel-TLS stage would be a third
//! implementation: keys handed to the socket once, pieces passed through like [`Clear`].

use pagewire_transport::tls::Sealer;

use crate::error::ChannelErrorKind;

/// The transformation between a ready slot and the ring.
pub trait SendStage: Send + std::fmt::Debug {
    /// Prepare a packet for sending: `iov` lists its bytes in order; the stage may replace
    /// it with iovecs over `out`, a buffer the slot owns for the packet's lifetime.
    ///
    /// # Safety
    /// Every iovec in `iov` must point at `iov_len` readable bytes for the whole call.
    unsafe fn prepare(
        &mut self,
        iov: &mut Vec<libc::iovec>,
        out: &mut Vec<u8>,
    ) -> Result<(), ChannelErrorKind>;

    /// Whether the kernel may read the packet's pieces in place (zero copy can pay).
    fn zero_copy(&self) -> bool;

    /// TLS KeyUpdates sent so far (clear text: none).
    fn key_updates(&self) -> u64;
}

/// Clear text: the pieces go out as they are.
#[derive(Debug, Default)]
pub struct Clear;

impl SendStage for Clear {
    unsafe fn prepare(
        &mut self,
        _iov: &mut Vec<libc::iovec>,
        _out: &mut Vec<u8>,
    ) -> Result<(), ChannelErrorKind> {
        Ok(())
    }

    fn zero_copy(&self) -> bool {
        true
    }

    fn key_updates(&self) -> u64 {
        0
    }
}

/// TLS 1.3: the packet's pieces are gathered record by record into `out` and sealed in place.
#[derive(Debug)]
pub struct TlsSeal {
    sealer: Sealer,
}

impl TlsSeal {
    pub fn new(sealer: Sealer) -> TlsSeal {
        TlsSeal { sealer }
    }
}

impl SendStage for TlsSeal {
    unsafe fn prepare(
        &mut self,
        iov: &mut Vec<libc::iovec>,
        out: &mut Vec<u8>,
    ) -> Result<(), ChannelErrorKind> {
        let plain: usize = iov.iter().map(|v| v.iov_len).sum();
        let need = self.sealer.sealed_len(plain);
        if out.capacity() < need {
            out.reserve(need - out.len());
        }
        let pieces = iov.iter().filter(|v| v.iov_len > 0).map(|v| {
            // SAFETY: the caller guarantees each iovec points at iov_len readable bytes
            // for the duration of this call.
            unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) }
        });
        self.sealer.seal(pieces, out)?;
        iov.clear();
        iov.push(libc::iovec {
            iov_base: out.as_mut_ptr().cast(),
            iov_len: out.len(),
        });
        Ok(())
    }

    fn zero_copy(&self) -> bool {
        false
    }

    fn key_updates(&self) -> u64 {
        self.sealer.key_updates()
    }
}

/// A sending channel's socket and stage for a connection after its set-up.
// Without the `tls` feature a TLS connection cannot exist: its arm is unreachable.
#[cfg_attr(not(feature = "tls"), allow(unreachable_code))]
pub fn for_sending(
    conn: pagewire_transport::tls::Conn,
) -> (std::net::TcpStream, Box<dyn SendStage>) {
    match conn {
        pagewire_transport::tls::Conn::Clear(s) => (s, Box::new(Clear)),
        pagewire_transport::tls::Conn::Tls(t) => {
            // The receive direction is unused: a receiver sends nothing on a channel.
            let (tcp, tx, _rx) = t.into_parts();
            (tcp, Box::new(TlsSeal::new(tx)))
        }
    }
}
