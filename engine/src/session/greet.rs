//! The sender's half of the control handshake (docs/wire-format.md §3.4), on a connection
//! that is already open: the receiver's challenge, the hello (with the sender's proof when
//! the session authenticates), the receiver's hello-ok and its proof. A session's first
//! control connection ([`Sender::connect`](crate::Sender::connect)) and a resumed one
//! (post-copy's reconnection) both run it.

use std::io::{Read, Write};
use std::time::Duration;

use pagewire_transport::control::{self, ControlError, Hello, HelloAuth, Message, NONCE_LEN};

use crate::error::SessionError;
use crate::session::auth::{self, Secret};

/// Which control connection is greeted; they differ only in how a failure is reported.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Greeting {
    /// A session's first control connection. Without TLS, a receiver that closes or stays
    /// silent before its challenge is explained as one that waits for TLS; a secret on one
    /// side only is told to the receiver before failing.
    First {
        /// The connection is TLS.
        tls: bool,
        /// How long the challenge may take (quoted in the error).
        idle_timeout: Duration,
    },
    /// A resumed control connection of a running session: errors as they come, and the
    /// receiver must want a secret exactly when it did at the start.
    Resume,
}

/// What a completed handshake established.
pub(crate) struct Greeted {
    /// The receiver's challenge nonce.
    pub nonce_r: [u8; NONCE_LEN],
    /// The shared secret and the sender's hello nonce, when the session authenticates.
    pub auth: Option<(Secret, [u8; NONCE_LEN])>,
    /// The receiver's memory is all zero and unwritten (hello-ok's `fresh`).
    pub fresh: bool,
}

impl Greeted {
    /// The sender's hello nonce (zero without a secret).
    pub fn nonce_s(&self) -> [u8; NONCE_LEN] {
        self.auth.as_ref().map_or([0; NONCE_LEN], |(_, n)| *n)
    }
}

/// Run the sender's side of the control handshake on `stream`: read the challenge, decide
/// authentication (`secret` against the receiver's requirement), send `hello` (its `auth`
/// is filled in here), read hello-ok and check the receiver's proof.
pub(crate) fn greet<S: Read + Write>(
    stream: &mut S,
    secret: Option<&Secret>,
    mut hello: Hello,
    greeting: Greeting,
) -> Result<Greeted, SessionError> {
    // The sender's preamble says "control connection"; then the receiver's challenge nonce,
    // and whether it wants a secret.
    control::write_preamble(stream)?;
    let first = control::read_message(stream).map_err(|e| challenge_error(e, greeting))?;
    let (nonce_r, secret_required) = match first {
        Message::Challenge {
            nonce,
            secret_required,
        } => (nonce, secret_required),
        Message::Error { message } => return Err(SessionError::Peer(message)),
        other => {
            return Err(SessionError::Unexpected {
                expected: "challenge",
                got: other.name(),
            })
        }
    };
    let auth = match (secret, secret_required) {
        (Some(secret), true) => Some((secret.clone(), auth::nonce()?)),
        (None, false) => None,
        (secret, _) => return Err(mismatch(stream, secret.is_some(), greeting)),
    };
    hello.auth = auth.as_ref().map(|(secret, nonce_s)| HelloAuth {
        nonce: *nonce_s,
        mac: secret.sender_proof(&nonce_r, nonce_s, &hello.uuid),
    });
    // With its proof (the frame-size limit counts it). A resumed session's hello passed
    // this at the start, with a proof of the same size.
    hello.validate()?;
    let uuid = hello.uuid;
    control::write_message(stream, &Message::Hello(hello))?;
    let fresh = match control::read_message(stream)? {
        Message::HelloOk { proof, fresh } => {
            if let Some((secret, nonce_s)) = &auth {
                let ok = proof.is_some_and(|p| secret.check_receiver(&nonce_r, nonce_s, &uuid, &p));
                if !ok {
                    return Err(SessionError::Auth(
                        "the receiver did not prove it knows the shared secret".into(),
                    ));
                }
            }
            fresh
        }
        Message::Error { message } => return Err(SessionError::Peer(message)),
        other => {
            return Err(SessionError::Unexpected {
                expected: "hello-ok",
                got: other.name(),
            })
        }
    };
    Ok(Greeted {
        nonce_r,
        auth,
        fresh,
    })
}

/// The error for a failed read of the challenge.
fn challenge_error(e: ControlError, greeting: Greeting) -> SessionError {
    let Greeting::First {
        tls: false,
        idle_timeout,
    } = greeting
    else {
        return e.into();
    };
    match e {
        ControlError::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            SessionError::Timeout(format!(
                "the receiver sent no challenge within {:.1} s (a receiver with TLS credentials waits for a TLS handshake: {})",
                idle_timeout.as_secs_f64(),
                tls_advice()
            ))
        }
        // Closed, or reset over the preamble it did not read.
        ControlError::Closed => SessionError::Handshake(format!(
            "the receiver closed the control connection before its challenge (a receiver with TLS credentials closes clear-text senders: {})",
            tls_advice()
        )),
        ControlError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionReset => {
            SessionError::Handshake(format!(
                "the receiver reset the control connection before its challenge (a receiver with TLS credentials resets clear-text senders: {})",
                tls_advice()
            ))
        }
        other => other.into(),
    }
}

/// What a clear-text sender tells its user to do about a receiver that may want TLS.
fn tls_advice() -> String {
    if cfg!(feature = "tls") {
        "set `tls` on both sides".into()
    } else {
        format!(
            "this sender cannot speak TLS, {}",
            crate::session::tls::NOT_BUILT
        )
    }
}

/// The error when only one side has a secret (`has_secret`: this sender); on a first
/// connection the receiver is told too.
fn mismatch<W: Write>(stream: &mut W, has_secret: bool, greeting: Greeting) -> SessionError {
    if let Greeting::Resume = greeting {
        return SessionError::Auth("the receiver's secret requirement changed on resume".into());
    }
    let (ours, theirs) = if has_secret {
        (
            "this sender has a shared secret but the receiver does not authenticate; refusing to send to an unauthenticated receiver",
            "authentication failed: the sender requires a shared secret and this receiver has none (`secret`)",
        )
    } else {
        (
            "the receiver requires a shared secret and this sender has none (`secret`)",
            "authentication failed: the sender has no shared secret",
        )
    };
    let _ = control::write_message(
        stream,
        &Message::Error {
            message: theirs.into(),
        },
    );
    SessionError::Auth(ours.into())
}
