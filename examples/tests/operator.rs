//! Nothing an operator does loses data, and exit statuses and messages tell the truth: the
//! `pagewire` binary run as an operator would, mistakes included.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{free_port, listening, make_image, wait_output, BIN};

fn recv(port: u16, extra: &[&str]) -> std::process::Child {
    let child = Command::new(BIN)
        .args(["recv", "--listen", &format!("127.0.0.1:{port}")])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn recv");
    let t = Instant::now();
    while !listening(port) {
        if t.elapsed() > Duration::from_secs(10) {
            let out = wait_output(child, Duration::from_secs(5));
            panic!(
                "recv did not start listening: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn send(port: u16, img: &Path, extra: &[&str]) -> Output {
    Command::new(BIN)
        .args(["send", "--connect", &format!("127.0.0.1:{port}"), "--image"])
        .arg(img)
        .args(["--channels", "2", "--cpus", "off"])
        .args(extra)
        .output()
        .expect("run send")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The lines of `dir`'s entries, sorted (to see that no temporary file was left behind).
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn recv_out_never_touches_an_existing_file_unless_the_session_completes() {
    let dir = tempfile::tempdir().expect("tmp");
    let target = dir.path().join("precious.img");
    std::fs::write(&target, b"the operator's only copy").expect("write");
    let t = target.to_str().expect("utf8");

    // Without --force: refused at once, before listening.
    let o = Command::new(BIN)
        .args(["recv", "--listen", "127.0.0.1:0", "--out", t])
        .output()
        .expect("recv");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(&target).expect("read"),
        b"the operator's only copy"
    );

    // With --force, a receiver whose session never comes leaves the file as it was.
    let port = free_port();
    let r = recv(port, &["--out", t, "--force", "--accept-timeout", "1"]);
    let o = wait_output(r, Duration::from_secs(30));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(&target).expect("read"),
        b"the operator's only copy"
    );

    // A receiver killed mid-session leaves it as it was too.
    let img = dir.path().join("guest.img");
    make_image(&img, 64 << 20, 3);
    let port = free_port();
    let mut r = recv(port, &["--out", t, "--force"]);
    let mut s = Command::new(BIN)
        .args(["send", "--connect", &format!("127.0.0.1:{port}"), "--image"])
        .arg(&img)
        .args(["--max-bandwidth", "20MB/s", "--codec", "none"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("send");
    std::thread::sleep(Duration::from_millis(700));
    r.kill().expect("kill recv");
    let _ = r.wait();
    let _ = s.kill();
    let _ = s.wait();
    assert_eq!(
        std::fs::read(&target).expect("read"),
        b"the operator's only copy"
    );
    assert_eq!(entries(dir.path()), ["guest.img", "precious.img"]);

    // A completed session replaces it with what arrived, and leaves nothing else behind.
    let port = free_port();
    let r = recv(port, &["--out", t, "--force"]);
    let s = send(port, &img, &[]);
    assert!(s.status.success(), "send: {}", stderr(&s));
    let o = wait_output(r, Duration::from_secs(60));
    assert!(o.status.success(), "recv: {}", stderr(&o));
    assert!(std::fs::read(&target).expect("read") == std::fs::read(&img).expect("img"));
    assert_eq!(entries(dir.path()), ["guest.img", "precious.img"]);
}

#[test]
fn the_sender_succeeds_only_when_the_destination_kept_everything() {
    // --out on a full disk (/dev/full: every write fails with ENOSPC): the receiver fails,
    // and so does the sender, saying why.
    let dir = tempfile::tempdir().expect("tmp");
    let img = dir.path().join("guest.img");
    make_image(&img, 16 << 20, 5);
    let port = free_port();
    let r = recv(port, &["--out", "/dev/full"]);
    let s = send(port, &img, &[]);
    let o = wait_output(r, Duration::from_secs(60));
    assert_eq!(o.status.code(), Some(1), "recv: {}", stderr(&o));
    assert_eq!(s.status.code(), Some(1), "send: {}", stderr(&s));
    assert!(
        stderr(&s).contains("No space left on device"),
        "{}",
        stderr(&s)
    );
    assert_eq!(stderr(&s).lines().count(), 1, "{}", stderr(&s));
}

#[test]
fn a_confirmation_lost_after_the_end_exits_3() {
    // A destination that takes everything and closes at the end without confirming: the
    // sender cannot know whether it completed, and says so with its own status.
    let dir = tempfile::tempdir().expect("tmp");
    let img = dir.path().join("guest.img");
    make_image(&img, 8 << 20, 6);
    let (port, rec) = common::recorder_ending(false);
    let s = send(port, &img, &["--codec", "none"]);
    let _ = rec.join().expect("recorder");
    assert_eq!(s.status.code(), Some(3), "send: {}", stderr(&s));
    assert!(stderr(&s).contains("outcome unknown"), "{}", stderr(&s));
    assert_eq!(stderr(&s).lines().count(), 1, "{}", stderr(&s));
}

#[test]
fn gen_certs_never_replaces_credentials_silently() {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = dir.path().join("pki");
    let gen = |extra: &[&str]| {
        Command::new(BIN)
            .arg("gen-certs")
            .arg(&pki)
            .args(extra)
            .output()
            .expect("gen-certs")
    };
    let o = gen(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ca = std::fs::read(pki.join("ca-cert.pem")).expect("ca");
    let key = std::fs::read(pki.join("server-key.pem")).expect("key");

    let o = gen(&[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("already holds"), "{}", stderr(&o));
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    assert_eq!(std::fs::read(pki.join("ca-cert.pem")).expect("ca"), ca);
    assert_eq!(std::fs::read(pki.join("server-key.pem")).expect("key"), key);

    let o = gen(&["--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("replaced the CA"), "{}", stderr(&o));
    assert_ne!(std::fs::read(pki.join("ca-cert.pem")).expect("ca"), ca);
    assert_eq!(entries(&pki).len(), 5, "{:?}", entries(&pki));
}

#[test]
fn demo_refuses_a_size_this_host_cannot_hold() {
    let t = Instant::now();
    let o = Command::new(BIN)
        .args(["demo", "--size", "1TiB"])
        .output()
        .expect("demo");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains("--size 1TiB") && e.contains("available"), "{e}");
    // Refused before anything was allocated or generated.
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
}

#[test]
fn an_image_that_is_not_memory_is_named_for_what_it_is() {
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port(); // nothing listens: the image is checked first
    for (image, what) in [
        (dir.path().to_path_buf(), "is a directory"),
        (
            Path::new("/dev/null").to_path_buf(),
            "is a character device",
        ),
    ] {
        let o = send(port, &image, &[]);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        let e = stderr(&o);
        assert!(e.contains(what), "{}: {e}", image.display());
        assert!(!e.contains("No such device"), "{e}");
    }
    let empty = dir.path().join("empty.img");
    std::fs::write(&empty, b"").expect("write");
    let o = send(port, &empty, &[]);
    assert!(stderr(&o).contains("is empty"), "{}", stderr(&o));
}

#[test]
fn logs_written_to_a_file_carry_no_colour_codes() {
    let dir = tempfile::tempdir().expect("tmp");
    let img = dir.path().join("guest.img");
    make_image(&img, 4 << 20, 7);
    let port = free_port();
    let r = recv(port, &["--log", "info"]);
    let s = send(port, &img, &["--log", "info"]);
    let o = wait_output(r, Duration::from_secs(60));
    assert!(s.status.success(), "{}", stderr(&s));
    for (who, err) in [("send", stderr(&s)), ("recv", stderr(&o))] {
        assert!(err.contains("INFO"), "{who} logged nothing: {err}");
        assert!(
            !err.contains('\u{1b}'),
            "{who}'s log has escape codes: {err:?}"
        );
    }
}

#[test]
fn an_image_truncated_during_a_send_is_named_as_the_cause() {
    let dir = tempfile::tempdir().expect("tmp");
    let img = dir.path().join("guest.img");
    make_image(&img, 48 << 20, 7);
    let port = free_port();
    let r = recv(port, &["--out", "/dev/null"]);
    // The cap makes the send last at least 2.4 s after the image is mapped, whatever the
    // host's speed: the truncation lands during the send.
    let child = Command::new(BIN)
        .args(["send", "--connect", &format!("127.0.0.1:{port}"), "--image"])
        .arg(&img)
        .args(["--channels", "2", "--cpus", "off", "--codec", "none"])
        .args(["--max-bandwidth", "20MB/s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn send");
    let maps = format!("/proc/{}/maps", child.id());
    let name = img.to_string_lossy().to_string();
    let t = Instant::now();
    while !std::fs::read_to_string(&maps).is_ok_and(|m| m.contains(&name)) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "send never mapped its image"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .expect("open")
        .set_len(1 << 20)
        .expect("truncate");
    let o = wait_output(child, Duration::from_secs(60));
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("became shorter") || e.contains("shrank from"),
        "the sender names the truncation: {e}"
    );
    assert!(!e.contains("closed by peer"), "{e}");
    let ro = wait_output(r, Duration::from_secs(60));
    assert_ne!(ro.status.code(), Some(0), "the receiver must not complete");
}
