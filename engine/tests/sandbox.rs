//! Every thread pagewire starts runs inside a seccomp filter built from
//! [`pagewire::sandbox::syscalls`] (installed through [`pagewire::threads::ThreadHook`], as a
//! VMM sandboxing its threads would), default action: kill the process. Pre-copy (none,
//! deflate, TLS) and post-copy migrations complete byte-identical inside it, and a migration
//! whose filter lacks a listed call is killed (run in a child process: this binary,
//! re-executed).
//!
//! `PW_SANDBOX_TRACE=<file>` runs the same migrations without filters and appends each
//! pagewire thread's "tid role" to the file: with `strace -f -ff -o <prefix>` that is how the
//! list was drawn up (docs/sandboxing.md).
#![cfg(target_arch = "x86_64")]
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pagewire::sandbox::{syscalls, Mode};
use pagewire::threads::{ThreadHook, ThreadRole};
use pagewire::{
    Block, BlockPages, CodecKind, GuestRam, ReceiveInto, Receiver, ReceiverConfig, RoundPages,
    Sender, SenderConfig,
};
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};

const PS: usize = 4096;
const SIZE: usize = 8 << 20;

/// Page `p`'s bytes at generation `g`: every 5th page zero, the others words of a xorshift
/// stream (compressible only a little), and a short text run (compressible).
fn fill(mem: &GuestRam, g: u64) {
    for blk in mem.blocks() {
        // SAFETY: the test's own memory; no session runs on it while this writes.
        let bytes = unsafe { blk.as_mut_slice() };
        for (p, page) in bytes.chunks_exact_mut(PS).enumerate() {
            if p % 5 == 1 {
                page.fill(0);
                continue;
            }
            let mut x = (p as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ g;
            for (i, w) in page.chunks_exact_mut(8).enumerate() {
                if i < 256 {
                    w.copy_from_slice(b"pagewire");
                    continue;
                }
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
        }
    }
}

fn memory() -> Arc<GuestRam> {
    Arc::new(
        GuestRam::new(vec![
            Block::anonymous("pc.ram", SIZE).unwrap(),
            Block::anonymous("vga.ram", 1 << 20).unwrap(),
        ])
        .unwrap(),
    )
}

fn same(a: &GuestRam, b: &GuestRam) {
    for (x, y) in a.blocks().iter().zip(b.blocks()) {
        // SAFETY: both sessions are over; nothing writes either memory.
        let (x, y) = unsafe { (x.as_slice(), y.as_slice()) };
        assert!(x == y, "the destination's memory differs from the source's");
    }
}

/// The hook: each role's filter (from the library's list, less `drop`), or, tracing, a line
/// per thread.
fn hook(mode: Mode, drop: Option<&str>) -> ThreadHook {
    if let Ok(path) = std::env::var("PW_SANDBOX_TRACE") {
        let file = Arc::new(Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .unwrap(),
        ));
        return ThreadHook::new(move |t| {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            writeln!(file.lock().unwrap(), "{tid} {:?}", t.role)?;
            Ok(())
        });
    }
    let arch = std::env::consts::ARCH.try_into().unwrap();
    let mut filters: HashMap<ThreadRole, BpfProgram> = HashMap::new();
    for role in ThreadRole::ALL {
        let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = syscalls(role, mode)
            .iter()
            .filter(|s| Some(s.name) != drop)
            .map(|s| (s.nr, Vec::new()))
            .collect();
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::KillProcess,
            SeccompAction::Allow,
            arch,
        )
        .unwrap();
        filters.insert(role, filter.try_into().unwrap());
    }
    let filters = Arc::new(filters);
    ThreadHook::new(move |t| {
        let prog = filters.get(&t.role).ok_or("no filter for this role")?;
        seccompiler::apply_filter(prog)?;
        Ok(())
    })
}

fn cfg(codec: CodecKind, hook: ThreadHook) -> SenderConfig {
    SenderConfig::default()
        .codec(codec)
        .channels(2)
        .idle_timeout(Duration::from_secs(10))
        .threads(hook)
}

fn receiver(c: &SenderConfig) -> (Receiver, SocketAddr) {
    let mut r = Receiver::bind(
        "127.0.0.1:0".parse().unwrap(),
        ReceiverConfig::for_sender(c),
    )
    .unwrap();
    r.set_accept_timeout(Some(Duration::from_secs(10)));
    let addr = r.local_addr().unwrap();
    (r, addr)
}

/// A pre-copy migration of two rounds (every page, then a tenth of them rewritten), both
/// ends' threads sandboxed.
fn precopy(c: SenderConfig) {
    let (r, addr) = receiver(&c);
    let dst = memory();
    let into = dst.clone();
    let dest = std::thread::spawn(move || r.serve(ReceiveInto::Memory(into)));
    let src = memory();
    fill(&src, 0);
    let sizes: Vec<u64> = src.blocks().iter().map(|b| b.len() as u64).collect();
    let mut s = Sender::connect(addr, c.clone(), src.clone()).unwrap();
    s.send_round(RoundPages::all(&sizes, PS as u32, c.pages_per_packet))
        .unwrap();
    fill(&src, 1);
    s.send_round(RoundPages::all(&sizes, PS as u32, c.pages_per_packet))
        .unwrap();
    s.send_state(b"device state").unwrap();
    s.finish().unwrap();
    let got = dest.join().unwrap().unwrap();
    assert_eq!(got.state, vec![b"device state".to_vec()]);
    same(&src, &dst);
}

#[test]
fn precopy_none_in_the_sandbox() {
    if child_role() {
        return;
    }
    precopy(cfg(CodecKind::None, hook(Mode::PLAIN, None)));
}

#[test]
fn precopy_deflate_in_the_sandbox() {
    precopy(cfg(CodecKind::Deflate, hook(Mode::PLAIN, None)));
}

#[test]
fn precopy_auto_in_the_sandbox() {
    precopy(cfg(CodecKind::Auto, hook(Mode::PLAIN, None)));
}

/// Certificates for one test (the directory lives as long as the first value) and the TLS
/// settings that use them.
#[cfg(feature = "gen-certs")]
fn tls() -> (tempfile::TempDir, pagewire::tls::TlsConfig) {
    let dir = tempfile::tempdir().unwrap();
    pagewire::tls::generate(dir.path(), &Default::default()).unwrap();
    let mut t = pagewire::tls::TlsConfig::from_dir(dir.path());
    t.server_name = Some("localhost".into());
    (dir, t)
}

#[cfg(feature = "gen-certs")]
#[test]
fn precopy_tls_in_the_sandbox() {
    let (_dir, t) = tls();
    let mode = Mode::PLAIN.with_tls();
    precopy(cfg(CodecKind::Deflate, hook(mode, None)).tls(Some(t)));
}

#[test]
fn postcopy_in_the_sandbox() {
    postcopy(cfg(CodecKind::None, hook(Mode::PLAIN, None)));
}

/// Post-copy over TLS: the post-copy threads read and write records; the handshakes run on
/// the caller's thread (source) and the front door's (destination).
#[cfg(feature = "gen-certs")]
#[test]
fn postcopy_tls_in_the_sandbox() {
    let (_dir, t) = tls();
    let mode = Mode::PLAIN.with_tls();
    postcopy(cfg(CodecKind::None, hook(mode, None)).tls(Some(t)));
}

fn postcopy(c: SenderConfig) {
    if pagewire::internals::Uffd::new().is_err() {
        eprintln!("SKIPPED: userfaultfd is not available here");
        return;
    }
    let (mut r, addr) = receiver(&c);
    let guest: Arc<Mutex<Option<std::thread::JoinHandle<u64>>>> = Arc::default();
    let g = guest.clone();
    r.on_postcopy(move |start| {
        // The guest (the VMM's thread, not pagewire's): touches every page while they arrive.
        let mem = start.memory.clone();
        let h = std::thread::spawn(move || {
            let mut sum = 0u64;
            for blk in mem.blocks() {
                for off in (0..blk.len()).step_by(PS).rev() {
                    let ptr = blk.range_ptr(off as u64, 1).unwrap();
                    // SAFETY: inside the block; the read waits until post-copy placed the page.
                    sum = sum.wrapping_add(u64::from(unsafe { std::ptr::read_volatile(ptr) }));
                }
            }
            sum
        });
        *g.lock().unwrap() = Some(h);
    });
    let dst = memory();
    let into = dst.clone();
    let dest = std::thread::spawn(move || r.serve(ReceiveInto::Memory(into)));
    let src = memory();
    fill(&src, 0);
    let s = Sender::connect(addr, c.clone(), src.clone()).unwrap();
    let pc = s
        .switch_to_postcopy(vec![(0, BlockPages::All), (1, BlockPages::All)])
        .unwrap();
    pc.finish().unwrap();
    let got = dest.join().unwrap().unwrap();
    let h = guest.lock().unwrap().take().unwrap();
    h.join().unwrap();
    let total: u64 = src.blocks().iter().map(|b| (b.len() / PS) as u64).sum();
    assert_eq!(got.postcopy.unwrap().pages, total);
    same(&src, &dst);
}

/// In a child process (this binary, re-executed with `PW_SANDBOX_DROP`): the pre-copy
/// migration with one call taken out of the filters. Returns true there (the parent test's
/// body is not run in the child).
fn child_role() -> bool {
    let Ok(name) = std::env::var("PW_SANDBOX_DROP") else {
        return false;
    };
    let name: &'static str = Box::leak(name.into_boxed_str());
    precopy(cfg(CodecKind::None, hook(Mode::PLAIN, Some(name))));
    true
}

#[test]
fn a_call_missing_from_the_list_kills_the_migration() {
    if std::env::var("PW_SANDBOX_TRACE").is_ok() {
        return;
    }
    use std::os::unix::process::ExitStatusExt;
    // One call each thread of a pre-copy migration makes every time: the channel loops'
    // io_uring_enter, the front door's accept4, a handshake's recvfrom.
    for name in ["io_uring_enter", "accept4", "recvfrom"] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["precopy_none_in_the_sandbox", "--exact", "--test-threads=1"])
            .env("PW_SANDBOX_DROP", name)
            .output()
            .unwrap();
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGSYS),
            "without {name} the filter must kill the migration: {:?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// docs/sandboxing.md names every call of every role (in that role's row or the common
/// table), so the page cannot drift from the list.
#[test]
fn the_documentation_names_every_call() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/sandboxing.md"
    ))
    .unwrap();
    let common = doc.split("Then each role's own").next().unwrap();
    for role in ThreadRole::ALL {
        let heading = format!("| `{role:?}` (");
        let start = doc
            .find(&heading)
            .unwrap_or_else(|| panic!("no row for {role:?}"));
        // The role's rows run to the next role's row.
        let rest = &doc[start + heading.len()..];
        let end = rest.find("\n| `").unwrap_or(rest.len());
        let rows = &rest[..end];
        for s in syscalls(role, Mode::PLAIN) {
            let name = format!("`{}`", s.name);
            let in_common = pagewire::sandbox::COMMON.contains(&s) && common.contains(&name);
            let door_inherits =
                role == ThreadRole::Door && rows.contains("everything `Handshake` allows");
            assert!(
                rows.contains(&name) || in_common || door_inherits,
                "docs/sandboxing.md: {role:?} does not name {name}"
            );
        }
    }
}
