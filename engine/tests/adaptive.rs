//! Codec auto and the bandwidth cap, end to end over loopback with real rings: streams stay
//! byte-identical whatever mix of raw and compressed pages auto chooses; under a tight cap
//! (the cap is the link) auto compresses; the cap holds the session's wire rate.

use std::sync::Arc;
use std::time::Duration;

use pagewire::internals::Accelerator;
use pagewire::{
    Block, CodecKind, GuestRam, ReceiveInto, Receiver, ReceiverConfig, RoundPages, Sender,
    SenderConfig, SessionStats,
};

const PS: usize = 4096;

/// Guest-like memory without the synth module: a quarter zero pages, half text-like pages
/// (compressible), a quarter random bytes (incompressible).
fn memory(size: usize, seed: u64) -> Arc<GuestRam> {
    let b = Block::anonymous("pc.ram", size).expect("map");
    // SAFETY: fresh block, not shared yet.
    let bytes = unsafe { b.as_mut_slice() };
    let mut x = seed | 1;
    for (i, page) in bytes.chunks_mut(PS).enumerate() {
        match i % 4 {
            0 => {}
            3 => {
                for w in page.chunks_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
                }
            }
            _ => {
                let line = format!("page {i}: the quick brown fox {x} jumps over the lazy dog; ");
                for (j, c) in page.iter_mut().enumerate() {
                    *c = line.as_bytes()[j % line.len()];
                }
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
        }
    }
    Arc::new(GuestRam::new(vec![b]).expect("layout"))
}

fn run(src: &Arc<GuestRam>, cfg: SenderConfig) -> SessionStats {
    run_with(src, cfg, None)
}

/// One round of all of `src`, checked byte for byte; `engines`: the channels' compression
/// engines (`None`: the ones `cfg` asks for).
fn run_with(
    src: &Arc<GuestRam>,
    cfg: SenderConfig,
    engines: Option<Vec<Option<Box<dyn Accelerator>>>>,
) -> SessionStats {
    let mut r = Receiver::bind(
        "127.0.0.1:0".parse().expect("addr"),
        ReceiverConfig::for_sender(&cfg),
    )
    .expect("bind");
    r.set_accept_timeout(Some(Duration::from_secs(10)));
    let addr = r.local_addr().expect("addr");
    let rt = std::thread::spawn(move || r.serve(ReceiveInto::Allocate));
    let mut s = match engines {
        Some(e) => Sender::connect_with_engines(addr, cfg.clone(), src.clone(), e),
        None => Sender::connect(addr, cfg.clone(), src.clone()),
    }
    .expect("connect");
    let sizes = [src.total_len()];
    let round = s
        .send_round(RoundPages::all(&sizes, cfg.page_size, cfg.pages_per_packet))
        .expect("round");
    s.finish().expect("finish");
    let got = rt.join().expect("join").expect("serve");
    // SAFETY: the session is over; nothing writes either memory.
    let same = unsafe {
        src.block(0).expect("b").as_slice() == got.memory.block(0).expect("b").as_slice()
    };
    assert!(same, "receiver memory differs from the sender's");
    round
}

/// Every data page is accounted for: compressed, raw by auto's choice, or incompressible.
fn assert_accounted(st: &SessionStats) {
    let t = &st.total;
    assert_eq!(
        t.pages_compressed + t.pages_raw_chosen + t.pages_incompressible + t.jobs_failed,
        t.pages_normal,
        "{t:?}"
    );
    assert_eq!(t.pages_compressed + t.pages_raw, t.pages_normal);
}

#[test]
fn auto_is_the_default_and_round_trips() {
    assert_eq!(SenderConfig::default().codec, CodecKind::Auto);
    let src = memory(32 << 20, 3);
    let st = run(&src, SenderConfig::default().channels(2));
    assert_accounted(&st);
    // Loopback carries raw pages faster than they compress: auto sends most of them raw.
    assert!(
        st.total.pages_raw_chosen > st.total.pages_normal / 2,
        "loopback: {st:?}"
    );
}

/// A cap far below what loopback carries: the cap is the link, so auto compresses nearly
/// every compressible page.
#[test]
fn auto_compresses_under_a_tight_cap() {
    let src = memory(16 << 20, 5);
    let st = run(
        &src,
        SenderConfig::default()
            .channels(2)
            .max_bandwidth(pagewire::Rate::bytes_per_sec(20_000_000)),
    );
    assert_accounted(&st);
    let t = &st.total;
    // Half the pages are text: compressible.
    let compressible = (16 << 20) / PS as u64 / 2;
    assert!(
        t.pages_compressed > compressible * 8 / 10,
        "compressed {} of {compressible} compressible pages: {t:?}",
        t.pages_compressed
    );
    assert!(t.link_rate > 0.0, "link rate measured: {t:?}");
    assert!(
        t.pages_incompressible > 0,
        "random pages sent raw as such: {t:?}"
    );
}

/// The cap holds the session's wire rate (loosely here; docs/benchmarks.md measures it).
#[test]
fn max_bandwidth_holds_the_wire_rate() {
    let src = memory(48 << 20, 7);
    let cap = 60_000_000u64;
    let st = run(
        &src,
        SenderConfig::default()
            .codec(CodecKind::None)
            .channels(2)
            .max_bandwidth(pagewire::Rate::bytes_per_sec(cap)),
    );
    let rate = st.total.wire_bytes as f64 / st.seconds;
    assert!(
        rate <= cap as f64 * 1.10 && rate >= cap as f64 * 0.85,
        "wire rate {rate:.0} B/s under a cap of {cap} B/s ({} bytes in {:.3} s)",
        st.total.wire_bytes,
        st.seconds
    );
}

/// A ladder (`AutoCompressor::Ladder`: the channel's own engine, here the scripted one, and
/// the deflate codec's compressor as the stronger rung) under a cap far below what loopback
/// carries: the backlog is long, so the stronger compressor takes pages; the stream stays
/// byte-identical.
#[test]
fn a_ladder_under_a_tight_cap_uses_the_stronger_compressor() {
    use pagewire::internals::testing::{Script, ScriptedAccel};
    use pagewire::AutoCompressor;
    let src = memory(16 << 20, 7);
    let cfg = SenderConfig::default()
        .channels(2)
        .max_bandwidth(pagewire::Rate::bytes_per_sec(20_000_000))
        .auto_compressor(AutoCompressor::Ladder);
    let engines = (0..cfg.channels)
        .map(|_| {
            let (a, _) = ScriptedAccel::new(Script::default()).expect("engine");
            Some(Box::new(a) as Box<dyn Accelerator>)
        })
        .collect();
    let st = run_with(&src, cfg, Some(engines));
    assert_accounted(&st);
    let t = &st.total;
    assert!(
        t.pages_compressed_strong > t.pages_compressed / 2,
        "the stronger compressor took {} of {} compressed pages: {t:?}",
        t.pages_compressed_strong,
        t.pages_compressed
    );
}
