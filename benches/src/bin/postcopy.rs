//! Post-copy benchmark: fault latency while the background stream runs at full speed, and
//! post-copy's total time against one pre-copy round of the same memory.
//!
//! Two processes on loopback: this one is the destination (fresh anonymous memory each run),
//! a re-executed copy of this binary is the source (`--role sender`). Runs interleave
//! pre-copy (one round of every page, codec none, 1 channel) and pure post-copy (1
//! background connection + the urgent one, pages raw). In post-copy a guest thread reads
//! random pages from the moment the guest may run until every page is placed; each read
//! of a page that `mincore` shows not yet resident is a fault, timed from the guest's side
//! (the read blocks until the page is placed). The engine's own figure (fault event read →
//! page placed) is reported beside it.
//!
//! `cargo run --release -p pagewire-benches --bin postcopy -- [--size 512MiB] [--runs 5] [--json]`

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pagewire::postcopy::Latencies;
use pagewire::synth::{self, PageSet};
use pagewire::{
    Block, BlockPages, CodecKind, Config, GuestMemory, ReceiveInto, Receiver, RoundPages, Sender,
};
use pagewire_benches::{Machine, Table};
use serde::Serialize;

const PS: usize = 4096;

fn cfg() -> Config {
    Config {
        codec: CodecKind::None,
        channels: 1,
        idle_timeout: Duration::from_secs(60),
        ..Config::default()
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The source process: fill memory, connect, one pre-copy round or pure post-copy; print
/// the seconds it took (round, or switch → every page placed) on stdout.
fn sender(addr: SocketAddr, mode: &str, size: usize) {
    let block = Block::anonymous("pc.ram", size).expect("map");
    // SAFETY: fresh block, not shared.
    synth::fill(PageSet::Realistic, unsafe { block.as_mut_slice() }, PS, 1);
    let mem = Arc::new(GuestMemory::new(vec![block]).expect("mem"));
    let c = cfg();
    let mut s = Sender::connect(addr, c.clone(), mem).expect("connect");
    let secs = if mode == "precopy" {
        let st = s
            .send_round(RoundPages::all(
                &[size as u64],
                PS as u32,
                c.pages_per_packet,
            ))
            .expect("round");
        s.finish().expect("finish");
        st.seconds
    } else {
        let t = Instant::now();
        let pc = s
            .switch_to_postcopy(vec![(0, BlockPages::All)])
            .expect("switch");
        pc.finish().expect("finish");
        t.elapsed().as_secs_f64()
    };
    println!("{secs}");
}

/// One page's residency (mincore), true when present.
fn resident(addr: *mut u8) -> bool {
    let mut v = 0u8;
    // SAFETY: `addr` is page-aligned inside a mapping we own; mincore writes one byte to `v`.
    let r = unsafe { libc::mincore(addr.cast(), PS, &mut v) };
    r == 0 && v & 1 == 1
}

/// The guest: random page reads until `stop`; times the reads of pages that were missing.
fn guest(mem: Arc<GuestMemory>, stop: Arc<AtomicBool>, out: Arc<Mutex<Latencies>>) {
    let Some(b) = mem.block(0) else { return };
    let pages = (b.len() / PS) as u64;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut lat = Latencies::default();
    let mut sum = 0u64;
    while !stop.load(Ordering::Relaxed) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let Some(p) = b.range_ptr((x % pages) * PS as u64, PS) else {
            continue;
        };
        if resident(p) {
            continue;
        }
        let t = Instant::now();
        // SAFETY: inside the block; blocks until post-copy has placed the page.
        sum = sum.wrapping_add(unsafe { std::ptr::read_volatile(p) } as u64);
        lat.record(t.elapsed());
    }
    std::hint::black_box(sum);
    if let Ok(mut o) = out.lock() {
        o.extend(&lat);
    }
}

#[derive(Debug, Default)]
struct PostRun {
    secs: f64,
    guest: Latencies,
    engine: Latencies,
    requests: u64,
    faults: u64,
}

fn destination(mode: &str, size: usize, touch: bool) -> PostRun {
    let mut r = Receiver::bind("127.0.0.1:0".parse().expect("addr"), cfg()).expect("bind");
    r.set_accept_timeout(Some(Duration::from_secs(120)));
    let addr = r.local_addr().expect("addr");
    let stop = Arc::new(AtomicBool::new(false));
    let guest_lat = Arc::new(Mutex::new(Latencies::default()));
    let handle: Arc<Mutex<Option<std::thread::JoinHandle<()>>>> = Arc::default();
    {
        let (stop, out, handle) = (stop.clone(), guest_lat.clone(), handle.clone());
        r.on_postcopy(move |start| {
            if !touch {
                return;
            }
            let (stop, out, mem) = (stop.clone(), out.clone(), start.memory.clone());
            if let Ok(mut h) = handle.lock() {
                *h = Some(std::thread::spawn(move || guest(mem, stop, out)));
            }
        });
    }
    let child = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args([
            "--role",
            "sender",
            "--mode",
            mode,
            "--addr",
            &addr.to_string(),
        ])
        .arg("--size")
        .arg(format!("{}MiB", size >> 20))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn sender");
    let dst = Arc::new(
        GuestMemory::new(vec![Block::anonymous("pc.ram", size).expect("map")]).expect("mem"),
    );
    let got = r.serve(ReceiveInto::Memory(dst)).expect("serve");
    stop.store(true, Ordering::Relaxed);
    if let Some(h) = handle.lock().ok().and_then(|mut h| h.take()) {
        let _ = h.join();
    }
    let out = child.wait_with_output().expect("sender");
    assert!(out.status.success(), "sender process failed");
    let secs: f64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("sender seconds");
    let mut run = PostRun {
        secs,
        ..Default::default()
    };
    if let Some(pc) = got.postcopy {
        run.engine = pc.latency.clone();
        run.requests = pc.requests;
        run.faults = pc.faults;
        run.guest = guest_lat.lock().map(|l| l.clone()).unwrap_or_default();
    }
    run
}

#[derive(Serialize)]
struct Report {
    machine: String,
    size_mib: usize,
    runs: usize,
    precopy_round_s: f64,
    postcopy_total_s: f64,
    postcopy_over_precopy: f64,
    postcopy_idle_guest_s: f64,
    postcopy_idle_guest_over_precopy: f64,
    faults_timed_by_guest: usize,
    guest_p50_us: f64,
    guest_p99_us: f64,
    guest_max_us: f64,
    engine_faults: usize,
    engine_p50_us: f64,
    engine_p99_us: f64,
    engine_max_us: f64,
    requests: u64,
    /// Guest-timed faults per power-of-two µs bucket: [2^i, 2^(i+1)).
    guest_histogram: Vec<u64>,
    engine_histogram: Vec<u64>,
}

fn us(d: Option<Duration>) -> f64 {
    d.map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let get = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let mib: usize = get("--size").map_or(512, |s| {
        s.trim_end_matches("MiB").parse().expect("--size N[MiB]")
    });
    let size = mib << 20;
    if get("--role").as_deref() == Some("sender") {
        let addr = get("--addr").expect("--addr").parse().expect("addr");
        sender(addr, &get("--mode").expect("--mode"), size);
        return;
    }
    let runs: usize = get("--runs").map_or(5, |r| r.parse().expect("runs"));
    let json = args.iter().any(|a| a == "--json");
    let (mut pre, mut post, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let (mut idle, mut idle_ratios) = (Vec::new(), Vec::new());
    let (mut guest, mut engine) = (Latencies::default(), Latencies::default());
    let mut requests = 0;
    for i in 0..runs {
        let a = destination("precopy", size, false);
        let b = destination("postcopy", size, true);
        let c = destination("postcopy", size, false);
        if !json {
            eprintln!(
                "run {}: pre-copy round {:.3} s, post-copy {:.3} s (guest touching), {:.3} s (guest idle), {} faults timed, {} requests",
                i + 1,
                a.secs,
                b.secs,
                c.secs,
                b.guest.len(),
                b.requests
            );
        }
        pre.push(a.secs);
        post.push(b.secs);
        ratios.push(b.secs / a.secs);
        idle.push(c.secs);
        idle_ratios.push(c.secs / a.secs);
        guest.extend(&b.guest);
        engine.extend(&b.engine);
        requests += b.requests;
    }
    let report = Report {
        machine: Machine::detect().to_string(),
        size_mib: mib,
        runs,
        precopy_round_s: median(pre),
        postcopy_total_s: median(post),
        postcopy_over_precopy: median(ratios),
        postcopy_idle_guest_s: median(idle),
        postcopy_idle_guest_over_precopy: median(idle_ratios),
        faults_timed_by_guest: guest.len(),
        guest_p50_us: us(guest.percentile(50.0)),
        guest_p99_us: us(guest.percentile(99.0)),
        guest_max_us: us(guest.max()),
        engine_faults: engine.len(),
        engine_p50_us: us(engine.percentile(50.0)),
        engine_p99_us: us(engine.percentile(99.0)),
        engine_max_us: us(engine.max()),
        requests,
        guest_histogram: guest.histogram(),
        engine_histogram: engine.histogram(),
    };
    if json {
        println!("{}", serde_json::to_string(&report).expect("json"));
        return;
    }
    println!(
        "{}; {} MiB, {} runs (medians; latencies over all runs)",
        report.machine, mib, runs
    );
    let mut t = Table::new(["figure", "value"]);
    t.row([
        "pre-copy round (s)".to_string(),
        format!("{:.3}", report.precopy_round_s),
    ]);
    t.row([
        "post-copy total (s)".to_string(),
        format!("{:.3}", report.postcopy_total_s),
    ]);
    t.row([
        "post-copy / pre-copy (median of per-run ratios)".to_string(),
        format!("{:.2}", report.postcopy_over_precopy),
    ]);
    t.row([
        "faults timed by the guest".to_string(),
        report.faults_timed_by_guest.to_string(),
    ]);
    t.row([
        "guest fault latency p50 / p99 / max (µs)".to_string(),
        format!(
            "{:.0} / {:.0} / {:.0}",
            report.guest_p50_us, report.guest_p99_us, report.guest_max_us
        ),
    ]);
    t.row([
        "engine fault→placed p50 / p99 / max (µs)".to_string(),
        format!(
            "{:.0} / {:.0} / {:.0}",
            report.engine_p50_us, report.engine_p99_us, report.engine_max_us
        ),
    ]);
    t.row(["page requests".to_string(), report.requests.to_string()]);
    println!("{}", t.render());
    let mut h = Table::new(["latency (µs)", "guest faults", "engine faults"]);
    let n = report
        .guest_histogram
        .len()
        .max(report.engine_histogram.len());
    for i in 0..n {
        let lo = 1u64 << i;
        h.row([
            format!("[{lo}, {})", lo * 2),
            report
                .guest_histogram
                .get(i)
                .copied()
                .unwrap_or(0)
                .to_string(),
            report
                .engine_histogram
                .get(i)
                .copied()
                .unwrap_or(0)
                .to_string(),
        ]);
    }
    println!("{}", h.render());
}
