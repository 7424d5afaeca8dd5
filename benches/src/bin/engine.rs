//! Engine benchmark: pagewire over loopback beside baselines run in the same process on the
//! same pages, interleaved run by run.
//!
//! Baselines:
//! * `tcp-large-writes`: 4 MiB writes from one buffer: the loopback's raw TCP limit here;
//! * `writev-readv`: a plain blocking loop, writev of 128-page packets straight from guest
//!   memory, readv straight into the destination (no header, no zero detection, no codec);
//! * `copy-then-write`: how a naive implementation does it: copy 128 pages into a buffer, write
//!   it; read into a buffer, copy the pages out;
//! * `deflate-codec-only`: the sender's compression work alone, in one thread, no I/O: zero
//!   detection, the incompressible-page sample, libdeflate level 1 (what the engine's deflate
//!   sender must keep up with).
//!
//! pagewire variants: codecs none, deflate (with and without the incompressible-page skip), and
//! qpl fixed / dynamic Huffman on QPL's software path (when libqpl.so.1 loads).
//!
//! Figures: GB/s of guest memory (10^9 B/s), wire GB/s, CPU-seconds per GiB on each side
//! (thread CPU time), wire/RAM, and the heap the engine held at its peak per channel (glibc
//! `mallinfo2`, sampled every millisecond during the session, minus the heap before it; guest
//! memory is mapped, not allocated, so it is not counted). Medians of `--runs` runs.
//!
//! `cargo run --release -p pagewire-benches --bin engine -- [--size 256MiB] [--runs 5]
//!  [--set realistic|text|random|zero] [--channels N] [--only VARIANT] [--json]`

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagewire::config::{Huffman, QplSettings};
use pagewire::internals::likely_incompressible;
use pagewire::internals::thread_cpu_seconds;
use pagewire::internals::{is_zero_page, DeflateCompressor, PageCompressor};
use pagewire::{Block, CodecKind, GuestRam, SenderConfig};
use pagewire_benches::loopback_session;
use pagewire_synth::{self as synth, PageSet};

const PS: usize = 4096;
const PPP: usize = 128;

#[derive(Clone, Copy, Debug, Default)]
struct Run {
    seconds: f64,
    send_cpu: f64,
    recv_cpu: f64,
    wire: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (s, _) = l.accept().expect("accept");
    c.set_nodelay(true).expect("nodelay");
    s.set_nodelay(true).expect("nodelay");
    (c, s)
}

fn tcp_large_writes(bytes: usize) -> Run {
    let (mut tx, mut rx) = pair();
    let t0 = Instant::now();
    let r = std::thread::spawn(move || {
        let c0 = thread_cpu_seconds();
        let mut buf = vec![0u8; 4 << 20];
        let mut got = 0;
        while got < bytes {
            let n = rx.read(&mut buf).expect("read");
            assert!(n > 0, "early eof");
            got += n;
        }
        thread_cpu_seconds() - c0
    });
    let c0 = thread_cpu_seconds();
    let buf = vec![0x5Au8; 4 << 20];
    let mut sent = 0;
    while sent < bytes {
        let n = (bytes - sent).min(buf.len());
        tx.write_all(&buf[..n]).expect("write");
        sent += n;
    }
    let send_cpu = thread_cpu_seconds() - c0;
    let recv_cpu = r.join().expect("join");
    Run {
        seconds: t0.elapsed().as_secs_f64(),
        send_cpu,
        recv_cpu,
        wire: bytes as u64,
    }
}

fn writev_readv(src: &[u8], dst: &mut [u8], copy: bool) -> Run {
    let (mut tx, mut rx) = pair();
    let len = src.len();
    let dst_addr = dst.as_mut_ptr() as usize;
    let t0 = Instant::now();
    let r = std::thread::spawn(move || {
        let c0 = thread_cpu_seconds();
        // SAFETY: `dst` outlives this thread (joined below) and nothing else touches it meanwhile.
        let dst = unsafe { std::slice::from_raw_parts_mut(dst_addr as *mut u8, len) };
        let mut buf = vec![0u8; PPP * PS];
        for packet in dst.chunks_mut(PPP * PS) {
            if copy {
                // Naive: read into a buffer, then copy the pages out.
                rx.read_exact(&mut buf[..packet.len()]).expect("read");
                packet.copy_from_slice(&buf[..packet.len()]);
                continue;
            }
            let mut pages: Vec<IoSliceMut<'_>> =
                packet.chunks_mut(PS).map(IoSliceMut::new).collect();
            let mut bufs = &mut pages[..];
            while !bufs.is_empty() {
                let n = rx.read_vectored(bufs).expect("readv");
                assert!(n > 0, "early eof");
                IoSliceMut::advance_slices(&mut bufs, n);
            }
        }
        thread_cpu_seconds() - c0
    });
    let c0 = thread_cpu_seconds();
    let mut buf = vec![0u8; PPP * PS];
    for packet in src.chunks(PPP * PS) {
        if copy {
            // Naive: copy the pages into a buffer, then write it.
            buf[..packet.len()].copy_from_slice(packet);
            tx.write_all(&buf[..packet.len()]).expect("write");
            continue;
        }
        let mut pages: Vec<IoSlice<'_>> = packet.chunks(PS).map(IoSlice::new).collect();
        let mut bufs = &mut pages[..];
        while !bufs.is_empty() {
            let n = tx.write_vectored(bufs).expect("writev");
            IoSlice::advance_slices(&mut bufs, n);
        }
    }
    let send_cpu = thread_cpu_seconds() - c0;
    let recv_cpu = r.join().expect("join");
    Run {
        seconds: t0.elapsed().as_secs_f64(),
        send_cpu,
        recv_cpu,
        wire: len as u64,
    }
}

/// The sender's compression work alone (one thread, no I/O).
fn deflate_codec_only(src: &[u8]) -> Run {
    let mut c = DeflateCompressor::new(1).expect("deflate");
    let mut out = vec![0u8; PS - 1];
    let t0 = Instant::now();
    let c0 = thread_cpu_seconds();
    let mut wire = 0u64;
    for page in src.chunks(PS) {
        if is_zero_page(page) {
            continue;
        }
        wire += if likely_incompressible(page) {
            PS as u64
        } else {
            c.compress(page, &mut out).map_or(PS as u64, |n| n as u64)
        };
    }
    Run {
        seconds: t0.elapsed().as_secs_f64(),
        send_cpu: thread_cpu_seconds() - c0,
        recv_cpu: 0.0,
        wire,
    }
}

/// VmRSS and VmHWM of this process, in bytes (/proc/self/status).
fn rss_and_hwm() -> (usize, usize) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// `--memory-probe CODEC`: in this fresh process, fill both memories (so they are resident),
/// then run one session and report how far the peak resident set rose above that level: the
/// engine's own memory (buffers, rings, codec state, thread stacks), both ends, per channel.
fn memory_probe(codec: &str, channels: u16, size: usize) {
    let src_block = Block::anonymous("pc.ram", size).expect("map");
    // SAFETY: fresh block, not shared.
    synth::fill(
        PageSet::Realistic,
        unsafe { src_block.as_mut_slice() },
        PS,
        1,
    );
    let src = Arc::new(GuestRam::new(vec![src_block]).expect("mem"));
    let dst =
        Arc::new(GuestRam::new(vec![Block::anonymous("pc.ram", size).expect("map")]).expect("mem"));
    // SAFETY: no session runs yet.
    unsafe { dst.block(0).expect("block").as_mut_slice() }.fill(1);
    let kind = match codec {
        "none" => CodecKind::None,
        "qpl" => CodecKind::Qpl,
        _ => CodecKind::Deflate,
    };
    let cfg = SenderConfig::default()
        .codec(kind)
        .channels(channels)
        .idle_timeout(Duration::from_secs(60));
    let (before, _) = rss_and_hwm();
    loopback_session(&src, &dst, &cfg);
    let (_, peak) = rss_and_hwm();
    let per_channel =
        peak.saturating_sub(before) as f64 / f64::from(channels) / (1u64 << 20) as f64;
    println!(
        "{}",
        serde_json::json!({"codec": codec, "channels": channels, "peak_mib_per_channel": per_channel})
    );
}

/// Run the memory probe for `codec` in a child process.
fn probe(codec: &str, channels: u16) -> Option<f64> {
    let me = std::env::current_exe().ok()?;
    let out = std::process::Command::new(me)
        .args(["--memory-probe", codec, "--channels", &channels.to_string()])
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["peak_mib_per_channel"].as_f64()
}

fn parse_size(s: &str) -> usize {
    let s = s.trim();
    let (n, mul) = if let Some(n) = s.strip_suffix("GiB") {
        (n, 1 << 30)
    } else if let Some(n) = s.strip_suffix("MiB") {
        (n, 1 << 20)
    } else {
        (s, 1)
    };
    n.parse::<usize>().expect("size") * mul
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let get = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let size = parse_size(&get("--size").unwrap_or_else(|| "256MiB".into()));
    let runs: usize = get("--runs").map_or(5, |r| r.parse().expect("runs"));
    let channels: u16 = get("--channels").map_or(1, |r| r.parse().expect("channels"));
    let set_name = get("--set").unwrap_or_else(|| "realistic".into());
    let set = match set_name.as_str() {
        "realistic" => PageSet::Realistic,
        "text" => PageSet::Text,
        "random" => PageSet::Random,
        "zero" => PageSet::Zero,
        o => panic!("unknown --set {o}"),
    };
    let json = args.iter().any(|a| a == "--json");
    if let Some(codec) = get("--memory-probe") {
        memory_probe(&codec, channels, 64 << 20);
        return;
    }

    let src_block = Block::anonymous("pc.ram", size).expect("map");
    // SAFETY: fresh block, not shared.
    synth::fill(set, unsafe { src_block.as_mut_slice() }, PS, 1);
    let src = Arc::new(GuestRam::new(vec![src_block]).expect("mem"));
    let dst =
        Arc::new(GuestRam::new(vec![Block::anonymous("pc.ram", size).expect("map")]).expect("mem"));
    // Touch the destination once so every variant writes into resident memory.
    // SAFETY: no session runs yet.
    unsafe { dst.block(0).expect("block").as_mut_slice() }.fill(1);

    let base = |codec| {
        SenderConfig::default()
            .codec(codec)
            .channels(channels)
            .idle_timeout(Duration::from_secs(60))
    };
    let mut names: Vec<&str> = vec![
        "tcp-large-writes",
        "writev-readv",
        "copy-then-write",
        "deflate-codec-only",
        "pagewire-none",
        "pagewire-deflate",
        "pagewire-deflate-noskip",
    ];
    match qpl_sys::Qpl::load() {
        Ok(_) => names.extend(["pagewire-qpl-fixed", "pagewire-qpl-dynamic"]),
        Err(e) => eprintln!("SKIP pagewire-qpl-*: {e}"),
    }
    // `--only NAME` runs one variant (for profiling).
    if let Some(only) = get("--only") {
        names.retain(|n| *n == only);
        assert!(!names.is_empty(), "--only {only}: no such variant");
    }
    let mut results: Vec<Vec<Run>> = vec![Vec::new(); names.len()];
    for run in 0..runs {
        for (i, name) in names.iter().enumerate() {
            // SAFETY: no session runs now; the baselines only read src and only write dst.
            let (s, d) = unsafe {
                (
                    src.block(0).expect("b").as_slice(),
                    dst.block(0).expect("b").as_mut_slice(),
                )
            };
            let session = |cfg: SenderConfig| {
                let r = loopback_session(&src, &dst, &cfg);
                Run {
                    seconds: r.seconds,
                    send_cpu: r.send_cpu,
                    recv_cpu: r.recv_cpu,
                    wire: r.wire,
                }
            };
            let r = match *name {
                "tcp-large-writes" => tcp_large_writes(size),
                "writev-readv" => writev_readv(s, d, false),
                "copy-then-write" => writev_readv(s, d, true),
                "deflate-codec-only" => deflate_codec_only(s),
                "pagewire-none" => session(base(CodecKind::None)),
                "pagewire-deflate" => session(base(CodecKind::Deflate)),
                "pagewire-deflate-noskip" => {
                    session(base(CodecKind::Deflate).skip_incompressible(false))
                }
                "pagewire-qpl-fixed" => session(base(CodecKind::Qpl).qpl(QplSettings {
                    huffman: Huffman::Fixed,
                    ..QplSettings::default()
                })),
                _ => session(base(CodecKind::Qpl).qpl(QplSettings {
                    huffman: Huffman::Dynamic,
                    ..QplSettings::default()
                })),
            };
            eprintln!("run {run} {name}: {:.3} s", r.seconds);
            results[i].push(r);
        }
    }
    // SAFETY: sessions are over.
    assert!(unsafe { src.block(0).expect("b").as_slice() == dst.block(0).expect("b").as_slice() });
    // Memory per channel, each codec measured once in a fresh process.
    let mem_of = |variant: &str| -> Option<f64> {
        match variant {
            "pagewire-none" => probe("none", channels),
            "pagewire-deflate" => probe("deflate", channels),
            "pagewire-qpl-fixed" => probe("qpl", channels),
            _ => None,
        }
    };
    let memory: Vec<Option<f64>> = names.iter().map(|n| mem_of(n)).collect();

    let gib = size as f64 / (1u64 << 30) as f64;
    let rows: Vec<serde_json::Value> = names
        .iter()
        .zip(&results)
        .zip(&memory)
        .map(|((name, rs), mem)| {
            let secs = median(rs.iter().map(|r| r.seconds).collect());
            serde_json::json!({
                "variant": name,
                "gbps_memory": size as f64 / secs / 1e9,
                "gbps_wire": median(rs.iter().map(|r| r.wire as f64 / r.seconds / 1e9).collect()),
                "seconds": secs,
                "send_cpu_s_per_gib": median(rs.iter().map(|r| r.send_cpu / gib).collect()),
                "recv_cpu_s_per_gib": median(rs.iter().map(|r| r.recv_cpu / gib).collect()),
                "wire_ratio": median(rs.iter().map(|r| r.wire as f64 / size as f64).collect()),
                "memory_peak_mib_per_channel": mem,
            })
        })
        .collect();
    let base_gbps = rows[1]["gbps_memory"].as_f64().unwrap_or(1.0);
    if json {
        println!(
            "{}",
            serde_json::json!({"size": size, "runs": runs, "set": set_name, "channels": channels, "results": rows})
        );
        return;
    }
    println!(
        "engine, {channels} channel(s), loopback, {} MiB {set_name} set, median of {runs} runs",
        size >> 20
    );
    println!(
        "{:<24} {:>9} {:>9} {:>12} {:>12} {:>9} {:>11} {:>10}",
        "variant",
        "GB/s mem",
        "GB/s wire",
        "send CPU/GiB",
        "recv CPU/GiB",
        "wire/RAM",
        "mem MiB/ch",
        "vs writev"
    );
    for r in &rows {
        let g = r["gbps_memory"].as_f64().unwrap_or(0.0);
        println!(
            "{:<24} {:>9.2} {:>9.2} {:>12.2} {:>12.2} {:>9.3} {:>11.1} {:>9.2}x",
            r["variant"].as_str().unwrap_or(""),
            g,
            r["gbps_wire"].as_f64().unwrap_or(0.0),
            r["send_cpu_s_per_gib"].as_f64().unwrap_or(0.0),
            r["recv_cpu_s_per_gib"].as_f64().unwrap_or(0.0),
            r["wire_ratio"].as_f64().unwrap_or(0.0),
            r["memory_peak_mib_per_channel"].as_f64().unwrap_or(0.0),
            g / base_gbps
        );
    }
}
