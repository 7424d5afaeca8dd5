//! The session's bandwidth cap (`SenderConfig::max_bandwidth`): one token bucket shared by every
//! channel of a sender. A channel takes a packet's bytes from it before handing the packet
//! to the kernel; while the bucket is in debt, packets wait in the channel's ready queue,
//! which `codec auto` sees as a busy link (the cap is the link).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most tokens the bucket holds, in seconds of the rate: a link idle for a while may then
/// send this much at once, no more. Large enough that a channel thread woken late (a loaded
/// host oversleeps by milliseconds) loses no tokens; QEMU's own cap works in 100 ms windows.
const BURST_SECS: f64 = 0.05;

#[derive(Debug)]
struct Bucket {
    /// Bytes that may be sent now; negative: debt to wait out.
    tokens: f64,
    last: Instant,
}

/// A token bucket of `rate` bytes per second shared by a session's channels.
#[derive(Debug)]
pub struct RateLimit {
    rate: f64,
    burst: f64,
    bucket: Mutex<Bucket>,
}

impl RateLimit {
    /// A cap of `bytes_per_sec` (at least 1), starting empty at `now`.
    pub fn new(bytes_per_sec: u64, now: Instant) -> RateLimit {
        let rate = bytes_per_sec.max(1) as f64;
        RateLimit {
            rate,
            burst: (rate * BURST_SECS).max(64.0 * 1024.0),
            bucket: Mutex::new(Bucket {
                tokens: 0.0,
                last: now,
            }),
        }
    }

    /// The cap in bytes per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Take `bytes` for a send at `now`: `Ok` when the bucket is not in debt (it may go into
    /// debt by this send), else `Err` with how long until it is out of debt.
    pub fn take(&self, bytes: u64, now: Instant) -> Result<(), Duration> {
        let Ok(mut b) = self.bucket.lock() else {
            // A channel thread panicked holding the lock; do not stop the others.
            return Ok(());
        };
        let dt = now.saturating_duration_since(b.last).as_secs_f64();
        b.last = b.last.max(now);
        b.tokens = (b.tokens + dt * self.rate).min(self.burst);
        if b.tokens >= 0.0 {
            b.tokens -= bytes as f64;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(-b.tokens / self.rate))
        }
    }

    /// As [`RateLimit::take`], but `Ok` only once the bucket holds all of `bytes` (or a
    /// full burst, for sends larger than one), so this send leaves the bucket out of debt
    /// and a later [`RateLimit::take`] (a post-copy page request's answer) need not wait for
    /// it: post-copy's background stream yields the link to the fault path.
    pub fn take_whole(&self, bytes: u64, now: Instant) -> Result<(), Duration> {
        let Ok(mut b) = self.bucket.lock() else {
            return Ok(());
        };
        let dt = now.saturating_duration_since(b.last).as_secs_f64();
        b.last = b.last.max(now);
        b.tokens = (b.tokens + dt * self.rate).min(self.burst);
        let need = (bytes as f64).min(self.burst);
        if b.tokens >= need {
            b.tokens -= bytes as f64;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((need - b.tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A whole take waits until the bucket holds the send, so it never leaves debt behind;
    /// a plain take right after it goes at once.
    #[test]
    fn take_whole_leaves_no_debt() {
        let t0 = Instant::now();
        let limit = RateLimit::new(1_000_000, t0);
        // Burst: 64 KiB (5 % of the rate is less).
        let wait = limit.take_whole(10_000, t0).expect_err("empty bucket");
        assert!((wait.as_secs_f64() - 0.01).abs() < 1e-6, "{wait:?}");
        assert!(limit
            .take_whole(10_000, t0 + Duration::from_millis(9))
            .is_err());
        let t1 = t0 + Duration::from_millis(10);
        assert!(limit.take_whole(10_000, t1).is_ok());
        assert!(limit.take(5_000, t1).is_ok(), "no debt left");
        assert!(limit.take(1, t1).is_err(), "the plain take went into debt");
        // Larger than a burst: waits for a full bucket, then goes into debt.
        let t2 = t1 + Duration::from_secs(1);
        assert!(limit.take_whole(100_000, t2).is_ok());
        assert!(limit.take(1, t2).is_err());
    }

    /// Senders that send whenever allowed move rate × time bytes, give or take one packet
    /// and the burst.
    #[test]
    fn long_run_rate_is_the_cap() {
        let t0 = Instant::now();
        let limit = RateLimit::new(100_000_000, t0);
        let packet = 512 * 1024;
        let mut sent = 0u64;
        let mut now = t0;
        let end = t0 + Duration::from_secs(2);
        while now < end {
            // Two channels, each trying every 100 µs.
            for _ in 0..2 {
                if limit.take(packet, now).is_ok() {
                    sent += packet;
                }
            }
            now += Duration::from_micros(100);
        }
        let rate = sent as f64 / 2.0;
        assert!(
            (rate - 1e8).abs() < 0.02 * 1e8,
            "moved {rate:.0} B/s under a cap of 1e8"
        );
    }

    #[test]
    fn debt_tells_how_long_to_wait() {
        let t0 = Instant::now();
        let limit = RateLimit::new(1_000_000, t0);
        assert!(
            limit.take(500_000, t0).is_ok(),
            "not in debt: may go into it"
        );
        let wait = limit.take(1, t0).expect_err("in debt");
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        assert!(limit.take(1, t0 + Duration::from_millis(500)).is_ok());
    }
}
