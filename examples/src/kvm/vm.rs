//! The VM: guest memory in one KVM memory slot, one vCPU, and a thread that runs the vCPU
//! until the VMM pauses it.
//!
//! Pausing: the VMM sets a stop flag and sends the vCPU thread a real-time signal (a no-op
//! handler installed without SA_RESTART), which makes a KVM_RUN in progress return EINTR. A
//! signal that lands between the thread's check of the flag and its next KVM_RUN would be
//! lost, so the VMM repeats it every [`KICK_INTERVAL`] until the thread has stopped, and
//! blocks (never spins) in between: on a 2-core host a spinning VMM thread kept the vCPU
//! thread off the CPU for a scheduler tick (4.4 ms pauses instead of 0.07 ms). Once stopped,
//! the thread enters KVM_RUN once more with `immediate_exit` set, which completes any
//! half-finished exit (the checkpoint's MMIO store) without running guest code, so the
//! registers read afterwards are those of an instruction boundary.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use pagewire::{rust_vmm, GuestRam};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::guest::{self, Layout, CHECKPOINT_MMIO};
use super::mono_ns;

/// How often a pause request re-sends its signal until the vCPU thread has stopped.
pub const KICK_INTERVAL: Duration = Duration::from_micros(200);
/// Where KVM puts the 3-page TSS region it needs on Intel hosts (above guest memory, as
/// Firecracker does).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

fn kvm_err(what: &str) -> impl Fn(kvm_ioctls::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// A VM with its guest memory registered as memory slot 0 at guest physical address 0.
#[derive(Debug)]
pub struct Vm {
    // Field order matters: the VM fd closes before the memory it maps is unmapped.
    vm: VmFd,
    kvm: Kvm,
    mem: Arc<GuestRam>,
    layout: Layout,
    dirty_log: bool,
}

impl Vm {
    /// Open /dev/kvm, create the VM and its memory (zeroed), and register the memory with KVM,
    /// with dirty logging if `dirty_log`.
    pub fn new(layout: Layout, dirty_log: bool) -> Result<Vm, String> {
        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        for (cap, name) in [
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
            (Cap::VcpuEvents, "KVM_CAP_VCPU_EVENTS"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(format!("KVM lacks {name}"));
            }
        }
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        if kvm.check_extension(Cap::SetTssAddr) {
            vm.set_tss_address(KVM_TSS_ADDRESS)
                .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        }
        // Guest RAM as a rust-vmm VMM holds it: a vm-memory GuestMemoryMmap (one region at
        // guest address 0), handed to pagewire as it is (the block points at the region's
        // mapping and keeps it alive). The block keeps QEMU's name for main RAM.
        let guest = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), layout.size()?)])
            .map_err(|e| format!("guest memory: {e}"))?;
        let mem = Arc::new(
            rust_vmm::guest_ram_named(&guest, |_, _| "pc.ram".into()).map_err(|e| e.to_string())?,
        );
        let host = mem.block(0).ok_or("no memory block")?.as_ptr();
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: if dirty_log {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: 0,
            memory_size: layout.mem_size,
            userspace_addr: host as u64,
        };
        // SAFETY: `host..host + mem_size` is the region's anonymous mapping, kept mapped by
        // `mem` (its block holds the region's MmapRegion). The Vm and every Vcpu hold an Arc
        // of `mem` and declare it after their fds, so it is unmapped only after every fd
        // through which KVM could reach it has been closed.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        Ok(Vm {
            vm,
            kvm,
            mem,
            layout,
            dirty_log,
        })
    }

    /// The guest memory (what pagewire sends or receives into).
    pub fn memory(&self) -> &Arc<GuestRam> {
        &self.mem
    }

    /// The KVM system fd.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Write the boot image. Only before any vCPU runs and while no receiver writes.
    pub fn write_boot_image(&self) -> Result<(), String> {
        let block = self.mem.block(0).ok_or("no memory block")?;
        // SAFETY: called before the vCPU exists and with no session using the memory, so
        // nothing else reads or writes it while this slice lives.
        let bytes = unsafe { block.as_mut_slice() };
        guest::write_boot_image(bytes, &self.layout)
    }

    /// KVM_GET_DIRTY_LOG of the slot: the pages written since the last call (which it
    /// clears), one bit per page, as pagewire's `DirtyLog::add_bitmap` takes them.
    pub fn dirty_log(&self) -> Result<Vec<u64>, String> {
        if !self.dirty_log {
            return Err("dirty logging is off for this VM".into());
        }
        self.vm
            .get_dirty_log(0, self.mem.total_len() as usize)
            .map_err(kvm_err("KVM_GET_DIRTY_LOG"))
    }

    /// Create vCPU 0 with the host's supported CPUID (which includes long mode).
    pub fn create_vcpu(&self) -> Result<Vcpu, String> {
        let fd = self.vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        Ok(Vcpu {
            fd,
            mem: self.mem.clone(),
        })
    }
}

/// One vCPU and (kept alive with it) the memory its VM maps.
#[derive(Debug)]
pub struct Vcpu {
    // Field order: the fd closes before the memory is unmapped (see Vm).
    fd: VcpuFd,
    mem: Arc<GuestRam>,
}

impl Vcpu {
    /// The vCPU fd (for reading and writing its state while it is not running).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Put the vCPU at the guest program's entry, in ring 3 of long mode.
    pub fn boot(&self, layout: &Layout) -> Result<(), String> {
        let sregs = self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        self.fd
            .set_sregs(&guest::boot_sregs(sregs))
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        self.fd
            .set_regs(&guest::boot_regs(layout))
            .map_err(kvm_err("KVM_SET_REGS"))
    }
}

/// When a running vCPU thread stops by itself.
#[derive(Clone, Copy, Debug)]
pub enum StopAt {
    /// Only when paused.
    Pause,
    /// At the first checkpoint exit whose status counter is above this value (or when paused).
    CheckpointAbove(u64),
}

/// What a vCPU thread did.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunStats {
    /// CLOCK_MONOTONIC (ns) just before its first KVM_RUN.
    pub entered_mono_ns: u64,
    /// When its first KVM_RUN was about to start.
    pub entered: Option<Instant>,
    /// Checkpoint exits (one per pass over the working set).
    pub checkpoints: u64,
    /// KVM_RUN calls that returned EINTR (pause and throttle signals).
    pub interrupted: u64,
    /// Time the vCPU slept for throttling.
    pub throttled: Duration,
    /// Stopped at a checkpoint (as `StopAt::CheckpointAbove` asked) rather than paused.
    pub at_checkpoint: bool,
}

/// A vCPU running on its own thread.
#[derive(Debug)]
pub struct Running {
    /// Taken by `join` (Running has a Drop impl, so fields are moved out through Options).
    handle: Option<JoinHandle<Result<(Vcpu, RunStats), String>>>,
    stop: Arc<AtomicBool>,
    /// Disconnected when the thread ends (its sender is dropped with the thread).
    ended: mpsc::Receiver<()>,
    /// Percent of each [`THROTTLE_PERIOD`] the vCPU sleeps (0: never).
    throttle: Arc<AtomicU32>,
    /// Checkpoint exits so far (passes over the working set), readable while it runs.
    passes: Arc<AtomicU64>,
}

/// The throttling period: with throttle p %, the vCPU runs (100 - p) % of each period, then
/// a timer of its own thread (CLOCK_MONOTONIC, signal to that thread) interrupts KVM_RUN and
/// it sleeps the rest (QEMU's auto-converge works the same way, on a 10 ms time slice).
pub const THROTTLE_PERIOD: Duration = Duration::from_millis(10);

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that interrupts KVM_RUN, with its no-op handler installed (once per process).
fn kick_signal() -> Result<libc::c_int, String> {
    static SIGNAL: OnceLock<Result<libc::c_int, String>> = OnceLock::new();
    SIGNAL
        .get_or_init(|| {
            let sig = SIGRTMIN();
            register_signal_handler(sig, kick_handler)
                .map(|()| sig)
                .map_err(|e| format!("installing the vCPU kick signal handler: {e}"))
        })
        .clone()
}

impl Running {
    /// Run `vcpu` on a new thread until paused (or as `stop_at` says).
    pub fn spawn(vcpu: Vcpu, stop_at: StopAt) -> Result<Running, String> {
        kick_signal()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (ending, ended) = mpsc::channel::<()>();
        let throttle = Arc::new(AtomicU32::new(0));
        let pct = throttle.clone();
        let passes = Arc::new(AtomicU64::new(0));
        let counted = passes.clone();
        let handle = std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || {
                let _ending = ending;
                run_loop(vcpu, stop_at, &flag, &pct, &counted)
            })
            .map_err(|e| format!("spawning the vCPU thread: {e}"))?;
        Ok(Running {
            handle: Some(handle),
            stop,
            ended,
            throttle,
            passes,
        })
    }

    /// Passes over the working set (checkpoint exits) the guest has completed so far.
    pub fn passes(&self) -> u64 {
        self.passes.load(Ordering::SeqCst)
    }

    /// Throttle the guest: from now on it sleeps `pct` % (at most 99) of every
    /// [`THROTTLE_PERIOD`]; 0 lets it run freely.
    pub fn set_throttle(&mut self, pct: u32) {
        self.throttle.store(pct.min(99), Ordering::SeqCst);
    }

    /// Stop the vCPU (see the module docs) and take it back: re-send the signal every
    /// [`KICK_INTERVAL`] until the thread has stopped, or fail after `timeout`.
    pub fn pause(self, timeout: Duration) -> Result<(Vcpu, RunStats), String> {
        let sig = kick_signal()?;
        self.stop.store(true, Ordering::SeqCst);
        self.throttle.store(0, Ordering::SeqCst);
        let handle = self.handle.as_ref().ok_or("the vCPU thread is gone")?;
        // A throttled vCPU thread may be asleep: wake it.
        handle.thread().unpark();
        let t0 = Instant::now();
        // Block (not spin) between signals: on a small host a spinning VMM thread can keep
        // the vCPU thread off the CPU it needs to stop.
        while !self.ended() {
            if t0.elapsed() > timeout {
                return Err(format!(
                    "the vCPU thread did not stop within {timeout:?} of being paused"
                ));
            }
            handle
                .kill(sig)
                .map_err(|e| format!("signalling the vCPU thread: {e}"))?;
            if let Err(mpsc::RecvTimeoutError::Disconnected) =
                self.ended.recv_timeout(KICK_INTERVAL)
            {
                break;
            }
        }
        self.join()
    }

    /// Wait up to `timeout` for the thread to stop by itself (`StopAt::CheckpointAbove`),
    /// then pause it; an error if it had to be paused.
    pub fn wait(self, timeout: Duration) -> Result<(Vcpu, RunStats), String> {
        if let Err(mpsc::RecvTimeoutError::Disconnected) = self.ended.recv_timeout(timeout) {
            return self.join();
        }
        let (_, stats) = self.pause(Duration::from_secs(5))?;
        Err(format!(
            "the guest reached no checkpoint within {timeout:?} ({} checkpoints seen)",
            stats.checkpoints
        ))
    }

    /// Whether the thread has ended (or is about to: its channel end is dropped last).
    fn ended(&self) -> bool {
        matches!(self.ended.try_recv(), Err(mpsc::TryRecvError::Disconnected))
    }

    fn join(mut self) -> Result<(Vcpu, RunStats), String> {
        self.handle
            .take()
            .ok_or("the vCPU thread is gone")?
            .join()
            .map_err(|_| "the vCPU thread panicked".to_string())?
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Not paused (an error path): let the thread finish on its own.
        self.stop.store(true, Ordering::SeqCst);
        if let (Some(h), Ok(sig)) = (&self.handle, kick_signal()) {
            h.thread().unpark();
            let _ = h.kill(sig);
        }
    }
}

fn run_loop(
    mut vcpu: Vcpu,
    stop_at: StopAt,
    stop: &AtomicBool,
    throttle: &AtomicU32,
    passes: &AtomicU64,
) -> Result<(Vcpu, RunStats), String> {
    let mut stats = RunStats {
        entered_mono_ns: mono_ns(),
        entered: Some(Instant::now()),
        ..RunStats::default()
    };
    let mut timer: Option<KickTimer> = None;
    while !stop.load(Ordering::SeqCst) {
        let pct = throttle.load(Ordering::SeqCst);
        if pct > 0 {
            if timer.is_none() {
                timer = Some(KickTimer::new()?);
            }
            if let Some(t) = &timer {
                t.arm(THROTTLE_PERIOD * (100 - pct) / 100)?;
            }
        }
        let checkpoint = match vcpu.fd.run() {
            Ok(VcpuExit::MmioWrite(CHECKPOINT_MMIO, _)) => true,
            Err(e) if e.errno() == libc::EINTR => {
                stats.interrupted += 1;
                if pct > 0 {
                    // Sleep pct % of the period, waking early if paused (pause unparks).
                    let t = Instant::now();
                    let until = t + THROTTLE_PERIOD * pct / 100;
                    while !stop.load(Ordering::SeqCst) {
                        let now = Instant::now();
                        if now >= until {
                            break;
                        }
                        std::thread::park_timeout(until - now);
                    }
                    stats.throttled += t.elapsed();
                }
                false
            }
            Ok(exit) => {
                let what = format!("{exit:?}");
                return Err(unexpected_exit(&vcpu, &what));
            }
            Err(e) => return Err(format!("KVM_RUN: {e}")),
        };
        if checkpoint {
            stats.checkpoints += 1;
            passes.store(stats.checkpoints, Ordering::SeqCst);
            if let StopAt::CheckpointAbove(min) = stop_at {
                // SAFETY: this thread's KVM_RUN has returned, so the guest (one vCPU) is
                // stopped; nothing else writes guest memory while the vCPU runs.
                let (counter, _) = unsafe { guest::status(&vcpu.mem)? };
                if counter > min {
                    stats.at_checkpoint = true;
                    break;
                }
            }
        }
    }
    // Complete any half-done exit (e.g. the checkpoint's MMIO store) without running guest
    // code, so the state read next is that of an instruction boundary.
    vcpu.fd.set_kvm_immediate_exit(1);
    let done = match vcpu.fd.run() {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Ok(exit) => Err(format!("KVM_RUN with immediate_exit returned {exit:?}")),
        Err(e) => Err(format!("KVM_RUN with immediate_exit: {e}")),
    };
    vcpu.fd.set_kvm_immediate_exit(0);
    done?;
    Ok((vcpu, stats))
}

/// A one-shot CLOCK_MONOTONIC timer that sends the kick signal to the thread that created
/// it: the throttled vCPU thread's own alarm, so its run slice ends on time whatever else
/// the host is scheduling.
struct KickTimer(libc::timer_t);

impl KickTimer {
    fn new() -> Result<KickTimer, String> {
        let sig = kick_signal()?;
        // SAFETY: sigevent is plain data, for which all-zero bytes are a valid value.
        let mut ev: libc::sigevent = unsafe { std::mem::zeroed() };
        ev.sigev_notify = libc::SIGEV_THREAD_ID;
        ev.sigev_signo = sig;
        // SAFETY: gettid has no preconditions.
        ev.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut id: libc::timer_t = std::ptr::null_mut();
        // SAFETY: `ev` and `id` are valid for the call; the kernel writes only `id`.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut ev, &mut id) } != 0 {
            return Err(format!(
                "timer_create for vCPU throttling: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(KickTimer(id))
    }

    /// Fire once, `after` from now.
    fn arm(&self, after: Duration) -> Result<(), String> {
        let after = after.max(Duration::from_micros(10));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: self.0 is a live timer (created in new, deleted only in drop); `spec` is
        // valid for the call and the old value is not asked for.
        if unsafe { libc::timer_settime(self.0, 0, &spec, std::ptr::null_mut()) } != 0 {
            return Err(format!(
                "timer_settime for vCPU throttling: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }
}

impl Drop for KickTimer {
    fn drop(&mut self) {
        // SAFETY: self.0 is a live timer, deleted exactly once here.
        unsafe { libc::timer_delete(self.0) };
    }
}

fn unexpected_exit(vcpu: &Vcpu, what: &str) -> String {
    let at = vcpu
        .fd
        .get_regs()
        .map(|r| format!("rip {:#x} r8 {} r13 {}", r.rip, r.r8, r.r13))
        .unwrap_or_else(|e| format!("registers unreadable: {e}"));
    format!("the guest stopped unexpectedly: {what} ({at})")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pausing stops the guest at an instruction boundary and running it again continues it:
    /// after each pause the guest goes on to a checkpoint where every check passes. Prints
    /// the pause latencies.
    #[test]
    fn pause_and_continue() {
        let layout = Layout::new(32 << 20, 256).expect("layout");
        let vm = match Vm::new(layout, true) {
            Ok(vm) => vm,
            Err(e) => {
                eprintln!("SKIP pause_and_continue: {e}");
                return;
            }
        };
        vm.write_boot_image().expect("boot image");
        let vcpu = vm.create_vcpu().expect("vcpu");
        vcpu.boot(&layout).expect("boot");
        let mut vcpu = Some(vcpu);
        let mut latencies = Vec::new();
        let mut last = 0;
        for _ in 0..20 {
            let r = Running::spawn(vcpu.take().expect("vcpu"), StopAt::Pause).expect("spawn");
            std::thread::sleep(Duration::from_millis(3));
            let t = Instant::now();
            let (v, _) = r.pause(Duration::from_secs(5)).expect("pause");
            latencies.push(t.elapsed());
            // SAFETY: the vCPU is stopped.
            let (counter, _) = unsafe { guest::status(vm.memory()) }.expect("status");
            assert!(
                counter >= last,
                "counter went back from {last} to {counter}"
            );
            let r = Running::spawn(v, StopAt::CheckpointAbove(counter)).expect("spawn");
            let (v, stats) = r.wait(Duration::from_secs(10)).expect("checkpoint");
            assert!(stats.at_checkpoint);
            let regs = v.fd().get_regs().expect("regs");
            // SAFETY: the vCPU is stopped.
            let (c, _) = unsafe { guest::check_at_checkpoint(vm.memory(), &layout, &regs) }
                .expect("checks at the checkpoint");
            assert!(c > counter);
            last = c;
            vcpu = Some(v);
        }
        latencies.sort();
        eprintln!(
            "pause latency: min {:?} median {:?} max {:?}",
            latencies[0],
            latencies[latencies.len() / 2],
            latencies[latencies.len() - 1]
        );
    }
}
