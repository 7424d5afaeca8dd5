//! Sparse-guest benchmark (issue 16): a large image holding little data, against the same data
//! dense, each moved by two `pagewire` processes (`recv` on fresh memory, `send --image`) over
//! loopback with `--codec none --channels 2`.
//!
//! Images: the realistic synthetic page mix (`pagewire_synth`, `PageSet::Realistic`), `--data`
//! bytes of it; "sparse" is a `--size` file whose data sits in four equal pieces spread over it
//! (the rest holes), "dense" a file of just that data. Per run and case: wall time from
//! starting `send` to both processes' exit, the sender's own session seconds (`--json`), user +
//! system CPU seconds and peak resident memory (ru_maxrss from wait4) of each process.
//! Cases run interleaved; medians over `--runs`. With `--baseline PATH` (another build of the
//! `pagewire` binary, e.g. main's) the same cases also run with it, side by side.
//!
//! `cargo build --release -p pagewire-benches -p pagewire-examples &&
//!  target/release/sparse [--size 16GiB] [--data 256MiB] [--runs 5] [--dir /tmp]
//!  [--bin target/release/pagewire] [--baseline PATH] [--baseline-cases dense,sparse] [--json]`
//!
//! The image files are deleted at the end (the sparse one uses only `--data` of disk).

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pagewire_synth::{fill, PageSet};
use serde_json::{json, Value};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn size(s: &str) -> u64 {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("bad size {s}"));
    n * match unit.to_ascii_lowercase().as_str() {
        "" => 1,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        "tib" | "t" => 1 << 40,
        u => panic!("unknown unit {u}"),
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Whether something listens on 127.0.0.1:`port` (from /proc, without connecting: a probe
/// connection would be taken for a session's control connection).
fn listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    std::fs::read_to_string("/proc/net/tcp").is_ok_and(|t| {
        t.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
        })
    })
}

/// A finished child: exit status, CPU seconds (user + system), peak RSS in bytes, stdout.
struct Done {
    ok: bool,
    cpu: f64,
    maxrss: u64,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

/// Wait for `child` with wait4 (its own rusage), after draining its pipes on threads.
fn reap(mut child: Child) -> Done {
    let out = child.stdout.take();
    let err = child.stderr.take();
    let read = |p: Option<std::process::ChildStdout>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut p) = p {
                let _ = std::io::Read::read_to_end(&mut p, &mut v);
            }
            v
        })
    };
    let out = read(out);
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(mut p) = err {
            let _ = std::io::Read::read_to_end(&mut p, &mut v);
        }
        v
    });
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is a plain C struct; all-zero is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our own child, not yet waited for (std's Child is not used to wait);
    // status and ru are valid to write.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    assert_eq!(rc, pid, "wait4: {}", std::io::Error::last_os_error());
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    Done {
        ok: std::process::ExitStatus::from_raw(status).success(),
        cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
        maxrss: ru.ru_maxrss as u64 * 1024,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

#[derive(Clone, Debug, Default)]
struct Run {
    wall: f64,
    session: f64,
    send_cpu: f64,
    recv_cpu: f64,
    send_rss: u64,
    recv_rss: u64,
    unread: u64,
    left_out: u64,
}

fn one(bin: &Path, image: &Path) -> Run {
    let port = free_port();
    let recv = Command::new(bin)
        .args(["recv", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--accept-timeout", "60", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn recv");
    let t = Instant::now();
    while !listening(port) {
        assert!(t.elapsed() < Duration::from_secs(20), "recv did not listen");
        std::thread::sleep(Duration::from_millis(5));
    }
    let t0 = Instant::now();
    let send = Command::new(bin)
        .args(["send", "--connect", &format!("127.0.0.1:{port}"), "--image"])
        .arg(image)
        .args(["--codec", "none", "--channels", "2", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn send");
    let s = reap(send);
    let r = reap(recv);
    let wall = t0.elapsed().as_secs_f64();
    assert!(
        s.ok && r.ok,
        "send/recv failed: {} {}",
        String::from_utf8_lossy(&s.stderr),
        String::from_utf8_lossy(&r.stderr)
    );
    let sj: Value = serde_json::from_slice(&s.stdout).expect("send --json");
    Run {
        wall,
        session: sj["seconds"].as_f64().unwrap_or(0.0),
        send_cpu: s.cpu,
        recv_cpu: r.cpu,
        send_rss: s.maxrss,
        recv_rss: r.maxrss,
        unread: sj["pages"]["zero_unread"].as_u64().unwrap_or(0),
        left_out: sj["pages"]["left_out"].as_u64().unwrap_or(0),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn write_images(dir: &Path, total: u64, data: u64) -> (PathBuf, PathBuf) {
    let mut buf = vec![0u8; data as usize];
    fill(PageSet::Realistic, &mut buf, 4096, 16);
    let dense = dir.join("pagewire-bench-dense.img");
    let sparse = dir.join("pagewire-bench-sparse.img");
    std::fs::write(&dense, &buf).expect("write dense image");
    let f = File::create(&sparse).expect("create sparse image");
    f.set_len(total).expect("size sparse image");
    // Four pieces, spread evenly over the image (aligned to 2 MiB).
    let piece = data / 4;
    let stride = (total / 4) & !((2 << 20) - 1);
    for i in 0..4u64 {
        let at = i * stride + stride / 2;
        let at = at & !((2 << 20) - 1);
        let chunk = &buf[(i * piece) as usize..((i + 1) * piece) as usize];
        f.write_all_at(chunk, at).expect("write piece");
    }
    f.sync_all().expect("sync");
    (dense, sparse)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(dir) = arg(&args, "--write-images-only") {
        // A child process writes the images: the generator's 256 MiB buffer must not count
        // in this process's peak RSS, which the children spawned later inherit as their
        // starting ru_maxrss (exec keeps the maximum of the old address space's high-water mark).
        let total = size(&arg(&args, "--size").unwrap_or_else(|| "16GiB".into()));
        let data = size(&arg(&args, "--data").unwrap_or_else(|| "256MiB".into()));
        write_images(Path::new(&dir), total, data);
        return;
    }
    let total = size(&arg(&args, "--size").unwrap_or_else(|| "16GiB".into()));
    let data = size(&arg(&args, "--data").unwrap_or_else(|| "256MiB".into()));
    let runs: usize = arg(&args, "--runs").map_or(5, |r| r.parse().expect("--runs"));
    let dir = PathBuf::from(arg(&args, "--dir").unwrap_or_else(|| "/tmp".into()));
    let me = std::env::current_exe().expect("current_exe");
    let bin = arg(&args, "--bin").map_or_else(|| me.with_file_name("pagewire"), PathBuf::from);
    let baseline = arg(&args, "--baseline").map(PathBuf::from);
    // Which cases the baseline runs (its sparse case reads the whole image: slow, and its
    // resident memory grows by the image's size).
    let baseline_cases = arg(&args, "--baseline-cases").unwrap_or_else(|| "dense,sparse".into());
    let json_out = args.iter().any(|a| a == "--json");
    assert!(
        bin.exists(),
        "{} missing: cargo build --release -p pagewire-examples",
        bin.display()
    );

    let st = Command::new(&me)
        .arg("--write-images-only")
        .arg(&dir)
        .args(["--size", &total.to_string(), "--data", &data.to_string()])
        .status()
        .expect("image writer");
    assert!(st.success(), "writing the images failed");
    let dense = dir.join("pagewire-bench-dense.img");
    let sparse = dir.join("pagewire-bench-sparse.img");
    let mut bins = vec![("pagewire", bin)];
    if let Some(b) = baseline {
        bins.push(("baseline", b));
    }
    let cases = [("dense", &dense), ("sparse", &sparse)];
    let mut results: Vec<Vec<Run>> = vec![Vec::new(); bins.len() * cases.len()];
    for run in 0..runs {
        for (bi, (bname, b)) in bins.iter().enumerate() {
            for (ci, (cname, img)) in cases.iter().enumerate() {
                if *bname == "baseline" && !baseline_cases.split(',').any(|c| c == *cname) {
                    continue;
                }
                let r = one(b, img);
                eprintln!(
                    "run {run} {bname} {cname}: wall {:.3} s, session {:.3} s, cpu {:.2}+{:.2} s, rss {}+{} MiB",
                    r.wall,
                    r.session,
                    r.send_cpu,
                    r.recv_cpu,
                    r.send_rss >> 20,
                    r.recv_rss >> 20
                );
                results[bi * cases.len() + ci].push(r);
            }
        }
    }
    let _ = std::fs::remove_file(&dense);
    let _ = std::fs::remove_file(&sparse);

    let mut rows = Vec::new();
    for (bi, (bname, _)) in bins.iter().enumerate() {
        for (ci, (cname, _)) in cases.iter().enumerate() {
            let rs = &results[bi * cases.len() + ci];
            if rs.is_empty() {
                continue;
            }
            let m = |f: &dyn Fn(&Run) -> f64| median(rs.iter().map(f).collect());
            rows.push(json!({
                "binary": bname,
                "case": cname,
                "image_bytes": if *cname == "sparse" { total } else { data },
                "data_bytes": data,
                "runs": rs.len(),
                "wall_seconds": m(&|r| r.wall),
                "session_seconds": m(&|r| r.session),
                "sender_cpu_seconds": m(&|r| r.send_cpu),
                "receiver_cpu_seconds": m(&|r| r.recv_cpu),
                "sender_peak_rss_bytes": m(&|r| r.send_rss as f64),
                "receiver_peak_rss_bytes": m(&|r| r.recv_rss as f64),
                "pages_zero_unread": m(&|r| r.unread as f64),
                "pages_left_out": m(&|r| r.left_out as f64),
            }));
        }
    }
    let get = |b: &str, c: &str, k: &str| {
        rows.iter()
            .find(|r| r["binary"] == b && r["case"] == c)
            .and_then(|r| r[k].as_f64())
    };
    let ratio = match (
        get("pagewire", "sparse", "wall_seconds"),
        get("pagewire", "dense", "wall_seconds"),
    ) {
        (Some(s), Some(d)) if d > 0.0 => s / d,
        _ => 0.0,
    };
    if json_out {
        println!(
            "{}",
            json!({ "bench": "sparse", "size": total, "data": data, "results": rows,
                    "sparse_over_dense_wall": ratio })
        );
        return;
    }
    println!(
        "sparse guest: {} MiB image with {} MiB of realistic data vs the data alone (dense); send/recv --codec none --channels 2, loopback, medians of {runs} interleaved runs",
        total >> 20,
        data >> 20
    );
    println!(
        "  {:<9} {:<7} {:>8} {:>9} {:>9} {:>9} {:>10} {:>10} {:>10} {:>10}",
        "binary",
        "case",
        "wall s",
        "session s",
        "send CPU",
        "recv CPU",
        "send RSS",
        "recv RSS",
        "unread",
        "left out"
    );
    for r in &rows {
        println!(
            "  {:<9} {:<7} {:>8.3} {:>9.3} {:>9.2} {:>9.2} {:>6.0} MiB {:>6.0} MiB {:>10} {:>10}",
            r["binary"].as_str().unwrap_or(""),
            r["case"].as_str().unwrap_or(""),
            r["wall_seconds"].as_f64().unwrap_or(0.0),
            r["session_seconds"].as_f64().unwrap_or(0.0),
            r["sender_cpu_seconds"].as_f64().unwrap_or(0.0),
            r["receiver_cpu_seconds"].as_f64().unwrap_or(0.0),
            r["sender_peak_rss_bytes"].as_f64().unwrap_or(0.0) / (1u64 << 20) as f64,
            r["receiver_peak_rss_bytes"].as_f64().unwrap_or(0.0) / (1u64 << 20) as f64,
            r["pages_zero_unread"].as_f64().unwrap_or(0.0),
            r["pages_left_out"].as_f64().unwrap_or(0.0),
        );
    }
    println!("  sparse / dense wall time (pagewire): {ratio:.2} (target <= 2)");
}
