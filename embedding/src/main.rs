//! A VMM migrating a running guest with pagewire's driver: vm-memory guest RAM in two regions,
//! a guest thread writing while rounds run, the destination in a thread of the same process
//! (a real one is another host). Built with `default-features = false, features =
//! ["vm-memory"]`.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use pagewire::threads::ThreadHook;
use pagewire::{
    rust_vmm, DirtyLog, Driver, Outcome, Policy, ReceiveInto, Receiver, ReceiverConfig, Sender,
    SenderConfig, Vmm, VmmError,
};
use vm_memory::{bitmap::AtomicBitmap, Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<AtomicBitmap>;

/// The VMM side the driver needs: dirty pages, pause, device state.
struct MyVmm {
    mem: Arc<Mem>,
    running: Arc<AtomicBool>,
    vcpu: Option<JoinHandle<()>>,
}

impl Vmm for MyVmm {
    fn collect_dirty(&mut self, log: &mut DirtyLog) -> Result<(), VmmError> {
        // vm-memory's bitmaps (the guest's writes here; a KVM VMM adds KVM_GET_DIRTY_LOG's
        // per-slot bitmaps with log.add_bitmap).
        rust_vmm::collect_dirty(&self.mem, log)?;
        Ok(())
    }

    fn pause(&mut self) -> Result<(), VmmError> {
        self.running.store(false, Ordering::SeqCst);
        if let Some(v) = self.vcpu.take() {
            v.join().map_err(|_| "the vCPU thread panicked")?;
        }
        Ok(())
    }

    fn save_state(&mut self) -> Result<Vec<u8>, VmmError> {
        Ok(b"vcpu registers and device models".to_vec())
    }
}

/// The "guest": rewrites 256 pages of the first region, round after round.
fn run_guest(mem: Arc<Mem>, running: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut pass = 0u64;
        while running.load(Ordering::SeqCst) {
            for page in 0..256u64 {
                let _ = mem.write_obj(pass ^ page, GuestAddress(page * 4096));
            }
            pass += 1;
            std::thread::sleep(Duration::from_micros(200));
        }
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 64 MiB at 0, 16 MiB at 4 GiB, on both hosts.
    let ranges = [(GuestAddress(0), 64 << 20), (GuestAddress(1 << 32), 16 << 20)];

    // Every thread pagewire starts runs this first: where the VMM installs its seccomp filter
    // (pagewire::sandbox lists each thread's system calls).
    let hook = ThreadHook::new(|t| {
        eprintln!("pagewire thread {} ({:?})", t.name, t.role);
        Ok(())
    });

    // Destination: receives straight into its own guest memory.
    let dst_vm = Mem::from_ranges(&ranges)?;
    let dst = Arc::new(rust_vmm::guest_ram(&dst_vm)?);
    let receiver = Receiver::bind(
        "127.0.0.1:0".parse()?,
        ReceiverConfig::default().threads(hook.clone()),
    )?;
    let addr = receiver.local_addr()?;
    let destination = std::thread::spawn(move || receiver.serve(ReceiveInto::Memory(dst)));

    // Source: a running guest.
    let src_vm = Arc::new(Mem::from_ranges(&ranges)?);
    src_vm.write_slice(b"kernel", GuestAddress(0x10_0000))?;
    let running = Arc::new(AtomicBool::new(true));
    let mut vmm = MyVmm {
        mem: src_vm.clone(),
        running: running.clone(),
        vcpu: Some(run_guest(src_vm.clone(), running)),
    };
    let src = Arc::new(rust_vmm::guest_ram(&src_vm)?);
    let cfg = SenderConfig::default().channels(2).threads(hook);
    let sender = Sender::connect(addr, cfg.clone(), src)?;

    // Rounds until the predicted downtime fits 50 ms, then pause, last round, state, end. A
    // guest that cannot converge is given up: the destination is told (Abandoned there).
    let driver = Driver::new(Policy::new(Duration::from_millis(50)), &cfg);
    match driver.migrate(sender, &mut vmm)? {
        Outcome::Completed { report, .. } => println!(
            "{} rounds, downtime {:?} (predicted {:?})",
            report.rounds.len() + 1,
            report.downtime.unwrap_or_default(),
            report.predicted_downtime.unwrap_or_default()
        ),
        Outcome::PostCopy { .. } => unreachable!("post-copy is off in Policy::new"),
    }
    let received = destination.join().map_err(|_| "receiver thread")??;
    assert_eq!(received.state, vec![b"vcpu registers and device models".to_vec()]);

    // The destination's memory is the source's, byte for byte.
    for (base, len) in ranges {
        let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
        src_vm.read_slice(&mut a, base)?;
        dst_vm.read_slice(&mut b, base)?;
        assert!(a == b, "region at {base:?} differs");
    }
    println!("verified");
    Ok(())
}
