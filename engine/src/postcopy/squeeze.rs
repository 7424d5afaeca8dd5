//! Whether post-copy's background stream compresses its next packet: the session's codec
//! decides (none: never; deflate and qpl: always), and codec auto compresses where it pays.
//!
//! The background thread compresses a packet while the link still drains the previous ones
//! (the socket's buffer, or the cap's bucket refilling), so compressing and sending overlap:
//! with a link draining `link` bytes/s and a compressor taking `speed` bytes/s to a `ratio`
//! of the size, a byte of pages takes `max(1 / speed, ratio / link)` compressed against
//! `1 / link` raw. Auto compresses when that is at least [`MIN_GAIN`] times faster: a link
//! slower than the compressor, pages that shrink. The three figures are measured on the
//! stream itself (averages over recent packets; `speed` from the thread's CPU time); `link`
//! is the session's cap when it is lower. Sans-IO: the caller reports what each packet cost.
//!
//! An answer to a page request is waited for: nothing overlaps its compression, so it takes
//! `1 / speed + ratio / link` compressed (`overlap` false). On a fast link it goes raw; on a
//! slow one compressing it shortens the fault, and a guest faulting back to back gets most
//! of its pages this way, so they must not cross a slow link raw.
//!
//! Urgent pages stay raw (an answer to a fault never waits for a compressor).

use std::time::Duration;

use crate::CodecKind;

/// Packets sent raw between two trial compressions under codec auto (the pages may have
/// become more compressible, or the link slower).
pub const PROBE_EVERY: u32 = 64;
/// How much faster compressed pages must go than raw ones for auto to compress them (the
/// CPU a compressor takes is not free: it is the guest's host).
pub const MIN_GAIN: f64 = 1.25;
/// Weight of a new sample in the averages.
const WEIGHT: f64 = 0.25;

/// The background stream's compression decision.
#[derive(Debug)]
pub(crate) struct Squeeze {
    codec: CodecKind,
    /// Compressing the next packet overlaps with sending the previous ones.
    overlap: bool,
    /// The session's cap, bytes/s.
    cap: Option<f64>,
    /// Bytes/s the link drained while this stream wrote (average).
    link: Option<f64>,
    /// Raw bytes/s the compressor takes (average).
    speed: Option<f64>,
    /// Compressed size / raw size (average).
    ratio: f64,
    /// Raw packets since the last compressed one.
    raw_run: u32,
}

impl Squeeze {
    /// For a session with codec `codec` and bandwidth cap `cap` (bytes/s); `overlap`: the
    /// stream compresses a packet while the link drains the previous ones.
    pub fn new(codec: CodecKind, cap: Option<u64>, overlap: bool) -> Squeeze {
        Squeeze {
            codec,
            overlap,
            cap: cap.map(|c| c as f64),
            link: None,
            speed: None,
            ratio: 1.0,
            raw_run: 0,
        }
    }

    /// Whether packets go in the qpl framing (length array, per-page DEFLATE or raw).
    pub fn framed(&self) -> bool {
        self.codec != CodecKind::None
    }

    /// Compress the next packet?
    pub fn compress_next(&self) -> bool {
        match self.codec {
            CodecKind::None => false,
            CodecKind::Deflate | CodecKind::Qpl => true,
            CodecKind::Auto => {
                let Some(speed) = self.speed else {
                    // Nothing measured: try once.
                    return true;
                };
                if self.raw_run >= PROBE_EVERY {
                    return true;
                }
                let link = match (self.link, self.cap) {
                    (Some(l), Some(c)) => l.min(c),
                    (Some(l), None) => l,
                    (None, Some(c)) => c,
                    (None, None) => return false,
                };
                let compressed = if self.overlap {
                    (1.0 / speed).max(self.ratio / link)
                } else {
                    1.0 / speed + self.ratio / link
                };
                1.0 / link >= MIN_GAIN * compressed
            }
        }
    }

    /// A packet of `raw` bytes of pages was compressed to `zipped` bytes in `took`.
    pub fn compressed(&mut self, raw: u64, zipped: u64, took: Duration) {
        self.raw_run = 0;
        if raw == 0 {
            return;
        }
        let secs = took.as_secs_f64().max(1e-9);
        let first = self.speed.is_none();
        self.ratio = average((!first).then_some(self.ratio), zipped as f64 / raw as f64);
        self.speed = Some(average(self.speed, raw as f64 / secs));
    }

    /// A packet was sent raw.
    pub fn sent_raw(&mut self) {
        self.raw_run = self.raw_run.saturating_add(1);
    }

    /// The link's rate as another stream measured it (bytes/s).
    pub fn set_link(&mut self, rate: f64) {
        if rate > 0.0 {
            self.link = Some(rate);
        }
    }

    /// The link's rate as measured here (bytes/s).
    pub fn link(&self) -> Option<f64> {
        self.link
    }

    /// `bytes` went to the link in `took` (waiting for the cap and the socket included).
    pub fn wrote(&mut self, bytes: u64, took: Duration) {
        let secs = took.as_secs_f64();
        if bytes == 0 || secs <= 0.0 {
            return;
        }
        self.link = Some(average(self.link, bytes as f64 / secs));
    }
}

fn average(old: Option<f64>, new: f64) -> f64 {
    match old {
        Some(o) => o + WEIGHT * (new - o),
        None => new,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn none_never_and_deflate_always() {
        let mut s = Squeeze::new(CodecKind::None, Some(1), true);
        assert!(!s.framed());
        assert!(!s.compress_next());
        s = Squeeze::new(CodecKind::Deflate, None, true);
        s.wrote(1 << 30, MS);
        assert!(s.framed() && s.compress_next());
    }

    #[test]
    fn auto_compresses_a_slow_link_and_not_a_fast_one() {
        // A compressor of 300 MB/s to 30 %: pays on links below 240 MB/s (300 / 1.25).
        let mut slow = Squeeze::new(CodecKind::Auto, None, true);
        assert!(slow.compress_next(), "the first packet is a trial");
        slow.compressed(3_000_000, 900_000, 10 * MS);
        slow.wrote(50_000, MS); // 50 MB/s
        assert!(slow.compress_next());
        let mut fast = Squeeze::new(CodecKind::Auto, None, true);
        fast.compressed(3_000_000, 900_000, 10 * MS);
        fast.wrote(1_000_000, MS); // 1 GB/s
        assert!(!fast.compress_next());
        // A cap below the break-even rate decides even on a fast socket.
        let mut capped = Squeeze::new(CodecKind::Auto, Some(20_000_000), true);
        capped.compressed(3_000_000, 900_000, 10 * MS);
        capped.wrote(1_000_000, MS);
        assert!(capped.compress_next());
    }

    #[test]
    fn an_awaited_page_is_compressed_only_where_that_shortens_its_wait() {
        // 100 MB/s to 30 %: a page takes 1/100 + 0.3/link µs per byte compressed against
        // 1/link raw; 1.25 × faster below 50 MB/s.
        let mut s = Squeeze::new(CodecKind::Auto, None, false);
        s.compressed(1_000_000, 300_000, 10 * MS);
        s.set_link(40e6);
        assert!(s.compress_next());
        s.set_link(80e6);
        assert!(!s.compress_next(), "overlapped, 80 MB/s would compress");
        let mut o = Squeeze::new(CodecKind::Auto, None, true);
        o.compressed(1_000_000, 300_000, 10 * MS);
        o.set_link(70e6);
        assert!(o.compress_next());
    }

    #[test]
    fn auto_tries_again_after_a_run_of_raw_packets() {
        let mut s = Squeeze::new(CodecKind::Auto, None, true);
        // Incompressible pages: raw.
        s.compressed(3_000_000, 2_990_000, 10 * MS);
        s.wrote(50_000, MS);
        assert!(!s.compress_next());
        for _ in 0..PROBE_EVERY {
            s.sent_raw();
        }
        assert!(s.compress_next(), "a trial after {PROBE_EVERY} raw packets");
        // The pages became compressible: compressed from then on.
        for _ in 0..8 {
            s.compressed(3_000_000, 600_000, 10 * MS);
        }
        assert!(s.compress_next());
    }
}
