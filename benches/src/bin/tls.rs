//! TLS benchmark: what encryption costs pagewire.
//!
//! 1. `aead`: the record layer's own work per core — copy a record's plaintext from 4 KiB
//!    pages into the send buffer and seal it in place (the sender), open in place (the
//!    receiver) — for each AEAD of TLS 1.3, 4 KiB and 16 KiB records, with aws-lc-rs (what
//!    pagewire uses) and, built with `--features ring`, ring: the provider comparison.
//! 2. `migrate`: whole migrations between two `pagewire` processes (`recv` on fresh memory,
//!    `send` of a realistic image file), TLS against clear text on the same image, codecs
//!    none and deflate, 1 and 2 channels, plus 4 KiB records: GB/s of memory (the sender's
//!    session time) and CPU-seconds per GiB of each process (user + system, from wait4).
//!    Variants are interleaved run by run; medians of `--runs`.
//!
//! `cargo build --release -p pagewire-examples -p pagewire-benches [--features ring]
//!  && target/release/tls [--size 512MiB] [--runs 3] [--only aead|migrate] [--filter deflate]
//!  [--json]` (`--filter`: only the migration variants whose name contains it)

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pagewire::internals::thread_cpu_seconds;
use pagewire_benches::{fmt_gbps, print_json, Machine, Table};
use pagewire_synth::{self as synth, PageSet};
use serde_json::{json, Value};

const PS: usize = 4096;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Copy-and-seal then open, record by record, over `src` with one provider's AEAD API
/// (ring and aws-lc-rs share it). Returns (seal GB/s, open GB/s) per core (thread CPU).
macro_rules! aead_bench {
    ($aead:path, $alg:expr, $src:expr, $record:expr, $runs:expr) => {{
        use $aead as a;
        let key = a::LessSafeKey::new(
            a::UnboundKey::new($alg, &[7u8; 32][..$alg.key_len()]).expect("key"),
        );
        let src: &[u8] = $src;
        let record: usize = $record;
        let nrec = src.len().div_ceil(record);
        let mut wire = vec![0u8; src.len() + nrec * 22];
        let mut seal = Vec::new();
        let mut open = Vec::new();
        for _ in 0..$runs {
            let c0 = thread_cpu_seconds();
            let mut pos = 0usize;
            for (i, chunk) in src.chunks(record).enumerate() {
                let hdr = [23u8, 3, 3, 0, 0];
                let rec = &mut wire[pos..pos + chunk.len() + 22];
                rec[..5].copy_from_slice(&hdr);
                rec[5..5 + chunk.len()].copy_from_slice(chunk);
                rec[5 + chunk.len()] = 23;
                let mut n = [0u8; 12];
                n[4..].copy_from_slice(&(i as u64).to_be_bytes());
                let (body, tag_out) = rec[5..].split_at_mut(chunk.len() + 1);
                let tag = key
                    .seal_in_place_separate_tag(
                        a::Nonce::assume_unique_for_key(n),
                        a::Aad::from(hdr),
                        body,
                    )
                    .expect("seal");
                tag_out.copy_from_slice(tag.as_ref());
                pos += chunk.len() + 22;
            }
            seal.push(src.len() as f64 / (thread_cpu_seconds() - c0) / 1e9);
            let c0 = thread_cpu_seconds();
            let mut pos = 0usize;
            for (i, chunk) in src.chunks(record).enumerate() {
                let len = chunk.len() + 22;
                let rec = &mut wire[pos..pos + len];
                let mut n = [0u8; 12];
                n[4..].copy_from_slice(&(i as u64).to_be_bytes());
                let hdr = [23u8, 3, 3, 0, 0];
                let plain = key
                    .open_in_place(
                        a::Nonce::assume_unique_for_key(n),
                        a::Aad::from(hdr),
                        &mut rec[5..],
                    )
                    .expect("open");
                std::hint::black_box(&plain);
                pos += len;
            }
            open.push(src.len() as f64 / (thread_cpu_seconds() - c0) / 1e9);
        }
        (median(seal), median(open))
    }};
}

fn aead(runs: usize) -> Vec<Value> {
    let mut src = vec![0u8; 128 << 20];
    synth::fill(PageSet::Realistic, &mut src, PS, 3);
    // memcpy of the same bytes: the floor of a copy-then-encrypt pass.
    let mut dst = vec![0u8; src.len()];
    let mut mc = Vec::new();
    for _ in 0..runs {
        let c0 = thread_cpu_seconds();
        dst.copy_from_slice(&src);
        std::hint::black_box(&dst);
        mc.push(src.len() as f64 / (thread_cpu_seconds() - c0) / 1e9);
    }
    let mut rows = vec![json!({"provider": "-", "aead": "memcpy", "record": 0,
        "seal_gbps": median(mc), "open_gbps": Value::Null})];
    for record in [4096usize, 16384] {
        #[cfg(feature = "ring")]
        {
            let algs: [(&str, &'static ring::aead::Algorithm); 3] = [
                ("AES-128-GCM", &ring::aead::AES_128_GCM),
                ("AES-256-GCM", &ring::aead::AES_256_GCM),
                ("CHACHA20-POLY1305", &ring::aead::CHACHA20_POLY1305),
            ];
            for (name, alg) in algs {
                let (s, o) = aead_bench!(ring::aead, alg, &src, record, runs);
                rows.push(json!({"provider": "ring", "aead": name, "record": record, "seal_gbps": s, "open_gbps": o}));
            }
        }
        {
            let algs: [(&str, &'static aws_lc_rs::aead::Algorithm); 3] = [
                ("AES-128-GCM", &aws_lc_rs::aead::AES_128_GCM),
                ("AES-256-GCM", &aws_lc_rs::aead::AES_256_GCM),
                ("CHACHA20-POLY1305", &aws_lc_rs::aead::CHACHA20_POLY1305),
            ];
            for (name, alg) in algs {
                let (s, o) = aead_bench!(aws_lc_rs::aead, alg, &src, record, runs);
                rows.push(json!({"provider": "aws-lc-rs", "aead": name, "record": record, "seal_gbps": s, "open_gbps": o}));
            }
        }
    }
    rows
}

fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .expect("current_exe")
        .with_file_name(name)
}

/// Whether something listens on 127.0.0.1:`port` (from /proc, without connecting).
fn listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    std::fs::read_to_string("/proc/net/tcp").is_ok_and(|t| {
        t.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
        })
    })
}

/// Wait for a child and return its exit success and CPU seconds (user + system).
fn wait_cpu(child: std::process::Child) -> (bool, f64) {
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is a plain C struct; all-zero is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; status and ru are valid for writes.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    std::mem::forget(child); // reaped by wait4
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (
        r == pid && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        secs(ru.ru_utime) + secs(ru.ru_stime),
    )
}

#[derive(Clone, Debug)]
struct Variant {
    name: String,
    codec: &'static str,
    channels: u16,
    tls: bool,
    record: usize,
}

struct Sample {
    gbps: f64,
    send_cpu: f64,
    recv_cpu: f64,
}

fn migrate_once(v: &Variant, img: &Path, certs: &Path, size: u64) -> Sample {
    let bin = sibling("pagewire");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let tls: Vec<String> = if v.tls {
        vec![
            "--tls-dir".into(),
            certs.display().to_string(),
            "--tls-record-size".into(),
            v.record.to_string(),
        ]
    } else {
        Vec::new()
    };
    let recv = Command::new(&bin)
        .args(["recv", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--accept-timeout", "30", "--cpus", "off", "--json"])
        .args(&tls)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (cargo build --release -p pagewire-examples)",
                bin.display()
            )
        });
    let t = Instant::now();
    while !listening(port) {
        assert!(t.elapsed() < Duration::from_secs(20), "recv did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
    let send = Command::new(&bin)
        .args(["send", "--connect", &format!("localhost:{port}")])
        .args(["--image", &img.display().to_string()])
        .args(["--codec", v.codec, "--channels", &v.channels.to_string()])
        .args(["--cpus", "off", "--json"])
        .args(&tls)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn send");
    let out = {
        use std::io::Read;
        let mut s = String::new();
        let mut send = send;
        if let Some(mut o) = send.stdout.take() {
            let _ = o.read_to_string(&mut s);
        }
        let (ok, cpu) = wait_cpu(send);
        assert!(ok, "send failed ({})", v.name);
        (s, cpu)
    };
    let (ok, recv_cpu) = wait_cpu(recv);
    assert!(ok, "recv failed ({})", v.name);
    let j: Value = serde_json::from_str(&out.0).expect("send --json");
    let secs = j["seconds"].as_f64().expect("seconds");
    let gib = size as f64 / (1u64 << 30) as f64;
    Sample {
        gbps: size as f64 / secs / 1e9,
        send_cpu: out.1 / gib,
        recv_cpu: recv_cpu / gib,
    }
}

fn migrate(size: u64, runs: usize, filter: Option<&str>) -> Vec<Value> {
    let dir = std::env::temp_dir().join(format!("pagewire-tls-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let certs = dir.join("certs");
    pagewire::tls::generate(&certs, &Default::default()).expect("certs");
    let img = dir.join("guest.img");
    {
        let mut buf = vec![0u8; size as usize];
        synth::fill(PageSet::Realistic, &mut buf, PS, 1);
        std::fs::write(&img, &buf).expect("image");
    }
    let mut variants = Vec::new();
    for codec in ["none", "deflate"] {
        for channels in [1u16, 2] {
            for tls in [false, true] {
                variants.push(Variant {
                    name: format!("{codec} x{channels} {}", if tls { "tls" } else { "clear" }),
                    codec,
                    channels,
                    tls,
                    record: 16384,
                });
            }
        }
    }
    variants.push(Variant {
        name: "none x1 tls 4KiB-records".into(),
        codec: "none",
        channels: 1,
        tls: true,
        record: 4096,
    });
    if let Some(f) = filter {
        variants.retain(|v| v.name.contains(f));
    }
    let mut samples: Vec<Vec<Sample>> = variants.iter().map(|_| Vec::new()).collect();
    for run in 0..runs {
        for (i, v) in variants.iter().enumerate() {
            eprintln!("run {}/{runs}: {}", run + 1, v.name);
            samples[i].push(migrate_once(v, &img, &certs, size));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    variants
        .iter()
        .zip(samples)
        .map(|(v, s)| {
            json!({
                "variant": v.name, "codec": v.codec, "channels": v.channels, "tls": v.tls,
                "record": v.record,
                "gbps": median(s.iter().map(|x| x.gbps).collect()),
                "send_cpu_s_per_gib": median(s.iter().map(|x| x.send_cpu).collect()),
                "recv_cpu_s_per_gib": median(s.iter().map(|x| x.recv_cpu).collect()),
                "runs": s.len(),
            })
        })
        .collect()
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs: usize = arg(&args, "--runs")
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let size = arg(&args, "--size")
        .map(|s| {
            let s = s.trim();
            let (n, mul) = if let Some(n) = s.strip_suffix("GiB") {
                (n, 1u64 << 30)
            } else if let Some(n) = s.strip_suffix("MiB") {
                (n, 1 << 20)
            } else {
                (s, 1)
            };
            n.parse::<u64>().expect("--size") * mul
        })
        .unwrap_or(512 << 20);
    let only = arg(&args, "--only");
    let json_out = args.iter().any(|a| a == "--json");
    let machine = Machine::detect();
    let aead_rows = if only.as_deref().is_none_or(|o| o == "aead") {
        aead(runs.max(3))
    } else {
        Vec::new()
    };
    let mig_rows = if only.as_deref().is_none_or(|o| o == "migrate") {
        migrate(size, runs, arg(&args, "--filter").as_deref())
    } else {
        Vec::new()
    };
    if json_out {
        print_json(
            &json!({"machine": machine.to_string(), "aead": aead_rows, "migrate": mig_rows}),
        );
        return;
    }
    println!("{machine}");
    if !aead_rows.is_empty() {
        let mut t = Table::new(["provider", "AEAD", "record", "copy+seal GB/s", "open GB/s"]);
        for r in &aead_rows {
            t.row([
                r["provider"].as_str().unwrap_or("").to_string(),
                r["aead"].as_str().unwrap_or("").to_string(),
                r["record"].to_string(),
                fmt_gbps(r["seal_gbps"].as_f64().unwrap_or(0.0)),
                r["open_gbps"].as_f64().map(fmt_gbps).unwrap_or_default(),
            ]);
        }
        println!(
            "\nrecord layer per core (thread CPU), 128 MiB of realistic pages\n{}",
            t.render()
        );
    }
    if !mig_rows.is_empty() {
        let mut t = Table::new([
            "variant",
            "GB/s",
            "vs clear",
            "send CPU-s/GiB",
            "recv CPU-s/GiB",
        ]);
        for r in &mig_rows {
            let base = mig_rows.iter().find(|b| {
                b["codec"] == r["codec"] && b["channels"] == r["channels"] && b["tls"] == false
            });
            let ratio = base
                .and_then(|b| Some(r["gbps"].as_f64()? / b["gbps"].as_f64()?))
                .map(|x| format!("{x:.2}"))
                .unwrap_or_default();
            t.row([
                r["variant"].as_str().unwrap_or("").to_string(),
                fmt_gbps(r["gbps"].as_f64().unwrap_or(0.0)),
                ratio,
                format!("{:.2}", r["send_cpu_s_per_gib"].as_f64().unwrap_or(0.0)),
                format!("{:.2}", r["recv_cpu_s_per_gib"].as_f64().unwrap_or(0.0)),
            ]);
        }
        println!(
            "\nmigrations between two processes, {} MiB realistic image, receiver on fresh memory, medians of {runs}\n{}",
            size >> 20,
            t.render()
        );
    }
}
