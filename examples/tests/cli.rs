//! The `pagewire` binary as an operator runs it: real processes over loopback.

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pagewire_transport::control::{self, Hello, Message};
use pagewire_transport::wire::{self, BlockSpec, Compression, HeaderFields, InitPacket};

mod common;
use common::{free_port, listening, make_image, wait_output, BIN};

fn spawn_recv(port: u16, extra: &[&str]) -> std::process::Child {
    let child = Command::new(BIN)
        .args([
            "recv",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--accept-timeout",
            "30",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn recv");
    let t = Instant::now();
    while !listening(port) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "recv did not start listening"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn send_recv_identical(codec: &str) -> serde_json::Value {
    send_recv_identical_on(codec, 1)
}

/// Send a 256 MiB image through `send`/`recv` with `channels` channels; OUT must equal IMG.
fn send_recv_identical_on(codec: &str, channels: u16) -> serde_json::Value {
    let dir = tempfile::tempdir().expect("tmp");
    let img = dir.path().join("guest.img");
    let out = dir.path().join("out.img");
    make_image(&img, 256 << 20, 42);
    let port = free_port();
    let recv = spawn_recv(port, &["--out", out.to_str().expect("utf8"), "--json"]);
    let send = Command::new(BIN)
        .args([
            "send",
            "--connect",
            &format!("127.0.0.1:{port}"),
            "--image",
            img.to_str().expect("utf8"),
        ])
        .args([
            "--codec",
            codec,
            "--channels",
            &channels.to_string(),
            "--json",
        ])
        .output()
        .expect("run send");
    assert!(
        send.status.success(),
        "send failed: {}",
        String::from_utf8_lossy(&send.stderr)
    );
    let r = wait_output(recv, Duration::from_secs(60));
    assert!(
        r.status.success(),
        "recv failed: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    let a = std::fs::read(&img).expect("img");
    let b = std::fs::read(&out).expect("out");
    assert!(a == b, "OUT differs from IMG");
    let sj: serde_json::Value =
        serde_json::from_slice(&send.stdout).expect("send --json is one JSON object");
    let rj: serde_json::Value =
        serde_json::from_slice(&r.stdout).expect("recv --json is one JSON object");
    assert_eq!(sj["memory_bytes"].as_u64(), Some(256 << 20));
    // recv maps its own memory (all zero): the zero pages the sender left out never arrive.
    let left_out = sj["pages"]["left_out"].as_u64().expect("left_out");
    assert_eq!(
        rj["memory_bytes"].as_u64().map(|b| b + left_out * 4096),
        Some(256 << 20)
    );
    assert_eq!(sj["wire_bytes"], rj["wire_bytes"]);
    assert_eq!(sj["codec"].as_str(), Some(codec));
    let compressed = sj["pages"]["compressed"]
        .as_u64()
        .expect("pages.compressed");
    if codec == "none" {
        assert_eq!(compressed, 0);
    } else {
        assert!(compressed > 0);
    }
    sj
}

#[test]
fn send_recv_256mib_none_is_byte_identical() {
    send_recv_identical("none");
}

#[test]
fn send_recv_256mib_deflate_is_byte_identical() {
    send_recv_identical("deflate");
}

#[test]
fn demo_json_verifies() {
    let out = Command::new(BIN)
        .args(["demo", "--size", "16MiB", "--json"])
        .output()
        .expect("run demo");
    assert!(
        out.status.success(),
        "demo failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["verified"], serde_json::Value::Bool(true));
    assert_eq!(v["sender"]["memory_bytes"].as_u64(), Some(16 << 20));
    assert!(v["sender"]["pages"]["zero"].as_u64().expect("zero") > 0);
    assert!(v["sender"]["gbps"].as_f64().expect("gbps") > 0.0);
    assert_eq!(
        v["sender"]["channels"].as_array().expect("channels").len(),
        2
    );
}

#[test]
fn bad_arguments_are_one_line_errors() {
    let out = Command::new(BIN)
        .args(["demo", "--size", "12XB"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("unknown size unit"), "{err}");
    let out = Command::new(BIN)
        .args([
            "send",
            "--connect",
            "127.0.0.1:1",
            "--image",
            "/nonexistent/x.img",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("/nonexistent/x.img"), "{err}");
}

/// `--accept-timeout` is the wait that ran out, and the message says so (not the idle
/// timeout, 30 s here).
#[test]
fn recv_accept_timeout_message_quotes_the_accept_timeout() {
    let port = free_port();
    let child = Command::new(BIN)
        .args(["recv", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--accept-timeout", "1", "--idle-timeout", "30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn recv");
    let out = wait_output(child, Duration::from_secs(60));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("timed out after 1.0 s"), "{err}");
    assert!(!err.contains("30.0 s"), "{err}");
}

/// A sender that breaks a §5 rule: recv exits non-zero with one line naming the channel,
/// the packet and the field.
#[test]
fn recv_rejects_a_bad_offset_with_one_line() {
    let port = free_port();
    let recv = spawn_recv(port, &["--idle-timeout", "5"]);
    let uuid = [7u8; 16];
    let mut ctl = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    control::write_preamble(&mut ctl).expect("preamble");
    assert!(matches!(
        control::read_message(&mut ctl).expect("challenge"),
        Message::Challenge {
            secret_required: false,
            ..
        }
    ));
    let hello = Hello {
        uuid,
        page_size: 4096,
        pages_per_packet: 8,
        compression: Compression::None,
        channels: 1,
        blocks: vec![BlockSpec {
            name: "pc.ram".into(),
            size: 1 << 20,
        }],
        auth: None,
        opening_sync: false,
    };
    control::write_message(&mut ctl, &Message::Hello(hello)).expect("hello");
    assert_eq!(
        control::read_message(&mut ctl).expect("reply"),
        // recv maps its own memory: all zero.
        Message::HelloOk {
            proof: None,
            fresh: true
        }
    );
    let mut ch = TcpStream::connect(("127.0.0.1", port)).expect("connect channel");
    ch.write_all(
        &InitPacket {
            uuid,
            channel_id: 0,
        }
        .encode(),
    )
    .expect("init");
    let mut hdr = vec![0u8; wire::header_len(8)];
    let fields = HeaderFields {
        flags: 0,
        pages_alloc: 8,
        normal_pages: 1,
        next_packet_size: 4096,
        packet_num: 41,
        zero_pages: 0,
    };
    wire::encode_header(&mut hdr, &fields, "pc.ram", &[4096 + 12]);
    ch.write_all(&hdr).expect("header");
    let _ = ch.write_all(&[0u8; 4096]);
    let r = wait_output(recv, Duration::from_secs(20));
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err}"
    );
    assert!(err.contains("channel 0"), "{err}");
    assert!(err.contains("packet_num 41"), "{err}");
    assert!(err.contains("field offset"), "{err}");
    // The sender's side hears why.
    match control::read_message(&mut ctl) {
        Ok(Message::Error { message }) => assert!(message.contains("field offset"), "{message}"),
        other => panic!("expected an error message on control, got {other:?}"),
    }
}

/// `pagewire decode` rebuilds the image from channel streams recorded off a `pagewire send`.
#[test]
fn decode_rebuilds_image_from_recorded_send() {
    let dir = tempfile::tempdir().expect("tmp");
    let img = dir.path().join("guest.img");
    make_image(&img, 16 << 20, 3);
    let (port, rec) = common::recorder();
    let send = Command::new(BIN)
        .args([
            "send",
            "--connect",
            &format!("127.0.0.1:{port}"),
            "--image",
            img.to_str().expect("utf8"),
        ])
        .args(["--codec", "deflate", "--channels", "2"])
        .output()
        .expect("send");
    assert!(
        send.status.success(),
        "{}",
        String::from_utf8_lossy(&send.stderr)
    );
    let (_, streams) = rec.join().expect("recorder");
    let caps: Vec<_> = streams
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let path = dir.path().join(format!("chan{i}.bin"));
            std::fs::write(&path, v).expect("write capture");
            path
        })
        .collect();
    let out = dir.path().join("decoded.img");
    let dec = Command::new(BIN)
        .args([
            "decode",
            "--block",
            "pc.ram=16MiB",
            "--out",
            out.to_str().expect("utf8"),
            "--json",
        ])
        .args(
            caps.iter()
                .rev()
                .map(|p| p.to_str().expect("utf8").to_string()),
        )
        .output()
        .expect("decode");
    assert!(
        dec.status.success(),
        "{}",
        String::from_utf8_lossy(&dec.stderr)
    );
    assert!(
        std::fs::read(&img).expect("img") == std::fs::read(&out).expect("out"),
        "decoded image differs"
    );
    let v: serde_json::Value = serde_json::from_slice(&dec.stdout).expect("json");
    assert_eq!(v["compression"].as_str(), Some("qpl"));
    // QEMU's cadence: each channel opens with a SYNC right after its init packet, and carries
    // rounds + 1 SYNCs; decode recognises the opening one.
    assert_eq!(v["rounds"].as_u64(), Some(1));
    assert_eq!(v["opening_sync"].as_bool(), Some(true));
    for (i, ch) in v["channels"]
        .as_array()
        .expect("channels")
        .iter()
        .enumerate()
    {
        assert_eq!(ch["sync_packets"].as_u64(), Some(2), "channel {i}");
    }
    for p in &caps {
        let bytes = std::fs::read(p).expect("capture");
        // Init packet (64 bytes), then the first packet header: flags at offset 8.
        assert_eq!(
            &bytes[64 + 8..64 + 12],
            &[0, 0, 0, 1],
            "{}: first packet is a SYNC",
            p.display()
        );
    }
}

fn qpl_installed() -> Result<String, String> {
    qpl_sys::Qpl::load()
        .map(|q| q.version())
        .map_err(|e| e.to_string())
}

#[test]
fn send_recv_256mib_qpl_is_byte_identical_on_qpl_software_path() {
    if let Err(e) = qpl_installed() {
        eprintln!("SKIP send_recv_256mib_qpl_is_byte_identical_on_qpl_software_path: {e}");
        return;
    }
    let sj = send_recv_identical("qpl");
    let hw = sj["jobs"]["hardware"].as_u64().expect("jobs.hardware");
    let sw = sj["jobs"]["software"].as_u64().expect("jobs.software");
    if pagewire::qpl_hardware_available() {
        assert!(hw > 0);
    } else {
        assert_eq!(hw, 0, "no IAA on this host: no hardware jobs");
        let skipped = sj["pages"]["skipped"].as_u64().expect("pages.skipped");
        assert_eq!(
            sw + skipped,
            sj["pages"]["normal"].as_u64().expect("pages.normal")
        );
    }
}

#[test]
fn codec_qpl_without_libqpl_fails_at_start_with_one_line() {
    if let Ok(v) = qpl_installed() {
        eprintln!(
            "SKIP codec_qpl_without_libqpl_fails_at_start_with_one_line: QPL {v} is installed"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let img = dir.path().join("small.img");
    make_image(&img, 1 << 20, 1);
    let out = Command::new(BIN)
        .args([
            "send",
            "--connect",
            "127.0.0.1:9",
            "--image",
            img.to_str().expect("utf8"),
            "--codec",
            "qpl",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("libqpl.so.1") && err.contains("install"),
        "{err}"
    );
}

#[test]
fn codec_auto_without_iaa_uses_deflate_and_says_why() {
    let out = Command::new(BIN)
        .args([
            "--log", "info", "demo", "--size", "4MiB", "--codec", "auto", "--json",
        ])
        .output()
        .expect("run demo");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(v["codec"].as_str(), Some("auto"));
    if pagewire::qpl_hardware_available() {
        assert_eq!(v["compressor"].as_str(), Some("qpl"));
    } else {
        assert_eq!(v["compressor"].as_str(), Some("deflate"));
        assert!(log.contains("codec auto: using deflate"), "{log}");
    }
    // The one line saying what auto chose and why.
    let line = v["auto_choice"].as_str().expect("auto_choice");
    assert!(
        line.starts_with("auto: ") && line.contains("raw by choice"),
        "{line}"
    );
    let p = &v["sender"]["pages"];
    let n = |k: &str| p[k].as_u64().expect(k);
    assert_eq!(
        n("compressed") + n("raw_chosen") + n("incompressible"),
        n("normal"),
        "every data page accounted for: {p}"
    );
}

#[test]
fn send_recv_256mib_two_channels_is_byte_identical() {
    let sj = send_recv_identical_on("deflate", 2);
    let chans = sj["channels"].as_array().expect("channels");
    assert_eq!(chans.len(), 2);
    assert!(
        chans.iter().all(|c| c["packets"].as_u64().unwrap_or(0) > 0),
        "both channels carried packets: {chans:?}"
    );
}

#[test]
fn rounds_with_dirty_pages_end_identical_to_senders_final_memory() {
    let dir = tempfile::tempdir().expect("tmp");
    let img = dir.path().join("guest.img");
    let out = dir.path().join("out.img");
    let fin = dir.path().join("final.img");
    make_image(&img, 64 << 20, 44);
    let before = std::fs::read(&img).expect("img");
    let port = free_port();
    let recv = spawn_recv(port, &["--out", out.to_str().expect("utf8"), "--json"]);
    let send = Command::new(BIN)
        .args([
            "send",
            "--connect",
            &format!("127.0.0.1:{port}"),
            "--image",
            img.to_str().expect("utf8"),
        ])
        .args([
            "--channels",
            "2",
            "--rounds",
            "5",
            "--dirty-fraction",
            "0.1",
            "--json",
        ])
        .args(["--final-image", fin.to_str().expect("utf8")])
        .output()
        .expect("run send");
    assert!(
        send.status.success(),
        "send failed: {}",
        String::from_utf8_lossy(&send.stderr)
    );
    let r = wait_output(recv, Duration::from_secs(60));
    assert!(
        r.status.success(),
        "recv failed: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    let final_mem = std::fs::read(&fin).expect("final");
    assert!(
        final_mem != before,
        "the simulated guest changed its memory"
    );
    assert!(
        std::fs::read(&img).expect("img") == before,
        "the image file itself is never modified"
    );
    assert!(
        std::fs::read(&out).expect("out") == final_mem,
        "receiver's memory differs from the sender's final memory"
    );
    let sj: serde_json::Value = serde_json::from_slice(&send.stdout).expect("json");
    let rounds = sj["per_round"].as_array().expect("per_round");
    assert_eq!(rounds.len(), 5);
    let pages = |r: &serde_json::Value| r["memory_bytes"].as_u64().unwrap_or(0) / 4096;
    assert_eq!(pages(&rounds[0]), 16384);
    for r in &rounds[1..] {
        assert_eq!(
            pages(r),
            1638,
            "10 % of 16384 pages rewritten per round: {r}"
        );
    }
    let rj: serde_json::Value = serde_json::from_slice(&r.stdout).expect("json");
    assert_eq!(rj["rounds"].as_u64(), Some(5));
}

#[test]
fn wrong_secret_refused_with_one_line_on_both_sides() {
    let dir = tempfile::tempdir().expect("tmp");
    let img = dir.path().join("guest.img");
    let out = dir.path().join("out.img");
    make_image(&img, 4 << 20, 45);
    let good = dir.path().join("good.key");
    let bad = dir.path().join("bad.key");
    std::fs::write(&good, "a shared secret of some length\n").expect("key");
    std::fs::write(&bad, "another secret of some length\n").expect("key");
    let port = free_port();
    let recv = spawn_recv(
        port,
        &[
            "--out",
            out.to_str().expect("utf8"),
            "--secret-file",
            good.to_str().expect("utf8"),
        ],
    );
    let send_with = |key: &Path| {
        Command::new(BIN)
            .args([
                "send",
                "--connect",
                &format!("127.0.0.1:{port}"),
                "--image",
                img.to_str().expect("utf8"),
            ])
            .args(["--secret-file", key.to_str().expect("utf8")])
            .output()
            .expect("run send")
    };
    let refused = send_with(&bad);
    assert!(
        !refused.status.success(),
        "a sender with the wrong secret must fail"
    );
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "sender: one line expected: {err}"
    );
    assert!(err.contains("authentication failed"), "{err}");
    // The refusal cost the receiver one logged line, not its session: the right sender works.
    let ok = send_with(&good);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let r = wait_output(recv, Duration::from_secs(20));
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let rlog = String::from_utf8_lossy(&r.stderr);
    assert_eq!(
        rlog.trim_end().lines().count(),
        1,
        "receiver: one line for the refusal: {rlog}"
    );
    assert!(
        rlog.contains("refused") && rlog.contains("does not match"),
        "{rlog}"
    );
    assert!(std::fs::read(&img).expect("img") == std::fs::read(&out).expect("out"));
}

/// `--vm-uuid`: recv with a VM's uuid refuses a sender of another VM (one line on each side)
/// and serves the sender of its own VM; a malformed uuid is a one-line error.
#[test]
fn vm_uuid_selects_the_session() {
    let dir = tempfile::tempdir().expect("tmp");
    let img = dir.path().join("guest.img");
    let out = dir.path().join("out.img");
    make_image(&img, 4 << 20, 46);
    const MINE: &str = "0f0e0d0c-0b0a-4908-8706-050403020100";
    let port = free_port();
    let recv = spawn_recv(
        port,
        &["--out", out.to_str().expect("utf8"), "--vm-uuid", MINE],
    );
    let send_as = |uuid: &str| {
        Command::new(BIN)
            .args([
                "send",
                "--connect",
                &format!("127.0.0.1:{port}"),
                "--image",
                img.to_str().expect("utf8"),
                "--vm-uuid",
                uuid,
            ])
            .output()
            .expect("run send")
    };
    let bad = send_as("not-a-uuid");
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("--vm-uuid 'not-a-uuid'"), "{err}");
    let other = send_as("00000000-0000-4000-8000-000000000002");
    assert!(!other.status.success(), "another VM's sender must fail");
    let err = String::from_utf8_lossy(&other.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains(MINE), "{err}");
    let ok = send_as(&MINE.to_uppercase());
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let r = wait_output(recv, Duration::from_secs(20));
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let rlog = String::from_utf8_lossy(&r.stderr);
    assert_eq!(rlog.trim_end().lines().count(), 1, "{rlog}");
    assert!(rlog.contains("expects VM"), "{rlog}");
    assert!(std::fs::read(&img).expect("img") == std::fs::read(&out).expect("out"));
}

/// A long session: many rounds of a deflate send.
fn long_send(port: u16, img: &Path) -> std::process::Child {
    Command::new(BIN)
        .args([
            "send",
            "--connect",
            &format!("127.0.0.1:{port}"),
            "--image",
            img.to_str().expect("utf8"),
        ])
        .args([
            "--codec",
            "deflate",
            "--channels",
            "2",
            "--rounds",
            "1000",
            "--dirty-fraction",
            "0.5",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn send")
}

#[test]
fn sender_exits_quickly_when_receiver_is_killed() {
    let dir = tempfile::tempdir().expect("tmp");
    let img = dir.path().join("guest.img");
    make_image(&img, 32 << 20, 46);
    let port = free_port();
    let mut recv = spawn_recv(port, &[]);
    let send = long_send(port, &img);
    std::thread::sleep(Duration::from_millis(700));
    recv.kill().expect("kill recv");
    let _ = recv.wait();
    let t = Instant::now();
    let out = wait_output(send, Duration::from_secs(10));
    let took = t.elapsed();
    assert!(!out.status.success(), "sender must fail");
    assert!(
        took < Duration::from_secs(2),
        "sender took {took:?} to notice"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn receiver_exits_when_sender_is_killed() {
    let dir = tempfile::tempdir().expect("tmp");
    let img = dir.path().join("guest.img");
    make_image(&img, 32 << 20, 47);
    let port = free_port();
    let recv = spawn_recv(port, &["--idle-timeout", "3"]);
    let mut send = long_send(port, &img);
    std::thread::sleep(Duration::from_millis(700));
    send.kill().expect("kill send");
    let _ = send.wait();
    let t = Instant::now();
    let out = wait_output(recv, Duration::from_secs(10));
    let took = t.elapsed();
    assert!(!out.status.success(), "receiver must fail");
    assert!(
        took < Duration::from_secs(3) + Duration::from_millis(500),
        "receiver took {took:?}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

/// `gen-certs`, then `recv`/`send` with `--tls-dir` (codec auto, 2 channels, 2 rounds): an
/// encrypted migration as the README describes it, byte-identical; a clear-text sender
/// against the TLS receiver gets a one-line error on both sides.
#[test]
fn gen_certs_then_encrypted_send_recv_is_byte_identical() {
    let dir = tempfile::tempdir().expect("tmp");
    let certs = dir.path().join("certs");
    let g = Command::new(BIN)
        .args(["gen-certs", certs.to_str().expect("utf8")])
        .output()
        .expect("run gen-certs");
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
    for f in [
        "ca-cert.pem",
        "server-cert.pem",
        "server-key.pem",
        "client-cert.pem",
        "client-key.pem",
    ] {
        assert!(certs.join(f).is_file(), "{f} missing");
    }
    let img = dir.path().join("guest.img");
    let out = dir.path().join("out.img");
    let fin = dir.path().join("final.img");
    make_image(&img, 32 << 20, 9);
    let port = free_port();
    let tls = ["--tls-dir", certs.to_str().expect("utf8")];
    let recv = spawn_recv(
        port,
        &[
            &["--out", out.to_str().expect("utf8"), "--json"][..],
            &tls[..],
        ]
        .concat(),
    );
    let send = Command::new(BIN)
        .args(["send", "--connect", &format!("localhost:{port}")])
        .args(["--image", img.to_str().expect("utf8"), "--channels", "2"])
        .args(["--codec", "auto", "--rounds", "2", "--json"])
        .args(["--final-image", fin.to_str().expect("utf8")])
        .args(tls)
        .output()
        .expect("run send");
    assert!(
        send.status.success(),
        "send failed: {}",
        String::from_utf8_lossy(&send.stderr)
    );
    let r = wait_output(recv, Duration::from_secs(60));
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let got = std::fs::read(&out).expect("out");
    let want = std::fs::read(&fin).expect("final image");
    assert_eq!(got.len(), 32 << 20);
    assert!(got == want, "OUT differs from the sender's final memory");

    // A clear-text sender against a TLS receiver: one line each, non-zero exits.
    let port = free_port();
    let recv = Command::new(BIN)
        .args(["recv", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--idle-timeout", "2", "--accept-timeout", "4"])
        .args(tls)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn recv");
    let t = Instant::now();
    while !listening(port) {
        assert!(t.elapsed() < Duration::from_secs(10), "recv did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let send = Command::new(BIN)
        .args(["send", "--connect", &format!("127.0.0.1:{port}")])
        .args([
            "--image",
            img.to_str().expect("utf8"),
            "--idle-timeout",
            "2",
        ])
        .output()
        .expect("run send");
    let r = wait_output(recv, Duration::from_secs(30));
    for (who, o) in [("send", &send), ("recv", &r)] {
        assert!(!o.status.success(), "{who} succeeded");
        let err = String::from_utf8_lossy(&o.stderr);
        let last = err.lines().last().unwrap_or_default();
        assert!(last.starts_with("pagewire: error:"), "{who}: {err}");
        assert!(
            last.contains("TLS") || last.contains("tls"),
            "{who}: {last}"
        );
    }
}

/// `recv --out /dev/null` works (a user measuring the link wants it), `--prealloc` populates
/// the destination first, and a regular `--out` file keeps all-zero pages as holes.
#[test]
fn recv_out_dev_null_prealloc_and_sparse_out() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().expect("tmp");
    let img = dir.path().join("guest.img");
    make_image(&img, 32 << 20, 9);
    let send = |port: u16| {
        Command::new(BIN)
            .args(["send", "--connect", &format!("127.0.0.1:{port}")])
            .args(["--image", img.to_str().expect("utf8"), "--channels", "2"])
            .output()
            .expect("run send")
    };
    let port = free_port();
    let recv = spawn_recv(port, &["--out", "/dev/null", "--prealloc", "--json"]);
    let s = send(port);
    assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
    let r = wait_output(recv, Duration::from_secs(60));
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));

    let out = dir.path().join("out.img");
    let port = free_port();
    let recv = spawn_recv(port, &["--out", out.to_str().expect("utf8")]);
    let s = send(port);
    assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
    let r = wait_output(recv, Duration::from_secs(60));
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(
        std::fs::read(&img).expect("img") == std::fs::read(&out).expect("out"),
        "OUT differs from IMG"
    );
    let m = std::fs::metadata(&out).expect("stat");
    assert_eq!(m.len(), 32 << 20);
    assert!(
        m.blocks() * 512 < m.len() * 9 / 10,
        "zero pages written as holes: {} of {} bytes allocated",
        m.blocks() * 512,
        m.len()
    );
}

/// A sparse image (holes between data), sent in one round and in several rounds (whose
/// simulated guest also writes into holes): the receiver's `--out` equals the sender's memory,
/// and the holes are counted as pages the sender did not read.
#[test]
fn sparse_image_holes_unread_and_identical_in_one_and_several_rounds() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().expect("tmp");
    let img = dir.path().join("sparse.img");
    let size: u64 = 64 << 20;
    let piece = 4usize << 20;
    let data = dir.path().join("data.img");
    make_image(&data, 2 * piece, 46);
    let bytes = std::fs::read(&data).expect("data");
    let f = std::fs::File::create(&img).expect("create");
    f.set_len(size).expect("len");
    // Two 4 MiB pieces at 8 MiB and 40 MiB (2 MiB-aligned: exact at any file-system block size).
    f.write_all_at(&bytes[..piece], 8 << 20).expect("write");
    f.write_all_at(&bytes[piece..], 40 << 20).expect("write");
    drop(f);
    let image = std::fs::read(&img).expect("img");
    let hole_pages = (size as usize - 2 * piece) / 4096;
    for rounds in ["1", "3"] {
        let out = dir.path().join(format!("out{rounds}.img"));
        let fin = dir.path().join(format!("final{rounds}.img"));
        let port = free_port();
        let recv = spawn_recv(port, &["--out", out.to_str().expect("utf8"), "--json"]);
        let send = Command::new(BIN)
            .args(["send", "--connect", &format!("127.0.0.1:{port}")])
            .args(["--image", img.to_str().expect("utf8")])
            .args(["--codec", "none", "--channels", "2", "--rounds", rounds])
            .args(["--final-image", fin.to_str().expect("utf8"), "--json"])
            .output()
            .expect("run send");
        assert!(
            send.status.success(),
            "send failed: {}",
            String::from_utf8_lossy(&send.stderr)
        );
        let r = wait_output(recv, Duration::from_secs(60));
        assert!(
            r.status.success(),
            "recv failed: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        let final_mem = std::fs::read(&fin).expect("final");
        assert!(
            std::fs::read(&out).expect("out") == final_mem,
            "receiver's memory differs from the sender's ({rounds} rounds)"
        );
        let sj: serde_json::Value = serde_json::from_slice(&send.stdout).expect("json");
        let rounds_json = sj["per_round"].as_array().expect("per_round");
        assert!(rounds_json[0]["pages"]["zero"].as_u64().unwrap_or(0) as usize >= hole_pages);
        let unread = sj["pages"]["zero_unread"].as_u64().expect("zero_unread") as usize;
        if rounds == "1" {
            assert!(final_mem == image, "one round: the image as it is");
            assert_eq!(unread, hole_pages, "every hole page, and only they, unread");
        } else {
            assert!(final_mem != image, "the simulated guest wrote");
            assert!(unread >= hole_pages, "round 1 alone skips every hole");
        }
        // recv's memory is all zero: round 1 left every hole out of its packets, and what
        // the receiver saw of them is nothing at all.
        let left_out = sj["pages"]["left_out"].as_u64().expect("left_out") as usize;
        assert!(
            left_out >= hole_pages,
            "{left_out} left out, {hole_pages} holes"
        );
        let rj: serde_json::Value = serde_json::from_slice(&r.stdout).expect("json");
        let received_zero = rj["pages"]["zero"].as_u64().unwrap_or(0) as usize;
        let sent_zero = sj["pages"]["zero"].as_u64().unwrap_or(0) as usize;
        assert_eq!(received_zero + left_out, sent_zero);
    }
}
