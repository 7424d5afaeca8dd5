//! pagewire: moves virtual-machine memory pages between hosts during live migration.
//!
//! A VMM hands pagewire its guest RAM ([`GuestMemory`]) and, each round, the pages that were
//! dirtied ([`RoundPages`]); a [`Sender`] compresses each 4 KiB page on its own (raw DEFLATE,
//! QEMU multifd-qpl framing) and sends packets over several TCP channels with io_uring; a
//! [`Receiver`] writes them into the destination's guest memory. The wire format is QEMU's
//! multifd format, version 1, byte for byte (see `docs/wire-format.md`).
//!
//! A whole migration on loopback, with two rounds (this example runs as a doctest):
//!
//! ```
//! use std::sync::Arc;
//! use pagewire::{Block, BlockPages, Config, GuestMemory, ReceiveInto, Receiver, RoundPages, Sender};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! const SIZE: usize = 4 << 20;
//! // Destination: the receiving VMM's memory, with the same layout as the source.
//! let dst = Arc::new(GuestMemory::new(vec![Block::anonymous("pc.ram", SIZE)?])?);
//! let receiver = Receiver::bind("127.0.0.1:0".parse()?, Config::default())?;
//! let addr = receiver.local_addr()?;
//! let into = dst.clone();
//! let destination = std::thread::spawn(move || receiver.serve(ReceiveInto::Memory(into)));
//!
//! // Source: guest RAM with something in it.
//! let ram = Block::anonymous("pc.ram", SIZE)?;
//! // SAFETY: the block is new and nothing else uses it yet.
//! let bytes = unsafe { ram.as_mut_slice() };
//! bytes[..4096].copy_from_slice(&[7u8; 4096]);
//! let src = Arc::new(GuestMemory::new(vec![ram])?);
//! let cfg = Config { channels: 2, ..Config::default() };
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
//! Layers: [`codec`] (per-page compression), [`channel`] (one io_uring loop per channel),
//! [`session`] (control connection, channels, rounds), [`decode`] (offline decoding of
//! recorded channel streams).

pub mod accel;
pub mod channel;
pub mod codec;
pub mod config;
pub mod decode;
pub mod error;
pub mod memory;
pub mod pages;
pub mod pin;
pub mod postcopy;
pub mod session;
pub mod stats;
pub mod synth;
pub mod uffd;

pub use codec::CodecKind;
pub use config::Config;
pub use error::{ChannelError, SessionError};
pub use memory::{Block, GuestMemory, MemoryError};
pub use pages::{BlockPages, RoundPages};
pub use postcopy::{PostcopySender, PostcopySourceStats, PostcopyStart, PostcopyStats};
pub use session::{AbortHandle, ReceiveInto, Received, Receiver, Rejection, Sender};
pub use stats::{ChannelStats, Progress, SessionStats};

/// The README's examples compile as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
