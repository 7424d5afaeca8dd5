//! The migration driver end to end over real loopback sockets: a VMM with vm-memory guest RAM
//! (two regions, a hole between them) and a "guest" thread that keeps writing until the driver
//! pauses it. The driver converges, pauses, sends the rest and the device state, and the
//! destination ends byte-identical to the paused source.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use pagewire::driver::{Outcome, VmmError};
use pagewire::{
    rust_vmm, DirtyLog, Driver, Policy, ReceiveInto, Receiver, ReceiverConfig, Sender,
    SenderConfig, Vmm,
};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<AtomicBitmap>;

const RANGES: [(GuestAddress, usize); 2] =
    [(GuestAddress(0), 8 << 20), (GuestAddress(1 << 32), 4 << 20)];

struct TestVmm {
    mem: Arc<Mem>,
    stop: Arc<AtomicBool>,
    throttle: Arc<AtomicU8>,
    guest: Option<JoinHandle<u64>>,
    writes: u64,
    throttles: Vec<u8>,
}

impl TestVmm {
    /// Start a guest that rewrites a 2 MiB working set in both regions through vm-memory.
    fn start(mem: Arc<Mem>) -> TestVmm {
        let stop = Arc::new(AtomicBool::new(false));
        let throttle = Arc::new(AtomicU8::new(0));
        let guest = {
            let (mem, stop, throttle) = (mem.clone(), stop.clone(), throttle.clone());
            std::thread::spawn(move || {
                let mut x = 7u64;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let (base, _) = RANGES[(x & 1) as usize];
                    let addr = base.0 + (x >> 8) % (2 << 20);
                    mem.write_slice(&x.to_le_bytes(), GuestAddress(addr & !7))
                        .expect("guest write");
                    n += 1;
                    if n % 32 == 0 {
                        let t = u64::from(throttle.load(Ordering::Relaxed));
                        std::thread::sleep(Duration::from_micros(50 + 20 * t));
                    }
                }
                n
            })
        };
        TestVmm {
            mem,
            stop,
            throttle,
            guest: Some(guest),
            writes: 0,
            throttles: Vec::new(),
        }
    }
}

impl Vmm for TestVmm {
    fn collect_dirty(&mut self, log: &mut DirtyLog) -> Result<(), VmmError> {
        rust_vmm::collect_dirty(&self.mem, log)?;
        Ok(())
    }
    fn pause(&mut self) -> Result<(), VmmError> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(g) = self.guest.take() {
            self.writes = g.join().map_err(|_| "guest thread panicked")?;
        }
        Ok(())
    }
    fn save_state(&mut self) -> Result<Vec<u8>, VmmError> {
        Ok(format!("writes={}", self.writes).into_bytes())
    }
    fn throttle(&mut self, percent: u8) -> Result<bool, VmmError> {
        self.throttle.store(percent, Ordering::Relaxed);
        self.throttles.push(percent);
        Ok(true)
    }
}

impl Drop for TestVmm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(g) = self.guest.take() {
            let _ = g.join();
        }
    }
}

#[test]
fn driver_migrates_a_running_vm_memory_guest_within_the_limit() {
    let dst_vm = Mem::from_ranges(&RANGES).expect("mmap");
    let dst = Arc::new(rust_vmm::guest_ram(&dst_vm).expect("blocks"));
    let mut receiver = Receiver::bind(
        "127.0.0.1:0".parse().expect("addr"),
        ReceiverConfig::default(),
    )
    .expect("bind");
    receiver.set_accept_timeout(Some(Duration::from_secs(10)));
    let addr = receiver.local_addr().expect("addr");
    let into = dst.clone();
    let destination = std::thread::spawn(move || receiver.serve(ReceiveInto::Memory(into)));

    let src_vm = Arc::new(Mem::from_ranges(&RANGES).expect("mmap"));
    for (base, len) in RANGES {
        src_vm
            .write_slice(&vec![0x5A; len / 2], base)
            .expect("boot image");
    }
    let src = Arc::new(rust_vmm::guest_ram(&src_vm).expect("blocks"));
    let mut guest = TestVmm::start(src_vm.clone());
    let cfg = SenderConfig::default()
        .channels(2)
        .idle_timeout(Duration::from_secs(10));
    let sender = Sender::connect(addr, cfg.clone(), src.clone()).expect("connect");
    let limit = Duration::from_secs(1);
    let outcome = Driver::new(Policy::new(limit), &cfg)
        .migrate(sender, &mut guest)
        .expect("migrate");
    let Outcome::Completed { report, stats } = outcome else {
        panic!("expected a completed migration");
    };
    let received = destination
        .join()
        .expect("receiver thread")
        .expect("receiver");

    assert!(guest.writes > 0, "the guest ran during the migration");
    assert_eq!(report.decisions.stopped, 1);
    assert_eq!(report.rounds[0].observed.pages, (12 << 20) / 4096);
    assert_eq!(stats.rounds as usize, report.rounds.len() + 1);
    assert!(report.downtime.expect("measured") <= limit, "{report:?}");
    assert_eq!(
        received.state,
        vec![format!("writes={}", guest.writes).into_bytes()]
    );
    for (base, len) in RANGES {
        let (mut a, mut b) = (vec![0u8; len], vec![1u8; len]);
        src_vm.read_slice(&mut a, base).expect("read");
        dst_vm.read_slice(&mut b, base).expect("read");
        assert!(a == b, "region at {base:?} differs");
    }
}
