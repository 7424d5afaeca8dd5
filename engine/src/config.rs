//! Settings: a [`SenderConfig`] for [`crate::Sender::connect`] and a [`ReceiverConfig`] for
//! [`crate::Receiver::bind`], each holding only what its side uses, and the types of their
//! fields. Both are `#[non_exhaustive]` (new settings are not breaking changes): start from
//! `default()` and set fields, or chain the setter of the same name:
//!
//! ```
//! use pagewire::config::{Rate, ReceiverConfig, SenderConfig};
//! use pagewire::CodecKind;
//! let sender = SenderConfig::default()
//!     .channels(4)
//!     .codec(CodecKind::Deflate)
//!     .max_bandwidth(Some("2.5gbit".parse::<Rate>()?));
//! let mut receiver = ReceiverConfig::default();
//! receiver.max_memory = 8 << 30;
//! # Ok::<(), pagewire::config::RateError>(())
//! ```
//!
//! The settings both ends must agree on (TLS, a shared secret) are set on each.

use std::time::Duration;

pub use crate::accel::qpl::{Huffman, QplPath, QplSettings};
pub use crate::codec::deflate::DEFAULT_LEVEL as DEFAULT_DEFLATE_LEVEL;
use crate::codec::{AutoCompressor, CodecKind};
pub use crate::pin::{Pinning, PostcopyCpus};
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

/// Everything a session's internals read, whichever side: built from a [`SenderConfig`] or a
/// [`ReceiverConfig`] (the other side's settings at their defaults).
#[derive(Clone, Debug)]
pub(crate) struct Config {
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
    /// Where post-copy's fault path and background stream run.
    pub postcopy_cpus: PostcopyCpus,
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
            postcopy_cpus: PostcopyCpus::default(),
            secret: None,
            insecure: false,
            vm_uuid: None,
            tls: None,
            threads: crate::threads::ThreadHook::default(),
        }
    }
}

/// A transfer rate in bytes per second: what [`SenderConfig::max_bandwidth`] caps. Parses
/// what operators write, as `tc` and the `pagewire` command do: `2.5gbit`, `800mbit`,
/// `10kbit` (bits, decimal units), `300MB/s`, `1GiB/s`, `64KiB/s` (bytes), or a plain number
/// of bytes per second; between 1 byte/s and 1 PB/s.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct Rate(u64);

/// A text that is not a [`Rate`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RateError(String);

impl Rate {
    /// `n` bytes per second (`None` for 0: no rate).
    pub const fn bytes_per_sec(n: u64) -> Option<Rate> {
        if n == 0 {
            None
        } else {
            Some(Rate(n))
        }
    }

    /// Bytes per second.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} B/s", self.0)
    }
}

impl std::str::FromStr for Rate {
    type Err = RateError;

    fn from_str(s: &str) -> Result<Rate, RateError> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let bad = || {
            RateError(format!(
                "'{s}' is not a rate (e.g. 2.5gbit, 800mbit, 300MB/s, 1GiB/s)"
            ))
        };
        let n: f64 = num.parse().map_err(|_| bad())?;
        let unit = unit.trim().to_ascii_lowercase();
        let unit = unit.strip_suffix("/s").unwrap_or(&unit);
        let unit = unit.strip_suffix("ps").unwrap_or(unit);
        let mul: f64 = match unit {
            "" | "b" => 1.0,
            "bit" => 1.0 / 8.0,
            "kbit" => 1e3 / 8.0,
            "mbit" => 1e6 / 8.0,
            "gbit" => 1e9 / 8.0,
            "tbit" => 1e12 / 8.0,
            "kb" => 1e3,
            "mb" => 1e6,
            "gb" => 1e9,
            "kib" => 1024.0,
            "mib" => 1024.0 * 1024.0,
            "gib" => 1024.0 * 1024.0 * 1024.0,
            _ => return Err(bad()),
        };
        let v = n * mul;
        if !(v.is_finite() && (1.0..1e15).contains(&v)) {
            return Err(RateError(format!(
                "'{s}': a rate must be between 1 byte/s and 1 PB/s"
            )));
        }
        Ok(Rate(v.round() as u64))
    }
}

/// A settings struct and a chainable setter per field (`cfg.channels(4)` sets
/// `cfg.channels`), from one list of fields, so no field lacks its setter.
macro_rules! settings {
    (
        $(#[$attr:meta])*
        pub struct $t:ident {
            $( $(#[$fattr:meta])* pub $f:ident : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[$attr])*
        pub struct $t {
            $( $(#[$fattr])* pub $f: $ty ),*
        }

        impl $t {
            $(
                #[doc = concat!("Sets [`", stringify!($f), "`](Self::", stringify!($f), ").")]
                #[must_use]
                pub fn $f(mut self, v: $ty) -> Self {
                    self.$f = v;
                    self
                }
            )*
        }
    };
}

settings! {
/// How a [`crate::Sender`] runs its session. Its page size, pages per packet, codec framing
/// and channel count travel in the hello; the receiver adopts them.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SenderConfig {
    /// Channel connections (default 1; one per core the link needs).
    pub channels: u16,
    /// Codec. The default, `Auto`, compresses only what the link cannot carry raw.
    pub codec: CodecKind,
    /// Cap on the session's wire rate across all channels (`None`: no cap). `Auto` treats the
    /// cap as the link.
    pub max_bandwidth: Option<Rate>,
    /// DEFLATE level for the deflate codec (1..=12).
    pub level: i32,
    /// The compressor behind `Auto` (`Pick`: qpl with deflate as a ladder's stronger rung where
    /// libqpl loads, else deflate).
    pub auto_compressor: AutoCompressor,
    /// Settings of the qpl codec (Huffman mode, level, path).
    pub qpl: QplSettings,
    /// Page size in bytes.
    pub page_size: u32,
    /// Pages per multifd packet.
    pub pages_per_packet: u32,
    /// Packets prepared ahead per channel: while one is being sent, up to `depth - 1` more
    /// are compressed and queued.
    pub depth: usize,
    /// Send pages that a 256-byte sample shows incompressible raw, without a compression
    /// attempt.
    pub skip_incompressible: bool,
    /// SENDMSG_ZC use.
    pub zero_copy: ZeroCopy,
    /// Before reading a batch of pages, ask the kernel which of them hold data (SEEK_DATA and
    /// SEEK_HOLE on a file-backed block, /proc/self/pagemap on anonymous memory); pages never
    /// written go as zero pages without being read.
    pub find_holes: bool,
    /// A receiver silent for this long fails the session.
    pub idle_timeout: Duration,
    /// Socket options for every connection.
    pub socket: SocketOptions,
    /// Where channel threads run (one per channel; `Auto` pins channel i to the i-th core).
    pub pinning: Pinning,
    /// Where post-copy's threads run: the urgent connection's thread (`fault_path`) and the
    /// background stream's (`background`); see [`PostcopyCpus`]. Default: unpinned.
    pub postcopy_cpus: PostcopyCpus,
    /// Shared secret: every connection proves it knows it (HMAC over per-session nonces). The
    /// receiver must have the same one.
    pub secret: Option<Secret>,
    /// TLS 1.3 with mutual certificate authentication on every connection (`None`: clear
    /// text). The receiver must use TLS too.
    pub tls: Option<TlsConfig>,
    /// The VM's identity (QEMU's `-uuid`), in the hello and in every channel's init packet
    /// (random per session when `None`).
    pub vm_uuid: Option<[u8; 16]>,
    /// Run first on every thread pagewire starts: where a VMM installs its seccomp filter.
    /// See [`crate::threads`] and [`crate::sandbox`].
    pub threads: crate::threads::ThreadHook,
}
}

impl Default for SenderConfig {
    fn default() -> Self {
        let c = Config::default();
        SenderConfig {
            channels: c.channels,
            codec: c.codec,
            max_bandwidth: None,
            level: c.level,
            auto_compressor: c.auto_compressor,
            qpl: c.qpl,
            page_size: c.page_size,
            pages_per_packet: c.pages_per_packet,
            depth: c.depth,
            skip_incompressible: c.skip_incompressible,
            zero_copy: c.zero_copy,
            find_holes: c.find_holes,
            idle_timeout: c.idle_timeout,
            socket: c.socket,
            pinning: c.pinning,
            postcopy_cpus: c.postcopy_cpus,
            secret: c.secret,
            tls: c.tls,
            vm_uuid: c.vm_uuid,
            threads: c.threads,
        }
    }
}

impl SenderConfig {
    /// The session's internal settings (the receiver's at their defaults).
    pub(crate) fn session(&self) -> Config {
        Config {
            channels: self.channels,
            codec: self.codec,
            max_bandwidth: self.max_bandwidth.map(Rate::get),
            level: self.level,
            auto_compressor: self.auto_compressor,
            qpl: self.qpl,
            page_size: self.page_size,
            pages_per_packet: self.pages_per_packet,
            depth: self.depth,
            skip_incompressible: self.skip_incompressible,
            zero_copy: self.zero_copy,
            find_holes: self.find_holes,
            idle_timeout: self.idle_timeout,
            socket: self.socket,
            pinning: self.pinning.clone(),
            postcopy_cpus: self.postcopy_cpus.clone(),
            secret: self.secret.clone(),
            tls: self.tls.clone(),
            vm_uuid: self.vm_uuid,
            threads: self.threads.clone(),
            ..Config::default()
        }
    }
}

settings! {
/// How a [`crate::Receiver`] serves sessions. The page size, packet size, codec framing and
/// channel count come from the sender's hello.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ReceiverConfig {
    /// Which decoder inflates DEFLATE pages (any decoder reads any sender's pages).
    pub decoder: Decoder,
    /// Receiving into memory pagewire allocates ([`crate::ReceiveInto::Allocate`]): the most
    /// guest memory the session's data may commit, counted page by page as data lands (pages
    /// never written, zero pages among them, cost nothing; a session going over fails with
    /// [`crate::ChannelErrorKind::MemoryLimit`]). The guest itself may be up to
    /// [`MAX_SIZE_PER_COMMITTED`] (256) times larger; with `prealloc` it must fit. Default:
    /// this host's RAM.
    pub max_memory: u64,
    /// Receiving into memory pagewire allocates: populate it (every page faulted in) before
    /// the first packet, as QEMU's destination prealloc does; off by default, like QEMU's.
    pub prealloc: bool,
    /// Read headers, length arrays and all-compressed payloads into buffers registered with
    /// the ring (READ_FIXED); falls back with a warning when registration fails.
    pub registered_buffers: bool,
    /// Without a shared secret, accept peers that are not on loopback.
    pub insecure: bool,
    /// A sender silent for this long fails the session; a connection that has not completed
    /// its handshake this long after it was accepted is closed.
    pub idle_timeout: Duration,
    /// Socket options for every connection.
    pub socket: SocketOptions,
    /// Where channel threads run.
    pub pinning: Pinning,
    /// Where post-copy's threads run: the fault thread and the urgent connection's reader
    /// (`fault_path`), the background connections' readers (`background`); see
    /// [`PostcopyCpus`]. Default: unpinned.
    pub postcopy_cpus: PostcopyCpus,
    /// Shared secret: every connection must prove it knows it.
    pub secret: Option<Secret>,
    /// TLS 1.3 with mutual certificate authentication (`None`: clear text).
    pub tls: Option<TlsConfig>,
    /// Accept only the session of this VM (QEMU's `-uuid`); `None`: any.
    pub vm_uuid: Option<[u8; 16]>,
    /// Run first on every thread pagewire starts (channel loops, the front door and its
    /// handshakes, post-copy's threads).
    pub threads: crate::threads::ThreadHook,
}
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        let c = Config::default();
        ReceiverConfig {
            decoder: c.decoder,
            max_memory: c.max_memory,
            prealloc: c.prealloc,
            registered_buffers: c.registered_buffers,
            insecure: c.insecure,
            idle_timeout: c.idle_timeout,
            socket: c.socket,
            pinning: c.pinning,
            postcopy_cpus: c.postcopy_cpus,
            secret: c.secret,
            tls: c.tls,
            vm_uuid: c.vm_uuid,
            threads: c.threads,
        }
    }
}

impl ReceiverConfig {
    /// A receiver for `sender`'s sessions on this host: the settings both ends must agree on
    /// (TLS, shared secret, idle timeout, VM identity) and the ones a host sets once (socket
    /// options, thread hook) copied, the rest at their defaults. For tests, demos and
    /// single-host setups; across hosts each side builds its own.
    pub fn for_sender(sender: &SenderConfig) -> ReceiverConfig {
        ReceiverConfig {
            idle_timeout: sender.idle_timeout,
            socket: sender.socket,
            secret: sender.secret.clone(),
            tls: sender.tls.clone(),
            vm_uuid: sender.vm_uuid,
            threads: sender.threads.clone(),
            ..ReceiverConfig::default()
        }
    }

    /// The session's internal settings (the sender's at their defaults).
    pub(crate) fn session(&self) -> Config {
        Config {
            decoder: self.decoder,
            max_memory: self.max_memory,
            prealloc: self.prealloc,
            registered_buffers: self.registered_buffers,
            insecure: self.insecure,
            idle_timeout: self.idle_timeout,
            socket: self.socket,
            pinning: self.pinning.clone(),
            postcopy_cpus: self.postcopy_cpus.clone(),
            secret: self.secret.clone(),
            tls: self.tls.clone(),
            vm_uuid: self.vm_uuid,
            threads: self.threads.clone(),
            ..Config::default()
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
    fn rates_parse_as_operators_write_them() {
        let r = |t: &str| t.parse::<Rate>().map(Rate::get);
        assert_eq!(r("1gbit"), Ok(125_000_000));
        assert_eq!(r("2.5gbit"), Ok(312_500_000));
        assert_eq!(r("800mbit"), Ok(100_000_000));
        assert_eq!(r("300MB/s"), Ok(300_000_000));
        assert_eq!(r("1GiB/s"), Ok(1 << 30));
        assert_eq!(r("5000"), Ok(5000));
        for bad in ["fast", "0", "1.2.3gbit", "", "2e20"] {
            assert!(r(bad).is_err(), "{bad}");
        }
        assert_eq!(Rate::bytes_per_sec(0), None);
        assert_eq!(Rate::bytes_per_sec(7).map(Rate::get), Some(7));
    }

    #[test]
    fn each_side_keeps_its_settings_and_shares_the_common_ones() {
        let tls = None;
        let s = SenderConfig::default()
            .channels(3)
            .max_bandwidth("10MB/s".parse().ok())
            .idle_timeout(Duration::from_secs(7))
            .vm_uuid(Some([9; 16]))
            .tls(tls);
        let internal = s.session();
        assert_eq!(internal.channels, 3);
        assert_eq!(internal.max_bandwidth, Some(10_000_000));
        // A receiver for it agrees on what both ends must, and keeps its own defaults.
        let r = ReceiverConfig::for_sender(&s).prealloc(true);
        assert_eq!(r.idle_timeout, Duration::from_secs(7));
        assert_eq!(r.vm_uuid, Some([9; 16]));
        let internal = r.session();
        assert!(internal.prealloc);
        assert_eq!(internal.channels, Config::default().channels);
    }

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
