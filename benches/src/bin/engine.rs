//! Engine benchmark: one channel over loopback, pagewire (codecs none and deflate) beside
//! baselines run in the same process on the same pages, interleaved run by run:
//!
//! * `tcp-large-writes`: 4 MiB writes from one buffer, the loopback's raw TCP limit here;
//! * `writev-readv`: a plain blocking loop, writev of 128-page packets straight from guest
//!   memory, readv straight into the destination (no headers, no zero detection, no codec).
//!
//! Figures: GB/s of guest memory (10^9 B/s), CPU-seconds per GiB on each side (thread CPU
//! time), wire bytes / memory bytes. Each the median of `--runs` runs.
//!
//! `cargo run --release -p pagewire-benches --bin engine -- [--size 256MiB] [--runs 5] [--json]`
//! (QPL variants run when libqpl.so.1 loads, e.g. with `LD_LIBRARY_PATH=/opt/qpl/lib`.)

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagewire::accel::qpl::{Huffman, QplSettings};
use pagewire::stats::thread_cpu_seconds;
use pagewire::synth::{self, PageSet};
use pagewire::{Block, CodecKind, Config, GuestMemory, ReceiveInto, Receiver, RoundPages, Sender};

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
    if v.is_empty() {
        return 0.0;
    }
    v[v.len() / 2]
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

fn writev_readv(src: &[u8], dst: &mut [u8]) -> Run {
    let (mut tx, mut rx) = pair();
    let len = src.len();
    let dst_addr = dst.as_mut_ptr() as usize;
    let t0 = Instant::now();
    let r = std::thread::spawn(move || {
        let c0 = thread_cpu_seconds();
        // SAFETY: `dst` outlives this thread (joined below) and nothing else touches it meanwhile.
        let dst = unsafe { std::slice::from_raw_parts_mut(dst_addr as *mut u8, len) };
        for packet in dst.chunks_mut(PPP * PS) {
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
    for packet in src.chunks(PPP * PS) {
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

fn pagewire_run(
    src: &Arc<GuestMemory>,
    dst: &Arc<GuestMemory>,
    codec: CodecKind,
    huffman: Huffman,
) -> Run {
    let qpl = QplSettings {
        huffman,
        ..QplSettings::default()
    };
    let cfg = Config {
        codec,
        qpl,
        channels: 1,
        idle_timeout: Duration::from_secs(30),
        ..Config::default()
    };
    let mut r = Receiver::bind("127.0.0.1:0".parse().expect("addr"), cfg.clone()).expect("bind");
    r.set_accept_timeout(Some(Duration::from_secs(30)));
    let addr = r.local_addr().expect("addr");
    let d = dst.clone();
    let rt = std::thread::spawn(move || r.serve(ReceiveInto::Memory(d)));
    let sizes: Vec<u64> = src.blocks().iter().map(|b| b.len() as u64).collect();
    let mut s = Sender::connect(addr, cfg.clone(), src.clone()).expect("connect");
    let round = s
        .send_round(RoundPages::all(&sizes, cfg.page_size, cfg.pages_per_packet))
        .expect("round");
    s.finish().expect("finish");
    let got = rt.join().expect("join").expect("serve");
    Run {
        seconds: round.seconds,
        send_cpu: round.total.cpu_seconds,
        recv_cpu: got.stats.total.cpu_seconds,
        wire: round.total.wire_bytes,
    }
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
    let json = args.iter().any(|a| a == "--json");

    let src_block = Block::anonymous("pc.ram", size).expect("map");
    // SAFETY: fresh block, not shared.
    synth::fill(
        PageSet::Realistic,
        unsafe { src_block.as_mut_slice() },
        PS,
        1,
    );
    let src = Arc::new(GuestMemory::new(vec![src_block]).expect("mem"));
    let dst = Arc::new(
        GuestMemory::new(vec![Block::anonymous("pc.ram", size).expect("map")]).expect("mem"),
    );
    // Touch the destination once so every variant writes into resident memory.
    // SAFETY: no session runs yet.
    unsafe { dst.block(0).expect("block").as_mut_slice() }.fill(1);

    let mut names = vec![
        "tcp-large-writes",
        "writev-readv",
        "pagewire-none",
        "pagewire-deflate",
    ];
    match qpl_sys::Qpl::load() {
        Ok(_) => names.extend(["pagewire-qpl-fixed", "pagewire-qpl-dynamic"]),
        Err(e) => eprintln!("SKIP pagewire-qpl-*: {e}"),
    }
    let mut results: Vec<Vec<Run>> = vec![Vec::new(); names.len()];
    for run in 0..runs {
        for (i, name) in names.iter().enumerate() {
            let r = match *name {
                "tcp-large-writes" => tcp_large_writes(size),
                "writev-readv" => {
                    // SAFETY: no session runs; src is only read, dst only written here.
                    let (s, d) = unsafe {
                        (
                            src.block(0).expect("b").as_slice(),
                            dst.block(0).expect("b").as_mut_slice(),
                        )
                    };
                    let r = writev_readv(s, d);
                    assert!(s == d, "writev-readv baseline corrupted data");
                    r
                }
                "pagewire-none" => pagewire_run(&src, &dst, CodecKind::None, Huffman::Fixed),
                "pagewire-deflate" => pagewire_run(&src, &dst, CodecKind::Deflate, Huffman::Fixed),
                "pagewire-qpl-fixed" => pagewire_run(&src, &dst, CodecKind::Qpl, Huffman::Fixed),
                _ => pagewire_run(&src, &dst, CodecKind::Qpl, Huffman::Dynamic),
            };
            eprintln!("run {run} {name}: {:.3} s", r.seconds);
            results[i].push(r);
        }
    }
    // SAFETY: sessions are over.
    assert!(unsafe { src.block(0).expect("b").as_slice() == dst.block(0).expect("b").as_slice() });

    let gib = size as f64 / (1u64 << 30) as f64;
    let rows: Vec<serde_json::Value> = names
        .iter()
        .zip(&results)
        .map(|(name, rs)| {
            let secs = median(rs.iter().map(|r| r.seconds).collect());
            serde_json::json!({
                "variant": name,
                "gbps_memory": size as f64 / secs / 1e9,
                "gbps_wire": median(rs.iter().map(|r| r.wire as f64 / r.seconds / 1e9).collect()),
                "seconds": secs,
                "send_cpu_s_per_gib": median(rs.iter().map(|r| r.send_cpu / gib).collect()),
                "recv_cpu_s_per_gib": median(rs.iter().map(|r| r.recv_cpu / gib).collect()),
                "wire_ratio": median(rs.iter().map(|r| r.wire as f64 / size as f64).collect()),
            })
        })
        .collect();
    let base = rows[1]["gbps_memory"].as_f64().unwrap_or(1.0);
    if json {
        println!(
            "{}",
            serde_json::json!({"size": size, "runs": runs, "results": rows})
        );
        return;
    }
    println!(
        "engine, one channel, loopback, {} MiB realistic mix, median of {runs} runs",
        size >> 20
    );
    println!(
        "{:<18} {:>10} {:>10} {:>12} {:>12} {:>10} {:>12}",
        "variant", "GB/s mem", "GB/s wire", "send CPU/GiB", "recv CPU/GiB", "wire/RAM", "vs writev"
    );
    for r in &rows {
        let g = r["gbps_memory"].as_f64().unwrap_or(0.0);
        println!(
            "{:<18} {:>10.2} {:>10.2} {:>12.2} {:>12.2} {:>10.3} {:>11.2}x",
            r["variant"].as_str().unwrap_or(""),
            g,
            r["gbps_wire"].as_f64().unwrap_or(0.0),
            r["send_cpu_s_per_gib"].as_f64().unwrap_or(0.0),
            r["recv_cpu_s_per_gib"].as_f64().unwrap_or(0.0),
            r["wire_ratio"].as_f64().unwrap_or(0.0),
            g / base
        );
    }
}
