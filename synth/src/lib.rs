//! Synthetic guest memory that looks like a real guest's, for the demo, tests and benchmarks.
//!
//! Deterministic for a given seed (no dependency on a system RNG), so benchmarks of different
//! implementations run on the same pages.
//!
//! The realistic mix is laid out in runs of pages of one kind (files and heaps are contiguous
//! in a real guest). The kind of each run is drawn at random, steered so that every kind's
//! share of the buffer stays within a few dozen pages of its target:
//!
//! | kind | share of pages | looks like |
//! |---|---|---|
//! | zero | 32 % | free memory |
//! | text | 25.5 % | English prose, source code, log files with timestamps |
//! | code | 11 % | x86-64 machine code: prologues, common opcodes, small immediates, rel32 |
//! | heap | 17 % | malloc chunks: 0x00007f.. pointers, small integers, short strings, zero runs |
//! | random | 2 % | already-compressed files |
//! | sparse | 12.5 % | mostly zero pages holding a few small structures |
//!
//! Calibration: the only measurement of a real guest available is QEMU 10.0.13's (DESIGN.md
//! §9): 32 % zero pages and wire/RAM 0.289 with its multifd-qpl settings (QPL, fixed Huffman,
//! level 1). The shares above were chosen so that the same compressor with the same settings
//! gives the same ratio on this mix (0.286 before packet headers, measured with QPL 1.6.0's
//! software path; ≈ 0.289 on the wire). Nothing else was tuned; the first version of the mix
//! (22/14/14/10/8 %) compressed 1.24 × worse than the real guest.
//!
//! Generation is table driven (fixed-size stores into a scratch page with some slack, field
//! values taken from masked random words) so that filling runs at more than 1 GB/s on one core
//! (the `codecs` benchmark reports the ratio each codec reaches on these pages).

/// A family of pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageSet {
    /// The demo's mix: ~32 % zero pages, text, executable code, heap-like data,
    /// already-compressed/random data, partly-filled pages.
    Realistic,
    /// Only text pages (prose, source code, logs).
    Text,
    /// Only random (incompressible) pages.
    Random,
    /// Only zero pages.
    Zero,
}

/// Fill `buf` (a multiple of `page_size`) with pages of `set`, deterministically from `seed`.
///
/// A trailing partial page, if any, is filled like a short page. Panics if `page_size` is 0.
pub fn fill(set: PageSet, buf: &mut [u8], page_size: usize, seed: u64) {
    assert!(page_size > 0, "page_size must not be 0");
    let mut rng = Rng::new(seed ^ set_salt(set));
    match set {
        PageSet::Zero => buf.fill(0),
        PageSet::Random => rng.fill_random(buf),
        PageSet::Text => {
            let mut scratch = vec![0u8; page_size + SLACK];
            let mut pages = buf.chunks_mut(page_size);
            while pages.len() > 0 {
                let len = 1 + rng.below(MAX_RUN[1]) as usize;
                let mut ctx = TextCtx::new(&mut rng);
                for page in pages.by_ref().take(len) {
                    let mut w = Writer::new(&mut scratch, page.len());
                    ctx.page(&mut rng, &mut w);
                    page.copy_from_slice(&scratch[..page.len()]);
                }
            }
        }
        PageSet::Realistic => fill_realistic(buf, page_size, &mut rng),
    }
}

fn set_salt(set: PageSet) -> u64 {
    match set {
        PageSet::Realistic => 0,
        PageSet::Text => 0x7465_7874,
        PageSet::Random => 0x7261_6e64,
        PageSet::Zero => 0x7a65_726f,
    }
}

// ---------------------------------------------------------------------------------------------
// Random numbers

/// splitmix64: tiny, fast, and good enough for synthetic data.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        let mut r = Rng(seed);
        // Decorrelate nearby seeds.
        r.0 = r.next_u64();
        r
    }

    #[inline(always)]
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0), by multiply-shift.
    #[inline(always)]
    fn below(&mut self, n: u32) -> u32 {
        (((self.next_u64() >> 32) * u64::from(n)) >> 32) as u32
    }

    fn fill_random(&mut self, buf: &mut [u8]) {
        let mut words = buf.chunks_exact_mut(8);
        for w in &mut words {
            w.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let tail = words.into_remainder();
        let last = self.next_u64().to_le_bytes();
        let n = tail.len();
        tail.copy_from_slice(&last[..n]);
    }
}

/// Sixteen-bit draws taken four at a time from one 64-bit number (for hot loops).
struct Draws {
    bits: u64,
    left: u32,
}

impl Draws {
    fn new() -> Self {
        Draws { bits: 0, left: 0 }
    }

    #[inline(always)]
    fn next16(&mut self, rng: &mut Rng) -> u32 {
        if self.left == 0 {
            self.bits = rng.next_u64();
            self.left = 4;
        }
        let v = (self.bits & 0xFFFF) as u32;
        self.bits >>= 16;
        self.left -= 1;
        v
    }

    /// Uniform in `0..n` for n <= 65536.
    #[inline(always)]
    fn below(&mut self, rng: &mut Rng, n: u32) -> u32 {
        (self.next16(rng) * n) >> 16
    }

    /// Skewed towards 0 (min of two uniform draws): a cheap Zipf-like word choice.
    #[inline(always)]
    fn skewed(&mut self, rng: &mut Rng, n: u32) -> u32 {
        let v = self.next16(rng);
        let a = ((v & 0xFF) * n) >> 8;
        let b = ((v >> 8) * n) >> 8;
        a.min(b)
    }
}

// ---------------------------------------------------------------------------------------------
// Page writer

/// Bytes past the page end that the scratch page has, so that writers can store 16 bytes at a
/// time without checking how much room is left.
const SLACK: usize = 64;

/// Up to 16 bytes and their length, padded with zeros: one store writes them.
#[derive(Clone, Copy)]
struct Pad {
    bytes: [u8; 16],
    len: usize,
}

impl Pad {
    const EMPTY: Pad = Pad {
        bytes: [0; 16],
        len: 0,
    };

    const fn new(s: &str) -> Pad {
        let b = s.as_bytes();
        assert!(b.len() <= 16, "table strings are at most 16 bytes");
        let mut p = Pad::EMPTY;
        let mut i = 0;
        while i < b.len() {
            p.bytes[i] = b[i];
            i += 1;
        }
        p.len = b.len();
        p
    }
}

const fn pads<const N: usize>(src: &[&str]) -> [Pad; N] {
    let mut out = [Pad::EMPTY; N];
    let mut i = 0;
    while i < N {
        out[i] = Pad::new(src[i]);
        i += 1;
    }
    out
}

/// Appends to a scratch page of `end + SLACK` bytes; whatever lands past `end` is dropped by
/// the caller, which copies only `..end` into the real page.
struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
    end: usize,
}

impl<'a> Writer<'a> {
    fn new(buf: &'a mut [u8], end: usize) -> Self {
        debug_assert!(buf.len() >= end + SLACK);
        Writer { buf, pos: 0, end }
    }

    #[inline(always)]
    fn full(&self) -> bool {
        self.pos >= self.end
    }

    /// Store a fixed-size array.
    #[inline(always)]
    fn arr<const N: usize>(&mut self, a: &[u8; N]) {
        match self.buf.get_mut(self.pos..self.pos + N) {
            Some(dst) => {
                dst.copy_from_slice(a);
                self.pos += N;
            }
            None => self.pos = self.buf.len(),
        }
    }

    /// Store a padded string (16 bytes written, `len` kept).
    #[inline(always)]
    fn pad(&mut self, p: &Pad) {
        self.bits(&p.bytes, p.len);
    }

    /// Store `N` bytes, keep the first `len` (`N` <= `SLACK`).
    #[inline(always)]
    fn bytes<const N: usize>(&mut self, b: &[u8; N], len: usize) {
        match self.buf.get_mut(self.pos..self.pos + N) {
            Some(dst) => {
                dst.copy_from_slice(b);
                self.pos += len;
            }
            None => self.pos = self.buf.len(),
        }
    }

    /// Store 16 bytes, keep the first `len`.
    #[inline(always)]
    fn bits(&mut self, b: &[u8; 16], len: usize) {
        match self.buf.get_mut(self.pos..self.pos + 16) {
            Some(dst) => {
                dst.copy_from_slice(b);
                self.pos += len;
            }
            None => self.pos = self.buf.len(),
        }
    }

    #[inline(always)]
    fn byte(&mut self, b: u8) {
        self.arr(&[b]);
    }

    #[inline(always)]
    fn word(&mut self, w: u64) {
        self.arr(&w.to_le_bytes());
    }

    /// Decimal, zero-padded to `width` digits (at most 10).
    fn dec(&mut self, mut v: u32, width: usize) {
        let mut tmp = [b'0'; 16];
        let mut n = 0;
        while v > 0 || n < width.max(1) {
            if n == 10 {
                break;
            }
            tmp[9 - n] = b'0' + (v % 10) as u8;
            v /= 10;
            n += 1;
        }
        tmp.copy_within(10 - n..10, 0);
        self.bits(&tmp, n);
    }

    /// Two decimal digits.
    #[inline(always)]
    fn dec2(&mut self, v: u32) {
        self.arr(&[b'0' + (v / 10 % 10) as u8, b'0' + (v % 10) as u8]);
    }

    /// Lower-case hexadecimal, `digits` digits (at most 16).
    fn hex(&mut self, v: u64, digits: usize) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let digits = digits.min(16);
        let mut tmp = [0u8; 16];
        for (i, slot) in tmp[..digits].iter_mut().enumerate() {
            *slot = HEX[((v >> (4 * (digits - 1 - i))) & 0xF) as usize];
        }
        self.bits(&tmp, digits);
    }
}

// ---------------------------------------------------------------------------------------------
// Realistic layout

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Zero,
    Text,
    Code,
    Heap,
    Random,
    Sparse,
}

const KINDS: [Kind; 6] = [
    Kind::Zero,
    Kind::Text,
    Kind::Code,
    Kind::Heap,
    Kind::Random,
    Kind::Sparse,
];

/// Target share of pages, per mille, in `KINDS` order.
const SHARE: [u64; 6] = [320, 255, 110, 170, 20, 125];

/// Longest run of each kind, in pages (runs are 1..=max, uniform).
const MAX_RUN: [u32; 6] = [96, 24, 48, 48, 32, 8];

/// How far (in pages) a kind may run ahead of its target before the steering overrides the
/// random draw.
const SLACK_PAGES: u64 = 32;

fn fill_realistic(buf: &mut [u8], page_size: usize, rng: &mut Rng) {
    let mut scratch = vec![0u8; page_size + SLACK];
    let mut pages = buf.chunks_mut(page_size);
    let mut assigned = [0u64; 6];
    let mut done = 0u64;
    while pages.len() > 0 {
        // Draw a kind by weight.
        let mut r = u64::from(rng.below(1000));
        let mut k = 0;
        while k + 1 < SHARE.len() && r >= SHARE[k] {
            r -= SHARE[k];
            k += 1;
        }
        let mut len = 1 + u64::from(rng.below(MAX_RUN[k]));
        len = len.min(pages.len() as u64);
        // Steer: a kind ahead of its share gives way to the one furthest behind.
        let total = done + len;
        if (assigned[k] + len) * 1000 > SHARE[k] * total + SLACK_PAGES * 1000 {
            let deficit = |i: usize| (SHARE[i] * total) as i64 - (assigned[i] * 1000) as i64;
            k = (0..KINDS.len()).max_by_key(|&i| deficit(i)).unwrap_or(0);
            len = len.min(u64::from(MAX_RUN[k]));
        }
        assigned[k] += len;
        done += len;
        let run = pages.by_ref().take(len as usize);
        match KINDS[k] {
            Kind::Zero => run.for_each(|p| p.fill(0)),
            Kind::Random => run.for_each(|p| rng.fill_random(p)),
            Kind::Text => {
                let mut ctx = TextCtx::new(rng);
                for p in run {
                    let mut w = Writer::new(&mut scratch, p.len());
                    ctx.page(rng, &mut w);
                    p.copy_from_slice(&scratch[..p.len()]);
                }
            }
            Kind::Code => {
                let ctx = CodeCtx::new(rng);
                for p in run {
                    let mut w = Writer::new(&mut scratch, p.len());
                    ctx.page(rng, &mut w);
                    p.copy_from_slice(&scratch[..p.len()]);
                }
            }
            Kind::Heap => {
                let ctx = HeapCtx::new(rng);
                for p in run {
                    let mut w = Writer::new(&mut scratch, p.len());
                    ctx.page(rng, &mut w);
                    p.copy_from_slice(&scratch[..p.len()]);
                }
            }
            Kind::Sparse => {
                let ctx = HeapCtx::new(rng);
                run.for_each(|p| ctx.sparse_page(rng, p));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Text: prose, source code, logs

const WORD_LIST: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "a",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "had",
    "they",
    "you",
    "were",
    "their",
    "one",
    "all",
    "we",
    "can",
    "her",
    "has",
    "there",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "she",
    "other",
    "its",
    "may",
    "these",
    "about",
    "than",
    "into",
    "them",
    "only",
    "some",
    "time",
    "could",
    "new",
    "two",
    "first",
    "then",
    "do",
    "any",
    "like",
    "my",
    "now",
    "over",
    "such",
    "our",
    "man",
    "me",
    "even",
    "most",
    "made",
    "after",
    "also",
    "did",
    "many",
    "before",
    "must",
    "through",
    "years",
    "where",
    "much",
    "your",
    "way",
    "well",
    "down",
    "should",
    "because",
    "each",
    "just",
    "those",
    "people",
    "how",
    "too",
    "little",
    "state",
    "good",
    "very",
    "make",
    "world",
    "still",
    "own",
    "see",
    "men",
    "work",
    "long",
    "get",
    "here",
    "between",
    "both",
    "life",
    "being",
    "under",
    "never",
    "day",
    "same",
    "another",
    "know",
    "while",
    "last",
    "might",
    "us",
    "great",
    "old",
    "year",
    "off",
    "come",
    "since",
    "against",
    "go",
    "came",
    "right",
    "used",
    "take",
    "three",
    "memory",
    "system",
    "page",
    "number",
    "process",
    "data",
    "however",
    "general",
    "program",
    "government",
    "development",
    "information",
    "problem",
    "migration",
    "network",
    "machine",
    "question",
    "different",
    "important",
    "example",
    "without",
    "something",
    "following",
    "possible",
    "therefore",
    "interest",
    "company",
];
static WORDS: [Pad; WORD_LIST.len()] = pads(WORD_LIST);

const IDENT_LIST: &[&str] = &[
    "i", "n", "len", "buf", "ctx", "page", "offset", "size", "count", "result", "err", "state",
    "self", "node", "next", "prev", "head", "tail", "key", "value", "index", "data", "ptr",
    "flags", "block", "channel", "packet", "header", "config", "stream", "queue", "entry", "item",
    "list", "map", "total", "bytes", "start", "end", "pos", "mask", "addr", "id", "name", "path",
    "file", "fd", "ret", "tmp", "out", "input", "output", "limit", "round",
];
static IDENTS: [Pad; IDENT_LIST.len()] = pads(IDENT_LIST);

const TYPE_LIST: &[&str] = &[
    "u8",
    "u32",
    "u64",
    "usize",
    "i32",
    "bool",
    "&str",
    "&[u8]",
    "Vec<u8>",
    "String",
    "Option<usize>",
    "Result<()>",
    "&mut Self",
    "*mut c_void",
    "int",
    "size_t",
];
static TYPES: [Pad; TYPE_LIST.len()] = pads(TYPE_LIST);

const COMPONENT_LIST: &[&str] = &[
    "kernel",
    "systemd",
    "sshd",
    "nginx",
    "postgres",
    "dockerd",
    "kubelet",
    "cron",
    "app",
    "worker",
    "scheduler",
    "api",
];
static COMPONENTS: [Pad; COMPONENT_LIST.len()] = pads(COMPONENT_LIST);

const LEVEL_LIST: &[&str] = &[
    " INFO  ", " INFO  ", " INFO  ", " INFO  ", " DEBUG ", " DEBUG ", " WARN  ", " ERROR ",
];
static LEVELS: [Pad; LEVEL_LIST.len()] = pads(LEVEL_LIST);

const MESSAGE_LIST: &[&str] = &[
    "request done ",
    "connection from ",
    "cache miss ",
    "retrying after ",
    "accepted key ",
    "started job ",
    "job finished ",
    "checkpoint at ",
    "query ok ",
    "timeout after ",
    "session opened ",
    "session closed ",
    "sync round ",
    "page fault at ",
    "slow request ",
    "health ok ",
];
static MESSAGES: [Pad; MESSAGE_LIST.len()] = pads(MESSAGE_LIST);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TextStyle {
    Prose,
    Source,
    Log,
}

/// One text "file": a style and the state that carries from page to page.
struct TextCtx {
    style: TextStyle,
    draws: Draws,
    indent: u32,
    /// Log time in milliseconds since midnight, and the day.
    millis: u32,
    day: u32,
    pid: u32,
}

impl TextCtx {
    fn new(rng: &mut Rng) -> Self {
        let style = match rng.below(10) {
            0..=2 => TextStyle::Prose,
            3..=6 => TextStyle::Source,
            _ => TextStyle::Log,
        };
        TextCtx {
            style,
            draws: Draws::new(),
            indent: 0,
            millis: rng.below(86_000_000),
            day: 1 + rng.below(28),
            pid: 100 + rng.below(30_000),
        }
    }

    fn page(&mut self, rng: &mut Rng, w: &mut Writer<'_>) {
        match self.style {
            TextStyle::Prose => self.prose(rng, w),
            TextStyle::Source => self.source(rng, w),
            TextStyle::Log => self.log(rng, w),
        }
    }

    #[inline(always)]
    fn word(&mut self, rng: &mut Rng) -> &'static Pad {
        &WORDS[self.draws.skewed(rng, WORDS.len() as u32) as usize]
    }

    #[inline(always)]
    fn ident(&mut self, rng: &mut Rng) -> &'static Pad {
        &IDENTS[self.draws.skewed(rng, IDENTS.len() as u32) as usize]
    }

    #[inline(always)]
    fn pick(&mut self, rng: &mut Rng, table: &'static [Pad]) -> &'static Pad {
        &table[self.draws.below(rng, table.len() as u32) as usize]
    }

    fn prose(&mut self, rng: &mut Rng, w: &mut Writer<'_>) {
        while !w.full() {
            // One sentence: capitalised, words separated by spaces and the odd comma.
            let words = 4 + self.draws.below(rng, 16);
            let start = w.pos;
            let first = self.word(rng);
            w.pad(first);
            if let Some(c) = w.buf.get_mut(start) {
                c.make_ascii_uppercase();
            }
            for _ in 1..words {
                if self.draws.below(rng, 14) == 0 {
                    w.arr(b", ");
                } else {
                    w.byte(b' ');
                }
                let word = self.word(rng);
                w.pad(word);
            }
            if self.draws.below(rng, 6) == 0 {
                w.arr(b".\n\n");
            } else {
                w.arr(b". ");
            }
        }
    }

    fn indent(&self, w: &mut Writer<'_>) {
        for _ in 0..self.indent {
            w.arr(b"    ");
        }
    }

    fn open(&mut self) {
        self.indent = (self.indent + 1).min(4);
    }

    fn source(&mut self, rng: &mut Rng, w: &mut Writer<'_>) {
        while !w.full() {
            self.indent(w);
            match self.draws.below(rng, 16) {
                0..=2 => {
                    w.arr(b"let ");
                    w.pad(self.ident(rng));
                    w.arr(b" = ");
                    w.pad(self.ident(rng));
                    w.byte(b'.');
                    w.pad(self.ident(rng));
                    w.byte(b'(');
                    w.pad(self.ident(rng));
                    w.arr(b");\n");
                }
                3 => {
                    w.arr(b"if ");
                    w.pad(self.ident(rng));
                    w.arr(b" == ");
                    w.dec(self.draws.below(rng, 4), 1);
                    w.arr(b" {\n");
                    self.open();
                }
                4..=6 => {
                    if self.indent > 0 {
                        self.indent -= 1;
                        w.pos -= 4;
                        w.arr(b"}\n");
                    } else {
                        w.byte(b'\n');
                    }
                }
                7 => {
                    w.arr(b"return ");
                    w.pad(self.ident(rng));
                    w.arr(b";\n");
                }
                8 => {
                    w.arr(b"// ");
                    let n = 3 + self.draws.below(rng, 6);
                    for _ in 0..n {
                        w.pad(self.word(rng));
                        w.byte(b' ');
                    }
                    w.byte(b'\n');
                }
                9 => {
                    w.arr(b"pub fn ");
                    w.pad(self.ident(rng));
                    w.byte(b'_');
                    w.pad(self.ident(rng));
                    w.arr(b"(&mut self, ");
                    w.pad(self.ident(rng));
                    w.arr(b": ");
                    w.pad(self.pick(rng, &TYPES));
                    w.arr(b") -> ");
                    w.pad(self.pick(rng, &TYPES));
                    w.arr(b" {\n");
                    self.open();
                }
                10 | 11 => {
                    w.arr(b"self.");
                    w.pad(self.ident(rng));
                    w.arr(b" += ");
                    w.pad(self.ident(rng));
                    w.arr(b".len();\n");
                }
                12 => {
                    w.arr(b"for ");
                    w.pad(self.ident(rng));
                    w.arr(b" in 0..");
                    w.pad(self.ident(rng));
                    w.arr(b" {\n");
                    self.open();
                }
                13 => {
                    w.pad(self.ident(rng));
                    w.byte(b'[');
                    w.pad(self.ident(rng));
                    w.arr(b"] = 0;\n");
                }
                14 => {
                    w.arr(b"match self.");
                    w.pad(self.ident(rng));
                    w.arr(b" {\n");
                    self.open();
                }
                _ => {
                    w.arr(b"assert!(");
                    w.pad(self.ident(rng));
                    w.arr(b" <= ");
                    w.pad(self.ident(rng));
                    w.arr(b");\n");
                }
            }
        }
    }

    fn log(&mut self, rng: &mut Rng, w: &mut Writer<'_>) {
        while !w.full() {
            self.millis += self.draws.below(rng, 1500);
            if self.millis >= 86_400_000 {
                self.millis -= 86_400_000;
                self.day = self.day % 28 + 1;
            }
            let ms = self.millis;
            w.arr(b"2024-06-");
            w.dec2(self.day);
            w.byte(b'T');
            w.dec2(ms / 3_600_000);
            w.byte(b':');
            w.dec2(ms / 60_000 % 60);
            w.byte(b':');
            w.dec2(ms / 1000 % 60);
            w.byte(b'.');
            w.dec(ms % 1000, 3);
            w.byte(b'Z');
            w.pad(self.pick(rng, &LEVELS));
            let c = self.draws.below(rng, COMPONENTS.len() as u32);
            w.pad(&COMPONENTS[c as usize]);
            w.byte(b'[');
            w.dec(self.pid + c, 1);
            w.arr(b"]: ");
            w.pad(self.pick(rng, &MESSAGES));
            match self.draws.below(rng, 4) {
                0 => {
                    w.arr(b"id=");
                    w.hex(u64::from(self.draws.next16(rng)), 4);
                }
                1 => {
                    w.arr(b"took=");
                    w.dec(self.draws.below(rng, 500), 1);
                    w.arr(b"ms");
                }
                2 => {
                    w.arr(b"path=/api/v1/");
                    w.pad(self.ident(rng));
                }
                _ => {
                    w.arr(b"status=");
                    w.dec(200 + 100 * self.draws.below(rng, 4), 1);
                }
            }
            w.byte(b'\n');
        }
    }
}

// ---------------------------------------------------------------------------------------------
// x86-64 machine code

/// An instruction template: its bytes, which bits a random word may set (register fields,
/// displacements, immediates, rel32 targets), and its length.
#[derive(Clone, Copy)]
struct Insn {
    base: u128,
    mask: u128,
    len: usize,
}

const fn insn(bytes: &[u8], mask: &[u8]) -> Insn {
    assert!(bytes.len() == mask.len() && bytes.len() <= 16);
    let mut base = 0u128;
    let mut m = 0u128;
    let mut i = 0;
    while i < bytes.len() {
        base |= (bytes[i] as u128) << (8 * i);
        m |= (mask[i] as u128) << (8 * i);
        i += 1;
    }
    Insn {
        base,
        mask: m,
        len: bytes.len(),
    }
}

/// Templates, most frequent first (`code_page` draws skewed towards the front), some repeated
/// for weight. Register fields favour rax/rcx/rdx/rbx and stack slots are small negative
/// multiples of 8, as in compiled code.
const INSNS: &[Insn] = &[
    // mov reg, [rbp-8k] / mov [rbp-8k], reg
    insn(&[0x48, 0x8B, 0x45, 0xC0], &[0, 0, 0x08, 0x18]),
    insn(&[0x48, 0x89, 0x45, 0xC0], &[0, 0, 0x08, 0x18]),
    // mov rdi, reg
    insn(&[0x48, 0x89, 0xC7], &[0, 0, 0x18]),
    // call rel32, forward
    insn(&[0xE8, 0x00, 0x00, 0x00, 0x00], &[0, 0xFF, 0x07, 0, 0]),
    // mov reg, [reg+8k]
    insn(&[0x48, 0x8B, 0x40, 0x08], &[0, 0, 0x0B, 0x18]),
    // test rax, rax; je/jne rel8
    insn(&[0x48, 0x85, 0xC0, 0x74, 0x00], &[0, 0, 0, 0x01, 0x3F]),
    insn(&[0x48, 0x8B, 0x45, 0xC0], &[0, 0, 0x08, 0x18]),
    // lea rdi/rsi, [rip+rel32]
    insn(
        &[0x48, 0x8D, 0x35, 0x00, 0x00, 0x10, 0x00],
        &[0, 0, 0x08, 0xF8, 0x03, 0, 0],
    ),
    insn(&[0x48, 0x89, 0x45, 0xC0], &[0, 0, 0x08, 0x18]),
    // cmp reg, imm8; jcc rel8
    insn(
        &[0x48, 0x83, 0xF8, 0x00, 0x74, 0x00],
        &[0, 0, 0x03, 0x0F, 0x0B, 0x3F],
    ),
    // add/sub reg, imm8
    insn(&[0x48, 0x83, 0xC0, 0x08], &[0, 0, 0x2B, 0x18]),
    // xor eax, eax
    insn(&[0x31, 0xC0], &[0, 0]),
    // call rel32, backward
    insn(&[0xE8, 0x00, 0x00, 0xFC, 0xFF], &[0, 0xFF, 0x07, 0, 0]),
    // mov r32, imm32 (small)
    insn(&[0xB8, 0x00, 0x00, 0x00, 0x00], &[0x03, 0x1F, 0, 0, 0]),
    // mov [rsp+8k], reg
    insn(&[0x48, 0x89, 0x44, 0x24, 0x08], &[0, 0, 0x18, 0, 0x38]),
    // mov eax, [rbp-4k]
    insn(&[0x8B, 0x45, 0xE0], &[0, 0x08, 0x1C]),
    // mov reg, reg
    insn(&[0x48, 0x89, 0xC0], &[0, 0, 0x1B]),
    // test eax, eax; je/jne rel8
    insn(&[0x85, 0xC0, 0x74, 0x00], &[0, 0, 0x01, 0x1F]),
    // call [rip+rel32] (GOT)
    insn(
        &[0xFF, 0x15, 0x00, 0x00, 0x20, 0x00],
        &[0, 0, 0xF8, 0x0F, 0x01, 0],
    ),
    // jmp rel8
    insn(&[0xEB, 0x00], &[0, 0x3F]),
    // movzx eax, byte [rbp-x]
    insn(&[0x0F, 0xB6, 0x45, 0xC0], &[0, 0, 0x08, 0x38]),
    // jcc rel32 (forward)
    insn(
        &[0x0F, 0x84, 0x00, 0x00, 0x00, 0x00],
        &[0, 0x01, 0xFF, 0x01, 0, 0],
    ),
    // mov reg, [rbx+8k]
    insn(&[0x48, 0x8B, 0x43, 0x08], &[0, 0, 0x08, 0x18]),
    // prologue
    insn(
        &[0x55, 0x48, 0x89, 0xE5, 0x48, 0x83, 0xEC, 0x10],
        &[0, 0, 0, 0, 0, 0, 0, 0x30],
    ),
    // epilogue with padding
    insn(
        &[
            0x48, 0x83, 0xC4, 0x10, 0x5B, 0x5D, 0xC3, 0xCC, 0xCC, 0xCC, 0xCC, 0xCC,
        ],
        &[0, 0, 0, 0x30, 0, 0, 0, 0, 0, 0, 0, 0],
    ),
    // push rbx / push r12..r15 / ret
    insn(&[0x53], &[0x00]),
    insn(&[0x41, 0x54], &[0, 0x03]),
    insn(&[0xC3], &[0]),
    // prologue saving registers
    insn(
        &[
            0x55, 0x48, 0x89, 0xE5, 0x41, 0x57, 0x41, 0x56, 0x53, 0x48, 0x83, 0xEC, 0x18,
        ],
        &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x30],
    ),
    // leave; ret; nop padding
    insn(&[0xC9, 0xC3, 0x0F, 0x1F, 0x44, 0x00, 0x00], &[0; 7]),
];

/// One instruction from the template table, drawn skewed towards the front of the table
/// (compiled code is dominated by a few instruction forms), as 16 bytes and a length.
#[inline(always)]
fn random_insn(rng: &mut Rng) -> ([u8; 16], usize) {
    let n = INSNS.len() as u64;
    let r = rng.next_u64();
    let a = ((r >> 48) * n) >> 16;
    let b = (((r >> 32) & 0xFFFF) * n) >> 16;
    let t = &INSNS[a.min(b) as usize];
    let rnd = u128::from(r) | (u128::from(r) << 64);
    ((t.base | (rnd & t.mask)).to_le_bytes(), t.len)
}

/// Longest idiom, in bytes.
const IDIOM: usize = 32;

/// A code module: the instruction sequences its compiler emits again and again (argument
/// set-up and call, load-test-branch, spill and reload...). Pages mix these idioms with
/// single instructions, which gives DEFLATE the repeats that real code has.
struct CodeCtx {
    idioms: Vec<([u8; IDIOM], usize)>,
}

impl CodeCtx {
    fn new(rng: &mut Rng) -> Self {
        let idioms = (0..64)
            .map(|_| {
                let mut buf = [0u8; IDIOM + 16];
                let mut len = 0;
                let count = 2 + rng.below(4);
                for _ in 0..count {
                    let (b, n) = random_insn(rng);
                    if len + n > IDIOM {
                        break;
                    }
                    buf[len..len + 16].copy_from_slice(&b);
                    len += n;
                }
                let mut idiom = [0u8; IDIOM];
                idiom.copy_from_slice(&buf[..IDIOM]);
                (idiom, len)
            })
            .collect();
        CodeCtx { idioms }
    }

    fn page(&self, rng: &mut Rng, w: &mut Writer<'_>) {
        let n = self.idioms.len() as u64;
        while !w.full() {
            let r = rng.next_u64();
            if r & 0xF < 5 {
                let a = ((r >> 48) * n) >> 16;
                let b = (((r >> 32) & 0xFFFF) * n) >> 16;
                let (bytes, len) = &self.idioms[a.min(b) as usize];
                w.bytes(bytes, *len);
            } else {
                let (bytes, len) = random_insn(rng);
                w.bits(&bytes, len);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Heap-like data

/// One kind of heap word: `base | (random & mask) | (short string & text)`.
#[derive(Clone, Copy)]
struct HeapWord {
    base: u64,
    mask: u64,
    text: u64,
}

/// Short strings as 8-byte words, NUL padded (for heap objects).
static STR8: [u64; 256] = {
    let mut out = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        let b = WORD_LIST[i % WORD_LIST.len()].as_bytes();
        let mut v = 0u64;
        let mut j = 0;
        while j < b.len() && j < 7 {
            v |= (b[j] as u64) << (8 * j);
            j += 1;
        }
        out[i] = v;
        i += 1;
    }
    out
};

/// A process heap: pointers share their high bytes, objects are malloc chunks.
struct HeapCtx {
    words: [HeapWord; 16],
}

impl HeapCtx {
    fn new(rng: &mut Rng) -> Self {
        // 0x00007fXX_XXX00000: a heap or mmap region of a 64-bit process; objects within a
        // span of 4 KiB .. 1 MiB.
        let base = 0x0000_7F00_0000_0000 | (rng.next_u64() & 0x00FF_FF00_0000);
        let span = (1u64 << (12 + rng.below(9))) - 16;
        let ptr = HeapWord {
            base,
            mask: span,
            text: 0,
        };
        let int = |mask: u64| HeapWord {
            base: 0,
            mask,
            text: 0,
        };
        let konst = |base: u64| HeapWord {
            base,
            mask: 0,
            text: 0,
        };
        HeapCtx {
            words: [
                ptr,
                ptr,
                ptr,
                ptr,
                konst(0),
                konst(0),
                konst(0),
                int(0x1F),
                int(0x1F),
                int(0xFF),
                int(0xFFFF),
                HeapWord {
                    base: 0,
                    mask: 0,
                    text: u64::MAX,
                },
                konst(u64::MAX),
                HeapWord {
                    base: 0x3FF0_0000_0000_0000,
                    mask: 0x000F_0000_0000_0000,
                    text: 0,
                },
                HeapWord {
                    base: 1,
                    mask: 0x0000_0003_0000_0000,
                    text: 0,
                },
                konst(0),
            ],
        }
    }

    /// One object word.
    #[inline(always)]
    fn value(&self, rng: &mut Rng) -> u64 {
        let r = rng.next_u64();
        let k = &self.words[(r >> 60) as usize];
        k.base | (r & k.mask) | (STR8[((r >> 40) & 0xFF) as usize] & k.text)
    }

    fn page(&self, rng: &mut Rng, w: &mut Writer<'_>) {
        while !w.full() {
            let r = rng.next_u64();
            if r & 0xF == 0 {
                // A free or untouched stretch.
                let n = 2 + ((r >> 8) & 0x1F);
                for _ in 0..n {
                    w.word(0);
                }
                continue;
            }
            // malloc chunk header (size | PREV_INUSE), then the object.
            let words = 2 + ((r >> 8) & 0xF);
            w.word(((words + 1) * 8 + 8) | 1);
            for _ in 0..words {
                let v = self.value(rng);
                w.word(v);
            }
        }
    }

    /// A mostly zero page holding a few small structures.
    fn sparse_page(&self, rng: &mut Rng, page: &mut [u8]) {
        page.fill(0);
        let slots = page.len() / 8;
        if slots == 0 {
            return;
        }
        let n = 1 + rng.below(4);
        for _ in 0..n {
            let words = 2 + rng.below(18) as usize;
            let at = rng.below(slots as u32) as usize;
            // A malloc chunk header first, so the page is never all zero.
            let header = ((words as u64 + 1) * 8 + 8) | 1;
            let mut slots = page.chunks_exact_mut(8).skip(at).take(words);
            if let Some(slot) = slots.next() {
                slot.copy_from_slice(&header.to_le_bytes());
            }
            for slot in slots {
                slot.copy_from_slice(&self.value(rng).to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagewire::internals::{is_zero_page, DeflateCompressor, PageCompressor};

    const PAGE: usize = 4096;

    /// Compressed bytes (raw fallback = a page) / input bytes, over the non-zero pages.
    fn ratio(buf: &[u8]) -> (f64, usize) {
        let mut c = DeflateCompressor::new(1).expect("level 1");
        let mut z = vec![0u8; PAGE - 1];
        let (mut input, mut output, mut nonzero) = (0usize, 0usize, 0usize);
        for p in buf.chunks(PAGE) {
            if is_zero_page(p) {
                continue;
            }
            nonzero += 1;
            input += p.len();
            output += c.compress(p, &mut z).unwrap_or(p.len());
        }
        (output as f64 / input.max(1) as f64, nonzero)
    }

    #[test]
    fn deterministic() {
        for set in [
            PageSet::Realistic,
            PageSet::Text,
            PageSet::Random,
            PageSet::Zero,
        ] {
            let mut a = vec![0u8; 64 * PAGE];
            let mut b = vec![0xEEu8; 64 * PAGE];
            fill(set, &mut a, PAGE, 42);
            fill(set, &mut b, PAGE, 42);
            assert!(a == b, "{set:?}");
            if set != PageSet::Zero {
                fill(set, &mut b, PAGE, 43);
                assert!(a != b, "{set:?}");
            }
        }
    }

    #[test]
    fn overwrites_previous_content() {
        let mut a = vec![0u8; 256 * PAGE];
        let mut b = vec![0x5Au8; 256 * PAGE];
        fill(PageSet::Realistic, &mut a, PAGE, 9);
        fill(PageSet::Realistic, &mut b, PAGE, 9);
        assert!(a == b);
    }

    #[test]
    fn realistic_zero_fraction_and_ratio() {
        let mut buf = vec![0u8; 64 << 20];
        fill(PageSet::Realistic, &mut buf, PAGE, 1);
        let pages = buf.len() / PAGE;
        let zero = buf.chunks(PAGE).filter(|p| is_zero_page(p)).count();
        let frac = zero as f64 / pages as f64;
        assert!((0.28..=0.36).contains(&frac), "zero fraction {frac}");
        let (r, _) = ratio(&buf);
        assert!((0.30..=0.45).contains(&r), "non-zero ratio {r}");
    }

    #[test]
    fn zero_fraction_for_other_seeds_and_sizes() {
        for (seed, mib) in [(2u64, 16usize), (3, 8), (4, 32)] {
            let mut buf = vec![0u8; mib << 20];
            fill(PageSet::Realistic, &mut buf, PAGE, seed);
            let pages = buf.len() / PAGE;
            let zero = buf.chunks(PAGE).filter(|p| is_zero_page(p)).count();
            let frac = zero as f64 / pages as f64;
            assert!((0.28..=0.36).contains(&frac), "seed {seed}: {frac}");
        }
    }

    #[test]
    fn realistic_has_every_kind_in_runs() {
        let mut buf = vec![0u8; 4096 * PAGE];
        fill(PageSet::Realistic, &mut buf, PAGE, 8);
        let mut c = DeflateCompressor::new(1).expect("level 1");
        let mut z = vec![0u8; PAGE - 1];
        let (mut raw, mut text, mut zero, mut changes) = (0, 0, 0, 0);
        let mut prev_zero = false;
        for p in buf.chunks(PAGE) {
            let is_zero = is_zero_page(p);
            zero += usize::from(is_zero);
            changes += usize::from(is_zero != prev_zero);
            prev_zero = is_zero;
            raw += usize::from(c.compress(p, &mut z).is_none());
            text += usize::from(p.iter().all(|&b| b == b'\n' || (0x20..0x7F).contains(&b)));
        }
        assert!((40..=150).contains(&raw), "random pages {raw}");
        assert!((800..=1300).contains(&text), "text pages {text}");
        // Zero pages come in runs, not one by one.
        assert!(
            changes < zero / 4,
            "{changes} changes for {zero} zero pages"
        );
    }

    #[test]
    fn zero_set_is_zero() {
        let mut buf = vec![0xFFu8; 32 * PAGE];
        fill(PageSet::Zero, &mut buf, PAGE, 5);
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[test]
    fn random_pages_do_not_compress() {
        let mut buf = vec![0u8; 64 * PAGE];
        fill(PageSet::Random, &mut buf, PAGE, 6);
        let mut c = DeflateCompressor::new(1).expect("level 1");
        let mut z = vec![0u8; PAGE - 1];
        for p in buf.chunks(PAGE) {
            assert_eq!(c.compress(p, &mut z), None);
        }
    }

    #[test]
    fn text_pages_are_text_and_compress() {
        let mut buf = vec![0u8; 256 * PAGE];
        fill(PageSet::Text, &mut buf, PAGE, 7);
        assert!(buf.iter().all(|&b| b == b'\n' || (0x20..0x7F).contains(&b)));
        let (r, nonzero) = ratio(&buf);
        assert_eq!(nonzero, 256);
        assert!((0.2..0.5).contains(&r), "text ratio {r}");
    }

    #[test]
    fn odd_sizes() {
        // Partial trailing page, page sizes other than 4 KiB, tiny buffers.
        for (len, ps) in [
            (0usize, 4096usize),
            (1, 4096),
            (5000, 4096),
            (3 * 65536, 65536),
            (100, 7),
            (100, 1),
        ] {
            for set in [
                PageSet::Realistic,
                PageSet::Text,
                PageSet::Random,
                PageSet::Zero,
            ] {
                let mut a = vec![0u8; len];
                let mut b = vec![1u8; len];
                fill(set, &mut a, ps, 11);
                fill(set, &mut b, ps, 11);
                assert!(a == b, "{set:?} {len} {ps}");
            }
        }
    }
}
