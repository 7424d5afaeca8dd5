//! The source VMM: boots the guest with dirty logging, migrates it round by round while it
//! runs, then pauses it and sends the rest.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pagewire::{BlockPages, Config, RoundPages, Sender, SessionStats};
use serde::Serialize;

use super::guest::{self, PAGE};
use super::state::{self, DemoInfo, Snapshot, VcpuState};
use super::vm::{Running, StopAt, Vm};
use super::{boot_id, mono_ns, real_ns, Layout};

/// How the source migrates.
#[derive(Clone, Debug)]
pub struct SourceOpts {
    /// The destination's address.
    pub connect: SocketAddr,
    /// Guest layout.
    pub layout: Layout,
    /// pagewire session settings (channels, codec, secret, timeouts).
    pub cfg: Config,
    /// Most live rounds (the first sends every page) before the final, paused one.
    pub max_rounds: u32,
    /// Pause once the dirty set found after a round has at most this many pages.
    pub threshold: u64,
    /// How long the guest runs before the migration starts.
    pub warmup: Duration,
    /// Throttle the guest when rounds do not converge (QEMU's auto-converge).
    pub auto_converge: bool,
    /// Post-copy after this many live rounds (0: pure post-copy): the guest resumes on the
    /// destination at once and its remaining pages follow.
    pub postcopy: Option<u32>,
}

/// First throttle, and the step after each further round that does not converge.
const THROTTLE_STEP: u32 = 20;

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
    /// send_state, ms.
    pub state_ms: f64,
    /// finish: End, the destination's EndOk (every page applied), channel threads joined, ms.
    pub finish_ms: f64,
    /// Pause requested → finish returned, ms. Not the downtime: the destination resumes the
    /// guest as soon as its session ends, while this side may still be closing channels.
    pub pause_to_finish_ms: f64,
    /// Bytes of vCPU state sent.
    pub state_bytes: usize,
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
    /// Post-copy (instead of a final round), when asked for.
    pub postcopy: Option<PostcopyPhase>,
}

fn count(bitmap: &[u64]) -> u64 {
    bitmap.iter().map(|w| u64::from(w.count_ones())).sum()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn session_err(what: &'static str) -> impl Fn(pagewire::SessionError) -> String {
    move |e| format!("{what}: {e}")
}

/// Run the source. `on_round` sees each live round as it finishes (for printing).
pub fn run(o: &SourceOpts, mut on_round: impl FnMut(&RoundRow)) -> Result<SourceReport, String> {
    let layout = o.layout;
    let vm = Vm::new(layout, true)?;
    vm.write_boot_image()?;
    let vcpu = vm.create_vcpu()?;
    vcpu.boot(&layout)?;
    let running = Running::spawn(vcpu, StopAt::Pause)?;
    let res = migrate(o, &vm, running, &mut on_round);
    res.map_err(|(e, running)| {
        // Stop the guest before its memory goes away with the error.
        if let Some(r) = running {
            let _ = r.pause(Duration::from_secs(5));
        }
        e
    })
}

type Failed = (String, Option<Running>);

fn migrate(
    o: &SourceOpts,
    vm: &Vm,
    mut running: Running,
    on_round: &mut impl FnMut(&RoundRow),
) -> Result<SourceReport, Failed> {
    let layout = o.layout;
    let size = layout.mem_size;
    let ps = o.cfg.page_size;
    let ppp = o.cfg.pages_per_packet;
    if u64::from(ps) != PAGE {
        return Err((
            format!("page size {ps}: the guest uses {PAGE}"),
            Some(running),
        ));
    }
    std::thread::sleep(o.warmup);
    let t0 = Instant::now();
    let mem = vm.memory().clone();
    // The engine compresses a private copy of each page, so pages the running guest rewrites
    // meanwhile never break the stream; every codec is fine here.
    let mut sender = match Sender::connect(o.connect, o.cfg.clone(), mem) {
        Ok(s) => s,
        Err(e) => return Err((format!("connecting to {}: {e}", o.connect), Some(running))),
    };
    // Start the dirty log afresh: round 1 sends everything, the log then holds what the guest
    // wrote while round 1 ran.
    if let Err(e) = vm.dirty_log() {
        return Err((e, Some(running)));
    }
    let mut rounds = Vec::new();
    let mut pages = RoundPages::all(&[size], ps, ppp);
    let mut last_bitmap = Vec::new();
    let mut throttle = 0;
    while o.postcopy != Some(0) {
        let n = pages.pages();
        let stats: SessionStats = match sender.send_round(pages) {
            Ok(s) => s,
            Err(e) => return Err((format!("round {}: {e}", rounds.len() + 1), Some(running))),
        };
        let t = Instant::now();
        let bitmap = match vm.dirty_log() {
            Ok(b) => b,
            Err(e) => return Err((e, Some(running))),
        };
        let dirty_log_us = t.elapsed().as_secs_f64() * 1e6;
        let row = RoundRow {
            round: rounds.len() as u32 + 1,
            pages: n,
            zero_pages: stats.total.pages_zero,
            wire_bytes: stats.total.wire_bytes,
            seconds: stats.seconds,
            dirtied: count(&bitmap),
            dirty_log_us,
            throttle_pct: throttle,
        };
        on_round(&row);
        let done = match o.postcopy {
            Some(n) => row.round >= n,
            None => row.dirtied <= o.threshold || row.round >= o.max_rounds,
        };
        // Auto-converge: the guest dirtied more than half of what the round could send, so
        // the next round will not be much smaller. Hold the guest back, more each time.
        if !done && o.auto_converge && row.dirtied * 2 > row.pages {
            throttle = (throttle + THROTTLE_STEP).min(99);
            running.set_throttle(throttle);
        }
        rounds.push(row);
        last_bitmap = bitmap;
        if done {
            break;
        }
        pages = RoundPages::new(
            vec![(0, BlockPages::Bitmap(last_bitmap.clone()))],
            &[size],
            ps,
            ppp,
        );
    }

    // Stop and copy: from here to the destination's resume is the downtime.
    let pause_mono_ns = mono_ns();
    let pause_real_ns = real_ns();
    let t_pause = Instant::now();
    let (vcpu, run_stats) = running
        .pause(Duration::from_secs(5))
        .map_err(|e| (e, None))?;
    let stopped = t_pause.elapsed();
    let t = Instant::now();
    let vstate = VcpuState::capture(vm.kvm(), vcpu.fd()).map_err(|e| (e, None))?;
    // SAFETY: the vCPU is stopped (its thread has returned it) and the sender only reads.
    let (counter, _) = unsafe { guest::status(vm.memory()) }.map_err(|e| (e, None))?;
    let capture = t.elapsed();
    let t = Instant::now();
    let tail = vm.dirty_log().map_err(|e| (e, None))?;
    if o.postcopy == Some(0) {
        last_bitmap = tail.iter().map(|_| u64::MAX).collect();
    }
    for (a, b) in last_bitmap.iter_mut().zip(&tail) {
        *a |= b;
    }
    if o.postcopy.is_some() {
        return postcopy(
            o,
            sender,
            PausedAt {
                t0,
                t_pause,
                stopped,
                capture,
                counter,
                pause_mono_ns,
                pause_real_ns,
                vstate,
                bitmap: last_bitmap,
                rounds,
                checkpoints: run_stats.checkpoints,
                throttled: run_stats.throttled,
            },
        )
        .map_err(|e| (e, None));
    }
    let final_pages = count(&last_bitmap);
    let round = RoundPages::new(vec![(0, BlockPages::Bitmap(last_bitmap))], &[size], ps, ppp);
    let fstats = sender
        .send_round(round)
        .map_err(session_err("final round"))
        .map_err(|e| (e, None))?;
    let round_time = t.elapsed();
    let t = Instant::now();
    let snapshot = Snapshot {
        demo: DemoInfo {
            mem_size: size,
            ws_pages: layout.ws_pages,
            counter,
            boot_id: boot_id(),
            pause_mono_ns,
            pause_real_ns,
        },
        vcpu: vstate,
    };
    let bytes = state::encode(&snapshot);
    sender
        .send_state(&bytes)
        .map_err(session_err("sending the vCPU state"))
        .map_err(|e| (e, None))?;
    let state_time = t.elapsed();
    let t = Instant::now();
    let total = sender
        .finish()
        .map_err(session_err("ending the session"))
        .map_err(|e| (e, None))?;
    let finish_time = t.elapsed();
    let pause_to_finish = t_pause.elapsed();
    drop(vcpu);
    Ok(SourceReport {
        total_seconds: t0.elapsed().as_secs_f64(),
        total_wire_bytes: total.total.wire_bytes,
        total_pages: total.total.pages_normal + total.total.pages_zero,
        rounds,
        final_phase: FinalPhase {
            pages: final_pages,
            wire_bytes: fstats.total.wire_bytes,
            stop_ms: ms(stopped),
            capture_ms: ms(capture),
            round_ms: ms(round_time),
            state_ms: ms(state_time),
            finish_ms: ms(finish_time),
            pause_to_finish_ms: ms(pause_to_finish),
            state_bytes: bytes.len(),
        },
        counter_at_pause: counter,
        checkpoints: run_stats.checkpoints,
        throttled_seconds: run_stats.throttled.as_secs_f64(),
        pause_mono_ns,
        postcopy: None,
    })
}

/// The source at the pause, for the post-copy ending.
struct PausedAt {
    t0: Instant,
    t_pause: Instant,
    stopped: Duration,
    capture: Duration,
    counter: u64,
    pause_mono_ns: u64,
    pause_real_ns: u64,
    vstate: VcpuState,
    /// Pages the destination lacks: dirtied since the last live round (all without one).
    bitmap: Vec<u64>,
    rounds: Vec<RoundRow>,
    checkpoints: u64,
    throttled: Duration,
}

/// Post-copy ending: send the vCPU state, switch (the destination resumes the guest at once),
/// and serve its page faults while the rest streams.
fn postcopy(o: &SourceOpts, mut sender: Sender, p: PausedAt) -> Result<SourceReport, String> {
    let layout = o.layout;
    let t = Instant::now();
    let snapshot = Snapshot {
        demo: DemoInfo {
            mem_size: layout.mem_size,
            ws_pages: layout.ws_pages,
            counter: p.counter,
            boot_id: boot_id(),
            pause_mono_ns: p.pause_mono_ns,
            pause_real_ns: p.pause_real_ns,
        },
        vcpu: p.vstate,
    };
    let bytes = state::encode(&snapshot);
    sender
        .send_state(&bytes)
        .map_err(session_err("sending the vCPU state"))?;
    let state_time = t.elapsed();
    let pages = count(&p.bitmap);
    let t = Instant::now();
    let pc = sender
        .switch_to_postcopy(vec![(0, BlockPages::Bitmap(p.bitmap))])
        .map_err(session_err("switching to post-copy"))?;
    let switch_time = t.elapsed();
    let st = pc.finish().map_err(session_err("post-copy"))?;
    let pause_to_finish = p.t_pause.elapsed();
    let live_pages: u64 = p.rounds.iter().map(|r| r.pages).sum();
    let live_wire: u64 = p.rounds.iter().map(|r| r.wire_bytes).sum();
    Ok(SourceReport {
        total_seconds: p.t0.elapsed().as_secs_f64(),
        total_wire_bytes: live_wire + st.wire_bytes,
        total_pages: live_pages + pages,
        rounds: p.rounds,
        final_phase: FinalPhase {
            pages,
            wire_bytes: st.wire_bytes,
            stop_ms: ms(p.stopped),
            capture_ms: ms(p.capture),
            round_ms: ms(switch_time),
            state_ms: ms(state_time),
            finish_ms: st.seconds * 1e3,
            pause_to_finish_ms: ms(pause_to_finish),
            state_bytes: bytes.len(),
        },
        counter_at_pause: p.counter,
        checkpoints: p.checkpoints,
        throttled_seconds: p.throttled.as_secs_f64(),
        pause_mono_ns: p.pause_mono_ns,
        postcopy: Some(PostcopyPhase {
            pages: st.pages,
            pages_background: st.pages_background,
            requests: st.requests,
            wire_bytes: st.wire_bytes,
            until_last_page_ms: st.seconds * 1e3,
        }),
    })
}
