//! The destination VMM: creates its VM and vCPU up front (off the downtime path), receives
//! the guest's memory straight into the VM's memory, restores the vCPU, resumes the guest and
//! checks that it carried on from where it was paused.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pagewire::{Config, ReceiveInto, Receiver};
use serde::Serialize;

use super::guest::{self, Layout};
use super::state;
use super::vm::{Running, StopAt, Vm};
use super::{boot_id, mono_ns, real_ns};

/// How the destination receives.
#[derive(Clone, Debug)]
pub struct DestOpts {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Guest memory size (must equal the source's: the memory exists before the session).
    pub mem_size: u64,
    /// pagewire session settings (secret, timeouts).
    pub cfg: Config,
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
    /// Rounds received (live rounds plus the final one).
    pub rounds: u64,
}

/// Receive the guest and resume it. `on_listening` is told the bound address first.
pub fn run(o: &DestOpts, on_listening: impl FnOnce(SocketAddr)) -> Result<DestReport, String> {
    let mem_size = o.mem_size;
    // The VM exists before the session: its memory is what pagewire receives into, and its
    // creation stays off the downtime path. The working set is not known yet (it comes with
    // the state); the layout check here is on the memory size alone.
    let vm = Vm::new(Layout::new(mem_size, 1)?, false)?;
    let vcpu = vm.create_vcpu()?;
    let mut receiver = Receiver::bind(o.listen, o.cfg.clone())
        .map_err(|e| format!("listening on {}: {e}", o.listen))?;
    receiver.set_accept_timeout(o.accept_timeout);
    let addr = receiver
        .local_addr()
        .map_err(|e| format!("listening on {}: {e}", o.listen))?;
    on_listening(addr);
    let received = receiver
        .serve(ReceiveInto::Memory(vm.memory().clone()))
        .map_err(|e| format!("receiving: {e}"))?;
    let t_end = Instant::now();
    let end_mono = mono_ns();
    let end_real = real_ns();
    let [bytes] = received.state.as_slice() else {
        return Err(format!(
            "expected one vCPU state from the source, got {}",
            received.state.len()
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
    // SAFETY: the session is over (no receiver writes) and no vCPU runs yet.
    let (counter, _) = unsafe { guest::status(vm.memory())? };
    if counter != snap.demo.counter {
        return Err(format!(
            "received status page says counter {counter}, the source paused at {}",
            snap.demo.counter
        ));
    }
    snap.vcpu.restore(vcpu.fd())?;
    let running = Running::spawn(vcpu, StopAt::CheckpointAbove(snap.demo.counter))?;
    let (vcpu, run) = running.wait(o.check_timeout)?;
    let entered = run.entered.unwrap_or(t_end);
    let restore_ms = entered.saturating_duration_since(t_end).as_secs_f64() * 1e3;
    let resume_to_check_ms = entered.elapsed().as_secs_f64() * 1e3;
    let (downtime_ms, downtime_clock, end_ms) = if snap.demo.boot_id == boot_id() {
        (
            run.entered_mono_ns.saturating_sub(snap.demo.pause_mono_ns) as f64 / 1e6,
            DowntimeClock::Monotonic,
            end_mono.saturating_sub(snap.demo.pause_mono_ns) as f64 / 1e6,
        )
    } else {
        let now_real = real_ns();
        let now_mono = mono_ns();
        let entered_real = now_real.saturating_sub(now_mono.saturating_sub(run.entered_mono_ns));
        (
            entered_real.saturating_sub(snap.demo.pause_real_ns) as f64 / 1e6,
            DowntimeClock::Realtime,
            end_real.saturating_sub(snap.demo.pause_real_ns) as f64 / 1e6,
        )
    };
    let regs = vcpu
        .fd()
        .get_regs()
        .map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    // SAFETY: the vCPU is stopped at its checkpoint (its thread returned it) and the session
    // is over.
    let (counter_at_check, checked) =
        unsafe { guest::check_at_checkpoint(vm.memory(), &layout, &regs)? };
    Ok(DestReport {
        verified: true,
        counter_at_pause: snap.demo.counter,
        counter_at_check,
        pages_checked: checked.pages,
        checksum: format!("{:#018x}", checked.sum),
        restore_ms,
        resume_to_check_ms,
        downtime_ms,
        pause_to_session_end_ms: end_ms,
        downtime_clock,
        received_memory_bytes: received.stats.total.memory_bytes,
        received_wire_bytes: received.stats.total.wire_bytes,
        rounds: received.stats.rounds,
    })
}
