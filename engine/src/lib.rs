//! pagewire: moves virtual-machine memory pages between hosts during live migration.
//!
//! A VMM hands pagewire its guest RAM ([`GuestMemory`]) and, each round, the pages that were
//! dirtied ([`RoundPages`]); a [`Sender`] compresses each 4 KiB page on its own (raw DEFLATE,
//! QEMU multifd-qpl framing) and sends packets over several TCP channels with io_uring; a
//! [`Receiver`] writes them into the destination's guest memory. The wire format is QEMU's
//! multifd format, version 1, byte for byte (see `docs/wire-format.md`).
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
pub mod session;
pub mod stats;
pub mod synth;

pub use codec::CodecKind;
pub use config::Config;
pub use error::{ChannelError, SessionError};
pub use memory::{Block, GuestMemory, MemoryError};
pub use pages::{BlockPages, RoundPages};
pub use session::{AbortHandle, ReceiveInto, Received, Receiver, Sender};
pub use stats::{ChannelStats, Progress, SessionStats};

/// The README's examples compile as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
