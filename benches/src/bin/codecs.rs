//! `codecs`: per-core speed and ratio of raw-DEFLATE libraries on single 4 KiB pages, the way
//! the engine uses them (each page compressed on its own into a `page_size - 1` limit, a page
//! that does not fit counted as sent raw), to choose the software codec by measurement.
//!
//! The candidates: libdeflate (through pagewire's own codec), miniz_oxide, zlib-rs, and QPL's
//! software path through pagewire's own engine type (`QplCompressor` with
//! `QplPath::Software`, fixed and dynamic Huffman; `QplDecompressor` on the software path).
//! The QPL rows need `libqpl.so.1` at run time (e.g. `LD_LIBRARY_PATH=/opt/qpl/lib`); without
//! it the bench prints "SKIP qpl: <reason>" and leaves them out (`"qpl": null` in the JSON).
//! zstd level 1 and LZ4 (block format) are measured the same way for reference only: they
//! are not DEFLATE and never go on pagewire's wire.
//!
//! For each page set (realistic, text, random) every candidate compresses and decompresses the
//! same pages in the same run; the runs of all candidates are interleaved and every figure is
//! the median of `--runs` runs. The realistic set is measured on its non-zero pages only, since
//! the engine never hands zero pages to a codec.
//!
//! ```text
//! cargo run --release -p pagewire-benches --bin codecs [-- --json] [--runs N] [--mib N]
//! ```

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use miniz_oxide::deflate::core::{
    compress as miniz_compress, create_comp_flags_from_zip_params, CompressorOxide, TDEFLFlush,
    TDEFLStatus,
};
use miniz_oxide::inflate::core::{
    decompress as miniz_decompress, inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
    DecompressorOxide,
};
use miniz_oxide::inflate::TINFLStatus;
use pagewire::internals::accel_qpl::{
    Huffman, QplCompressor, QplDecompressor, QplPath, QplSettings,
};
use pagewire::internals::{
    is_zero_page, DeflateCompressor, DeflateDecompressor, PageCompressor, PageDecompressor,
};
use pagewire::internals::{AccelOutcome as Outcome, Accelerator};
use pagewire_benches::{
    fmt_gbps, fmt_sig, fmt_times, print_json, Machine, Options, Samples, Table, Timing,
};
use pagewire_synth::{fill, PageSet};
use serde::Serialize;

const PAGE: usize = 4096;
const SEED: u64 = 0x5EED_C0DE;
/// Smallest buffer for the memcpy and zero-check references.
const REFERENCE_MIB: usize = 64;

const USAGE: &str = "usage: codecs [--json] [--runs N] [--mib N]
  --json     print one JSON object with the figures instead of tables
  --runs N   runs per figure, the median is reported (default 5)
  --mib N    MiB of pages per page set (default 16)";

/// One compressor at one level, with the engine's per-page contract.
trait Codec {
    /// Compress into `out` (the limit); `None` when it does not fit.
    fn compress(&mut self, page: &[u8], out: &mut [u8]) -> Option<usize>;
    /// Inflate `z` into exactly `out`, using all of `z`.
    fn decompress(&mut self, z: &[u8], out: &mut [u8]) -> bool;
    /// Compressions that failed for another reason than "does not fit" (counted as raw), and
    /// the last such failure; a correct run has none.
    fn failures(&self) -> (usize, Option<String>) {
        (0, None)
    }
}

/// libdeflate through pagewire's own codec (libdeflater + libdeflate-sys).
struct Libdeflate {
    c: DeflateCompressor,
    d: DeflateDecompressor,
}

impl Codec for Libdeflate {
    fn compress(&mut self, page: &[u8], out: &mut [u8]) -> Option<usize> {
        self.c.compress(page, out)
    }
    fn decompress(&mut self, z: &[u8], out: &mut [u8]) -> bool {
        self.d.decompress(z, out).is_ok()
    }
}

/// miniz_oxide's core API (no allocation per page; the compressor is reset per page).
struct Miniz {
    c: Box<CompressorOxide>,
    d: Box<DecompressorOxide>,
}

impl Miniz {
    fn new(level: i32) -> Miniz {
        // Negative window bits: raw DEFLATE, no zlib header.
        let flags = create_comp_flags_from_zip_params(level, -15, 0);
        Miniz {
            c: Box::new(CompressorOxide::new(flags)),
            d: Box::default(),
        }
    }
}

impl Codec for Miniz {
    fn compress(&mut self, page: &[u8], out: &mut [u8]) -> Option<usize> {
        self.c.reset();
        let (status, _, n) = miniz_compress(&mut self.c, page, out, TDEFLFlush::Finish);
        (status == TDEFLStatus::Done).then_some(n)
    }
    fn decompress(&mut self, z: &[u8], out: &mut [u8]) -> bool {
        self.d.init();
        let (status, used, n) = miniz_decompress(
            &mut self.d,
            z,
            out,
            0,
            TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
        );
        status == TINFLStatus::Done && used == z.len() && n == out.len()
    }
}

/// zlib-rs through flate2 (raw DEFLATE streams, reset per page).
struct ZlibRs {
    c: Compress,
    d: Decompress,
    drain: Vec<u8>,
}

impl ZlibRs {
    fn new(level: u32) -> ZlibRs {
        ZlibRs {
            c: Compress::new(Compression::new(level), false),
            d: Decompress::new(false),
            drain: vec![0u8; 2 * PAGE],
        }
    }
}

impl Codec for ZlibRs {
    fn compress(&mut self, page: &[u8], out: &mut [u8]) -> Option<usize> {
        self.c.reset();
        match self.c.compress(page, out, FlushCompress::Finish) {
            Ok(Status::StreamEnd) => usize::try_from(self.c.total_out()).ok(),
            _ => {
                // zlib-rs 0.6.8's reset does not rewind its pending-output offset, so
                // resetting a stream that stopped on a full output buffer panics a few pages
                // later ("buf.len() must fit in remaining()"). Finishing the stream into a
                // scratch buffer first leaves it clean; this is part of the cost of a failed
                // attempt with this library.
                for _ in 0..16 {
                    let used = usize::try_from(self.c.total_in()).unwrap_or(page.len());
                    let rest = page.get(used..).unwrap_or(&[]);
                    match self
                        .c
                        .compress(rest, &mut self.drain, FlushCompress::Finish)
                    {
                        Ok(Status::StreamEnd) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
                None
            }
        }
    }
    fn decompress(&mut self, z: &[u8], out: &mut [u8]) -> bool {
        self.d.reset(false);
        matches!(
            self.d.decompress(z, out, FlushDecompress::Finish),
            Ok(Status::StreamEnd)
        ) && self.d.total_in() == z.len() as u64
            && self.d.total_out() == out.len() as u64
    }
}

/// QPL's software path through pagewire's own engine types: `QplCompressor` (compressing with
/// `Accelerator::fallback`, the synchronous software job) and `QplDecompressor::new(true)`.
struct QplSoftware {
    c: QplCompressor,
    d: QplDecompressor,
    failed: usize,
    last_failure: Option<u32>,
}

impl QplSoftware {
    fn new(huffman: Huffman) -> Result<QplSoftware, String> {
        let c = QplCompressor::new(QplSettings {
            huffman,
            path: QplPath::Software,
            ..QplSettings::default()
        })
        .map_err(|e| format!("QPL compressor ({huffman:?} Huffman): {e}"))?;
        let d = QplDecompressor::new(true).map_err(|e| format!("QPL decompressor: {e}"))?;
        Ok(QplSoftware {
            c,
            d,
            failed: 0,
            last_failure: None,
        })
    }
}

impl Codec for QplSoftware {
    fn compress(&mut self, page: &[u8], out: &mut [u8]) -> Option<usize> {
        match self.c.fallback(page, out) {
            Outcome::Compressed(n) => Some(n),
            Outcome::DidNotFit => None,
            Outcome::Failed(st) => {
                self.failed += 1;
                self.last_failure = Some(st);
                None
            }
        }
    }
    fn decompress(&mut self, z: &[u8], out: &mut [u8]) -> bool {
        self.d.decompress(z, out).is_ok()
    }
    fn failures(&self) -> (usize, Option<String>) {
        let last = self
            .last_failure
            .map(|st| format!("QPL status {st} ({})", qpl_sys::status_name(st)));
        (self.failed, last)
    }
}

/// zstd (reference only): one zstd frame per page, bulk API, contexts reused across pages.
struct Zstd {
    c: zstd::bulk::Compressor<'static>,
    d: zstd::bulk::Decompressor<'static>,
}

impl Zstd {
    fn new(level: i32) -> Result<Zstd, String> {
        Ok(Zstd {
            c: zstd::bulk::Compressor::new(level).map_err(|e| format!("zstd: {e}"))?,
            d: zstd::bulk::Decompressor::new().map_err(|e| format!("zstd: {e}"))?,
        })
    }
}

impl Codec for Zstd {
    fn compress(&mut self, page: &[u8], out: &mut [u8]) -> Option<usize> {
        // An output that does not fit the limit is an error (dstSize_tooSmall).
        self.c.compress_to_buffer(page, out).ok()
    }
    fn decompress(&mut self, z: &[u8], out: &mut [u8]) -> bool {
        self.d
            .decompress_to_buffer(z, out)
            .is_ok_and(|n| n == out.len())
    }
}

/// LZ4 block format through lz4_flex (reference only). lz4_flex refuses an output buffer
/// smaller than LZ4's worst case (4,525 bytes for a 4 KiB page), so a page is compressed into
/// a scratch buffer of that size and copied into the limit when it fits; the copy is part of
/// its compress time.
struct Lz4 {
    scratch: Vec<u8>,
}

impl Codec for Lz4 {
    fn compress(&mut self, page: &[u8], out: &mut [u8]) -> Option<usize> {
        let n = lz4_flex::block::compress_into(page, &mut self.scratch).ok()?;
        let dst = out.get_mut(..n)?;
        dst.copy_from_slice(self.scratch.get(..n)?);
        Some(n)
    }
    fn decompress(&mut self, z: &[u8], out: &mut [u8]) -> bool {
        lz4_flex::block::decompress_into(z, out).is_ok_and(|n| n == out.len())
    }
}

struct Candidate {
    name: String,
    library: &'static str,
    level: i32,
    /// What the compressed bytes are.
    format: &'static str,
    /// Not DEFLATE, never on pagewire's wire: measured for comparison only.
    reference_only: bool,
    codec: Box<dyn Codec>,
}

const RAW_DEFLATE: &str = "raw DEFLATE";

/// Exits with a message when a candidate cannot be set up (QPL's availability is checked
/// before, so this is a real failure).
fn or_exit<T>(r: Result<T, String>) -> T {
    r.unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(1);
    })
}

fn candidates(qpl: bool) -> Vec<Candidate> {
    let mut v = Vec::new();
    for level in [1, 3, 6] {
        v.push(Candidate {
            name: format!("libdeflate L{level}"),
            library: "libdeflate",
            level,
            format: RAW_DEFLATE,
            reference_only: false,
            codec: Box::new(Libdeflate {
                c: DeflateCompressor::new(level).unwrap_or_default(),
                d: DeflateDecompressor::new(),
            }),
        });
    }
    v.push(Candidate {
        name: "miniz_oxide L1".into(),
        library: "miniz_oxide",
        level: 1,
        format: RAW_DEFLATE,
        reference_only: false,
        codec: Box::new(Miniz::new(1)),
    });
    for level in [1, 2] {
        v.push(Candidate {
            name: format!("zlib-rs L{level}"),
            library: "zlib-rs (flate2)",
            level: level as i32,
            format: RAW_DEFLATE,
            reference_only: false,
            codec: Box::new(ZlibRs::new(level)),
        });
    }
    if qpl {
        for (huffman, name) in [(Huffman::Fixed, "fixed"), (Huffman::Dynamic, "dynamic")] {
            v.push(Candidate {
                name: format!("QPL sw {name} L1"),
                library: "QPL software path (pagewire::internals::accel_qpl)",
                level: 1,
                format: RAW_DEFLATE,
                reference_only: false,
                codec: Box::new(or_exit(QplSoftware::new(huffman))),
            });
        }
    }
    v.push(Candidate {
        name: "zstd L1".into(),
        library: "zstd (libzstd)",
        level: 1,
        format: "zstd frame",
        reference_only: true,
        codec: Box::new(or_exit(Zstd::new(1))),
    });
    v.push(Candidate {
        name: "lz4".into(),
        library: "lz4_flex",
        level: 1,
        format: "LZ4 block",
        reference_only: true,
        codec: Box::new(Lz4 {
            scratch: vec![0u8; lz4_flex::block::get_maximum_output_size(PAGE)],
        }),
    });
    v
}

/// QPL as found on this host: its version, or why its rows are skipped.
fn probe_qpl() -> Result<String, String> {
    let qpl = qpl_sys::Qpl::load().map_err(|e| e.to_string())?;
    // Setting up both engines here turns a QPL that loads but cannot run into a skip too.
    QplSoftware::new(Huffman::Fixed)?;
    Ok(qpl.version())
}

/// The pages of one set that a codec is handed, and a destination like guest memory.
struct Pages {
    set: &'static str,
    /// The pages handed to the codecs, back to back.
    src: Vec<u8>,
    /// Pages in the generated set, including zero pages.
    generated: usize,
}

impl Pages {
    fn new(set: PageSet, name: &'static str, mib: usize) -> Pages {
        let mut all = vec![0u8; mib << 20];
        fill(set, &mut all, PAGE, SEED);
        let generated = all.len() / PAGE;
        let src: Vec<u8> = all
            .chunks(PAGE)
            .filter(|p| !is_zero_page(p))
            .flatten()
            .copied()
            .collect();
        Pages {
            set: name,
            src,
            generated,
        }
    }

    fn count(&self) -> usize {
        self.src.len() / PAGE
    }
}

/// Compressed streams of one candidate: page i at `zbuf[i * PAGE..]`, `zlen[i]` bytes
/// (`None`: did not fit, sent raw).
struct Streams {
    zbuf: Vec<u8>,
    zlen: Vec<Option<usize>>,
}

impl Streams {
    fn new(pages: usize) -> Streams {
        Streams {
            zbuf: vec![0u8; pages * PAGE],
            zlen: vec![None; pages],
        }
    }

    fn compressed_pages(&self) -> usize {
        self.zlen.iter().flatten().count()
    }

    /// Wire bytes with raw fallback counted as a page.
    fn wire_bytes(&self) -> usize {
        self.zlen.iter().map(|z| z.unwrap_or(PAGE)).sum()
    }
}

fn compress_all(codec: &mut dyn Codec, src: &[u8], s: &mut Streams) {
    for (i, (page, slot)) in src
        .chunks_exact(PAGE)
        .zip(s.zbuf.chunks_exact_mut(PAGE))
        .enumerate()
    {
        s.zlen[i] = codec.compress(page, &mut slot[..PAGE - 1]);
    }
}

/// Inflates every compressed page into its place in `dst`; returns the pages that failed.
fn decompress_all(codec: &mut dyn Codec, s: &Streams, dst: &mut [u8]) -> usize {
    let mut failed = 0;
    for ((z, slot), out) in s
        .zlen
        .iter()
        .zip(s.zbuf.chunks_exact(PAGE))
        .zip(dst.chunks_exact_mut(PAGE))
    {
        if let Some(n) = *z {
            failed += usize::from(!codec.decompress(&slot[..n], out));
        }
    }
    failed
}

#[derive(Serialize)]
struct CandidateResult {
    name: String,
    library: &'static str,
    level: i32,
    /// "raw DEFLATE", or another format for the reference-only candidates.
    format: &'static str,
    /// Not DEFLATE, never on pagewire's wire: measured for comparison only.
    reference_only: bool,
    /// Input page bytes / median compress time.
    compress_gbps: f64,
    /// Output bytes of the compressed pages / median decompress time.
    decompress_gbps: f64,
    /// Wire bytes (raw fallback = one page) / input bytes.
    ratio: f64,
    /// Pages that did not fit in page_size - 1 bytes.
    raw_pages: usize,
    /// Median compress time per page (on the random set: the cost of a failed attempt).
    compress_us_per_page: f64,
    /// Median decompress time per compressed page.
    decompress_us_per_page: f64,
    compress_timing: Timing,
    decompress_timing: Option<Timing>,
}

#[derive(Serialize)]
struct DecoderResult {
    name: String,
    /// Output bytes / median time, decoding the libdeflate L1 streams of the set.
    decompress_gbps: f64,
    timing: Timing,
}

#[derive(Serialize)]
struct SetResult {
    set: &'static str,
    generated_pages: usize,
    /// Pages handed to the codecs (the non-zero ones).
    pages: usize,
    input_bytes: usize,
    candidates: Vec<CandidateResult>,
    /// Decoders compared on the same streams (libdeflate L1 output).
    decoders: Vec<DecoderResult>,
}

#[derive(Serialize)]
struct Reference {
    /// Buffer size of the two references, in MiB (at least 64, beyond the caches).
    mib: usize,
    /// Page-by-page copy of realistic pages into another buffer.
    memcpy_gbps: f64,
    /// `is_zero_page` over all-zero pages (every byte read).
    zero_check_gbps: f64,
    memcpy_timing: Timing,
    zero_check_timing: Timing,
}

#[derive(Serialize)]
struct QplInfo {
    /// `qpl_get_library_version()`.
    version: String,
    /// The path the QPL rows ran on (always "software" here).
    path: &'static str,
}

#[derive(Serialize)]
struct Report {
    bench: &'static str,
    command: String,
    machine: Machine,
    page_size: usize,
    mib_per_set: usize,
    runs: usize,
    /// QPL's rows ran: its version; `null` when libqpl.so.1 could not be used.
    qpl: Option<QplInfo>,
    /// Why the QPL rows were skipped (`null` when they ran).
    qpl_skipped: Option<String>,
    reference: Reference,
    sets: Vec<SetResult>,
}

/// Exits when a candidate's compressor failed (other than "does not fit") on some page.
fn check_failures(cands: &[Candidate], set: &str) {
    for c in cands {
        if let (n @ 1.., last) = c.codec.failures() {
            eprintln!(
                "error: {} on {set}: {n} compressions failed (last: {})",
                c.name,
                last.unwrap_or_default()
            );
            std::process::exit(1);
        }
    }
}

fn measure_set(pages: &Pages, runs: usize, progress: bool, qpl: bool) -> SetResult {
    let n = pages.count();
    let input = pages.src.len();
    let mut cands = candidates(qpl);
    let mut streams: Vec<Streams> = cands.iter().map(|_| Streams::new(n)).collect();
    let mut dst = vec![0u8; input];

    // Warm-up pass, which also checks every candidate's round trip outside the timing.
    for (c, s) in cands.iter_mut().zip(streams.iter_mut()) {
        compress_all(c.codec.as_mut(), &pages.src, s);
        dst.fill(0);
        let failed = decompress_all(c.codec.as_mut(), s, &mut dst);
        let wrong = s
            .zlen
            .iter()
            .zip(pages.src.chunks_exact(PAGE).zip(dst.chunks_exact(PAGE)))
            .filter(|(z, (a, b))| z.is_some() && a != b)
            .count();
        if failed > 0 || wrong > 0 {
            eprintln!(
                "error: {} on {}: {failed} pages failed to decompress, {wrong} differ",
                c.name, pages.set
            );
            std::process::exit(1);
        }
    }
    check_failures(&cands, pages.set);

    let mut comp: Vec<Samples> = cands.iter().map(|_| Samples::default()).collect();
    let mut decomp: Vec<Samples> = cands.iter().map(|_| Samples::default()).collect();
    for run in 0..runs {
        if progress {
            eprint!("\r{}: run {}/{runs}   ", pages.set, run + 1);
        }
        for (i, c) in cands.iter_mut().enumerate() {
            comp[i].time(|| compress_all(c.codec.as_mut(), &pages.src, &mut streams[i]));
            if streams[i].compressed_pages() > 0 {
                decomp[i].time(|| decompress_all(c.codec.as_mut(), &streams[i], &mut dst));
            }
        }
    }
    check_failures(&cands, pages.set);

    // Decoders on the same streams: libdeflate L1's output, decoded by every library.
    let mut decoders = Vec::new();
    let base = streams[0].compressed_pages();
    if base > 0 {
        let mut decs: Vec<(&str, Box<dyn Codec>)> = vec![
            (
                "libdeflate",
                Box::new(Libdeflate {
                    c: DeflateCompressor::default(),
                    d: DeflateDecompressor::new(),
                }),
            ),
            ("miniz_oxide", Box::new(Miniz::new(1))),
            ("zlib-rs (flate2)", Box::new(ZlibRs::new(1))),
        ];
        if qpl {
            decs.push((
                "QPL software",
                Box::new(or_exit(QplSoftware::new(Huffman::Fixed))),
            ));
        }
        let mut samples: Vec<Samples> = decs.iter().map(|_| Samples::default()).collect();
        for (_, d) in decs.iter_mut() {
            if decompress_all(d.as_mut(), &streams[0], &mut dst) > 0 {
                eprintln!("error: a decoder rejects libdeflate L1 streams");
                std::process::exit(1);
            }
        }
        for _ in 0..runs {
            for (i, (_, d)) in decs.iter_mut().enumerate() {
                samples[i].time(|| decompress_all(d.as_mut(), &streams[0], &mut dst));
            }
        }
        for ((name, _), s) in decs.iter().zip(&samples) {
            let t = s.timing();
            decoders.push(DecoderResult {
                name: (*name).to_string(),
                decompress_gbps: t.gbps((base * PAGE) as u64),
                timing: t,
            });
        }
    }

    let candidates = cands
        .iter()
        .zip(&streams)
        .zip(comp.iter().zip(&decomp))
        .map(|((c, s), (ct, dt))| {
            let ct = ct.timing();
            let compressed = s.compressed_pages();
            let dt = (compressed > 0).then(|| dt.timing());
            CandidateResult {
                name: c.name.clone(),
                library: c.library,
                level: c.level,
                format: c.format,
                reference_only: c.reference_only,
                compress_gbps: ct.gbps(input as u64),
                decompress_gbps: dt
                    .as_ref()
                    .map_or(f64::NAN, |t| t.gbps((compressed * PAGE) as u64)),
                ratio: s.wire_bytes() as f64 / input as f64,
                raw_pages: n - compressed,
                compress_us_per_page: ct.us_per(n as u64),
                decompress_us_per_page: dt
                    .as_ref()
                    .map_or(f64::NAN, |t| t.us_per(compressed as u64)),
                compress_timing: ct,
                decompress_timing: dt,
            }
        })
        .collect();
    if progress {
        eprint!("\r{:40}\r", "");
    }
    SetResult {
        set: pages.set,
        generated_pages: pages.generated,
        pages: n,
        input_bytes: input,
        candidates,
        decoders,
    }
}

fn measure_reference(mib: usize, runs: usize) -> Reference {
    // At least 64 MiB, so that the copy and the scan are not served from the CPU's caches.
    let mib = mib.max(REFERENCE_MIB);
    let mut src = vec![0u8; mib << 20];
    fill(PageSet::Realistic, &mut src, PAGE, SEED);
    let mut dst = vec![0u8; src.len()];
    dst.copy_from_slice(&src); // fault the destination in
    let (memcpy_timing, _) = pagewire_benches::time_runs(runs, || {
        for (d, s) in dst.chunks_exact_mut(PAGE).zip(src.chunks_exact(PAGE)) {
            d.copy_from_slice(s);
        }
        dst[dst.len() / 2]
    });
    // Written, not just allocated: untouched allocations map the kernel's shared zero page,
    // which would make the scan read one cached 4 KiB page over and over.
    let mut zeros = vec![1u8; mib << 20];
    std::hint::black_box(&mut zeros);
    zeros.fill(0);
    std::hint::black_box(&mut zeros);
    let (zero_check_timing, _) = pagewire_benches::time_runs(runs, || {
        zeros
            .chunks_exact(PAGE)
            .filter(|p| is_zero_page(std::hint::black_box(p)))
            .count()
    });
    Reference {
        mib,
        memcpy_gbps: memcpy_timing.gbps(src.len() as u64),
        zero_check_gbps: zero_check_timing.gbps(zeros.len() as u64),
        memcpy_timing,
        zero_check_timing,
    }
}

fn print_tables(r: &Report) {
    println!(
        "codecs: raw DEFLATE (and zstd, LZ4 for reference) per {} KiB page, one core",
        r.page_size / 1024
    );
    println!("machine: {}", r.machine);
    println!(
        "{} MiB per set, medians of {} runs; references on {} MiB: memcpy {} GB/s, \
         zero check {} GB/s",
        r.mib_per_set,
        r.runs,
        r.reference.mib,
        fmt_gbps(r.reference.memcpy_gbps),
        fmt_gbps(r.reference.zero_check_gbps)
    );
    match (&r.qpl, &r.qpl_skipped) {
        (Some(q), _) => println!("qpl: libqpl {}, {} path", q.version, q.path),
        (None, reason) => println!("SKIP qpl: {}", reason.as_deref().unwrap_or("not loaded")),
    }
    for s in &r.sets {
        println!();
        println!(
            "set {}: {} pages handed to the codecs ({} generated)",
            s.set, s.pages, s.generated_pages
        );
        let base = s.candidates.first();
        let mut t = Table::new([
            "candidate",
            "compress GB/s",
            "decompress GB/s",
            "ratio",
            "raw pages",
            "compress µs/page",
            "compress vs libdeflate L1",
            "ratio vs libdeflate L1",
        ]);
        for c in &s.candidates {
            let (speed_vs, ratio_vs) = match base {
                Some(b) => (
                    fmt_times(c.compress_gbps / b.compress_gbps),
                    fmt_times(c.ratio / b.ratio),
                ),
                None => ("-".into(), "-".into()),
            };
            let name = if c.reference_only {
                format!("{} [ref]", c.name)
            } else {
                c.name.clone()
            };
            t.row([
                name,
                fmt_gbps(c.compress_gbps),
                fmt_gbps(c.decompress_gbps),
                fmt_sig(c.ratio, 3),
                c.raw_pages.to_string(),
                fmt_sig(c.compress_us_per_page, 3),
                speed_vs,
                ratio_vs,
            ]);
        }
        print!("{t}");
        if s.candidates.iter().any(|c| c.reference_only) {
            println!("[ref] = reference only (not DEFLATE, not on the wire)");
        }
        if !s.decoders.is_empty() {
            let mut t = Table::new(["decoder (libdeflate L1 streams)", "decompress GB/s"]);
            for d in &s.decoders {
                t.row([d.name.clone(), fmt_gbps(d.decompress_gbps)]);
            }
            print!("{t}");
        }
    }
}

fn main() {
    let opts = Options::from_args(5, 16, USAGE);
    let progress = !opts.json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (qpl, qpl_skipped) = match probe_qpl() {
        Ok(version) => (
            Some(QplInfo {
                version,
                path: "software",
            }),
            None,
        ),
        Err(reason) => {
            // Table mode prints it above the tables; with --json stdout holds only the JSON.
            if opts.json {
                eprintln!("SKIP qpl: {reason}");
            }
            (None, Some(reason))
        }
    };
    let reference = measure_reference(opts.mib, opts.runs);
    let sets = [
        (PageSet::Realistic, "realistic"),
        (PageSet::Text, "text"),
        (PageSet::Random, "random"),
    ]
    .into_iter()
    .map(|(set, name)| {
        let pages = Pages::new(set, name, opts.mib);
        measure_set(&pages, opts.runs, progress, qpl.is_some())
    })
    .collect();
    let report = Report {
        bench: "codecs",
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: Machine::detect(),
        page_size: PAGE,
        mib_per_set: opts.mib,
        runs: opts.runs,
        qpl,
        qpl_skipped,
        reference,
        sets,
    };
    if opts.json {
        print_json(&report);
    } else {
        print_tables(&report);
    }
}
