//! End-to-end over real loopback sockets and real io_uring rings: sender → receiver, and
//! sender → recorder → offline decoder.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use pagewire::decode::decode_streams;
use pagewire::{
    Block, BlockPages, CodecKind, GuestRam, ReceiveInto, Receiver, ReceiverConfig, RoundPages,
    Sender, SenderConfig,
};
use pagewire_synth::{self as synth, PageSet};
use pagewire_transport::control::{self, Message};

const PS: u32 = 4096;

fn memory(blocks: &[(&str, usize)], seed: u64) -> Arc<GuestRam> {
    let blocks = blocks
        .iter()
        .enumerate()
        .map(|(i, (name, size))| {
            let b = Block::anonymous(name, *size).expect("map");
            // SAFETY: fresh block, not shared yet.
            synth::fill(
                PageSet::Realistic,
                unsafe { b.as_mut_slice() },
                PS as usize,
                seed + i as u64,
            );
            b
        })
        .collect();
    Arc::new(GuestRam::new(blocks).expect("layout"))
}

fn same(a: &GuestRam, b: &GuestRam) -> bool {
    a.blocks().len() == b.blocks().len()
        && a.blocks().iter().zip(b.blocks()).all(|(x, y)| {
            // SAFETY: sessions are over; nothing writes either memory.
            x.name() == y.name() && unsafe { x.as_slice() == y.as_slice() }
        })
}

fn cfg(codec: CodecKind, channels: u16) -> SenderConfig {
    SenderConfig::default()
        .codec(codec)
        .channels(channels)
        .idle_timeout(Duration::from_secs(10))
}

fn receiver(c: &SenderConfig) -> (Receiver, std::net::SocketAddr) {
    let mut r = Receiver::bind(
        "127.0.0.1:0".parse().expect("addr"),
        ReceiverConfig::for_sender(c),
    )
    .expect("bind");
    r.set_accept_timeout(Some(Duration::from_secs(10)));
    let addr = r.local_addr().expect("addr");
    (r, addr)
}

fn sizes(m: &GuestRam) -> Vec<u64> {
    m.blocks().iter().map(|b| b.len() as u64).collect()
}

fn round_trip(codec: CodecKind, channels: u16) {
    let c = cfg(codec, channels);
    let src = memory(&[("pc.ram", 24 << 20), ("pc.bios", 256 << 10)], 7);
    let (r, addr) = receiver(&c);
    let rt = std::thread::spawn(move || r.serve(ReceiveInto::Allocate));
    let mut s = Sender::connect(addr, c.clone(), src.clone()).expect("connect");
    let round = s
        .send_round(RoundPages::all(&sizes(&src), PS, c.pages_per_packet))
        .expect("round");
    let total = s.finish().expect("finish");
    let got = rt.join().expect("join").expect("serve");
    assert!(
        same(&src, &got.memory),
        "receiver memory differs from the sender's"
    );
    assert_eq!(round.total.memory_bytes, src.total_len());
    assert_eq!(total.total.memory_bytes, src.total_len());
    // The receiver sees every page but the zero pages the sender left out (its memory was
    // all zero already).
    assert_eq!(
        got.stats.total.memory_bytes + total.total.pages_left_out * PS as u64,
        src.total_len()
    );
    assert_eq!(
        got.stats.total.wire_bytes, total.total.wire_bytes,
        "both ends count the same wire bytes"
    );
    assert_eq!(got.stats.rounds, 1);
    assert!(
        total.total.pages_zero > 0,
        "the realistic mix has zero pages"
    );
    match codec {
        CodecKind::None => assert_eq!(total.total.pages_compressed, 0),
        // What auto compresses depends on the link (tests/adaptive.rs).
        CodecKind::Auto => {}
        CodecKind::Deflate | CodecKind::Qpl => {
            assert!(total.total.pages_compressed > 0);
            assert!(
                total.wire_ratio() < 0.6,
                "deflate should shrink the realistic mix: {}",
                total.wire_ratio()
            );
        }
    }
    assert_eq!(total.channels.len(), channels as usize);
}

#[test]
fn round_trip_none_one_channel() {
    round_trip(CodecKind::None, 1);
}

#[test]
fn round_trip_deflate_one_channel() {
    round_trip(CodecKind::Deflate, 1);
}

#[test]
fn round_trip_deflate_three_channels() {
    round_trip(CodecKind::Deflate, 3);
}

#[test]
fn receive_into_vmm_memory_with_stale_content() {
    // The destination's memory starts non-zero: zero pages must be zeroed, others overwritten.
    let c = cfg(CodecKind::Deflate, 2);
    let src = memory(&[("pc.ram", 8 << 20)], 3);
    let dst = Block::anonymous("pc.ram", 8 << 20).expect("map");
    // SAFETY: fresh block.
    unsafe { dst.as_mut_slice() }.fill(0x5A);
    let dst = Arc::new(GuestRam::new(vec![dst]).expect("layout"));
    let (r, addr) = receiver(&c);
    let d2 = dst.clone();
    let rt = std::thread::spawn(move || r.serve(ReceiveInto::Memory(d2)));
    let mut s = Sender::connect(addr, c.clone(), src.clone()).expect("connect");
    s.send_round(RoundPages::all(&sizes(&src), PS, c.pages_per_packet))
        .expect("round");
    s.finish().expect("finish");
    rt.join().expect("join").expect("serve");
    assert!(same(&src, &dst));
}

/// Several rounds with pages changed and resent between them, over several channels: the
/// receiver ends with the sender's final memory (an older copy never overwrites a newer one).
#[test]
fn rounds_resend_changed_pages() {
    let c = cfg(CodecKind::Deflate, 2).pages_per_packet(16);
    let src = memory(&[("pc.ram", 4 << 20)], 11);
    let (r, addr) = receiver(&c);
    let rt = std::thread::spawn(move || r.serve(ReceiveInto::Allocate));
    let mut s = Sender::connect(addr, c.clone(), src.clone()).expect("connect");
    s.send_round(RoundPages::all(&sizes(&src), PS, c.pages_per_packet))
        .expect("round 1");
    let block = src.block(0).expect("block");
    for round in 0..3u8 {
        // Rewrite every 3rd page with the round number (and page 0 always), then resend them.
        let mut dirty = Vec::new();
        for p in (0..block.len() / PS as usize).step_by(3) {
            // SAFETY: no session is reading the memory between rounds in this test.
            let page = unsafe { &mut block.as_mut_slice()[p * PS as usize..(p + 1) * PS as usize] };
            page.fill(round.wrapping_mul(31).wrapping_add(p as u8));
            dirty.push((p * PS as usize) as u64);
        }
        let st = s
            .send_round(RoundPages::new(
                vec![(0, BlockPages::Offsets(dirty.clone()))],
                &sizes(&src),
                PS,
                c.pages_per_packet,
            ))
            .expect("round");
        assert_eq!(
            st.total.pages_normal + st.total.pages_zero,
            dirty.len() as u64
        );
    }
    // Device state travels after the last round, in order.
    s.send_state(b"vcpu0: rip=0x1000 rsp=0x8000")
        .expect("state");
    s.send_state(&vec![0x5A; 100_000]).expect("state");
    let total = s.finish().expect("finish");
    assert_eq!(total.rounds, 4);
    let got = rt.join().expect("join").expect("serve");
    assert_eq!(got.stats.rounds, 4);
    assert_eq!(
        got.state,
        vec![
            b"vcpu0: rip=0x1000 rsp=0x8000".to_vec(),
            vec![0x5A; 100_000]
        ]
    );
    assert!(same(&src, &got.memory));
}

/// A receiver that records each channel's bytes verbatim and acknowledges rounds.
fn recorder(listener: TcpListener, channels: usize) -> std::thread::JoinHandle<Vec<Vec<u8>>> {
    std::thread::spawn(move || {
        let (mut ctl, _) = listener.accept().expect("accept control");
        control::read_preamble(&mut ctl).expect("preamble");
        let challenge = Message::Challenge {
            nonce: [7; 32],
            secret_required: false,
        };
        control::write_message(&mut ctl, &challenge).expect("challenge");
        match control::read_message(&mut ctl).expect("hello") {
            Message::Hello(h) => assert_eq!(h.channels as usize, channels),
            other => panic!("expected hello, got {other:?}"),
        }
        control::write_message(
            &mut ctl,
            &Message::HelloOk {
                proof: None,
                fresh: false,
            },
        )
        .expect("hello-ok");
        let readers: Vec<_> = (0..channels)
            .map(|_| {
                let (mut s, _): (TcpStream, _) = listener.accept().expect("accept channel");
                std::thread::spawn(move || {
                    let mut v = Vec::new();
                    s.read_to_end(&mut v).expect("record");
                    v
                })
            })
            .collect();
        loop {
            match control::read_message(&mut ctl).expect("control") {
                Message::RoundEnd { round } => {
                    control::write_message(&mut ctl, &Message::RoundDone { round })
                        .expect("round-done")
                }
                Message::End => {
                    control::write_message(&mut ctl, &Message::EndOk).expect("end-ok");
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        readers
            .into_iter()
            .map(|h| h.join().expect("reader"))
            .collect()
    })
}

/// The packets of a recorded channel stream, in order: 'S' for a SYNC, 'D' for a packet with
/// pages.
fn cadence(stream: &[u8], ppp: u32) -> Vec<char> {
    let hlen = pagewire_transport::wire::header_len(ppp);
    let be32 = |at: usize| u32::from_be_bytes(stream[at..at + 4].try_into().expect("4 bytes"));
    let mut at = pagewire_transport::wire::INIT_PACKET_LEN;
    let mut kinds = Vec::new();
    while at < stream.len() {
        let flags = be32(at + 8);
        let next = be32(at + 20) as usize;
        kinds.push(if flags & pagewire_transport::wire::FLAG_SYNC != 0 {
            'S'
        } else {
            'D'
        });
        at += hlen + next;
    }
    assert_eq!(at, stream.len(), "the stream ends at a packet boundary");
    kinds
}

fn record_and_decode(codec: CodecKind) {
    let c = cfg(codec, 2).pages_per_packet(32);
    let src = memory(&[("pc.ram", 6 << 20), ("vga.vram", 1 << 20)], 5);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let rec = recorder(listener, 2);
    let mut s = Sender::connect(addr, c.clone(), src.clone()).expect("connect");
    s.send_round(RoundPages::all(&sizes(&src), PS, c.pages_per_packet))
        .expect("round 1");
    // Round 2 changes pages and resends them; decode must apply round 2 after round 1.
    let block = src.block(0).expect("block");
    let dirty: Vec<u64> = (0..64u64).map(|p| p * 5 * PS as u64).collect();
    for &off in &dirty {
        // SAFETY: no session reads the memory between rounds here.
        unsafe {
            block.as_mut_slice()[off as usize..off as usize + PS as usize]
                .fill((off / 4096) as u8 | 1)
        };
    }
    s.send_round(RoundPages::new(
        vec![(0, BlockPages::Offsets(dirty))],
        &sizes(&src),
        PS,
        c.pages_per_packet,
    ))
    .expect("round 2");
    let sent = s.finish().expect("finish");
    let streams = rec.join().expect("recorder");
    assert_eq!(streams.len(), 2);
    let recorded: u64 = streams.iter().map(|v| v.len() as u64).sum();
    assert_eq!(
        recorded, sent.total.wire_bytes,
        "recorded bytes equal the sender's wire count"
    );

    let out = GuestRam::new(vec![
        Block::anonymous("pc.ram", 6 << 20).expect("map"),
        Block::anonymous("vga.vram", 1 << 20).expect("map"),
    ])
    .expect("layout");
    // Decode the captures in reverse channel order: the channel id comes from the init packet.
    let captures: Vec<(String, &[u8])> = streams
        .iter()
        .enumerate()
        .rev()
        .map(|(i, v)| (format!("chan{i}"), v.as_slice()))
        .collect();
    // QEMU's cadence on every recorded stream: a SYNC right after the init packet, no data
    // before it, a SYNC closing each round, so rounds + 1 SYNCs, and the stream ends on one.
    for (i, v) in streams.iter().enumerate() {
        let kinds = cadence(v, c.pages_per_packet);
        assert_eq!(kinds.first(), Some(&'S'), "channel {i}: {kinds:?}");
        assert_eq!(kinds.last(), Some(&'S'), "channel {i}: {kinds:?}");
        assert_eq!(
            kinds.iter().filter(|&&k| k == 'S').count(),
            2 + 1,
            "channel {i}: {kinds:?}"
        );
    }
    let st = decode_streams(&out, captures, PS).expect("decode");
    assert_eq!(st.rounds, 2);
    assert!(st.opening_sync);
    assert_eq!(st.pages_per_packet, 32);
    assert_eq!(
        st.compression,
        if codec == CodecKind::None {
            "none"
        } else {
            "qpl"
        }
    );
    assert!(
        same(&src, &out),
        "decoded image differs from the sender's final memory"
    );
}

#[test]
fn recorded_streams_decode_none() {
    record_and_decode(CodecKind::None);
}

#[test]
fn recorded_streams_decode_deflate() {
    record_and_decode(CodecKind::Deflate);
}

#[test]
fn truncated_capture_is_an_error_naming_channel_and_packet() {
    let c = cfg(CodecKind::Deflate, 1).pages_per_packet(32);
    let src = memory(&[("pc.ram", 1 << 20)], 9);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let rec = recorder(listener, 1);
    let mut s = Sender::connect(addr, c.clone(), src.clone()).expect("connect");
    s.send_round(RoundPages::all(&sizes(&src), PS, c.pages_per_packet))
        .expect("round");
    s.finish().expect("finish");
    let mut streams = rec.join().expect("recorder");
    let v = streams.remove(0);
    // Cut in the middle of the stream: inside some packet's header, length array or payload.
    let cut = &v[..v.len() / 2];
    let out =
        GuestRam::new(vec![Block::anonymous("pc.ram", 1 << 20).expect("map")]).expect("layout");
    let err = decode_streams(&out, vec![("cap".to_string(), cut)], PS).expect_err("truncated");
    let msg = err.to_string();
    assert!(msg.contains("channel 0"), "{msg}");
    assert!(msg.contains("packet #"), "{msg}");
    assert!(msg.contains("mid-"), "{msg}");
}

#[test]
fn sender_fails_fast_when_receiver_rejects_layout() {
    let c = cfg(CodecKind::Deflate, 1);
    let src = memory(&[("pc.ram", 1 << 20)], 1);
    let dst = Arc::new(
        GuestRam::new(vec![Block::anonymous("pc.ram", 2 << 20).expect("map")]).expect("layout"),
    );
    let (mut r, addr) = receiver(&c);
    r.set_accept_timeout(Some(Duration::from_secs(1)));
    let refusals = r.watch_rejections();
    let rt = std::thread::spawn(move || r.serve(ReceiveInto::Memory(dst)));
    let err = Sender::connect(addr, c, src).expect_err("layout mismatch must be refused");
    let msg = err.to_string();
    assert!(msg.contains("pc.ram") && msg.contains("bytes"), "{msg}");
    // The receiver refuses that hello (one logged line) and keeps waiting for a sender that
    // fits; when none comes, it says why the last one was refused.
    let refused = refusals
        .recv_timeout(Duration::from_secs(5))
        .expect("refusal reported");
    assert!(
        refused.error.to_string().contains("pc.ram"),
        "{}",
        refused.error
    );
    let rerr = rt.join().expect("join").expect_err("no session came");
    assert!(
        matches!(rerr, pagewire::SessionError::NoSession { refused: 1, .. }),
        "{rerr:?}"
    );
    assert!(rerr.to_string().contains("pc.ram"), "{rerr}");
}

#[test]
fn abort_stops_a_running_round() {
    let c = cfg(CodecKind::Deflate, 2).idle_timeout(Duration::from_secs(5));
    let src = memory(&[("pc.ram", 64 << 20)], 2);
    let (r, addr) = receiver(&c);
    let rt = std::thread::spawn(move || r.serve(ReceiveInto::Allocate));
    let mut s = Sender::connect(addr, c.clone(), src.clone()).expect("connect");
    let h = s.abort_handle();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        h.abort();
    });
    let t = std::time::Instant::now();
    let res = s.send_round(RoundPages::all(&sizes(&src), PS, c.pages_per_packet));
    assert!(
        matches!(res, Err(pagewire::SessionError::Aborted)),
        "{res:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    drop(s);
    assert!(
        rt.join().expect("join").is_err(),
        "receiver sees the aborted session as a failure"
    );
}

#[test]
fn zero_copy_round_trip_waits_for_every_notification() {
    use pagewire::config::ZeroCopy;
    for codec in [CodecKind::None, CodecKind::Deflate] {
        let c = cfg(codec, 2).zero_copy(ZeroCopy::On);
        let src = memory(&[("pc.ram", 16 << 20)], 31);
        let (r, addr) = receiver(&c);
        let rt = std::thread::spawn(move || r.serve(ReceiveInto::Allocate));
        let mut s = Sender::connect(addr, c.clone(), src.clone()).expect("connect");
        s.send_round(RoundPages::all(&sizes(&src), PS, c.pages_per_packet))
            .expect("round");
        let st = s.finish().expect("finish");
        let got = rt.join().expect("join").expect("serve");
        assert!(same(&src, &got.memory), "{codec:?}: memory differs");
        let t = &st.total;
        assert!(t.zc_sends > 0, "{codec:?}: zero copy was not used: {t:?}");
        assert_eq!(
            t.zc_notifications, t.zc_sends,
            "{codec:?}: every zero-copy send's notification was awaited"
        );
        assert_eq!(
            t.zc_copied, t.zc_notifications,
            "{codec:?}: loopback copies every zero-copy send"
        );
    }
}

#[test]
fn unregistered_receive_buffers_round_trip() {
    let c = cfg(CodecKind::Deflate, 2);
    let src = memory(&[("pc.ram", 8 << 20)], 32);
    let mut r = Receiver::bind(
        "127.0.0.1:0".parse().expect("addr"),
        ReceiverConfig::for_sender(&c).registered_buffers(false),
    )
    .expect("bind");
    r.set_accept_timeout(Some(Duration::from_secs(10)));
    let addr = r.local_addr().expect("addr");
    let rt = std::thread::spawn(move || r.serve(ReceiveInto::Allocate));
    let mut s = Sender::connect(addr, c.clone(), src.clone()).expect("connect");
    s.send_round(RoundPages::all(&sizes(&src), PS, c.pages_per_packet))
        .expect("round");
    s.finish().expect("finish");
    let got = rt.join().expect("join").expect("serve");
    assert!(same(&src, &got.memory));
    assert_eq!(got.stats.total.reads_fixed, 0);
}

/// A guest that keeps rewriting its pages while a round compresses them: every page may be
/// read torn, but the stream must stay valid (the sender compresses a private copy, never the
/// page in place), and a final round with the guest stopped makes the destination identical.
#[test]
fn pages_rewritten_during_compression_never_break_the_stream() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let c = cfg(CodecKind::Deflate, 1).pages_per_packet(16);
    // A small, hot memory: the guest rewrites all of it all the time.
    let src = memory(&[("pc.ram", 64 * 4096)], 41);
    let (r, addr) = receiver(&c);
    let rt = std::thread::spawn(move || r.serve(ReceiveInto::Allocate));
    let mut s = Sender::connect(addr, c.clone(), src.clone()).expect("connect");
    let stop = Arc::new(AtomicBool::new(false));
    let base = src.block(0).expect("block").as_ptr() as usize;
    let len = src.block(0).expect("block").len();
    /// Stops and joins the guest thread when dropped, also when a round fails and the test
    /// unwinds: the memory it writes must not be unmapped under it.
    struct Guest(Arc<AtomicBool>, Option<std::thread::JoinHandle<()>>);
    impl Drop for Guest {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
            if let Some(h) = self.1.take() {
                let _ = h.join();
            }
        }
    }
    let mut guest = Guest(stop.clone(), None);
    guest.1 = Some({
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut v = 1u64;
            while !stop.load(Ordering::Relaxed) {
                // Rewrite every word with small values (compressible bytes that keep changing).
                for off in (0..len).step_by(8) {
                    v = v
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    // SAFETY: `off + 8 <= len` inside the block, which outlives this thread
                    // (joined by `Guest`'s drop, before `src` can go); a concurrent write is
                    // what a running guest does.
                    unsafe { std::ptr::write_volatile((base + off) as *mut u64, v >> 40) };
                }
            }
        })
    });
    for _ in 0..300 {
        s.send_round(RoundPages::all(&sizes(&src), PS, c.pages_per_packet))
            .expect("a round while the guest writes");
    }
    drop(guest);
    // The last round, guest stopped: every page again.
    s.send_round(RoundPages::all(&sizes(&src), PS, c.pages_per_packet))
        .expect("final round");
    s.finish().expect("finish");
    let got = rt.join().expect("join").expect("serve");
    assert!(same(&src, &got.memory));
}
