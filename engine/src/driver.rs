//! The migration driver: the pre-copy convergence loop a VMM would otherwise write itself.
//!
//! Given a downtime limit, [`Driver::migrate`] sends every page, then round after round the
//! pages the guest dirtied meanwhile, and after each round decides, from the bandwidth it
//! achieved and the dirty set it found, what to do next:
//!
//! | decision | when |
//! |---|---|
//! | [`Decision::Stop`] | the predicted downtime of stopping now fits the limit: pause the vCPUs, send the last dirty pages and the device state, end the session |
//! | [`Decision::Throttle`] | the rounds stopped shrinking (the guest dirties pages about as fast as they are sent): hold the guest back, 20 %, 30 %, ... 99 % of the time, as QEMU's auto-converge does |
//! | [`Decision::GiveUp`] | the round or time limit passed without convergence: the guest keeps running here, unthrottled, and the session is dropped |
//! | [`Decision::PostCopy`] | instead of giving up, when the policy allows it and the VMM supports it: the driver hands back the transport and the remaining dirty set; the VMM pauses, sends its state and switches to post-copy |
//! | [`Decision::Probe`] | the prediction fits but the fixed cost of a round is not known yet: an empty round measures it, then the driver decides again |
//! | [`Decision::Continue`] | otherwise: another live round |
//!
//! Every decision is logged (`tracing`, target `pagewire::driver`) and counted
//! ([`DriverReport::decisions`]).
//!
//! The VMM implements [`Vmm`]: collect its dirty log, pause its vCPUs, save its device state,
//! and optionally throttle. The decision logic ([`Convergence`]) is a pure state machine fed
//! with each round's figures, and the driver talks to the network through [`Transport`]
//! (implemented by [`Sender`]), so both are tested without sockets or a guest (the tests below
//! run a scripted VMM on a simulated link).
//!
//! ## The prediction
//!
//! After round *n* the driver knows the round's pages (and how many had data), its bytes on
//! the wire and its duration, and the dirty set the VMM reported. The time per page with data
//! *t* comes from the last round with at least 256 of them, but never from round 1 alone: a
//! first pass (every page new to the destination, most of them zero) costs more per page than
//! the dirty set will, so where stopping after round 1 would fit, one round of the dirty set
//! measures *t* first. The fixed cost *c* of a round (its SYNC round trip, the receiver's
//! barrier, a first packet compressed before anything is sent) is `seconds - pages × t` of the
//! last three rounds smaller than that: the upper median of them, or of those no larger than
//! the final round will be (an empty round's, for a final round of a few pages) where that is
//! less. When the prediction would fit before any such sample, the driver first sends an
//! empty round ([`Decision::Probe`]) to measure *c*. Stopping now would take
//! `dirty × t + c + reserve`, where the reserve covers what follows: pausing, the device
//! state and the session's end. Until this [`Driver`] has completed a migration it is
//! [`Policy::reserve`] ([`DEFAULT_RESERVE`]: pause, state and restore) plus the end's round
//! trip as this session measured it (an empty round's); then it is what the last migrations
//! measured (the largest of three), and a downtime over its prediction is logged with its
//! parts. The driver stops when the prediction fits
//! `headroom × limit`.
//!
//! Where no round can fit (an empty round's round trip plus the reserve is over
//! `headroom × limit`), the driver says so before pausing: [`Decision::GiveUp`] (or
//! [`Decision::PostCopy`]) with the figures, rather than pausing and missing the limit.
//!
//! ## Downtime
//!
//! [`DriverReport::downtime`] is measured on the source: from the call to [`Vmm::pause`] to
//! the destination's confirmation that it has every page and the state (`end-ok`), with the
//! final round's and the end's times as the transport reported them; this side's teardown
//! after the confirmation is not downtime. The destination resumes the guest after that, so
//! its own restore time comes on top (`kvm-demo` measures the whole of it on the
//! destination: docs/kvm.md).

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;
use tracing::{info, warn};

use crate::dirty::{DirtyError, DirtyLog};
use crate::error::SessionError;
use crate::memory::GuestRam;
use crate::pages::RoundPages;
use crate::session::send::MAX_STATE;
use crate::session::Sender;
use crate::stats::SessionStats;

/// Where the driver reads the time: a monotonic clock, or in tests the simulation's.
#[derive(Clone)]
enum Clock {
    Monotonic(Instant),
    #[cfg(test)]
    Simulated(Arc<dyn Fn() -> f64 + Send + Sync>),
}

impl Clock {
    /// Seconds since an arbitrary origin.
    fn now(&self) -> f64 {
        match self {
            Clock::Monotonic(origin) => origin.elapsed().as_secs_f64(),
            #[cfg(test)]
            Clock::Simulated(f) => f(),
        }
    }

    fn since(&self, t: f64) -> Duration {
        Duration::from_secs_f64((self.now() - t).max(0.0))
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

/// An error the VMM reports from one of its [`Vmm`] operations.
pub type VmmError = Box<dyn StdError + Send + Sync>;

/// What the driver needs from the VMM. Only the dirty log, the pause and the state are
/// required; throttling and post-copy are optional.
pub trait Vmm {
    /// Read and clear the VMM's dirty tracking since the last call, ORing it into `log`
    /// (KVM's per-slot bitmaps with [`DirtyLog::add_bitmap`], vm-memory's with
    /// [`crate::rust_vmm::collect_dirty`]). The first call, before round 1, starts tracking
    /// afresh: what it returns is sent anyway, since round 1 sends every page.
    fn collect_dirty(&mut self, log: &mut DirtyLog) -> Result<(), VmmError>;

    /// Stop the vCPUs (and quiesce device models) for the final round. Pages written before
    /// it returns are in the next [`Vmm::collect_dirty`]. Return promptly, throttled or not:
    /// its time is downtime.
    fn pause(&mut self) -> Result<(), VmmError>;

    /// The device state the destination needs to resume (vCPU registers, device models),
    /// called once the vCPUs are paused. At most [`MAX_STATE`] bytes.
    fn save_state(&mut self) -> Result<Vec<u8>, VmmError>;

    /// Hold the guest back `percent` % of the time (0: not at all). `Ok(false)` when this VMM
    /// cannot throttle (the default); the driver then stops asking.
    ///
    /// The driver assumes QEMU's scheme: each vCPU sleeps `percent` % of every 10 ms slice
    /// (at 20 %, 2 ms asleep, 8 ms running), so the dirty rate falls in proportion within a
    /// round. Throttling must not delay [`Vmm::pause`]: a vCPU asleep in its slice is stopped
    /// at once (wake it, or count it as stopped), since the downtime starts when `pause` is
    /// called.
    fn throttle(&mut self, percent: u8) -> Result<bool, VmmError> {
        let _ = percent;
        Ok(false)
    }

    /// Whether this VMM can finish the migration in post-copy (default: no).
    fn supports_postcopy(&self) -> bool {
        false
    }

    /// Called after each live round with what the driver saw and decided (for progress
    /// output; the default does nothing).
    fn round_done(&mut self, record: &RoundRecord) {
        let _ = record;
    }
}

/// The session side of the driver: one round at a time, then the device state, then the end.
/// [`Sender`] implements it; tests implement it with a simulated link.
pub trait Transport {
    /// The guest memory the session sends (the [`Sender`]'s).
    fn memory(&self) -> &Arc<GuestRam>;
    /// Send one round and wait until the destination has applied it.
    fn send_round(&mut self, pages: RoundPages) -> Result<SessionStats, SessionError>;
    /// Send the device state.
    fn send_state(&mut self, state: &[u8]) -> Result<(), SessionError>;
    /// End the session; returns its counters.
    fn finish(self) -> Result<SessionStats, SessionError>
    where
        Self: Sized;
    /// Give the migration up and tell the destination why (it sees
    /// [`SessionError::Abandoned`]). By default the transport is just dropped.
    fn abandon(self, reason: &str)
    where
        Self: Sized,
    {
        let _ = reason;
    }
}

impl Transport for Sender {
    fn memory(&self) -> &Arc<GuestRam> {
        Sender::memory(self)
    }
    fn abandon(self, reason: &str) {
        Sender::abandon(self, reason)
    }
    fn send_round(&mut self, pages: RoundPages) -> Result<SessionStats, SessionError> {
        Sender::send_round(self, pages)
    }
    fn send_state(&mut self, state: &[u8]) -> Result<(), SessionError> {
        Sender::send_state(self, state)
    }
    fn finish(self) -> Result<SessionStats, SessionError> {
        Sender::finish(self)
    }
}

/// How the driver converges.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Longest acceptable downtime (pause → session end on the source).
    pub downtime_limit: Duration,
    /// Fraction of the limit a prediction must fit (the final round also carries what the
    /// guest writes between the last collection and the pause).
    pub headroom: f64,
    /// Time reserved in the downtime for what follows the final round's transfer besides its
    /// round trip: pausing the vCPUs, saving and sending the device state, and the session's
    /// end up to the destination's confirmation. An assumption until measured: a [`Driver`]
    /// that has completed a migration uses what it measured instead (the largest of its last
    /// three), so its next prediction includes this host's and this VMM's real cost.
    pub reserve: Duration,
    /// Most live rounds (round 1 included) before giving up.
    pub max_rounds: u32,
    /// Longest live phase (sum of the live rounds' durations) before giving up.
    pub max_time: Option<Duration>,
    /// A round "does not shrink" when the dirty set it leaves is at least this fraction of
    /// the pages it sent.
    pub stall_ratio: f64,
    /// Rounds in a row that do not shrink before the driver throttles (again).
    pub stall_rounds: u32,
    /// First throttle, percent of the time the guest is held back.
    pub throttle_initial: u8,
    /// Throttle increment after further rounds that do not shrink.
    pub throttle_step: u8,
    /// Highest throttle.
    pub throttle_max: u8,
    /// At the round or time limit, switch to post-copy instead of giving up (when the VMM
    /// supports it).
    pub postcopy: bool,
}

/// [`Policy::reserve`] until measured: pausing the vCPUs, saving the device state and the
/// destination's restore, which no live round can measure. The session's end adds a round
/// trip, which the session's empty round does measure and the prediction adds. In `kvm-demo`
/// on loopback (docs/kvm.md, 65 runs) the whole after the final round took 1.0 ms (median;
/// 1.26 at the 90th percentile) with an empty round of 0.1–0.4 ms.
pub const DEFAULT_RESERVE: Duration = Duration::from_micros(800);

impl Policy {
    /// Defaults around a downtime limit: 30 rounds, no time limit, throttling as QEMU's
    /// auto-converge (20 % then +10 % per two rounds that do not shrink, at most 99 %).
    pub fn new(downtime_limit: Duration) -> Policy {
        Policy {
            downtime_limit,
            headroom: 0.8,
            reserve: DEFAULT_RESERVE,
            max_rounds: 30,
            max_time: None,
            stall_ratio: 0.5,
            stall_rounds: 2,
            throttle_initial: 20,
            throttle_step: 10,
            throttle_max: 99,
            postcopy: false,
        }
    }
}

/// What the driver decides after a live round.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "decision", rename_all = "kebab-case")]
pub enum Decision {
    /// Another live round.
    Continue,
    /// Throttle the guest to this percent, then another live round.
    Throttle { percent: u8 },
    /// Pause and send the rest: the predicted downtime fits.
    Stop { predicted_ms: f64 },
    /// The prediction fits but no round has measured the fixed cost yet: send an empty round
    /// (SYNC and the destination's acknowledgement only) to measure it, then decide again.
    Probe,
    /// Give up: the guest keeps running here.
    GiveUp { reason: String },
    /// Switch to post-copy.
    PostCopy { reason: String },
}

impl Decision {
    fn name(&self) -> &'static str {
        match self {
            Decision::Continue => "continue",
            Decision::Throttle { .. } => "throttle",
            Decision::Stop { .. } => "stop",
            Decision::Probe => "probe",
            Decision::GiveUp { .. } => "give-up",
            Decision::PostCopy { .. } => "post-copy",
        }
    }
}

/// What one live round showed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct RoundObservation {
    /// Pages the round sent.
    pub pages: u64,
    /// Of which all-zero pages (no data, nearly free to send).
    pub zero_pages: u64,
    /// Bytes it put on the wire.
    pub wire_bytes: u64,
    /// How long it took (first page to the destination's acknowledgement).
    pub seconds: f64,
    /// Pages the guest dirtied meanwhile (the next round's size).
    pub dirty_pages: u64,
}

/// How many times each decision was taken.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DecisionCounts {
    /// Live rounds followed by another without a change.
    pub continued: u64,
    /// Throttle raises (applied by the VMM).
    pub throttled: u64,
    /// Throttle raises the VMM could not apply.
    pub throttle_unavailable: u64,
    /// Empty rounds sent to measure the fixed cost of a round.
    pub probes: u64,
    /// Stops (0 or 1).
    pub stopped: u64,
    /// Give-ups (0 or 1).
    pub gave_up: u64,
    /// Switches to post-copy (0 or 1).
    pub postcopy: u64,
}

/// The sans-IO decision logic: feed it each live round, it answers what to do.
#[derive(Clone, Debug)]
pub struct Convergence {
    policy: Policy,
    rounds: u32,
    live_seconds: f64,
    bandwidth: Option<f64>,
    /// Seconds per page with data (compression and wire time together).
    secs_per_page: Option<f64>,
    /// The last few fixed-cost samples of short rounds, (data pages of the round, seconds),
    /// newest last; the prediction interpolates between them by size.
    latency: std::collections::VecDeque<(u64, f64)>,
    probed: bool,
    stalled: u32,
    throttle: u8,
    can_throttle: bool,
    /// The reserve does not include the session's end (it is the policy's, not measured by
    /// a completed migration): the end's round trip is added, as this session measured it.
    end_round_trip: bool,
}

/// Rounds with at least this many pages of data measure the per-page time (smaller ones
/// measure the fixed cost of a round).
const RATE_MIN_PAGES: u64 = 256;
/// Fixed-cost samples kept (the last live rounds and an empty probe: the sizes a final round
/// falls between).
const LATENCY_SAMPLES: usize = 3;

impl Convergence {
    /// A fresh state machine.
    pub fn new(policy: Policy) -> Convergence {
        Convergence {
            policy,
            rounds: 0,
            live_seconds: 0.0,
            bandwidth: None,
            secs_per_page: None,
            latency: std::collections::VecDeque::new(),
            probed: false,
            stalled: 0,
            throttle: 0,
            can_throttle: true,
            end_round_trip: true,
        }
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Achieved bandwidth, wire bytes per second (of the last round with at least 256 pages
    /// of data; for the report, the prediction uses the time per page).
    pub fn bandwidth(&self) -> Option<f64> {
        self.bandwidth
    }

    /// The current throttle, percent.
    pub fn throttle(&self) -> u8 {
        self.throttle
    }

    /// Live rounds observed.
    pub fn rounds(&self) -> u32 {
        self.rounds
    }

    /// Predicted downtime of stopping with `dirty_pages` left, or `None` before any round.
    pub fn predict(&self, dirty_pages: u64) -> Option<Duration> {
        let transfer = match (dirty_pages, self.secs_per_page) {
            (0, _) => 0.0,
            (n, Some(t)) => n as f64 * t,
            (_, None) => return None,
        };
        let secs = transfer + self.fixed_cost_for(dirty_pages).unwrap_or(0.0) + self.reserve_secs();
        Some(Duration::from_secs_f64(secs.clamp(0.0, 1e9)))
    }

    /// What follows the final round: the reserve, and where that is the policy's (nothing
    /// measured yet) the end's round trip as this session measured it (an empty round's).
    fn reserve_secs(&self) -> f64 {
        let end = if self.end_round_trip {
            self.fixed_cost_for(0).unwrap_or(0.0)
        } else {
            0.0
        };
        self.policy.reserve.as_secs_f64() + end
    }

    /// The reserve is what completed migrations measured, the session's end included.
    fn reserve_measured(&mut self) {
        self.end_round_trip = false;
    }

    /// The fixed cost of a round (its SYNC round trip and the destination's barrier, and for a
    /// round of less than a packet per channel the compression nothing overlaps), seconds: the
    /// sample of the largest of the last few short rounds, or `None` before any.
    pub fn fixed_cost(&self) -> Option<f64> {
        self.fixed_cost_for(u64::MAX)
    }

    /// The fixed cost of a round of `pages` pages with data (what its time holds beyond
    /// `pages` × the time per page), interpolated between the samples of the nearest smaller
    /// and larger rounds (the upper median where several rounds had the same size); beyond
    /// the samples, the nearest one's. It depends on a round's size: a round of less than a
    /// packet per channel compresses every page before its first byte leaves (nothing
    /// overlaps), an empty one pays only the round trip. A final round is usually the size of
    /// the last live rounds, so their samples and an empty probe's bracket it.
    fn fixed_cost_for(&self, pages: u64) -> Option<f64> {
        let mut by_size: Vec<(u64, f64)> = Vec::new();
        let mut sizes: Vec<u64> = self.latency.iter().map(|&(n, _)| n).collect();
        sizes.sort_unstable();
        sizes.dedup();
        for n in sizes {
            let mut v: Vec<f64> = self
                .latency
                .iter()
                .filter(|(m, _)| *m == n)
                .map(|&(_, c)| c)
                .collect();
            v.sort_by(f64::total_cmp);
            if let Some(c) = v.get(v.len() / 2) {
                by_size.push((n, *c));
            }
        }
        let below = by_size.iter().rev().find(|(n, _)| *n <= pages);
        let above = by_size.iter().find(|(n, _)| *n >= pages);
        match (below, above) {
            (Some(&(n0, c0)), Some(&(n1, c1))) if n1 > n0 => {
                Some(c0 + (c1 - c0) * (pages - n0) as f64 / (n1 - n0) as f64)
            }
            (Some(&(_, c)), _) | (None, Some(&(_, c))) => Some(c),
            (None, None) => None,
        }
    }

    /// The VMM cannot throttle: never ask again.
    pub fn throttle_unavailable(&mut self) {
        self.can_throttle = false;
    }

    /// Take one live round into account and decide. `postcopy_possible`: the VMM supports it.
    pub fn observe(&mut self, r: &RoundObservation, postcopy_possible: bool) -> Decision {
        self.rounds += 1;
        self.live_seconds += r.seconds.max(0.0);
        // Dirty pages are pages with data: what a page costs is measured on those (zero pages
        // of round 1 cost almost nothing and would make the rate look much better).
        let data_pages = r.pages.saturating_sub(r.zero_pages);
        let rate_round = data_pages >= RATE_MIN_PAGES;
        if r.seconds > 0.0 && r.wire_bytes > 0 && (rate_round || self.bandwidth.is_none()) {
            self.bandwidth = Some(r.wire_bytes as f64 / r.seconds);
        }
        if r.seconds > 0.0 && r.pages > 0 && (rate_round || self.secs_per_page.is_none()) {
            self.secs_per_page = Some(r.seconds / data_pages.max(1) as f64);
        }
        // Only short rounds tell the fixed cost apart from the per-page time.
        if let (Some(t), false) = (self.secs_per_page, rate_round) {
            let cost = (r.seconds - data_pages as f64 * t).max(0.0);
            if self.latency.len() == LATENCY_SAMPLES {
                self.latency.pop_front();
            }
            self.latency.push_back((data_pages, cost));
        }
        let limit = self.policy.downtime_limit.as_secs_f64() * self.policy.headroom;
        if let Some(p) = self.predict(r.dirty_pages) {
            if p.as_secs_f64() <= limit && self.rounds == 1 {
                // Round 1's time per page is a first pass: every page new to the destination
                // (faulted in there), most of them zero. A round of the dirty set measures what
                // the final round will cost per page; it is small when stopping would fit.
                return Decision::Continue;
            }
            let empty_sampled = self.latency.iter().any(|&(n, _)| n == 0);
            if p.as_secs_f64() <= limit && !empty_sampled && !self.probed {
                // No empty round measured yet: large rounds' time hides the fixed cost, which
                // may be most of a short final round, and small live rounds overstate it (the
                // guest competes for the CPUs, the first packet is compressed before anything
                // is sent). Measure it with an empty round first.
                self.probed = true;
                return Decision::Probe;
            }
            if p.as_secs_f64() <= limit {
                return Decision::Stop {
                    predicted_ms: p.as_secs_f64() * 1e3,
                };
            }
        }
        // What stopping costs before any page: an empty round's round trip (measured) and
        // the reserve. Past the limit, no round can fit, however small: say so now rather than
        // pause and miss (throttling shrinks the dirty set, not this). Only on the evidence of
        // an empty round: a round with pages also paid for them (compressing its first
        // packet, say), so its sample overstates the floor; while every recent sample is
        // over, an empty round is sent to measure the floor itself.
        let reserve = self.reserve_secs();
        let fastest = self.latency.iter().map(|&(_, c)| c).reduce(f64::min);
        if let (Some(f), true) = (fastest, self.latency.len() == LATENCY_SAMPLES) {
            if f + reserve > limit {
                let empties: Vec<f64> = self
                    .latency
                    .iter()
                    .filter(|(n, _)| *n == 0)
                    .map(|&(_, c)| c)
                    .collect();
                // Two empty rounds before refusing: one preempted on a busy host (2.3 ms for a
                // 0.2 ms round trip) must not end the migration.
                let empty = if empties.len() >= 2 {
                    empties.iter().copied().reduce(f64::min)
                } else {
                    None
                };
                match empty {
                    Some(c) if c + reserve > limit => {
                        let reason = format!(
                            "stopping costs at least {:.2} ms before any page is sent (an empty round's round trip {:.2} ms, pause/state/end {:.2} ms), over {:.0} % of the {:.2} ms downtime limit",
                            (c + reserve) * 1e3,
                            c * 1e3,
                            reserve * 1e3,
                            self.policy.headroom * 100.0,
                            self.policy.downtime_limit.as_secs_f64() * 1e3
                        );
                        return if self.policy.postcopy && postcopy_possible {
                            Decision::PostCopy { reason }
                        } else {
                            Decision::GiveUp { reason }
                        };
                    }
                    Some(_) => {}
                    None => return Decision::Probe,
                }
            }
        }
        let out_of_rounds = self.rounds >= self.policy.max_rounds;
        let out_of_time = self
            .policy
            .max_time
            .is_some_and(|t| self.live_seconds >= t.as_secs_f64());
        if out_of_rounds || out_of_time {
            let reason = if out_of_rounds {
                format!("no convergence within {} rounds", self.policy.max_rounds)
            } else {
                format!("no convergence within {:.1} s", self.live_seconds)
            };
            return if self.policy.postcopy && postcopy_possible {
                Decision::PostCopy { reason }
            } else {
                Decision::GiveUp { reason }
            };
        }
        let shrinking = (r.dirty_pages as f64) < self.policy.stall_ratio * r.pages as f64;
        if r.pages == 0 {
            // A probe sends no pages: it says nothing about convergence.
        } else if shrinking {
            self.stalled = 0;
        } else {
            self.stalled += 1;
        }
        if self.can_throttle
            && self.stalled >= self.policy.stall_rounds.max(1)
            && self.throttle < self.policy.throttle_max
        {
            self.stalled = 0;
            self.throttle = if self.throttle == 0 {
                self.policy.throttle_initial
            } else {
                self.throttle.saturating_add(self.policy.throttle_step)
            }
            .min(self.policy.throttle_max);
            return Decision::Throttle {
                percent: self.throttle,
            };
        }
        Decision::Continue
    }
}

/// One live round as the driver saw it.
#[derive(Clone, Debug, Serialize)]
pub struct RoundRecord {
    /// 1-based.
    pub round: u32,
    /// The round's figures.
    #[serde(flatten)]
    pub observed: RoundObservation,
    /// Throttle while the round ran, percent.
    pub throttle: u8,
    /// Predicted downtime of stopping after this round, ms.
    pub predicted_ms: Option<f64>,
    /// What the driver decided.
    pub decision: Decision,
}

/// What the driver did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DriverReport {
    /// The live rounds.
    pub rounds: Vec<RoundRecord>,
    /// Decision counters.
    pub decisions: DecisionCounts,
    /// Last achieved bandwidth, wire bytes per second.
    pub bandwidth: Option<f64>,
    /// The downtime predicted when the driver stopped.
    pub predicted_downtime: Option<Duration>,
    /// Measured downtime: pause → session end (see the module docs).
    pub downtime: Option<Duration>,
    /// Pages of the final (paused) round.
    pub final_pages: u64,
    /// Bytes on the wire of the final round.
    pub final_wire_bytes: u64,
    /// The final round's duration.
    pub final_round: Duration,
    /// From [`Transport::finish`] to the destination's confirmation.
    pub end: Duration,
    /// The reserve the prediction used (pause, state, end): measured by earlier migrations of
    /// this driver, or [`Policy::reserve`].
    pub reserve: Duration,
    /// Time [`Vmm::pause`] took.
    pub pause: Duration,
    /// Bytes of device state sent.
    pub state_bytes: usize,
    /// Throttle at the end, percent.
    pub throttle: u8,
}

/// Why a migration did not complete.
#[derive(Debug, Error)]
pub enum DriverError {
    /// No convergence within the policy's limits; the guest keeps running here.
    #[error("migration abandoned after {} rounds: {reason}", report.rounds.len())]
    GaveUp {
        reason: String,
        report: Box<DriverReport>,
    },
    /// The VMM failed one of its operations.
    #[error("VMM: {what}: {source}")]
    Vmm {
        what: &'static str,
        source: VmmError,
        report: Box<DriverReport>,
    },
    /// The session failed.
    #[error("session: {source}")]
    Session {
        source: SessionError,
        report: Box<DriverReport>,
    },
    /// The VMM's dirty log did not fit the guest memory layout.
    #[error("dirty log: {0}")]
    Dirty(#[from] DirtyError),
    /// The device state is larger than one message.
    #[error("device state of {0} bytes exceeds the limit of {MAX_STATE}")]
    StateTooLarge(usize),
}

/// How the migration ended.
#[derive(Debug)]
// Returned once per migration: the size difference costs nothing worth a Box in the API.
#[allow(clippy::large_enum_variant)]
pub enum Outcome<T> {
    /// Every page and the device state are at the destination; the guest is paused here.
    Completed {
        /// What the driver did.
        report: DriverReport,
        /// The session's counters.
        stats: SessionStats,
    },
    /// The policy chose post-copy: the guest still runs here (throttled as reported). The
    /// VMM pauses it, sends its state and switches `transport` to post-copy; `dirty` holds
    /// the pages not yet sent since they were last dirtied.
    PostCopy {
        /// What the driver did.
        report: DriverReport,
        /// The session, still open.
        transport: T,
        /// Pages dirtied since they were last sent.
        dirty: DirtyLog,
    },
}

/// Drives a pre-copy migration (module docs).
#[derive(Debug)]
pub struct Driver {
    policy: Policy,
    page_size: u32,
    pages_per_packet: u32,
    channels: u16,
    /// What the last completed migrations measured besides the final round's time (pause,
    /// state, end), newest last: the reserve of the next prediction is their largest.
    measured_reserve: std::sync::Mutex<std::collections::VecDeque<Duration>>,
    clock: Clock,
}

/// Migrations whose measured reserve a [`Driver`] remembers.
const RESERVE_SAMPLES: usize = 3;

impl Driver {
    /// A driver for a session with `cfg`'s page size and packet size.
    pub fn new(policy: Policy, cfg: &crate::SenderConfig) -> Driver {
        Driver {
            policy,
            page_size: cfg.page_size,
            pages_per_packet: cfg.pages_per_packet,
            channels: cfg.channels,
            measured_reserve: std::sync::Mutex::new(std::collections::VecDeque::new()),
            clock: Clock::Monotonic(Instant::now()),
        }
    }

    /// The reserve the next migration's prediction uses: the largest measured by the last
    /// completed migrations, or the policy's until one has.
    pub fn reserve(&self) -> Duration {
        self.measured().unwrap_or(self.policy.reserve)
    }

    /// The largest reserve the last completed migrations measured, if any.
    fn measured(&self) -> Option<Duration> {
        self.measured_reserve
            .lock()
            .ok()
            .and_then(|m| m.iter().copied().max())
    }

    /// Migrate `mem` through `transport` until the policy decides. On success the guest is
    /// paused on this side and the session has ended; on [`DriverError::GaveUp`] the guest
    /// keeps running (throttle reset to 0) and `transport` is dropped.
    pub fn migrate<T: Transport, V: Vmm>(
        &self,
        mut transport: T,
        vmm: &mut V,
    ) -> Result<Outcome<T>, DriverError> {
        let mem = transport.memory().clone();
        let mem = &*mem;
        let mut report = DriverReport::default();
        let mut policy = self.policy.clone();
        let measured = self.measured();
        policy.reserve = measured.unwrap_or(policy.reserve);
        report.reserve = policy.reserve;
        let mut conv = Convergence::new(policy);
        if measured.is_some() {
            conv.reserve_measured();
        }
        let mut log = DirtyLog::new(mem, self.page_size);
        vmm_call(vmm.collect_dirty(&mut log), "collect dirty log", &report)?;
        log.mark_all();
        let sizes: Vec<u64> = mem.blocks().iter().map(|b| b.len() as u64).collect();
        let mut probe = false;
        loop {
            let pages = if probe {
                RoundPages::new(Vec::new(), &sizes, self.page_size, self.pages_per_packet)
            } else {
                log.take_round(self.pages_per_packet)
            };
            let n = pages.pages();
            let stats = session_call(transport.send_round(pages), &report)?;
            vmm_call(vmm.collect_dirty(&mut log), "collect dirty log", &report)?;
            let obs = RoundObservation {
                pages: n,
                zero_pages: stats.total.pages_zero,
                wire_bytes: stats.total.wire_bytes,
                seconds: stats.seconds,
                dirty_pages: log.pages(),
            };
            let throttle = conv.throttle();
            let mut decision = conv.observe(&obs, vmm.supports_postcopy());
            let predicted = conv.predict(obs.dirty_pages);
            info!(
                target: "pagewire::driver",
                round = conv.rounds(),
                pages = n,
                dirty = obs.dirty_pages,
                seconds = obs.seconds,
                bandwidth = conv.bandwidth().unwrap_or(0.0),
                predicted_ms = predicted.map(|p| p.as_secs_f64() * 1e3),
                decision = decision.name(),
                "live round"
            );
            if let Decision::Throttle { percent } = decision {
                match vmm_call(vmm.throttle(percent), "throttle", &report)? {
                    true => {
                        report.decisions.throttled += 1;
                        info!(target: "pagewire::driver", percent, "guest throttled");
                    }
                    false => {
                        conv.throttle_unavailable();
                        report.decisions.throttle_unavailable += 1;
                        info!(target: "pagewire::driver", "the VMM cannot throttle; continuing without");
                        decision = Decision::Continue;
                    }
                }
            }
            report.rounds.push(RoundRecord {
                round: conv.rounds(),
                observed: obs,
                throttle,
                predicted_ms: predicted.map(|p| p.as_secs_f64() * 1e3),
                decision: decision.clone(),
            });
            if let Some(r) = report.rounds.last() {
                vmm.round_done(r);
            }
            report.bandwidth = conv.bandwidth();
            report.throttle = conv.throttle();
            probe = decision == Decision::Probe;
            match decision {
                Decision::Continue => report.decisions.continued += 1,
                Decision::Probe => report.decisions.probes += 1,
                Decision::Throttle { .. } => {}
                Decision::Stop { .. } => {
                    report.decisions.stopped += 1;
                    report.predicted_downtime = predicted;
                    break;
                }
                Decision::GiveUp { reason } => {
                    report.decisions.gave_up += 1;
                    // The caller gets the error; this is the log's record of it.
                    info!(target: "pagewire::driver", %reason, "giving up; the guest keeps running here");
                    if conv.throttle() > 0 {
                        // Best effort: the migration is over either way.
                        if let Err(e) = vmm.throttle(0) {
                            warn!(target: "pagewire::driver", error = %e, "could not lift the throttle");
                        }
                        report.throttle = 0;
                    }
                    // The destination is told, so it reports an abandoned migration rather
                    // than a broken connection.
                    transport.abandon(&reason);
                    return Err(DriverError::GaveUp {
                        reason,
                        report: Box::new(report),
                    });
                }
                Decision::PostCopy { reason } => {
                    report.decisions.postcopy += 1;
                    info!(target: "pagewire::driver", %reason, "switching to post-copy");
                    return Ok(Outcome::PostCopy {
                        report,
                        transport,
                        dirty: log,
                    });
                }
            }
        }

        // Stop and copy.
        let t_pause = self.clock.now();
        vmm_call(vmm.pause(), "pause", &report)?;
        report.pause = self.clock.since(t_pause);
        vmm_call(vmm.collect_dirty(&mut log), "collect dirty log", &report)?;
        let pages = log.take_round(final_batch(
            log.pages(),
            self.channels,
            self.pages_per_packet,
        ));
        report.final_pages = pages.pages();
        let t_round = self.clock.now();
        let fstats = session_call(transport.send_round(pages), &report)?;
        let round_wall = self.clock.since(t_round);
        report.final_round = Duration::from_secs_f64(fstats.seconds.max(0.0));
        report.final_wire_bytes = fstats.total.wire_bytes;
        let state = vmm_call(vmm.save_state(), "save device state", &report)?;
        if state.len() > MAX_STATE {
            return Err(DriverError::StateTooLarge(state.len()));
        }
        report.state_bytes = state.len();
        session_call(transport.send_state(&state), &report)?;
        let t_finish = self.clock.now();
        let stats = session_call(transport.finish(), &report)?;
        // The final round as the transport timed it, the end up to the destination's
        // confirmation as the transport timed it (not this side's teardown after it), the rest
        // as measured here.
        let end = if stats.end_seconds > 0.0 {
            Duration::from_secs_f64(stats.end_seconds)
        } else {
            self.clock.since(t_finish)
        };
        report.end = end;
        let downtime = Duration::from_secs_f64((t_finish - t_pause).max(0.0))
            .saturating_sub(round_wall)
            + report.final_round
            + end;
        report.downtime = Some(downtime);
        // Learn what stopping costs besides the final round's transfer and round trip.
        let measured = downtime.saturating_sub(report.final_round);
        if let Ok(mut m) = self.measured_reserve.lock() {
            if m.len() == RESERVE_SAMPLES {
                m.pop_front();
            }
            m.push_back(measured);
        }
        if let Some(p) = report.predicted_downtime {
            if downtime > p {
                warn!(
                    target: "pagewire::driver",
                    predicted_ms = p.as_secs_f64() * 1e3,
                    downtime_ms = downtime.as_secs_f64() * 1e3,
                    reserve_ms = report.reserve.as_secs_f64() * 1e3,
                    measured_reserve_ms = measured.as_secs_f64() * 1e3,
                    final_round_ms = report.final_round.as_secs_f64() * 1e3,
                    pause_ms = report.pause.as_secs_f64() * 1e3,
                    end_ms = report.end.as_secs_f64() * 1e3,
                    "the downtime exceeded its prediction; this driver's next prediction reserves {:.2} ms",
                    self.reserve().as_secs_f64() * 1e3
                );
            }
        }
        info!(
            target: "pagewire::driver",
            final_pages = report.final_pages,
            downtime_ms = downtime.as_secs_f64() * 1e3,
            limit_ms = self.policy.downtime_limit.as_secs_f64() * 1e3,
            predicted_ms = report.predicted_downtime.map(|p| p.as_secs_f64() * 1e3),
            "migration complete"
        );
        if downtime > self.policy.downtime_limit {
            warn!(
                target: "pagewire::driver",
                downtime_ms = downtime.as_secs_f64() * 1e3,
                "the downtime exceeded the limit"
            );
        }
        Ok(Outcome::Completed { report, stats })
    }
}

/// Pages per packet of the final round. A round that fills at most one packet per channel is
/// compressed whole before its first byte leaves, and the receiver inflates it only then:
/// nothing overlaps, so a page cost the paused guest twice what it cost in the live rounds
/// (measured: 120 against 52 µs with deflate). Smaller packets, at least four per channel of at
/// least 16 pages, let each channel send one while it compresses the next, as the live rounds
/// do. (The packet's header keeps its size: 1.3 KiB per 16 pages is 2 %.)
fn final_batch(pages: u64, channels: u16, pages_per_packet: u32) -> u32 {
    let per_channel = pages / u64::from(channels.max(1));
    (per_channel / 4).clamp(
        16.min(u64::from(pages_per_packet)),
        u64::from(pages_per_packet),
    ) as u32
}

fn vmm_call<X>(
    r: Result<X, VmmError>,
    what: &'static str,
    report: &DriverReport,
) -> Result<X, DriverError> {
    r.map_err(|source| DriverError::Vmm {
        what,
        source,
        report: Box::new(report.clone()),
    })
}

fn session_call<X>(r: Result<X, SessionError>, report: &DriverReport) -> Result<X, DriverError> {
    r.map_err(|source| DriverError::Session {
        source,
        report: Box::new(report.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Block;
    use crate::stats::ChannelStats;
    use std::cell::Cell;

    const PS: u64 = 4096;

    thread_local! {
        static SIM_NOW: Cell<f64> = const { Cell::new(0.0) };
    }

    /// Simulated seconds shared by the link, the VMM and the driver (each test runs on its
    /// own thread, with its own clock).
    #[derive(Clone, Debug)]
    struct Clock;

    impl Clock {
        fn get(&self) -> f64 {
            SIM_NOW.with(Cell::get)
        }
        fn set(&self, t: f64) {
            SIM_NOW.with(|c| c.set(t));
        }
    }

    /// A link of `bandwidth` bytes/s with `latency` s per round; raw pages (wire = pages ×
    /// 4 KiB + 1 % of headers).
    #[derive(Debug)]
    struct Link {
        clock: Clock,
        bandwidth: f64,
        latency: f64,
        rounds: u32,
        state: Option<Vec<u8>>,
        ended_at: Option<f64>,
        /// How long `finish` takes to the destination's confirmation (`None`: one latency).
        finish_secs: Option<f64>,
        /// Pages are compressed (`None`: raw).
        compress: Option<Compressing>,
        mem: Arc<GuestRam>,
        /// The reason the driver gave when it abandoned the migration.
        abandoned: Option<String>,
    }

    /// A compressing session: each page costs `cost` s of one of `channels` threads, and its
    /// compressed size / page size in round `k` (1-based) is `ratios[k - 1]`, the last entry
    /// for later rounds (the guest's data changes what it compresses to).
    #[derive(Debug)]
    struct Compressing {
        cost: f64,
        channels: f64,
        ratios: Vec<f64>,
    }

    impl Transport for &mut Link {
        fn memory(&self) -> &Arc<GuestRam> {
            &self.mem
        }
        fn abandon(self, reason: &str) {
            self.abandoned = Some(reason.into());
        }
        fn send_round(&mut self, pages: RoundPages) -> Result<SessionStats, SessionError> {
            let n = pages.pages();
            let (wire, cpu) = match &self.compress {
                None => (n * PS + n * PS / 100, 0.0),
                Some(c) => {
                    let i = (self.rounds as usize).min(c.ratios.len().saturating_sub(1));
                    let ratio = c.ratios.get(i).copied().unwrap_or(1.0);
                    let wire = (n as f64 * PS as f64 * ratio) as u64 + n * PS / 100;
                    (wire, n as f64 * c.cost / c.channels)
                }
            };
            // Compression and the link overlap (packets are pipelined): the slower one sets
            // the pace.
            let secs = self.latency + (wire as f64 / self.bandwidth).max(cpu);
            self.clock.set(self.clock.get() + secs);
            self.rounds += 1;
            Ok(SessionStats {
                rounds: 1,
                seconds: secs,
                total: ChannelStats {
                    pages_normal: n,
                    wire_bytes: wire,
                    memory_bytes: n * PS,
                    ..ChannelStats::default()
                },
                channels: Vec::new(),
                end_seconds: 0.0,
            })
        }
        fn send_state(&mut self, state: &[u8]) -> Result<(), SessionError> {
            self.clock.set(self.clock.get() + self.latency);
            self.state = Some(state.to_vec());
            Ok(())
        }
        fn finish(self) -> Result<SessionStats, SessionError> {
            let secs = self.finish_secs.unwrap_or(self.latency);
            self.clock.set(self.clock.get() + secs);
            self.ended_at = Some(self.clock.get());
            Ok(SessionStats {
                end_seconds: secs,
                ..SessionStats::default()
            })
        }
    }

    /// A guest that rewrites a working set of `ws` pages at `rate` pages/s (less the
    /// throttle), starting at page `base`; pausing takes `pause_secs` during which it still
    /// writes.
    struct Scripted {
        clock: Clock,
        last: f64,
        rate: f64,
        ws: u64,
        cursor: u64,
        pages: u64,
        throttle: u8,
        can_throttle: bool,
        postcopy: bool,
        pause_secs: f64,
        paused_at: Option<f64>,
        throttles: Vec<u8>,
    }

    impl Scripted {
        fn new(clock: &Clock, rate: f64, ws: u64, pages: u64) -> Scripted {
            Scripted {
                clock: clock.clone(),
                last: clock.get(),
                rate,
                ws,
                cursor: 0,
                pages,
                throttle: 0,
                can_throttle: true,
                postcopy: false,
                pause_secs: 0.0002,
                paused_at: None,
                throttles: Vec::new(),
            }
        }
    }

    impl Vmm for Scripted {
        fn collect_dirty(&mut self, log: &mut DirtyLog) -> Result<(), VmmError> {
            let now = self.clock.get();
            let end = self.paused_at.map_or(now, |p| p.min(now));
            let dt = (end - self.last).max(0.0);
            self.last = now;
            let run = 1.0 - f64::from(self.throttle) / 100.0;
            let n = ((self.rate * run * dt) as u64).min(self.ws);
            for _ in 0..n {
                let page = 1000 + self.cursor % self.ws;
                self.cursor += 1;
                log.mark_range(0, (page % self.pages) * PS, 1)?;
            }
            Ok(())
        }
        fn pause(&mut self) -> Result<(), VmmError> {
            self.clock.set(self.clock.get() + self.pause_secs);
            self.paused_at = Some(self.clock.get());
            Ok(())
        }
        fn save_state(&mut self) -> Result<Vec<u8>, VmmError> {
            Ok(b"cpu".to_vec())
        }
        fn throttle(&mut self, percent: u8) -> Result<bool, VmmError> {
            if !self.can_throttle {
                return Ok(false);
            }
            self.throttle = percent;
            self.throttles.push(percent);
            Ok(true)
        }
        fn supports_postcopy(&self) -> bool {
            self.postcopy
        }
    }

    /// 1 GiB of guest memory.
    const PAGES: u64 = 1 << 18;

    fn setup(rate: f64, ws: u64) -> (Clock, Link, Scripted) {
        let clock = Clock;
        clock.set(0.0);
        let mem = GuestRam::new(vec![
            Block::anonymous("ram", (PAGES * PS) as usize).expect("map")
        ])
        .expect("layout");
        let link = Link {
            clock: clock.clone(),
            bandwidth: 1e9,
            latency: 0.0003,
            rounds: 0,
            state: None,
            ended_at: None,
            finish_secs: None,
            compress: None,
            mem: Arc::new(mem),
            abandoned: None,
        };
        let vmm = Scripted::new(&clock, rate, ws, PAGES);
        (clock, link, vmm)
    }

    /// A driver reading the simulated clock.
    fn driver(policy: Policy) -> Driver {
        let mut d = Driver::new(policy, &crate::SenderConfig::default());
        d.clock = super::Clock::Simulated(Arc::new(|| Clock.get()));
        d
    }

    fn completed(o: Outcome<&mut Link>) -> DriverReport {
        match o {
            Outcome::Completed { report, .. } => report,
            Outcome::PostCopy { .. } => panic!("expected a completed migration"),
        }
    }

    /// The guest's real downtime in the simulation: pause → session end.
    fn sim_downtime(link: &Link, vmm: &Scripted) -> f64 {
        link.ended_at.expect("ended") - (vmm.paused_at.expect("paused") - vmm.pause_secs)
    }

    #[test]
    fn converging_guest_stops_within_the_limit_without_throttle() {
        let (_c, mut link, mut vmm) = setup(20_000.0, 50_000);
        let limit = Duration::from_millis(5);
        let r = completed(
            driver(Policy::new(limit))
                .migrate(&mut link, &mut vmm)
                .expect("migrate"),
        );
        assert_eq!(r.decisions.stopped, 1);
        assert_eq!(r.decisions.throttled, 0);
        // Every live round moved more than 1 MiB: the round trip was measured by a probe.
        assert_eq!(r.decisions.probes, 1);
        assert_eq!(r.rounds[r.rounds.len() - 2].decision, Decision::Probe);
        assert_eq!(r.rounds[r.rounds.len() - 1].observed.pages, 0);
        assert!(vmm.throttles.is_empty());
        assert_eq!(
            r.rounds[0].observed.pages, PAGES,
            "round 1 sends every page"
        );
        assert!(r.rounds.len() >= 3, "{:?}", r.rounds);
        let sim = sim_downtime(&link, &vmm);
        assert!(sim <= limit.as_secs_f64(), "downtime {sim} s");
        // The report's downtime adds this process's wall time (not simulated) to the final
        // round's simulated time: at least the latter.
        assert!(r.downtime.expect("downtime") >= r.final_round);
        let predicted = r.predicted_downtime.expect("prediction").as_secs_f64();
        assert!(predicted <= 0.8 * limit.as_secs_f64());
        assert_eq!(link.state.as_deref(), Some(&b"cpu"[..]));
    }

    #[test]
    fn guest_faster_than_the_link_converges_only_with_throttling() {
        // 400 k pages/s dirtied over 100 k pages; the link drains about 240 k pages/s.
        let limit = Duration::from_millis(5);
        let (_c, mut link, mut vmm) = setup(400_000.0, 100_000);
        let r = completed(
            driver(Policy::new(limit))
                .migrate(&mut link, &mut vmm)
                .expect("migrate"),
        );
        assert!(r.decisions.throttled >= 1, "{:?}", r.decisions);
        assert_eq!(r.decisions.throttled as usize, vmm.throttles.len());
        assert!(
            vmm.throttles.windows(2).all(|w| w[0] < w[1]),
            "throttle only rises: {:?}",
            vmm.throttles
        );
        assert_eq!(vmm.throttles[0], 20);
        assert!(sim_downtime(&link, &vmm) <= limit.as_secs_f64());

        // The same guest on a VMM that cannot throttle never converges.
        let (_c, mut link, mut vmm) = setup(400_000.0, 100_000);
        vmm.can_throttle = false;
        let policy = Policy {
            max_rounds: 12,
            ..Policy::new(limit)
        };
        match driver(policy).migrate(&mut link, &mut vmm) {
            Err(DriverError::GaveUp { report, .. }) => {
                assert_eq!(report.decisions.throttle_unavailable, 1, "asked once");
                assert_eq!(report.rounds.len(), 12);
            }
            other => panic!("expected a give-up, got {other:?}"),
        }
        assert!(vmm.paused_at.is_none(), "a give-up never pauses the guest");
    }

    #[test]
    fn a_slow_end_is_learned_and_the_next_prediction_holds() {
        // The destination takes 6 ms to confirm the end (a slow commit): more than the
        // policy's assumed reserve. The first migration's prediction misses it; the same
        // driver's next one reserves what it measured, and its prediction holds.
        let limit = Duration::from_millis(20);
        let d = driver(Policy::new(limit));
        assert_eq!(d.reserve(), DEFAULT_RESERVE);
        let mut misses = Vec::new();
        for migration in 0..2 {
            let (_c, mut link, mut vmm) = setup(20_000.0, 50_000);
            link.finish_secs = Some(0.006);
            let r = completed(d.migrate(&mut link, &mut vmm).expect("migrate"));
            let sim = sim_downtime(&link, &vmm);
            let predicted = r.predicted_downtime.expect("prediction").as_secs_f64();
            assert!(sim <= limit.as_secs_f64(), "migration {migration}: {sim} s");
            misses.push((sim - predicted) / sim);
            if migration == 0 {
                assert_eq!(r.reserve, DEFAULT_RESERVE);
                assert!(d.reserve() >= Duration::from_millis(6), "{:?}", d.reserve());
            } else {
                assert!(r.reserve >= Duration::from_millis(6));
            }
        }
        assert!(
            misses[0] > 0.25,
            "the first prediction missed the slow end: {misses:?}"
        );
        assert!(
            misses[1].abs() <= 0.25,
            "the learned prediction is within 25 %: {misses:?}"
        );
    }

    /// Runs a migration, asserting the simulated downtime under `limit` and the prediction
    /// within 25 % of it.
    fn holds_its_promise(link: &mut Link, vmm: &mut Scripted, limit: Duration) {
        let r = completed(
            driver(Policy::new(limit))
                .migrate(&mut *link, vmm)
                .expect("migrate"),
        );
        let sim = sim_downtime(link, vmm);
        let predicted = r.predicted_downtime.expect("prediction").as_secs_f64();
        assert!(
            sim <= limit.as_secs_f64(),
            "downtime {sim} s: {:?}",
            r.rounds
        );
        let miss = (sim - predicted).abs() / sim;
        assert!(
            miss <= 0.25,
            "predicted {predicted} s, simulated {sim} s ({} final pages): {:?}",
            r.final_pages,
            r.rounds
        );
        assert!(r.final_pages > 0, "the final round had pages to predict");
    }

    #[test]
    fn auto_under_a_cap_stops_within_the_limit_and_the_prediction_holds() {
        // A 50 MB/s cap, pages compressed to 15 % (the link, not the two compressing
        // channels, sets the pace: 12 µs a page against 10 µs), a 30 ms limit: the final
        // round is hundreds of pages, most of the downtime.
        let (_c, mut link, mut vmm) = setup(20_000.0, 50_000);
        link.bandwidth = 50e6;
        link.compress = Some(Compressing {
            cost: 20e-6,
            channels: 2.0,
            ratios: vec![0.15],
        });
        holds_its_promise(&mut link, &mut vmm, Duration::from_millis(30));
    }

    #[test]
    fn a_mix_that_changes_between_rounds_is_followed() {
        // The guest's pages compress to 10 % for two rounds, then to 50 %: a page costs five
        // times the link time it did. The prediction follows the rounds of the new mix.
        let (_c, mut link, mut vmm) = setup(20_000.0, 50_000);
        link.bandwidth = 100e6;
        link.compress = Some(Compressing {
            cost: 20e-6,
            channels: 2.0,
            ratios: vec![0.1, 0.1, 0.5],
        });
        holds_its_promise(&mut link, &mut vmm, Duration::from_millis(30));
    }

    #[test]
    fn a_limit_under_the_fixed_cost_of_stopping_is_refused_before_pausing() {
        // A 3 ms round trip and a 2 ms limit: no final round can fit, however small.
        let (_c, mut link, mut vmm) = setup(2_000.0, 50_000);
        link.latency = 0.003;
        let policy = Policy::new(Duration::from_millis(2));
        match driver(policy).migrate(&mut link, &mut vmm) {
            Err(DriverError::GaveUp { reason, report }) => {
                assert!(reason.contains("stopping costs at least"), "{reason}");
                // The 3 ms round trip less the per-page share of a small round's pages.
                let rt: f64 = reason
                    .split("round trip ")
                    .nth(1)
                    .and_then(|t| t.split(' ').next())
                    .and_then(|t| t.parse().ok())
                    .expect("round trip in the reason");
                assert!((2.5..=3.0).contains(&rt), "{reason}");
                assert!(reason.contains("2.00 ms downtime limit"), "{reason}");
                assert_eq!(report.decisions.stopped, 0);
                // Decided as soon as the round trip was measured, not at the round limit.
                assert!(report.rounds.len() < 8, "{} rounds", report.rounds.len());
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(vmm.paused_at.is_none(), "the guest was never paused");
    }

    #[test]
    fn guest_that_never_converges_gives_up_or_switches_to_postcopy() {
        // Even at 99 % throttle the guest dirties 1 M pages/s: more than the link carries.
        let limit = Duration::from_millis(5);
        let (_c, mut link, mut vmm) = setup(100_000_000.0, 200_000);
        let policy = Policy {
            max_rounds: 20,
            ..Policy::new(limit)
        };
        match driver(policy.clone()).migrate(&mut link, &mut vmm) {
            Err(DriverError::GaveUp { report, reason }) => {
                assert!(reason.contains("20 rounds"), "{reason}");
                assert_eq!(
                    link.abandoned.as_deref(),
                    Some(reason.as_str()),
                    "the destination is told why"
                );
                assert_eq!(report.decisions.gave_up, 1);
                assert_eq!(report.decisions.stopped, 0);
                assert!(report.decisions.throttled >= 5);
                assert_eq!(report.throttle, 0, "throttle lifted");
            }
            other => panic!("expected a give-up, got {other:?}"),
        }
        assert_eq!(
            vmm.throttle, 0,
            "the guest runs unthrottled after a give-up"
        );
        assert!(vmm.paused_at.is_none());
        assert_eq!(link.rounds, 20);

        // With a time limit instead: the live phase stops after about 2 s of rounds.
        let (_c, mut link, mut vmm) = setup(100_000_000.0, 200_000);
        let timed = Policy {
            max_time: Some(Duration::from_secs(2)),
            ..Policy::new(limit)
        };
        let err = driver(timed)
            .migrate(&mut link, &mut vmm)
            .expect_err("give up");
        assert!(err.to_string().contains("within 2."), "{err}");

        // Post-copy allowed and supported: the driver hands the session back instead.
        let (_c, mut link, mut vmm) = setup(100_000_000.0, 200_000);
        vmm.postcopy = true;
        let pc = Policy {
            postcopy: true,
            ..policy
        };
        match driver(pc).migrate(&mut link, &mut vmm) {
            Ok(Outcome::PostCopy { report, dirty, .. }) => {
                assert_eq!(report.decisions.postcopy, 1);
                assert!(dirty.pages() > 0);
            }
            other => panic!("expected post-copy, got {other:?}"),
        }
        assert!(
            vmm.paused_at.is_none(),
            "the VMM pauses for post-copy itself"
        );
    }

    #[test]
    fn until_the_reserve_is_measured_the_end_costs_a_measured_round_trip() {
        // The policy's reserve (pause, state, restore) plus the end's round trip: an empty
        // round's, as this session measured it.
        let mut c = Convergence::new(Policy {
            reserve: Duration::from_millis(1),
            ..Policy::new(Duration::from_millis(50))
        });
        let big = RoundObservation {
            pages: 100_000,
            zero_pages: 0,
            wire_bytes: 409_600_000,
            seconds: 0.4,
            dirty_pages: 0,
        };
        c.observe(&big, false);
        let empty = RoundObservation {
            pages: 0,
            zero_pages: 0,
            wire_bytes: 1344,
            seconds: 0.002,
            dirty_pages: 0,
        };
        c.observe(&empty, false);
        // Nothing left: the final round's round trip, the end's, and the reserve.
        let p = c.predict(0).expect("prediction").as_secs_f64();
        assert!((p - 0.005).abs() < 1e-9, "{p}");
        // Measured by a completed migration, the reserve already holds the end.
        c.reserve_measured();
        let p = c.predict(0).expect("prediction").as_secs_f64();
        assert!((p - 0.003).abs() < 1e-9, "{p}");
    }

    #[test]
    fn a_small_final_round_goes_in_several_packets_per_channel() {
        // 115 pages on 2 channels: 57 a channel, in packets of 16 (4 per channel).
        assert_eq!(final_batch(115, 2, 128), 16);
        // 500 pages: 250 a channel, 62 per packet.
        assert_eq!(final_batch(500, 2, 128), 62);
        // Large rounds keep full packets; nothing left: any size.
        assert_eq!(final_batch(100_000, 2, 128), 128);
        assert_eq!(final_batch(0, 2, 128), 16);
        // Never more than the session's packet size.
        assert_eq!(final_batch(115, 1, 8), 8);
    }

    #[test]
    fn prediction_uses_time_per_data_page_and_fixed_cost() {
        let mut c = Convergence::new(Policy {
            reserve: Duration::ZERO,
            ..Policy::new(Duration::from_millis(10))
        });
        // The reserve as a completed migration measured it (the end included): the
        // prediction is the final round alone.
        c.reserve_measured();
        assert_eq!(c.predict(100), None);
        assert_eq!(
            c.predict(0),
            Some(Duration::ZERO),
            "nothing left: nothing to wait for"
        );
        // Round 1: 20 000 pages, 8 000 of them zero, in 0.12 s: 10 µs per page with data.
        let d = c.observe(
            &RoundObservation {
                pages: 20_000,
                zero_pages: 8_000,
                wire_bytes: 12_000 * 4096,
                seconds: 0.12,
                dirty_pages: 5_000,
            },
            false,
        );
        assert_eq!(d, Decision::Continue);
        let p = c.predict(1000).expect("prediction").as_secs_f64();
        assert!((p - 0.010).abs() < 1e-9, "{p}");
        let bw = c.bandwidth().expect("bandwidth");
        assert!((bw - 12_000.0 * 4096.0 / 0.12).abs() < 1.0);
        // A short round sets the fixed cost: 10 pages in 2 ms, of which 0.1 ms per-page time.
        c.observe(
            &RoundObservation {
                pages: 10,
                zero_pages: 0,
                wire_bytes: 10 * 4096,
                seconds: 0.002,
                dirty_pages: 500,
            },
            false,
        );
        let p = c.predict(1000).expect("prediction").as_secs_f64();
        let expect = 1000.0 * 10e-6 + (0.002 - 10.0 * 10e-6);
        assert!((p - expect).abs() < 1e-9, "{p} vs {expect}");
    }

    #[test]
    fn a_fitting_prediction_without_a_latency_sample_probes_first() {
        let mut c = Convergence::new(Policy {
            reserve: Duration::ZERO,
            ..Policy::new(Duration::from_millis(10))
        });
        c.reserve_measured();
        // 4 µs per page, and only 10 pages left: 0.04 ms, but the round trip is unknown.
        let big = RoundObservation {
            pages: 100_000,
            zero_pages: 0,
            wire_bytes: 409_600_000,
            seconds: 0.4096,
            dirty_pages: 10,
        };
        // Round 1 is a first pass (every page new to the destination): one more round first.
        assert_eq!(c.observe(&big, false), Decision::Continue);
        assert_eq!(c.observe(&big, false), Decision::Probe);
        // The empty round took 9 ms: stopping would too, which is over 0.8 × 10 ms.
        let probe = RoundObservation {
            pages: 0,
            zero_pages: 0,
            wire_bytes: 2 * 1344,
            seconds: 0.009,
            dirty_pages: 10,
        };
        assert!(matches!(c.observe(&probe, false), Decision::Continue));
        assert!(c.fixed_cost().expect("sampled") > 0.0089);
        // Never probes twice. A faster round later lets it stop: 10 pages in 1 ms; the 2 pages
        // left fall between it and the slow empty round, and are predicted between the two.
        let small = RoundObservation {
            pages: 10,
            zero_pages: 0,
            wire_bytes: 10 * 4096 + 1344,
            seconds: 0.001,
            dirty_pages: 2,
        };
        assert!(matches!(c.observe(&small, false), Decision::Stop { .. }));
        let p = c.predict(2).expect("prediction").as_secs_f64();
        assert!((0.001..0.009).contains(&p), "{p}");
        assert!(c.predict(10).expect("prediction").as_secs_f64() < p);
    }
}
