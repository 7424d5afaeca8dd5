//! The source VMM: boots the guest with dirty logging and lets pagewire's migration driver
//! (`pagewire::Driver`) migrate it: this file holds only what is KVM-specific, the `Vmm`
//! implementation (KVM's dirty log, pausing the vCPU thread, reading the vCPU state,
//! throttling it), and the post-copy ending when the driver hands over to it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pagewire::driver::{Decision, DriverError, DriverReport, Outcome, RoundRecord, VmmError};
use pagewire::{BlockPages, DirtyLog, Driver, Policy, Sender, SenderConfig, Vmm};
use serde::Serialize;

use super::guest::{self, PAGE};
use super::state::{self, DemoInfo, Snapshot, VcpuState};
use super::vm::{RunStats, Running, StopAt, Vcpu, Vm};
use super::{boot_id, mono_ns, real_ns, Layout};

/// How the source migrates.
#[derive(Clone, Debug)]
pub struct SourceOpts {
    /// The destination's address.
    pub connect: SocketAddr,
    /// Guest layout.
    pub layout: Layout,
    /// pagewire session settings (channels, codec, secret, timeouts).
    pub cfg: SenderConfig,
    /// Most live rounds (the first sends every page) before giving up.
    pub max_rounds: u32,
    /// The downtime the driver aims to stay under.
    pub downtime_limit: Duration,
    /// How long the guest runs before the migration starts.
    pub warmup: Duration,
    /// Throttle the guest when rounds do not converge (QEMU's auto-converge).
    pub auto_converge: bool,
    /// Before each dirty-log collection, wait until the guest has made this many passes over
    /// its working set since the previous one (0: do not wait). A round's dirty set then
    /// follows the guest's program, not how much CPU the host gave the guest.
    pub min_passes_per_round: u64,
    /// Whether and when the migration ends with post-copy instead of a final paused round.
    pub postcopy: PostcopyMode,
}

/// When the source hands over to post-copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PostcopyMode {
    /// Never: pre-copy converges or the driver gives up.
    Off,
    /// After exactly this many live rounds (0: pure post-copy): the driver's round limit,
    /// with post-copy as its answer and no downtime prediction stopping pre-copy first.
    AfterRounds(u32),
    /// The driver's own decision: pre-copy under the downtime limit as with `Off`, but at
    /// the round limit it switches to post-copy instead of giving up.
    Fallback,
}

/// One live round, as the source saw it.
#[derive(Clone, Debug, Serialize)]
pub struct RoundRow {
    /// 1-based.
    pub round: u32,
    /// Pages the round sent.
    pub pages: u64,
    /// Of which zero pages (sent as a flag, no data).
    pub zero_pages: u64,
    /// Bytes on the wire.
    pub wire_bytes: u64,
    /// From the round's start until the receiver reported every page in place.
    pub seconds: f64,
    /// Pages KVM's dirty log reported right after the round (the guest's writes while it
    /// ran): what the next round sends.
    pub dirtied: u64,
    /// KVM_GET_DIRTY_LOG time, µs.
    pub dirty_log_us: f64,
    /// Percent of the time the guest was held back while this round ran.
    pub throttle_pct: u32,
    /// The driver's predicted downtime of stopping after this round, ms.
    pub predicted_ms: Option<f64>,
    /// What the driver decided.
    pub decision: Decision,
}

/// The paused phase on the source.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FinalPhase {
    /// Pages of the final round (the last live dirty set plus what the guest wrote before it
    /// stopped).
    pub pages: u64,
    /// Bytes on the wire in the final round.
    pub wire_bytes: u64,
    /// Pause requested → vCPU thread stopped, ms.
    pub stop_ms: f64,
    /// vCPU state read (all the KVM_GET_* calls), ms.
    pub capture_ms: f64,
    /// The final round, ms.
    pub round_ms: f64,
    /// The end: the session's `end` sent → the destination's `end-ok`, ms.
    pub end_ms: f64,
    /// Pause requested → session ended (state sent, the destination's EndOk), ms: the
    /// driver's measured downtime. The destination's restore comes on top.
    pub pause_to_finish_ms: f64,
    /// The downtime the driver predicted when it decided to stop, ms.
    pub predicted_ms: Option<f64>,
    /// Bytes of vCPU state sent.
    pub state_bytes: usize,
}

/// What the source did.
#[derive(Clone, Debug, Serialize)]
pub struct SourceReport {
    /// Live rounds.
    pub rounds: Vec<RoundRow>,
    /// The paused phase.
    #[serde(rename = "final")]
    pub final_phase: FinalPhase,
    /// Whole migration (connect to finish), seconds.
    pub total_seconds: f64,
    /// Bytes on the wire over the whole session.
    pub total_wire_bytes: u64,
    /// Pages sent over the whole session.
    pub total_pages: u64,
    /// The guest's counter at the pause.
    pub counter_at_pause: u64,
    /// Checkpoint exits on the source (one per pass over the working set).
    pub checkpoints: u64,
    /// Time the guest spent held back by throttling, seconds.
    pub throttled_seconds: f64,
    /// CLOCK_MONOTONIC ns when the pause began (the destination times the downtime from it
    /// on the same host).
    pub pause_mono_ns: u64,
    /// The downtime limit the driver aimed at, ms.
    pub downtime_limit_ms: f64,
    /// The driver's decisions, counted.
    pub decisions: pagewire::driver::DecisionCounts,
    /// Post-copy (instead of a final round), when asked for.
    pub postcopy: Option<PostcopyPhase>,
    /// Every connection was TLS 1.3 (the destination refuses a clear-text one when it has
    /// certificates).
    pub tls: bool,
}

/// Post-copy, as the source saw it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PostcopyPhase {
    /// Pages post-copy delivered (dirty since the last live round, or all of them).
    pub pages: u64,
    /// Of which sent on the background connections.
    pub pages_background: u64,
    /// Page requests served on the urgent connection.
    pub requests: u64,
    /// Bytes on the post-copy connections.
    pub wire_bytes: u64,
    /// Switch → the destination reported every page placed, ms.
    pub until_last_page_ms: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The KVM side of the migration, as pagewire's driver sees it.
struct KvmVmm<'a, F: FnMut(&RoundRow)> {
    vm: &'a Vm,
    layout: Layout,
    running: Option<Running>,
    stopped: Option<(Vcpu, RunStats)>,
    auto_converge: bool,
    /// The driver may hand over to post-copy.
    postcopy: bool,
    throttle: u8,
    min_passes: u64,
    /// The guest's passes at the last collection.
    passes_at_collect: u64,
    /// KVM_GET_DIRTY_LOG durations, µs, one per collection.
    dirty_log_us: Vec<f64>,
    rows: Vec<RoundRow>,
    on_round: F,
    pause_mono_ns: u64,
    pause_real_ns: u64,
    stop: Duration,
    capture: Duration,
    counter: u64,
}

impl<F: FnMut(&RoundRow)> Vmm for KvmVmm<'_, F> {
    fn collect_dirty(&mut self, log: &mut DirtyLog) -> Result<(), VmmError> {
        if let (Some(running), true) = (&self.running, self.min_passes > 0) {
            let want = self.passes_at_collect + self.min_passes;
            let t = Instant::now();
            while running.passes() < want {
                if t.elapsed() > MIN_PASSES_WAIT {
                    return Err(format!(
                        "the guest made {} of the {} passes over its working set asked for \
                         (--min-passes-per-round) within {MIN_PASSES_WAIT:?}",
                        running.passes() - self.passes_at_collect,
                        self.min_passes
                    )
                    .into());
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        let t = Instant::now();
        let bitmap = self.vm.dirty_log()?;
        self.dirty_log_us.push(t.elapsed().as_secs_f64() * 1e6);
        if let Some(running) = &self.running {
            self.passes_at_collect = running.passes();
        }
        // One memory slot: slot 0 is block 0.
        log.add_bitmap(0, &bitmap)?;
        Ok(())
    }

    fn pause(&mut self) -> Result<(), VmmError> {
        // From here to the destination's resume is the downtime.
        self.pause_mono_ns = mono_ns();
        self.pause_real_ns = real_ns();
        let t = Instant::now();
        let running = self.running.take().ok_or("the vCPU is not running")?;
        self.stopped = Some(running.pause(Duration::from_secs(5))?);
        self.stop = t.elapsed();
        Ok(())
    }

    fn save_state(&mut self) -> Result<Vec<u8>, VmmError> {
        let t = Instant::now();
        let (vcpu, _) = self.stopped.as_ref().ok_or("the vCPU is not paused")?;
        let vcpu = VcpuState::capture(self.vm.kvm(), vcpu.fd())?;
        // SAFETY: the vCPU is stopped (its thread has returned it) and the sender only reads.
        let (counter, _) = unsafe { guest::status(self.vm.memory()) }?;
        self.counter = counter;
        let snapshot = Snapshot {
            demo: DemoInfo {
                mem_size: self.layout.mem_size,
                ws_pages: self.layout.ws_pages,
                counter,
                boot_id: boot_id(),
                pause_mono_ns: self.pause_mono_ns,
                pause_real_ns: self.pause_real_ns,
            },
            vcpu,
        };
        let bytes = state::encode(&snapshot);
        self.capture = t.elapsed();
        Ok(bytes)
    }

    fn supports_postcopy(&self) -> bool {
        self.postcopy
    }

    fn throttle(&mut self, percent: u8) -> Result<bool, VmmError> {
        if !self.auto_converge {
            return Ok(false);
        }
        let running = self.running.as_mut().ok_or("the vCPU is not running")?;
        running.set_throttle(u32::from(percent));
        self.throttle = percent;
        Ok(true)
    }

    fn round_done(&mut self, r: &RoundRecord) {
        let row = RoundRow {
            round: r.round,
            pages: r.observed.pages,
            zero_pages: r.observed.zero_pages,
            wire_bytes: r.observed.wire_bytes,
            seconds: r.observed.seconds,
            dirtied: r.observed.dirty_pages,
            // Collection 0 started the log; collection n followed round n.
            dirty_log_us: self
                .dirty_log_us
                .get(r.round as usize)
                .copied()
                .unwrap_or(0.0),
            throttle_pct: u32::from(r.throttle),
            predicted_ms: r.predicted_ms,
            decision: r.decision.clone(),
        };
        (self.on_round)(&row);
        self.rows.push(row);
    }
}

/// The longest wait for the guest's passes before a collection (`min_passes_per_round`).
const MIN_PASSES_WAIT: Duration = Duration::from_secs(30);

/// Run the source. `on_round` sees each live round as it finishes (for printing).
pub fn run(o: &SourceOpts, on_round: impl FnMut(&RoundRow)) -> Result<SourceReport, String> {
    let layout = o.layout;
    let ps = o.cfg.page_size;
    if u64::from(ps) != PAGE {
        return Err(format!("page size {ps}: the guest uses {PAGE}"));
    }
    let vm = Vm::new(layout, true)?;
    vm.write_boot_image()?;
    let vcpu = vm.create_vcpu()?;
    vcpu.boot(&layout)?;
    let running = Running::spawn(vcpu, StopAt::Pause)?;
    let mut kvm = KvmVmm {
        vm: &vm,
        layout,
        running: Some(running),
        stopped: None,
        auto_converge: o.auto_converge,
        postcopy: o.postcopy != PostcopyMode::Off,
        throttle: 0,
        min_passes: o.min_passes_per_round,
        passes_at_collect: 0,
        dirty_log_us: Vec::new(),
        rows: Vec::new(),
        on_round,
        pause_mono_ns: 0,
        pause_real_ns: 0,
        stop: Duration::ZERO,
        capture: Duration::ZERO,
        counter: 0,
    };
    let res = migrate(o, &vm, &mut kvm);
    // Stop the guest (if the migration did not) before its memory goes away.
    if let Some(r) = kvm.running.take() {
        let _ = r.pause(Duration::from_secs(5));
    }
    let Migrated {
        seconds: total_seconds,
        wire_bytes,
        pages,
        driver,
        postcopy,
    } = res?;
    let run_stats = kvm.stopped.as_ref().map(|(_, s)| *s).unwrap_or_default();
    Ok(SourceReport {
        rounds: std::mem::take(&mut kvm.rows),
        final_phase: FinalPhase {
            pages: driver.final_pages,
            wire_bytes: driver.final_wire_bytes,
            stop_ms: ms(kvm.stop),
            capture_ms: ms(kvm.capture),
            round_ms: ms(driver.final_round),
            end_ms: ms(driver.end),
            pause_to_finish_ms: driver.downtime.map_or(0.0, ms),
            predicted_ms: driver.predicted_downtime.map(ms),
            state_bytes: driver.state_bytes,
        },
        total_seconds,
        total_wire_bytes: wire_bytes,
        total_pages: pages,
        counter_at_pause: kvm.counter,
        checkpoints: run_stats.checkpoints,
        throttled_seconds: run_stats.throttled.as_secs_f64(),
        pause_mono_ns: kvm.pause_mono_ns,
        downtime_limit_ms: ms(o.downtime_limit),
        decisions: driver.decisions,
        postcopy,
        tls: o.cfg.tls.is_some(),
    })
}

/// What [`migrate`] did.
struct Migrated {
    /// Connect to finish.
    seconds: f64,
    wire_bytes: u64,
    pages: u64,
    driver: DriverReport,
    postcopy: Option<PostcopyPhase>,
}

/// The migration itself: connect, let the driver run it (or go straight to post-copy), sum up.
fn migrate<F: FnMut(&RoundRow)>(
    o: &SourceOpts,
    vm: &Vm,
    kvm: &mut KvmVmm<'_, F>,
) -> Result<Migrated, String> {
    std::thread::sleep(o.warmup);
    let t0 = Instant::now();
    let mem = vm.memory().clone();
    // The engine compresses a private copy of each page, so pages the running guest rewrites
    // meanwhile never break the stream; every codec is fine here.
    let sender = Sender::connect(o.connect, o.cfg.clone(), mem.clone())
        .map_err(|e| format!("connecting to {}: {e}", o.connect))?;
    if o.postcopy == PostcopyMode::AfterRounds(0) {
        // Pure post-copy: no live round; every page travels after the switch.
        let mut all = DirtyLog::new(&mem, o.cfg.page_size);
        all.mark_all();
        return postcopy(kvm, sender, all, DriverReport::default(), t0);
    }
    let policy = match o.postcopy {
        // Post-copy after exactly `n` live rounds: no downtime prediction stops pre-copy
        // first, and at the round limit the driver hands over instead of giving up.
        PostcopyMode::AfterRounds(n) => Policy {
            max_rounds: n,
            postcopy: true,
            ..Policy::new(Duration::ZERO)
        },
        // Pre-copy as usual; post-copy only where the driver would give up.
        PostcopyMode::Fallback => Policy {
            max_rounds: o.max_rounds,
            postcopy: true,
            ..Policy::new(o.downtime_limit)
        },
        PostcopyMode::Off => Policy {
            max_rounds: o.max_rounds,
            ..Policy::new(o.downtime_limit)
        },
    };
    let driver = Driver::new(policy, &o.cfg);
    match driver.migrate(sender, kvm) {
        Ok(Outcome::Completed { report, stats }) => Ok(Migrated {
            seconds: t0.elapsed().as_secs_f64(),
            wire_bytes: stats.total.wire_bytes,
            pages: stats.total.pages_normal + stats.total.pages_zero,
            driver: report,
            postcopy: None,
        }),
        Ok(Outcome::PostCopy {
            report,
            transport,
            dirty,
        }) => postcopy(kvm, transport, dirty, report, t0),
        Err(DriverError::GaveUp { reason, report }) => Err(format!(
            "the guest did not converge to a {} ms downtime ({reason}, throttle \
             reached {} %); it keeps running here",
            ms(o.downtime_limit),
            report.rounds.iter().map(|r| r.throttle).max().unwrap_or(0)
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// Post-copy ending: pause the guest, add what it wrote since the last round to `dirty`, send
/// its vCPU state, switch (the destination resumes the guest at once) and serve its page
/// faults while the rest streams.
fn postcopy<F: FnMut(&RoundRow)>(
    kvm: &mut KvmVmm<'_, F>,
    mut sender: Sender,
    mut dirty: DirtyLog,
    mut report: DriverReport,
    t0: Instant,
) -> Result<Migrated, String> {
    let live_wire: u64 = report.rounds.iter().map(|r| r.observed.wire_bytes).sum();
    let live_pages: u64 = report.rounds.iter().map(|r| r.observed.pages).sum();
    let t_pause = Instant::now();
    kvm.pause().map_err(|e| format!("pausing the guest: {e}"))?;
    kvm.collect_dirty(&mut dirty)
        .map_err(|e| format!("the last dirty log: {e}"))?;
    let state = kvm
        .save_state()
        .map_err(|e| format!("reading the vCPU state: {e}"))?;
    report.state_bytes = state.len();
    sender
        .send_state(&state)
        .map_err(|e| format!("sending the vCPU state: {e}"))?;
    let pages = dirty.pages();
    let bitmap = dirty.words(0).map(<[u64]>::to_vec).unwrap_or_default();
    let t_switch = Instant::now();
    let pc = sender
        .switch_to_postcopy(vec![(0, BlockPages::Bitmap(bitmap))])
        .map_err(|e| format!("switching to post-copy: {e}"))?;
    report.final_round = t_switch.elapsed();
    report.final_pages = pages;
    // The destination resumes the guest once it has answered the switch: the source's view
    // of the downtime ends here (the pages arrive while the guest runs).
    report.downtime = Some(t_pause.elapsed());
    let st = pc.finish().map_err(|e| format!("post-copy: {e}"))?;
    report.final_wire_bytes = st.wire_bytes;
    Ok(Migrated {
        seconds: t0.elapsed().as_secs_f64(),
        wire_bytes: live_wire + st.wire_bytes,
        pages: live_pages + pages,
        driver: report,
        postcopy: Some(PostcopyPhase {
            pages: st.pages,
            pages_background: st.pages_background,
            requests: st.requests,
            wire_bytes: st.wire_bytes,
            until_last_page_ms: st.seconds * 1e3,
        }),
    })
}
