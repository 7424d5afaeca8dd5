//! Sessions: a control connection plus N channel connections, one engine thread per channel,
//! rounds of dirty pages ending with a SYNC on every channel.

pub mod auth;
pub(crate) mod greet;
pub mod handshake;
pub mod recv;
pub mod send;
pub mod tls;

use std::io::{Read, Write};

use pagewire_transport::control::{self, Message};

use crate::error::SessionError;

pub use handshake::Rejection;
pub use recv::{CommitError, ReceiveInto, Received, Receiver, DEFAULT_ACCEPT_TIMEOUT};
pub use send::{AbortHandle, Sender};

/// The sender's last step: send `End`, then wait for the receiver's `EndOk`, letting it take
/// its time while it answers `EndPending` (it is committing what it received). An error
/// before `End` went out means the destination cannot have completed; an answer that never
/// comes is [`SessionError::Unconfirmed`], since the destination may have.
pub(crate) fn end_session<S: Read + Write>(control: &mut S) -> Result<(), SessionError> {
    control::write_message(control, &Message::End)?;
    loop {
        match control::read_message(control) {
            Ok(Message::EndOk) => return Ok(()),
            Ok(Message::EndPending) => {}
            Ok(Message::Error { message }) => return Err(SessionError::Peer(message)),
            Ok(other) => {
                return Err(SessionError::Unexpected {
                    expected: "end-ok",
                    got: other.name(),
                })
            }
            Err(e) => return Err(SessionError::Unconfirmed(e.to_string())),
        }
    }
}
