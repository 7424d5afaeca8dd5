//! Which ranges of guest memory hold data, asked of the kernel without reading the pages.
//!
//! A large guest touches a fraction of its memory; the rest reads as zero. Reading a page to
//! find out that it is zero costs a page fault (and, for an image file, brings the page into
//! the page cache and the process's resident memory). The kernel already knows which pages
//! were never written:
//!
//! - a file (image file, memfd, shmem) answers `lseek(SEEK_DATA)` / `lseek(SEEK_HOLE)`: a hole
//!   was never written and reads as zero;
//! - private anonymous memory has page-table entries only for pages that were touched:
//!   `/proc/self/pagemap` says per page whether it is present or swapped out; a page that is
//!   neither was never written (or was discarded, `MADV_DONTNEED`) and reads as zero.
//!
//! `mincore` is not used: it reports residency, and an anonymous page that was swapped out is
//! not resident but holds data.
//!
//! What a block is made of ([`Contents`]) decides which answers are valid: pagemap alone only
//! for private anonymous memory (a shared mapping's page may be written through another
//! mapping without ever appearing in ours); SEEK_DATA for a file mapping, united with pagemap
//! for a private (copy-on-write) one, whose written pages are anonymous copies in this process.
//! Anything else is [`Contents::Unknown`]: every page is read, as before.
//!
//! Every raw OS call of this feature lives here, behind safe functions.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// What a block's memory is, as far as finding never-written pages is concerned.
#[derive(Clone, Debug, Default)]
pub enum Contents {
    /// Nothing is known: every page is read.
    #[default]
    Unknown,
    /// Private anonymous memory mapped in this process (a page never touched reads zero).
    Anonymous,
    /// A mapping of `file` starting at byte `offset` of the file. `shared`: a `MAP_SHARED` (or
    /// read-only) mapping, every write lands in the file; otherwise a private copy-on-write
    /// mapping, whose written pages are private copies in this process.
    ///
    /// Finding data moves the file position of `file`'s open file description (lseek).
    File {
        file: Arc<File>,
        offset: u64,
        shared: bool,
    },
}

/// `/proc/self/pagemap` entry bits.
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
/// Entries read per pread of pagemap.
const PAGEMAP_CHUNK: usize = 512;
/// Data/hole transitions followed per query; beyond them the rest counts as data.
const MAX_EXTENTS: usize = 64;

/// The host's page size.
pub fn host_page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as u64
    } else {
        4096
    }
}

/// Data ranges of `file` in `range` (file offsets), sorted and disjoint, appended to `out`.
/// At most [`MAX_EXTENTS`] ranges are followed; the rest of `range` then counts as data.
/// Returns where the hole that ends the range (if any) ends: everything from the end of the
/// last data range (or `range.start`) up to the returned offset (>= `range.end`; `u64::MAX`:
/// the end of the file) was a hole when asked.
/// `Err` when the file system cannot answer (the caller then reads every page).
pub fn file_data_ranges(
    file: &File,
    range: Range<u64>,
    out: &mut Vec<Range<u64>>,
) -> io::Result<u64> {
    let fd = file.as_raw_fd();
    let seek = |pos: u64, whence: libc::c_int| -> io::Result<Option<u64>> {
        let Ok(p) = libc::off_t::try_from(pos) else {
            return Err(io::Error::other("offset too large"));
        };
        // SAFETY: lseek on a valid fd owned by `file` has no memory-safety preconditions.
        let r = unsafe { libc::lseek(fd, p, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            // ENXIO: no data (or hole) at or after `pos`, i.e. past the end of the file.
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(Some(r as u64))
    };
    let mut pos = range.start;
    let mut n = 0usize;
    while pos < range.end {
        if n >= MAX_EXTENTS {
            out.push(pos..range.end);
            return Ok(range.end);
        }
        let Some(data) = seek(pos, libc::SEEK_DATA)? else {
            // No data from here to the end of the file.
            return Ok(u64::MAX);
        };
        if data >= range.end {
            return Ok(data);
        }
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(range.end);
        // A file system that moves backwards would loop: treat the rest as data.
        if hole <= data {
            out.push(data..range.end);
            return Ok(range.end);
        }
        out.push(data.max(pos)..hole.min(range.end));
        pos = hole;
        n += 1;
    }
    // The last data range ended at or after range.end.
    Ok(range.end)
}

/// Reads `/proc/self/pagemap` for this process's page tables.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
    host_page: u64,
    buf: Vec<u8>,
}

impl Pagemap {
    /// Open this process's pagemap (`Err` where /proc is missing or it is not readable).
    pub fn open() -> io::Result<Pagemap> {
        Ok(Pagemap {
            file: File::open("/proc/self/pagemap")?,
            host_page: host_page_size(),
            buf: vec![0; PAGEMAP_CHUNK * 8],
        })
    }

    /// Which host pages of `addr..addr + len` (virtual addresses of this process) are present
    /// or swapped out: appended to `out` as ranges of `base + (address - addr)`, sorted,
    /// disjoint, clipped to `base..base + len`. Reading pagemap never faults a page in.
    pub fn present_ranges(
        &mut self,
        addr: usize,
        len: usize,
        base: u64,
        out: &mut Vec<Range<u64>>,
    ) -> io::Result<()> {
        let hp = self.host_page;
        let first = addr as u64 / hp;
        let end_addr = (addr as u64)
            .checked_add(len as u64)
            .ok_or_else(|| io::Error::other("range wraps"))?;
        let last = end_addr.div_ceil(hp);
        let clip = base..base + len as u64;
        let mut page = first;
        let mut open: Option<Range<u64>> = None;
        while page < last {
            let n = ((last - page) as usize).min(PAGEMAP_CHUNK);
            let bytes = self
                .buf
                .get_mut(..n * 8)
                .ok_or_else(|| io::Error::other("pagemap buffer"))?;
            self.file.read_exact_at(bytes, page * 8)?;
            for (i, e) in bytes.chunks_exact(8).enumerate() {
                let mut w = [0u8; 8];
                w.copy_from_slice(e);
                let entry = u64::from_ne_bytes(w);
                if entry & (PM_PRESENT | PM_SWAPPED) == 0 {
                    continue;
                }
                let a = (page + i as u64) * hp;
                // Block-relative bytes of this host page, clipped to the queried range.
                let s = (base + a.saturating_sub(addr as u64)).max(clip.start);
                let t = (base + (a + hp).saturating_sub(addr as u64)).min(clip.end);
                if s >= t {
                    continue;
                }
                match open.as_mut() {
                    Some(r) if r.end == s => r.end = t,
                    _ => {
                        if let Some(r) = open.replace(s..t) {
                            out.push(r);
                        }
                    }
                }
            }
            page += n as u64;
        }
        out.extend(open);
        Ok(())
    }
}

/// Sorted, disjoint union of two sorted, disjoint range lists.
pub fn union(a: &[Range<u64>], b: &[Range<u64>], out: &mut Vec<Range<u64>>) {
    out.clear();
    let (mut i, mut j) = (0, 0);
    loop {
        let next = match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) if x.start <= y.start => {
                i += 1;
                x.clone()
            }
            (Some(_), Some(y)) | (None, Some(y)) => {
                j += 1;
                y.clone()
            }
            (Some(x), None) => {
                i += 1;
                x.clone()
            }
            (None, None) => break,
        };
        match out.last_mut() {
            Some(l) if next.start <= l.end => l.end = l.end.max(next.end),
            _ => out.push(next),
        }
    }
}

/// Whether `off..off + len` meets any of `ranges` (sorted, disjoint).
pub fn overlaps(ranges: &[Range<u64>], off: u64, len: u64) -> bool {
    let i = ranges.partition_point(|r| r.end <= off);
    ranges.get(i).is_some_and(|r| r.start < off + len)
}

/// Whether `off..off + len` lies inside one of `ranges` (sorted, disjoint, merged).
pub fn covered(ranges: &[Range<u64>], off: u64, len: u64) -> bool {
    let i = ranges.partition_point(|r| r.end <= off);
    ranges
        .get(i)
        .is_some_and(|r| r.start <= off && off + len <= r.end)
}

/// Sort and merge ranges (dropping empty ones).
pub fn normalize(ranges: &mut Vec<Range<u64>>) {
    ranges.retain(|r| r.start < r.end);
    ranges.sort_unstable_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges.drain(..) {
        match out.last_mut() {
            Some(l) if r.start <= l.end => l.end = l.end.max(r.end),
            _ => out.push(r),
        }
    }
    *ranges = out;
}

/// Asks the kernel, batch by batch, which pages of a block hold data. One per sending
/// channel (it keeps the pagemap file and scratch space).
#[derive(Debug, Default)]
pub struct DataProbe {
    /// `None`: not opened yet; `Some(None)`: unavailable here.
    pagemap: Option<Option<Pagemap>>,
    a: Vec<Range<u64>>,
    b: Vec<Range<u64>>,
    spans: Vec<Range<u64>>,
    /// A hole found this round: (the file's identity, file offsets). Batches inside it need
    /// no system call. Cleared by [`DataProbe::begin_round`]: an answer is only good for the
    /// round it was asked in (a page written after it is in the next round's dirty set).
    hole: Option<(usize, Range<u64>)>,
    /// Pagemap read ahead this round: (the block's address, the block range it covers, the
    /// present ranges in it). One read of [`PAGEMAP_AHEAD`] bytes of memory answers the next
    /// batches too. Cleared by [`DataProbe::begin_round`], as `hole`.
    ahead: Option<ReadAhead>,
    /// After a read-ahead found every page present: (block address, block range) not asked
    /// about, and the current window length.
    skip: Option<(usize, Range<u64>)>,
    skip_len: u64,
}

/// Largest window of memory not asked about after all-present answers.
pub const PAGEMAP_SKIP_MAX: u64 = 64 << 20;

/// A pagemap read ahead: (the block's address, the block range it covers, the present ranges).
type ReadAhead = (usize, Range<u64>, Vec<Range<u64>>);

/// Bytes of memory one pagemap read covers (4096 entries, 32 KiB of pagemap, for 4 KiB pages).
pub const PAGEMAP_AHEAD: u64 = 16 << 20;

impl DataProbe {
    /// A probe (opens pagemap on first use).
    pub fn new() -> DataProbe {
        DataProbe::default()
    }

    /// A new round starts: forget every answer of the previous one.
    pub fn begin_round(&mut self) {
        self.hole = None;
        self.ahead = None;
        self.skip = None;
        self.skip_len = 0;
    }

    fn pagemap(&mut self) -> Option<&mut Pagemap> {
        self.pagemap
            .get_or_insert_with(|| match Pagemap::open() {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::info!(error = %e, "/proc/self/pagemap unavailable: anonymous memory is read page by page");
                    None
                }
            })
            .as_mut()
    }

    /// The data ranges (block byte offsets, sorted, disjoint) of the pages at `offsets`
    /// (`page`-sized, inside a block of `len` bytes at `addr` made of `contents`), into `out`.
    /// Returns false when the kernel cannot answer: then every page must be read.
    ///
    /// The offsets are grouped into spans (pages less than [`CLUSTER_GAP`] pages apart share
    /// one), and each span costs one pagemap read or a few `lseek`s, never one call per page.
    /// A batch scattered over more than [`MAX_SPANS`] spans (a sparse dirty set, whose pages
    /// were written recently anyway) is not worth asking about and returns false.
    pub fn data_ranges(
        &mut self,
        contents: &Contents,
        addr: usize,
        len: usize,
        offsets: &[u64],
        page: u64,
        out: &mut Vec<Range<u64>>,
    ) -> bool {
        out.clear();
        if matches!(contents, Contents::Unknown) || page == 0 {
            return false;
        }
        let mut spans = std::mem::take(&mut self.spans);
        let ok = spans_of(offsets, page, len as u64, &mut spans) && !spans.is_empty();
        let ok = ok && self.query(contents, addr, len as u64, &spans, out);
        self.spans = spans;
        ok
    }

    /// Present ranges of `span` (block offsets; the block is at `addr`, `len` bytes) appended
    /// to `v`, from this round's read-ahead when it covers the span, else from a new read of
    /// up to [`PAGEMAP_AHEAD`] bytes starting at the span.
    fn present(
        &mut self,
        addr: usize,
        len: u64,
        span: &Range<u64>,
        v: &mut Vec<Range<u64>>,
    ) -> bool {
        let covered = |a: &Option<ReadAhead>| {
            a.as_ref()
                .is_some_and(|(at, c, _)| *at == addr && c.start <= span.start && span.end <= c.end)
        };
        if !covered(&self.ahead) {
            // Memory that was all present in the last reads is likely more of the same: skip
            // asking (pagemap costs ~90 ns a page even where every page is present) over a
            // window that doubles up to PAGEMAP_SKIP_MAX, and read those pages as before.
            if self
                .skip
                .as_ref()
                .is_some_and(|(at, w)| *at == addr && w.start <= span.start && span.end <= w.end)
            {
                return false;
            }
            let end = span
                .start
                .saturating_add(PAGEMAP_AHEAD)
                .min(len)
                .max(span.end);
            let mut ranges = self.ahead.take().map(|(_, _, r)| r).unwrap_or_default();
            ranges.clear();
            let Some(pm) = self.pagemap() else {
                return false;
            };
            let a = addr.wrapping_add(span.start as usize);
            if pm
                .present_ranges(a, (end - span.start) as usize, span.start, &mut ranges)
                .is_err()
            {
                return false;
            }
            let full = matches!(ranges.as_slice(), [r] if r.start <= span.start && r.end >= end);
            if full {
                self.skip_len = (self.skip_len * 2).clamp(PAGEMAP_AHEAD, PAGEMAP_SKIP_MAX);
                self.skip = Some((addr, end..end.saturating_add(self.skip_len)));
            } else {
                self.skip_len = 0;
                self.skip = None;
            }
            self.ahead = Some((addr, span.start..end, ranges));
        }
        let Some((_, _, ranges)) = self.ahead.as_ref() else {
            return false;
        };
        let i = ranges.partition_point(|r| r.end <= span.start);
        for r in ranges.get(i..).into_iter().flatten() {
            if r.start >= span.end {
                break;
            }
            v.push(r.start.max(span.start)..r.end.min(span.end));
        }
        true
    }

    /// Where the hole this round's answers found around block offset `from` ends (block
    /// offset), when `from` lies in one: a file mapped shared whose last `lseek` found a hole
    /// there, or anonymous memory whose last pagemap read-ahead shows nothing present from
    /// `from` to its end. `None`: nothing known (then ask [`DataProbe::data_ranges`]). Good for
    /// this round only, as every answer.
    pub fn hole_end(&self, contents: &Contents, addr: usize, from: u64) -> Option<u64> {
        match contents {
            Contents::Unknown => None,
            Contents::Anonymous => {
                let (at, covered, present) = self.ahead.as_ref()?;
                let inside = *at == addr && covered.start <= from && from < covered.end;
                (inside && present.iter().all(|p| p.end <= from)).then_some(covered.end)
            }
            Contents::File {
                file,
                offset,
                shared,
            } => {
                // A private mapping's written pages are not in the file: pagemap must answer.
                if !shared {
                    return None;
                }
                let (id, h) = self.hole.as_ref()?;
                let at = offset.checked_add(from)?;
                (*id == Arc::as_ptr(file) as usize && h.start <= at && at < h.end)
                    .then(|| h.end - offset)
            }
        }
    }

    fn query(
        &mut self,
        contents: &Contents,
        addr: usize,
        len: u64,
        spans: &[Range<u64>],
        out: &mut Vec<Range<u64>>,
    ) -> bool {
        let pagemap_into = |probe: &mut DataProbe, v: &mut Vec<Range<u64>>| -> bool {
            spans.iter().all(|r| probe.present(addr, len, r, v))
        };
        match contents {
            Contents::Unknown => false,
            Contents::Anonymous => pagemap_into(self, out),
            Contents::File {
                file,
                offset,
                shared,
            } => {
                let mut a = std::mem::take(&mut self.a);
                let mut b = std::mem::take(&mut self.b);
                a.clear();
                b.clear();
                let id = Arc::as_ptr(file) as usize;
                let mut hole = self.hole.take();
                let seek_ok = spans.iter().all(|r| {
                    let (Some(s), Some(t)) =
                        (offset.checked_add(r.start), offset.checked_add(r.end))
                    else {
                        return false;
                    };
                    if hole
                        .as_ref()
                        .is_some_and(|(f, h)| *f == id && h.start <= s && t <= h.end)
                    {
                        // Inside a hole this round already found: no data, no system call.
                        return true;
                    }
                    let from = a.len();
                    match file_data_ranges(file, s..t, &mut a) {
                        Ok(hole_end) => {
                            let hole_start =
                                a.last().filter(|_| a.len() > from).map_or(s, |d| d.end);
                            if hole_end > hole_start {
                                hole = Some((id, hole_start..hole_end));
                            }
                            for d in a.get_mut(from..).into_iter().flatten() {
                                *d = d.start - offset..d.end - offset;
                            }
                            true
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "SEEK_DATA unavailable");
                            false
                        }
                    }
                });
                self.hole = hole;
                // Private mapping: pages written here are anonymous copies the file does not
                // know about, so pagemap must answer too. Shared: the file holds every write.
                let ok = seek_ok && (*shared || pagemap_into(self, &mut b));
                if ok {
                    union(&a, &b, out);
                }
                self.a = a;
                self.b = b;
                ok
            }
        }
    }
}

/// Pages at most this many pages apart are queried as one span.
pub const CLUSTER_GAP: u64 = 64;
/// Most spans one batch is queried in.
pub const MAX_SPANS: usize = 8;

/// Group `offsets` (pages of `page` bytes in a block of `len` bytes) into sorted spans; false
/// when they need more than [`MAX_SPANS`].
fn spans_of(offsets: &[u64], page: u64, len: u64, spans: &mut Vec<Range<u64>>) -> bool {
    spans.clear();
    let sorted = offsets.windows(2).all(|w| w[0] <= w[1]);
    let mut tmp;
    let offs = if sorted {
        offsets
    } else {
        tmp = offsets.to_vec();
        tmp.sort_unstable();
        &tmp[..]
    };
    for &o in offs {
        let end = o.saturating_add(page).min(len);
        if o >= end {
            continue;
        }
        match spans.last_mut() {
            Some(r) if o <= r.end.saturating_add(CLUSTER_GAP * page) => r.end = r.end.max(end),
            _ => {
                if spans.len() == MAX_SPANS {
                    return false;
                }
                spans.push(o..end);
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn batches_group_into_few_spans() {
        let mut v = Vec::new();
        assert!(spans_of(&[0, 4096, 8192], 4096, 1 << 30, &mut v));
        assert_eq!(v, vec![0..12288]);
        // Unsorted, two clusters, the last page clipped to the block.
        assert!(spans_of(
            &[1 << 20, 0, 100 * 4096],
            4096,
            (1 << 20) + 2048,
            &mut v
        ));
        assert_eq!(
            v,
            vec![0..4096, 100 * 4096..101 * 4096, (1 << 20)..(1 << 20) + 2048]
        );
        let scattered: Vec<u64> = (0..20).map(|i| i * 1000 * 4096).collect();
        assert!(!spans_of(&scattered, 4096, 1 << 40, &mut v));
    }

    #[test]
    fn ranges_helpers() {
        let mut out = Vec::new();
        union(&[0..10, 20..30], &[5..12, 30..40, 50..60], &mut out);
        assert_eq!(out, vec![0..12, 20..40, 50..60]);
        assert!(overlaps(&out, 11, 4));
        assert!(!overlaps(&out, 12, 8));
        assert!(covered(&out, 20, 20));
        assert!(!covered(&out, 10, 4));
        let mut v = vec![5..6, 0..2, 1..3, 7..7];
        normalize(&mut v);
        assert_eq!(v, vec![0..3, 5..6]);
    }

    #[test]
    fn seek_data_finds_the_written_ranges_of_a_sparse_file() {
        let mut f = tempfile::tempfile().expect("tempfile");
        let ps = 4096u64;
        f.set_len(1024 * ps).expect("len");
        f.write_all_at(&[1u8; 4096], 100 * ps).expect("write");
        f.write_all_at(&[2u8; 8192], 500 * ps).expect("write");
        f.flush().expect("flush");
        let mut out = Vec::new();
        file_data_ranges(&f, 0..1024 * ps, &mut out).expect("seek");
        // File systems may report data at a coarser granularity than a page, never finer:
        // every written page is inside, and most of the file is a hole.
        assert!(covered(&out, 100 * ps, ps), "{out:?}");
        assert!(covered(&out, 500 * ps, 2 * ps), "{out:?}");
        let data: u64 = out.iter().map(|r| r.end - r.start).sum();
        assert!(data < 512 * ps, "most of the file is a hole: {out:?}");
        // A query inside a hole finds nothing.
        out.clear();
        let hole_end = file_data_ranges(&f, 200 * ps..400 * ps, &mut out).expect("seek");
        assert!(out.is_empty(), "{out:?}");
        // ... and says how far the hole goes: up to the next data, not beyond it.
        assert!((400 * ps..=500 * ps).contains(&hole_end), "{hole_end}");
        out.clear();
        let tail = file_data_ranges(&f, 600 * ps..700 * ps, &mut out).expect("seek");
        assert!(out.is_empty() && tail >= 700 * ps, "{out:?} {tail}");
    }

    #[test]
    fn a_hole_found_is_reused_within_a_round_and_asked_again_next_round() {
        let f = tempfile::tempfile().expect("tempfile");
        let ps = 4096u64;
        f.set_len(1024 * ps).expect("len");
        f.write_all_at(&[1u8; 4096], 900 * ps).expect("write");
        let contents = Contents::File {
            file: Arc::new(f.try_clone().expect("clone")),
            offset: 0,
            shared: true,
        };
        let mut p = DataProbe::new();
        let mut out = Vec::new();
        let batch = |first: u64| (first..first + 128).map(|i| i * ps).collect::<Vec<_>>();
        p.begin_round();
        assert!(p.data_ranges(&contents, 0, 1024 * ps as usize, &batch(0), ps, &mut out));
        assert!(out.is_empty());
        // Written after the answer: within the round the hole stands (the write dirtied the
        // page, the next round sends it) ...
        f.write_all_at(&[2u8; 4096], 300 * ps).expect("write");
        assert!(p.data_ranges(&contents, 0, 1024 * ps as usize, &batch(256), ps, &mut out));
        assert!(out.is_empty(), "answered from this round's hole");
        // ... and the next round asks the kernel again.
        p.begin_round();
        assert!(p.data_ranges(&contents, 0, 1024 * ps as usize, &batch(256), ps, &mut out));
        assert!(covered(&out, 300 * ps, ps), "{out:?}");
    }

    #[test]
    fn pagemap_read_ahead_answers_later_batches_of_the_round_only() {
        if Pagemap::open().is_err() {
            eprintln!("SKIP: /proc/self/pagemap not readable here");
            return;
        }
        let ps = host_page_size();
        let len = 8 * PAGEMAP_AHEAD as usize;
        let block = crate::memory::Block::anonymous("t", len).expect("map");
        let touch = |off: u64| {
            // SAFETY: the block is only used by this test, and nothing else holds a view.
            let bytes = unsafe { block.as_mut_slice() };
            bytes[off as usize] = 1;
        };
        let at = PAGEMAP_AHEAD + 5 * ps;
        touch(at);
        let mut p = DataProbe::new();
        let mut out = Vec::new();
        let batch = |first: u64| (0..128).map(|i| first + i * ps).collect::<Vec<_>>();
        let ask = |p: &mut DataProbe, first: u64, out: &mut Vec<Range<u64>>| {
            assert!(p.data_ranges(
                &Contents::Anonymous,
                block.as_ptr() as usize,
                len,
                &batch(first),
                ps,
                out
            ));
        };
        p.begin_round();
        ask(&mut p, 0, &mut out);
        assert!(out.is_empty());
        // Written after the read-ahead: this round's answer stands ...
        touch(200 * ps);
        ask(&mut p, 128 * ps, &mut out);
        assert!(out.is_empty(), "{out:?}");
        // ... beyond the read-ahead, a new read sees what is there ...
        ask(&mut p, PAGEMAP_AHEAD, &mut out);
        assert_eq!(out, vec![at..at + ps]);
        // ... and the next round asks again.
        p.begin_round();
        ask(&mut p, 128 * ps, &mut out);
        assert_eq!(out, vec![200 * ps..201 * ps]);
    }

    #[test]
    fn all_present_memory_backs_off_asking_then_asks_again() {
        if Pagemap::open().is_err() {
            eprintln!("SKIP: /proc/self/pagemap not readable here");
            return;
        }
        let ps = host_page_size();
        let len = 8 * PAGEMAP_AHEAD as usize;
        let block = crate::memory::Block::anonymous("t", len).expect("map");
        // SAFETY: the block is only used by this test.
        let bytes = unsafe { block.as_mut_slice() };
        bytes[..PAGEMAP_AHEAD as usize].fill(1);
        let mut p = DataProbe::new();
        let mut out = Vec::new();
        let batch = |first: u64| (0..128).map(|i| first + i * ps).collect::<Vec<_>>();
        let addr = block.as_ptr() as usize;
        p.begin_round();
        assert!(p.data_ranges(&Contents::Anonymous, addr, len, &batch(0), ps, &mut out));
        assert_eq!(out, vec![0..128 * ps]);
        // The next 16 MiB are not asked about (read page by page, as without a map) ...
        assert!(!p.data_ranges(
            &Contents::Anonymous,
            addr,
            len,
            &batch(PAGEMAP_AHEAD),
            ps,
            &mut out
        ));
        // ... beyond the window the kernel is asked again.
        let far = 2 * PAGEMAP_AHEAD;
        assert!(p.data_ranges(&Contents::Anonymous, addr, len, &batch(far), ps, &mut out));
        assert!(out.is_empty());
    }

    #[test]
    fn pagemap_sees_touched_anonymous_pages_only() {
        let Ok(mut pm) = Pagemap::open() else {
            eprintln!("SKIP: /proc/self/pagemap not readable here");
            return;
        };
        let hp = host_page_size() as usize;
        let block = crate::memory::Block::anonymous("t", 64 * hp).expect("map");
        // SAFETY: the block is new and only this test uses it.
        let bytes = unsafe { block.as_mut_slice() };
        bytes[3 * hp] = 1;
        bytes[4 * hp + 7] = 1;
        bytes[40 * hp] = 9;
        let mut out = Vec::new();
        pm.present_ranges(block.as_ptr() as usize, 64 * hp, 0, &mut out)
            .expect("pagemap");
        let hp = hp as u64;
        assert_eq!(out, vec![3 * hp..5 * hp, 40 * hp..41 * hp]);
        // A sub-range, reported relative to a base.
        out.clear();
        let a = block.as_ptr() as usize + 4 * hp as usize;
        pm.present_ranges(a, 8 * hp as usize, 4 * hp, &mut out)
            .expect("pagemap");
        assert_eq!(out, vec![4 * hp..5 * hp]);
    }
}
