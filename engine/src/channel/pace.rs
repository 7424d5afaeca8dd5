//! Adaptive compression (`codec auto`): whether a channel compresses its next page or sends
//! it raw, decided page by page from what the channel's loop observes. Sans-IO: the loop
//! hands in observations (bytes waiting for the link, bytes the link has taken, the cost and
//! yield of the pages it compressed) and gets a [`Choice`] back; the tests below drive it
//! with a simulated link and compressor.
//!
//! The mechanism is opportunistic. Compressing a page costs CPU time and saves link time;
//! it shortens the migration only while the link has other bytes to carry meanwhile. So a
//! page is compressed when
//! 1. the link's backlog (the socket's unsent bytes, the rest of the send in flight and the
//!    packets ready behind it) lasts longer, at the measured drain rate, than compressing
//!    the page takes plus a guard ([`GUARD_SECS`]): otherwise the link would idle while the
//!    packet waits for its last pages, and the page goes raw (so the packet leaves at once);
//! 2. and compressing is worth its CPU: the link time a compressed page saves,
//!    `(1 - ratio) × page / rate`, is at least [`MIN_GAIN`] × the time it costs. On a
//!    link faster than the compressor this sends raw even when a queue forms (a queue on
//!    loopback means the receiver, on the same CPUs, is the bottleneck; CPU spent
//!    compressing would be taken from it, and on a source host from the guests). The
//!    receiver pays for a compressed page too (inflating it), which the sender cannot see:
//!    hence a share of the cost, not just any gain, must come back as link time.
//! 3. and the receiver is not the bottleneck: when the receiver's TCP window limits the
//!    connection most of its busy time (TCP_INFO's `tcpi_rwnd_limited`), the drain is slow
//!    because the receiver does not keep up, and compressed pages would slow it further
//!    (under a cap, only while the drain falls below 90 % of it).
//!
//! With nothing queued the link waits for the packet being built whatever the choice; a page
//! is compressed then only where it saves at least [`IDLE_GAIN`] × its cost in link time.
//!
//! Cost and yield are averages over the pages compressed, so they are kept honest two ways:
//! one cost sample counts at most [`COST_CLAMP`] × the average (a page during which the
//! thread was preempted for milliseconds would otherwise lift it many-fold: measured at
//! 1 Gbit/s, one such page stopped one of two channels compressing for the rest of the
//! migration), and while compression does not pay one page per [`PROBE_INTERVAL`] is
//! compressed anyway, so an estimate from another moment (busier CPUs, another page mix)
//! is corrected instead of deciding forever. A probe that confirms raw doubles the interval
//! to the next (up to [`MAX_PROBE_INTERVAL`]: on a fast link probes were the largest part of
//! auto's extra sender CPU), and a probe's yield weighs more than one page of a run.
//!
//! A slow link fills the backlog, so pages are compressed until the compressor no longer
//! keeps up and the backlog falls under the guard; then pages go raw until it builds up
//! again: the channel settles on the mix that keeps the link busy with the fewest bytes. A
//! fast link drains the backlog and every page goes raw. The drain rate is an average over
//! [`RATE_TAU`] (a fraction of a second), measured only while there is a backlog, so a change
//! of the link rate or of the page mix is followed within tens of milliseconds. The average
//! is corrected for its start (each early sample weighs its share of the time measured so
//! far): a first sample taken while the connection was getting going (on loopback the
//! receiver's first milliseconds drain at ~10 MB/s) would otherwise hold the estimate low,
//! and the channel compressing, for several [`RATE_TAU`]. Raw and
//! compressed pages mix within a packet: in the qpl framing a page whose length is the page
//! size is raw, so every choice stays a valid QEMU stream.

/// Extra backlog, in seconds, required beyond one page's compression time before a page is
/// compressed: covers finishing the packet with raw pages and handing it to the kernel.
pub const GUARD_SECS: f64 = 150e-6;
/// Compress only where a page saves at least this much link time per second of CPU spent.
pub const MIN_GAIN: f64 = 0.3;
/// With nothing queued, compress only where a page saves at least this much link time per
/// second of its compression: the link waits for the packet while it is compressed, and the
/// receiver pays to inflate it (on loopback, where both ends share the CPUs, a saving of about
/// 1× is a loss).
pub const IDLE_GAIN: f64 = 2.0;
/// Time constant of the drain-rate and cost averages.
pub const RATE_TAU: f64 = 0.05;
/// Above this share of its busy time limited by the receiver's window, a connection is
/// receiver-bound: pages go raw.
pub const MAX_RWND_SHARE: f64 = 0.5;
/// Shortest interval over which a receiver-window sample is taken (TCP_INFO counts µs, in
/// steps of the kernel's tick). The loop need not read the counters more often than this.
pub const CHRONO_WINDOW: f64 = 1e-3;
/// Link time the drain-rate samples must cover before any page is compressed (long enough
/// that a loopback receiver's ~3 ms start is a minority of the first estimate).
pub const MIN_SPAN: f64 = 5e-3;
/// Before the drain rate is measured over [`MIN_SPAN`], a page waits ([`Choice::Wait`])
/// while this many bytes wait for the link (two packets of 4 KiB pages), and goes raw
/// otherwise. (Under a bandwidth cap the cap's share stands for the rate from the start.)
pub const UNKNOWN_BACKLOG: u64 = 1 << 20;
/// A receiver advertising less than this window (bytes) is not taking data now.
pub const CLOSED_WINDOW: u32 = 64 << 10;
/// Shortest interval over which a drain-rate sample is taken.
const RATE_WINDOW: f64 = 0.2e-3;
/// Cost of one page's compression assumed until one is measured (software DEFLATE level 1
/// on a 4 KiB page takes 10-25 µs).
const INITIAL_COST: f64 = 20e-6;
/// Weight of one page in the cost and yield averages.
const AVG_WEIGHT: f64 = 0.05;
/// A cost sample counts at most this multiple of the average: a page during which the
/// thread was preempted for milliseconds says little about the next page's cost, and one
/// such sample would otherwise lift the average many-fold for dozens of pages.
const COST_CLAMP: f64 = 3.0;
/// While compression does not pay, one page is still compressed this often (seconds) to
/// refresh the cost and yield estimates: without fresh samples a stale estimate (a cost
/// measured while the CPUs were busy with other work, a yield measured on another page mix)
/// would keep the channel raw for the rest of the session.
pub const PROBE_INTERVAL: f64 = 0.01;
/// Each probe that finds compression still not paying doubles the interval to the next, up
/// to this (seconds). A probe is not cheap: 10 ms apart the compressor starts cold (measured
/// on loopback: 70-100 µs a probe against 20 µs a page in a run, 13 probes a 75 ms
/// migration).
pub const MAX_PROBE_INTERVAL: f64 = 0.08;
/// Weight of a probe's yield in its average: probes are few and far apart, so each one
/// moves the estimate more than a page among many compressed in a row.
const PROBE_WEIGHT: f64 = 0.25;
/// Compressed/raw size assumed until a page is compressed.
const INITIAL_RATIO: f64 = 0.4;

/// What the loop sees before settling a page.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Observation {
    /// Seconds since any fixed origin (monotonic).
    pub at: f64,
    /// Bytes waiting for the link: unsent in the socket, the rest of the send in flight and
    /// the packets ready behind it.
    pub queued: u64,
    /// Bytes the link has taken so far (monotonic): handed to the kernel minus still unsent.
    pub drained: u64,
    /// The connection's busy time so far, µs (TCP_INFO; 0 where unknown).
    pub busy_us: u64,
    /// Of which the receiver's window limited it, µs (0 where unknown).
    pub rwnd_limited_us: u64,
    /// The receiver's advertised window is closed right now: it is not taking data (false
    /// where unknown). The loop reads it at most [`CHRONO_WINDOW`] before the decision. It names
    /// the reason of a raw page before the rate is measured (the receiver, not the link).
    pub window_closed: bool,
}

/// The answer for one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// Compress it.
    Compress,
    /// Send it raw: the link would idle while it is compressed (or its rate is unknown yet).
    RawLinkIdle,
    /// Send it raw: the link carries a raw page faster than compression pays for.
    RawLinkFast,
    /// Send it raw: the receiver, not the link, is the bottleneck (its window limits the
    /// connection most of the time); a compressed page would cost it more, not less.
    RawReceiverBound,
    /// Compress it with the stronger compressor of a ladder ([`Pacer::with_strong`]): the
    /// backlog outlasts a packet's worth of its compression, and the link time its better
    /// yield saves pays for its extra cost.
    CompressStrong,
    /// Decide later: the drain rate is still being measured and at least [`UNKNOWN_BACKLOG`]
    /// waits for the link. Whether that is a receiver getting going or a slow link is not
    /// known yet, and the link has enough to carry meanwhile; a raw page queued now would
    /// cost a slow link its full size. The loop waits for the link to take some of the
    /// backlog and asks again.
    Wait,
}

/// The per-channel decision state.
#[derive(Clone, Debug)]
pub struct Pacer {
    page_size: f64,
    /// Link drain rate, bytes/s (average while backlogged); `None` until measured.
    rate: Option<f64>,
    /// Start of the current rate sample: (time, drained), taken with a backlog.
    mark: Option<(f64, u64)>,
    /// The compressor's cost and yield (the first rung, with a ladder).
    fast: Estimate,
    /// Share of the connection's busy time limited by the receiver's window (average).
    rwnd_share: f64,
    /// Weight the drain-rate samples so far hold in an average over [`RATE_TAU`] (0 before
    /// the first: see [`debiased`]).
    rate_weight: f64,
    /// Seconds of link time the drain-rate samples so far cover.
    rate_span: f64,
    /// Start of the current receiver-window sample: (time, busy µs, rwnd-limited µs).
    chrono_mark: Option<(f64, u64, u64)>,
    /// When a page was last chosen for compression (a probe or not).
    last_compress: Option<f64>,
    /// Seconds from the last compression to the next probe ([`PROBE_INTERVAL`] doubling up
    /// to [`MAX_PROBE_INTERVAL`]).
    probe_interval: f64,
    /// Probes whose yield has not been reported yet: their yield weighs [`PROBE_WEIGHT`].
    probes_pending: u32,
    /// This channel's share of a bandwidth cap, bytes/s: a ceiling on the link rate, known
    /// from the start (`None`: no cap).
    ceiling: Option<f64>,
    /// A second, stronger (slower, smaller output) compressor: its estimates.
    strong: Option<Strong>,
}

/// What a compressor costs and yields, averaged over the pages it compressed.
#[derive(Clone, Debug)]
struct Estimate {
    /// Seconds per compressed page (wall time).
    cost: f64,
    /// Compressed size / page size (1.0 for a page that did not fit).
    ratio: f64,
}

impl Estimate {
    const INITIAL: Estimate = Estimate {
        cost: INITIAL_COST,
        ratio: INITIAL_RATIO,
    };

    /// One page's cost: it counts at most [`COST_CLAMP`] × the average.
    fn cost_sample(&mut self, secs: f64) {
        if secs.is_finite() && secs >= 0.0 {
            let sample = secs.min(COST_CLAMP * self.cost);
            self.cost += AVG_WEIGHT * (sample - self.cost);
        }
    }

    /// One page's yield `r` (compressed / page size), at `weight` in the average.
    fn yield_sample(&mut self, r: f64, weight: f64) {
        self.ratio += weight * (r - self.ratio);
    }
}

/// The stronger compressor of a ladder: its own estimates, and the backlog it needs, in its
/// pages.
#[derive(Clone, Debug)]
struct Strong {
    est: Estimate,
    pages: f64,
    /// When it last took a page.
    last: Option<f64>,
}

impl Pacer {
    /// A pacer for pages of `page_size` bytes.
    pub fn new(page_size: u32) -> Pacer {
        Pacer {
            page_size: f64::from(page_size.max(1)),
            rate: None,
            mark: None,
            fast: Estimate::INITIAL,
            rwnd_share: 0.0,
            rate_weight: 0.0,
            rate_span: 0.0,
            chrono_mark: None,
            last_compress: None,
            probe_interval: PROBE_INTERVAL,
            probes_pending: 0,
            ceiling: None,
            strong: None,
        }
    }

    /// A ladder: besides the compressor measured by [`Pacer::cost`] and [`Pacer::yielded`], a
    /// stronger one (better yield, more CPU; measured by [`Pacer::cost_strong`] and
    /// [`Pacer::yielded_strong`]) takes the pages while the backlog lasts longer than
    /// compressing `pages_per_packet` pages with it and its extra yield pays for its extra
    /// cost. The backlog then settles where the mix of the two keeps the link busy: a slow
    /// link gets the strong compressor's bytes, a faster one more of the fast one's.
    pub fn with_strong(mut self, pages_per_packet: u32) -> Pacer {
        self.strong = Some(Strong {
            est: Estimate::INITIAL,
            pages: f64::from(pages_per_packet.max(1)),
            last: None,
        });
        self
    }

    /// The link carries at most `bytes_per_sec` for this channel (its share of a bandwidth
    /// cap): the rate estimate never exceeds it, and it stands for the rate until one is
    /// measured. (A token bucket lets its burst through at the speed of the path behind it,
    /// which measured alone looks like a fast link.)
    pub fn with_ceiling(mut self, bytes_per_sec: f64) -> Pacer {
        if bytes_per_sec.is_finite() && bytes_per_sec > 0.0 {
            self.ceiling = Some(bytes_per_sec);
        }
        self
    }

    /// Whether the drain rate is still being measured.
    pub fn measuring(&self) -> bool {
        self.rate.is_none() || self.rate_span < MIN_SPAN
    }

    fn observe_receiver(&mut self, o: &Observation) {
        if o.busy_us == 0 {
            return;
        }
        let Some((t0, b0, r0)) = self.chrono_mark else {
            self.chrono_mark = Some((o.at, o.busy_us, o.rwnd_limited_us));
            return;
        };
        let dt = o.at - t0;
        let busy = o.busy_us.saturating_sub(b0);
        if dt < 0.0 {
            self.chrono_mark = Some((o.at, o.busy_us, o.rwnd_limited_us));
        } else if dt >= CHRONO_WINDOW && busy > 0 {
            let share = (o.rwnd_limited_us.saturating_sub(r0) as f64 / busy as f64).min(1.0);
            // A plain average from 0, not corrected for its start like the drain rate: the
            // first tick of a fresh connection is often fully receiver-limited (the receiver
            // starting), and started from it the share sent pages raw under a 20 MB/s cap,
            // where compression is right. The start is covered by waiting for the rate's
            // measurement (`Choice::Wait`).
            let w = 1.0 - (-dt / RATE_TAU).exp();
            self.rwnd_share += w * (share - self.rwnd_share);
            self.chrono_mark = Some((o.at, o.busy_us, o.rwnd_limited_us));
        }
    }

    /// Drain rate of the link in bytes/s as the decisions use it (measured, capped by the
    /// ceiling), if known yet.
    pub fn link_rate(&self) -> Option<f64> {
        self.capped(self.rate)
    }

    /// A rate estimate under the ceiling; the ceiling alone where there is no estimate.
    fn capped(&self, rate: Option<f64>) -> Option<f64> {
        match (rate, self.ceiling) {
            (Some(r), Some(c)) => Some(r.min(c)),
            (r, c) => r.or(c),
        }
    }

    /// Whether the receiver, not the link, is the bottleneck: its window limited the connection
    /// most of its busy time. Not under a cap that the drain keeps up with: the link is the cap
    /// then, and a receiver descheduled for a moment on a busy host (its window full while the
    /// sender waits for tokens anyway) makes most of a capped connection's little busy time
    /// window-limited without slowing the session.
    fn receiver_bound(&self) -> bool {
        if self.rwnd_share <= MAX_RWND_SHARE {
            return false;
        }
        match (self.ceiling, self.rate) {
            (Some(cap), Some(r)) => r < 0.9 * cap,
            _ => true,
        }
    }

    /// Measured compression speed in page bytes per second.
    pub fn compress_rate(&self) -> f64 {
        self.page_size / self.fast.cost
    }

    /// Take an observation into the drain-rate average (also done by [`Pacer::decide`]).
    pub fn observe(&mut self, o: &Observation) {
        let Some((t0, d0)) = self.mark else {
            if o.queued > 0 {
                self.mark = Some((o.at, o.drained));
            }
            return;
        };
        let dt = o.at - t0;
        if dt < 0.0 {
            self.mark = (o.queued > 0).then_some((o.at, o.drained));
            return;
        }
        let sample = o.drained.saturating_sub(d0) as f64 / dt.max(1e-9);
        if o.queued == 0 {
            // The backlog ran out somewhere in the interval: the link may have idled for part
            // of it, so the sample is a lower bound on its rate. It can only raise the
            // estimate (a fast link drains every backlog before a full window passes).
            self.mark = None;
            if dt >= RATE_WINDOW / 4.0 && self.rate.is_none_or(|r| sample > r) {
                self.update(sample, dt);
            }
            return;
        }
        if dt >= RATE_WINDOW {
            self.update(sample, dt);
            self.mark = Some((o.at, o.drained));
        }
    }

    fn update(&mut self, sample: f64, dt: f64) {
        let w = debiased(&mut self.rate_weight, dt);
        self.rate_span += dt;
        self.rate = Some(match self.rate {
            Some(r) => r + w * (sample - r),
            None => sample,
        });
    }

    /// Whether the next page is compressed.
    pub fn decide(&mut self, o: &Observation) -> Choice {
        self.observe(o);
        self.observe_receiver(o);
        let measured = self.rate.filter(|r| *r > 0.0 && self.rate_span >= MIN_SPAN);
        if o.queued == 0 {
            // Nothing for the link to carry: it waits for this packet whatever the choice, and
            // compressing the page delays the packet by its cost. That pays only where the
            // link time the page saves is more than the cost itself: a slow link (a cap, a
            // measured rate). Raw otherwise. (A packet started raw stays raw, so without this
            // every round's first packet went raw on a slow link: a round's time was no longer
            // in proportion to its pages, and the downtime prediction missed.)
            if let (Some(rate), false) = (self.capped(measured), self.receiver_bound()) {
                let saved = (1.0 - self.fast.ratio) * self.page_size / rate;
                if saved >= IDLE_GAIN * self.fast.cost {
                    self.last_compress = Some(o.at);
                    if let Some(st) = self.strong.as_mut() {
                        // The stronger rung by the same rule, on what it adds.
                        let extra_saved = (self.fast.ratio - st.est.ratio) * self.page_size / rate;
                        let extra_cost = (st.est.cost - self.fast.cost).max(0.0);
                        if extra_saved >= IDLE_GAIN * extra_cost {
                            st.last = Some(o.at);
                            return Choice::CompressStrong;
                        }
                    }
                    return Choice::Compress;
                }
            }
            return Choice::RawLinkIdle;
        }
        // The receiver's window has limited the connection most of the time: the receiver
        // is the bottleneck, and compressed pages would cost it more.
        if self.receiver_bound() {
            return Choice::RawReceiverBound;
        }
        let Some(rate) = self.capped(measured) else {
            // No rate measured over [`MIN_SPAN`] yet (and no cap says it). The first
            // milliseconds cannot tell a slow link from a receiver getting going (faulting in
            // fresh memory: 52 MB/s for 3 ms on loopback, its window closed, as a slow link's
            // is while it grows). Compressing then took CPU from such a receiver (60-200
            // pages compressed a loopback migration); raw pages queued then cost a slow link
            // their full size (at 1 Gbit/s through a 20 ms queue 3 % of the pages went raw,
            // 7 % of the migration with QPL's software path behind auto). With a backlog the
            // link has enough to carry meanwhile: wait for the measurement. Without one, raw.
            if o.queued >= UNKNOWN_BACKLOG {
                if self.measuring() {
                    return Choice::Wait;
                }
                // Measured, at a rate of zero: a stalled link; compressing costs it nothing.
                self.last_compress = Some(o.at);
                return Choice::Compress;
            }
            return if o.window_closed {
                Choice::RawReceiverBound
            } else {
                Choice::RawLinkIdle
            };
        };
        let backlog = o.queued as f64 / rate;
        let fast = &self.fast;
        if backlog < fast.cost + GUARD_SECS {
            return Choice::RawLinkIdle;
        }
        let saved = (1.0 - fast.ratio) * self.page_size / rate;
        if saved < MIN_GAIN * fast.cost {
            let probe = self
                .last_compress
                .is_none_or(|t| o.at - t >= self.probe_interval);
            if !probe {
                return Choice::RawLinkFast;
            }
            self.probe_interval = (2.0 * self.probe_interval).min(MAX_PROBE_INTERVAL);
            self.probes_pending = self.probes_pending.saturating_add(1);
            self.last_compress = Some(o.at);
            return Choice::Compress;
        }
        self.probe_interval = PROBE_INTERVAL;
        self.last_compress = Some(o.at);
        if let Some(st) = self.strong.as_mut() {
            // The extra link time the stronger compressor's smaller output saves must pay for
            // its extra CPU as any compression must, and the backlog must outlast a packet of
            // its pages: as the backlog shrinks the fast compressor takes over, and raw pages
            // after it. Where the backlog allows it but the gain does not, it still takes a
            // page every [`MAX_PROBE_INTERVAL`], so its estimates stay current.
            let extra_saved = (self.fast.ratio - st.est.ratio) * self.page_size / rate;
            let extra_cost = (st.est.cost - self.fast.cost).max(0.0);
            let probe = st.last.is_none_or(|t| o.at - t >= MAX_PROBE_INTERVAL);
            if backlog >= st.est.cost * st.pages + GUARD_SECS
                && (probe || extra_saved >= MIN_GAIN * extra_cost)
            {
                st.last = Some(o.at);
                return Choice::CompressStrong;
            }
        }
        Choice::Compress
    }

    /// A page's compression took this thread `secs` (wall time).
    pub fn cost(&mut self, secs: f64) {
        // Wall time, preemptions included: on contended CPUs that is what a page costs. (A
        // variant clamping each sample to 4 × the average compressed more on the loaded
        // benchmark host and was slower there at 10 Gbit/s: docs/benchmarks.md.)
        // A probe's cost weighs as one page: 10 ms or more after the last compression it
        // runs on cold caches (70-100 µs against 20 µs in a run), which says little about a
        // run of compressed pages; its yield (the page mix now) weighs more.
        self.fast.cost_sample(secs);
    }

    /// A compressed page came out `zlen` bytes long (the page size: it did not fit).
    pub fn yielded(&mut self, zlen: usize) {
        let weight = if self.probes_pending > 0 {
            PROBE_WEIGHT
        } else {
            AVG_WEIGHT
        };
        self.fast.yield_sample(self.page_ratio(zlen), weight);
        self.probes_pending = self.probes_pending.saturating_sub(1);
    }

    /// A page's compression with the stronger compressor of a ladder cost `secs` (wall time).
    pub fn cost_strong(&mut self, secs: f64) {
        if let Some(st) = self.strong.as_mut() {
            st.est.cost_sample(secs);
        }
    }

    /// A page compressed by the stronger compressor came out `zlen` bytes long.
    pub fn yielded_strong(&mut self, zlen: usize) {
        let r = self.page_ratio(zlen);
        if let Some(st) = self.strong.as_mut() {
            st.est.yield_sample(r, AVG_WEIGHT);
        }
    }

    /// `zlen` as a share of the page (at most 1).
    fn page_ratio(&self, zlen: usize) -> f64 {
        (zlen as f64 / self.page_size).min(1.0)
    }
}

/// The weight of a sample covering `dt` seconds in an exponential average over
/// [`RATE_TAU`], corrected for the average's start: `total` is the weight the samples so far
/// hold (updated here). The first sample gets weight 1 (it is the average), and until the
/// samples cover several [`RATE_TAU`] each gets about its share of the time they cover, so
/// a start-up transient (a first sample taken while the receiver was still getting going)
/// does not dominate the average for several time constants. Once the samples cover a few
/// [`RATE_TAU`], this is the plain exponential average's `1 - exp(-dt / RATE_TAU)`.
fn debiased(total: &mut f64, dt: f64) -> f64 {
    let w = 1.0 - (-dt.max(0.0) / RATE_TAU).exp();
    *total = *total * (1.0 - w) + w;
    if *total > 0.0 {
        (w / *total).min(1.0)
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    const PAGE: u64 = 4096;

    /// What the loop sees, with no TCP_INFO: at `at`, `queued` bytes waiting, `drained` taken.
    fn obs(at: f64, queued: u64, drained: u64) -> Observation {
        Observation {
            at,
            queued,
            drained,
            busy_us: 0,
            rwnd_limited_us: 0,
            window_closed: false,
        }
    }
    const PPP: usize = 128;

    /// One channel against a simulated link: a socket buffer of `sndbuf` bytes drained at
    /// the link's rate, packets of 128 pages, `depth - 1` packets queued behind the socket,
    /// a compressor that takes `cost` seconds per page and yields `ratio`. `link(t)` gives
    /// the rate at time t. Returns (seconds for all pages, per-page choices).
    struct Sim {
        cost: f64,
        ratio: f64,
        sndbuf: u64,
        depth: usize,
        /// A ladder's stronger compressor: (cost, ratio).
        strong: Option<(f64, f64)>,
    }

    /// A fixed choice for every page, to compare auto with.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Fixed {
        Raw,
        Fast,
        Strong,
    }

    impl Sim {
        fn new(cost: f64, ratio: f64) -> Sim {
            Sim {
                cost,
                ratio,
                sndbuf: 2 << 20,
                depth: 4,
                strong: None,
            }
        }

        fn run(
            &self,
            pages: usize,
            policy: Option<Fixed>,
            link: &dyn Fn(f64) -> f64,
        ) -> (f64, Vec<Choice>) {
            let mut pacer = Pacer::new(PAGE as u32);
            if self.strong.is_some() {
                pacer = pacer.with_strong(PPP as u32);
            }
            let mut t = 0.0f64;
            let mut sock = 0.0f64; // unsent bytes in the socket
            let mut waiting: VecDeque<f64> = VecDeque::new(); // packets behind the socket
            let mut handed = 0.0f64;
            let mut choices = Vec::with_capacity(pages);
            // Let `dt` pass: the link drains the socket, waiting packets move in.
            let pass = |dt: f64,
                        t: &mut f64,
                        sock: &mut f64,
                        waiting: &mut VecDeque<f64>,
                        handed: &mut f64| {
                let mut left = dt;
                while left > 0.0 {
                    let step = left.min(20e-6);
                    *sock = (*sock - link(*t) * step).max(0.0);
                    *t += step;
                    left -= step;
                    while let Some(&p) = waiting.front() {
                        let room = self.sndbuf as f64 - *sock;
                        if room <= 0.0 {
                            break;
                        }
                        // A send puts what fits into the socket; the rest stays waiting.
                        let n = p.min(room);
                        *sock += n;
                        *handed += n;
                        if n < p {
                            if let Some(f) = waiting.front_mut() {
                                *f = p - n;
                            }
                            break;
                        }
                        waiting.pop_front();
                    }
                }
            };
            let mut done = 0;
            while done < pages {
                let mut packet = 0.0;
                for _ in 0..PPP.min(pages - done) {
                    let c = loop {
                        let queued = sock + waiting.iter().sum::<f64>();
                        let o = obs(t, queued as u64, (handed - sock) as u64);
                        match pacer.decide(&o) {
                            // As the channel loop does: let the link drain, ask again.
                            Choice::Wait if policy.is_none() => {
                                pass(100e-6, &mut t, &mut sock, &mut waiting, &mut handed)
                            }
                            c => break c,
                        }
                    };
                    let c = match policy {
                        None => c,
                        Some(Fixed::Raw) => Choice::RawLinkIdle,
                        Some(Fixed::Fast) => Choice::Compress,
                        Some(Fixed::Strong) => Choice::CompressStrong,
                    };
                    choices.push(c);
                    if c == Choice::Compress {
                        pass(self.cost, &mut t, &mut sock, &mut waiting, &mut handed);
                        pacer.cost(self.cost);
                        pacer.yielded((self.ratio * PAGE as f64) as usize);
                        packet += self.ratio * PAGE as f64;
                    } else if c == Choice::CompressStrong {
                        let (cost, ratio) = self.strong.unwrap_or((self.cost, self.ratio));
                        pass(cost, &mut t, &mut sock, &mut waiting, &mut handed);
                        pacer.cost_strong(cost);
                        pacer.yielded_strong((ratio * PAGE as f64) as usize);
                        packet += ratio * PAGE as f64;
                    } else {
                        pass(0.2e-6, &mut t, &mut sock, &mut waiting, &mut handed);
                        packet += PAGE as f64;
                    }
                }
                done += PPP.min(pages - done);
                // The packet joins the queue; with every slot taken, wait for one.
                while waiting.len() >= self.depth - 1 {
                    pass(20e-6, &mut t, &mut sock, &mut waiting, &mut handed);
                }
                waiting.push_back(packet);
                pass(1e-6, &mut t, &mut sock, &mut waiting, &mut handed);
            }
            while sock > 0.0 || !waiting.is_empty() {
                pass(20e-6, &mut t, &mut sock, &mut waiting, &mut handed);
            }
            (t, choices)
        }
    }

    fn compressed_share(c: &[Choice]) -> f64 {
        c.iter().filter(|&&x| x == Choice::Compress).count() as f64 / c.len().max(1) as f64
    }

    const GBIT: f64 = 1e9 / 8.0;

    #[test]
    fn fast_link_sends_raw() {
        // A 10 Gbit/s link, a compressor at 0.2 GB/s (20 µs per page).
        let sim = Sim::new(20e-6, 0.35);
        let (t, c) = sim.run(20_000, None, &|_| 10.0 * GBIT);
        let share = compressed_share(&c);
        assert!(share < 0.1, "compressed {share:.2} of the pages");
        let (raw, _) = sim.run(20_000, Some(Fixed::Raw), &|_| 10.0 * GBIT);
        assert!(t <= raw * 1.05, "auto {t:.4} s, raw {raw:.4} s");
    }

    #[test]
    fn slow_link_compresses() {
        // 0.5 Gbit/s: the compressor (0.2 GB/s of pages, 0.07 GB/s of output) outruns it.
        let sim = Sim::new(20e-6, 0.35);
        let (t, c) = sim.run(20_000, None, &|_| 0.5 * GBIT);
        let share = compressed_share(&c);
        assert!(share > 0.8, "compressed {share:.2} of the pages");
        let (all, _) = sim.run(20_000, Some(Fixed::Fast), &|_| 0.5 * GBIT);
        assert!(t <= all * 1.05, "auto {t:.4} s, compress all {all:.4} s");
    }

    /// Where link and compressor are about as fast, a mix beats both fixed choices.
    #[test]
    fn balanced_link_mixes_and_beats_both_fixed_choices() {
        let sim = Sim::new(20e-6, 0.35);
        let link = |_| 1.5 * GBIT;
        let (t, c) = sim.run(40_000, None, &link);
        let share = compressed_share(&c);
        let (raw, _) = sim.run(40_000, Some(Fixed::Raw), &link);
        let (all, _) = sim.run(40_000, Some(Fixed::Fast), &link);
        assert!(
            share > 0.2 && share < 0.9,
            "compressed {share:.2} of the pages"
        );
        assert!(
            t < raw.min(all) * 0.9,
            "auto {t:.4} s, raw {raw:.4} s, compress all {all:.4} s"
        );
    }

    /// Never much worse than the better fixed choice, over a sweep of link rates.
    #[test]
    fn never_worse_than_the_best_fixed_choice() {
        let sim = Sim::new(20e-6, 0.35);
        for gbit in [0.3, 1.0, 1.5, 2.5, 4.0, 6.0, 10.0, 25.0] {
            let link = move |_| gbit * GBIT;
            let (t, _) = sim.run(20_000, None, &link);
            let (raw, _) = sim.run(20_000, Some(Fixed::Raw), &link);
            let (all, _) = sim.run(20_000, Some(Fixed::Fast), &link);
            eprintln!("{gbit:>5} Gbit/s: auto {t:.4} s, raw {raw:.4} s, compress all {all:.4} s");
            assert!(
                t <= raw.min(all) * 1.05,
                "{gbit} Gbit/s: auto {t:.4} s, raw {raw:.4} s, compress all {all:.4} s"
            );
        }
    }

    /// A ladder (a fast compressor, 10 µs a page at 0.29, and a strong one, 20 µs at 0.21: QPL's
    /// software path and libdeflate here) is never much worse than the best of raw, all fast
    /// and all strong, over a sweep of link rates; on a slow link it sends the strong
    /// compressor's bytes, on a mid link it beats both compressors alone.
    #[test]
    fn a_ladder_follows_the_link() {
        let sim = Sim {
            strong: Some((20e-6, 0.21)),
            ..Sim::new(10e-6, 0.29)
        };
        for gbit in [0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 10.0] {
            let link = move |_| gbit * GBIT;
            // Long enough that the start (the first MiB raw, before the rate is measured) is
            // a small part of the time on the slow links.
            let n = (20_000.0 / f64::min(gbit, 1.0)) as usize;
            let (t, c) = sim.run(n, None, &link);
            let (raw, _) = sim.run(n, Some(Fixed::Raw), &link);
            let (fast, _) = sim.run(n, Some(Fixed::Fast), &link);
            let (strong, _) = sim.run(n, Some(Fixed::Strong), &link);
            let share =
                c.iter().filter(|&&x| x == Choice::CompressStrong).count() as f64 / c.len() as f64;
            eprintln!(
                "{gbit:>5} Gbit/s: auto {t:.4} s ({share:.2} strong), raw {raw:.4} s, \
                 fast {fast:.4} s, strong {strong:.4} s"
            );
            let best = raw.min(fast).min(strong);
            assert!(
                t <= best * 1.05,
                "{gbit} Gbit/s: auto {t:.4} s, raw {raw:.4} s, fast {fast:.4} s, strong {strong:.4} s"
            );
            if gbit <= 0.25 {
                assert!(share > 0.8, "{gbit} Gbit/s: strong {share:.2}");
            }
        }
    }

    /// The link turns from slow to fast mid-round: within a fraction of a second the pages
    /// go raw; and back.
    #[test]
    fn a_change_mid_round_is_followed() {
        let sim = Sim::new(20e-6, 0.35);
        let n = 60_000;
        // Find when the slow phase would end: the first 0.3 s at 0.5 Gbit/s, then 20 Gbit/s.
        let (_, c) = sim.run(n, None, &|t| if t < 0.3 { 0.5 * GBIT } else { 20.0 * GBIT });
        // In the slow phase (~ the first 12 000 pages: 0.3 s at ~40 k pages/s), compressed;
        // the last 20 000 pages are all in the fast phase: raw.
        let early = compressed_share(&c[2_000..8_000]);
        let late = compressed_share(&c[n - 20_000..]);
        assert!(early > 0.8, "slow phase: compressed {early:.2}");
        assert!(late < 0.1, "fast phase: compressed {late:.2}");

        let (_, c) = sim.run(n, None, &|t| {
            if t < 0.05 {
                20.0 * GBIT
            } else {
                0.5 * GBIT
            }
        });
        let early = compressed_share(&c[..1_000]);
        let late = compressed_share(&c[n - 20_000..]);
        assert!(early < 0.2, "fast phase: compressed {early:.2}");
        assert!(late > 0.8, "slow phase: compressed {late:.2}");
    }

    /// Incompressible-looking yields (a page mix change) stop compression on a mid link.
    #[test]
    fn poor_yield_stops_compression() {
        let sim = Sim::new(20e-6, 0.9);
        let (_, c) = sim.run(20_000, None, &|_| 1.5 * GBIT);
        let share = compressed_share(&c[5_000..]);
        assert!(share < 0.1, "compressed {share:.2} at ratio 0.9");
    }

    #[test]
    fn empty_queue_means_raw() {
        let mut p = Pacer::new(4096);
        let o = obs(0.0, UNKNOWN_BACKLOG / 2, 0);
        assert_eq!(
            p.decide(&o),
            Choice::RawLinkIdle,
            "a backlog, rate not measured yet: raw"
        );
        let o = obs(0.0001, UNKNOWN_BACKLOG, 0);
        assert_eq!(
            p.decide(&o),
            Choice::Wait,
            "a large backlog before the rate is measured: wait for the measurement"
        );
        assert_eq!(p.link_rate(), None);
        let o = obs(0.01, 1 << 20, 1 << 20);
        // 100 MB/s measured, 10 ms of backlog: compress.
        assert_eq!(p.decide(&o), Choice::Compress);
        assert!(p
            .link_rate()
            .is_some_and(|r| (r - 104_857_600.0).abs() < 1.0));
        // Nothing queued on a link that carries a raw page faster than compressing it takes
        // (1 GB/s: 2.5 µs of link time saved per page against 20 µs): raw.
        let mut fast = Pacer::new(4096).with_ceiling(1e9);
        assert_eq!(
            fast.decide(&obs(0.0, 0, 0)),
            Choice::RawLinkIdle,
            "nothing queued"
        );
        // Nothing queued on a slow link (a 10 MB/s cap: 246 µs saved per page): the link waits
        // for this packet either way, and compressing it makes the packet leave sooner.
        let mut slow = Pacer::new(4096).with_ceiling(10e6);
        assert_eq!(slow.decide(&obs(0.0, 0, 0)), Choice::Compress);
    }

    /// A round that starts on an idle slow link compresses from its first page, so its time
    /// is in proportion to its pages: the first packet no longer goes raw (and, latched raw
    /// by the loop, whole) because nothing was queued yet.
    #[test]
    fn an_idle_slow_link_compresses_the_first_packet() {
        let mut p = Pacer::new(4096).with_ceiling(25e6);
        let mut compressed = 0;
        for i in 0..128u64 {
            // The packet is being built: nothing is queued until it is handed over.
            if p.decide(&obs(i as f64 * 20e-6, 0, 0)) == Choice::Compress {
                compressed += 1;
                p.cost(20e-6);
                p.yielded(1600);
            }
        }
        assert_eq!(compressed, 128);
        // The receiver bound still wins: compressed pages would slow it further.
        let mut r = Pacer::new(4096).with_ceiling(25e6);
        r.rwnd_share = 1.0;
        assert_eq!(r.decide(&obs(0.0, 0, 0)), Choice::RawLinkIdle);
    }

    /// A slow drain because the receiver does not keep up (its window limits the connection)
    /// is no reason to compress: that would slow the receiver further. When it catches up,
    /// compression resumes.
    #[test]
    fn receiver_bound_link_gets_raw_pages() {
        let mut p = Pacer::new(4096);
        let mut choices = Vec::new();
        // 50 MB/s drain with 4 MiB queued; the receiver's window limits 90 % of the time for
        // the first 0.3 s, then never.
        for i in 0..600u64 {
            let at = i as f64 * 1e-3;
            let busy = i * 1000;
            let rwnd = if at < 0.3 { i * 900 } else { 270_000 };
            choices.push(p.decide(&Observation {
                at,
                queued: 4 << 20,
                drained: i * 50_000,
                busy_us: busy,
                rwnd_limited_us: rwnd,
                window_closed: false,
            }));
        }
        assert!(
            choices[100..300]
                .iter()
                .all(|&c| c == Choice::RawReceiverBound),
            "{:?}",
            &choices[100..110]
        );
        assert!(
            choices[500..].iter().all(|&c| c == Choice::Compress),
            "{:?}",
            &choices[500..510]
        );
    }

    /// A first drain-rate sample taken during a start-up transient (the peer slow for the
    /// first millisecond) does not hold the estimate down for several time constants: after
    /// 10 ms at the real rate the estimate is most of the way there.
    #[test]
    fn a_slow_first_sample_is_outweighed_quickly() {
        let mut p = Pacer::new(4096);
        let mut drained = 0u64;
        for i in 0..=50u64 {
            let at = i as f64 * 0.2e-3;
            p.observe(&obs(at, 1 << 20, drained));
            // 10 MB/s for the first millisecond, then 1 GB/s.
            drained += if at < 1e-3 { 2_000 } else { 200_000 };
        }
        let rate = p.link_rate().unwrap_or(0.0);
        assert!(rate > 0.8e9, "estimate {rate:.3e} B/s after 10 ms");
    }

    /// Drive a pacer against a steadily draining link with a constant backlog: `yield_at(t)`
    /// is the compressed size of a page compressed at time t, `cost_of(n)` the wall time the
    /// n-th compression takes. Returns (time, choice) per page.
    fn drive(
        rate: f64,
        secs: f64,
        yield_at: &dyn Fn(f64) -> f64,
        cost_of: &dyn Fn(usize) -> f64,
    ) -> Vec<(f64, Choice)> {
        let mut p = Pacer::new(4096);
        let mut t = 0.0;
        let mut n = 0;
        let mut out = Vec::new();
        while t < secs {
            let c = p.decide(&obs(t, 4 << 20, (t * rate) as u64));
            if c == Choice::Compress {
                let cost = cost_of(n);
                n += 1;
                p.cost(cost);
                p.yielded((yield_at(t) * 4096.0) as usize);
                t += cost;
            } else {
                t += 1e-6;
            }
            out.push((t, c));
        }
        out
    }

    fn share_between(v: &[(f64, Choice)], from: f64, to: f64) -> f64 {
        let w: Vec<Choice> = v
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|(_, c)| *c)
            .collect();
        compressed_share(&w)
    }

    /// A page during which the thread was preempted (its compression took 5 ms of wall time
    /// instead of 30 µs) does not stop compression on a link that needs it: one sample counts
    /// at most [`COST_CLAMP`] × the average.
    #[test]
    fn a_preempted_page_does_not_stop_compression() {
        // Half of 1 Gbit/s (one of two channels).
        let v = drive(0.5 * GBIT, 0.2, &|_| 0.3, &|n| {
            if n == 500 {
                5e-3
            } else {
                30e-6
            }
        });
        let late = share_between(&v, 0.1, 0.2);
        assert!(late > 0.9, "compressed {late:.2} after the preempted page");
    }

    /// The page mix turns from incompressible to compressible while the channel sends raw
    /// because compression did not pay: probes (at most [`MAX_PROBE_INTERVAL`] apart) see the
    /// new yield, and within a fraction of a second the channel compresses again.
    #[test]
    fn a_stale_yield_is_refreshed_by_probes() {
        // Half of 2.5 Gbit/s; pages yield 0.98 for the first 0.2 s, then 0.3.
        let v = drive(
            1.25 * GBIT,
            1.0,
            &|t| if t < 0.2 { 0.98 } else { 0.3 },
            &|_| 30e-6,
        );
        let early = share_between(&v, 0.1, 0.2);
        assert!(early < 0.1, "incompressible phase: compressed {early:.2}");
        let late = share_between(&v, 0.6, 1.0);
        assert!(late > 0.9, "compressible phase: compressed {late:.2}");
    }

    /// On a link where compression does not pay, probes back off: one second on a fast link
    /// draws about 1 / [`MAX_PROBE_INTERVAL`] probes, not 1 / [`PROBE_INTERVAL`].
    #[test]
    fn probes_back_off_while_raw_is_right() {
        // Half of 10 Gbit/s; pages yield 0.3 at 30 µs each: compression never pays.
        let v = drive(5.0 * GBIT, 1.01, &|_| 0.3, &|_| 30e-6);
        // After the start (pages compressed while the rate is measured).
        let probes = v
            .iter()
            .filter(|(t, c)| *t >= 0.01 && *c == Choice::Compress)
            .count();
        // 1 / MAX_PROBE_INTERVAL = 12.5, plus the first doublings; fixed 10 ms probes: 100.
        let most = 20;
        assert!(
            (5..=most).contains(&probes),
            "{probes} probes in 1 s (expected 5..={most})"
        );
    }

    /// Before the drain rate is measured a large backlog waits (a slow link and a receiver
    /// getting going look alike then), a small one goes raw; once the rate is measured the
    /// pages are decided by it, whatever the window.
    #[test]
    fn before_the_rate_is_measured_a_backlog_waits() {
        let mut p = Pacer::new(4096);
        let mut o = Observation {
            window_closed: true,
            ..obs(0.0, 2 * UNKNOWN_BACKLOG, 0)
        };
        assert!(p.measuring());
        assert_eq!(p.decide(&o), Choice::Wait);
        o.at = 0.0001;
        o.window_closed = false;
        assert_eq!(p.decide(&o), Choice::Wait, "the window does not decide it");
        o.queued = UNKNOWN_BACKLOG / 2;
        assert_eq!(p.decide(&o), Choice::RawLinkIdle);
        o.window_closed = true;
        assert_eq!(p.decide(&o), Choice::RawReceiverBound);
        // 50 MB/s measured over 10 ms: a slow link, compressed.
        o.at = 0.0101;
        o.drained = 500_000;
        o.queued = 2 * UNKNOWN_BACKLOG;
        assert_eq!(p.decide(&o), Choice::Compress);
        assert!(!p.measuring());
        // Once the rate is known a closed window alone (a slow link's window-limited start)
        // changes nothing.
        o.at = 0.0102;
        o.drained = 510_000;
        assert_eq!(p.decide(&o), Choice::Compress);
    }

    /// Waiting ends: a link that takes nothing at all is measured (at zero) within
    /// [`MIN_SPAN`] of samples, and the pages are decided then.
    #[test]
    fn a_stalled_link_does_not_wait_forever() {
        let mut p = Pacer::new(4096);
        let mut last = Choice::Wait;
        for i in 0..1000u64 {
            last = p.decide(&Observation {
                window_closed: true,
                ..obs(i as f64 * 100e-6, 4 << 20, 0)
            });
            if last != Choice::Wait {
                assert!(
                    i as f64 * 100e-6 < 4.0 * MIN_SPAN,
                    "waited {:.1} ms",
                    i as f64 * 0.1
                );
                break;
            }
        }
        assert_ne!(last, Choice::Wait);
    }

    /// Under a bandwidth cap the channel's share of it is the link's rate from the first
    /// page, and a fast drain while the token bucket lets its burst through does not make
    /// the link look fast.
    #[test]
    fn a_cap_is_the_link_from_the_start() {
        let mut p = Pacer::new(4096).with_ceiling(10e6);
        let mut o = obs(0.0, 256 << 10, 0);
        assert_eq!(
            p.decide(&o),
            Choice::Compress,
            "no sample yet: the cap's rate"
        );
        // The burst: 2 GB/s for 5 ms.
        for i in 1..=25u64 {
            o.at = i as f64 * 0.2e-3;
            o.drained = i * 400_000;
            assert_eq!(p.decide(&o), Choice::Compress, "sample {i}");
        }
        assert!(p.link_rate().is_some_and(|r| r <= 10e6));
        // Without the cap the same samples read as a fast link.
        let mut q = Pacer::new(4096);
        let mut last = Choice::Compress;
        for i in 0..=25u64 {
            o.at = i as f64 * 0.2e-3;
            o.drained = i * 400_000;
            last = q.decide(&o);
        }
        assert_ne!(last, Choice::Compress);
    }

    /// Under a cap, a receiver whose window is often full is the bottleneck only if the link
    /// drains below the cap: draining at the cap, the cap is the link (a receiver descheduled
    /// for moments on a busy host fills its window while the sender waits for tokens anyway).
    #[test]
    fn under_a_cap_the_drain_says_whether_the_receiver_keeps_up() {
        for (drain, bound) in [(10e6, false), (4e6, true)] {
            let mut p = Pacer::new(4096).with_ceiling(10e6);
            let mut last = Choice::Wait;
            for i in 0..=100u64 {
                let at = i as f64 * 0.2e-3;
                p.rwnd_share = 1.0;
                last = p.decide(&obs(at, 1 << 20, (at * drain) as u64));
            }
            assert_eq!(
                last == Choice::RawReceiverBound,
                bound,
                "draining at {drain} B/s under a 10 MB/s cap: {last:?}"
            );
        }
    }
}
