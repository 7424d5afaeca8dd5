//! Synthetic guest memory that looks like a real guest's, for the demo, tests and benchmarks.
//!
//! Deterministic for a given seed (no dependency on a system RNG), so benchmarks of different
//! implementations run on the same pages.
//!
//! The realistic mix is laid out in runs of pages of one kind (files and heaps are contiguous
//! in a real guest), with the kind of each run drawn at random but steered so that every
//! kind's share of the buffer stays within a few dozen pages of its target:
//!
//! | kind | share of pages | looks like |
//! |---|---|---|
//! | zero | 32 % | free memory |
//! | text | 22 % | English prose, source code, log files with timestamps |
//! | code | 14 % | x86-64 machine code: prologues, common opcodes, small immediates, rel32 calls |
//! | heap | 14 % | malloc chunks: 0x00007f.. pointers, small integers, short strings, zero runs |
//! | random | 10 % | already-compressed files |
//! | sparse | 8 % | mostly zero pages holding a few small structures |

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
            let mut pages = buf.chunks_mut(page_size);
            while pages.len() > 0 {
                let len = 1 + rng.below(24) as usize;
                let mut ctx = TextCtx::new(&mut rng);
                for page in pages.by_ref().take(len) {
                    ctx.page(&mut rng, page);
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
        let a = self.below(rng, n);
        let b = self.below(rng, n);
        a.min(b)
    }
}

// ---------------------------------------------------------------------------------------------
// Page writer

/// Appends to a page, silently cutting whatever does not fit.
struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    fn new(buf: &'a mut [u8]) -> Self {
        Writer { buf, pos: 0 }
    }

    #[inline(always)]
    fn full(&self) -> bool {
        self.pos >= self.buf.len()
    }

    #[inline(always)]
    fn put(&mut self, s: &[u8]) {
        let room = self.buf.len() - self.pos;
        if s.len() <= room {
            self.buf[self.pos..self.pos + s.len()].copy_from_slice(s);
            self.pos += s.len();
        } else {
            self.buf[self.pos..].copy_from_slice(&s[..room]);
            self.pos = self.buf.len();
        }
    }

    #[inline(always)]
    fn byte(&mut self, b: u8) {
        if let Some(slot) = self.buf.get_mut(self.pos) {
            *slot = b;
            self.pos += 1;
        }
    }

    /// Decimal, zero-padded to `width` digits.
    fn dec(&mut self, mut v: u32, width: usize) {
        let mut tmp = [b'0'; 10];
        let mut i = tmp.len();
        while v > 0 || tmp.len() - i < width.max(1) {
            i -= 1;
            tmp[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if i == 0 {
                break;
            }
        }
        self.put(&tmp[i..]);
    }

    /// Lower-case hexadecimal, `digits` digits.
    fn hex(&mut self, v: u64, digits: usize) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut tmp = [0u8; 16];
        let digits = digits.min(16);
        for (i, slot) in tmp[..digits].iter_mut().enumerate() {
            *slot = HEX[((v >> (4 * (digits - 1 - i))) & 0xF) as usize];
        }
        self.put(&tmp[..digits]);
    }

    #[inline(always)]
    fn word(&mut self, w: u64) {
        self.put(&w.to_le_bytes());
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
const SHARE: [u64; 6] = [320, 220, 140, 140, 100, 80];

/// Longest run of each kind, in pages (runs are 1..=max, uniform).
const MAX_RUN: [u32; 6] = [96, 24, 48, 48, 32, 8];

/// How far (in pages) a kind may run ahead of its target before the steering overrides the
/// random draw.
const SLACK_PAGES: u64 = 32;

fn fill_realistic(buf: &mut [u8], page_size: usize, rng: &mut Rng) {
    let mut pages = buf.chunks_mut(page_size);
    let mut assigned = [0u64; 6];
    let mut done = 0u64;
    let mut code = CodeCtx::new(rng);
    while pages.len() > 0 {
        // Draw a kind by weight.
        let mut r = u64::from(rng.below(1000));
        let mut k = 0;
        while r >= SHARE[k] {
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
                run.for_each(|p| ctx.page(rng, p));
            }
            Kind::Code => {
                code.new_module(rng);
                run.for_each(|p| code.page(rng, p));
            }
            Kind::Heap => {
                let mut ctx = HeapCtx::new(rng);
                run.for_each(|p| ctx.page(rng, p));
            }
            Kind::Sparse => {
                let mut ctx = HeapCtx::new(rng);
                run.for_each(|p| ctx.sparse_page(rng, p));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Text: prose, source code, logs

const WORDS: &[&str] = &[
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

const IDENTS: &[&str] = &[
    "i", "n", "len", "buf", "ctx", "page", "offset", "size", "count", "result", "err", "state",
    "self", "node", "next", "prev", "head", "tail", "key", "value", "index", "data", "ptr",
    "flags", "block", "channel", "packet", "header", "config", "stream", "queue", "entry", "item",
    "list", "map", "total", "bytes", "start", "end", "pos", "mask", "addr", "id", "name", "path",
    "file", "fd", "ret", "tmp", "out", "input", "output", "limit", "round",
];

const TYPES: &[&str] = &[
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
    "Result<(), Error>",
    "&mut Self",
    "*mut c_void",
    "int",
    "size_t",
];

const COMPONENTS: &[&str] = &[
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

const LEVELS: &[&str] = &[
    "INFO ", "INFO ", "INFO ", "DEBUG", "DEBUG", "WARN ", "ERROR",
];

#[derive(Clone, Copy)]
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
            0..=3 => TextStyle::Prose,
            4..=6 => TextStyle::Source,
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

    fn page(&mut self, rng: &mut Rng, page: &mut [u8]) {
        let mut w = Writer::new(page);
        match self.style {
            TextStyle::Prose => self.prose(rng, &mut w),
            TextStyle::Source => self.source(rng, &mut w),
            TextStyle::Log => self.log(rng, &mut w),
        }
    }

    fn word(&mut self, rng: &mut Rng) -> &'static [u8] {
        WORDS[self.draws.skewed(rng, WORDS.len() as u32) as usize].as_bytes()
    }

    fn ident(&mut self, rng: &mut Rng) -> &'static [u8] {
        IDENTS[self.draws.skewed(rng, IDENTS.len() as u32) as usize].as_bytes()
    }

    fn prose(&mut self, rng: &mut Rng, w: &mut Writer<'_>) {
        while !w.full() {
            // One sentence.
            let words = 4 + self.draws.below(rng, 18);
            let start = w.pos;
            for i in 0..words {
                let word = self.word(rng);
                w.put(word);
                if i == 0 {
                    if let Some(c) = w.buf.get_mut(start) {
                        c.make_ascii_uppercase();
                    }
                }
                if i + 1 < words {
                    if self.draws.below(rng, 12) == 0 {
                        w.put(b", ");
                    } else {
                        w.byte(b' ');
                    }
                }
            }
            if self.draws.below(rng, 6) == 0 {
                w.put(b".\n\n");
            } else {
                w.put(b". ");
            }
        }
    }

    fn source(&mut self, rng: &mut Rng, w: &mut Writer<'_>) {
        while !w.full() {
            for _ in 0..self.indent {
                w.put(b"    ");
            }
            match self.draws.below(rng, 12) {
                0 => {
                    w.put(b"let ");
                    w.put(self.ident(rng));
                    w.put(b" = ");
                    w.put(self.ident(rng));
                    w.byte(b'.');
                    w.put(self.ident(rng));
                    w.byte(b'(');
                    w.put(self.ident(rng));
                    w.put(b", ");
                    w.dec(self.draws.below(rng, 100), 1);
                    w.put(b");\n");
                }
                1 => {
                    w.put(b"if ");
                    w.put(self.ident(rng));
                    w.put(b" == ");
                    w.dec(self.draws.below(rng, 16), 1);
                    w.put(b" {\n");
                    self.indent = (self.indent + 1).min(5);
                }
                2 | 3 => {
                    if self.indent > 0 {
                        self.indent -= 1;
                        w.put(b"}\n");
                    } else {
                        w.put(b"\n");
                    }
                }
                4 => {
                    w.put(b"return ");
                    w.put(self.ident(rng));
                    w.put(b";\n");
                }
                5 => {
                    w.put(b"// ");
                    let n = 3 + self.draws.below(rng, 9);
                    for _ in 0..n {
                        w.put(self.word(rng));
                        w.byte(b' ');
                    }
                    w.byte(b'\n');
                }
                6 => {
                    w.put(b"pub fn ");
                    w.put(self.ident(rng));
                    w.byte(b'_');
                    w.put(self.ident(rng));
                    w.put(b"(&mut self, ");
                    w.put(self.ident(rng));
                    w.put(b": ");
                    w.put(TYPES[self.draws.below(rng, TYPES.len() as u32) as usize].as_bytes());
                    w.put(b") -> ");
                    w.put(TYPES[self.draws.below(rng, TYPES.len() as u32) as usize].as_bytes());
                    w.put(b" {\n");
                    self.indent = (self.indent + 1).min(5);
                }
                7 => {
                    w.put(b"self.");
                    w.put(self.ident(rng));
                    w.put(b" += ");
                    w.put(self.ident(rng));
                    w.put(b".len();\n");
                }
                8 => {
                    w.put(b"for ");
                    w.put(self.ident(rng));
                    w.put(b" in 0..");
                    w.put(self.ident(rng));
                    w.put(b" {\n");
                    self.indent = (self.indent + 1).min(5);
                }
                9 => {
                    w.put(self.ident(rng));
                    w.byte(b'[');
                    w.put(self.ident(rng));
                    w.put(b"] = 0x");
                    w.hex(u64::from(self.draws.next16(rng)), 4);
                    w.put(b";\n");
                }
                10 => {
                    w.put(b"match ");
                    w.put(self.ident(rng));
                    w.put(b" {\n");
                    self.indent = (self.indent + 1).min(5);
                }
                _ => {
                    w.put(b"assert!(");
                    w.put(self.ident(rng));
                    w.put(b" <= ");
                    w.put(self.ident(rng));
                    w.put(b", \"");
                    w.put(self.word(rng));
                    w.byte(b' ');
                    w.put(self.word(rng));
                    w.put(b"\");\n");
                }
            }
        }
    }

    fn log(&mut self, rng: &mut Rng, w: &mut Writer<'_>) {
        while !w.full() {
            self.millis += self.draws.below(rng, 2000);
            if self.millis >= 86_400_000 {
                self.millis -= 86_400_000;
                self.day = self.day % 28 + 1;
            }
            let ms = self.millis;
            w.put(b"2024-06-");
            w.dec(self.day, 2);
            w.byte(b'T');
            w.dec(ms / 3_600_000, 2);
            w.byte(b':');
            w.dec(ms / 60_000 % 60, 2);
            w.byte(b':');
            w.dec(ms / 1000 % 60, 2);
            w.byte(b'.');
            w.dec(ms % 1000, 3);
            w.put(b"Z ");
            w.put(LEVELS[self.draws.below(rng, LEVELS.len() as u32) as usize].as_bytes());
            w.byte(b' ');
            let c = self.draws.below(rng, COMPONENTS.len() as u32);
            w.put(COMPONENTS[c as usize].as_bytes());
            w.byte(b'[');
            w.dec(self.pid + c, 1);
            w.put(b"]: ");
            let n = 2 + self.draws.below(rng, 7);
            for _ in 0..n {
                w.put(self.word(rng));
                w.byte(b' ');
            }
            match self.draws.below(rng, 4) {
                0 => {
                    w.put(b"id=");
                    w.hex(rng.next_u64(), 8);
                }
                1 => {
                    w.put(b"took=");
                    w.dec(self.draws.below(rng, 5000), 1);
                    w.put(b"ms");
                }
                2 => {
                    w.put(b"path=/api/v1/");
                    w.put(self.ident(rng));
                    w.byte(b'/');
                    w.dec(self.draws.next16(rng), 1);
                }
                _ => {
                    w.put(b"status=");
                    w.dec(200 + 100 * self.draws.below(rng, 4), 1);
                }
            }
            w.byte(b'\n');
        }
    }
}

// ---------------------------------------------------------------------------------------------
// x86-64 machine code

/// Registers, weighted towards the ones compilers use most (rax, rdi, rsi, rdx, rcx, rbx).
const REGS: [u8; 8] = [0, 0, 7, 6, 2, 1, 3, 0];

/// A code module: where its functions and data live, and the function being emitted.
struct CodeCtx {
    /// Address of the next byte to emit (relative to the module).
    addr: u32,
    /// Entry points of the module's functions (call targets).
    funcs: [u32; 32],
    /// Start of the module's data (lea/mov rip-relative targets).
    data: u32,
    /// Instructions left in the current function (0: start a new one).
    left: u32,
    frame: u8,
    draws: Draws,
}

impl CodeCtx {
    fn new(rng: &mut Rng) -> Self {
        let mut c = CodeCtx {
            addr: 0,
            funcs: [0; 32],
            data: 0,
            left: 0,
            frame: 0x28,
            draws: Draws::new(),
        };
        c.new_module(rng);
        c
    }

    fn new_module(&mut self, rng: &mut Rng) {
        self.addr = (rng.below(1 << 20)) << 4;
        let text_len = 1 << (18 + rng.below(4)); // 256 KiB .. 2 MiB of text
        for f in self.funcs.iter_mut() {
            *f = self.addr.wrapping_add(rng.below(text_len)) & !0xF;
        }
        self.data = self.addr.wrapping_add(text_len + rng.below(1 << 16));
        self.left = 0;
    }

    #[inline(always)]
    fn reg(&mut self, rng: &mut Rng) -> u8 {
        REGS[self.draws.below(rng, 8) as usize]
    }

    /// A small stack displacement: -8 * (1..=frame/8).
    #[inline(always)]
    fn disp8(&mut self, rng: &mut Rng) -> u8 {
        let slots = u32::from(self.frame / 8).max(1);
        (8 * (1 + self.draws.below(rng, slots)) as u8).wrapping_neg()
    }

    fn page(&mut self, rng: &mut Rng, page: &mut [u8]) {
        let mut w = Writer::new(page);
        while !w.full() {
            let start = w.pos;
            self.instruction(rng, &mut w);
            self.addr = self.addr.wrapping_add((w.pos - start) as u32);
        }
    }

    fn rel32(&self, target: u32, insn_len: u32) -> [u8; 4] {
        target
            .wrapping_sub(self.addr.wrapping_add(insn_len))
            .to_le_bytes()
    }

    fn instruction(&mut self, rng: &mut Rng, w: &mut Writer<'_>) {
        if self.left == 0 {
            // Pad to 16 bytes, then a prologue.
            let pad = (16 - (self.addr & 15)) & 15;
            let fill = if self.draws.below(rng, 2) == 0 {
                0xCC
            } else {
                0x90
            };
            for _ in 0..pad {
                w.byte(fill);
            }
            self.frame = 8 * (2 + self.draws.below(rng, 15)) as u8;
            w.put(&[0x55, 0x48, 0x89, 0xE5]); // push rbp; mov rbp, rsp
            if self.draws.below(rng, 2) == 0 {
                w.put(&[0x41, 0x57, 0x41, 0x56, 0x53]); // push r15; push r14; push rbx
            }
            w.put(&[0x48, 0x83, 0xEC, self.frame]); // sub rsp, frame
            self.left = 6 + self.draws.below(rng, 60);
            return;
        }
        self.left -= 1;
        if self.left == 0 {
            w.put(&[0x48, 0x83, 0xC4, self.frame, 0x5B, 0x5D, 0xC3]); // add rsp; pop; pop; ret
            return;
        }
        match self.draws.below(rng, 20) {
            0..=2 => {
                // mov [rbp+disp8], reg
                let r = self.reg(rng);
                let d = self.disp8(rng);
                w.put(&[0x48, 0x89, 0x45 | (r << 3), d]);
            }
            3..=5 => {
                // mov reg, [rbp+disp8]
                let r = self.reg(rng);
                let d = self.disp8(rng);
                w.put(&[0x48, 0x8B, 0x45 | (r << 3), d]);
            }
            6 => {
                // mov reg, reg
                let a = self.reg(rng);
                let b = self.reg(rng);
                w.put(&[0x48, 0x89, 0xC0 | (a << 3) | b]);
            }
            7 => {
                // mov r32, imm32 (small)
                let r = self.reg(rng);
                let imm = self.draws.below(rng, 300);
                let i = imm.to_le_bytes();
                w.put(&[0xB8 + r, i[0], i[1], i[2], i[3]]);
            }
            8 | 9 => {
                // call rel32
                let t = self.funcs[self.draws.below(rng, 32) as usize];
                let d = self.rel32(t, 5);
                w.put(&[0xE8, d[0], d[1], d[2], d[3]]);
            }
            10 => {
                // lea rdi/rsi, [rip+rel32]
                let r = if self.draws.below(rng, 2) == 0 { 7 } else { 6 };
                let t = self.data.wrapping_add(self.draws.below(rng, 4096) * 8);
                let d = self.rel32(t, 7);
                w.put(&[0x48, 0x8D, 0x05 | (r << 3), d[0], d[1], d[2], d[3]]);
            }
            11 => {
                // test rax, rax; je/jne rel8
                let cc = 0x74 + (self.draws.below(rng, 2) as u8);
                let d = (2 + self.draws.below(rng, 40)) as u8;
                w.put(&[0x48, 0x85, 0xC0, cc, d]);
            }
            12 => {
                // cmp reg, imm8; jcc rel8
                let r = self.reg(rng);
                let imm = self.draws.below(rng, 32) as u8;
                let cc = 0x72 + 2 * (self.draws.below(rng, 6) as u8);
                let d = (self.draws.below(rng, 96) as u8).wrapping_sub(32);
                w.put(&[0x48, 0x83, 0xF8 | r, imm, cc, d]);
            }
            13 => {
                // jcc rel32 (short forward distance)
                let cc = 0x84 + (self.draws.below(rng, 2) as u8);
                let d = (self.draws.below(rng, 600) + 6).to_le_bytes();
                w.put(&[0x0F, cc, d[0], d[1], d[2], d[3]]);
            }
            14 => {
                // add/sub reg, imm8
                let r = self.reg(rng);
                let op = if self.draws.below(rng, 2) == 0 {
                    0xC0
                } else {
                    0xE8
                };
                let imm = 8 * (1 + self.draws.below(rng, 8)) as u8;
                w.put(&[0x48, 0x83, op | r, imm]);
            }
            15 => w.put(&[0x31, 0xC0]), // xor eax, eax
            16 => {
                // mov reg, [reg+disp8]
                let a = self.reg(rng);
                let b = self.reg(rng);
                let d = 8 * self.draws.below(rng, 16) as u8;
                w.put(&[0x48, 0x8B, 0x40 | (a << 3) | b, d]);
            }
            17 => {
                // movzx eax, byte [rbp+disp8]
                let d = self.disp8(rng);
                w.put(&[0x0F, 0xB6, 0x45, d]);
            }
            18 => {
                // call [rip+rel32] (PLT/GOT)
                let t = self
                    .data
                    .wrapping_sub(0x2000 - self.draws.below(rng, 256) * 8);
                let d = self.rel32(t, 6);
                w.put(&[0xFF, 0x15, d[0], d[1], d[2], d[3]]);
            }
            _ => {
                // jmp rel8
                let d = (self.draws.below(rng, 128) as u8).wrapping_sub(40);
                w.put(&[0xEB, d]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Heap-like data

/// A process heap: pointers share their high bytes, objects are malloc chunks.
struct HeapCtx {
    base: u64,
    span_shift: u32,
    draws: Draws,
}

impl HeapCtx {
    fn new(rng: &mut Rng) -> Self {
        // 0x00007fXX_XXX00000: a heap or mmap region of a 64-bit process.
        let base = 0x0000_7F00_0000_0000 | (rng.next_u64() & 0x00FF_FFF0_0000);
        HeapCtx {
            base,
            span_shift: 16 + rng.below(8),
            draws: Draws::new(),
        }
    }

    #[inline(always)]
    fn pointer(&mut self, rng: &mut Rng) -> u64 {
        let off = u64::from(self.draws.next16(rng)) << (self.span_shift - 12);
        self.base + (off & !0xF)
    }

    /// One object word.
    #[inline(always)]
    fn value(&mut self, rng: &mut Rng, w: &mut Writer<'_>) {
        match self.draws.below(rng, 16) {
            0..=4 => {
                let p = self.pointer(rng);
                w.word(p);
            }
            5..=7 => w.word(0),
            8..=10 => w.word(u64::from(self.draws.below(rng, 64))),
            11 => w.word(u64::from(self.draws.next16(rng))),
            12 => {
                // A short string, NUL padded to 8 bytes.
                let s = WORDS[self.draws.skewed(rng, WORDS.len() as u32) as usize].as_bytes();
                let mut b = [0u8; 8];
                let n = s.len().min(7);
                b[..n].copy_from_slice(&s[..n]);
                w.put(&b);
            }
            13 => w.word(0xFFFF_FFFF_FFFF_FFFF),
            14 => w.word(0x3FF0_0000_0000_0000 + (u64::from(self.draws.below(rng, 16)) << 48)),
            _ => w.word(u64::from(self.draws.below(rng, 4)) << 32 | 1),
        }
    }

    fn page(&mut self, rng: &mut Rng, page: &mut [u8]) {
        let mut w = Writer::new(page);
        while !w.full() {
            if self.draws.below(rng, 12) == 0 {
                // A free or untouched stretch.
                let n = 2 + self.draws.below(rng, 30);
                for _ in 0..n {
                    w.word(0);
                }
                continue;
            }
            // malloc chunk header: size | PREV_INUSE, then the object.
            let words = 2 + self.draws.below(rng, 14);
            w.word(u64::from((words + 1) * 8 + 8) | 1);
            for _ in 0..words {
                self.value(rng, &mut w);
            }
        }
    }

    /// A mostly zero page holding a few small structures.
    fn sparse_page(&mut self, rng: &mut Rng, page: &mut [u8]) {
        page.fill(0);
        let len = page.len();
        let n = 1 + self.draws.below(rng, 4);
        for _ in 0..n {
            let words = 2 + self.draws.below(rng, 18) as usize;
            let at = (self.draws.below(rng, (len / 8).max(1) as u32) as usize * 8).min(len);
            let end = (at + words * 8).min(len);
            let mut w = Writer::new(&mut page[at..end]);
            while !w.full() {
                self.value(rng, &mut w);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{is_zero_page, DeflateCompressor, PageCompressor};

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
        ] {
            for set in [
                PageSet::Realistic,
                PageSet::Text,
                PageSet::Random,
                PageSet::Zero,
            ] {
                let mut buf = vec![0u8; len];
                fill(set, &mut buf, ps, 11);
            }
        }
    }

    /// Per-kind DEFLATE level-1 ratios, for tuning (`cargo test -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn print_kind_ratios() {
        let mut rng = Rng::new(99);
        let pages = 2048;
        let mut buf = vec![0u8; pages * PAGE];
        for (name, kind) in [
            ("text", Kind::Text),
            ("code", Kind::Code),
            ("heap", Kind::Heap),
            ("sparse", Kind::Sparse),
        ] {
            let mut code = CodeCtx::new(&mut rng);
            let t = std::time::Instant::now();
            for run in buf.chunks_mut(16 * PAGE) {
                let mut text = TextCtx::new(&mut rng);
                let mut heap = HeapCtx::new(&mut rng);
                code.new_module(&mut rng);
                for p in run.chunks_mut(PAGE) {
                    match kind {
                        Kind::Text => text.page(&mut rng, p),
                        Kind::Code => code.page(&mut rng, p),
                        Kind::Heap => heap.page(&mut rng, p),
                        _ => heap.sparse_page(&mut rng, p),
                    }
                }
            }
            let gbs = buf.len() as f64 / t.elapsed().as_secs_f64() / 1e9;
            println!("{name:>8}: ratio {:.3}, {gbs:.2} GB/s", ratio(&buf).0);
        }
        for style in [TextStyle::Prose, TextStyle::Source, TextStyle::Log] {
            let t = std::time::Instant::now();
            for p in buf.chunks_mut(PAGE) {
                let mut text = TextCtx::new(&mut rng);
                text.style = style;
                text.page(&mut rng, p);
            }
            let name = match style {
                TextStyle::Prose => "prose",
                TextStyle::Source => "source",
                TextStyle::Log => "log",
            };
            let gbs = buf.len() as f64 / t.elapsed().as_secs_f64() / 1e9;
            println!("{name:>8}: ratio {:.3}, {gbs:.2} GB/s", ratio(&buf).0);
        }
        let mut buf = vec![0u8; 64 << 20];
        let t = std::time::Instant::now();
        fill(PageSet::Realistic, &mut buf, PAGE, 1);
        let dt = t.elapsed().as_secs_f64();
        let (r, nz) = ratio(&buf);
        println!(
            "realistic: {:.2} GB/s fill, non-zero ratio {r:.3}, non-zero pages {nz} of {}, wire/RAM {:.3}",
            buf.len() as f64 / dt / 1e9,
            buf.len() / PAGE,
            r * (nz * PAGE) as f64 / buf.len() as f64
        );
    }
}
