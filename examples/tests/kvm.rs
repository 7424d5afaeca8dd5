//! `pagewire kvm-demo`: a running KVM guest migrated between two processes over loopback,
//! checked on the destination. Skips (with a SKIP line) where KVM is unavailable.
#![cfg(target_arch = "x86_64")]

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

mod common;
use common::{wait_output, BIN};

/// Why KVM cannot run a guest here, if it cannot.
fn kvm_missing() -> Option<String> {
    if !std::path::Path::new("/dev/kvm").exists() {
        return Some("/dev/kvm is absent".into());
    }
    let kvm = match kvm_ioctls::Kvm::new() {
        Ok(k) => k,
        Err(e) => return Some(format!("cannot open /dev/kvm: {e}")),
    };
    match kvm.create_vm() {
        Ok(_) => None,
        Err(e) => Some(format!("KVM_CREATE_VM fails: {e}")),
    }
}

macro_rules! require_kvm {
    ($name:expr) => {
        if let Some(why) = kvm_missing() {
            eprintln!("SKIP {}: {why}", $name);
            return;
        }
    };
}

/// Run `pagewire ARGS` (a kvm-demo) to its end, at most 60 s.
fn kvm_demo(args: &[&str]) -> Output {
    let child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kvm-demo");
    wait_output(child, Duration::from_secs(60))
}

/// `out` succeeded (else fail naming `what` with its stderr); its JSON summary.
fn succeeded(out: &Output, what: &str) -> Value {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    last_json(out)
}

fn last_json(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or("");
    serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "last stdout line is not JSON ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The destination's checks passed and say the guest continued from its paused counter.
fn assert_continued(dest: &Value, source: &Value, ws_pages: u64) {
    assert_eq!(dest["verified"], Value::Bool(true), "{dest}");
    let paused = source["counter_at_pause"]
        .as_u64()
        .expect("counter at pause");
    assert_eq!(dest["counter_at_pause"].as_u64(), Some(paused), "{dest}");
    let checked = dest["counter_at_check"].as_u64().expect("counter at check");
    assert!(
        checked > paused,
        "counter {checked} after resuming, {paused} at the pause"
    );
    assert_eq!(checked % ws_pages, 0, "a checkpoint is at a whole pass");
    assert_eq!(dest["pages_checked"].as_u64(), Some(ws_pages), "{dest}");
    let downtime = dest["downtime_ms"].as_f64().expect("downtime");
    assert!(
        downtime > 0.0 && downtime < 10_000.0,
        "downtime {downtime} ms"
    );
    assert_eq!(dest["downtime_clock"], "monotonic", "{dest}");
}

/// `kvm-demo --json` with codec `codec` on a 64 MiB guest writing 2048 pages, at most 15
/// rounds, a 100 ms downtime limit.
fn small_guest(codec: &str) -> Output {
    kvm_demo(&[
        "kvm-demo",
        "--json",
        "--codec",
        codec,
        "--memory",
        "64MiB",
        "--working-set",
        "2048",
        "--max-rounds",
        "15",
        // Generous: what these tests check is the migration, not how fast this host is (a
        // round of the working set took 340 ms on a saturated 2-core debug run).
        "--downtime-limit",
        "2000",
    ])
}

/// `kvm-demo --codec auto`: the adaptive codec (not deflate under another name) migrates a
/// running guest, and the destination verifies it continued.
#[test]
fn migrates_a_running_guest_with_codec_auto() {
    require_kvm!("migrates_a_running_guest_with_codec_auto");
    let out = small_guest("auto");
    let v = succeeded(&out, "kvm-demo");
    assert_eq!(v["codec"], "auto", "{v}");
    assert_eq!(v["verified"], Value::Bool(true), "{v}");
    assert_continued(&v["dest"], &v["source"], 2048);
}

/// `pagewire kvm-demo`: the destination is a child process of the source; raw pages.
#[test]
fn migrates_a_running_guest_between_two_processes() {
    require_kvm!("migrates_a_running_guest_between_two_processes");
    let out = small_guest("none");
    let v = succeeded(&out, "kvm-demo");
    assert_eq!(v["verified"], Value::Bool(true), "{v}");
    let source = &v["source"];
    let rounds = source["rounds"].as_array().expect("rounds");
    assert!(!rounds.is_empty() && rounds.len() <= 15, "{source}");
    // Round 1 sends every page of the 64 MiB; the others what the dirty log reported (a
    // probe, an empty round measuring the round trip, sends none and leaves the dirty set
    // to the next round).
    assert_eq!(rounds[0]["pages"].as_u64(), Some(16384), "{source}");
    for w in rounds.windows(2) {
        if w[1]["pages"].as_u64() != Some(0) {
            assert_eq!(w[1]["pages"], w[0]["dirtied"], "{source}");
        }
    }
    // The final round carries the last dirty set (plus what the guest wrote before it
    // stopped).
    let last_dirty = rounds[rounds.len() - 1]["dirtied"]
        .as_u64()
        .expect("dirtied");
    let final_pages = source["final"]["pages"].as_u64().expect("final pages");
    assert!(final_pages >= last_dirty, "{source}");
    assert_continued(&v["dest"], source, 2048);
    // The driver stopped on its prediction, and the downtime the destination measured (source
    // pause → guest running there) stayed under the limit.
    assert_eq!(source["decisions"]["stopped"].as_u64(), Some(1), "{source}");
    assert_eq!(v["downtime_limit_ms"].as_f64(), Some(2000.0), "{v}");
    let downtime = v["downtime_ms"].as_f64().expect("downtime");
    assert!(
        downtime < 100.0,
        "downtime {downtime} ms over the 100 ms limit"
    );
}

/// `pagewire kvm-demo --postcopy`: the guest resumes on the destination after N live rounds
/// (0: pure post-copy, every page fetched or streamed while it runs) and is verified as in
/// pre-copy; the destination reports the pages that arrived after the resume and the faults.
/// Also over TLS (`--tls`).
#[test]
fn postcopy_resumes_the_guest_before_its_memory_arrives() {
    require_kvm!("postcopy_resumes_the_guest_before_its_memory_arrives");
    // Pure post-copy, one round first, and pure post-copy over TLS (certificates made for
    // the run: every pre-copy and post-copy connection encrypted) with post-copy's threads
    // placed (`--postcopy-cpus auto`).
    for (rounds, tls) in [("0", false), ("1", false), ("0", true)] {
        let mut args = vec![
            "kvm-demo",
            "--json",
            "--memory",
            "64MiB",
            "--working-set",
            "2048",
            "--postcopy",
            "--precopy-rounds",
            rounds,
        ];
        if tls {
            args.extend(["--tls", "--postcopy-cpus", "auto"]);
        }
        let out = kvm_demo(&args);
        let v = succeeded(&out, "kvm-demo --postcopy");
        let source = &v["source"];
        let dest = &v["dest"];
        assert_eq!(source["tls"].as_bool(), Some(tls), "{source}");
        assert_continued(dest, source, 2048);
        let live = source["rounds"].as_array().expect("rounds").len();
        assert_eq!(live.to_string(), rounds, "{source}");
        let pc = &dest["postcopy"];
        let pages = pc["pages"].as_u64().expect("post-copy pages");
        assert_eq!(Some(pages), source["postcopy"]["pages"].as_u64(), "{v}");
        assert_eq!(
            pc["pages_urgent"].as_u64().unwrap_or(0) + pc["pages_background"].as_u64().unwrap_or(0),
            pages,
            "{pc}"
        );
        if rounds == "0" {
            // Pure post-copy: every page of the 64 MiB arrived after the resume, and the
            // guest's first instructions faulted.
            assert_eq!(pages, 16384, "{pc}");
            assert!(pc["faults"].as_u64().unwrap_or(0) > 0, "{pc}");
            assert!(pc["requests"].as_u64().unwrap_or(0) > 0, "{pc}");
        }
    }
}

/// `kvm-demo dest` and `kvm-demo source` as two processes started here, with DEFLATE (pages
/// compressed while the guest writes them) and a round limit.
#[test]
fn source_and_dest_roles_with_deflate() {
    require_kvm!("source_and_dest_roles_with_deflate");
    let mut dest = Command::new(BIN)
        .args([
            "kvm-demo",
            "dest",
            "--listen",
            "127.0.0.1:0",
            "--accept-timeout",
            "30",
            "--json",
            "--memory",
            "32MiB",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dest");
    let mut lines = BufReader::new(dest.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a listening line").expect("read");
    let first: Value = serde_json::from_str(&first).expect("listening JSON");
    let addr = first["listening"].as_str().expect("address").to_string();
    let source = Command::new(BIN)
        .args([
            "kvm-demo",
            "source",
            "--connect",
            &addr,
            "--json",
            "--codec",
            "deflate",
            "--memory",
            "32MiB",
            "--working-set",
            "1024",
            "--max-rounds",
            "8",
            "--downtime-limit",
            "5000",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn source");
    let src_out = wait_output(source, Duration::from_secs(60));
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let dest_out = wait_output(dest, Duration::from_secs(30));
    assert!(
        src_out.status.success(),
        "source failed: {}",
        String::from_utf8_lossy(&src_out.stderr)
    );
    assert!(
        dest_out.status.success(),
        "dest failed: {}",
        String::from_utf8_lossy(&dest_out.stderr)
    );
    let s = last_json(&src_out);
    let d: Value = serde_json::from_str(rest.last().expect("dest report")).expect("dest JSON");
    assert_eq!(s["role"], "source");
    assert_eq!(d["role"], "dest");
    let rounds = s["source"]["rounds"].as_array().expect("rounds");
    assert!(!rounds.is_empty() && rounds.len() <= 8);
    // Compressed: well under a raw page per page sent.
    let wire = s["source"]["total_wire_bytes"].as_u64().expect("wire");
    let pages = s["source"]["total_pages"].as_u64().expect("pages");
    assert!(
        wire < pages * 4096 * 3 / 4,
        "{wire} wire bytes for {pages} pages"
    );
    assert_continued(&d["dest"], &s["source"], 1024);
}

/// A destination whose VM memory differs from the source's refuses the session (and keeps
/// waiting for a fitting source until its accept timeout), and both sides say why.
#[test]
fn memory_size_mismatch_is_refused() {
    require_kvm!("memory_size_mismatch_is_refused");
    let mut dest = Command::new(BIN)
        .args([
            "kvm-demo",
            "dest",
            "--listen",
            "127.0.0.1:0",
            "--accept-timeout",
            "2",
            "--json",
            "--memory",
            "32MiB",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dest");
    let mut lines = BufReader::new(dest.stdout.take().expect("stdout")).lines();
    let first: Value =
        serde_json::from_str(&lines.next().expect("line").expect("read")).expect("JSON");
    let addr = first["listening"].as_str().expect("address").to_string();
    let source = Command::new(BIN)
        .args([
            "kvm-demo",
            "source",
            "--connect",
            &addr,
            "--memory",
            "64MiB",
            "--codec",
            "none",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn source");
    let src_out = wait_output(source, Duration::from_secs(60));
    let dest_out = wait_output(dest, Duration::from_secs(30));
    assert!(!src_out.status.success());
    assert!(!dest_out.status.success());
    let src_err = String::from_utf8_lossy(&src_out.stderr);
    let dest_err = String::from_utf8_lossy(&dest_out.stderr);
    for err in [&src_err, &dest_err] {
        assert!(err.contains("pagewire: error:"), "{err}");
        assert!(
            err.contains("67108864 bytes on the sender but 33554432 here"),
            "{err}"
        );
    }
    assert_eq!(src_err.lines().count(), 1, "{src_err}");
}

/// A limit the guest cannot meet without throttling, with throttling off: the driver gives up
/// after the round limit, the source says so in one line and fails, and the guest was never
/// paused (the destination got no state and fails too).
#[test]
fn unreachable_downtime_limit_gives_up() {
    require_kvm!("unreachable_downtime_limit_gives_up");
    let out = kvm_demo(&[
        "kvm-demo",
        "--codec",
        "deflate",
        "--memory",
        "32MiB",
        "--working-set",
        "2048",
        "--max-rounds",
        "3",
        "--downtime-limit",
        "0.01",
        "--no-auto-converge",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // The source's one line (the destination, a child process sharing stderr, adds its own:
    // the session ended without the guest).
    let ours: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("did not converge"))
        .collect();
    assert_eq!(ours.len(), 1, "{err}");
    assert!(
        ours[0].starts_with("pagewire: error: the guest did not converge to a 0.01 ms downtime")
            && ours[0].contains("within 3 rounds")
            && ours[0].contains("keeps running here"),
        "{err}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().filter(|l| l.contains("give up")).count(),
        1,
        "round table shows the give-up: {stdout}"
    );
}

/// A guest that dirties its 8 MiB working set far faster than a 20 MB/s link carries it: the
/// predicted downtime of every round is about 400 ms against a 20 ms limit, so with throttling
/// off plain pre-copy gives up after its 3 rounds (the guest keeps running on the source);
/// the same settings with `--postcopy-fallback` hand over to post-copy at that point, and the
/// guest finishes on the destination and is verified. The post-copy stream keeps to the cap.
#[test]
fn postcopy_fallback_finishes_where_precopy_does_not_converge() {
    require_kvm!("postcopy_fallback_finishes_where_precopy_does_not_converge");
    const CAP: f64 = 20e6;
    let run = |fallback: bool| {
        let mut args = vec![
            "kvm-demo",
            "--json",
            "--memory",
            "24MiB",
            "--working-set",
            "2048",
            "--max-bandwidth",
            "20MB/s",
            "--downtime-limit",
            "20",
            "--no-auto-converge",
            "--max-rounds",
            "3",
            // Each round's dirty set is the whole working set however busy the host is (a
            // guest starved of CPU dirtied 323 pages in a round and pre-copy nearly converged).
            "--min-passes-per-round",
            "1",
        ];
        if fallback {
            args.push("--postcopy-fallback");
        }
        kvm_demo(&args)
    };

    let pre = run(false);
    assert!(!pre.status.success(), "pre-copy converged at 20 MB/s");
    let err = String::from_utf8_lossy(&pre.stderr);
    assert!(
        err.lines().any(|l| l.starts_with(
            "pagewire: error: the guest did not converge to a 20 ms downtime \
             (no convergence within 3 rounds"
        )),
        "{err}"
    );

    let post = run(true);
    assert!(
        post.status.success(),
        "kvm-demo --postcopy-fallback failed: {}",
        String::from_utf8_lossy(&post.stderr)
    );
    let v = last_json(&post);
    assert_eq!(v["max_bandwidth"].as_u64(), Some(20_000_000), "{v}");
    let source = &v["source"];
    let dest = &v["dest"];
    assert_continued(dest, source, 2048);
    // The driver ran all 3 rounds and its last decision was post-copy, not a stop.
    let rounds = source["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 3, "{source}");
    assert_eq!(rounds[2]["decision"]["decision"], "post-copy", "{source}");
    for r in rounds {
        // The link, not the guest, was the limit: each round's prediction was far over 20 ms.
        let predicted = r["predicted_ms"].as_f64().expect("prediction");
        assert!(predicted > 100.0, "{source}");
    }
    assert_eq!(source["decisions"]["stopped"].as_u64(), Some(0), "{source}");
    // What was dirty when the guest paused arrived on the destination after the resume.
    let pc = &dest["postcopy"];
    let pages = pc["pages"].as_u64().expect("post-copy pages");
    assert_eq!(Some(pages), source["postcopy"]["pages"].as_u64(), "{v}");
    assert!(pages >= 2048, "{pc}");
    // Post-copy kept to the cap too: its bytes took at least (nearly) bytes / cap.
    let wire = source["postcopy"]["wire_bytes"].as_u64().expect("wire") as f64;
    let secs = source["postcopy"]["until_last_page_ms"]
        .as_f64()
        .expect("until last page")
        / 1e3;
    assert!(
        secs >= 0.8 * wire / CAP,
        "{wire} bytes in {secs} s over a {CAP} B/s cap"
    );
}

/// `--postcopy-fallback` is only a fallback: a guest that converges (no cap, a generous
/// limit) ends with the driver's stop and a paused final round, and no post-copy.
#[test]
fn postcopy_fallback_is_unused_when_precopy_converges() {
    require_kvm!("postcopy_fallback_is_unused_when_precopy_converges");
    let out = kvm_demo(&[
        "kvm-demo",
        "--json",
        "--memory",
        "32MiB",
        "--working-set",
        "1024",
        "--downtime-limit",
        "2000",
        "--postcopy-fallback",
    ]);
    let v = succeeded(&out, "kvm-demo --postcopy-fallback");
    let source = &v["source"];
    assert_continued(&v["dest"], source, 1024);
    assert_eq!(source["decisions"]["stopped"].as_u64(), Some(1), "{source}");
    assert!(source["postcopy"].is_null(), "{source}");
    assert!(v["dest"]["postcopy"].is_null(), "{v}");
    assert!(source["final"]["pages"].as_u64().is_some(), "{source}");
}
