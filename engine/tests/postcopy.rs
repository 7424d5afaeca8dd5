//! Post-copy over real loopback sockets: the destination's guest (a thread) reads pages that
//! have not arrived yet and must see exactly the source's bytes; hostile page requests are
//! refused by the source.
//!
//! The main test runs the sender in a second process (this test binary, re-executed with
//! `PW_PC_ROLE=sender`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::FromRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pagewire::internals::PageRequest;
use pagewire::{
    Block, BlockPages, CodecKind, GuestRam, ReceiveInto, Receiver, ReceiverConfig, RoundPages,
    Sender, SenderConfig, SessionError,
};
use pagewire_transport::control::{self, Hello, Message};
use pagewire_transport::wire::InitPacket;

const PS: usize = 4096;

/// The expected bytes of page `p` of block `b` (generation `g`): every 7th page zero, the
/// others pseudo-random words.
fn fill_page(out: &mut [u8], b: usize, p: u64, g: u64) {
    if p % 7 == 3 && g == 0 {
        out.fill(0);
        return;
    }
    let mut x = (b as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (p + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9)
        ^ g;
    for w in out.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
}

fn memfd_block(name: &str, size: usize) -> Block {
    let c = std::ffi::CString::new(name).expect("name");
    // SAFETY: a valid C string; returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: the fd is new and ours.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(size as u64).expect("size");
    Block::from_file(name, &f, true, false).expect("map")
}

const LAYOUT: [(&str, usize); 2] = [("pc.ram", 48 << 20), ("shm.ram", 4 << 20)];

fn source_memory() -> Arc<GuestRam> {
    let blocks = LAYOUT
        .iter()
        .enumerate()
        .map(|(b, (name, size))| {
            let blk = Block::anonymous(name, *size).expect("map");
            // SAFETY: fresh block, not shared yet.
            let bytes = unsafe { blk.as_mut_slice() };
            for (p, page) in bytes.chunks_exact_mut(PS).enumerate() {
                fill_page(page, b, p as u64, 0);
            }
            blk
        })
        .collect();
    Arc::new(GuestRam::new(blocks).expect("layout"))
}

/// Destination memory: an anonymous block and a shared-memory block.
fn dest_memory() -> Arc<GuestRam> {
    let (a, s) = (LAYOUT[0], LAYOUT[1]);
    Arc::new(
        GuestRam::new(vec![
            Block::anonymous(a.0, a.1).expect("map"),
            memfd_block(s.0, s.1),
        ])
        .expect("layout"),
    )
}

fn cfg() -> SenderConfig {
    SenderConfig::default()
        .codec(CodecKind::None)
        .channels(2)
        .idle_timeout(Duration::from_secs(20))
}

/// A receiver for `c`'s sessions on a free loopback port, waiting up to 20 s for one.
fn receiver(c: &SenderConfig) -> (Receiver, SocketAddr) {
    let mut r = Receiver::bind(
        "127.0.0.1:0".parse().expect("addr"),
        ReceiverConfig::for_sender(c),
    )
    .expect("bind");
    r.set_accept_timeout(Some(Duration::from_secs(20)));
    let addr = r.local_addr().expect("addr");
    (r, addr)
}

/// What the guest thread saw.
#[derive(Debug, Default)]
struct Seen {
    pages: u64,
    wrong: Vec<(usize, u64)>,
}

/// The guest: reads `n` random pages (every byte) of `mem` while they arrive, comparing with
/// generation `gen_of(block, page)`.
fn guest(
    mem: Arc<GuestRam>,
    n: usize,
    seed: u64,
    gen_of: fn(usize, u64) -> u64,
    seen: Arc<Mutex<Seen>>,
) {
    let mut x = seed | 1;
    let mut want = vec![0u8; PS];
    let mut got = vec![0u8; PS];
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = (x % mem.blocks().len() as u64) as usize;
        let blk = mem.block(b).expect("block");
        let p = (x >> 8) % (blk.len() / PS) as u64;
        let ptr = blk.range_ptr(p * PS as u64, PS).expect("page");
        for (i, v) in got.iter_mut().enumerate() {
            // SAFETY: inside the block; the read blocks until post-copy has placed the page,
            // and nothing writes it afterwards (only UFFDIO_COPY, once).
            *v = unsafe { std::ptr::read_volatile(ptr.add(i)) };
        }
        fill_page(&mut want, b, p, gen_of(b, p));
        let mut s = seen.lock().expect("lock");
        s.pages += 1;
        if got != want {
            s.wrong.push((b, p));
        }
    }
}

fn check_all(mem: &GuestRam, gen_of: fn(usize, u64) -> u64) {
    let mut want = vec![0u8; PS];
    for (b, blk) in mem.blocks().iter().enumerate() {
        // SAFETY: the session is over; nothing writes the memory.
        let bytes = unsafe { blk.as_slice() };
        for (p, page) in bytes.chunks_exact(PS).enumerate() {
            fill_page(&mut want, b, p as u64, gen_of(b, p as u64));
            assert!(
                page == &want[..],
                "block {b} page {p} differs after post-copy"
            );
        }
    }
}

/// Post-copy needs userfaultfd; without it (no privilege, old kernel) the tests skip visibly.
fn uffd_missing() -> bool {
    match pagewire::internals::Uffd::new() {
        Ok(_) => false,
        Err(e) => {
            eprintln!("SKIPPED: {e}");
            true
        }
    }
}

fn gen0(_: usize, _: u64) -> u64 {
    0
}

/// The sender process: pure post-copy (or after `PW_PC_ROUNDS` full pre-copy rounds).
fn run_sender(addr: SocketAddr, rounds: u32) {
    let src = source_memory();
    let c = cfg();
    let mut s = Sender::connect(addr, c.clone(), src.clone()).expect("connect");
    let sizes: Vec<u64> = LAYOUT.iter().map(|l| l.1 as u64).collect();
    for _ in 0..rounds {
        s.send_round(RoundPages::all(&sizes, PS as u32, c.pages_per_packet))
            .expect("round");
    }
    let pc = s
        .switch_to_postcopy(vec![(0, BlockPages::All), (1, BlockPages::All)])
        .expect("switch");
    let st = pc.finish().expect("finish");
    eprintln!(
        "sender: {} pages, {} requests served",
        st.pages, st.requests
    );
}

#[test]
fn pure_postcopy_two_processes_guest_reads_every_byte() {
    if std::env::var("PW_PC_ROLE").as_deref() == Ok("sender") {
        let addr = std::env::var("PW_PC_ADDR")
            .expect("addr")
            .parse()
            .expect("addr");
        run_sender(addr, 0);
        return;
    }
    if uffd_missing() {
        return;
    }
    let dst = dest_memory();
    let (mut r, addr) = receiver(&cfg());
    let seen = Arc::new(Mutex::new(Seen::default()));
    let guest_thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>> = Arc::default();
    {
        let (seen, gt) = (seen.clone(), guest_thread.clone());
        r.on_postcopy(move |start| {
            assert!(start.pages > 0);
            let (seen, mem) = (seen.clone(), start.memory.clone());
            let h = std::thread::spawn(move || guest(mem, 3000, 0x1234_5678, gen0, seen));
            *gt.lock().expect("lock") = Some(h);
        });
    }
    let child = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args([
            "pure_postcopy_two_processes_guest_reads_every_byte",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("PW_PC_ROLE", "sender")
        .env("PW_PC_ADDR", addr.to_string())
        .spawn()
        .expect("spawn sender process");
    let got = r.serve(ReceiveInto::Memory(dst.clone()));
    let out = child.wait_with_output().expect("sender process");
    let got = got.expect("serve");
    assert!(out.status.success(), "sender process failed");
    let h = guest_thread
        .lock()
        .expect("lock")
        .take()
        .expect("guest started");
    h.join().expect("guest thread");
    let seen = seen.lock().expect("lock");
    assert_eq!(seen.pages, 3000);
    assert!(
        seen.wrong.is_empty(),
        "guest read wrong bytes on pages {:?}",
        &seen.wrong[..seen.wrong.len().min(10)]
    );
    let pc = got.postcopy.expect("post-copy stats");
    let total_pages: u64 = LAYOUT.iter().map(|l| (l.1 / PS) as u64).sum();
    assert_eq!(pc.pages, total_pages);
    assert_eq!(pc.pages_urgent + pc.pages_background, total_pages);
    assert!(
        pc.requests > 0,
        "the guest's reads faulted and were requested"
    );
    assert!(!pc.latency.is_empty());
    check_all(&dst, gen0);
}

fn gen_dirty(_: usize, p: u64) -> u64 {
    if p % 5 == 0 {
        1
    } else {
        0
    }
}

/// Two pre-copy rounds, the guest dirties every 5th page, post-copy sends just those: the
/// destination must not keep its stale copies (they are discarded, then fetched).
#[test]
fn precopy_rounds_then_postcopy_of_dirty_pages() {
    if uffd_missing() {
        return;
    }
    let src = source_memory();
    let dst = dest_memory();
    let c = cfg();
    let (mut r, addr) = receiver(&c);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let guest_thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>> = Arc::default();
    {
        let (seen, gt) = (seen.clone(), guest_thread.clone());
        r.on_postcopy(move |start| {
            let (seen, mem) = (seen.clone(), start.memory.clone());
            let h = std::thread::spawn(move || guest(mem, 2000, 99, gen_dirty, seen));
            *gt.lock().expect("lock") = Some(h);
        });
    }
    let into = dst.clone();
    let rt = std::thread::spawn(move || r.serve(ReceiveInto::Memory(into)));
    let mut s = Sender::connect(addr, c.clone(), src.clone()).expect("connect");
    let sizes: Vec<u64> = LAYOUT.iter().map(|l| l.1 as u64).collect();
    for _ in 0..2 {
        s.send_round(RoundPages::all(&sizes, PS as u32, c.pages_per_packet))
            .expect("round");
    }
    let mut remaining = Vec::new();
    for (b, blk) in src.blocks().iter().enumerate() {
        // SAFETY: no round is running.
        let bytes = unsafe { blk.as_mut_slice() };
        let mut dirty = Vec::new();
        for (p, page) in bytes.chunks_exact_mut(PS).enumerate() {
            if gen_dirty(b, p as u64) == 1 {
                fill_page(page, b, p as u64, 1);
                dirty.push((p * PS) as u64);
            }
        }
        remaining.push((b, BlockPages::Offsets(dirty)));
    }
    let pc = s.switch_to_postcopy(remaining).expect("switch");
    let want_pages = pc.pages();
    let st = pc.finish().expect("finish");
    assert_eq!(st.precopy.rounds, 2);
    let got = rt.join().expect("join").expect("serve");
    guest_thread
        .lock()
        .expect("lock")
        .take()
        .expect("guest")
        .join()
        .expect("guest");
    let seen = seen.lock().expect("lock");
    assert!(
        seen.wrong.is_empty(),
        "stale or wrong pages read: {:?}",
        &seen.wrong[..seen.wrong.len().min(10)]
    );
    assert_eq!(got.postcopy.expect("stats").pages, want_pages);
    check_all(&dst, gen_dirty);
}

/// Post-copy keeps to the session's bandwidth cap: pure post-copy of the 52 MiB (about 45 MiB
/// of non-zero pages) at 100 MB/s takes at least (nearly) its bytes / cap, where loopback
/// alone would carry it in a fraction of that (answers to the guest's faults count too); the
/// guest's reads are answered and every byte arrives.
#[test]
fn postcopy_keeps_to_the_bandwidth_cap() {
    if uffd_missing() {
        return;
    }
    const CAP: u64 = 100_000_000;
    let src = source_memory();
    let dst = dest_memory();
    let c = cfg().max_bandwidth(pagewire::Rate::bytes_per_sec(CAP));
    let (mut r, addr) = receiver(&c);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let guest_thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>> = Arc::default();
    {
        let (seen, gt) = (seen.clone(), guest_thread.clone());
        r.on_postcopy(move |start| {
            let (seen, mem) = (seen.clone(), start.memory.clone());
            let h = std::thread::spawn(move || guest(mem, 500, 7, gen0, seen));
            *gt.lock().expect("lock") = Some(h);
        });
    }
    let into = dst.clone();
    let rt = std::thread::spawn(move || r.serve(ReceiveInto::Memory(into)));
    let s = Sender::connect(addr, c, src).expect("connect");
    let pc = s
        .switch_to_postcopy(vec![(0, BlockPages::All), (1, BlockPages::All)])
        .expect("switch");
    let st = pc.finish().expect("finish");
    let got = rt.join().expect("join").expect("serve");
    guest_thread
        .lock()
        .expect("lock")
        .take()
        .expect("guest")
        .join()
        .expect("guest");
    let seen = seen.lock().expect("lock");
    assert_eq!(seen.pages, 500);
    assert!(seen.wrong.is_empty(), "{:?}", &seen.wrong);
    assert!(st.requests > 0, "the guest's reads were requested");
    assert!(st.wire_bytes > 40 << 20, "{} bytes", st.wire_bytes);
    let floor = 0.8 * st.wire_bytes as f64 / CAP as f64;
    assert!(
        st.seconds >= floor,
        "{} bytes in {:.3} s: faster than the {CAP} B/s cap allows ({floor:.3} s)",
        st.wire_bytes,
        st.seconds
    );
    assert_eq!(
        got.postcopy.expect("stats").pages,
        LAYOUT.iter().map(|l| (l.1 / PS) as u64).sum::<u64>()
    );
    check_all(&dst, gen0);
}

/// A hand-written destination: handshake, then post-copy connections; returns the urgent
/// connection and the control connection.
fn fake_destination(listener: &TcpListener) -> (TcpStream, TcpStream) {
    let (mut control, _) = listener.accept().expect("control");
    control::read_preamble(&mut control).expect("preamble");
    control::write_message(
        &mut control,
        &Message::Challenge {
            nonce: [7; 32],
            secret_required: false,
        },
    )
    .expect("challenge");
    let hello: Hello = match control::read_message(&mut control).expect("hello") {
        Message::Hello(h) => h,
        other => panic!("expected hello, got {}", other.name()),
    };
    control::write_message(
        &mut control,
        &Message::HelloOk {
            proof: None,
            fresh: false,
        },
    )
    .expect("ok");
    let read_init = |s: &mut TcpStream| {
        let mut b = [0u8; 64];
        s.read_exact(&mut b).expect("init");
        InitPacket::parse(&b).expect("init packet")
    };
    let mut chans = Vec::new();
    for _ in 0..hello.channels {
        let (mut s, _) = listener.accept().expect("channel");
        read_init(&mut s);
        chans.push(s);
    }
    let background = loop {
        match control::read_message(&mut control).expect("control") {
            Message::PostcopyPages { .. } => {}
            Message::Postcopy { background } => break background,
            other => panic!("unexpected {}", other.name()),
        }
    };
    control::write_message(&mut control, &Message::PostcopyReady).expect("ready");
    let mut urgent = None;
    let mut bg = Vec::new();
    for _ in 0..=background {
        let (mut s, _) = listener.accept().expect("post-copy connection");
        let init = read_init(&mut s);
        if init.channel_id as u16 == hello.channels {
            urgent = Some(s);
        } else {
            bg.push(s);
        }
    }
    // Keep the background connections open (and drained) while the test runs.
    for mut s in bg {
        std::thread::spawn(move || {
            let mut sink = [0u8; 65536];
            while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
        });
    }
    (urgent.expect("urgent connection"), control)
}

#[test]
fn hostile_page_requests_are_refused_with_a_clear_error() {
    let cases: [([u8; 16], &str); 4] = [
        (
            PageRequest {
                block: 9,
                offset: 0,
            }
            .encode(),
            "block 9 out of range (2 blocks)",
        ),
        (
            PageRequest {
                block: 0,
                offset: 100,
            }
            .encode(),
            "not a multiple of the page size",
        ),
        (
            PageRequest {
                block: 1,
                offset: 4 << 20,
            }
            .encode(),
            "outside block 1",
        ),
        (*b"GET / HTTP/1.1\r\n", "bad magic"),
    ];
    for (bytes, want) in cases {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let src = source_memory();
        let dest = std::thread::spawn(move || {
            let (mut urgent, mut control) = fake_destination(&listener);
            urgent.write_all(&bytes).expect("request");
            // The source reports the refusal on the control connection.
            control
                .set_read_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
            loop {
                match control::read_message(&mut control) {
                    Ok(Message::Error { message }) => return Some(message),
                    Ok(_) => continue,
                    Err(_) => return None,
                }
            }
        });
        let s = Sender::connect(addr, cfg(), src).expect("connect");
        let pc = s
            .switch_to_postcopy(vec![(0, BlockPages::All), (1, BlockPages::All)])
            .expect("switch");
        let err = pc
            .finish()
            .expect_err("a hostile request must fail the session");
        let msg = err.to_string();
        assert!(matches!(err, SessionError::Postcopy(_)), "{msg}");
        assert!(
            msg.contains("page request #0 refused") && msg.contains(want),
            "{msg}"
        );
        let told = dest
            .join()
            .expect("fake destination")
            .expect("error message");
        assert!(told.contains(want), "destination was told: {told}");
    }
}

/// The sender refuses pages that are not the guest's before anything changes on the wire.
#[test]
fn switch_refuses_pages_outside_the_guest() {
    let src = source_memory();
    let c = cfg();
    for (sel, want) in [
        (vec![(5, BlockPages::All)], "block 5 does not exist"),
        (
            vec![(1, BlockPages::Offsets(vec![4 << 20]))],
            "offset 0x400000 not a page of block 1",
        ),
        (
            vec![(0, BlockPages::Offsets(vec![100]))],
            "offset 0x64 not a page of block 0",
        ),
    ] {
        let (r, addr) = receiver(&c);
        let rt = std::thread::spawn(move || r.serve(ReceiveInto::Allocate));
        let s = Sender::connect(addr, c.clone(), src.clone()).expect("connect");
        let err = s.switch_to_postcopy(sel).expect_err("refused");
        assert!(matches!(err, SessionError::Config(_)), "{err}");
        assert!(err.to_string().contains(want), "{err}");
        // The sender is gone without ending its session: the receiver reports that.
        assert!(rt.join().expect("receiver thread").is_err());
    }
}

/// A TCP proxy in front of the receiver that cuts the connections with the given indices
/// (in accept order) once `after` bytes have passed towards the destination on those of them
/// from `count_from` on; every other connection is forwarded untouched.
fn cutting_proxy(
    target: SocketAddr,
    doomed: &'static [usize],
    count_from: usize,
    after: u64,
) -> (
    SocketAddr,
    Arc<std::sync::atomic::AtomicBool>,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
    let addr = listener.local_addr().expect("proxy addr");
    let cut = Arc::new(AtomicBool::new(false));
    let cut_done = cut.clone();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        let passed = Arc::new(AtomicU64::new(0));
        let victims: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        for (index, client) in listener.incoming().enumerate() {
            let Ok(client) = client else { return };
            count.store(index + 1, Ordering::SeqCst);
            let Ok(server) = TcpStream::connect(target) else {
                return;
            };
            let counts = doomed.contains(&index) && index >= count_from;
            if doomed.contains(&index) {
                let mut v = victims.lock().expect("lock");
                v.push(client.try_clone().expect("clone"));
                v.push(server.try_clone().expect("clone"));
            }
            for (mut from, mut to, downstream) in [
                (
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                    true,
                ),
                (server, client, false),
            ] {
                let (passed, victims, cut) = (passed.clone(), victims.clone(), cut_done.clone());
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        if counts && downstream {
                            let total = passed.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                            if total >= after && !cut.swap(true, Ordering::SeqCst) {
                                for s in victims.lock().expect("lock").iter() {
                                    let _ = s.shutdown(std::net::Shutdown::Both);
                                }
                            }
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    (addr, cut, accepted)
}

/// Post-copy survives broken connections: the proxy cuts every post-copy connection
/// mid-transfer; the destination keeps its placed pages (the guest's reads wait), the source
/// reconnects (new connections, authenticated like the first), the destination says which
/// pages it still lacks and re-sends its outstanding requests, and every byte arrives.
#[test]
fn postcopy_resumes_after_the_connections_are_cut() {
    // Connections: 0 control, 1..=2 pre-copy channels, 3 urgent, 4..=5 background.
    resume_after_cut(&[3, 4, 5], cfg());
}

/// The control connection is cut too: the sender comes back on a new control connection
/// (the front door authenticates it; its hello names the running session) and replaces the
/// post-copy connections.
#[test]
fn postcopy_resumes_after_control_and_data_connections_are_cut() {
    resume_after_cut(&[0, 3, 4, 5], cfg());
}

/// As above with a shared secret: the resumed control connection and the new post-copy
/// connections prove it over the receiver's new nonce.
#[test]
fn postcopy_resumes_with_a_shared_secret() {
    let secret = pagewire::Secret::new(vec![0x5A; 32]).expect("secret");
    resume_after_cut(&[0, 3, 4, 5], cfg().secret(Some(secret)));
}

fn resume_after_cut(doomed: &'static [usize], c: SenderConfig) {
    if uffd_missing() {
        return;
    }
    let src = source_memory();
    let dst = dest_memory();
    let (mut r, target) = receiver(&c);
    let (proxy, cut, accepted) = cutting_proxy(target, doomed, 3, 8 << 20);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let guest_thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>> = Arc::default();
    {
        let (seen, gt) = (seen.clone(), guest_thread.clone());
        r.on_postcopy(move |start| {
            let (seen, mem) = (seen.clone(), start.memory.clone());
            let h = std::thread::spawn(move || guest(mem, 3000, 7, gen0, seen));
            *gt.lock().expect("lock") = Some(h);
        });
    }
    let into = dst.clone();
    let rt = std::thread::spawn(move || r.serve(ReceiveInto::Memory(into)));
    let s = Sender::connect(proxy, c.clone(), src.clone()).expect("connect");
    let pc = s
        .switch_to_postcopy(vec![(0, BlockPages::All), (1, BlockPages::All)])
        .expect("switch");
    let st = pc.finish().expect("post-copy finishes after the cut");
    let got = rt.join().expect("join").expect("serve");
    assert!(
        cut.load(std::sync::atomic::Ordering::SeqCst),
        "the proxy cut"
    );
    guest_thread
        .lock()
        .expect("lock")
        .take()
        .expect("guest")
        .join()
        .expect("guest");
    let seen = seen.lock().expect("lock");
    assert!(
        seen.wrong.is_empty(),
        "wrong bytes read: {:?}",
        &seen.wrong[..seen.wrong.len().min(10)]
    );
    assert_eq!(seen.pages, 3000);
    let pcs = got.postcopy.expect("stats");
    assert_eq!(st.reconnects, 1, "{st:?}");
    assert_eq!(pcs.reconnects, 1, "{pcs:?}");
    // 6 connections, then 3 new post-copy ones, and a new control connection when it was cut.
    let want = 9 + usize::from(doomed.contains(&0));
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        want,
        "connections through the proxy"
    );
    check_all(&dst, gen0);
}

/// A hand-written source: handshake, no rounds, then post-copy with one background
/// connection on which it writes `packet`. Returns what the destination reported.
fn fake_source(
    addr: SocketAddr,
    compression: pagewire_transport::wire::Compression,
    packet: Vec<u8>,
) -> Option<String> {
    use pagewire_transport::wire::BlockSpec;
    let mut control = TcpStream::connect(addr).expect("control");
    control
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    control::write_preamble(&mut control).expect("preamble");
    match control::read_message(&mut control).expect("challenge") {
        Message::Challenge { .. } => {}
        other => panic!("expected challenge, got {}", other.name()),
    }
    let uuid = *b"hostile-postcopy";
    let hello = Hello {
        uuid,
        page_size: PS as u32,
        pages_per_packet: 128,
        compression,
        channels: 1,
        blocks: LAYOUT
            .iter()
            .map(|(n, sz)| BlockSpec {
                name: (*n).into(),
                size: *sz as u64,
            })
            .collect(),
        auth: None,
        opening_sync: false,
    };
    control::write_message(&mut control, &Message::Hello(hello)).expect("hello");
    match control::read_message(&mut control).expect("hello-ok") {
        Message::HelloOk { .. } => {}
        other => panic!("expected hello-ok, got {}", other.name()),
    }
    let open = |id: u8| {
        let mut s = TcpStream::connect(addr).expect("connection");
        s.write_all(
            &InitPacket {
                uuid,
                channel_id: id,
            }
            .encode(),
        )
        .expect("init");
        s
    };
    // The one pre-copy channel, closed at once (no rounds).
    let ch = open(0);
    ch.shutdown(std::net::Shutdown::Write).expect("close");
    control::write_message(
        &mut control,
        &Message::PostcopyPages {
            block: 0,
            runs: vec![(0, 16)],
        },
    )
    .expect("pages");
    control::write_message(&mut control, &Message::Postcopy { background: 1 }).expect("switch");
    match control::read_message(&mut control).expect("ready") {
        Message::PostcopyReady => {}
        other => panic!("expected postcopy-ready, got {}", other.name()),
    }
    let _urgent = open(1);
    let mut bg = open(2);
    let _ = bg.write_all(&packet);
    loop {
        match control::read_message(&mut control) {
            Ok(Message::Error { message }) => return Some(message),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

/// Post-copy packets are checked like any channel packet: a bad one from a hostile source
/// fails the session with an error naming the connection, the packet and the field (and
/// never writes outside guest memory).
#[test]
fn hostile_postcopy_packets_are_refused() {
    use pagewire_transport::wire::{encode_header, header_len, Compression, HeaderFields};
    if uffd_missing() {
        return;
    }
    let header = |name: &str, normal: &[u64], zero: &[u64], flags: u32| {
        let mut h = vec![0u8; header_len(128)];
        let mut offs = normal.to_vec();
        offs.extend_from_slice(zero);
        encode_header(
            &mut h,
            &HeaderFields {
                flags,
                pages_alloc: 128,
                normal_pages: normal.len() as u32,
                next_packet_size: (normal.len() * PS) as u32,
                packet_num: 0,
                zero_pages: zero.len() as u32,
            },
            name,
            &offs,
        );
        h
    };
    let none = Compression::None.flag();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        // A page beyond the end of shm.ram (4 MiB).
        (header("shm.ram", &[], &[4 << 20], none), "offset"),
        // A block this guest does not have.
        (header("pc.rom", &[], &[0], none), "block"),
        // qpl framing in a session without compression (its post-copy pages travel raw).
        (
            header("pc.ram", &[], &[0], Compression::Qpl.flag()),
            "compression",
        ),
        // A SYNC (post-copy streams have none).
        (header("pc.ram", &[], &[], 0x01), "SYNC"),
    ];
    for (packet, want) in cases {
        let dst = dest_memory();
        let (r, addr) = receiver(&cfg());
        let rt = std::thread::spawn(move || r.serve(ReceiveInto::Memory(dst)));
        let told = fake_source(addr, Compression::None, packet);
        let err = rt.join().expect("receiver thread").expect_err("refused");
        let msg = err.to_string();
        assert!(
            msg.contains("post-copy background connection, packet #0") || msg.contains("SYNC"),
            "{msg}"
        );
        assert!(
            msg.to_lowercase().contains(&want.to_lowercase()),
            "{want}: {msg}"
        );
        assert_eq!(told.as_deref(), Some(msg.as_str()), "the source was told");
        eprintln!("refused: {msg}");
    }
}

/// The source process is killed (SIGKILL) while post-copy runs: the destination's guest can
/// never get the pages it lacks, and the destination says so within its grace of 1.5 s, not
/// after the idle timeout (20 s here) a silent network would get.
#[test]
fn a_killed_source_fails_the_destination_long_before_the_idle_timeout() {
    if std::env::var("PW_PC_ROLE").as_deref() == Ok("slow-sender") {
        let addr: SocketAddr = std::env::var("PW_PC_ADDR")
            .expect("addr")
            .parse()
            .expect("addr");
        // 52 MiB at 5 MB/s: post-copy would take ten seconds; the test kills this process.
        let src = source_memory();
        let c = cfg().max_bandwidth(pagewire::Rate::bytes_per_sec(5_000_000));
        let s = Sender::connect(addr, c, src).expect("connect");
        let pc = s
            .switch_to_postcopy(vec![(0, BlockPages::All), (1, BlockPages::All)])
            .expect("switch");
        let _ = pc.finish();
        return;
    }
    if uffd_missing() {
        return;
    }
    let c = cfg();
    let (mut r, addr) = receiver(&c);
    let (started_tx, started) = std::sync::mpsc::channel();
    r.on_postcopy(move |_| {
        let _ = started_tx.send(());
    });
    let dst = dest_memory();
    let into = dst.clone();
    let serving = std::thread::spawn(move || r.serve(ReceiveInto::Memory(into)));
    let mut child = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args([
            "a_killed_source_fails_the_destination_long_before_the_idle_timeout",
            "--exact",
            "--test-threads=1",
        ])
        .env("PW_PC_ROLE", "slow-sender")
        .env("PW_PC_ADDR", addr.to_string())
        .spawn()
        .expect("spawn sender process");
    started
        .recv_timeout(Duration::from_secs(20))
        .expect("post-copy started");
    std::thread::sleep(Duration::from_millis(300));
    child.kill().expect("SIGKILL the source");
    let killed = std::time::Instant::now();
    let _ = child.wait();
    let Err(e) = serving.join().expect("receiver thread") else {
        panic!("the destination cannot have completed without its source");
    };
    let took = killed.elapsed();
    eprintln!(
        "destination error {:.2} s after the kill: {e}",
        took.as_secs_f64()
    );
    assert!(
        matches!(
            &e,
            SessionError::Postcopy(pagewire::error::PostcopyError::SourceGone { missing, .. }) if *missing > 0
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("the guest cannot continue"), "{e}");
    // Its grace (1.5 s) and the time to notice, not the 20 s idle timeout.
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

/// Post-copy over TLS survives cut connections like clear text: the control connection and
/// every post-copy connection are cut mid-stream (mid-record: the receiving side sees a
/// truncated record, a broken connection, not an altered one), the source resumes with new
/// TLS handshakes, and every byte arrives.
#[cfg(feature = "gen-certs")]
#[test]
fn postcopy_over_tls_resumes_after_control_and_data_connections_are_cut() {
    let dir = tempfile::tempdir().expect("dir");
    pagewire::tls::generate(dir.path(), &pagewire::tls::GenerateSpec::default()).expect("certs");
    let mut t = pagewire::tls::TlsConfig::from_dir(dir.path());
    t.server_name = Some("localhost".into());
    resume_after_cut(&[0, 3, 4, 5], cfg().tls(Some(t)));
}

/// The CPUs each running thread named `pw-pc-*` may use (`/proc/self/task/*/status`).
fn postcopy_thread_cpus() -> Vec<(String, String)> {
    let mut seen = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return seen;
    };
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let comm = comm.trim();
        if !comm.starts_with("pw-pc-") {
            continue;
        }
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        if let Some(l) = status.lines().find(|l| l.starts_with("Cpus_allowed_list:")) {
            let cpus = l
                .trim_start_matches("Cpus_allowed_list:")
                .trim()
                .to_string();
            seen.push((comm.to_string(), cpus));
        }
    }
    seen
}

/// `postcopy_cpus` places post-copy's threads: at both ends the fault path (fault thread,
/// urgent connection's reader, the source's urgent thread) on one CPU, the background
/// stream's threads on another, as seen in /proc while post-copy runs.
#[test]
fn postcopy_threads_run_on_the_cpus_they_are_given() {
    if uffd_missing() {
        return;
    }
    let cpus = pagewire_allowed_cpus();
    let (Some(&fault), Some(&bg)) = (cpus.first(), cpus.last()) else {
        return;
    };
    if fault == bg {
        eprintln!("SKIPPED: one CPU only");
        return;
    }
    let place = pagewire::config::PostcopyCpus {
        fault_path: vec![fault],
        background: vec![bg],
    };
    // 100 MB/s: post-copy of the 52 MiB takes about 0.5 s, time to look at the threads.
    let c = cfg()
        .postcopy_cpus(place.clone())
        .max_bandwidth(pagewire::Rate::bytes_per_sec(100_000_000));
    let mut r = Receiver::bind(
        "127.0.0.1:0".parse().expect("addr"),
        ReceiverConfig::for_sender(&c).postcopy_cpus(place),
    )
    .expect("bind");
    r.set_accept_timeout(Some(Duration::from_secs(20)));
    let addr = r.local_addr().expect("addr");
    let dst = dest_memory();
    let into = dst.clone();
    let rt = std::thread::spawn(move || r.serve(ReceiveInto::Memory(into)));
    let src = source_memory();
    let s = Sender::connect(addr, c, src).expect("connect");
    let pc = s
        .switch_to_postcopy(vec![(0, BlockPages::All), (1, BlockPages::All)])
        .expect("switch");
    // Look while post-copy runs (both ends are in this process; so may be other tests'
    // post-copy threads, unpinned: each name's set of CPU lists must hold the expected one).
    let mut looked: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    let until = std::time::Instant::now() + Duration::from_millis(400);
    while std::time::Instant::now() < until {
        for (name, allowed) in postcopy_thread_cpus() {
            looked.entry(name).or_default().insert(allowed);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    pc.finish().expect("post-copy finishes");
    rt.join().expect("join").expect("serve");
    eprintln!("{looked:?}");
    let want = |name: &str| {
        let background = name.starts_with("pw-pc-bg-")
            || (name.starts_with("pw-pc-recv-") && name != "pw-pc-recv-0");
        if background { bg } else { fault }.to_string()
    };
    for name in [
        "pw-pc-faults",
        "pw-pc-urgent",
        "pw-pc-recv-0",
        "pw-pc-recv-1",
        "pw-pc-bg-1",
    ] {
        assert!(
            looked.get(name).is_some_and(|s| s.contains(&want(name))),
            "{name}: {looked:?}"
        );
    }
}

/// The CPUs this process may run on (sched_getaffinity).
fn pagewire_allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is a plain bit array; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0
    {
        return Vec::new();
    }
    // SAFETY: CPU_ISSET reads the bit array only, below CPU_SETSIZE.
    (0..libc::CPU_SETSIZE as usize)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

/// A guest reading memory in order is served in runs, not page by page: the background stream
/// moves to just after each fault and a request's unsent neighbours come with it (which of
/// the two brings a page depends on timing; `Sched::neighbours` is tested on its own), so far
/// fewer requests than pages read, and every byte right. A cap holds the stream back so
/// that the guest's reads, not the stream, decide the order.
#[test]
fn a_guest_reading_in_order_is_served_in_runs() {
    if uffd_missing() {
        return;
    }
    let c = cfg().max_bandwidth(pagewire::Rate::bytes_per_sec(50_000_000));
    let (mut r, addr) = receiver(&c);
    type Reader = std::thread::JoinHandle<(u64, u64)>;
    let read: Arc<Mutex<Option<Reader>>> = Arc::default();
    let guest_slot = read.clone();
    // Reads block 0's pages 4096.. in order (a region the background reaches last).
    const FIRST: u64 = 4096;
    const PAGES: u64 = 2048;
    r.on_postcopy(move |start| {
        let mem = start.memory.clone();
        let h = std::thread::spawn(move || {
            let blk = mem.block(0).expect("block");
            let (mut want, mut got) = (vec![0u8; PS], vec![0u8; PS]);
            let mut wrong = 0;
            for p in FIRST..FIRST + PAGES {
                let ptr = blk.range_ptr(p * PS as u64, PS).expect("page");
                for (i, v) in got.iter_mut().enumerate() {
                    // SAFETY: inside the block; the read waits until the page is placed.
                    *v = unsafe { std::ptr::read_volatile(ptr.add(i)) };
                }
                fill_page(&mut want, 0, p, 0);
                if got != want {
                    wrong += 1;
                }
            }
            (PAGES, wrong)
        });
        *guest_slot.lock().expect("lock") = Some(h);
    });
    let dst = dest_memory();
    let into = dst.clone();
    let rt = std::thread::spawn(move || r.serve(ReceiveInto::Memory(into)));
    let s = Sender::connect(addr, c, source_memory()).expect("connect");
    let pc = s
        .switch_to_postcopy(vec![(0, BlockPages::All), (1, BlockPages::All)])
        .expect("switch");
    let st = pc.finish().expect("finish");
    rt.join().expect("join").expect("serve");
    let (pages, wrong) = read
        .lock()
        .expect("lock")
        .take()
        .expect("guest")
        .join()
        .expect("guest");
    eprintln!(
        "{pages} pages read in order: {} requests, {} neighbours",
        st.requests, st.pages_neighbours
    );
    assert_eq!(wrong, 0);
    assert!(
        st.requests <= pages / 4,
        "one request per run of pages: {st:?}"
    );
    check_all(&dst, gen0);
}

/// Memory of the realistic mix (compresses to about 0.3 of its size).
fn compressible(size: usize) -> Arc<GuestRam> {
    let b = Block::anonymous("pc.ram", size).expect("map");
    // SAFETY: fresh block, not shared yet.
    pagewire_synth::fill(
        pagewire_synth::PageSet::Realistic,
        unsafe { b.as_mut_slice() },
        PS,
        3,
    );
    Arc::new(GuestRam::new(vec![b]).expect("mem"))
}

/// Pure post-copy of `size` bytes of the realistic mix with `c`, a guest reading 300 random
/// pages meanwhile; checks every byte, and that the pages crossed in less than 0.6 × their
/// size (the mix compresses to about 0.3).
fn compressed_postcopy(c: SenderConfig, size: usize) {
    let src = compressible(size);
    let dst =
        Arc::new(GuestRam::new(vec![Block::anonymous("pc.ram", size).expect("map")]).expect("mem"));
    let (mut r, addr) = receiver(&c);
    let guest: Arc<Mutex<Option<std::thread::JoinHandle<usize>>>> = Arc::default();
    let slot = guest.clone();
    // SAFETY: nothing writes the source memory during the session.
    let want: Arc<Vec<u8>> = Arc::new(unsafe { src.block(0).expect("block").as_slice() }.to_vec());
    let expect = want.clone();
    r.on_postcopy(move |start| {
        let (mem, expect) = (start.memory.clone(), expect.clone());
        let h = std::thread::spawn(move || {
            let blk = mem.block(0).expect("block");
            let pages = (blk.len() / PS) as u64;
            let (mut x, mut wrong) = (0x2545_F491_4F6C_DD1Du64, 0);
            for _ in 0..300 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let p = (x % pages) as usize;
                let ptr = blk.range_ptr((p * PS) as u64, PS).expect("page");
                // SAFETY: inside the block; the read waits until the page is placed.
                let got: Vec<u8> = (0..PS)
                    .map(|i| unsafe { std::ptr::read_volatile(ptr.add(i)) })
                    .collect();
                if got[..] != expect[p * PS..(p + 1) * PS] {
                    wrong += 1;
                }
            }
            wrong
        });
        *slot.lock().expect("lock") = Some(h);
    });
    let into = dst.clone();
    let rt = std::thread::spawn(move || r.serve(ReceiveInto::Memory(into)));
    let s = Sender::connect(addr, c, src).expect("connect");
    let pc = s
        .switch_to_postcopy(vec![(0, BlockPages::All)])
        .expect("switch");
    let st = pc.finish().expect("finish");
    let got = rt.join().expect("join").expect("serve");
    let wrong = guest
        .lock()
        .expect("lock")
        .take()
        .expect("guest")
        .join()
        .expect("guest");
    assert_eq!(wrong, 0, "the guest read bytes that are not the source's");
    // SAFETY: the session is over; every page is placed.
    assert!(unsafe { dst.block(0).expect("block").as_slice() } == &want[..]);
    assert_eq!(got.postcopy.expect("post-copy").pages, st.pages);
    let nonzero = want
        .chunks_exact(PS)
        .filter(|p| p.iter().any(|&b| b != 0))
        .count();
    eprintln!(
        "{} pages ({nonzero} not zero): {} wire bytes, {} requests",
        st.pages, st.wire_bytes, st.requests
    );
    let raw = (nonzero * PS) as f64;
    assert!(
        (st.wire_bytes as f64) < 0.6 * raw,
        "{} wire bytes for {raw} bytes of pages",
        st.wire_bytes
    );
}

/// Codec deflate: post-copy's background packets go in the qpl framing, compressed (urgent
/// answers stay raw), and every byte arrives.
#[test]
fn codec_deflate_compresses_the_background_stream() {
    if uffd_missing() {
        return;
    }
    compressed_postcopy(cfg().codec(CodecKind::Deflate), 8 << 20);
}

/// Codec auto under a cap of 20 MB/s: compressing a page takes far less than the link time
/// it saves, so the background stream compresses.
#[test]
fn codec_auto_compresses_the_background_stream_under_a_tight_cap() {
    if uffd_missing() {
        return;
    }
    let c = cfg()
        .codec(CodecKind::Auto)
        .max_bandwidth(pagewire::Rate::bytes_per_sec(20_000_000));
    compressed_postcopy(c, 8 << 20);
}

/// In a compressing session post-copy's background packets come in the qpl framing, checked
/// like a channel's: a bad length, a page that does not inflate, or raw framing fail the
/// session with an error naming the packet and what is wrong, and nothing of the packet is
/// placed (its pages stay missing: mincore shows them absent).
#[test]
fn hostile_compressed_postcopy_packets_are_refused() {
    use pagewire_transport::wire::{encode_header, header_len, Compression, HeaderFields};
    if uffd_missing() {
        return;
    }
    let qpl = Compression::Qpl;
    // Pages 0 and 1 of pc.ram, with these lengths and this body.
    let packet = |flags: u32, zlens: &[u32], body: &[u8]| {
        let mut h = vec![0u8; header_len(128)];
        let framed = flags == qpl.flag();
        let next = if framed {
            4 * zlens.len() + body.len()
        } else {
            body.len()
        };
        encode_header(
            &mut h,
            &HeaderFields {
                flags,
                pages_alloc: 128,
                normal_pages: 2,
                next_packet_size: next as u32,
                packet_num: 0,
                zero_pages: 0,
            },
            "pc.ram",
            &[0, PS as u64],
        );
        if framed {
            for z in zlens {
                h.extend_from_slice(&z.to_be_bytes());
            }
        }
        h.extend_from_slice(body);
        h
    };
    let raw_page = vec![7u8; PS];
    let mut two_raw = raw_page.clone();
    two_raw.extend_from_slice(&raw_page);
    // A raw first page, then 100 bytes that are not DEFLATE.
    let mut corrupt = raw_page.clone();
    corrupt.extend_from_slice(&[0xFF; 100]);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (packet(qpl.flag(), &[0, PS as u32], &raw_page), "zlen"),
        (packet(qpl.flag(), &[PS as u32, 100], &corrupt), "page 1"),
        (
            packet(Compression::None.flag(), &[], &two_raw),
            "compression",
        ),
    ];
    for (packet, want) in cases {
        let dst = dest_memory();
        let (r, addr) = receiver(&cfg().codec(CodecKind::Deflate));
        let into = dst.clone();
        let rt = std::thread::spawn(move || r.serve(ReceiveInto::Memory(into)));
        let told = fake_source(addr, qpl, packet);
        let err = rt.join().expect("receiver thread").expect_err("refused");
        let msg = err.to_string();
        eprintln!("refused: {msg}");
        assert!(
            msg.contains("post-copy background connection, packet #0"),
            "{msg}"
        );
        assert!(
            msg.to_lowercase().contains(&want.to_lowercase()),
            "{want}: {msg}"
        );
        assert_eq!(told.as_deref(), Some(msg.as_str()), "the source was told");
        let blk = dst.block(0).expect("block");
        let mut v = [0u8; 16];
        // SAFETY: the first 16 pages of the block are mapped; `v` has a byte per page.
        let rc = unsafe { libc::mincore(blk.as_ptr().cast(), 16 * PS, v.as_mut_ptr()) };
        assert_eq!(rc, 0);
        assert!(
            v.iter().all(|r| r & 1 == 0),
            "{want}: a page of the refused packet was placed: {v:?}"
        );
    }
}
