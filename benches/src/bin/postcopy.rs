//! Post-copy benchmark: fault latency while the background stream runs at full speed, and
//! post-copy's total time against one pre-copy round of the same memory.
//!
//! Two processes on loopback: this one is the destination (fresh anonymous memory each run),
//! a re-executed copy of this binary is the source (`--role sender`). Runs interleave
//! pre-copy (one round of every page, codec none, 1 channel) and pure post-copy (1
//! background connection + the urgent one, pages raw), each run starting with a different
//! variant. In post-copy a guest thread reads
//! random pages from the moment the guest may run until every page is placed; each read
//! of a page that `mincore` shows not yet resident is a fault, timed from the guest's side
//! (the read blocks until the page is placed). The engine's own figure (fault event read →
//! page placed) is reported beside it.
//!
//! `--cpus F:B` places post-copy's fault path on CPU F and its background stream on CPU B in
//! both processes (`postcopy_cpus`), and pre-copy's channels on B too (the bulk stream of
//! both modes on the same CPU); `--guest-cpu G` pins the guest thread.
//!
//! `--codec auto --cap 50MB/s` runs both modes with that codec under that cap (post-copy's
//! background stream compresses where it pays; urgent answers stay raw).
//!
//! `cargo run --release -p pagewire-benches --bin postcopy -- [--size 512MiB] [--runs 5] [--cpus F:B] [--guest-cpu G] [--codec C] [--cap RATE] [--json]`

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pagewire::config::{Pinning, PostcopyCpus};
use pagewire::Latencies;
use pagewire::{
    Block, BlockPages, CodecKind, GuestRam, ReceiveInto, Receiver, ReceiverConfig, RoundPages,
    Sender, SenderConfig,
};
use pagewire_benches::{Machine, Table};
use pagewire_synth::{self as synth, PageSet};
use serde::Serialize;

const PS: usize = 4096;

/// `--cpus F:B`: (fault path, background) CPUs.
static CPUS: std::sync::OnceLock<Option<(usize, usize)>> = std::sync::OnceLock::new();
/// `--codec C` and `--cap RATE` (both modes; default none, no cap).
static LINK: std::sync::OnceLock<(CodecKind, Option<pagewire::Rate>)> = std::sync::OnceLock::new();
/// The options the source process takes as this one was given them (`--codec`, `--cap`,
/// `--cpus`).
static SOURCE_ARGS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
/// `--guest-cpu G`.
static GUEST_CPU: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();

fn placement() -> Option<(PostcopyCpus, Pinning)> {
    CPUS.get().copied().flatten().map(|(f, b)| {
        (
            PostcopyCpus {
                fault_path: vec![f],
                background: vec![b],
            },
            Pinning::Cpus(vec![b]),
        )
    })
}

fn cfg() -> SenderConfig {
    let (codec, cap) = LINK.get().copied().unwrap_or((CodecKind::None, None));
    let c = SenderConfig::default()
        .codec(codec)
        .max_bandwidth(cap)
        .channels(1)
        .idle_timeout(Duration::from_secs(60));
    match placement() {
        Some((cpus, pinning)) => c.postcopy_cpus(cpus).pinning(pinning),
        None => c,
    }
}

fn receiver_cfg() -> ReceiverConfig {
    let c = ReceiverConfig::for_sender(&cfg());
    match placement() {
        Some((cpus, pinning)) => c.postcopy_cpus(cpus).pinning(pinning),
        None => c,
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
    let mem = Arc::new(GuestRam::new(vec![block]).expect("mem"));
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
/// `pause` between reads (zero: back to back, a guest doing nothing but touch memory).
fn guest(mem: Arc<GuestRam>, stop: Arc<AtomicBool>, pause: Duration, out: Arc<Mutex<Latencies>>) {
    let Some(b) = mem.block(0) else { return };
    let pages = (b.len() / PS) as u64;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut lat = Latencies::default();
    let mut sum = 0u64;
    if let Some(c) = GUEST_CPU.get().copied().flatten() {
        pagewire::internals::pin_current_thread(c).expect("pin the guest");
    }
    while !stop.load(Ordering::Relaxed) {
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
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
struct Run {
    secs: f64,
    guest: Latencies,
    engine: Latencies,
    requests: u64,
}

/// One session: this process receives into fresh memory, a child process sends. `guest`:
/// post-copy with a guest thread reading with that pause (None: no guest thread).
fn destination(mode: &str, size: usize, guest_pause: Option<Duration>) -> Run {
    let mut r = Receiver::bind("127.0.0.1:0".parse().expect("addr"), receiver_cfg()).expect("bind");
    r.set_accept_timeout(Some(Duration::from_secs(120)));
    let addr = r.local_addr().expect("addr");
    let stop = Arc::new(AtomicBool::new(false));
    let guest_lat = Arc::new(Mutex::new(Latencies::default()));
    let handle: Arc<Mutex<Option<std::thread::JoinHandle<()>>>> = Arc::default();
    if let Some(pause) = guest_pause {
        let (stop, out, handle) = (stop.clone(), guest_lat.clone(), handle.clone());
        r.on_postcopy(move |start| {
            let (stop, out, mem) = (stop.clone(), out.clone(), start.memory.clone());
            if let Ok(mut h) = handle.lock() {
                *h = Some(std::thread::spawn(move || guest(mem, stop, pause, out)));
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
        .args(SOURCE_ARGS.get().map(|v| v.as_slice()).unwrap_or_default())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn sender");
    let dst =
        Arc::new(GuestRam::new(vec![Block::anonymous("pc.ram", size).expect("map")]).expect("mem"));
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
    let mut run = Run {
        secs,
        ..Default::default()
    };
    if let Some(pc) = got.postcopy {
        run.engine = pc.latency.clone();
        run.requests = pc.requests;
        run.guest = guest_lat.lock().map(|l| l.clone()).unwrap_or_default();
    }
    run
}

#[derive(Serialize)]
struct Variant {
    name: &'static str,
    /// Median seconds (pre-copy: the round; post-copy: switch → every page placed).
    seconds: f64,
    /// Median of per-run ratios against the pre-copy round of the same run.
    over_precopy: f64,
    requests: u64,
    guest_faults: usize,
    guest_p50_us: f64,
    guest_p99_us: f64,
    guest_max_us: f64,
    engine_p50_us: f64,
    engine_p99_us: f64,
    engine_max_us: f64,
    /// Guest-timed faults per power-of-two µs bucket: entry i counts [2^i, 2^(i+1)) µs.
    guest_histogram: Vec<u64>,
    engine_histogram: Vec<u64>,
}

#[derive(Serialize)]
struct Report {
    machine: String,
    size_mib: usize,
    /// `--cpus F:B` as given (fault path, background).
    cpus: Option<String>,
    /// `--guest-cpu`.
    guest_cpu: Option<usize>,
    /// `--codec`.
    codec: String,
    /// `--cap`.
    cap: Option<String>,
    runs: usize,
    variants: Vec<Variant>,
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
    let _ = CPUS.set(get("--cpus").map(|s| {
        let (f, b) = s.split_once(':').expect("--cpus F:B");
        (
            f.parse().expect("--cpus F:B"),
            b.parse().expect("--cpus F:B"),
        )
    }));
    let _ = GUEST_CPU.set(get("--guest-cpu").map(|g| g.parse().expect("--guest-cpu N")));
    let codec: CodecKind = get("--codec").map_or(CodecKind::None, |c| c.parse().expect("--codec"));
    let cap: Option<pagewire::Rate> = get("--cap").map(|r| r.parse().expect("--cap RATE"));
    let _ = LINK.set((codec, cap));
    let _ = SOURCE_ARGS.set(
        ["--codec", "--cap", "--cpus"]
            .into_iter()
            .filter_map(|name| get(name).map(|v| [name.to_string(), v]))
            .flatten()
            .collect(),
    );
    if get("--role").as_deref() == Some("sender") {
        let addr = get("--addr").expect("--addr").parse().expect("addr");
        sender(addr, &get("--mode").expect("--mode"), size);
        return;
    }
    let runs: usize = get("--runs").map_or(5, |r| r.parse().expect("runs"));
    let json = args.iter().any(|a| a == "--json");
    // (name, mode, guest pause)
    let plan: [(&'static str, &str, Option<Duration>); 4] = [
        ("pre-copy, one round", "precopy", None),
        ("post-copy, no guest", "postcopy", None),
        (
            "post-copy, guest reads a page every 1 ms",
            "postcopy",
            Some(Duration::from_millis(1)),
        ),
        (
            "post-copy, guest reads pages back to back",
            "postcopy",
            Some(Duration::ZERO),
        ),
    ];
    let mut results: Vec<Vec<Run>> = plan.iter().map(|_| Vec::new()).collect();
    for i in 0..runs {
        let mut line = format!("run {}:", i + 1);
        // Each run starts with a different variant, so no variant always follows another.
        for j in 0..plan.len() {
            let k = (i + j) % plan.len();
            let Some((name, mode, pause)) = plan.get(k) else {
                continue;
            };
            let r = destination(mode, size, *pause);
            line += &format!(" {name} {:.3} s;", r.secs);
            if let Some(v) = results.get_mut(k) {
                v.push(r);
            }
        }
        if !json {
            eprintln!("{line}");
        }
    }
    let pre: Vec<f64> = results
        .first()
        .map(|v| v.iter().map(|r| r.secs).collect())
        .unwrap_or_default();
    let variants: Vec<Variant> = plan
        .iter()
        .zip(&results)
        .map(|((name, _, _), rs)| {
            let (mut g, mut e) = (Latencies::default(), Latencies::default());
            for r in rs {
                g.extend(&r.guest);
                e.extend(&r.engine);
            }
            let ratios = rs.iter().zip(&pre).map(|(r, p)| r.secs / p).collect();
            Variant {
                name,
                seconds: median(rs.iter().map(|r| r.secs).collect()),
                over_precopy: median(ratios),
                requests: rs.iter().map(|r| r.requests).sum(),
                guest_faults: g.len(),
                guest_p50_us: us(g.percentile(50.0)),
                guest_p99_us: us(g.percentile(99.0)),
                guest_max_us: us(g.max()),
                engine_p50_us: us(e.percentile(50.0)),
                engine_p99_us: us(e.percentile(99.0)),
                engine_max_us: us(e.max()),
                guest_histogram: g.histogram(),
                engine_histogram: e.histogram(),
            }
        })
        .collect();
    let report = Report {
        machine: Machine::detect().to_string(),
        size_mib: mib,
        cpus: get("--cpus"),
        codec: codec.name().to_string(),
        cap: get("--cap"),
        guest_cpu: GUEST_CPU.get().copied().flatten(),
        runs,
        variants,
    };
    if json {
        println!("{}", serde_json::to_string(&report).expect("json"));
        return;
    }
    println!(
        "{}; {} MiB, codec {}{}, {} runs interleaved (seconds: medians; latencies: over all runs){}",
        report.machine,
        mib,
        report.codec,
        report.cap.as_ref().map_or(String::new(), |c| format!(" capped at {c}")),
        runs,
        match (
            CPUS.get().copied().flatten(),
            GUEST_CPU.get().copied().flatten()
        ) {
            (Some((f, b)), g) => format!(
                "; fault path on CPU {f}, background and pre-copy channels on CPU {b}{}",
                g.map_or(String::new(), |g| format!(", guest on CPU {g}"))
            ),
            (None, Some(g)) => format!("; guest on CPU {g}"),
            (None, None) => String::new(),
        }
    );
    let mut t = Table::new([
        "variant",
        "s",
        "/ pre-copy",
        "requests",
        "guest faults",
        "guest p50/p99/max µs",
        "engine p50/p99/max µs",
    ]);
    for v in &report.variants {
        t.row([
            v.name.to_string(),
            format!("{:.3}", v.seconds),
            format!("{:.2}", v.over_precopy),
            v.requests.to_string(),
            v.guest_faults.to_string(),
            format!(
                "{:.0} / {:.0} / {:.0}",
                v.guest_p50_us, v.guest_p99_us, v.guest_max_us
            ),
            format!(
                "{:.0} / {:.0} / {:.0}",
                v.engine_p50_us, v.engine_p99_us, v.engine_max_us
            ),
        ]);
    }
    println!("{}", t.render());
    for v in report.variants.iter().filter(|v| v.guest_faults > 0) {
        println!("\nfault latency histogram, {}", v.name);
        let mut h = Table::new(["µs", "guest-timed", "engine-timed"]);
        let n = v.guest_histogram.len().max(v.engine_histogram.len());
        for i in 0..n {
            let lo = 1u64 << i;
            h.row([
                format!("[{lo}, {})", lo * 2),
                v.guest_histogram.get(i).copied().unwrap_or(0).to_string(),
                v.engine_histogram.get(i).copied().unwrap_or(0).to_string(),
            ]);
        }
        println!("{}", h.render());
    }
}
