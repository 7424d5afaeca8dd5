//! Sessions: a control connection plus N channel connections, one engine thread per channel,
//! rounds of dirty pages ending with a SYNC on every channel.

pub mod auth;
pub(crate) mod greet;
pub mod handshake;
pub mod recv;
pub mod send;
pub mod tls;

use std::io::{Read, Write};
use std::time::Duration;

use pagewire_transport::control::{self, Message};
use pagewire_transport::tls::Conn;

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

/// How long a side whose session failed waits for each message of the peer's own account of
/// it (an `error`, an `abandon`) before it reports its symptom instead.
pub(crate) const LAST_WORD_WAIT: Duration = Duration::from_millis(500);

/// Read what the peer still says on `control` (each message within [`LAST_WORD_WAIT`]) until
/// `pick` finds what it looks for, the connection closes or it goes quiet.
pub(crate) fn peer_last_word<T>(
    control: &mut Conn,
    mut pick: impl FnMut(Message) -> Option<T>,
) -> Option<T> {
    // Without the timeout a silent peer would hold this read for ever: rather not read.
    control.tcp().set_read_timeout(Some(LAST_WORD_WAIT)).ok()?;
    loop {
        match control::read_message(control) {
            Ok(m) => {
                if let Some(t) = pick(m) {
                    return Some(t);
                }
            }
            Err(_) => return None,
        }
    }
}
