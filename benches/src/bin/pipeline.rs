//! Pipelining and zero-copy benchmark: one channel over loopback, the same pages, variants of
//! the engine's I/O settings run interleaved, each against its baseline in the same run:
//!
//! * depth 1 (compress, then send, then compress the next) vs the default depth 4;
//! * registered receive buffers (READ_FIXED) vs unregistered (RECVMSG only);
//! * SENDMSG_ZC vs SENDMSG (loopback copies the data anyway: this measures the overhead of
//!   the zero-copy path, not its benefit, which needs a real NIC).
//!
//! for codecs none and deflate. Medians of `--runs` runs.
//!
//! `cargo run --release -p pagewire-benches --bin pipeline -- [--size 128MiB] [--runs 5] [--json]`

use std::sync::Arc;
use std::time::Duration;

use pagewire::config::ZeroCopy;
use pagewire::{Block, CodecKind, GuestRam, ReceiverConfig, SenderConfig};
use pagewire_benches::{loopback_session_with, SessionRun};
use pagewire_synth::{self as synth, PageSet};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let get = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let mib: usize = get("--size").map_or(128, |s| {
        s.trim_end_matches("MiB").parse().expect("--size N[MiB]")
    });
    let runs: usize = get("--runs").map_or(5, |r| r.parse().expect("runs"));
    let json = args.iter().any(|a| a == "--json");
    let size = mib << 20;

    let src_block = Block::anonymous("pc.ram", size).expect("map");
    // SAFETY: fresh block, not shared.
    synth::fill(
        PageSet::Realistic,
        unsafe { src_block.as_mut_slice() },
        4096,
        1,
    );
    let src = Arc::new(GuestRam::new(vec![src_block]).expect("mem"));
    let dst =
        Arc::new(GuestRam::new(vec![Block::anonymous("pc.ram", size).expect("map")]).expect("mem"));
    // SAFETY: no session runs yet.
    unsafe { dst.block(0).expect("block").as_mut_slice() }.fill(1);

    let base = |codec| {
        SenderConfig::default()
            .codec(codec)
            .channels(1)
            .idle_timeout(Duration::from_secs(30))
            .zero_copy(ZeroCopy::Off)
            .depth(4)
    };
    // (name, sender, receiver registers its buffers)
    let mut variants: Vec<(String, SenderConfig, bool)> = Vec::new();
    // Each group: its baseline first, then the variants compared with it.
    let mut groups = Vec::new();
    for codec in [CodecKind::None, CodecKind::Deflate] {
        let n = codec.name();
        let start = variants.len();
        variants.push((
            format!("{n} baseline (depth 4, registered, copy)"),
            base(codec),
            true,
        ));
        for depth in [1, 2, 8] {
            variants.push((format!("{n} depth {depth}"), base(codec).depth(depth), true));
        }
        variants.push((format!("{n} unregistered"), base(codec), false));
        variants.push((
            format!("{n} zero-copy"),
            base(codec).zero_copy(ZeroCopy::On),
            true,
        ));
        groups.push(start..variants.len());
    }
    let mut results: Vec<Vec<SessionRun>> = vec![Vec::new(); variants.len()];
    for run in 0..runs {
        for (i, (name, cfg, registered)) in variants.iter().enumerate() {
            let rcfg = ReceiverConfig::for_sender(cfg).registered_buffers(*registered);
            let r = loopback_session_with(&src, &dst, cfg, rcfg);
            eprintln!("run {run} {name}: {:.3} s", r.seconds);
            results[i].push(r);
        }
    }
    // SAFETY: sessions are over.
    assert!(unsafe { src.block(0).expect("b").as_slice() == dst.block(0).expect("b").as_slice() });
    let gib = size as f64 / (1u64 << 30) as f64;
    let rows: Vec<serde_json::Value> = variants
        .iter()
        .zip(&results)
        .map(|((name, _, _), rs)| {
            let secs = median(rs.iter().map(|r| r.seconds).collect());
            serde_json::json!({
                "variant": name,
                "gbps_memory": size as f64 / secs / 1e9,
                "send_cpu_s_per_gib": median(rs.iter().map(|r| r.send_cpu / gib).collect()),
                "recv_cpu_s_per_gib": median(rs.iter().map(|r| r.recv_cpu / gib).collect()),
            })
        })
        .collect();
    if json {
        println!(
            "{}",
            serde_json::json!({"size": size, "runs": runs, "results": rows})
        );
        return;
    }
    println!("pipeline, one channel, loopback, {mib} MiB realistic mix, median of {runs} runs");
    println!(
        "{:<42} {:>9} {:>13} {:>13} {:>12}",
        "variant", "GB/s mem", "send CPU/GiB", "recv CPU/GiB", "vs baseline"
    );
    for (i, r) in rows.iter().enumerate() {
        let start = groups
            .iter()
            .find(|g| g.contains(&i))
            .map_or(0, |g| g.start);
        let base = rows[start]["gbps_memory"].as_f64().unwrap_or(1.0);
        let g = r["gbps_memory"].as_f64().unwrap_or(0.0);
        println!(
            "{:<42} {:>9.2} {:>13.2} {:>13.2} {:>11.2}x",
            r["variant"].as_str().unwrap_or(""),
            g,
            r["send_cpu_s_per_gib"].as_f64().unwrap_or(0.0),
            r["recv_cpu_s_per_gib"].as_f64().unwrap_or(0.0),
            g / base
        );
    }
}
