//! pagewire's transport layer.
//!
//! * [`wire`]: QEMU multifd (version 1) channel format, sans-IO: bytes in, validated structs
//!   out, and the reverse. Deterministic, unit tested, fuzzed.
//! * [`control`]: pagewire's own control-connection protocol (hello, rounds, end, error),
//!   sans-IO framing plus small blocking helpers.
//! * [`net`]: TCP sockets set up with socket2.
//! * [`ring`]: io_uring set-up and the submit/wait plumbing the engine's loops use.
//! * [`tls`]: TLS 1.3 (rustls handshake, pagewire's own record layer on aws-lc-rs) and the
//!   clear-or-TLS connection type. Feature `tls`, on by default; without it (no rustls, no
//!   aws-lc) connections are clear text only.

pub mod control;
pub mod net;
pub mod ring;
pub mod tls;
pub mod wire;
