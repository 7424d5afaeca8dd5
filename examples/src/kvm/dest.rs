//! The destination VMM: creates its VM and vCPU up front (off the downtime path), receives
//! the guest's memory straight into the VM's memory, restores the vCPU, resumes the guest and
//! checks that it carried on from where it was paused.

use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pagewire::{PostcopyStart, ReceiveInto, Receiver, ReceiverConfig};
use serde::{Deserialize, Serialize};

use super::guest::{self, Layout, PAGE};
use super::state;
use super::vm::{Running, StopAt, Vcpu, Vm};
use super::{boot_id, mono_ns, real_ns};

/// How the destination receives.
#[derive(Clone, Debug)]
pub struct DestOpts {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Guest memory size (must equal the source's: the memory exists before the session).
    pub mem_size: u64,
    /// pagewire session settings (secret, timeouts).
    pub cfg: ReceiverConfig,
    /// Give up if no source connects within this time.
    pub accept_timeout: Option<Duration>,
    /// How long the resumed guest may take to reach a checkpoint past its paused counter.
    pub check_timeout: Duration,
}

/// How the downtime was timed.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DowntimeClock {
    /// Both ends on one host: the source's pause and the destination's resume read the same
    /// CLOCK_MONOTONIC.
    Monotonic,
    /// Different hosts: CLOCK_REALTIME on both, as good as their clock synchronisation.
    Realtime,
}

/// What the destination did and found.
#[derive(Clone, Debug, Serialize)]
pub struct DestReport {
    /// Every check passed (the call returns an error otherwise; kept for the JSON).
    pub verified: bool,
    /// The guest's counter at the pause, as the source sent it; the received status page
    /// held the same value.
    pub counter_at_pause: u64,
    /// The counter at the first checkpoint after resuming, where the checks ran.
    pub counter_at_check: u64,
    /// Working-set pages compared word for word at that checkpoint.
    pub pages_checked: u64,
    /// The guest's checksum there (equal to the sum of its working set).
    pub checksum: String,
    /// Session end (serve returned) → vCPU restored and KVM_RUN entered, ms.
    pub restore_ms: f64,
    /// Resume → checkpoint reached, ms.
    pub resume_to_check_ms: f64,
    /// Source pause → destination resume, ms.
    pub downtime_ms: f64,
    /// Source pause → the receiver's `serve` returned here, ms (same clock as the downtime).
    pub pause_to_session_end_ms: f64,
    /// Which clock timed `downtime_ms`.
    pub downtime_clock: DowntimeClock,
    /// Bytes of guest memory received (every round) and on the wire.
    pub received_memory_bytes: u64,
    /// Bytes on the wire.
    pub received_wire_bytes: u64,
    /// Rounds received (live rounds plus the final one; in post-copy the live rounds).
    pub rounds: u64,
    /// Post-copy figures, when the source switched to post-copy.
    pub postcopy: Option<DestPostcopy>,
}

/// Post-copy, as the destination saw it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DestPostcopy {
    /// Pages that arrived after the guest resumed.
    pub pages: u64,
    /// Of which placed from the urgent connection (requested by a fault) and from the
    /// background stream.
    pub pages_urgent: u64,
    pub pages_background: u64,
    /// Page faults read, and page requests sent.
    pub faults: u64,
    pub requests: u64,
    /// Fault read → page placed, µs.
    pub fault_p50_us: f64,
    pub fault_p99_us: f64,
    pub fault_max_us: f64,
    /// Faults per power-of-two µs bucket: entry i counts [2^i, 2^(i+1)) µs.
    pub fault_histogram: Vec<u64>,
    /// Guest resumed → last page placed, ms.
    pub resume_to_last_page_ms: f64,
}

/// A guest resumed from a received vCPU state.
struct Resumed {
    running: Running,
    counter: u64,
    layout: Layout,
    /// When the state was in hand (session end, or post-copy start).
    t_state: Instant,
    pause_mono_ns: u64,
    pause_real_ns: u64,
    same_host: bool,
}

/// Check the received state against this VM, restore the vCPU and start it.
fn resume(vm: &Vm, vcpu: Vcpu, states: &[Vec<u8>], mem_size: u64) -> Result<Resumed, String> {
    let t_state = Instant::now();
    let [bytes] = states else {
        return Err(format!(
            "expected one vCPU state from the source, got {}",
            states.len()
        ));
    };
    let snap = state::decode(bytes)?;
    let layout = Layout::new(snap.demo.mem_size, snap.demo.ws_pages)?;
    if layout.mem_size != mem_size {
        return Err(format!(
            "the source's guest has {} bytes of memory, this VM {mem_size}",
            layout.mem_size
        ));
    }
    // SAFETY: no receiver writes the status page now (every channel has ended before the
    // commit step; in post-copy the page is placed once, atomically, before this read
    // returns) and no vCPU runs yet.
    let (counter, _) = unsafe { guest::status(vm.memory())? };
    if counter != snap.demo.counter {
        return Err(format!(
            "received status page says counter {counter}, the source paused at {}",
            snap.demo.counter
        ));
    }
    snap.vcpu.restore(vcpu.fd())?;
    let running = Running::spawn(vcpu, StopAt::CheckpointAbove(snap.demo.counter))?;
    Ok(Resumed {
        running,
        counter,
        layout,
        t_state,
        pause_mono_ns: snap.demo.pause_mono_ns,
        pause_real_ns: snap.demo.pause_real_ns,
        same_host: snap.demo.boot_id == boot_id(),
    })
}

/// Receive the guest and resume it. `on_listening` is told the bound address first. In
/// post-copy (the source decides) the guest resumes as soon as the switch is made, and its
/// memory keeps arriving while it runs.
pub fn run(o: &DestOpts, on_listening: impl FnOnce(SocketAddr)) -> Result<DestReport, String> {
    let mem_size = o.mem_size;
    // The VM exists before the session: its memory is what pagewire receives into, and its
    // creation stays off the downtime path. The working set is not known yet (it comes with
    // the state); the layout check here is on the memory size alone.
    let vm = Vm::new(Layout::new(mem_size, 1)?, false)?;
    let mut vcpu = Some(vm.create_vcpu()?);
    let mut receiver = Receiver::bind(o.listen, o.cfg.clone())
        .map_err(|e| format!("listening on {}: {e}", o.listen))?;
    receiver.set_accept_timeout(o.accept_timeout);
    // What the main thread waits for: post-copy starting, or every page and the state in
    // (the receiver's commit step, before it confirms the end to the source: the guest resumes
    // then, as QEMU's destination does once it has loaded the device state, not after the
    // session's teardown), or the session over without either (it failed).
    enum Event {
        Postcopy(PostcopyStart),
        Commit(Vec<Vec<u8>>, mpsc::SyncSender<Result<(), String>>),
        Served,
    }
    let (events, next_event) = mpsc::channel::<Event>();
    let started = events.clone();
    receiver.on_postcopy(move |start| {
        let _ = started.send(Event::Postcopy(start));
    });
    let addr = receiver
        .local_addr()
        .map_err(|e| format!("listening on {}: {e}", o.listen))?;
    on_listening(addr);
    let mem = vm.memory().clone();
    let committing = events.clone();
    let (served, early) = std::thread::scope(|s| {
        let serving = s.spawn(move || {
            let r = receiver.serve_and_commit(ReceiveInto::Memory(mem), move |_, states| {
                let (reply, verdict) = mpsc::sync_channel(1);
                // After post-copy the guest already runs: nobody listens, nothing to do.
                if committing
                    .send(Event::Commit(states.to_vec(), reply))
                    .is_err()
                {
                    return Ok(());
                }
                // The source learns whether the guest resumed here: it must not count on a
                // destination that could not restore the state.
                match verdict.recv() {
                    Ok(Err(e)) => Err(e.into()),
                    _ => Ok(()),
                }
            });
            let _ = events.send(Event::Served);
            r
        });
        // Post-copy: resume the guest the moment the memory is registered; pre-copy: the
        // moment every page and the state are in.
        let early = match next_event.recv() {
            Ok(Event::Postcopy(start)) => {
                vcpu.take().map(|v| resume(&vm, v, &start.state, mem_size))
            }
            Ok(Event::Commit(states, reply)) => {
                let r = match vcpu.take() {
                    Some(v) => resume(&vm, v, &states, mem_size),
                    None => Err("no vCPU to resume".into()),
                };
                let _ = reply.send(r.as_ref().map(|_| ()).map_err(Clone::clone));
                Some(r)
            }
            Ok(Event::Served) | Err(_) => None,
        };
        drop(next_event);
        (serving.join(), early)
    });
    let received = served
        .map_err(|_| "the receiving thread panicked".to_string())?
        .map_err(|e| format!("receiving: {e}"))?;
    let t_end = Instant::now();
    let end_mono = mono_ns();
    let end_real = real_ns();
    let r = match (early, vcpu.take()) {
        (Some(r), _) => r?,
        (None, Some(v)) => resume(&vm, v, &received.state, mem_size)?,
        (None, None) => return Err("no vCPU to resume".into()),
    };
    let (vcpu, run) = r.running.wait(o.check_timeout)?;
    let entered = run.entered.unwrap_or(t_end);
    let restore_ms = entered.saturating_duration_since(r.t_state).as_secs_f64() * 1e3;
    let resume_to_check_ms = entered.elapsed().as_secs_f64() * 1e3;
    let (downtime_ms, downtime_clock, end_ms) = if r.same_host {
        (
            run.entered_mono_ns.saturating_sub(r.pause_mono_ns) as f64 / 1e6,
            DowntimeClock::Monotonic,
            end_mono.saturating_sub(r.pause_mono_ns) as f64 / 1e6,
        )
    } else {
        let now_real = real_ns();
        let now_mono = mono_ns();
        let entered_real = now_real.saturating_sub(now_mono.saturating_sub(run.entered_mono_ns));
        (
            entered_real.saturating_sub(r.pause_real_ns) as f64 / 1e6,
            DowntimeClock::Realtime,
            end_real.saturating_sub(r.pause_real_ns) as f64 / 1e6,
        )
    };
    let regs = vcpu
        .fd()
        .get_regs()
        .map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    // SAFETY: the vCPU is stopped at its checkpoint (its thread returned it) and the session
    // is over (in post-copy: every page placed).
    let (counter_at_check, checked) =
        unsafe { guest::check_at_checkpoint(vm.memory(), &r.layout, &regs)? };
    let us = |d: Option<Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1e6);
    let postcopy = received.postcopy.as_ref().map(|pc| DestPostcopy {
        pages: pc.pages,
        pages_urgent: pc.pages_urgent,
        pages_background: pc.pages_background,
        faults: pc.faults,
        requests: pc.requests,
        fault_p50_us: us(pc.latency.percentile(50.0)),
        fault_p99_us: us(pc.latency.percentile(99.0)),
        fault_max_us: us(pc.latency.max()),
        fault_histogram: pc.latency.histogram(),
        resume_to_last_page_ms: t_end.saturating_duration_since(entered).as_secs_f64() * 1e3,
    });
    Ok(DestReport {
        verified: true,
        counter_at_pause: r.counter,
        counter_at_check,
        pages_checked: checked.pages,
        checksum: format!("{:#018x}", checked.sum),
        restore_ms,
        resume_to_check_ms,
        downtime_ms,
        pause_to_session_end_ms: end_ms,
        downtime_clock,
        received_memory_bytes: received.stats.total.memory_bytes
            + received.postcopy.as_ref().map_or(0, |pc| pc.pages * PAGE),
        received_wire_bytes: received.stats.total.wire_bytes
            + received.postcopy.as_ref().map_or(0, |pc| pc.wire_bytes),
        rounds: received.stats.rounds,
        postcopy,
    })
}
