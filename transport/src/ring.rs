//! io_uring plumbing shared by the engine's per-channel loops.
//!
//! One [`Ring`] per engine thread. Set-up tries `SINGLE_ISSUER | DEFER_TASKRUN` (kernel 6.1+:
//! completions are processed only when this thread waits, which suits a loop that owns the
//! ring) and falls back to a plain ring with a logged reason. Opcodes are probed at start.
//!
//! Submission is `unsafe` ([`Ring::push`]): the kernel reads and writes the buffers an entry
//! points at until its completion arrives, which the borrow checker cannot see. The engine
//! keeps every such buffer in a slot that outlives its operations (see engine's channel
//! modules).

use std::io;
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};
use thiserror::Error;
use tracing::{debug, info};

/// Errors of the ring layer.
#[derive(Debug, Error)]
pub enum RingError {
    #[error("io_uring set-up failed: {0} (io_uring disabled by sysctl kernel.io_uring_disabled, or kernel older than 5.11?)")]
    Setup(io::Error),
    #[error("io_uring lacks {0}, which pagewire needs (kernel too old?)")]
    Missing(&'static str),
    #[error("io_uring submit: {0}")]
    Submit(io::Error),
}

/// What the kernel's ring offers, probed at set-up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingFeatures {
    /// SINGLE_ISSUER | DEFER_TASKRUN took effect.
    pub defer_taskrun: bool,
    /// IORING_OP_SENDMSG_ZC is supported.
    pub send_zc: bool,
}

/// One io_uring instance, owned by one thread.
pub struct Ring {
    ring: IoUring,
    features: RingFeatures,
    cqes: Vec<cqueue::Entry>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("features", &self.features)
            .finish()
    }
}

impl Ring {
    /// A ring with `entries` submission slots (a power of two is best).
    pub fn new(entries: u32) -> Result<Ring, RingError> {
        let (ring, defer_taskrun) = match IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_submit_all()
            .build(entries)
        {
            Ok(r) => (r, true),
            Err(e) => {
                info!(error = %e, "io_uring SINGLE_ISSUER|DEFER_TASKRUN unavailable (needs kernel 6.1+); using a plain ring");
                (IoUring::new(entries).map_err(RingError::Setup)?, false)
            }
        };
        if !ring.params().is_feature_ext_arg() {
            return Err(RingError::Missing(
                "IORING_FEAT_EXT_ARG (wait with timeout, kernel 5.11+)",
            ));
        }
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(RingError::Setup)?;
        for (code, name) in [
            (opcode::SendMsg::CODE, "IORING_OP_SENDMSG"),
            (opcode::RecvMsg::CODE, "IORING_OP_RECVMSG"),
        ] {
            if !probe.is_supported(code) {
                return Err(RingError::Missing(name));
            }
        }
        let features = RingFeatures {
            defer_taskrun,
            send_zc: probe.is_supported(opcode::SendMsgZc::CODE),
        };
        debug!(?features, entries, "io_uring ready");
        Ok(Ring {
            ring,
            features,
            cqes: Vec::with_capacity(entries as usize * 2),
        })
    }

    /// What this ring offers.
    pub fn features(&self) -> RingFeatures {
        self.features
    }

    /// Register buffers for READ_FIXED (their pages are pinned; counts against RLIMIT_MEMLOCK
    /// when not root).
    ///
    /// # Safety
    /// Every buffer must stay valid (not freed, not moved) until the ring is dropped.
    pub unsafe fn register_buffers(&mut self, bufs: &[libc::iovec]) -> io::Result<()> {
        // SAFETY: forwarded to the caller.
        unsafe { self.ring.submitter().register_buffers(bufs) }
    }

    /// Queue one entry, submitting queued entries first if the submission queue is full.
    ///
    /// # Safety
    /// Every buffer, iovec array and msghdr `entry` points at must stay valid (and, for
    /// buffers the kernel writes, not be accessed) until the entry's completion (and for
    /// zero-copy sends, its notification) has been taken from [`Ring::wait`].
    pub unsafe fn push(&mut self, entry: &squeue::Entry) -> Result<(), RingError> {
        loop {
            // SAFETY: the caller guarantees the entry's buffers outlive the operation.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            self.ring.submit().map_err(RingError::Submit)?;
        }
    }

    /// Submit what is queued and wait until at least `want` completions are ready or `timeout`
    /// passes (`None`: no limit). Returns the completions taken (possibly empty on timeout)
    /// in a buffer reused across calls.
    pub fn wait(
        &mut self,
        want: usize,
        timeout: Option<Duration>,
    ) -> Result<&[cqueue::Entry], RingError> {
        self.cqes.clear();
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            let ready = self.ring.completion().len();
            let need = want.saturating_sub(ready);
            let res = match deadline {
                Some(d) if need > 0 => {
                    let left = d.saturating_duration_since(std::time::Instant::now());
                    let ts = types::Timespec::from(left);
                    let args = types::SubmitArgs::new().timespec(&ts);
                    self.ring.submitter().submit_with_args(need, &args)
                }
                _ => self.ring.submitter().submit_and_wait(need),
            };
            match res {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => break,
                // A signal interrupted the wait: not a timeout; wait again for what is left.
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // CQ overflow backlog: reap what is there, the caller comes back.
                    break;
                }
                Err(e) => return Err(RingError::Submit(e)),
            }
            // io_uring_enter returns the number submitted even when a signal cut the wait
            // short, so "fewer completions than wanted" is not a timeout until the deadline.
            let enough = self.ring.completion().len() >= want;
            let expired = deadline.is_some_and(|d| std::time::Instant::now() >= d);
            if enough || expired || need == 0 {
                break;
            }
        }
        self.cqes.extend(self.ring.completion());
        Ok(&self.cqes)
    }
}

/// Advance an iovec list by `n` bytes after a short send or receive: fully consumed iovecs
/// are skipped (`*first` moves past them) and the next one is trimmed. Returns the bytes
/// still to transfer.
pub fn advance_iovecs(iovs: &mut [libc::iovec], first: &mut usize, mut n: usize) -> usize {
    while n > 0 {
        let Some(iov) = iovs.get_mut(*first) else {
            break;
        };
        if n >= iov.iov_len {
            n -= iov.iov_len;
            iov.iov_len = 0;
            *first += 1;
        } else {
            iov.iov_base = (iov.iov_base as *mut u8).wrapping_add(n).cast();
            iov.iov_len -= n;
            n = 0;
        }
    }
    while iovs.get(*first).is_some_and(|v| v.iov_len == 0) {
        *first += 1;
    }
    iovs.get(*first..)
        .map_or(0, |rest| rest.iter().map(|v| v.iov_len).sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iov(len: usize) -> libc::iovec {
        libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: len,
        }
    }

    #[test]
    fn advance_skips_whole_and_trims_partial() {
        let mut v = [iov(10), iov(0), iov(5), iov(7)];
        let mut first = 0;
        assert_eq!(advance_iovecs(&mut v, &mut first, 12), 10);
        assert_eq!(first, 2);
        assert_eq!(v[2].iov_len, 3);
        assert_eq!(v[2].iov_base as usize, 2);
        assert_eq!(advance_iovecs(&mut v, &mut first, 3), 7);
        assert_eq!(first, 3);
        assert_eq!(advance_iovecs(&mut v, &mut first, 7), 0);
        assert_eq!(first, 4);
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "io_uring_setup/io_uring_enter are not supported by Miri"
    )]
    fn ring_sets_up_and_times_out() {
        let mut ring = match Ring::new(8) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("SKIP: io_uring unavailable here: {e}");
                return;
            }
        };
        let t = std::time::Instant::now();
        let got = ring
            .wait(1, Some(Duration::from_millis(20)))
            .expect("wait")
            .len();
        assert_eq!(got, 0);
        assert!(t.elapsed() >= Duration::from_millis(15));
        // A NOP completes.
        let nop = opcode::Nop::new().build().user_data(7);
        // SAFETY: a NOP points at no buffer.
        unsafe { ring.push(&nop) }.expect("push");
        let cqes = ring.wait(1, Some(Duration::from_secs(5))).expect("wait");
        assert_eq!(cqes.len(), 1);
        assert_eq!(cqes[0].user_data(), 7);
    }
}
