//! A bus error named for its cause. `send` maps its image file as guest memory; if another
//! process truncates the file during the send, reading a page past the new end raises SIGBUS,
//! which would kill the process without a word (and leave the receiver blaming the network).
//! The handler prints one line naming the image and exits with status 1.

use std::sync::OnceLock;

/// The line the handler writes, prepared before the signal can arrive (a handler may not
/// allocate).
static MESSAGE: OnceLock<Vec<u8>> = OnceLock::new();

/// From now on a SIGBUS prints `pagewire: error: {message}` and exits with status 1.
/// Only the first call's message is kept.
pub fn name_bus_errors(message: &str) -> std::io::Result<()> {
    let _ = MESSAGE.set(format!("pagewire: error: {message}\n").into_bytes());
    // SAFETY: a zeroed sigaction is a valid value (no flags, empty mask once sigemptyset has
    // run); the handler only does async-signal-safe things (an atomic load, write, _exit).
    let rc = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut())
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

extern "C" fn on_sigbus(_signal: libc::c_int) {
    if let Some(m) = MESSAGE.get() {
        // SAFETY: write(2) on stderr from a buffer that lives for the program's life; the
        // result is ignored (there is nothing better to do in a handler).
        unsafe { libc::write(2, m.as_ptr().cast(), m.len()) };
    }
    // SAFETY: _exit is async-signal-safe and ends the process without running anything else.
    unsafe { libc::_exit(1) }
}
