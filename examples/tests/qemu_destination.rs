//! A real QEMU destination accepts pagewire's channel streams (issue 11).
//!
//! The test records a stopped QEMU source's migration (multifd, 2 channels) to get QEMU's own
//! main migration stream, records `pagewire send` of a 64 MiB `pc.ram` image with the same
//! SYNC count, then replays QEMU's main stream beside pagewire's channel streams into a fresh
//! QEMU destination at several timings (the main stream late, the channels late) and checks
//! that the migration completes with the destination's RAM equal to pagewire's image. A
//! negative control replays the same streams without the opening SYNC (pagewire's cadence
//! before this change) and expects the destination to die in at least one timing where the
//! channels run ahead.
//!
//! Needs `qemu-system-x86_64` 9.2 or later (`.ci/run` installs it from Debian's backports);
//! skips with a visible message without it. Codec `none` only: the deflate and qpl codecs use
//! QEMU's qpl framing, which a QEMU built without QPL (Debian's) refuses to configure.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::{make_image, BIN};

const QEMU: &str = "qemu-system-x86_64";
const MIB: usize = 64;
const UUID: &str = "5a8e3c2b-1f4d-4c6a-9b7e-0123456789ab";
const PPP: usize = 128;

/// `Some(reason)` when this machine cannot run the test.
fn unavailable() -> Option<String> {
    let out = match Command::new(QEMU).arg("--version").output() {
        Ok(o) => o,
        Err(e) => return Some(format!("{QEMU} not found ({e})")),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text
        .split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .unwrap_or("");
    let mut it = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    if (major, minor) < (9, 2) {
        return Some(format!("{QEMU} {version} is older than 9.2"));
    }
    if !Path::new("/dev/null").exists() {
        return Some("no /dev/null".into());
    }
    None
}

/// A QEMU process with a QMP connection.
struct Qemu {
    child: Child,
    qmp: BufReader<UnixStream>,
}

impl Qemu {
    fn start(dir: &Path, name: &str, extra: &[&str]) -> Qemu {
        let sock = dir.join(format!("{name}.qmp"));
        let mem = format!("{MIB}M");
        let qmp_arg = format!("unix:{},server=on,wait=off", sock.display());
        let mut args = vec![
            "-machine",
            "pc,accel=tcg",
            "-m",
            &mem,
            "-nodefaults",
            "-display",
            "none",
            "-S",
            "-uuid",
            UUID,
            "-qmp",
            &qmp_arg,
        ];
        args.extend_from_slice(extra);
        let child = Command::new(QEMU)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start qemu");
        let t = Instant::now();
        let stream = loop {
            match UnixStream::connect(&sock) {
                Ok(s) => break s,
                Err(_) if t.elapsed() < Duration::from_secs(20) => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => panic!("qmp socket {}: {e}", sock.display()),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut q = Qemu {
            child,
            qmp: BufReader::new(stream),
        };
        let mut greeting = String::new();
        q.qmp.read_line(&mut greeting).expect("qmp greeting");
        q.cmd("qmp_capabilities", json!({}));
        q
    }

    /// Run a QMP command; `Err` with QEMU's error, or when QEMU is gone.
    fn try_cmd(&mut self, name: &str, args: Value) -> Result<Value, String> {
        let line = json!({"execute": name, "arguments": args}).to_string() + "\n";
        self.qmp
            .get_mut()
            .write_all(line.as_bytes())
            .map_err(|e| e.to_string())?;
        loop {
            let mut l = String::new();
            if self.qmp.read_line(&mut l).map_err(|e| e.to_string())? == 0 {
                return Err("qmp closed".into());
            }
            let v: Value = serde_json::from_str(&l).map_err(|e| e.to_string())?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(e.to_string());
            }
        }
    }

    fn cmd(&mut self, name: &str, args: Value) -> Value {
        self.try_cmd(name, args)
            .unwrap_or_else(|e| panic!("qmp {name}: {e}"))
    }

    fn multifd(&mut self, channels: usize) {
        self.cmd(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "multifd", "state": true}]}),
        );
        self.cmd(
            "migrate-set-parameters",
            json!({"multifd-channels": channels}),
        );
    }

    /// Poll the migration status until it is final or QEMU is gone (`None`).
    fn wait_migration(&mut self, limit: Duration) -> Option<String> {
        let t = Instant::now();
        while t.elapsed() < limit {
            if self.child.try_wait().ok().flatten().is_some() {
                return None;
            }
            let st = self.try_cmd("query-migrate", json!({})).ok()?;
            let s = st["status"].as_str().unwrap_or("").to_string();
            if s == "completed" || s == "failed" {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Some("timeout".into())
    }

    /// Quit and return how the process ended (`Some(signal)` if killed by one).
    fn quit(mut self) -> Option<i32> {
        let _ = self.try_cmd("quit", json!({}));
        let t = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return std::os::unix::process::ExitStatusExt::signal(&st);
            }
            if t.elapsed() > Duration::from_secs(10) {
                let _ = self.child.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn read_all(mut s: TcpStream) -> Vec<u8> {
    let mut v = Vec::new();
    let _ = s.read_to_end(&mut v);
    v
}

/// A stopped QEMU source migrates into a recorder: (main stream, channel streams).
fn record_qemu(dir: &Path) -> (Vec<u8>, Vec<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let rec = std::thread::spawn(move || {
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (s, _) = listener.accept().expect("accept");
                std::thread::spawn(move || read_all(s))
            })
            .collect();
        readers
            .into_iter()
            .map(|h| h.join().expect("reader"))
            .collect::<Vec<_>>()
    });
    let mut src = Qemu::start(dir, "src", &[]);
    src.multifd(2);
    src.cmd("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    let st = src.wait_migration(Duration::from_secs(60));
    assert_eq!(st.as_deref(), Some("completed"), "source migration");
    src.quit();
    let streams = rec.join().expect("recorder");
    let main = streams
        .iter()
        .find(|s| s.starts_with(b"QEVM"))
        .expect("main stream")
        .clone();
    let chans = streams
        .into_iter()
        .filter(|s| s.starts_with(&[0x11, 0x22, 0x33, 0x44]))
        .collect();
    (main, chans)
}

/// Packet kinds of a channel stream: 'S' SYNC, 'D' data (QEMU's SYNCs have pages_alloc 0).
fn cadence(stream: &[u8]) -> String {
    let be32 = |at: usize| u32::from_be_bytes(stream[at..at + 4].try_into().expect("4"));
    let mut at = 64;
    let mut out = String::new();
    while at + 24 <= stream.len() {
        out.push(if be32(at + 8) & 1 != 0 { 'S' } else { 'D' });
        at += 320 + 8 * PPP + be32(at + 20) as usize;
    }
    out
}

/// `pagewire send` of `image` as `pc.ram` into a recorder that speaks the control protocol;
/// returns the channel streams (QEMU's `-uuid` in their init packets, by `--vm-uuid`).
fn record_pagewire(image: &Path, rounds: u32) -> Vec<Vec<u8>> {
    let (port, rec) = common::recorder();
    let out = Command::new(BIN)
        .args(["send", "--connect", &format!("127.0.0.1:{port}")])
        .args([
            "--image",
            image.to_str().expect("utf8"),
            "--block-name",
            "pc.ram",
        ])
        .args(["--channels", "2", "--codec", "none", "--cpus", "off"])
        .args(["--rounds", &rounds.to_string(), "--dirty-fraction", "0"])
        // QEMU's destination refuses a channel whose uuid is not its own -uuid.
        .args(["--vm-uuid", UUID])
        .output()
        .expect("pagewire send");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want: Vec<u8> = (0..16)
        .map(|i| {
            let hex = UUID.replace('-', "");
            u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex")
        })
        .collect();
    let (hello, streams) = rec.join().expect("recorder");
    assert!(hello.opening_sync, "the hello announces the opening SYNC");
    for s in &streams {
        assert_eq!(&s[8..24], &want[..], "--vm-uuid in the init packet");
    }
    streams
}

/// The stream as pagewire sent it before the opening SYNC: the SYNC after the init packet
/// moved to the end (the same count, so only the order differs).
fn without_opening_sync(s: &[u8]) -> Vec<u8> {
    let hl = 320 + 8 * PPP;
    assert_eq!(&s[64 + 8..64 + 12], &[0, 0, 0, 1], "starts with a SYNC");
    [&s[..64], &s[64 + hl..], &s[64..64 + hl]].concat()
}

struct Outcome {
    status: Option<String>,
    signal: Option<i32>,
    ram_equal: Option<bool>,
    stderr: String,
}

/// Replay `main` and `chans` into a fresh destination, the main stream starting after
/// `main_delay` (and trickled in 64 KiB pieces), the channels after `chan_delay`.
fn replay(
    dir: &Path,
    main: &[u8],
    chans: &[Vec<u8>],
    main_delay: Duration,
    chan_delay: Duration,
    image: &[u8],
) -> Outcome {
    let mut dst = Qemu::start(dir, "dst", &["-incoming", "defer"]);
    dst.multifd(chans.len());
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    dst.cmd(
        "migrate-incoming",
        json!({"uri": format!("tcp:127.0.0.1:{port}")}),
    );
    let connect = move || {
        let t = Instant::now();
        loop {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => return Some(s),
                Err(_) if t.elapsed() < Duration::from_secs(10) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(_) => return None,
            }
        }
    };
    let mut senders = Vec::new();
    let m = main.to_vec();
    senders.push(std::thread::spawn(move || {
        std::thread::sleep(main_delay);
        if let Some(mut s) = connect() {
            for piece in m.chunks(64 << 10) {
                if s.write_all(piece).is_err() {
                    return;
                }
            }
            let _ = s.shutdown(Shutdown::Write);
            let _ = read_all(s);
        }
    }));
    for c in chans {
        let c = c.clone();
        senders.push(std::thread::spawn(move || {
            std::thread::sleep(chan_delay);
            if let Some(mut s) = connect() {
                let _ = s.write_all(&c);
                let _ = s.shutdown(Shutdown::Write);
                let _ = read_all(s);
            }
        }));
    }
    let status = dst.wait_migration(Duration::from_secs(60));
    let mut ram_equal = None;
    if status.as_deref() == Some("completed") {
        let dump = dir.join("dst.mem");
        dst.cmd(
            "pmemsave",
            json!({"val": 0, "size": MIB << 20, "filename": dump.to_str().expect("utf8")}),
        );
        let got = std::fs::read(&dump).expect("dump");
        // 0xA0000..0x100000 is the legacy VGA window and the BIOS/option ROM area: guest
        // physical reads there do not reach pc.ram.
        let (lo, hi) = (0xA0000, 0x100000);
        ram_equal =
            Some(got.len() == image.len() && got[..lo] == image[..lo] && got[hi..] == image[hi..]);
    }
    let stderr_pipe = dst.child.stderr.take();
    let signal = dst.quit();
    // QEMU has exited (or been killed) by now: its stderr is complete.
    let mut stderr = String::new();
    if let Some(mut e) = stderr_pipe {
        let _ = e.read_to_string(&mut stderr);
    }
    for s in senders {
        let _ = s.join();
    }
    Outcome {
        status,
        signal,
        ram_equal,
        stderr,
    }
}

#[test]
fn qemu_destination_accepts_pagewire_streams_at_any_timing() {
    if let Some(why) = unavailable() {
        eprintln!("SKIP qemu_destination_accepts_pagewire_streams_at_any_timing: {why}");
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let dir: PathBuf = tmp.path().to_path_buf();
    let (main, qemu_chans) = record_qemu(&dir);
    assert_eq!(qemu_chans.len(), 2);
    // QEMU's own cadence for a stopped guest: setup SYNC, the pass, completion SYNC.
    let qemu_syncs: Vec<usize> = qemu_chans
        .iter()
        .map(|c| {
            let k = cadence(c);
            assert!(
                k.starts_with("SD") && k.ends_with("SS"),
                "QEMU's cadence: {k}"
            );
            k.matches('S').count()
        })
        .collect();
    let syncs = qemu_syncs[0];
    assert!(qemu_syncs.iter().all(|&n| n == syncs));

    let image_path = dir.join("pc.ram.img");
    make_image(&image_path, MIB << 20, 11);
    let image = std::fs::read(&image_path).expect("image");
    // rounds + 1 SYNCs per channel: as many rounds as QEMU's flushes after setup.
    let chans = record_pagewire(&image_path, (syncs - 1) as u32);
    for c in &chans {
        let k = cadence(c);
        assert!(k.starts_with("SD"), "opening SYNC, then data: {k}");
        assert_eq!(k.matches('S').count(), syncs, "{k}");
    }

    let timings = [(0, 0), (300, 0), (1000, 0), (0, 300), (2000, 0)];
    for (main_ms, chan_ms) in timings {
        let o = replay(
            &dir,
            &main,
            &chans,
            Duration::from_millis(main_ms),
            Duration::from_millis(chan_ms),
            &image,
        );
        assert_eq!(
            (o.status.as_deref(), o.ram_equal),
            (Some("completed"), Some(true)),
            "main +{main_ms} ms, channels +{chan_ms} ms: signal {:?}, stderr: {}",
            o.signal,
            o.stderr
        );
    }

    // Negative control: without the opening SYNC, a destination whose main stream lags the
    // channels dies (QEMU's received-pages bitmap does not exist yet).
    let old: Vec<Vec<u8>> = chans.iter().map(|c| without_opening_sync(c)).collect();
    let mut died = 0;
    for (main_ms, chan_ms) in [(1000, 0), (2000, 0)] {
        let o = replay(
            &dir,
            &main,
            &old,
            Duration::from_millis(main_ms),
            Duration::from_millis(chan_ms),
            &image,
        );
        if o.status.as_deref() != Some("completed") {
            died += 1;
        }
    }
    assert!(
        died > 0,
        "the old cadence never failed: this test no longer tells the two apart"
    );
}
