//! Counters: per channel, per session, and live progress.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// What one channel moved.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct ChannelStats {
    /// Channel id.
    pub channel: u16,
    /// RAM packets (with pages).
    pub packets: u64,
    /// SYNC packets.
    pub sync_packets: u64,
    /// Pages whose data travelled (raw or compressed).
    pub pages_normal: u64,
    /// All-zero pages (no data on the wire).
    pub pages_zero: u64,
    /// Normal pages sent raw.
    pub pages_raw: u64,
    /// Normal pages sent compressed.
    pub pages_compressed: u64,
    /// Guest memory bytes covered (pages × page size). The sender counts the pages it left
    /// out (`pages_left_out`: already right on the receiver); the receiver, the pages that
    /// arrived.
    pub memory_bytes: u64,
    /// Bytes on the wire: init packet, headers, length arrays, payloads.
    pub wire_bytes: u64,
    /// Pages sent raw without a compression attempt (a sample showed them incompressible).
    pub pages_skipped: u64,
    /// Page jobs completed on an accelerator (IAA).
    pub jobs_hardware: u64,
    /// Page jobs run on the CPU (software DEFLATE, QPL's software path, busy fallbacks).
    pub jobs_software: u64,
    /// Submissions an accelerator answered busy.
    pub busy_retries: u64,
    /// Pages compressed on the CPU because the accelerator stayed busy.
    pub busy_fallbacks: u64,
    /// Jobs that failed (the page went raw).
    pub jobs_failed: u64,
    /// Packets (or continuations) sent with SENDMSG_ZC.
    pub zc_sends: u64,
    /// Receives done with READ_FIXED into registered buffers (receiver).
    pub reads_fixed: u64,
    /// TLS 1.3 KeyUpdates: sent (sender) or received (receiver) on the channel.
    pub tls_key_updates: u64,
    /// Zero-copy notifications received.
    pub zc_notifications: u64,
    /// Notifications reporting that the kernel copied the data anyway (always, on loopback).
    pub zc_copied: u64,
    /// Zero pages handled without reading the page: on the sender, pages the kernel (or the
    /// VMM) reported never written; on the receiver, zero pages on fresh memory, left untouched.
    pub pages_zero_unread: u64,
    /// Sender: zero pages of the session's first round in no packet at all (the receiver's
    /// memory is all zero, hello-ok's `fresh`, so they are right there already): holes and
    /// pages read and found zero. Counted in `pages_zero` (holes also in `pages_zero_unread`)
    /// and `memory_bytes` too; the receiver sees none of them.
    pub pages_left_out: u64,
    /// CPU time of the channel's thread.
    pub cpu_seconds: f64,
    /// Codec auto: normal pages sent raw by choice (the link would have idled while they were
    /// compressed, or it carries raw pages faster than compressing them pays).
    pub pages_raw_chosen: u64,
    /// Of `pages_raw_chosen`: because compressing would not pay (the link carries raw pages
    /// faster than the compressor saves link time); see also `pages_raw_receiver_bound`. The
    /// rest: the link would have idled.
    pub pages_raw_link_fast: u64,
    /// Of `pages_raw_chosen`: because the receiver, not the link, was the bottleneck (its
    /// TCP window limited the connection most of its busy time).
    pub pages_raw_receiver_bound: u64,
    /// Codec auto with a ladder: of the pages compressed, those the stronger compressor took
    /// (the deflate codec's, behind QPL) while the link's backlog was long.
    pub pages_compressed_strong: u64,
    /// Normal pages sent raw because they are incompressible (a sample showed it, or the
    /// compressed output did not fit in a page).
    pub pages_incompressible: u64,
    /// Codec auto: the link's drain rate as last measured, bytes/s (0: never measured; summed
    /// over channels in a total).
    pub link_rate: f64,
    /// Codec auto: the compressor's measured speed, page bytes/s (summed over channels).
    pub compress_rate: f64,
}

/// Every u64 counter of [`ChannelStats`], listed once for the arithmetic below.
macro_rules! u64_counters {
    ($m:ident) => {
        $m!(
            packets,
            sync_packets,
            pages_normal,
            pages_zero,
            pages_raw,
            pages_compressed,
            memory_bytes,
            wire_bytes,
            pages_skipped,
            jobs_hardware,
            jobs_software,
            busy_retries,
            busy_fallbacks,
            jobs_failed,
            zc_sends,
            reads_fixed,
            tls_key_updates,
            zc_notifications,
            zc_copied,
            pages_raw_chosen,
            pages_raw_link_fast,
            pages_raw_receiver_bound,
            pages_compressed_strong,
            pages_incompressible,
            pages_zero_unread,
            pages_left_out
        )
    };
}

impl ChannelStats {
    /// Add `other`'s counters into `self` (channel id kept).
    pub fn add(&mut self, other: &ChannelStats) {
        macro_rules! add {
            ($($f:ident),*) => { $(self.$f += other.$f;)* };
        }
        u64_counters!(add);
        self.cpu_seconds += other.cpu_seconds;
        self.link_rate += other.link_rate;
        self.compress_rate += other.compress_rate;
    }

    /// What was counted since `earlier`, a snapshot of the same (monotonic) counters (rates
    /// are the latest measurement, kept as they are).
    pub fn since(&self, earlier: &ChannelStats) -> ChannelStats {
        let mut d = self.clone();
        macro_rules! sub {
            ($($f:ident),*) => { $(d.$f = self.$f.saturating_sub(earlier.$f);)* };
        }
        u64_counters!(sub);
        d.cpu_seconds = self.cpu_seconds - earlier.cpu_seconds;
        d
    }
}

/// What a whole session (or one round) moved.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct SessionStats {
    /// Rounds completed.
    pub rounds: u64,
    /// Wall-clock seconds from the first page to the last acknowledgement.
    pub seconds: f64,
    /// Sum over channels.
    pub total: ChannelStats,
    /// Per channel.
    pub channels: Vec<ChannelStats>,
    /// [`Sender::finish`](crate::Sender::finish) only: seconds from the call to the
    /// destination's `end-ok` (it has every page and the state). The sender's own teardown
    /// (its channel threads exiting) comes after and is not counted.
    pub end_seconds: f64,
}

impl SessionStats {
    /// Guest-memory GB/s (10^9 bytes per second).
    pub fn gbps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.total.memory_bytes as f64 / self.seconds / 1e9
        } else {
            0.0
        }
    }
    /// Observed wire rate: bytes on the wire per second of the session (or round).
    pub fn wire_rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.total.wire_bytes as f64 / self.seconds
        } else {
            0.0
        }
    }
    /// Wire bytes / memory bytes.
    pub fn wire_ratio(&self) -> f64 {
        if self.total.memory_bytes > 0 {
            self.total.wire_bytes as f64 / self.total.memory_bytes as f64
        } else {
            0.0
        }
    }
    pub(crate) fn sum(channels: Vec<ChannelStats>, rounds: u64, seconds: f64) -> SessionStats {
        let mut total = ChannelStats::default();
        for c in &channels {
            total.add(c);
        }
        SessionStats {
            rounds,
            seconds,
            total,
            channels,
            end_seconds: 0.0,
        }
    }
}

/// Live counters, readable from any thread while a session runs.
#[derive(Debug, Default)]
pub struct Progress {
    pages: AtomicU64,
    wire_bytes: AtomicU64,
}

impl Progress {
    /// Pages handled so far.
    pub fn pages(&self) -> u64 {
        self.pages.load(Ordering::Relaxed)
    }
    /// Wire bytes so far.
    pub fn wire_bytes(&self) -> u64 {
        self.wire_bytes.load(Ordering::Relaxed)
    }
    pub(crate) fn add(&self, pages: u64, wire: u64) {
        self.pages.fetch_add(pages, Ordering::Relaxed);
        self.wire_bytes.fetch_add(wire, Ordering::Relaxed);
    }
}

/// CPU seconds used by the calling thread.
pub fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; CLOCK_THREAD_CPUTIME_ID is always available
    // on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_and_since_cover_every_counter() {
        let one = ChannelStats {
            channel: 3,
            packets: 1,
            sync_packets: 2,
            pages_normal: 3,
            pages_zero: 4,
            pages_raw: 5,
            pages_compressed: 6,
            memory_bytes: 7,
            wire_bytes: 8,
            pages_skipped: 9,
            jobs_hardware: 10,
            jobs_software: 11,
            busy_retries: 12,
            busy_fallbacks: 13,
            jobs_failed: 14,
            zc_sends: 15,
            reads_fixed: 16,
            tls_key_updates: 25,
            zc_notifications: 17,
            zc_copied: 18,
            pages_zero_unread: 19,
            pages_left_out: 26,
            cpu_seconds: 0.5,
            pages_raw_chosen: 20,
            pages_raw_link_fast: 21,
            pages_raw_receiver_bound: 23,
            pages_compressed_strong: 24,
            pages_incompressible: 22,
            link_rate: 0.0,
            compress_rate: 0.0,
        };
        let mut two = one.clone();
        two.add(&one);
        assert_eq!(two.packets, 2);
        assert_eq!(two.zc_copied, 36);
        assert_eq!(two.pages_incompressible, 44);
        assert_eq!(two.pages_left_out, 52);
        assert_eq!(two.cpu_seconds, 1.0);
        assert_eq!(
            two.since(&one),
            one,
            "since() undoes add() on every counter"
        );
        assert_eq!(two.since(&one).channel, 3);
    }
}
