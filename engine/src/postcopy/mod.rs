//! Post-copy: the guest runs on the destination before its memory has arrived; a page it
//! touches is requested from the source and placed before the vCPU continues.
//!
//! * The sender switches with [`crate::Sender::switch_to_postcopy`] after any number of
//!   pre-copy rounds (zero: pure post-copy), naming the pages the destination does not hold
//!   yet (or holds stale). It closes its pre-copy channels, tells the receiver which pages
//!   will come (the receiver discards them so that they are *missing*), and opens one
//!   **urgent** connection and `channels` **background** connections, opened like
//!   channels (TLS on a TLS session, init packet and, with a secret, a token).
//! * The receiver registers guest memory with userfaultfd in missing mode
//!   and hands the memory to the embedder ([`crate::Receiver::on_postcopy`]). A fault thread
//!   reads faults and writes a [`PageRequest`] per missing page on the urgent connection.
//!   Pages never land in registered memory by a receive: every packet is read into the
//!   connection's own buffer and placed with UFFDIO_COPY, which wakes the faulting thread.
//! * The source answers each request on the urgent connection alone (one page per packet),
//!   so it never queues behind the background stream's bytes, and moves the background
//!   streams' cursor to just after the faulting page (the guest's locality). A guest reading
//!   in order also gets the page's unsent neighbours, in a packet after it.
//! * The receiver reports `PostcopyDone` once every page is placed; the session then ends
//!   with `End`/`EndOk` as always.
//! * Broken connections are replaced (at most [`MAX_RECONNECTS`] times): the
//!   destination keeps its placed pages and outstanding requests; the source comes back (on a
//!   new control connection too, authenticated like the first, if that one broke), the
//!   destination tells it which pages it still lacks and re-sends the requests on the new
//!   urgent connection.
//!
//! Packets on post-copy connections use the multifd RAM packet format, in the session's
//! framing (raw with codec none; otherwise the qpl framing, each packet compressed where it
//! pays, see `squeeze.rs`), and carry no SYNC. Their threads run where
//! [`crate::config::PostcopyCpus`] says. On a TLS session they travel in the session's records
//! (each connection split into a reading and a writing half, the fault thread writing
//! requests while a receiver reads pages); a record that fails authentication fails the
//! session, a connection cut mid-record is replaced. See docs/wire-format.md.
//!
//! One pre-copy round, then post-copy of the page dirtied since (runs as a doctest; zero
//! rounds before the switch is pure post-copy):
//!
//! ```
//! use std::sync::Arc;
//! use pagewire::{Block, BlockPages, GuestRam, ReceiveInto, Receiver, ReceiverConfig, RoundPages, Sender, SenderConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # if pagewire::postcopy::available().is_err() { return Ok(()); } // no userfaultfd here
//! const SIZE: usize = 8 << 20;
//! // Destination: the VMM starts the guest as soon as post-copy begins.
//! let mut receiver = Receiver::bind("127.0.0.1:0".parse()?, ReceiverConfig::default())?;
//! let addr = receiver.local_addr()?;
//! let (start_guest, guest_may_run) = std::sync::mpsc::channel();
//! receiver.on_postcopy(move |start| {
//!     let _ = start_guest.send(start.memory);
//! });
//! let dst = Arc::new(GuestRam::new(vec![Block::anonymous("pc.ram", SIZE)?])?);
//! let into = dst.clone();
//! let destination = std::thread::spawn(move || receiver.serve(ReceiveInto::Memory(into)));
//!
//! // Source: one pre-copy round of every page.
//! let ram = Block::anonymous("pc.ram", SIZE)?;
//! // SAFETY: the block is new and nothing else uses it yet.
//! let bytes = unsafe { ram.as_mut_slice() };
//! bytes.fill(1);
//! let src = Arc::new(GuestRam::new(vec![ram])?);
//! let mut sender = Sender::connect(addr, SenderConfig::default(), src.clone())?;
//! sender.send_round(RoundPages::all(&[SIZE as u64], 4096, 128))?;
//! // The guest dirtied page 9 meanwhile; pause it and switch: post-copy delivers page 9.
//! // SAFETY: no round is running.
//! let bytes = unsafe { src.block(0).expect("block").as_mut_slice() };
//! bytes[9 * 4096] = 42;
//! let postcopy = sender.switch_to_postcopy(vec![(0, BlockPages::Offsets(vec![9 * 4096]))])?;
//!
//! // The guest runs on the destination now; reading page 9 fetches it first.
//! let guest = guest_may_run.recv()?;
//! let page9 = guest.block(0).expect("block").range_ptr(9 * 4096, 4096).expect("page");
//! // SAFETY: inside guest memory; the read waits until page 9 is placed.
//! assert_eq!(unsafe { std::ptr::read_volatile(page9) }, 42);
//!
//! let source = postcopy.finish()?;
//! assert_eq!((source.precopy.rounds, source.pages), (1, 1));
//! let done = destination.join().expect("receiver thread")?;
//! assert_eq!(done.postcopy.expect("post-copy ran").pages, 1);
//! # Ok(()) }
//! ```

pub(crate) mod dest;
pub(crate) mod source;
mod squeeze;

use std::io;
use std::time::Duration;

use pagewire_transport::wire::WireError;
use thiserror::Error;

use crate::uffd::UffdError;

pub(crate) use dest::PostcopyHook;
pub use dest::{PostcopyStart, PostcopyStats};

/// Whether this host lets the destination run post-copy: userfaultfd can be opened (the
/// kernel has it, and `vm.unprivileged_userfaultfd` or the process's privileges allow it).
/// A destination that cannot fails the switch with the same error; check before offering
/// post-copy.
pub fn available() -> Result<(), UffdError> {
    crate::uffd::Uffd::new().map(|_| ())
}

/// The error of a failed read or write on post-copy connection `what`: a record that failed
/// TLS (altered or reordered in transit) fails the session, since a new connection over the
/// same path cannot be trusted more; anything else is a broken connection, which is
/// replaced (a connection cut mid-record included).
pub(crate) fn conn_error(what: &'static str, e: io::Error) -> PostcopyError {
    use pagewire_transport::tls::{unwrap_io, TlsError};
    match unwrap_io(e) {
        TlsError::Io(source) => PostcopyError::Io { what, source },
        t @ TlsError::Truncated { .. } => PostcopyError::Io {
            what,
            source: t.into(),
        },
        t => PostcopyError::Tls { what, source: t },
    }
}

pub use source::{
    PostcopySender, PostcopySourceStats, MAX_RECONNECTS, NEIGHBOUR_WINDOW, URGENT_NEIGHBOURS,
};

/// Magic of a page request ("PWPR").
pub const REQUEST_MAGIC: [u8; 4] = *b"PWPR";
/// Length of a page request on the wire.
pub const REQUEST_LEN: usize = 16;
/// Most background connections a post-copy session may open.
pub const MAX_BACKGROUND: u16 = 64;

/// Nice value of the threads on the fault path (both ends): a fault's round trip wakes three
/// of them, and each must not wait for a background thread's time slice to end.
pub const FAULT_PATH_NICE: i32 = -10;

/// Set up the calling thread for the fault path: its CPUs (`PostcopyCpus::fault_path`), a
/// raised priority (best effort: unprivileged processes keep the default, logged at debug
/// level).
pub(crate) fn fault_path_thread(cpus: &crate::pin::PostcopyCpus) {
    crate::pin::apply_set(&cpus.fault_path, "post-copy fault path");
    if let Err(e) = crate::pin::set_current_thread_nice(FAULT_PATH_NICE) {
        tracing::debug!(error = %e, "cannot raise the fault path's priority; running at default");
    }
}

/// Set up the calling thread for the background stream: its CPUs
/// (`PostcopyCpus::background`).
pub(crate) fn background_thread(cpus: &crate::pin::PostcopyCpus) {
    crate::pin::apply_set(&cpus.background, "post-copy background");
}

/// Errors of post-copy.
#[derive(Debug, Error)]
pub enum PostcopyError {
    /// A page request from the destination does not name a page of this guest.
    #[error("page request #{index} refused: {detail}")]
    BadRequest { index: u64, detail: String },
    /// A post-copy connection failed.
    #[error("post-copy {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// A packet on a post-copy connection is invalid.
    #[error("post-copy {what}, packet #{index}: {source}")]
    Wire {
        what: &'static str,
        index: u64,
        #[source]
        source: WireError,
    },
    /// A record on a post-copy connection failed TLS: the stream was altered or reordered
    /// in transit. Fails the session (nothing of the record was placed).
    #[error("post-copy {what}: {source}")]
    Tls {
        what: &'static str,
        #[source]
        source: pagewire_transport::tls::TlsError,
    },
    /// The page decoder could not be made (`ReceiverConfig::decoder` qpl without libqpl).
    #[error("post-copy: no page decoder: {0}")]
    Decoder(String),
    /// A compressed page of a background packet does not inflate to exactly one page.
    #[error("post-copy {what}, packet #{index}, page {page}: {source}")]
    Decode {
        what: &'static str,
        index: u64,
        page: usize,
        #[source]
        source: crate::codec::CodecError,
    },
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// The peer broke the post-copy protocol.
    #[error("post-copy: {0}")]
    Protocol(String),
    /// A post-copy thread could not be started (or the embedder's thread hook failed on it).
    #[error("post-copy: {0}")]
    Thread(#[from] crate::threads::SpawnError),
    /// Destination: the source closed every connection and did not come back (it was killed,
    /// or it closed them): the pages it had not sent will never arrive, so the guest, which
    /// runs here already, cannot continue. Its memory stays registered: a thread touching a
    /// missing page blocks, it never reads zeros.
    #[error("post-copy: the source is gone (it closed its connections and did not come back within {waited:.1} s); {missing} pages never arrived, the guest cannot continue")]
    SourceGone {
        /// Seconds waited for the source to come back.
        waited: f64,
        /// Pages that never arrived.
        missing: u64,
    },
}

/// One page request (destination → source on the urgent connection): magic "PWPR", block
/// index u32, byte offset u64, big-endian.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRequest {
    pub block: u32,
    pub offset: u64,
}

impl PageRequest {
    /// The 16 wire bytes.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC);
        b[4..8].copy_from_slice(&self.block.to_be_bytes());
        b[8..].copy_from_slice(&self.offset.to_be_bytes());
        b
    }

    /// Parse and validate against the guest's layout (`block_sizes` in bytes): magic, block
    /// index in range, offset page-aligned and the page inside the block. Returns
    /// (block index, offset) or what is wrong.
    pub fn decode(
        b: &[u8; REQUEST_LEN],
        block_sizes: &[u64],
        page_size: u32,
    ) -> Result<(usize, u64), String> {
        if b[..4] != REQUEST_MAGIC {
            return Err(format!("bad magic {:02x?} (expected \"PWPR\")", &b[..4]));
        }
        let mut w = [0u8; 4];
        w.copy_from_slice(&b[4..8]);
        let block = u32::from_be_bytes(w);
        let mut o = [0u8; 8];
        o.copy_from_slice(&b[8..]);
        let offset = u64::from_be_bytes(o);
        let Some(&size) = block_sizes.get(block as usize) else {
            return Err(format!(
                "block {block} out of range ({} blocks)",
                block_sizes.len()
            ));
        };
        if offset % page_size as u64 != 0 {
            return Err(format!(
                "offset {offset:#x} in block {block} is not a multiple of the page size {page_size}"
            ));
        }
        if offset
            .checked_add(page_size as u64)
            .is_none_or(|end| end > size)
        {
            return Err(format!(
                "offset {offset:#x} is outside block {block} ({size} bytes)"
            ));
        }
        Ok((block as usize, offset))
    }
}

/// Fault latencies (fault read → page placed), with the figures QEMU reports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Latencies {
    ns: Vec<u64>,
}

impl Latencies {
    /// Add one.
    pub fn record(&mut self, d: Duration) {
        self.ns
            .push(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }
    /// Merge another set.
    pub fn extend(&mut self, other: &Latencies) {
        self.ns.extend_from_slice(&other.ns);
    }
    /// Samples.
    pub fn len(&self) -> usize {
        self.ns.len()
    }
    /// No samples.
    pub fn is_empty(&self) -> bool {
        self.ns.is_empty()
    }
    /// The `p`-th percentile (0..=100, nearest rank), `None` without samples.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        let mut v = self.ns.clone();
        v.sort_unstable();
        let n = v.len();
        if n == 0 {
            return None;
        }
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        v.get(rank.clamp(1, n) - 1)
            .map(|&x| Duration::from_nanos(x))
    }
    /// The largest.
    pub fn max(&self) -> Option<Duration> {
        self.ns.iter().max().map(|&x| Duration::from_nanos(x))
    }
    /// Power-of-two microsecond histogram (as QEMU's postcopy-latency-dist): entry `i` counts
    /// latencies in `[2^i, 2^(i+1))` µs, entry 0 also those under 1 µs. Trailing empty
    /// buckets are omitted.
    pub fn histogram(&self) -> Vec<u64> {
        let mut h = vec![0u64; 64];
        for &ns in &self.ns {
            let us = (ns / 1000).max(1);
            let i = 63 - us.leading_zeros() as usize;
            if let Some(b) = h.get_mut(i) {
                *b += 1;
            }
        }
        while h.last() == Some(&0) {
            h.pop();
        }
        h
    }
}

/// A bitmap of pages with atomic bits.
#[derive(Debug)]
pub(crate) struct AtomicBitmap {
    words: Vec<std::sync::atomic::AtomicU64>,
}

impl AtomicBitmap {
    pub(crate) fn new(bits: u64, set: bool) -> AtomicBitmap {
        let n = bits.div_ceil(64) as usize;
        let fill = if set { u64::MAX } else { 0 };
        AtomicBitmap {
            words: (0..n)
                .map(|_| std::sync::atomic::AtomicU64::new(fill))
                .collect(),
        }
    }
    /// Set bit `i`; true if it was clear.
    pub(crate) fn set(&self, i: u64) -> bool {
        let m = 1u64 << (i % 64);
        match self.words.get((i / 64) as usize) {
            Some(w) => w.fetch_or(m, std::sync::atomic::Ordering::AcqRel) & m == 0,
            None => false,
        }
    }
    /// Clear bit `i`; true if it was set.
    pub(crate) fn clear(&self, i: u64) -> bool {
        let m = 1u64 << (i % 64);
        match self.words.get((i / 64) as usize) {
            Some(w) => w.fetch_and(!m, std::sync::atomic::Ordering::AcqRel) & m != 0,
            None => false,
        }
    }
    pub(crate) fn get(&self, i: u64) -> bool {
        let m = 1u64 << (i % 64);
        self.words
            .get((i / 64) as usize)
            .is_some_and(|w| w.load(std::sync::atomic::Ordering::Acquire) & m != 0)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    #[test]
    fn page_request_round_trip_and_refusals() {
        let sizes = [0x10000u64, 0x2000];
        let r = PageRequest {
            block: 1,
            offset: 0x1000,
        };
        assert_eq!(
            PageRequest::decode(&r.encode(), &sizes, 4096),
            Ok((1, 0x1000))
        );
        let bad = |block, offset| {
            PageRequest::decode(&PageRequest { block, offset }.encode(), &sizes, 4096).unwrap_err()
        };
        assert!(bad(2, 0).contains("block 2 out of range (2 blocks)"));
        assert!(bad(u32::MAX, 0).contains("out of range"));
        assert!(bad(0, 0x800).contains("not a multiple of the page size"));
        assert!(bad(1, 0x2000).contains("outside block 1"));
        assert!(bad(0, !0xfff).contains("outside block 0"));
        let mut m = r.encode();
        m[0] = b'X';
        assert!(PageRequest::decode(&m, &sizes, 4096)
            .unwrap_err()
            .contains("bad magic"));
    }

    #[test]
    fn latency_figures() {
        let mut l = Latencies::default();
        assert_eq!(l.percentile(50.0), None);
        for us in [1u64, 3, 3, 10, 100, 1000, 5000] {
            l.record(Duration::from_micros(us));
        }
        assert_eq!(l.percentile(50.0), Some(Duration::from_micros(10)));
        assert_eq!(l.percentile(99.0), Some(Duration::from_micros(5000)));
        assert_eq!(l.max(), Some(Duration::from_micros(5000)));
        // 1 → [1,2); 3,3 → [2,4); 10 → [8,16); 100 → [64,128); 1000 → [512,1024); 5000 → [4096,8192)
        let h = l.histogram();
        assert_eq!(h.len(), 13);
        assert_eq!((h[0], h[1], h[3], h[6], h[9], h[12]), (1, 2, 1, 1, 1, 1));
        assert_eq!(h.iter().sum::<u64>(), 7);
    }

    #[test]
    fn bitmap_set_clear() {
        let b = AtomicBitmap::new(130, false);
        assert!(b.set(129));
        assert!(!b.set(129));
        assert!(b.get(129));
        assert!(b.clear(129));
        assert!(!b.get(129));
        assert!(!b.set(130 + 64)); // out of range: ignored
    }
}
