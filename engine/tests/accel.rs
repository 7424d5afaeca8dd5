//! Compression engines end to end: the scripted accelerator (busy answers, failures, late
//! completions) drives every fallback branch of the sender; QPL's software path and the
//! decoders cross-checked (skipped, saying so, where libqpl.so.1 is absent).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use pagewire::config::Decoder;
use pagewire::config::{Huffman, QplPath};
use pagewire::internals::testing::{Script, ScriptedAccel};
use pagewire::internals::Accelerator;
use pagewire::{
    Block, CodecKind, GuestRam, ReceiveInto, Receiver, ReceiverConfig, RoundPages, Sender,
    SenderConfig, SessionStats,
};
use pagewire_synth::{self as synth, PageSet};

const PS: u32 = 4096;

fn memory(size: usize, seed: u64) -> Arc<GuestRam> {
    let b = Block::anonymous("pc.ram", size).expect("map");
    // SAFETY: fresh block, not shared.
    synth::fill(
        PageSet::Realistic,
        unsafe { b.as_mut_slice() },
        PS as usize,
        seed,
    );
    Arc::new(GuestRam::new(vec![b]).expect("layout"))
}

fn same(a: &GuestRam, b: &GuestRam) -> bool {
    a.blocks().iter().zip(b.blocks()).all(|(x, y)| {
        // SAFETY: sessions are over.
        unsafe { x.as_slice() == y.as_slice() }
    })
}

/// Send `src` with `engines` and the receiver's `decoder`; returns (sender totals, receiver totals).
fn run(
    src: &Arc<GuestRam>,
    cfg: SenderConfig,
    engines: Option<Vec<Option<Box<dyn Accelerator>>>>,
    decoder: Decoder,
) -> (SessionStats, SessionStats) {
    let rcfg = ReceiverConfig::for_sender(&cfg).decoder(decoder);
    let mut r = Receiver::bind("127.0.0.1:0".parse().expect("addr"), rcfg).expect("bind");
    r.set_accept_timeout(Some(Duration::from_secs(10)));
    let addr = r.local_addr().expect("addr");
    let rt = std::thread::spawn(move || r.serve(ReceiveInto::Allocate));
    let mut s = match engines {
        Some(e) => Sender::connect_with_engines(addr, cfg.clone(), src.clone(), e),
        None => Sender::connect(addr, cfg.clone(), src.clone()),
    }
    .expect("connect");
    let sizes: Vec<u64> = src.blocks().iter().map(|b| b.len() as u64).collect();
    s.send_round(RoundPages::all(&sizes, PS, cfg.pages_per_packet))
        .expect("round");
    let st = s.finish().expect("finish");
    let got = rt.join().expect("join").expect("serve");
    assert!(same(src, &got.memory), "receiver memory differs");
    (st, got.stats)
}

fn cfg(codec: CodecKind, channels: u16) -> SenderConfig {
    SenderConfig::default()
        .codec(codec)
        .channels(channels)
        .idle_timeout(Duration::from_secs(10))
}

#[test]
fn scripted_busy_failures_and_late_completions_round_trip() {
    let src = memory(8 << 20, 21);
    let script = Script {
        busy: vec![0, 1, 0, 3, 0, 4, 0, 7],
        fail_every: 9,
        late_polls: 3,
        capacity: 16,
    };
    let mut counts = Vec::new();
    let engines = (0..2)
        .map(|_| {
            let (a, c) = ScriptedAccel::new(script.clone()).expect("scripted");
            counts.push(c);
            Some(Box::new(a) as Box<dyn Accelerator>)
        })
        .collect();
    let (st, rs) = run(
        &src,
        cfg(CodecKind::Deflate, 2),
        Some(engines),
        Decoder::Builtin,
    );
    let t = &st.total;
    let sum = |f: fn(&pagewire::internals::testing::ScriptCounts) -> u64| {
        counts.iter().map(|c| f(c)).sum::<u64>()
    };
    let busy = sum(|c| c.busy_answers.load(Ordering::Relaxed));
    let accepted = sum(|c| c.accepted.load(Ordering::Relaxed));
    let failed = sum(|c| c.failed.load(Ordering::Relaxed));
    let fallbacks = sum(|c| c.fallbacks.load(Ordering::Relaxed));
    // Every busy answer was retried or ended in the fallback; the fallback ran exactly for
    // pages busy more than three times.
    assert!(
        busy > 0 && failed > 0 && fallbacks > 0,
        "script did not bite: {busy} {failed} {fallbacks}"
    );
    assert_eq!(
        t.busy_retries + t.busy_fallbacks,
        busy,
        "busy answers = retries + the 4th answer of each fallback"
    );
    assert_eq!(t.busy_fallbacks, fallbacks);
    assert_eq!(
        t.jobs_hardware, accepted,
        "accepted jobs count as hardware jobs"
    );
    assert_eq!(t.jobs_software, fallbacks, "only fallbacks ran on the CPU");
    assert_eq!(t.jobs_failed, failed);
    assert!(
        t.pages_skipped > 0,
        "the mix's random pages are skipped without an attempt"
    );
    assert_eq!(
        t.jobs_hardware + t.jobs_software + t.pages_skipped,
        t.pages_normal,
        "one job per non-zero page that was not skipped"
    );
    assert!(t.pages_raw >= failed, "failed jobs are sent raw");
    assert_eq!(rs.total.pages_compressed, t.pages_compressed);
    assert_eq!(rs.total.pages_raw, t.pages_raw);
}

#[test]
fn scripted_engine_full_capacity_one() {
    // Capacity 1 and late completions: the sender must wait for the engine, never stall.
    let src = memory(2 << 20, 4);
    let script = Script {
        busy: vec![0],
        fail_every: 0,
        late_polls: 5,
        capacity: 1,
    };
    let (a, _) = ScriptedAccel::new(script).expect("scripted");
    let (st, _) = run(
        &src,
        cfg(CodecKind::Deflate, 1),
        Some(vec![Some(Box::new(a))]),
        Decoder::Builtin,
    );
    assert_eq!(
        st.total.busy_retries, 0,
        "a full engine is waited for, not counted busy"
    );
    assert!(st.total.pages_compressed > 0);
}

fn qpl_present(test: &str) -> bool {
    match qpl_sys::Qpl::load() {
        Ok(q) => {
            eprintln!("{test}: QPL {}", q.version());
            true
        }
        Err(e) => {
            eprintln!("SKIP {test}: {e}");
            false
        }
    }
}

#[test]
fn qpl_software_path_round_trip_and_counters() {
    if !qpl_present("qpl_software_path_round_trip_and_counters") {
        return;
    }
    let src = memory(16 << 20, 8);
    let mut fixed_cfg = cfg(CodecKind::Qpl, 2);
    fixed_cfg.qpl.path = QplPath::Auto;
    let (fixed, _) = run(&src, fixed_cfg.clone(), None, Decoder::Builtin);
    if pagewire::qpl_hardware_available() {
        assert!(fixed.total.jobs_hardware > 0);
    } else {
        assert_eq!(
            fixed.total.jobs_hardware, 0,
            "no IAA here: no hardware jobs"
        );
        assert_eq!(
            fixed.total.jobs_software + fixed.total.pages_skipped,
            fixed.total.pages_normal
        );
    }
    let mut dyn_cfg = fixed_cfg;
    dyn_cfg.qpl.huffman = Huffman::Dynamic;
    let (dynamic, _) = run(&src, dyn_cfg, None, Decoder::Qpl);
    assert!(
        dynamic.wire_ratio() < fixed.wire_ratio(),
        "dynamic Huffman {} must beat fixed {}",
        dynamic.wire_ratio(),
        fixed.wire_ratio()
    );
}

#[test]
fn qpl_decoder_reads_deflate_sender() {
    if !qpl_present("qpl_decoder_reads_deflate_sender") {
        return;
    }
    let src = memory(8 << 20, 2);
    let (st, rs) = run(&src, cfg(CodecKind::Deflate, 1), None, Decoder::Qpl);
    assert_eq!(st.total.pages_compressed, rs.total.pages_compressed);
}

#[test]
fn qpl_codec_without_library_is_one_clear_error() {
    if qpl_sys::Qpl::load().is_ok() {
        eprintln!(
            "SKIP qpl_codec_without_library_is_one_clear_error: libqpl.so.1 is installed here"
        );
        return;
    }
    let src = memory(1 << 20, 1);
    let err = Sender::connect(
        "127.0.0.1:9".parse().expect("addr"),
        cfg(CodecKind::Qpl, 1),
        src,
    )
    .expect_err("no libqpl");
    let msg = err.to_string();
    assert!(
        msg.contains("libqpl.so.1") && msg.contains("install"),
        "{msg}"
    );
}

/// Channels take batches from a shared cursor: a channel with a slow engine takes fewer, the
/// fast one takes the rest (no fixed round-robin stalling on the slowest).
#[test]
fn a_slow_channel_takes_fewer_batches() {
    let src = memory(16 << 20, 12);
    let slow = Script {
        busy: vec![0],
        fail_every: 0,
        late_polls: 20_000,
        capacity: 1,
    };
    let (slow, _) = ScriptedAccel::new(slow).expect("scripted");
    let fast = pagewire::internals::SoftwareDeflate::new(1).expect("deflate");
    let engines: Vec<Option<Box<dyn Accelerator>>> =
        vec![Some(Box::new(slow)), Some(Box::new(fast))];
    let (st, _) = run(
        &src,
        cfg(CodecKind::Deflate, 2),
        Some(engines),
        Decoder::Builtin,
    );
    let (p0, p1) = (st.channels[0].packets, st.channels[1].packets);
    assert_eq!(p0 + p1, 16 << 20 >> 19, "every 512 KiB batch sent once");
    assert!(
        p1 > 2 * p0,
        "the fast channel should carry most packets: slow {p0}, fast {p1}"
    );
}
