//! pagewire: moves virtual-machine memory pages between hosts during live migration.
//!
//! A VMM hands pagewire its guest RAM ([`GuestRam`]) and, each round, the pages that were
//! dirtied ([`RoundPages`], usually from a [`DirtyLog`]); a [`Sender`] compresses each 4 KiB
//! page on its own (raw DEFLATE, QEMU multifd-qpl framing) and sends packets over several TCP
//! channels with io_uring; a [`Receiver`] writes them into the destination's guest memory. The
//! wire format is QEMU's multifd format, version 1, byte for byte (see `docs/wire-format.md`).
//!
//! # Embedding in a rust-vmm VMM
//!
//! A VMM built on `vm-memory` (cloud-hypervisor, Firecracker and others) keeps its
//! `GuestMemoryMmap`: [`rust_vmm::guest_ram`] turns its regions into pagewire's blocks (the same
//! host memory, no copy), [`rust_vmm::collect_dirty`] drains vm-memory's dirty bitmaps into a
//! [`DirtyLog`], and KVM's per-slot dirty bitmaps go into the same log with
//! [`DirtyLog::add_bitmap`]. Read [`rust_vmm`]'s safety contract for memory a running guest
//! shares. A whole migration over loopback, guest RAM in two regions with a hole between them
//! (this example runs as a doctest):
//!
//! ```
//! # #[cfg(feature = "vm-memory")]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use pagewire::{rust_vmm, DirtyLog, ReceiveInto, Receiver, ReceiverConfig, Sender, SenderConfig};
//! use vm_memory::{bitmap::AtomicBitmap, Bytes, GuestAddress, GuestMemoryMmap};
//!
//! // 4 MiB at 0, a hole, 2 MiB at 4 GiB; vm-memory tracks the VMM's own writes.
//! let ranges = [(GuestAddress(0), 4 << 20), (GuestAddress(1 << 32), 2 << 20)];
//!
//! // Destination VMM: the same layout; pagewire writes straight into its regions.
//! let dst_vm = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&ranges)?;
//! let receiver = Receiver::bind("127.0.0.1:0".parse()?, ReceiverConfig::default())?;
//! let addr = receiver.local_addr()?;
//! let into = Arc::new(rust_vmm::guest_ram(&dst_vm)?);
//! let destination = std::thread::spawn(move || receiver.serve(ReceiveInto::Memory(into)));
//!
//! // Source VMM: a guest that has been running.
//! let src_vm = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&ranges)?;
//! src_vm.write_slice(b"kernel", GuestAddress(0x1000))?;
//! src_vm.write_slice(&[0xAB; 8192], GuestAddress((1 << 32) + 0x10000))?;
//! let src = Arc::new(rust_vmm::guest_ram(&src_vm)?);
//! let cfg = SenderConfig::default().channels(2);
//! let mut sender = Sender::connect(addr, cfg.clone(), src.clone())?;
//!
//! // Round 1: every page. Drain the bitmaps first, so they then hold what changes meanwhile.
//! let mut dirty = DirtyLog::new(&src, cfg.page_size);
//! rust_vmm::collect_dirty(&src_vm, &mut dirty)?;
//! dirty.mark_all();
//! sender.send_round(dirty.take_round(cfg.pages_per_packet))?;
//!
//! // The guest's devices wrote while round 1 ran; round 2 sends just those pages. (With KVM,
//! // also `dirty.add_bitmap(slot, &vm_fd.get_dirty_log(slot, len)?)` for each slot.)
//! src_vm.write_slice(b"virtio used ring", GuestAddress((1 << 32) + 0x3000))?;
//! rust_vmm::collect_dirty(&src_vm, &mut dirty)?;
//! let round2 = sender.send_round(dirty.take_round(cfg.pages_per_packet))?;
//! assert_eq!(round2.total.pages_normal + round2.total.pages_zero, 1);
//! // The last round runs with the vCPUs paused; then the device state, then the end.
//! sender.send_state(b"vcpu and device state")?;
//! sender.finish()?;
//!
//! let received = destination.join().expect("receiver thread")?;
//! assert_eq!(received.state, vec![b"vcpu and device state".to_vec()]);
//! for (addr, len) in ranges {
//!     let (mut a, mut b) = (vec![0u8; len], vec![1u8; len]);
//!     src_vm.read_slice(&mut a, addr)?;
//!     dst_vm.read_slice(&mut b, addr)?;
//!     assert!(a == b, "region at {addr:?} differs");
//! }
//! # Ok(()) }
//! # #[cfg(not(feature = "vm-memory"))]
//! # fn main() {}
//! ```
//!
//! # Letting pagewire drive the migration
//!
//! The loop above, grown up, is [`Driver::migrate`]: it sends round after round until the
//! predicted downtime fits a limit, throttles a guest that dirties memory faster than the link
//! drains it, gives up (or hands over to post-copy) after a round or time limit, and logs and
//! counts each decision ([`driver`]). The VMM implements [`Vmm`], a handful of methods:
//!
//! ```no_run
//! # #[cfg(feature = "vm-memory")]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::{sync::Arc, time::Duration};
//! use pagewire::driver::{Outcome, VmmError};
//! use pagewire::{rust_vmm, DirtyLog, Driver, Policy, Sender, SenderConfig, Vmm};
//! use vm_memory::{bitmap::AtomicBitmap, GuestMemoryMmap};
//!
//! struct MyVmm { mem: GuestMemoryMmap<AtomicBitmap> /* , vm_fd, vcpus, devices ... */ }
//!
//! impl Vmm for MyVmm {
//!     fn collect_dirty(&mut self, log: &mut DirtyLog) -> Result<(), VmmError> {
//!         rust_vmm::collect_dirty(&self.mem, log)?; // the VMM's own writes
//!         // for each KVM slot: log.add_bitmap(slot, &vm_fd.get_dirty_log(slot, len)?)?;
//!         Ok(())
//!     }
//!     fn pause(&mut self) -> Result<(), VmmError> { /* stop the vCPUs */ Ok(()) }
//!     fn save_state(&mut self) -> Result<Vec<u8>, VmmError> { Ok(b"vcpus+devices".to_vec()) }
//!     fn throttle(&mut self, percent: u8) -> Result<bool, VmmError> { /* ... */ Ok(true) }
//! }
//!
//! # let mut my_vmm = MyVmm { mem: GuestMemoryMmap::from_ranges(&[])? };
//! let src = Arc::new(rust_vmm::guest_ram(&my_vmm.mem)?);
//! let cfg = SenderConfig::default().channels(4);
//! let sender = Sender::connect("10.0.0.2:4444".parse()?, cfg.clone(), src.clone())?;
//! let driver = Driver::new(Policy::new(Duration::from_millis(300)), &cfg);
//! match driver.migrate(sender, &mut my_vmm)? {
//!     Outcome::Completed { report, .. } => println!("downtime {:?}", report.downtime),
//!     Outcome::PostCopy { .. } => unreachable!("post-copy is off by default"),
//! }
//! # Ok(()) }
//! # #[cfg(not(feature = "vm-memory"))]
//! # fn main() {}
//! ```
//!
//! # Without vm-memory
//!
//! Any VMM can describe its RAM as [`Block`]s ([`Block::from_raw`] for memory it owns) and
//! pass dirty pages as offsets or KVM-style bitmaps ([`BlockPages`]).
//!
//! A whole migration on loopback, with two rounds (this example runs as a doctest):
//!
//! ```
//! use std::sync::Arc;
//! use pagewire::{Block, BlockPages, GuestRam, ReceiveInto, Receiver, ReceiverConfig, RoundPages, Sender, SenderConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! const SIZE: usize = 4 << 20;
//! // Destination: the receiving VMM's memory, with the same layout as the source.
//! let dst = Arc::new(GuestRam::new(vec![Block::anonymous("pc.ram", SIZE)?])?);
//! let receiver = Receiver::bind("127.0.0.1:0".parse()?, ReceiverConfig::default())?;
//! let addr = receiver.local_addr()?;
//! let into = dst.clone();
//! let destination = std::thread::spawn(move || receiver.serve(ReceiveInto::Memory(into)));
//!
//! // Source: guest RAM with something in it.
//! let ram = Block::anonymous("pc.ram", SIZE)?;
//! // SAFETY: the block is new and nothing else uses it yet.
//! let bytes = unsafe { ram.as_mut_slice() };
//! bytes[..4096].copy_from_slice(&[7u8; 4096]);
//! let src = Arc::new(GuestRam::new(vec![ram])?);
//! let cfg = SenderConfig::default().channels(2);
//! let mut sender = Sender::connect(addr, cfg, src.clone())?;
//!
//! // Round 1: every page.
//! sender.send_round(RoundPages::all(&[SIZE as u64], 4096, 128))?;
//! // The guest dirties page 5; round 2 sends just that page (a dirty bitmap works too).
//! // SAFETY: no round is running.
//! let bytes = unsafe { src.block(0).expect("block").as_mut_slice() };
//! bytes[5 * 4096] = 42;
//! let round2 = RoundPages::new(vec![(0, BlockPages::Offsets(vec![5 * 4096]))], &[SIZE as u64], 4096, 128);
//! let stats = sender.send_round(round2)?;
//! assert_eq!(stats.total.pages_normal + stats.total.pages_zero, 1);
//! let total = sender.finish()?;
//! assert_eq!(total.rounds, 2);
//!
//! let done = destination.join().expect("receiver thread")?;
//! // SAFETY: the session is over; nothing writes either memory.
//! let (a, b) = unsafe { (src.block(0).expect("b").as_slice(), dst.block(0).expect("b").as_slice()) };
//! assert!(a == b);
//! assert_eq!(done.stats.rounds, 2);
//! # Ok(()) }
//! ```
//!
//! # Identity and access
//!
//! [`SenderConfig::vm_uuid`] is the VM's identity on the wire (QEMU's `-uuid`): it travels in the
//! hello and every channel's init packet, and a receiver that has one refuses another VM's
//! session; unset, each session gets a random one. A shared secret
//! ([`Secret`] in [`SenderConfig::secret`] and [`ReceiverConfig::secret`]) makes every connection prove it knows it.
//!
//! # Where things are
//!
//! The crate root holds what a migration needs: [`Sender`], [`Receiver`], [`GuestRam`] and
//! its [`Block`]s, [`DirtyLog`] and [`RoundPages`], the [`Driver`] and the [`Vmm`] it drives,
//! [`SenderConfig`] and [`ReceiverConfig`], the statistics. A few documented modules hold the rest: [`config`] (every
//! setting's type), [`error`] (every error type a call can return or carry), [`driver`] (the
//! convergence loop, explained), [`rust_vmm`] (rust-vmm's `GuestMemoryMmap` and dirty
//! bitmaps; feature `vm-memory`), [`threads`] and [`sandbox`] (the threads pagewire starts,
//! and their system calls, for seccomp), [`tls`] (credentials), [`decode`] (offline decoding
//! of recorded channel streams). docs/embedding.md is the manual, top-down.
//!
//! # Cargo features
//!
//! All four are on by default. An embedder that wants less sets `default-features = false`
//! and names what it uses; with none of them the crate still runs whole pre-copy and post-copy
//! migrations (io_uring, userfaultfd) with the codecs `none`, `deflate` and `auto` (libdeflate).
//!
//! | feature | brings | pulls in |
//! |---|---|---|
//! | `tls` | TLS 1.3 with mutual certificate authentication on every connection: [`SenderConfig::tls`], [`tls::TlsConfig`] | rustls, aws-lc-rs and aws-lc-sys (C, compiled with the crate), through `pagewire-transport/tls` |
//! | `gen-certs` | `tls::generate`: a CA and receiver and sender certificates for trying TLS out; implies `tls` | rcgen, time |
//! | `qpl` | codec `qpl` and the QPL decoder: Intel IAA, or QPL's software path | qpl-sys, libloading (`libqpl.so.1` is opened at run time, never linked) |
//! | `vm-memory` | [`rust_vmm`]: guest memory and dirty bitmaps from rust-vmm's `GuestMemoryMmap` | vm-memory |
//!
//! Without `tls`, [`tls::TlsConfig`] is a type with no values: [`SenderConfig::tls`] stays
//! (so code setting it to `None` reads the same in every build) but can only be
//! `None`, every connection is clear text, and a peer that starts a TLS handshake is refused
//! with "pagewire was built without the `tls` feature" (a TLS sender quotes the refusal in
//! its error). Without `qpl`, a sender asking for codec `qpl` and a receiver asking for
//! [`config::Decoder::Qpl`] fail with [`error::QplSetupError::NotBuilt`], and `auto`
//! compresses with deflate. The qpl *framing* (raw DEFLATE per page, multifd flag 0x08) needs
//! no feature: codec `deflate` writes it, and every receiver reads it, QEMU's multifd-qpl
//! streams included.

// Internals: reachable from outside only through `internals` (benches, fuzz targets, tests).
pub(crate) mod accel;
pub(crate) mod channel;
pub(crate) mod codec;
pub(crate) mod datamap;
pub(crate) mod dirty;
pub(crate) mod fresh;
pub(crate) mod memory;
pub(crate) mod pages;
pub(crate) mod pin;
pub(crate) mod session;
pub(crate) mod stats;
pub(crate) mod uffd;

// The public modules: each documented, each a part of the manual.
pub mod config;
pub mod decode;
pub mod driver;
pub mod error;
pub mod postcopy;
#[cfg(feature = "vm-memory")]
pub mod rust_vmm;
pub mod sandbox;
pub mod threads;

/// TLS 1.3 with mutual certificate authentication (feature `tls`; certificate generation with
/// feature `gen-certs`): the credentials [`SenderConfig::tls`] and [`ReceiverConfig::tls`] name, in QEMU's `tls-creds-x509`
/// directory layout.
pub mod tls {
    pub use crate::session::tls::{
        existing_credentials, CredentialsError, TlsConfig, CREDENTIAL_FILES,
    };
    #[cfg(feature = "gen-certs")]
    pub use crate::session::tls::{generate, GenerateSpec};
}

pub use codec::{resolve_auto, AutoCompressor, CodecKind};
pub use config::{Rate, ReceiverConfig, SenderConfig};
pub use datamap::Contents;
pub use dirty::DirtyLog;
pub use driver::{
    Decision, DecisionCounts, Driver, DriverReport, Outcome, Policy, RoundObservation, RoundRecord,
    Transport, Vmm, VmmError,
};
pub use error::{ChannelError, ChannelErrorKind, SessionError};
pub use memory::{Block, GuestRam};
pub use pages::{BlockPages, RoundPages};
pub use postcopy::{Latencies, PostcopySender, PostcopySourceStats, PostcopyStart, PostcopyStats};
pub use session::auth::{Secret, MIN_SECRET_LEN};
pub use session::send::MAX_STATE;
pub use session::{
    AbortHandle, CommitError, ReceiveInto, Received, Receiver, Rejection, Sender,
    DEFAULT_ACCEPT_TIMEOUT,
};
pub use stats::{ChannelStats, Progress, SessionStats};

/// Whether QPL can use an Intel IAA accelerator on this host (feature `qpl`; false without).
pub fn qpl_hardware_available() -> bool {
    accel::qpl::hardware_available()
}

/// pagewire's internals, for its own benchmarks, fuzz targets and tests: no stability
/// promise, not part of the API.
#[doc(hidden)]
pub mod internals {
    pub use crate::accel::qpl as accel_qpl;
    pub use crate::accel::software::SoftwareDeflate;
    pub use crate::accel::testing;
    pub use crate::accel::{Accelerator, Outcome as AccelOutcome};
    pub use crate::codec::entropy::likely_incompressible;
    pub use crate::codec::{
        auto_ladder, is_zero_page, CodecError, DeflateCompressor, DeflateDecompressor,
        PageCompressor, PageDecompressor,
    };
    pub use crate::datamap::Pagemap;
    pub use crate::postcopy::{PageRequest, REQUEST_LEN};
    pub use crate::session::handshake::MAX_HANDSHAKES;
    pub use crate::session::recv::decoder_for;

    /// Whether a receiver with `cfg` accepts a peer at `peer` (before any handshake).
    pub fn peer_allowed(
        cfg: &crate::ReceiverConfig,
        peer: &std::net::SocketAddr,
    ) -> Result<(), crate::SessionError> {
        crate::session::recv::peer_allowed(&cfg.session(), peer)
    }
    pub use crate::pin::pin_current_thread;
    pub use crate::stats::thread_cpu_seconds;
    pub use crate::uffd::Uffd;
}

/// The README's examples compile as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
