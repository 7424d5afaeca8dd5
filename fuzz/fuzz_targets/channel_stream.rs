//! A whole channel stream through the receiver's decode path (`pagewire::decode::decode_streams`,
//! which validates and applies packets with the live receiver's code) into a small guest
//! memory: `pc.ram` of 64 pages and `vga` of 8 pages, 4 KiB pages.
//!
//! Two input modes, chosen by the first byte:
//!
//! * odd: the rest of the input is the channel stream, byte for byte.
//! * even: the input is a recipe the target turns into one or two channel streams that start
//!   with a valid init packet and are made of valid packets (built with `encode_header`,
//!   pages compressed with the engine's DEFLATE compressor) mixed with hostile ones: corrupt,
//!   oversized, undersized, trailing or fuzzer-written DEFLATE, zlen 0 or > page size,
//!   header fields overwritten, raw bytes, streams cut mid-packet. This reaches payload
//!   decoding at once instead of waiting for the fuzzer to guess a header.
//!
//! Properties, for any input: `decode_streams` returns `Ok` or `Err`, never panics (nor
//! aborts, reads or writes out of bounds: the run uses AddressSanitizer). In recipe mode, when
//! every packet built was valid, the decode must succeed; with a single channel the guest
//! memory must then equal a model that applied the same pages in order, and the counters
//! (pages, SYNCs, wire bytes) must match what was sent.

#![no_main]

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

use libfuzzer_sys::fuzz_target;
use pagewire::internals::{DeflateCompressor, PageCompressor};
use pagewire::decode::{decode_streams, decode_streams_with};
use pagewire::{Block, GuestRam};
use pagewire_transport::wire::{
    encode_header, header_len, Compression, HeaderFields, InitPacket, FLAG_SYNC,
};

const PS: usize = 4096;
const BLOCKS: [(&str, usize); 2] = [("pc.ram", 64), ("vga", 8)];
const UUID: [u8; 16] = *b"fuzz-channel-uid";
/// Upper bound on packets built from one recipe (keeps an execution short).
const MAX_PACKETS: usize = 48;
/// A QEMU >= 9.2 SYNC (pages_alloc 0, everything else zero) sent at full header length is a
/// valid packet (docs/wire-format.md §1.6). The offline decoder once read only its first 320
/// bytes (found by this target; docs/fuzzing.md, "Findings"); fixed, so it counts as valid.
const QEMU_SYNC_COUNTS_AS_VALID: bool = true;

fn memory() -> GuestRam {
    let blocks = BLOCKS
        .iter()
        .map(|&(name, pages)| Block::anonymous(name, pages * PS).expect("map guest block"))
        .collect();
    GuestRam::new(blocks).expect("guest memory")
}

/// Input bytes consumed front to back; zeros once exhausted.
struct Src<'a>(&'a [u8]);

impl<'a> Src<'a> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        (u64::from(self.u32()) << 32) | u64::from(self.u32())
    }
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A page of one of four kinds: zero, one byte repeated, short repeated text (compresses
/// well), noise (does not compress: sent raw in the qpl framing).
fn page(kind: u8, seed: u8) -> Vec<u8> {
    match kind % 4 {
        0 => vec![0; PS],
        1 => vec![seed | 1; PS],
        2 => {
            let word = format!("page {seed} of guest memory; ");
            word.bytes().cycle().take(PS).collect()
        }
        _ => {
            let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ u64::from(seed);
            (0..PS)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 24) as u8
                })
                .collect()
        }
    }
}

/// Per-thread helpers kept across executions: the compressor (libdeflate keeps no state
/// between pages) and the generated pages with their compressed form (generating and
/// compressing 4 KiB under coverage instrumentation would otherwise dominate an execution).
#[derive(Default)]
struct Tools {
    comp: DeflateCompressor,
    pages: HashMap<(u8, u8), (Vec<u8>, Option<Vec<u8>>)>,
}

impl Tools {
    fn compress(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        let mut out = vec![0u8; PS - 1];
        let n = self.comp.compress(data, &mut out)?;
        out.truncate(n);
        Some(out)
    }

    /// A page and its compressed form (`None`: does not shrink, sent raw).
    fn page(&mut self, kind: u8, seed: u8) -> (Vec<u8>, Option<Vec<u8>>) {
        let key = (kind % 4, if kind % 4 == 0 { 0 } else { seed });
        if let Some(v) = self.pages.get(&key) {
            return v.clone();
        }
        let content = page(kind, seed);
        let z = self.compress(&content);
        self.pages.insert(key, (content.clone(), z.clone()));
        (content, z)
    }
}

struct Gen<'c> {
    compression: Compression,
    ppp: u32,
    packet_num: u64,
    tools: &'c mut Tools,
    /// All packets built so far are valid.
    valid: bool,
    /// Single-channel model of guest memory, per block: page index -> content (absent: zero).
    model: Vec<BTreeMap<usize, Vec<u8>>>,
    pages_normal: u64,
    pages_zero: u64,
    syncs: u64,
}

/// What the checks need from a finished recipe.
struct Summary {
    valid: bool,
    model: Vec<BTreeMap<usize, Vec<u8>>>,
    pages_normal: u64,
    pages_zero: u64,
    syncs: u64,
}

/// A packet before serialisation, so hostile variants can edit it.
struct Packet {
    header: Vec<u8>,
    payload: Vec<u8>,
}

impl Packet {
    fn bytes(&self) -> Vec<u8> {
        let mut v = self.header.clone();
        v.extend_from_slice(&self.payload);
        v
    }
}

impl Gen<'_> {
    fn summary(self) -> Summary {
        Summary {
            valid: self.valid,
            model: self.model,
            pages_normal: self.pages_normal,
            pages_zero: self.pages_zero,
            syncs: self.syncs,
        }
    }

    fn compress(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        self.tools.compress(data)
    }

    fn header(
        &mut self,
        flags: u32,
        name: &str,
        normal: u32,
        nps: u32,
        offsets: &[u64],
    ) -> Vec<u8> {
        let fields = HeaderFields {
            flags,
            pages_alloc: self.ppp,
            normal_pages: normal,
            next_packet_size: nps,
            packet_num: self.packet_num,
            zero_pages: offsets.len() as u32 - normal,
        };
        self.packet_num += 1;
        let mut h = vec![0u8; header_len(self.ppp)];
        encode_header(&mut h, &fields, name, offsets);
        h
    }

    fn sync(&mut self, src: &mut Src<'_>) -> Vec<u8> {
        self.syncs += 1;
        if src.u8() & 1 == 0 {
            let h = self.header(FLAG_SYNC, "", 0, 0, &[]);
            return h;
        }
        // QEMU >= 9.2: everything but magic, version, flags and packet_num zero, full length.
        if !QEMU_SYNC_COUNTS_AS_VALID {
            self.valid = false;
        }
        let mut h = vec![0u8; header_len(self.ppp)];
        let mut small = vec![0u8; header_len(0)];
        let fields = HeaderFields {
            flags: FLAG_SYNC,
            packet_num: self.packet_num,
            ..Default::default()
        };
        self.packet_num += 1;
        encode_header(&mut small, &fields, "", &[]);
        h[..small.len()].copy_from_slice(&small);
        h
    }

    /// A packet with pages. `corrupt`: make one compressed page hostile (qpl only).
    fn pages(&mut self, src: &mut Src<'_>, corrupt: bool) -> Packet {
        let b = usize::from(src.u8() & 1);
        let (name, block_pages) = BLOCKS[b];
        let normal = u32::from(src.u8()) % (self.ppp + 1);
        let zero = u32::from(src.u8()) % (self.ppp - normal + 1);
        // Distinct offsets within the packet (duplicates within one packet have no defined
        // order on the wire, so the model could not predict them).
        let mut used = vec![false; block_pages];
        let mut offsets = Vec::new();
        for _ in 0..normal + zero {
            let mut p = usize::from(src.u8()) % block_pages;
            while used[p] {
                p = (p + 1) % block_pages;
            }
            used[p] = true;
            offsets.push((p * PS) as u64);
        }
        let (contents, compressed): (Vec<Vec<u8>>, Vec<Option<Vec<u8>>>) = (0..normal)
            .map(|_| self.tools.page(src.u8(), src.u8()))
            .unzip();
        let qpl = self.compression == Compression::Qpl;
        let mut payload = Vec::new();
        if qpl {
            let mut zlens: Vec<u32> = Vec::new();
            let mut datas: Vec<Vec<u8>> = Vec::new();
            for (c, z) in contents.iter().zip(compressed) {
                match z {
                    Some(z) => {
                        zlens.push(z.len() as u32);
                        datas.push(z);
                    }
                    None => {
                        zlens.push(PS as u32);
                        datas.push(c.clone());
                    }
                }
            }
            if corrupt && normal > 0 {
                self.valid = false;
                let i = usize::from(src.u8()) % normal as usize;
                self.corrupt_page(src, &contents[i], &mut zlens[i], &mut datas[i]);
            }
            for z in &zlens {
                payload.extend_from_slice(&z.to_be_bytes());
            }
            for d in &datas {
                payload.extend_from_slice(d);
            }
        } else {
            for c in &contents {
                payload.extend_from_slice(c);
            }
        }
        let nps = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        let header = self.header(self.compression.flag(), name, normal, nps, &offsets);
        // Model: normal pages in order, then zero pages.
        let model = &mut self.model[b];
        let mut contents = contents.into_iter();
        for &off in &offsets {
            let p = off as usize / PS;
            match contents.next() {
                Some(c) => model.insert(p, c),
                None => model.remove(&p),
            };
        }
        self.pages_normal += u64::from(normal);
        self.pages_zero += u64::from(zero);
        Packet { header, payload }
    }

    /// Replace one page's compressed bytes (or raw page) with a hostile variant.
    fn corrupt_page(
        &mut self,
        src: &mut Src<'_>,
        content: &[u8],
        zlen: &mut u32,
        data: &mut Vec<u8>,
    ) {
        match src.u8() % 7 {
            // One byte changed.
            0 => {
                let at = usize::from(src.u16()) % data.len();
                data[at] ^= src.u8() | 1;
            }
            // Inflates past the page.
            1 => {
                let mut big = content.to_vec();
                big.extend_from_slice(src.take(64));
                big.extend_from_slice(content);
                if let Some(z) = self.compress(&big) {
                    *data = z;
                }
            }
            // Inflates to less than a page.
            2 => {
                let cut = usize::from(src.u16()) % PS;
                if let Some(z) = self.compress(&content[..cut]) {
                    *data = z;
                }
            }
            // Trailing bytes after a valid stream.
            3 => {
                let extra = 1 + usize::from(src.u8() % 16);
                data.extend((0..extra).map(|_| src.u8()));
                data.truncate(PS);
            }
            // Fuzzer-written DEFLATE.
            4 => {
                let len = 1 + usize::from(src.u16()) % PS;
                let mut d = src.take(len).to_vec();
                d.resize(len, 0);
                *data = d;
            }
            // Cut short.
            5 => {
                let len = usize::from(src.u16()) % data.len().max(1);
                data.truncate(len.max(1));
            }
            // zlen that breaks the rules (0, or more than a page), bytes as they are.
            _ => {
                *zlen = if src.u8() & 1 == 0 {
                    0
                } else {
                    PS as u32 + 1 + u32::from(src.u16())
                };
                return;
            }
        }
        *zlen = data.len() as u32;
    }

    /// A packet with one header field overwritten by the fuzzer, payload possibly cut.
    fn mutated(&mut self, src: &mut Src<'_>) -> Vec<u8> {
        self.valid = false;
        let mut p = if src.u8() & 1 == 0 {
            self.pages(src, false)
        } else {
            Packet {
                header: self.sync(src),
                payload: Vec::new(),
            }
        };
        let h = &mut p.header;
        let put32 =
            |h: &mut Vec<u8>, at: usize, v: u32| h[at..at + 4].copy_from_slice(&v.to_be_bytes());
        match src.u8() % 9 {
            0 => put32(h, 8, src.u32()),                  // flags
            1 => put32(h, 8, u32::from(src.u8() & 0x7F)), // flags, known bits only
            2 => put32(h, 12, u32::from(src.u16())),      // pages_alloc
            3 => put32(h, 16, u32::from(src.u8())),       // normal_pages
            4 => put32(h, 20, src.u32()),                 // next_packet_size
            5 => put32(h, 32, u32::from(src.u8())),       // zero_pages
            6 => {
                // block name byte
                let at = 64 + usize::from(src.u8());
                h[at] = src.u8();
            }
            7 => {
                // one offset slot: any value, or near a page boundary
                let slot = usize::from(src.u8()) % self.ppp as usize;
                let v = if src.u8() & 1 == 0 {
                    src.u64()
                } else {
                    (u64::from(src.u8()) * PS as u64)
                        .wrapping_add(u64::from(src.u8() % 3))
                        .wrapping_sub(1)
                };
                h[320 + 8 * slot..328 + 8 * slot].copy_from_slice(&v.to_be_bytes());
            }
            _ => put32(h, 4 * usize::from(src.u8() & 1), src.u32()), // magic or version
        }
        if src.u8() % 4 == 0 {
            let keep = usize::from(src.u16()) % (p.payload.len() + 1);
            p.payload.truncate(keep);
        }
        p.bytes()
    }
}

fn recipe<'c>(cfg: u8, src: &mut Src<'_>, tools: &'c mut Tools) -> (Vec<Vec<u8>>, Gen<'c>) {
    let compression = if cfg & 2 != 0 {
        Compression::Qpl
    } else {
        Compression::None
    };
    let ppp = [1u32, 2, 4, 8][usize::from((cfg >> 2) & 3)];
    let channels = 1 + usize::from(cfg >> 4 & 1);
    let mut g = Gen {
        compression,
        ppp,
        packet_num: 0,
        tools,
        valid: true,
        model: vec![BTreeMap::new(); BLOCKS.len()],
        pages_normal: 0,
        pages_zero: 0,
        syncs: 0,
    };
    let mut streams: Vec<Vec<u8>> = (0..channels)
        .map(|id| {
            InitPacket {
                uuid: UUID,
                channel_id: id as u8,
            }
            .encode()
            .to_vec()
        })
        .collect();
    let mut closed = vec![false; channels];
    for _ in 0..MAX_PACKETS {
        if src.is_empty() {
            break;
        }
        let d = src.u8();
        let ch = usize::from(d >> 7) % channels;
        if closed[ch] {
            continue;
        }
        let bytes = match d & 7 {
            0 => g.sync(src),
            1..=3 => g.pages(src, false).bytes(),
            4 => {
                let corrupt = compression == Compression::Qpl;
                g.pages(src, corrupt).bytes()
            }
            5 => g.mutated(src),
            6 => {
                g.valid = false;
                let n = usize::from(src.u8());
                src.take(n).to_vec()
            }
            _ => {
                // The peer closes mid-packet.
                g.valid = false;
                closed[ch] = true;
                let mut b = g.pages(src, false).bytes();
                let keep = usize::from(src.u16()) % b.len();
                b.truncate(keep);
                b
            }
        };
        streams[ch].extend_from_slice(&bytes);
    }
    (streams, g)
}

fuzz_target!(|data: &[u8]| {
    let Some((&cfg, rest)) = data.split_first() else {
        return;
    };
    let mem = memory();
    if cfg & 1 == 1 {
        // Raw mode: the bytes as they are.
        let r = decode_streams(&mem, vec![("fuzz".to_string(), rest)], PS as u32);
        if let Err(e) = r {
            let _ = e.to_string();
        }
        return;
    }
    thread_local! {
        static TOOLS: RefCell<Tools> = RefCell::new(Tools::default());
    }
    let (streams, g) = TOOLS.with(|t| {
        let mut tools = t.borrow_mut();
        let mut src = Src(rest);
        let (streams, g) = recipe(cfg, &mut src, &mut tools);
        (streams, g.summary())
    });
    let total_len: u64 = streams.iter().map(|s| s.len() as u64).sum();
    let single = streams.len() == 1;
    let captures: Vec<(String, &[u8])> = streams
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("ch{i}"), s.as_slice()))
        .collect();
    // The recipe's pages per packet, as an operator would pass `decode --pages-per-packet`
    // (a stream may open with a QEMU SYNC, which does not name it).
    let ppp = [1u32, 2, 4, 8][usize::from((cfg >> 2) & 3)];
    let r = decode_streams_with(&mem, captures, PS as u32, Some(ppp));
    match r {
        Ok(stats) => {
            if g.valid && single {
                for (i, want) in g.model.iter().enumerate() {
                    let got = mem.block(i).expect("block").to_vec();
                    for (p, page) in got.chunks(PS).enumerate() {
                        let ok = match want.get(&p) {
                            Some(w) => page == &w[..],
                            None => page == &[0u8; PS][..],
                        };
                        assert!(
                            ok,
                            "block {i} page {p} differs from the model after a valid stream"
                        );
                    }
                }
                assert_eq!(stats.total.pages_normal, g.pages_normal, "pages_normal");
                assert_eq!(stats.total.pages_zero, g.pages_zero, "pages_zero");
                assert_eq!(stats.total.sync_packets, g.syncs, "sync_packets");
                assert_eq!(stats.total.wire_bytes, total_len, "wire_bytes");
            }
        }
        Err(e) => {
            assert!(!g.valid, "a valid stream failed to decode: {e}");
            let _ = e.to_string();
        }
    }
});
