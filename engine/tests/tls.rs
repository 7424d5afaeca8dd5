//! TLS 1.3 end to end over loopback: round trips, and every failure the issue names — each a
//! one-line error on both sides, and never a byte of an unauthenticated record in guest
//! memory.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pagewire::tls::{generate, GenerateSpec, TlsConfig};
use pagewire::{
    Block, BlockPages, CodecKind, GuestRam, ReceiveInto, Receiver, ReceiverConfig, RoundPages,
    Sender, SenderConfig, SessionError,
};
use pagewire_synth::{self as synth, PageSet};

const PS: u32 = 4096;
/// Receiver memory is filled with this before a failing session; the source never has it.
const PATTERN: u8 = 0xEE;

fn certs(spec: &GenerateSpec) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    generate(d.path(), spec).unwrap();
    d
}

fn tls(dir: &Path) -> Option<TlsConfig> {
    let mut t = TlsConfig::from_dir(dir);
    t.server_name = Some("localhost".into());
    Some(t)
}

fn cfg(codec: CodecKind, channels: u16, tls: Option<TlsConfig>) -> SenderConfig {
    SenderConfig::default()
        .codec(codec)
        .channels(channels)
        .tls(tls)
        .idle_timeout(Duration::from_secs(5))
}

fn realistic(size: usize, seed: u64) -> Arc<GuestRam> {
    let b = Block::anonymous("pc.ram", size).unwrap();
    // SAFETY: fresh block, not shared yet.
    synth::fill(
        PageSet::Realistic,
        unsafe { b.as_mut_slice() },
        PS as usize,
        seed,
    );
    Arc::new(GuestRam::new(vec![b]).unwrap())
}

/// Memory whose bytes are all below 0x80 (never PATTERN), distinct per page.
fn ascii(size: usize) -> Arc<GuestRam> {
    let b = Block::anonymous("pc.ram", size).unwrap();
    // SAFETY: fresh block, not shared yet.
    let s = unsafe { b.as_mut_slice() };
    for (i, x) in s.iter_mut().enumerate() {
        *x = ((i / PS as usize * 31 + i * 7) % 0x7f) as u8 + 1;
    }
    Arc::new(GuestRam::new(vec![b]).unwrap())
}

fn patterned(size: usize) -> Arc<GuestRam> {
    let b = Block::anonymous("pc.ram", size).unwrap();
    // SAFETY: fresh block, not shared yet.
    unsafe { b.as_mut_slice() }.fill(PATTERN);
    Arc::new(GuestRam::new(vec![b]).unwrap())
}

fn receiver(c: &SenderConfig) -> (Receiver, SocketAddr) {
    let mut r = Receiver::bind(
        "127.0.0.1:0".parse().unwrap(),
        ReceiverConfig::for_sender(c),
    )
    .unwrap();
    r.set_accept_timeout(Some(Duration::from_secs(3)));
    let addr = r.local_addr().unwrap();
    (r, addr)
}

fn one_line(e: &str) {
    assert!(!e.contains('\n'), "not one line: {e}");
}

fn round_trip(codec: CodecKind, channels: u16, record_size: usize) {
    let dir = certs(&GenerateSpec::default());
    let mut t = tls(dir.path());
    if let Some(t) = t.as_mut() {
        t.record_size = record_size;
    }
    round_trip_with(codec, channels, t);
}

/// Three rounds over TLS configured as `t`, byte-identical; returns the sender's and the
/// receiver's counters.
fn round_trip_with(
    codec: CodecKind,
    channels: u16,
    t: Option<TlsConfig>,
) -> (pagewire::SessionStats, pagewire::SessionStats) {
    // Zero copy asked for: TLS must not use it (the records are sealed copies anyway).
    let c = cfg(codec, channels, t).zero_copy(pagewire::config::ZeroCopy::On);
    let size = 8 << 20;
    let src = realistic(size, 11);
    let (r, addr) = receiver(&c);
    let rt = std::thread::spawn(move || r.serve(ReceiveInto::Allocate));
    let mut s = Sender::connect(addr, c.clone(), src.clone()).unwrap();
    let sizes = [size as u64];
    s.send_round(RoundPages::all(&sizes, PS, c.pages_per_packet))
        .unwrap();
    // Two more rounds: the guest rewrites pages between them (some to zero).
    for round in 0..2u64 {
        let mut dirty = Vec::new();
        let blk = src.block(0).unwrap();
        for p in (round as usize * 3..size / PS as usize).step_by(7) {
            let off = p as u64 * PS as u64;
            let ptr = blk.range_ptr(off, PS as usize).unwrap();
            // SAFETY: inside the block; no send is running between rounds.
            let page = unsafe { std::slice::from_raw_parts_mut(ptr, PS as usize) };
            if p % 3 == 0 {
                page.fill(0);
            } else {
                page.iter_mut()
                    .enumerate()
                    .for_each(|(i, b)| *b = (i as u64 ^ round ^ p as u64) as u8);
            }
            dirty.push(off);
        }
        s.send_round(RoundPages::new(
            vec![(0, BlockPages::Offsets(dirty))],
            &sizes,
            PS,
            c.pages_per_packet,
        ))
        .unwrap();
    }
    let total = s.finish().unwrap();
    let got = rt.join().unwrap().unwrap();
    // SAFETY: both sessions are over.
    let same =
        unsafe { src.block(0).unwrap().as_slice() == got.memory.block(0).unwrap().as_slice() };
    assert!(same, "{codec:?} x{channels}: receiver memory differs");
    assert_eq!(total.rounds, 3);
    assert_eq!(total.total.zc_sends, 0, "zero copy used under TLS");
    (total, got.stats)
}

#[test]
fn round_trips_none_1_channel() {
    round_trip(CodecKind::None, 1, 16384);
}

#[test]
fn round_trips_none_2_channels() {
    round_trip(CodecKind::None, 2, 16384);
}

#[test]
fn round_trips_deflate_1_channel() {
    round_trip(CodecKind::Deflate, 1, 16384);
}

#[test]
fn round_trips_deflate_2_channels_small_records() {
    round_trip(CodecKind::Deflate, 2, 4096);
}

#[test]
fn round_trips_none_odd_record_size() {
    // Records that end in the middle of headers, length arrays and pages.
    round_trip(CodecKind::None, 1, 1000);
}

#[test]
fn long_sessions_update_keys_on_every_channel() {
    let dir = certs(&GenerateSpec::default());
    let mut t = tls(dir.path()).unwrap();
    // 2 KiB records, a KeyUpdate every 64 records (128 KiB): about 24 per channel in this
    // session (some 3 MB on each channel's wire).
    t.record_size = 2048;
    t.records_per_key = 128;
    let (sent, got) = round_trip_with(CodecKind::None, 2, Some(t));
    assert_eq!(sent.channels.len(), 2);
    for c in &sent.channels {
        eprintln!(
            "channel {}: {} wire bytes, {} key updates",
            c.channel, c.wire_bytes, c.tls_key_updates
        );
        assert!(
            c.tls_key_updates >= 10,
            "channel {}: {} key updates for {} wire bytes",
            c.channel,
            c.tls_key_updates,
            c.wire_bytes
        );
        let r = got
            .channels
            .iter()
            .find(|r| r.channel == c.channel)
            .unwrap();
        assert_eq!(
            r.tls_key_updates, c.tls_key_updates,
            "channel {}: the receiver took every KeyUpdate the sender sent",
            c.channel
        );
    }
}

/// pagewire's record layer against rustls' own: rustls opens records sealed across many
/// pagewire key updates, and pagewire follows rustls' KeyUpdates (update_requested), answering
/// each with its own before its next data.
#[test]
fn key_updates_interoperate_with_rustls() {
    use pagewire_transport::tls::{self as ptls, RecordConfig};
    let dir = certs(&GenerateSpec::default());
    let t = tls(dir.path()).unwrap();
    let (server_cfg, client_cfg) = (t.server_config().unwrap(), t.client_config().unwrap());
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let data: Vec<u8> = (0..30_000u32).map(|i| (i % 251) as u8).collect();
    let sent = data.clone();
    let server = std::thread::spawn(move || {
        let (tcp, _) = l.accept().unwrap();
        let records = RecordConfig {
            record_size: 1000,
            records_per_key: 6,
        };
        let mut s = ptls::server(tcp, server_cfg, records).unwrap();
        s.write_all(&sent).unwrap();
        for _ in 0..3 {
            let mut echo = vec![0u8; 5000];
            s.read_exact(&mut echo).unwrap();
            s.write_all(&echo).unwrap();
        }
        s.key_updates()
    });
    let tcp = TcpStream::connect(addr).unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(client_cfg, name).unwrap();
    let mut c = rustls::StreamOwned::new(conn, tcp);
    let mut ready = [0u8; 1];
    c.read_exact(&mut ready).unwrap();
    let mut got = vec![0u8; data.len()];
    c.read_exact(&mut got).unwrap();
    assert!(got == data, "rustls read back what pagewire sealed");
    for i in 0..3u8 {
        c.conn.refresh_traffic_keys().unwrap();
        let msg = vec![i + 1; 5000];
        c.write_all(&msg).unwrap();
        let mut echo = vec![0u8; 5000];
        c.read_exact(&mut echo).unwrap();
        assert!(echo == msg, "round {i}");
    }
    let (tx, rx) = server.join().unwrap();
    // 30 records at 3 per key, then 15 more each preceded by an update answering rustls.
    assert!(tx >= 9 + 3, "pagewire sent {tx} key updates");
    assert_eq!(rx, 3, "pagewire followed each of rustls' key updates");
}

/// Run a session expected to fail; returns (sender error, receiver error).
fn failing(send_cfg: SenderConfig, recv_cfg: SenderConfig) -> (String, String) {
    let (r, addr) = receiver(&recv_cfg);
    let rejections = r.watch_rejections();
    let rt = std::thread::spawn(move || r.serve(ReceiveInto::Allocate));
    let src = ascii(1 << 20);
    let s_err = match Sender::connect(addr, send_cfg.clone(), src.clone()) {
        Err(e) => e.to_string(),
        Ok(mut s) => match s
            .send_round(RoundPages::all(&[1 << 20], PS, send_cfg.pages_per_packet))
            .and_then(|_| s.finish())
        {
            Err(e) => e.to_string(),
            Ok(_) => panic!("the session succeeded"),
        },
    };
    let refused = rejections
        .recv_timeout(Duration::from_secs(5))
        .expect("the receiver refused the connection")
        .error
        .to_string();
    let serve = rt.join().unwrap();
    assert!(serve.is_err(), "the receiver got no session");
    eprintln!("sender:   {s_err}\nreceiver: {refused}");
    one_line(&s_err);
    one_line(&refused);
    (s_err, refused)
}

#[test]
fn untrusted_client_certificate() {
    let good = certs(&GenerateSpec::default());
    let other = certs(&GenerateSpec::default());
    // The sender's certificates come from another CA: neither side trusts the other.
    let (s, r) = failing(
        cfg(CodecKind::None, 1, tls(other.path())),
        cfg(CodecKind::None, 1, tls(good.path())),
    );
    assert!(s.contains("invalid peer certificate"), "sender: {s}");
    assert!(r.contains("TLS"), "receiver: {r}");
}

#[test]
fn expired_certificates() {
    let spec = GenerateSpec {
        valid_from_secs: -30 * 24 * 3600,
        valid_until_secs: -24 * 3600,
        ..GenerateSpec::default()
    };
    let old = certs(&spec);
    let (s, r) = failing(
        cfg(CodecKind::None, 1, tls(old.path())),
        cfg(CodecKind::None, 1, tls(old.path())),
    );
    assert!(s.contains("certificate expired"), "sender: {s}");
    assert!(
        r.contains("CertificateExpired") || r.contains("alert"),
        "receiver: {r}"
    );
}

#[test]
fn expired_client_certificate_is_refused_by_the_receiver() {
    let good = certs(&GenerateSpec::default());
    let spec = GenerateSpec {
        valid_from_secs: -30 * 24 * 3600,
        valid_until_secs: -24 * 3600,
        ..GenerateSpec::default()
    };
    let old = certs(&spec);
    // The sender trusts the good CA (so the receiver's certificate checks out) but presents
    // an expired certificate of another CA.
    let mixed = tempfile::tempdir().unwrap();
    std::fs::copy(
        good.path().join("ca-cert.pem"),
        mixed.path().join("ca-cert.pem"),
    )
    .unwrap();
    for f in ["client-cert.pem", "client-key.pem"] {
        std::fs::copy(old.path().join(f), mixed.path().join(f)).unwrap();
    }
    let (s, r) = failing(
        cfg(CodecKind::None, 1, tls(mixed.path())),
        cfg(CodecKind::None, 1, tls(good.path())),
    );
    assert!(r.contains("invalid peer certificate"), "receiver: {r}");
    assert!(s.contains("alert"), "sender: {s}");
}

#[test]
fn wrong_host_name() {
    let dir = certs(&GenerateSpec::default());
    let mut t = TlsConfig::from_dir(dir.path());
    t.server_name = Some("migration.example.com".into());
    let (s, r) = failing(
        cfg(CodecKind::None, 1, Some(t)),
        cfg(CodecKind::None, 1, tls(dir.path())),
    );
    assert!(s.contains("not valid for name"), "sender: {s}");
    assert!(r.contains("alert"), "receiver: {r}");
}

#[test]
fn plaintext_sender_to_tls_receiver() {
    let dir = certs(&GenerateSpec::default());
    let (s, r) = failing(
        cfg(CodecKind::None, 1, None),
        cfg(CodecKind::None, 1, tls(dir.path())),
    );
    assert!(r.contains("does not speak TLS"), "receiver: {r}");
    // At once, from the receiver's refusal (not the idle timeout), naming the setting.
    assert!(s.contains("set `tls` on both sides"), "sender: {s}");
    assert!(!s.contains("within"), "sender: {s}");
}

#[test]
fn tls_sender_to_plaintext_receiver() {
    let dir = certs(&GenerateSpec::default());
    let (s, r) = failing(
        cfg(CodecKind::None, 1, tls(dir.path())),
        cfg(CodecKind::None, 1, None),
    );
    assert!(s.contains("does not speak TLS"), "sender: {s}");
    // The sender quotes the receiver's refusal.
    assert!(s.contains("no TLS credentials"), "sender: {s}");
    assert!(r.contains("TLS handshake"), "receiver: {r}");
}

#[derive(Clone, Copy, Debug)]
enum Mangle {
    /// Flip one bit of the first record body that starts past the threshold.
    Flip,
    /// Leave out that record.
    Drop,
    /// Forward half of that record, then close.
    Truncate,
}

/// Past this many bytes a connection is a channel (control connections are far smaller).
const THRESHOLD: usize = 256 << 10;

/// A proxy that forwards connections to `to`, mangling the sender's stream of any
/// connection that carries more than THRESHOLD bytes. Parses TLS record framing.
fn proxy(to: SocketAddr, how: Mangle) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(down) = c else { return };
            let Ok(up) = TcpStream::connect(to) else {
                return;
            };
            let (mut d2, mut u2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
            // Receiver -> sender: verbatim.
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut u2, &mut d2);
                let _ = d2.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || forward(down, up, how));
        }
    });
    addr
}

fn forward(mut from: TcpStream, mut to: TcpStream, how: Mangle) {
    let mut seen = 0usize;
    let mut done = false;
    loop {
        let mut hdr = [0u8; 5];
        if from.read_exact(&mut hdr).is_err() {
            break;
        }
        let len = u16::from_be_bytes([hdr[3], hdr[4]]) as usize;
        let mut body = vec![0u8; len];
        if from.read_exact(&mut body).is_err() {
            break;
        }
        seen += 5 + len;
        if !done && seen > THRESHOLD {
            done = true;
            match how {
                Mangle::Flip => body[len / 2] ^= 0x10,
                Mangle::Drop => continue,
                Mangle::Truncate => {
                    let _ = to.write_all(&hdr);
                    let _ = to.write_all(&body[..len / 2]);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                    let _ = from.shutdown(std::net::Shutdown::Both);
                    return;
                }
            }
        }
        if to.write_all(&hdr).is_err() || to.write_all(&body).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

fn tampered(how: Mangle, codec: CodecKind) {
    let dir = certs(&GenerateSpec::default());
    let c = cfg(codec, 1, tls(dir.path()));
    let size = 8 << 20;
    let src = match codec {
        CodecKind::None => ascii(size),
        _ => realistic(size, 5),
    };
    let dst = patterned(size);
    let (r, raddr) = receiver(&c);
    let into = dst.clone();
    let rt = std::thread::spawn(move || r.serve(ReceiveInto::Memory(into)));
    let paddr = proxy(raddr, how);
    let s_err = match Sender::connect(paddr, c.clone(), src.clone()) {
        Err(e) => e.to_string(),
        Ok(mut s) => match s
            .send_round(RoundPages::all(&[size as u64], PS, c.pages_per_packet))
            .and_then(|_| s.finish())
        {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{how:?}: the session succeeded"),
        },
    };
    let r_err = rt
        .join()
        .unwrap()
        .expect_err("the receiver failed")
        .to_string();
    eprintln!("{how:?} sender:   {s_err}\n{how:?} receiver: {r_err}");
    one_line(&s_err);
    one_line(&r_err);
    match how {
        Mangle::Flip | Mangle::Drop => {
            assert!(
                r_err.contains("failed authentication"),
                "{how:?}: receiver: {r_err}"
            )
        }
        Mangle::Truncate => {
            assert!(
                r_err.contains("middle of a record"),
                "{how:?}: receiver: {r_err}"
            )
        }
    }
    // Every byte of guest memory is either untouched or the sender's: nothing of the
    // altered record (nor anything after it) was written.
    // SAFETY: both sessions are over.
    let (a, b) = unsafe {
        (
            src.block(0).unwrap().as_slice(),
            dst.block(0).unwrap().as_slice(),
        )
    };
    let foreign = a.iter().zip(b).position(|(&s, &d)| d != s && d != PATTERN);
    assert_eq!(
        foreign, None,
        "{how:?}: a byte that is neither the sender's nor untouched"
    );
    assert!(a != b, "{how:?}: the whole memory arrived");
    assert!(
        b.first() == a.first(),
        "{how:?}: the first records were applied"
    );
}

#[test]
fn flipped_byte_fails_and_writes_nothing_of_it() {
    tampered(Mangle::Flip, CodecKind::None);
}

#[test]
fn flipped_byte_in_compressed_stream() {
    tampered(Mangle::Flip, CodecKind::Deflate);
}

#[test]
fn dropped_record_fails() {
    tampered(Mangle::Drop, CodecKind::None);
}

#[test]
fn truncation_mid_record_fails() {
    tampered(Mangle::Truncate, CodecKind::None);
}

#[test]
fn missing_credentials_name_the_file() {
    let empty = tempfile::tempdir().unwrap();
    let c = cfg(CodecKind::None, 1, tls(empty.path()));
    let e = Sender::connect("127.0.0.1:9".parse().unwrap(), c, ascii(1 << 20)).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("client-cert.pem"), "{msg}");
    assert!(matches!(e, SessionError::Credentials(_)));
}

#[test]
fn a_peer_stalling_mid_handshake_is_refused_with_one_line() {
    let dir = certs(&GenerateSpec::default());
    let c = cfg(CodecKind::None, 1, tls(dir.path())).idle_timeout(Duration::from_secs(1));
    let (r, addr) = receiver(&c);
    let rejections = r.watch_rejections();
    let rt = std::thread::spawn(move || r.serve(ReceiveInto::Allocate));
    // The start of a ClientHello record, then silence.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&[0x16, 3, 1, 0, 200, 1, 0, 0]).unwrap();
    let e = rejections
        .recv_timeout(Duration::from_secs(5))
        .expect("refused")
        .error
        .to_string();
    one_line(&e);
    assert!(
        e.contains(
            "did not complete its handshake within 1.0 s (still waiting for the TLS handshake)"
        ),
        "{e}"
    );
    drop(s);
    assert!(rt.join().unwrap().is_err());
}

/// Whether userfaultfd is usable here (post-copy's destination needs it).
fn uffd_missing() -> bool {
    match pagewire::postcopy::available() {
        Ok(()) => false,
        Err(e) => {
            eprintln!("SKIPPED: userfaultfd unavailable: {e}");
            true
        }
    }
}

/// Post-copy over TLS: the urgent and background connections are TLS like the channels (same
/// certificates); a guest thread reads every page while it arrives and sees the source's bytes.
#[test]
fn postcopy_over_tls_delivers_every_page_the_guest_reads() {
    if uffd_missing() {
        return;
    }
    let dir = certs(&GenerateSpec::default());
    let mut t = tls(dir.path()).unwrap();
    // Small records and a KeyUpdate every 64 records: keys change many times on each
    // post-copy connection (the requests' direction too) while the guest reads.
    t.record_size = 2048;
    t.records_per_key = 128;
    let c = cfg(CodecKind::None, 2, Some(t));
    let size = 4 << 20;
    let src = realistic(size, 9);
    let dst = patterned(size);
    let (mut r, addr) = receiver(&c);
    // SAFETY: nothing writes the source memory during the session.
    let want: Arc<Vec<u8>> = Arc::new(unsafe { src.block(0).unwrap().as_slice() }.to_vec());
    let (seen_tx, seen) = std::sync::mpsc::channel();
    let expect = want.clone();
    r.on_postcopy(move |start| {
        let (mem, expect, tx) = (start.memory.clone(), expect.clone(), seen_tx.clone());
        std::thread::spawn(move || {
            let blk = mem.block(0).unwrap();
            let pages = blk.len() / PS as usize;
            let mut wrong = 0usize;
            // Every page, from the end backwards (against the background stream's order).
            for p in (0..pages).rev() {
                let ptr = blk
                    .range_ptr((p * PS as usize) as u64, PS as usize)
                    .unwrap();
                // SAFETY: inside the block; the read waits until post-copy placed the page.
                let page: Vec<u8> = (0..PS as usize)
                    .map(|i| unsafe { std::ptr::read_volatile(ptr.add(i)) })
                    .collect();
                if page[..] != expect[p * PS as usize..(p + 1) * PS as usize] {
                    wrong += 1;
                }
            }
            let _ = tx.send((pages, wrong));
        });
    });
    let into = dst.clone();
    let rt = std::thread::spawn(move || r.serve(ReceiveInto::Memory(into)));
    let s = Sender::connect(addr, c.clone(), src.clone()).unwrap();
    let pc = s
        .switch_to_postcopy(vec![(0, BlockPages::All)])
        .expect("post-copy on a TLS session");
    let st = pc.finish().expect("post-copy over TLS finishes");
    let got = rt.join().unwrap().expect("receiver");
    let (pages, wrong) = seen.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!((pages, wrong), (size / PS as usize, 0), "the guest's reads");
    assert_eq!(st.pages, (size / PS as usize) as u64);
    let pcs = got.postcopy.expect("post-copy ran");
    assert_eq!(pcs.pages, st.pages);
    // SAFETY: the session is over; every page is placed.
    assert!(unsafe { dst.block(0).unwrap().as_slice() } == &want[..]);
}

/// The pages of `mem`'s block 0 that are in memory (mincore): after a failed post-copy the
/// missing ones stay registered, and reading one would wait for ever.
fn resident_pages(mem: &GuestRam) -> Vec<usize> {
    let blk = mem.block(0).unwrap();
    let pages = blk.len() / PS as usize;
    let mut vec = vec![0u8; pages];
    // SAFETY: the block is mapped (page-aligned start, its length) and `vec` has a byte per
    // page.
    let r = unsafe {
        libc::mincore(
            blk.as_ptr() as *mut libc::c_void,
            blk.len(),
            vec.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
    (0..pages).filter(|&p| vec[p] & 1 == 1).collect()
}

/// Post-copy over TLS through a proxy that flips one bit of a background connection's
/// record: both sides fail with one line, and no page of that record (nor any after it)
/// is placed: every page in the destination's memory is the source's.
#[test]
fn postcopy_over_tls_flipped_byte_fails_both_sides_and_places_nothing_of_it() {
    if uffd_missing() {
        return;
    }
    let dir = certs(&GenerateSpec::default());
    // Packets of 16 pages: several whole packets pass before the altered record.
    let c = cfg(CodecKind::None, 1, tls(dir.path())).pages_per_packet(16);
    let size = 8 << 20;
    let src = ascii(size);
    let dst = patterned(size);
    let (r, raddr) = receiver(&c);
    let into = dst.clone();
    let rt = std::thread::spawn(move || r.serve(ReceiveInto::Memory(into)));
    let paddr = proxy(raddr, Mangle::Flip);
    // Pure post-copy: only the background connection carries more than THRESHOLD bytes.
    let s = Sender::connect(paddr, c.clone(), src.clone()).unwrap();
    let s_err = match s.switch_to_postcopy(vec![(0, BlockPages::All)]) {
        Err(e) => e.to_string(),
        Ok(pc) => pc.finish().expect_err("the source fails").to_string(),
    };
    let r_err = rt
        .join()
        .unwrap()
        .expect_err("the destination fails")
        .to_string();
    eprintln!("sender:   {s_err}\nreceiver: {r_err}");
    one_line(&s_err);
    one_line(&r_err);
    assert!(r_err.contains("failed authentication"), "receiver: {r_err}");
    assert!(s_err.contains("failed authentication"), "sender: {s_err}");
    let placed = resident_pages(&dst);
    eprintln!("{} of {} pages placed", placed.len(), size / PS as usize);
    assert!(
        !placed.is_empty(),
        "the records before the altered one were placed"
    );
    assert!(placed.len() < size / PS as usize, "every page was placed");
    // SAFETY: both sessions are over; only resident (placed) pages are read.
    let (a, b) = unsafe {
        (
            src.block(0).unwrap().as_slice(),
            dst.block(0).unwrap().as_slice(),
        )
    };
    for p in placed {
        let r = p * PS as usize..(p + 1) * PS as usize;
        assert!(
            a[r.clone()] == b[r],
            "page {p} placed with bytes that are not the source's"
        );
    }
}
