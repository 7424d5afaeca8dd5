//! Across a real veth pair between two network namespaces made (and removed) by the test:
//! zero-copy sends round-trip byte-identically off loopback. Skips, saying so, where network
//! namespaces cannot be made (not root, no `ip`). Traffic stays between the two namespaces.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{make_image, wait_output, BIN};

/// Two namespaces joined by a veth pair; removed on drop.
struct Pair {
    a: String,
    b: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let o = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

impl Pair {
    fn new(tag: &str) -> Result<Pair, String> {
        let id = std::process::id() % 100_000;
        let p = Pair {
            a: format!("pw{tag}a{id}"),
            b: format!("pw{tag}b{id}"),
        };
        let (va, vb) = (format!("pwa{id}"), format!("pwb{id}"));
        ip(&["netns", "add", &p.a])?;
        ip(&["netns", "add", &p.b])?;
        ip(&[
            "link", "add", &va, "netns", &p.a, "type", "veth", "peer", "name", &vb, "netns", &p.b,
        ])?;
        ip(&["-n", &p.a, "addr", "add", "10.199.77.1/30", "dev", &va])?;
        ip(&["-n", &p.b, "addr", "add", "10.199.77.2/30", "dev", &vb])?;
        for (ns, dev) in [(&p.a, &va), (&p.b, &vb)] {
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(p)
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        // Deleting a namespace removes its end of the veth pair, and with it the peer.
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
    }
}

fn in_ns(ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, BIN]).args(args);
    c
}

fn zero_copy_across_veth(codec: &str) {
    across_veth(codec, false);
}

/// Send across the veth pair, clear text (zero copy asked for and used; both sides warn once
/// that pages travel in clear text) or TLS (zero copy asked for and not used; no warning).
fn across_veth(codec: &str, tls: bool) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP zero_copy_across_veth: needs root to make network namespaces");
        return;
    }
    let tag = if tls { "t" } else { &codec[..1] };
    let pair = match Pair::new(tag) {
        Ok(p) => p,
        Err(e) => {
            eprintln!(
                "SKIP zero_copy_across_veth: cannot make a veth pair between namespaces: {e}"
            );
            return;
        }
    };
    let dir = tempfile::tempdir().expect("tmp");
    let img = dir.path().join("guest.img");
    let out = dir.path().join("out.img");
    make_image(&img, 64 << 20, 77);
    let certs = dir.path().join("certs");
    let tls_args: Vec<String> = if tls {
        let g = std::process::Command::new(BIN)
            .args([
                "gen-certs",
                certs.to_str().expect("utf8"),
                "--host",
                "10.199.77.2",
            ])
            .output()
            .expect("gen-certs");
        assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
        vec!["--tls-dir".into(), certs.to_str().expect("utf8").into()]
    } else {
        Vec::new()
    };
    let recv = in_ns(
        &pair.b,
        &[
            "recv",
            "--listen",
            "10.199.77.2:4444",
            "--out",
            out.to_str().expect("utf8"),
        ],
    )
    .args(["--insecure", "--accept-timeout", "30"])
    .args(&tls_args)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn recv");
    // Retry until the receiver listens (a refused connection is not a session).
    let t = Instant::now();
    let send = loop {
        let o = in_ns(
            &pair.a,
            &[
                "send",
                "--connect",
                "10.199.77.2:4444",
                "--image",
                img.to_str().expect("utf8"),
            ],
        )
        .args([
            "--codec",
            codec,
            "--channels",
            "2",
            "--zero-copy",
            "on",
            "--json",
        ])
        .args(&tls_args)
        .output()
        .expect("run send");
        if o.status.success() || t.elapsed() > Duration::from_secs(10) {
            break o;
        }
        if !String::from_utf8_lossy(&o.stderr).contains("refused") {
            break o;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        send.status.success(),
        "send: {}",
        String::from_utf8_lossy(&send.stderr)
    );
    let r = wait_output(recv, Duration::from_secs(60));
    assert!(
        r.status.success(),
        "recv: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(
        std::fs::read(&img).expect("img") == std::fs::read(&out).expect("out"),
        "OUT differs from IMG"
    );
    let v: serde_json::Value = serde_json::from_slice(&send.stdout).expect("json");
    let zc = &v["zero_copy"];
    let sends = zc["sends"].as_u64().expect("sends");
    let warned = |o: &std::process::Output| {
        String::from_utf8_lossy(&o.stderr)
            .matches("in clear text")
            .count()
    };
    if tls {
        assert_eq!(sends, 0, "zero copy used under TLS: {zc}");
        assert_eq!(v["tls"], serde_json::json!(true));
        assert_eq!(
            warned(&send) + warned(&r),
            0,
            "a clear-text warning under TLS"
        );
        drop(pair);
        return;
    }
    assert_eq!(warned(&send), 1, "sender: one clear-text warning");
    assert_eq!(warned(&r), 1, "receiver: one clear-text warning");
    assert!(sends > 0, "zero copy used across veth: {zc}");
    assert_eq!(
        zc["notifications"].as_u64(),
        Some(sends),
        "every notification awaited: {zc}"
    );
    eprintln!(
        "veth, codec {codec}: {sends} zero-copy sends, {} copied by the kernel",
        zc["copied_by_kernel"]
    );
    drop(pair);
}

#[test]
fn zero_copy_across_veth_none() {
    zero_copy_across_veth("none");
}

#[test]
fn zero_copy_across_veth_deflate() {
    zero_copy_across_veth("deflate");
}

#[test]
fn tls_across_veth_is_identical_without_zero_copy() {
    across_veth("none", true);
}

/// Codec auto through a shaped link (a namespace whose loopback is a 1 Gbit/s tbf, as the link
/// benchmark makes): whatever mix of raw and compressed pages auto chooses, OUT equals IMG and
/// every data page is accounted for.
#[test]
fn auto_through_a_shaped_link_is_byte_identical() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP auto_through_a_shaped_link_is_byte_identical: needs root");
        return;
    }
    let ns = format!("pwshape{}", std::process::id() % 100_000);
    if let Err(e) = ip(&["netns", "add", &ns]) {
        eprintln!("SKIP auto_through_a_shaped_link_is_byte_identical: {e}");
        return;
    }
    struct Ns(String);
    impl Drop for Ns {
        fn drop(&mut self) {
            let _ = ip(&["netns", "del", &self.0]);
        }
    }
    let guard = Ns(ns.clone());
    ip(&["-n", &ns, "link", "set", "lo", "up"]).expect("lo up");
    let tc = Command::new("ip")
        .args([
            "netns", "exec", &ns, "tc", "qdisc", "add", "dev", "lo", "root", "tbf",
        ])
        .args(["rate", "1gbit", "burst", "1mbit", "latency", "20ms"])
        .output();
    match tc {
        Ok(o) if o.status.success() => {}
        other => {
            eprintln!("SKIP auto_through_a_shaped_link_is_byte_identical: tc tbf: {other:?}");
            return;
        }
    }
    let dir = tempfile::tempdir().expect("tmp");
    let img = dir.path().join("guest.img");
    let out = dir.path().join("out.img");
    make_image(&img, 48 << 20, 5);
    let recv = in_ns(
        &ns,
        &[
            "recv",
            "--listen",
            "127.0.0.1:4444",
            "--out",
            out.to_str().expect("utf8"),
        ],
    )
    .args(["--accept-timeout", "30"])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn recv");
    let t = Instant::now();
    let send = loop {
        let o = in_ns(
            &ns,
            &[
                "send",
                "--connect",
                "127.0.0.1:4444",
                "--image",
                img.to_str().expect("utf8"),
                "--channels",
                "2",
                "--json",
            ],
        )
        .output()
        .expect("run send");
        let refused = String::from_utf8_lossy(&o.stderr).contains("refused");
        if o.status.success() || !refused || t.elapsed() > Duration::from_secs(10) {
            break o;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        send.status.success(),
        "send: {}",
        String::from_utf8_lossy(&send.stderr)
    );
    let r = wait_output(recv, Duration::from_secs(60));
    assert!(
        r.status.success(),
        "recv: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(
        std::fs::read(&img).expect("img") == std::fs::read(&out).expect("out"),
        "OUT differs from IMG"
    );
    let v: serde_json::Value = serde_json::from_slice(&send.stdout).expect("json");
    assert_eq!(v["codec"].as_str(), Some("auto"));
    let p = &v["pages"];
    let n = |k: &str| p[k].as_u64().expect(k);
    assert_eq!(
        n("compressed") + n("raw_chosen") + n("incompressible"),
        n("normal"),
        "{p}"
    );
    eprintln!(
        "1 Gbit/s shaped link, auto: {}",
        v["auto_choice"].as_str().unwrap_or("")
    );
    drop(guard);
}
