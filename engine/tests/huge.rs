//! Huge guests holding little data: a receiver allocating the memory counts what the data
//! commits against `max_memory`, not the guest's size; a guest larger than the bound on what it
//! maps is refused at the hello, and data committing more than `max_memory` fails the session
//! with one line, before it lands.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pagewire::error::ChannelErrorKind;
use pagewire::{
    Block, CodecKind, GuestRam, ReceiveInto, Received, Receiver, ReceiverConfig, RoundPages,
    Sender, SenderConfig, SessionError, SessionStats,
};
use pagewire_synth::{self as synth, PageSet};

const PS: u32 = 4096;
const MIB: u64 = 1 << 20;

/// A guest of `size` bytes whose only data is `data` bytes of the realistic mix in four
/// pieces spread over it; the rest was never written (the sender finds it holds nothing).
fn guest(size: u64, data: u64) -> Arc<GuestRam> {
    let b = Block::anonymous("pc.ram", size as usize).expect("map");
    let piece = data / 4;
    for i in 0..4 {
        let at = (i * (size / 4)) as usize;
        // SAFETY: fresh block, not shared yet; the range is inside it (piece <= size / 4).
        let s = unsafe { &mut b.as_mut_slice()[at..at + piece as usize] };
        synth::fill(PageSet::Realistic, s, PS as usize, 7 + i);
    }
    Arc::new(GuestRam::new(vec![b]).expect("layout"))
}

/// The sender's settings and the receiver's, which may commit `max_memory`.
struct Cfg {
    send: SenderConfig,
    max_memory: u64,
}

fn cfg(max_memory: u64) -> Cfg {
    Cfg {
        send: SenderConfig::default()
            .codec(CodecKind::None)
            .channels(2)
            .idle_timeout(Duration::from_secs(10)),
        max_memory,
    }
}

/// One round of every page through a receiver allocating the memory; both sides' results.
fn migrate(
    cfg: &Cfg,
    src: &Arc<GuestRam>,
) -> (
    Result<SessionStats, SessionError>,
    Result<Received, SessionError>,
) {
    let c = &cfg.send;
    let rcfg = ReceiverConfig::for_sender(c).max_memory(cfg.max_memory);
    let mut r = Receiver::bind("127.0.0.1:0".parse().expect("addr"), rcfg).expect("bind");
    r.set_accept_timeout(Some(Duration::from_secs(20)));
    let addr: SocketAddr = r.local_addr().expect("addr");
    let rt = std::thread::spawn(move || r.serve(ReceiveInto::Allocate));
    let size = src.total_len();
    let sent = (|| {
        let mut s = Sender::connect(addr, c.clone(), src.clone())?;
        s.send_round(RoundPages::all(&[size], PS, c.pages_per_packet))?;
        s.finish()
    })();
    (sent, rt.join().expect("join"))
}

fn same(a: &GuestRam, b: &GuestRam) -> bool {
    // SAFETY: the session is over; nothing writes either memory.
    unsafe { a.blocks()[0].as_slice() == b.blocks()[0].as_slice() }
}

#[test]
fn a_guest_larger_than_max_memory_with_little_data_moves() {
    // 128 MiB guest, 4 MiB of data, a receiver that may commit 16 MiB.
    let c = cfg(16 * MIB);
    let src = guest(128 * MIB, 4 * MIB);
    let (sent, got) = migrate(&c, &src);
    let sent = sent.expect("sender");
    let got = got.expect("receiver");
    assert!(same(&src, &got.memory), "memory differs");
    // The receiver's memory is all zero, so the never-written pages went in no packet: the
    // sender left them out, and the receiver saw at most the data's pages.
    let holes = 124 * MIB / PS as u64;
    assert!(
        sent.total.pages_left_out >= holes,
        "pages left out: {} of {holes} never written",
        sent.total.pages_left_out
    );
    let seen = got.stats.total.pages_normal + got.stats.total.pages_zero;
    assert!(seen <= 4 * MIB / PS as u64, "receiver saw {seen} pages");
}

#[test]
fn data_committing_more_than_max_memory_fails_before_it_lands() {
    // 64 MiB guest, 32 MiB of data, a receiver that may commit 8 MiB.
    let c = cfg(8 * MIB);
    let src = guest(64 * MIB, 32 * MIB);
    let (sent, got) = migrate(&c, &src);
    let e = got.expect_err("the receiver committed more than max_memory");
    let text = e.to_string();
    match &e {
        SessionError::Channel(ch) => match ch.kind {
            ChannelErrorKind::MemoryLimit { committed, limit } => {
                assert_eq!(limit, 8 * MIB);
                // Refused at the first page over the limit: no more than one packet's claims
                // per channel past it.
                assert!(
                    committed > limit && committed <= limit + 2 * 128 * PS as u64,
                    "{text}"
                );
            }
            ref other => panic!("expected a memory limit, got {other:?}"),
        },
        other => panic!("expected a channel error, got {other:?} ({other})"),
    }
    assert!(text.contains("max_memory"), "{text}");
    let s = sent.expect_err("the sender succeeded");
    assert!(s.to_string().contains("max_memory"), "sender: {s}");
}

#[test]
fn a_guest_over_the_mapping_bound_is_refused_at_the_hello() {
    // 1 MiB of max_memory maps at most 256 MiB; the sender's guest is 512 MiB (untouched).
    let c = cfg(MIB);
    let src = guest(512 * MIB, 0);
    let rcfg = ReceiverConfig::for_sender(&c.send).max_memory(c.max_memory);
    let mut r = Receiver::bind("127.0.0.1:0".parse().expect("addr"), rcfg).expect("bind");
    r.set_accept_timeout(Some(Duration::from_secs(5)));
    let addr = r.local_addr().expect("addr");
    let rejections = r.watch_rejections();
    let _rt = std::thread::spawn(move || r.serve(ReceiveInto::Allocate));
    let Err(e) = Sender::connect(addr, c.send, src) else {
        panic!("the hello was accepted");
    };
    assert!(
        e.to_string().contains("the most this receiver maps"),
        "sender: {e}"
    );
    let rej = rejections
        .recv_timeout(Duration::from_secs(10))
        .expect("a refusal");
    assert!(
        rej.error.to_string().contains("256 x its max_memory"),
        "{}",
        rej.error
    );
}
