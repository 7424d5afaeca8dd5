//! A rust-vmm style migration over real loopback sockets: guest RAM is a vm-memory
//! `GuestMemoryMmap<AtomicBitmap>` with two regions and a hole between them, a "guest" keeps
//! writing while the live rounds run (through vm-memory, which marks its bitmaps, and through
//! raw pointers with a KVM-style per-slot bitmap), each round sends the pages the bitmaps
//! reported, and after the writer stops and the final round, the destination's regions are
//! byte-identical to the source's.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pagewire::{rust_vmm, DirtyLog, ReceiveInto, Receiver, ReceiverConfig, Sender, SenderConfig};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

const PS: usize = 4096;
const LOW: usize = 8 << 20;
const HIGH: usize = 4 << 20;
const HIGH_BASE: u64 = 1 << 32;

type Vm = GuestMemoryMmap<AtomicBitmap>;

fn ranges() -> [(GuestAddress, usize); 2] {
    [(GuestAddress(0), LOW), (GuestAddress(HIGH_BASE), HIGH)]
}

/// xorshift: the test's deterministic "guest".
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Fill the guest with something that is not all zero.
fn boot(vm: &Vm) {
    let mut x = 0x1234_5678u64;
    for (base, len) in ranges() {
        for page in (0..len / PS).step_by(3) {
            let v = next(&mut x).to_le_bytes();
            let addr = GuestAddress(base.0 + (page * PS) as u64);
            vm.write_slice(&v.repeat(64), addr).expect("write");
        }
    }
}

fn identical(a: &Vm, b: &Vm) -> bool {
    ranges().iter().all(|&(addr, len)| {
        let (mut x, mut y) = (vec![0u8; len], vec![1u8; len]);
        a.read_slice(&mut x, addr).expect("read");
        b.read_slice(&mut y, addr).expect("read");
        x == y
    })
}

#[test]
fn two_regions_with_a_hole_migrate_byte_identical_while_the_guest_writes() {
    let dst_vm = Vm::from_ranges(&ranges()).expect("mmap");
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

    let src_vm = Arc::new(Vm::from_ranges(&ranges()).expect("mmap"));
    boot(&src_vm);
    let src = Arc::new(rust_vmm::guest_ram(&src_vm).expect("blocks"));
    assert_eq!(src.layout(), dst.layout(), "same layout, same block names");
    let cfg = SenderConfig::default()
        .channels(2)
        .pages_per_packet(32)
        .idle_timeout(Duration::from_secs(10));
    let mut sender = Sender::connect(addr, cfg.clone(), src.clone()).expect("connect");
    let mut log = DirtyLog::new(&src, cfg.page_size);
    rust_vmm::collect_dirty(&src_vm, &mut log).expect("start clean");
    log.mark_all();

    // The running guest: writes through vm-memory (bitmap-tracked, like device emulation)
    // and through raw pointers into the high region, keeping its own KVM-style bitmap. It
    // writes only the lower half of each region, so however slow a round is (a loaded host),
    // a round built from the dirty log can never hold more than half the pages.
    let stop = Arc::new(AtomicBool::new(false));
    let kvm_bitmap = Arc::new(Mutex::new(vec![0u64; (HIGH / PS).div_ceil(64)]));
    let writer = {
        let (vm, stop, kvm) = (src_vm.clone(), stop.clone(), kvm_bitmap.clone());
        let high = src.block(1).expect("high block").as_ptr() as usize;
        std::thread::spawn(move || {
            let mut x = 99u64;
            let mut writes = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let r = next(&mut x);
                let page = (r >> 8) as usize % (LOW / PS / 2);
                let off = (r as usize) % (PS - 8);
                vm.write_slice(&r.to_le_bytes(), GuestAddress((page * PS + off) as u64))
                    .expect("write");
                let hp = (r >> 24) as usize % (HIGH / PS / 2);
                // The "vCPU" writes guest RAM directly; KVM would log the page. Log first,
                // then write, as the hardware's dirty bit is set by the write itself.
                kvm.lock().expect("kvm")[hp / 64] |= 1 << (hp % 64);
                let p = (high + hp * PS + off) as *mut u64;
                // SAFETY: inside the high region's mapping (hp < HIGH/PS/2, off + 8 <= PS),
                // which the block keeps alive; an unaligned volatile write of plain bytes.
                unsafe { p.write_unaligned(r) };
                writes += 1;
                if writes % 64 == 0 {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            writes
        })
    };

    let mut live_pages = Vec::new();
    for _ in 0..4 {
        let st = sender
            .send_round(log.take_round(cfg.pages_per_packet))
            .expect("live round");
        live_pages.push(st.total.pages_normal + st.total.pages_zero);
        rust_vmm::collect_dirty(&src_vm, &mut log).expect("vm-memory bitmaps");
        // KVM_GET_DIRTY_LOG: read and clear the slot's bitmap in one step.
        let words = {
            let mut b = kvm_bitmap.lock().expect("kvm");
            let empty = vec![0; b.len()];
            std::mem::replace(&mut *b, empty)
        };
        log.add_bitmap(1, &words)
            .expect("kvm bitmap of the high slot");
    }
    // Pause the guest, collect the last dirty pages, final round.
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().expect("writer");
    rust_vmm::collect_dirty(&src_vm, &mut log).expect("final vm-memory bitmaps");
    log.add_bitmap(1, &kvm_bitmap.lock().expect("kvm"))
        .expect("final kvm bitmap");
    let last = sender
        .send_round(log.take_round(cfg.pages_per_packet))
        .expect("final round");
    let total = sender.finish().expect("finish");
    destination
        .join()
        .expect("receiver thread")
        .expect("receiver");

    assert!(writes > 0, "the guest wrote during the migration");
    assert_eq!(
        live_pages[0] as usize,
        (LOW + HIGH) / PS,
        "round 1: every page"
    );
    assert!(
        live_pages[1..]
            .iter()
            .all(|&p| (p as usize) <= (LOW + HIGH) / PS / 2),
        "later rounds send only dirty pages: {live_pages:?}"
    );
    assert_eq!(total.rounds, 5);
    assert!(last.total.pages_normal + last.total.pages_zero > 0);
    let regions: Vec<(u64, u64)> = src_vm.iter().map(|r| (r.start_addr().0, r.len())).collect();
    assert_eq!(regions, vec![(0, LOW as u64), (HIGH_BASE, HIGH as u64)]);
    assert!(
        identical(&src_vm, &dst_vm),
        "destination differs from the paused source"
    );
}
