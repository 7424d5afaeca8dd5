//! Never-written memory goes as zero pages without being read (sender) or touched (receiver
//! on fresh memory), and still arrives byte for byte: anonymous memory (pagemap), sparse image
//! files mapped shared or copy-on-write (SEEK_DATA, plus pagemap for the private copies), a
//! hole the guest writes between rounds, the VMM's own hints, and a receiver whose memory is
//! not fresh.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use pagewire::{
    Block, BlockPages, CodecKind, GuestRam, ReceiveInto, Receiver, ReceiverConfig, RoundPages,
    Sender, SenderConfig, SessionStats,
};
use pagewire_synth::{self as synth, PageSet};

const PS: usize = 4096;
const MIB2: usize = 2 << 20;

fn cfg(codec: CodecKind) -> SenderConfig {
    SenderConfig::default()
        .codec(codec)
        .channels(2)
        .idle_timeout(Duration::from_secs(20))
}

/// Data pieces (2 MiB-aligned, so file-system and huge-page granularity cannot blur them):
/// (start, len) in bytes.
const PIECES: [(usize, usize); 3] = [(2 * MIB2, MIB2), (7 * MIB2, 2 * MIB2), (15 * MIB2, MIB2)];
const SIZE: usize = 16 * MIB2;

fn data_pages() -> usize {
    PIECES.iter().map(|p| p.1 / PS).sum()
}

fn hole_pages() -> usize {
    SIZE / PS - data_pages()
}

/// With transparent huge pages always on, touching one byte of anonymous memory may make its
/// whole 2 MiB present; pieces are 2 MiB-aligned within the block but the block need not be.
fn thp_always() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|s| s.contains("[always]"))
}

fn fill_pieces(bytes: &mut [u8], seed: u64) {
    for (i, &(s, l)) in PIECES.iter().enumerate() {
        synth::fill(
            PageSet::Realistic,
            &mut bytes[s..s + l],
            PS,
            seed + i as u64,
        );
        // Every piece's first page non-zero, whatever the generator chose.
        bytes[s] |= 1;
    }
}

/// Run a session: `rounds` builds each round's selection (called after `before_round(i)`).
/// Returns the sender's per-round stats, the receiver's totals and its memory.
fn session(
    src: &Arc<GuestRam>,
    cfg: SenderConfig,
    into: ReceiveInto,
    rounds: Vec<RoundPages>,
    mut between: impl FnMut(usize),
) -> (Vec<SessionStats>, SessionStats, Arc<GuestRam>) {
    let mut r = Receiver::bind(
        "127.0.0.1:0".parse().expect("addr"),
        ReceiverConfig::for_sender(&cfg),
    )
    .expect("bind");
    r.set_accept_timeout(Some(Duration::from_secs(20)));
    let addr = r.local_addr().expect("addr");
    let rt = std::thread::spawn(move || r.serve(into));
    let mut s = Sender::connect(addr, cfg, src.clone()).expect("connect");
    let mut per = Vec::new();
    for (i, round) in rounds.into_iter().enumerate() {
        if i > 0 {
            between(i);
        }
        per.push(s.send_round(round).expect("round"));
    }
    s.finish().expect("finish");
    let got = rt.join().expect("join").expect("serve");
    (per, got.stats, got.memory)
}

fn all(size: usize) -> RoundPages {
    RoundPages::all(&[size as u64], PS as u32, 128)
}

fn offsets(size: usize, offs: Vec<u64>) -> RoundPages {
    RoundPages::new(
        vec![(0, BlockPages::Offsets(offs))],
        &[size as u64],
        PS as u32,
        128,
    )
}

fn identical(a: &GuestRam, b: &GuestRam) {
    for (x, y) in a.blocks().iter().zip(b.blocks()) {
        // SAFETY: the session is over; nothing writes either memory.
        let (x, y) = unsafe { (x.as_slice(), y.as_slice()) };
        assert_eq!(x.len(), y.len());
        if let Some(p) = (0..x.len() / PS).find(|p| x[p * PS..][..PS] != y[p * PS..][..PS]) {
            panic!("page {p} differs");
        }
    }
}

#[test]
fn anonymous_holes_are_not_read_and_arrive_as_zeros_across_rounds() {
    let block = Block::anonymous("pc.ram", SIZE).expect("map");
    // SAFETY: new block, used only here before the session.
    fill_pieces(unsafe { block.as_mut_slice() }, 1);
    let src = Arc::new(GuestRam::new(vec![block]).expect("mem"));
    let holes = hole_pages() as u64;
    // Round 2: a hole page the guest writes between rounds, a data page it zeroes (the
    // receiver has data there: it must zero it, not skip it), a data page it rewrites, and a
    // hole still untouched.
    let hole_written = (5 * MIB2 + 3 * PS) as u64;
    let data_zeroed = (7 * MIB2) as u64;
    let data_rewritten = (2 * MIB2) as u64;
    let hole_untouched = (12 * MIB2) as u64;
    let round2 = offsets(
        SIZE,
        vec![hole_written, data_zeroed, data_rewritten, hole_untouched],
    );
    let srcw = src.clone();
    let (per, rstats, got) = session(
        &src,
        cfg(CodecKind::Deflate),
        ReceiveInto::Allocate,
        vec![all(SIZE), round2],
        move |_| {
            let b = srcw.block(0).expect("block");
            // SAFETY: between rounds: no channel reads the memory now.
            let bytes = unsafe { b.as_mut_slice() };
            bytes[hole_written as usize..][..PS].fill(0xAB);
            bytes[data_zeroed as usize..][..PS].fill(0);
            bytes[data_rewritten as usize..][..PS].fill(0x5C);
        },
    );
    identical(&src, &got);
    let r1 = &per[0].total;
    if thp_always() {
        assert!(r1.pages_zero_unread <= holes && r1.pages_zero_unread + 2048 >= holes);
    } else {
        assert_eq!(
            r1.pages_zero_unread, holes,
            "every hole page, and only they, unread"
        );
    }
    assert!(r1.pages_zero >= r1.pages_zero_unread);
    let r2 = &per[1].total;
    assert_eq!(
        r2.pages_normal, 2,
        "the written hole and the rewritten page"
    );
    assert_eq!(r2.pages_zero, 2);
    if !thp_always() {
        assert_eq!(r2.pages_zero_unread, 1, "the untouched hole");
    }
    // Receiver, fresh memory: every zero page of round 1 and the untouched hole of round 2
    // were left alone; the zeroed data page was not (it holds round 1's data).
    assert_eq!(
        rstats.total.pages_zero_unread,
        r1.pages_zero - r1.pages_left_out + 1
    );
}

fn sparse_file() -> std::fs::File {
    let mut f = tempfile::tempfile().expect("tempfile");
    f.set_len(SIZE as u64).expect("len");
    let mut buf = vec![0u8; SIZE];
    fill_pieces(&mut buf, 7);
    for &(s, l) in &PIECES {
        f.write_all_at(&buf[s..s + l], s as u64).expect("write");
    }
    f.flush().expect("flush");
    f
}

#[test]
fn sparse_image_shared_mapping_reads_only_its_data_and_asks_again_each_round() {
    let f = sparse_file();
    let block = Block::from_file("pc.ram", &f, false, false).expect("map");
    let src = Arc::new(GuestRam::new(vec![block]).expect("mem"));
    // Between rounds the file's owner writes into a hole (seen through the shared mapping):
    // round 2 asks again and sends it, although round 1 found a hole there (the last page of
    // the last hole before data: what each channel's last answer of round 1 covered).
    let hole_written = (15 * MIB2 - PS) as u64;
    let w = f.try_clone().expect("clone");
    // One channel: its last answer of round 1 (the hole up to the last piece) is the one a
    // stale map would reuse for round 2's page.
    let one = cfg(CodecKind::None).channels(1);
    let (per, rstats, got) = session(
        &src,
        one,
        ReceiveInto::Allocate,
        vec![all(SIZE), offsets(SIZE, vec![hole_written])],
        move |_| {
            w.write_all_at(&[0x42u8; PS], hole_written).expect("write");
        },
    );
    identical(&src, &got);
    let t = &per[0].total;
    assert_eq!(t.pages_zero_unread, hole_pages() as u64);
    assert_eq!(per[1].total.pages_normal, 1, "the written hole");
    assert_eq!(per[1].total.pages_zero_unread, 0);
    // Receiver: every zero page of round 1 that arrived (the sender left the others out: the
    // receiver's memory was all zero).
    assert_eq!(
        rstats.total.pages_zero_unread,
        t.pages_zero - t.pages_left_out
    );
    // SAFETY: the session is over.
    let page = unsafe { &got.block(0).expect("block").as_slice()[hole_written as usize..][..PS] };
    assert!(page.iter().all(|&b| b == 0x42));
}

#[test]
fn copy_on_write_image_hole_written_between_rounds_is_sent() {
    let f = sparse_file();
    let block = Block::from_file("pc.ram", &f, false, true).expect("map");
    let src = Arc::new(GuestRam::new(vec![block]).expect("mem"));
    // The file still has a hole there; the private copy holds the guest's write.
    let hole_written = (13 * MIB2 + 5 * PS) as u64;
    let srcw = src.clone();
    let (per, _, got) = session(
        &src,
        cfg(CodecKind::Deflate),
        ReceiveInto::Allocate,
        vec![all(SIZE), all(SIZE)],
        move |_| {
            let b = srcw.block(0).expect("block");
            // SAFETY: between rounds.
            let bytes = unsafe { b.as_mut_slice() };
            bytes[hole_written as usize..][..PS].fill(0x77);
        },
    );
    identical(&src, &got);
    assert_eq!(per[0].total.pages_zero_unread, hole_pages() as u64);
    // Round 2 asked the kernel again: the written hole is data now (pagemap), not a hole.
    assert_eq!(per[1].total.pages_zero_unread, hole_pages() as u64 - 1);
    // SAFETY: the session is over.
    let page = unsafe { &got.block(0).expect("block").as_slice()[hole_written as usize..][..PS] };
    assert!(page.iter().all(|&b| b == 0x77));
}

#[test]
fn receiver_memory_of_its_own_is_zeroed_and_switch_off_reads_every_page() {
    let block = Block::anonymous("pc.ram", SIZE).expect("map");
    // SAFETY: new block.
    fill_pieces(unsafe { block.as_mut_slice() }, 3);
    let src = Arc::new(GuestRam::new(vec![block]).expect("mem"));
    // The destination VMM's memory holds garbage: not fresh, every zero page must be written.
    let dst = Block::anonymous("pc.ram", SIZE).expect("map");
    // SAFETY: new block.
    unsafe { dst.as_mut_slice() }.fill(0xEE);
    let dst = Arc::new(GuestRam::new(vec![dst]).expect("mem"));
    let (per, rstats, got) = session(
        &src,
        cfg(CodecKind::None),
        ReceiveInto::Memory(dst),
        vec![all(SIZE)],
        |_| {},
    );
    identical(&src, &got);
    assert!(per[0].total.pages_zero_unread > 0);
    assert_eq!(
        rstats.total.pages_zero_unread, 0,
        "nothing is known of the VMM's memory"
    );

    // Switched off: every page read, nothing counted, same memory.
    let off = cfg(CodecKind::None).find_holes(false);
    let (per, _, got) = session(&src, off, ReceiveInto::Allocate, vec![all(SIZE)], |_| {});
    identical(&src, &got);
    assert_eq!(per[0].total.pages_zero_unread, 0);
}

#[test]
fn vmm_hint_sends_declared_ranges_as_zero_pages_unread() {
    let block = Block::anonymous("pc.ram", SIZE).expect("map");
    // SAFETY: new block.
    fill_pieces(unsafe { block.as_mut_slice() }, 5);
    let src = Arc::new(GuestRam::new(vec![block]).expect("mem"));
    // The VMM declares the second piece free (a balloon hint): it goes as zeros, unread,
    // although it holds bytes; half a page of overlap at the end does not cover that page.
    let (s, l) = PIECES[1];
    let hint = std::iter::once(s as u64..(s + l - PS / 2) as u64).collect();
    let round = all(SIZE).with_known_zero(0, hint);
    let off = cfg(CodecKind::None).find_holes(false);
    let (per, _, got) = session(&src, off, ReceiveInto::Allocate, vec![round], |_| {});
    assert_eq!(per[0].total.pages_zero_unread, (l / PS - 1) as u64);
    let b = got.block(0).expect("block");
    // SAFETY: the session is over.
    let bytes = unsafe { b.as_slice() };
    assert!(bytes[s..s + l - PS].iter().all(|&x| x == 0));
    // SAFETY: as above.
    let srcb = unsafe { src.block(0).expect("block").as_slice() };
    assert_eq!(bytes[s + l - PS..s + l], srcb[s + l - PS..s + l]);
    assert_eq!(bytes[..s], srcb[..s]);
    assert_eq!(bytes[s + l..], srcb[s + l..]);
}

#[test]
fn release_after_send_leaves_no_sent_page_resident_in_the_mapping() {
    let Ok(mut pm) = pagewire::internals::Pagemap::open() else {
        eprintln!("SKIP: /proc/self/pagemap not readable here");
        return;
    };
    let f = sparse_file();
    let resident = |b: &Block, pm: &mut pagewire::internals::Pagemap| -> u64 {
        let mut v = Vec::new();
        pm.present_ranges(b.as_ptr() as usize, b.len(), 0, &mut v)
            .expect("pagemap");
        v.iter().map(|r| r.end - r.start).sum()
    };
    for release in [false, true] {
        let mut block = Block::from_file("pc.ram", &f, false, false).expect("map");
        if release {
            block = block.release_after_send();
        }
        let src = Arc::new(GuestRam::new(vec![block]).expect("mem"));
        let (_, _, got) = session(
            &src,
            cfg(CodecKind::None),
            ReceiveInto::Allocate,
            vec![all(SIZE)],
            |_| {},
        );
        let b = src.block(0).expect("block");
        let left = resident(b, &mut pm);
        if release {
            assert_eq!(left, 0, "every sent page dropped from the mapping");
        } else {
            assert_eq!(
                left,
                data_pages() as u64 * PS as u64,
                "the data pages were read"
            );
        }
        // Dropped pages read back from the file: still identical.
        identical(&src, &got);
    }
}
