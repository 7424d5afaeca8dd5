//! Settings shared by senders and receivers.

use std::time::Duration;

pub use crate::accel::qpl::{Huffman, QplPath, QplSettings};
pub use crate::codec::deflate::DEFAULT_LEVEL as DEFAULT_DEFLATE_LEVEL;
use crate::codec::{AutoCompressor, CodecKind};
pub use crate::pin::Pinning;
use crate::session::auth::Secret;
use crate::session::tls::TlsConfig;
pub use pagewire_transport::net::SocketOptions;

/// Whether senders use SENDMSG_ZC (the kernel reads pages straight from guest memory and the
/// zbuf; a slot is reused only after the kernel's notification).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZeroCopy {
    /// On for non-loopback peers and packets of at least [`ZERO_COPY_AUTO_MIN`] bytes.
    Auto,
    /// Always (still falls back to SENDMSG where the kernel or socket refuses it).
    On,
    /// Never.
    Off,
}

/// Smallest send `ZeroCopy::Auto` makes zero-copy (smaller ones are cheaper to copy).
pub const ZERO_COPY_AUTO_MIN: usize = 64 << 10;

/// Which decoder a receiver uses for DEFLATE pages (any decoder reads any sender's pages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoder {
    /// QPL's hardware path where IAA is present, else the built-in decoder.
    Auto,
    /// The built-in decoder (libdeflate).
    Builtin,
    /// QPL: hardware where present, else QPL's software path.
    Qpl,
}

/// Default pages per packet (QEMU's: 512 KiB of 4 KiB pages).
pub const DEFAULT_PAGES_PER_PACKET: u32 = 128;
/// Default page size.
pub const DEFAULT_PAGE_SIZE: u32 = 4096;

/// A receiver allocating the memory maps a guest up to this many times its `max_memory`
/// (which bounds the bytes the session's data commits): the map's bookkeeping, one bit per
/// page, is then at most 1/128 of `max_memory` (4 KiB pages).
pub const MAX_SIZE_PER_COMMITTED: u64 = 256;

/// How a session runs. Sender and receiver each have one; the sender's page size, pages per
/// packet, codec and channel count travel in the hello and the receiver adopts them.
#[derive(Clone, Debug)]
pub struct Config {
    /// Page size in bytes.
    pub page_size: u32,
    /// Pages per multifd packet.
    pub pages_per_packet: u32,
    /// Codec (sender). The default, `Auto`, compresses only what the link cannot carry raw.
    pub codec: CodecKind,
    /// Sender: cap on the session's wire rate across all channels, bytes per second
    /// (`None`: no cap). `Auto` treats the cap as the link.
    pub max_bandwidth: Option<u64>,
    /// DEFLATE level for the deflate codec.
    pub level: i32,
    /// The compressor behind `Auto` (`Pick`: qpl with deflate as a ladder's stronger rung where
    /// libqpl loads, else deflate).
    pub auto_compressor: AutoCompressor,
    /// Settings of the qpl codec (Huffman mode, level, path).
    pub qpl: QplSettings,
    /// Receiver: which decoder inflates pages.
    pub decoder: Decoder,
    /// Channel connections (sender).
    pub channels: u16,
    /// Packets prepared ahead per channel: while one is being sent, up to `depth - 1` more
    /// are compressed and queued.
    pub depth: usize,
    /// A peer silent for this long fails the session.
    pub idle_timeout: Duration,
    /// Socket options for every connection.
    pub socket: SocketOptions,
    /// Sender: send pages that a 256-byte sample shows incompressible raw, without a
    /// compression attempt (`codec::entropy`).
    pub skip_incompressible: bool,
    /// SENDMSG_ZC use (sender).
    pub zero_copy: ZeroCopy,
    /// Sender: before reading a batch of pages, ask the kernel which of them hold data
    /// (SEEK_DATA/SEEK_HOLE on a file-backed block, /proc/self/pagemap on anonymous memory,
    /// see `datamap`); pages never written go as zero pages without being read.
    pub find_holes: bool,
    /// Receiver: read headers, length arrays and all-compressed payloads into buffers
    /// registered with the ring (READ_FIXED); falls back with a warning when registration fails.
    pub registered_buffers: bool,
    /// Where channel threads run (one per channel; `Auto` pins channel i to the i-th core).
    pub pinning: Pinning,
    /// Shared secret: every connection proves it knows it (HMAC over a per-session nonce).
    pub secret: Option<Secret>,
    /// Receiver without a secret: accept peers that are not on loopback.
    pub insecure: bool,
    /// Receiver allocating the memory itself: populate it (every page faulted in) before the
    /// first packet, as QEMU's destination prealloc does; off by default, like QEMU's.
    pub prealloc: bool,
    /// TLS 1.3 with mutual certificate authentication on every connection (`None`: clear
    /// text). Both sides must agree.
    pub tls: Option<TlsConfig>,
    /// Receiver allocating the memory itself: the most guest memory the session's data may
    /// commit, counted page by page as data lands (pages never written, zero pages among
    /// them, cost nothing; a session going over fails with `ChannelErrorKind::MemoryLimit`).
    /// The guest itself may be up to [`MAX_SIZE_PER_COMMITTED`] (256) times larger; with
    /// `prealloc` (which commits every page) it must fit in `max_memory`.
    pub max_memory: u64,
    /// The VM's identity (QEMU's `-uuid`). The sender puts it in the hello and in every
    /// channel's init packet (random per session when `None`); a receiver with one set refuses
    /// a session whose uuid differs. Freshness of the handshake never depends on it: the
    /// authentication proofs cover both sides' per-session nonces.
    pub vm_uuid: Option<[u8; 16]>,
    /// Run first on every thread pagewire starts (channel loops, the receiver's front door
    /// and handshakes, post-copy's threads): where a VMM installs its seccomp filter. See
    /// [`crate::threads`] and [`crate::sandbox`].
    pub threads: crate::threads::ThreadHook,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            page_size: DEFAULT_PAGE_SIZE,
            pages_per_packet: DEFAULT_PAGES_PER_PACKET,
            codec: CodecKind::Auto,
            level: crate::codec::deflate::DEFAULT_LEVEL,
            auto_compressor: AutoCompressor::Pick,
            qpl: QplSettings::default(),
            decoder: Decoder::Auto,
            max_bandwidth: None,
            prealloc: false,
            channels: 1,
            depth: 4,
            idle_timeout: Duration::from_secs(30),
            socket: SocketOptions::default(),
            max_memory: default_max_memory(),
            skip_incompressible: true,
            zero_copy: ZeroCopy::Auto,
            find_holes: true,
            registered_buffers: true,
            pinning: Pinning::Off,
            secret: None,
            insecure: false,
            vm_uuid: None,
            tls: None,
            threads: crate::threads::ThreadHook::default(),
        }
    }
}

/// Physical memory of this host (the natural bound for a receiver's guest memory), or 64 GiB
/// when it cannot be read.
pub fn default_max_memory() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages > 0 && size > 0 {
        (pages as u64).saturating_mul(size as u64)
    } else {
        64 << 30
    }
}

/// Parse a uuid in the standard text form, 8-4-4-4-12 hex digits (`-uuid` of QEMU,
/// `/sys/class/dmi/id/product_uuid`); either case.
pub fn parse_uuid(text: &str) -> Option<[u8; 16]> {
    let t = text.trim().as_bytes();
    let groups_ok = t.len() == 36
        && t.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        });
    if !groups_ok {
        return None;
    }
    let mut digits = t.iter().filter(|c| **c != b'-').map(|c| match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => c - b'A' + 10,
    });
    let mut out = [0u8; 16];
    for byte in &mut out {
        let hi = digits.next()?;
        let lo = digits.next()?;
        *byte = (hi << 4) | lo;
    }
    Some(out)
}

/// The standard text form of a uuid (lower case, 8-4-4-4-12).
pub fn format_uuid(u: &[u8; 16]) -> String {
    let mut s = String::with_capacity(36);
    for (i, b) in u.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_text_round_trip_and_rejects() {
        let u = parse_uuid("0123abcd-4567-89EF-0a1b-2c3d4e5f6a7b").expect("valid");
        assert_eq!(u[0], 0x01);
        assert_eq!(u[3], 0xcd);
        assert_eq!(u[6], 0x89);
        assert_eq!(u[15], 0x7b);
        assert_eq!(format_uuid(&u), "0123abcd-4567-89ef-0a1b-2c3d4e5f6a7b");
        for bad in [
            "",
            "0123abcd456789ef0a1b2c3d4e5f6a7b",
            "0123abcd-4567-89ef-0a1b-2c3d4e5f6a7",
            "0123abcd-4567-89ef-0a1b-2c3d4e5f6a7bb",
            "0123abcg-4567-89ef-0a1b-2c3d4e5f6a7b",
            "0123abcd-456-789ef-0a1b-2c3d4e5f6a7b",
        ] {
            assert_eq!(parse_uuid(bad), None, "{bad}");
        }
    }
}
