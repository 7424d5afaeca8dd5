//! Settings shared by senders and receivers.

use std::time::Duration;

use pagewire_transport::net::SocketOptions;

use crate::accel::qpl::QplSettings;
use crate::codec::CodecKind;
use crate::pin::Pinning;
use crate::session::auth::Secret;
use crate::session::tls::TlsConfig;

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

/// How a session runs. Sender and receiver each have one; the sender's page size, pages per
/// packet, codec and channel count travel in the hello and the receiver adopts them.
#[derive(Clone, Debug)]
pub struct Config {
    /// Page size in bytes.
    pub page_size: u32,
    /// Pages per multifd packet.
    pub pages_per_packet: u32,
    /// Codec (sender).
    pub codec: CodecKind,
    /// DEFLATE level for the deflate codec.
    pub level: i32,
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
    /// Receiver: read headers, length arrays and all-compressed payloads into buffers
    /// registered with the ring (READ_FIXED); falls back with a warning when registration fails.
    pub registered_buffers: bool,
    /// Where channel threads run (one per channel; `Auto` pins channel i to the i-th core).
    pub pinning: Pinning,
    /// Shared secret: every connection proves it knows it (HMAC over a per-session nonce).
    pub secret: Option<Secret>,
    /// Receiver without a secret: accept peers that are not on loopback.
    pub insecure: bool,
    /// TLS 1.3 with mutual certificate authentication on every connection (`None`: clear
    /// text). Both sides must agree.
    pub tls: Option<TlsConfig>,
    /// Receiver: largest total guest memory a hello may ask for when the receiver allocates
    /// the memory itself.
    pub max_memory: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            page_size: DEFAULT_PAGE_SIZE,
            pages_per_packet: DEFAULT_PAGES_PER_PACKET,
            codec: CodecKind::Deflate,
            level: crate::codec::deflate::DEFAULT_LEVEL,
            qpl: QplSettings::default(),
            decoder: Decoder::Auto,
            channels: 1,
            depth: 4,
            idle_timeout: Duration::from_secs(30),
            socket: SocketOptions::default(),
            max_memory: default_max_memory(),
            skip_incompressible: true,
            zero_copy: ZeroCopy::Auto,
            registered_buffers: true,
            pinning: Pinning::Off,
            secret: None,
            insecure: false,
            tls: None,
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
