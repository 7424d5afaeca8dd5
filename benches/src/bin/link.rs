//! The link benchmark: migrations of the realistic page mix through emulated links, sender
//! and receiver as two processes (the `pagewire` binary's `send` and `recv --out /dev/null`,
//! the receiver on fresh memory), codecs side by side, medians of interleaved runs.
//!
//! Each link is a network namespace made for the run (`ip netns add`), its loopback shaped
//! with `tc qdisc add dev lo root tbf rate R burst 1mbit latency 20ms` (or left unshaped), and
//! removed afterwards. Needs root, `ip` and `tc`. Also measured: `--max-bandwidth` accuracy,
//! and `pagewire demo` on its defaults against `--codec none`.
//!
//! `cargo build --release -p pagewire-examples -p pagewire-benches &&
//!  target/release/link [--size 256MiB] [--channels 2] [--runs 5] [--links 1gbit,2.5gbit,10gbit,lo]
//!  [--codecs none,deflate,auto] [--json]` (qpl joins the codecs where libqpl.so.1 loads).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use pagewire_benches::{fmt_sig, Table};
use pagewire_synth::{self as synth, PageSet};
use serde_json::{json, Value};

fn sibling(name: &str) -> PathBuf {
    let me = std::env::current_exe().expect("current_exe");
    me.with_file_name(name)
}

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

fn run_cmd(cmd: &str, args: &[&str]) -> Result<(), String> {
    let o = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

/// A network namespace with its loopback up and optionally shaped; removed on drop.
struct Link {
    ns: String,
    name: String,
}

impl Link {
    fn new(name: &str, idx: usize) -> Result<Link, String> {
        let ns = format!("pwlink{}x{idx}", std::process::id());
        run_cmd("ip", &["netns", "add", &ns])?;
        let link = Link {
            ns,
            name: name.to_string(),
        };
        run_cmd("ip", &["-n", &link.ns, "link", "set", "lo", "up"])?;
        if name != "lo" {
            run_cmd(
                "ip",
                &[
                    "netns", "exec", &link.ns, "tc", "qdisc", "add", "dev", "lo", "root", "tbf",
                    "rate", name, "burst", "1mbit", "latency", "20ms",
                ],
            )?;
        }
        Ok(link)
    }

    fn cmd(&self, bin: &Path, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(bin).args(args);
        c
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = run_cmd("ip", &["netns", "del", &self.ns]);
    }
}

fn wait_child(mut child: std::process::Child, limit: Duration) -> Result<Output, String> {
    let t = Instant::now();
    loop {
        if child.try_wait().map_err(|e| e.to_string())?.is_some() {
            return child.wait_with_output().map_err(|e| e.to_string());
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("receiver did not exit within {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One migration through `link`, with extra arguments for `send` and for `recv`: returns the
/// sender's and receiver's JSON.
fn migrate(
    bin: &Path,
    link: &Link,
    port: u16,
    image: &Path,
    channels: u16,
    codec: &str,
    (extra, recv_extra): (&[&str], &[&str]),
) -> Result<(Value, Value), String> {
    let addr = format!("127.0.0.1:{port}");
    let mut rargs = vec![
        "recv",
        "--listen",
        &addr,
        "--out",
        "/dev/null",
        "--accept-timeout",
        "30",
        "--json",
    ];
    rargs.extend_from_slice(recv_extra);
    let recv = link
        .cmd(bin, &rargs)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("recv: {e}"))?;
    let t = Instant::now();
    let send = loop {
        let ch = channels.to_string();
        let mut args = vec![
            "send",
            "--connect",
            &addr,
            "--image",
            image.to_str().ok_or("image path")?,
            "--channels",
            &ch,
            "--codec",
            codec,
            "--json",
        ];
        args.extend_from_slice(extra);
        let o = link
            .cmd(bin, &args)
            .output()
            .map_err(|e| format!("send: {e}"))?;
        let refused = String::from_utf8_lossy(&o.stderr).contains("refused");
        if o.status.success() || !refused || t.elapsed() > Duration::from_secs(10) {
            break o;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let r = wait_child(recv, Duration::from_secs(120))?;
    if !send.status.success() {
        return Err(format!(
            "send: {}",
            String::from_utf8_lossy(&send.stderr).trim()
        ));
    }
    if !r.status.success() {
        return Err(format!(
            "recv: {}",
            String::from_utf8_lossy(&r.stderr).trim()
        ));
    }
    let s: Value = serde_json::from_slice(&send.stdout).map_err(|e| format!("send json: {e}"))?;
    let rv: Value = serde_json::from_slice(&r.stdout).map_err(|e| format!("recv json: {e}"))?;
    Ok((s, rv))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let size = arg(&args, "--size", "256MiB");
    let channels: u16 = arg(&args, "--channels", "2").parse().expect("--channels");
    let runs: usize = arg(&args, "--runs", "5").parse().expect("--runs");
    let links: Vec<String> = arg(&args, "--links", "1gbit,2.5gbit,10gbit,lo")
        .split(',')
        .map(str::to_string)
        .collect();
    let mut codecs: Vec<String> = arg(&args, "--codecs", "none,deflate,auto")
        .split(',')
        .map(str::to_string)
        .collect();
    let json_out = args.iter().any(|a| a == "--json");
    let skip_demo = args.iter().any(|a| a == "--no-demo");
    let skip_cap = args.iter().any(|a| a == "--no-cap");
    if qpl_sys::Qpl::load().is_ok() && !codecs.iter().any(|c| c == "qpl") {
        codecs.push("qpl".into());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("link: needs root to make network namespaces and shape them with tc");
        std::process::exit(2);
    }
    let bin = sibling("pagewire");
    assert!(
        bin.exists(),
        "{} not found: cargo build --release -p pagewire-examples",
        bin.display()
    );
    let bytes = parse_size(&size);
    let dir = std::env::temp_dir().join(format!("pagewire-link-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let image = dir.join("guest.img");
    {
        let mut v = vec![0u8; bytes as usize];
        synth::fill(PageSet::Realistic, &mut v, 4096, 1);
        std::fs::write(&image, &v).expect("write image");
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!(
        "link: {size} realistic mix, {channels} channel(s), {runs} interleaved runs, codecs {}, load {}",
        codecs.join("/"),
        load.trim()
    );

    // (link, codec) -> samples
    let mut secs: BTreeMap<(usize, usize), Vec<f64>> = BTreeMap::new();
    let mut wire: BTreeMap<(usize, usize), Vec<f64>> = BTreeMap::new();
    let mut comp: BTreeMap<(usize, usize), Vec<f64>> = BTreeMap::new();
    let mut port = 4400u16;
    for (li, lname) in links.iter().enumerate() {
        let link = match Link::new(lname, li) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("link {lname}: cannot make it: {e}");
                continue;
            }
        };
        for run in 0..runs {
            for (ci, codec) in codecs.iter().enumerate() {
                port += 1;
                // A variant: `auto+--pages-per-packet=32` runs codec auto with extra `send`
                // arguments (each `+`-separated, `=` splitting a flag from its value).
                let mut parts = codec.split('+');
                let name = parts.next().unwrap_or("none");
                let extra: Vec<&str> = parts.flat_map(|p| p.splitn(2, '=')).collect();
                match migrate(&bin, &link, port, &image, channels, name, (&extra, &[])) {
                    Ok((s, _)) => {
                        let t = s["seconds"].as_f64().unwrap_or(f64::NAN);
                        let normal = s["pages"]["normal"].as_f64().unwrap_or(0.0).max(1.0);
                        let c = s["pages"]["compressed"].as_f64().unwrap_or(0.0);
                        eprintln!(
                            "  {} run {} {codec:>7}: {t:.3} s, wire/mem {:.3}, compressed {:.0} %",
                            link.name,
                            run + 1,
                            s["wire_ratio"].as_f64().unwrap_or(f64::NAN),
                            100.0 * c / normal
                        );
                        if let Some(why) = s["auto_choice"].as_str() {
                            eprintln!("    {why}");
                        }
                        secs.entry((li, ci)).or_default().push(t);
                        wire.entry((li, ci))
                            .or_default()
                            .push(s["wire_ratio"].as_f64().unwrap_or(f64::NAN));
                        comp.entry((li, ci)).or_default().push(100.0 * c / normal);
                    }
                    Err(e) => eprintln!("  {} run {} {codec}: FAILED: {e}", link.name, run + 1),
                }
            }
        }
    }

    let mut table = Table::new([
        "link",
        "codec",
        "median s",
        "min s",
        "max s",
        "GB/s of RAM",
        "wire/RAM",
        "compressed %",
        "vs best fixed",
    ]);
    let mut results = Vec::new();
    let mut verdicts = Vec::new();
    for (li, lname) in links.iter().enumerate() {
        let med = |ci: usize| secs.get(&(li, ci)).map(|v| median(&mut v.clone()));
        let best_fixed = codecs
            .iter()
            .enumerate()
            .filter(|(_, c)| !c.starts_with("auto"))
            .filter_map(|(ci, c)| med(ci).map(|m| (m, c.clone())))
            .min_by(|a, b| a.0.total_cmp(&b.0));
        for (ci, codec) in codecs.iter().enumerate() {
            let Some(samples) = secs.get(&(li, ci)) else {
                continue;
            };
            let mut s = samples.clone();
            let m = median(&mut s);
            let w = median(&mut wire.get(&(li, ci)).cloned().unwrap_or_default());
            let c = median(&mut comp.get(&(li, ci)).cloned().unwrap_or_default());
            let vs = best_fixed.as_ref().map(|(b, _)| m / b);
            table.row([
                lname.clone(),
                codec.clone(),
                format!("{m:.3}"),
                format!("{:.3}", s.first().copied().unwrap_or(f64::NAN)),
                format!("{:.3}", s.last().copied().unwrap_or(f64::NAN)),
                fmt_sig(bytes as f64 / m / 1e9, 3),
                format!("{w:.3}"),
                format!("{c:.0}"),
                vs.map_or("-".into(), |v| format!("{v:.2} ×")),
            ]);
            results.push(json!({
                "link": lname, "codec": codec, "median_s": m, "samples_s": s,
                "gbps": bytes as f64 / m / 1e9, "wire_ratio": w, "compressed_pct": c,
                "vs_best_fixed": vs,
            }));
            if codec.starts_with("auto") {
                if let (Some(v), Some((_, best))) = (vs, &best_fixed) {
                    verdicts.push(format!(
                        "{lname}: {codec} = {v:.2} × the best fixed codec ({best}): {}",
                        if v <= 1.05 {
                            "met (≤ 1.05)"
                        } else {
                            "NOT met (> 1.05)"
                        }
                    ));
                }
            }
        }
    }

    // --max-bandwidth accuracy on unshaped loopback, codec none (the cap, not the codec, is
    // the limit) and auto (the cap is the link: auto compresses).
    let mut cap_rows = Vec::new();
    let mut cap_table = Table::new(["cap", "codec", "median wire rate", "rate / cap"]);
    if !skip_cap {
        if let Ok(link) = Link::new("lo", 99) {
            for (cap, cap_bps) in [("800mbit", 1e8), ("2gbit", 2.5e8)] {
                for codec in ["none", "auto"] {
                    let mut rates = Vec::new();
                    for _ in 0..runs.min(3) {
                        port += 1;
                        match migrate(
                            &bin,
                            &link,
                            port,
                            &image,
                            channels,
                            codec,
                            (&["--max-bandwidth", cap], &[]),
                        ) {
                            Ok((s, _)) => {
                                // The round's own figures: from its first packet to the
                                // receiver's acknowledgement (no connection set-up).
                                let round = &s["per_round"][0];
                                let r = round["wire_bytes"].as_f64().unwrap_or(0.0)
                                    / round["seconds"].as_f64().unwrap_or(f64::NAN);
                                eprintln!("  cap {cap} {codec}: {:.1} MB/s", r / 1e6);
                                rates.push(r);
                            }
                            Err(e) => eprintln!("  cap {cap} {codec}: FAILED: {e}"),
                        }
                    }
                    let r = median(&mut rates);
                    cap_table.row([
                        cap.to_string(),
                        codec.to_string(),
                        format!("{:.1} MB/s", r / 1e6),
                        format!("{:.3}", r / cap_bps),
                    ]);
                    cap_rows.push(
                        json!({"cap": cap, "cap_bytes_per_s": cap_bps, "codec": codec,
                        "median_wire_bytes_per_s": r, "ratio": r / cap_bps, "samples": rates}),
                    );
                }
            }
        }
    }

    // The receiver's destination memory: fresh (faulted in by the first write of each page,
    // the default, like QEMU's) against populated before the first packet (recv --prealloc).
    // Codec none on unshaped loopback, where page faults weigh most.
    let mut prealloc_rows = Vec::new();
    let mut prealloc_table = Table::new(["recv", "median s", "GB/s of RAM", "recv CPU s"]);
    if !args.iter().any(|a| a == "--no-prealloc") {
        if let Ok(link) = Link::new("lo", 98) {
            let mut t: BTreeMap<&str, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
            for _ in 0..runs {
                for (label, rx) in [("fresh memory", vec![]), ("--prealloc", vec!["--prealloc"])] {
                    port += 1;
                    match migrate(&bin, &link, port, &image, channels, "none", (&[], &rx)) {
                        Ok((s, r)) => {
                            let secs = s["seconds"].as_f64().unwrap_or(f64::NAN);
                            let cpu = r["cpu_seconds"].as_f64().unwrap_or(f64::NAN);
                            eprintln!("  recv {label}: {secs:.3} s, receiver CPU {cpu:.3} s");
                            let e = t.entry(label).or_default();
                            e.0.push(secs);
                            e.1.push(cpu);
                        }
                        Err(e) => eprintln!("  recv {label}: FAILED: {e}"),
                    }
                }
            }
            for (label, (mut v, mut c)) in t {
                let m = median(&mut v);
                let cpu = median(&mut c);
                prealloc_table.row([
                    label.to_string(),
                    format!("{m:.3}"),
                    fmt_sig(bytes as f64 / m / 1e9, 3),
                    format!("{cpu:.3}"),
                ]);
                prealloc_rows.push(json!({"variant": label, "median_s": m, "samples_s": v,
                    "recv_cpu_seconds": cpu}));
            }
        }
    }

    // The demo on its defaults against --codec none (one process, loopback).
    let mut demo_rows = Vec::new();
    let mut demo_table = Table::new(["demo", "median s", "GB/s of RAM"]);
    if !skip_demo {
        let mut t: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        for _ in 0..runs {
            for (label, extra) in [
                ("default (auto)", vec![]),
                ("--codec none", vec!["--codec", "none"]),
            ] {
                let o = Command::new(&bin)
                    .args(["demo", "--size", &size, "--json"])
                    .args(&extra)
                    .output()
                    .expect("demo");
                if !o.status.success() {
                    eprintln!(
                        "demo {label}: FAILED: {}",
                        String::from_utf8_lossy(&o.stderr)
                    );
                    continue;
                }
                let v: Value = serde_json::from_slice(&o.stdout).expect("demo json");
                let s = v["sender"]["seconds"].as_f64().unwrap_or(f64::NAN);
                eprintln!("  demo {label}: {s:.3} s");
                t.entry(label).or_default().push(s);
            }
        }
        for (label, mut v) in t {
            let m = median(&mut v);
            demo_table.row([
                label.to_string(),
                format!("{m:.3}"),
                fmt_sig(bytes as f64 / m / 1e9, 3),
            ]);
            demo_rows.push(json!({"variant": label, "median_s": m, "samples_s": v}));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);

    if json_out {
        println!(
            "{}",
            json!({
                "bench": "link", "size_bytes": bytes, "channels": channels, "runs": runs,
                "load": load.trim(), "results": results, "verdicts": verdicts,
                "max_bandwidth": cap_rows, "demo": demo_rows, "prealloc": prealloc_rows,
            })
        );
    } else {
        println!(
            "link benchmark: {size} realistic mix, {channels} channel(s), medians of {runs} interleaved runs, two processes, receiver on fresh memory (recv --out /dev/null)"
        );
        print!("{}", table.render());
        for v in &verdicts {
            println!("{v}");
        }
        if !cap_rows.is_empty() {
            println!("--max-bandwidth on unshaped loopback:");
            print!("{}", cap_table.render());
        }
        if !prealloc_rows.is_empty() {
            println!("receiver memory, codec none, unshaped loopback (populate time not counted):");
            print!("{}", prealloc_table.render());
        }
        if !demo_rows.is_empty() {
            println!("pagewire demo --size {size}:");
            print!("{}", demo_table.render());
        }
    }
}

fn parse_size(s: &str) -> u64 {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n.parse().expect("--size");
    n * match unit.to_ascii_lowercase().as_str() {
        "" => 1,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        u => panic!("--size: unknown unit {u}"),
    }
}
