//! The benchmark suite: runs every benchmark binary of this crate with `--json`, prints their
//! tables, and checks pagewire's targets (issue 7 / DESIGN.md §9) as ratios measured in the
//! same runs.
//!
//! `cargo build --release -p pagewire-benches && target/release/suite [--runs 5] [--json]`
//! (QPL rows run when libqpl.so.1 loads, e.g. with `LD_LIBRARY_PATH=/opt/qpl/lib`.)

use std::path::PathBuf;
use std::process::Command;

use serde_json::{json, Value};

fn sibling(name: &str) -> PathBuf {
    let me = std::env::current_exe().expect("current_exe");
    me.with_file_name(name)
}

fn run(name: &str, args: &[&str]) -> Value {
    eprintln!("== {name} {}", args.join(" "));
    let out = Command::new(sibling(name))
        .args(args)
        .arg("--json")
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap_or_else(|e| {
            panic!("running {name}: {e} (build with cargo build --release -p pagewire-benches)")
        });
    assert!(out.status.success(), "{name} failed");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{name} --json: {e}"))
}

fn row<'a>(v: &'a Value, variant: &str) -> Option<&'a Value> {
    v["results"]
        .as_array()?
        .iter()
        .find(|r| r["variant"] == variant)
}

fn f(v: Option<&Value>, key: &str) -> Option<f64> {
    v?.get(key)?.as_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| "5".into());
    let json_out = args.iter().any(|a| a == "--json");

    let codecs = run("codecs", &["--runs", &runs]);
    let realistic = run(
        "engine",
        &["--size", "256MiB", "--runs", &runs, "--set", "realistic"],
    );
    let text = run(
        "engine",
        &["--size", "128MiB", "--runs", &runs, "--set", "text"],
    );
    let random = run(
        "engine",
        &["--size", "128MiB", "--runs", &runs, "--set", "random"],
    );
    let zero = run(
        "engine",
        &["--size", "256MiB", "--runs", &runs, "--set", "zero"],
    );
    let two = run(
        "engine",
        &[
            "--size",
            "256MiB",
            "--runs",
            &runs,
            "--set",
            "realistic",
            "--channels",
            "2",
        ],
    );
    let pipeline = run("pipeline", &["--size", "128MiB", "--runs", &runs]);

    // Targets, each a ratio measured within one run of one binary.
    let mut checks: Vec<Value> = Vec::new();
    let mut check = |name: &str, value: Option<f64>, op: &str, limit: f64, detail: String| {
        let ok = value.map(|v| if op == "<=" { v <= limit } else { v >= limit });
        checks.push(json!({"target": name, "value": value, "op": op, "limit": limit, "met": ok, "detail": detail}));
    };
    let none = row(&realistic, "pagewire-none");
    let tcp = row(&realistic, "tcp-large-writes");
    check(
        "none, 1 channel: wire rate / raw loopback TCP",
        f(none, "gbps_wire")
            .zip(f(tcp, "gbps_wire"))
            .map(|(a, b)| a / b),
        ">=",
        1.0,
        format!(
            "{:?} vs {:?} GB/s",
            f(none, "gbps_wire"),
            f(tcp, "gbps_wire")
        ),
    );
    check(
        "none, 1 channel: sender CPU-s/GiB",
        f(none, "send_cpu_s_per_gib"),
        "<=",
        0.15,
        String::new(),
    );
    check(
        "none, 1 channel: receiver CPU-s/GiB",
        f(none, "recv_cpu_s_per_gib"),
        "<=",
        0.12,
        String::new(),
    );
    let qf = row(&realistic, "pagewire-qpl-fixed");
    check(
        "qpl (QEMU's settings), sender + receiver CPU-s/GiB",
        f(qf, "send_cpu_s_per_gib")
            .zip(f(qf, "recv_cpu_s_per_gib"))
            .map(|(a, b)| a + b),
        "<=",
        2.2,
        "QEMU multifd-qpl: 2.84".into(),
    );
    check(
        "qpl dynamic Huffman: wire/RAM",
        f(row(&realistic, "pagewire-qpl-dynamic"), "wire_ratio"),
        "<=",
        0.23,
        String::new(),
    );
    check(
        "deflate: wire/RAM",
        f(row(&realistic, "pagewire-deflate"), "wire_ratio"),
        "<=",
        0.23,
        String::new(),
    );
    let de = row(&realistic, "pagewire-deflate");
    let only = row(&realistic, "deflate-codec-only");
    check(
        "deflate, 1 channel: engine throughput / codec-only throughput",
        f(de, "gbps_memory")
            .zip(f(only, "gbps_memory"))
            .map(|(a, b)| a / b),
        ">=",
        0.85,
        format!(
            "{:?} vs {:?} GB/s of memory",
            f(de, "gbps_memory"),
            f(only, "gbps_memory")
        ),
    );
    let rs = row(&random, "pagewire-deflate");
    let rn = row(&random, "pagewire-deflate-noskip");
    check(
        "random set: sender CPU with the incompressible skip / without",
        f(rs, "send_cpu_s_per_gib")
            .zip(f(rn, "send_cpu_s_per_gib"))
            .map(|(a, b)| a / b),
        "<=",
        0.3,
        String::new(),
    );
    let ws = f(row(&realistic, "pagewire-deflate"), "wire_ratio");
    let wn = f(row(&realistic, "pagewire-deflate-noskip"), "wire_ratio");
    check(
        "realistic set: wire/RAM with the skip / without (≤ 1 % worse)",
        ws.zip(wn).map(|(a, b)| a / b),
        "<=",
        1.01,
        String::new(),
    );
    let mem = ["pagewire-none", "pagewire-deflate", "pagewire-qpl-fixed"]
        .iter()
        .filter_map(|v| f(row(&realistic, v), "memory_peak_mib_per_channel"))
        .fold(0.0f64, f64::max);
    check(
        "peak memory per channel (MiB, both ends)",
        Some(mem),
        "<=",
        64.0,
        String::new(),
    );

    if json_out {
        println!(
            "{}",
            json!({
                "codecs": codecs, "engine_realistic": realistic, "engine_text": text,
                "engine_random": random, "engine_zero": zero, "engine_two_channels": two,
                "pipeline": pipeline, "targets": checks,
            })
        );
        return;
    }
    for (title, v) in [
        ("realistic", &realistic),
        ("text", &text),
        ("random", &random),
        ("zero", &zero),
        ("realistic, 2 channels", &two),
    ] {
        println!(
            "\nengine, {title} ({} MiB, {} channel(s), median of {runs})",
            v["size"].as_u64().unwrap_or(0) >> 20,
            v["channels"]
        );
        println!(
            "{:<24} {:>9} {:>9} {:>12} {:>12} {:>9} {:>10}",
            "variant",
            "GB/s mem",
            "GB/s wire",
            "send CPU/GiB",
            "recv CPU/GiB",
            "wire/RAM",
            "mem MiB/ch"
        );
        for r in v["results"].as_array().into_iter().flatten() {
            println!(
                "{:<24} {:>9.2} {:>9.2} {:>12.2} {:>12.2} {:>9.3} {:>10.1}",
                r["variant"].as_str().unwrap_or(""),
                r["gbps_memory"].as_f64().unwrap_or(0.0),
                r["gbps_wire"].as_f64().unwrap_or(0.0),
                r["send_cpu_s_per_gib"].as_f64().unwrap_or(0.0),
                r["recv_cpu_s_per_gib"].as_f64().unwrap_or(0.0),
                r["wire_ratio"].as_f64().unwrap_or(0.0),
                r["memory_peak_mib_per_channel"].as_f64().unwrap_or(0.0),
            );
        }
    }
    println!("\npipeline (median of {runs})");
    for r in pipeline["results"].as_array().into_iter().flatten() {
        println!(
            "{:<42} {:>9.2} GB/s {:>8.2} send CPU/GiB {:>8.2} recv CPU/GiB",
            r["variant"].as_str().unwrap_or(""),
            r["gbps_memory"].as_f64().unwrap_or(0.0),
            r["send_cpu_s_per_gib"].as_f64().unwrap_or(0.0),
            r["recv_cpu_s_per_gib"].as_f64().unwrap_or(0.0)
        );
    }
    println!("\ntargets");
    for c in &checks {
        let met = match c["met"].as_bool() {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not measured",
        };
        println!(
            "{:<66} {:>8} {} {:<6} {:<12} {}",
            c["target"].as_str().unwrap_or(""),
            c["value"]
                .as_f64()
                .map_or("-".into(), |v| format!("{v:.3}")),
            c["op"].as_str().unwrap_or(""),
            c["limit"],
            met,
            c["detail"].as_str().unwrap_or("")
        );
    }
}
