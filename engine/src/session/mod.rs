//! Sessions: a control connection plus N channel connections, one engine thread per channel,
//! rounds of dirty pages ending with a SYNC on every channel.

pub mod auth;
pub(crate) mod greet;
pub mod handshake;
pub mod recv;
pub mod send;
pub mod tls;

pub use handshake::Rejection;
pub use recv::{ReceiveInto, Received, Receiver};
pub use send::{AbortHandle, Sender};
