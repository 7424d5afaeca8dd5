//! Per-channel engines: one thread, one io_uring, one TCP connection each.
//!
//! * [`send`]: zero-page detection, compression into a packet slot's zbuf, one SENDMSG per
//!   packet whose iovecs point at the header, the length array, guest pages (raw) and the
//!   zbuf (compressed); short sends continued.
//! * [`recv`]: header, length array, then one RECVMSG that puts raw pages straight into
//!   guest memory and compressed pages into the zbuf; then inflate into guest memory.
//! * [`pace`]: codec auto's per-page choice between compressing and sending raw.
//! * [`limit`]: the session's bandwidth cap, a token bucket shared by its channels.
//! * [`apply`]: the receiver's packet logic that does not depend on how bytes arrive (shared
//!   with the offline decoder).

pub mod apply;
pub mod limit;
pub mod pace;
pub mod recv;
pub mod send;
pub mod stage;
