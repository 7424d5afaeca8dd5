//! Which pages a round sends, and how channels take them in packet-sized batches.
//!
//! Channels pull batches from a shared cursor (an atomic counter), so a fast channel takes
//! more batches than a slow one and all of them stay busy until the round's pages run out.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The pages of one block that a round sends.
#[derive(Clone, Debug)]
pub enum BlockPages {
    /// Every page of the block.
    All,
    /// These page offsets (bytes from the block's start; page-aligned, inside the block).
    Offsets(Vec<u64>),
    /// A dirty bitmap: bit `i` (little-endian bit order within each u64, as KVM's dirty log)
    /// set means page `i` is sent.
    Bitmap(Vec<u64>),
}

/// One round's pages over a guest memory layout, split into batches of at most
/// `pages_per_packet` pages of one block.
#[derive(Debug)]
pub struct RoundPages {
    /// (block index, pages of it, first global chunk index) in ascending chunk order.
    blocks: Vec<(usize, Chunked)>,
    chunk_starts: Vec<usize>,
    chunks: usize,
    cursor: AtomicUsize,
    pages: u64,
    /// Per block index: byte ranges the VMM says hold nothing this round (sorted, merged).
    known_zero: Vec<(usize, Vec<Range<u64>>)>,
    /// Pages known never written go in no packet (the session's first round, to a receiver
    /// whose memory is all zero).
    skip_unwritten: bool,
}

#[derive(Debug)]
struct Chunked {
    offsets: Option<Vec<u64>>,
    npages: u64,
    page_size: u64,
    per_chunk: usize,
}

impl RoundPages {
    /// Build from per-block selections. `block_sizes[i]` is block i's size in bytes.
    /// Offsets out of range or unaligned are dropped (the caller's own data: a VMM bug, logged).
    pub fn new(
        selection: Vec<(usize, BlockPages)>,
        block_sizes: &[u64],
        page_size: u32,
        pages_per_packet: u32,
    ) -> RoundPages {
        let ps = page_size as u64;
        let per_chunk = pages_per_packet.max(1) as usize;
        let mut blocks = Vec::new();
        let mut chunk_starts = Vec::new();
        let mut chunks = 0usize;
        let mut pages = 0u64;
        for (b, sel) in selection {
            let Some(&size) = block_sizes.get(b) else {
                tracing::warn!(
                    block = b,
                    "round selection names a block that does not exist; ignored"
                );
                continue;
            };
            let npages_block = size / ps;
            let offsets = match sel {
                BlockPages::All => None,
                BlockPages::Offsets(mut v) => {
                    let before = v.len();
                    v.retain(|o| o % ps == 0 && o / ps < npages_block);
                    if v.len() != before {
                        tracing::warn!(
                            block = b,
                            dropped = before - v.len(),
                            "dropped unaligned or out-of-range offsets"
                        );
                    }
                    Some(v)
                }
                BlockPages::Bitmap(words) => {
                    let mut v = Vec::new();
                    for (w, &word) in words.iter().enumerate() {
                        let mut bits = word;
                        while bits != 0 {
                            let bit = bits.trailing_zeros() as u64;
                            let page = w as u64 * 64 + bit;
                            if page < npages_block {
                                v.push(page * ps);
                            }
                            bits &= bits - 1;
                        }
                    }
                    Some(v)
                }
            };
            let npages = offsets.as_ref().map_or(npages_block, |v| v.len() as u64);
            if npages == 0 {
                continue;
            }
            let n_chunks = (npages as usize).div_ceil(per_chunk);
            chunk_starts.push(chunks);
            chunks += n_chunks;
            pages += npages;
            blocks.push((
                b,
                Chunked {
                    offsets,
                    npages,
                    page_size: ps,
                    per_chunk,
                },
            ));
        }
        RoundPages {
            blocks,
            chunk_starts,
            chunks,
            cursor: AtomicUsize::new(0),
            pages,
            known_zero: Vec::new(),
            skip_unwritten: false,
        }
    }

    /// The VMM's own knowledge: in block `block`, the byte `ranges` hold nothing worth sending
    /// in this round (never written, or free pages from balloon / free-page hints). Selected
    /// pages that lie wholly inside them go as zero pages without being read, and arrive as
    /// zeros. The hint is for this round only: a page the guest writes later must be in a later
    /// round's selection, as any dirtied page.
    pub fn with_known_zero(mut self, block: usize, mut ranges: Vec<Range<u64>>) -> RoundPages {
        crate::datamap::normalize(&mut ranges);
        match self.known_zero.iter_mut().find(|(b, _)| *b == block) {
            Some((_, v)) => {
                v.extend(ranges);
                crate::datamap::normalize(v);
            }
            None => self.known_zero.push((block, ranges)),
        }
        self
    }

    /// The ranges of block `block` the VMM declared zero for this round (sorted, merged).
    pub fn known_zero(&self, block: usize) -> &[Range<u64>] {
        self.known_zero
            .iter()
            .find(|(b, _)| *b == block)
            .map_or(&[], |(_, v)| v.as_slice())
    }

    /// Every page of every block.
    pub fn all(block_sizes: &[u64], page_size: u32, pages_per_packet: u32) -> RoundPages {
        let sel = (0..block_sizes.len())
            .map(|b| (b, BlockPages::All))
            .collect();
        RoundPages::new(sel, block_sizes, page_size, pages_per_packet)
    }

    /// Leave pages known never written (the kernel's holes, the VMM's known-zero ranges) out
    /// of every packet: set by the sender for a session's first round when the receiver's
    /// memory is all zero.
    pub(crate) fn set_skip_unwritten(&mut self, skip: bool) {
        self.skip_unwritten = skip;
    }

    /// Whether pages known never written are left out of the packets.
    pub fn skip_unwritten(&self) -> bool {
        self.skip_unwritten
    }

    /// Pass over the chunks of block `block` that lie wholly before byte offset `end` and
    /// that no channel has taken yet (a hole found by the caller, whose pages a round that
    /// leaves out unwritten pages sends nothing of). Returns the pages passed over. Only for
    /// a block selected whole ([`BlockPages::All`]); otherwise nothing is passed over.
    pub(crate) fn skip_until(&self, block: usize, end: u64) -> u64 {
        let Some(pos) = self.blocks.iter().position(|(b, _)| *b == block) else {
            return 0;
        };
        let (Some((_, c)), Some(&start)) = (self.blocks.get(pos), self.chunk_starts.get(pos))
        else {
            return 0;
        };
        if c.offsets.is_some() || c.page_size == 0 {
            return 0;
        }
        let pc = c.per_chunk as u64;
        let n_chunks = c.npages.div_ceil(pc);
        // Chunks wholly before `end`: those ending at or before its page (the last one,
        // perhaps short, ends at the block's end).
        let end_page = end / c.page_size;
        let local = if end_page >= c.npages {
            n_chunks
        } else {
            end_page / pc
        };
        let target = start + local as usize;
        // Move the cursor from inside this block to `target`, never backwards and never from
        // another block (a caller asks only about a block it took a chunk of).
        let mut prev = self.cursor.load(Ordering::Relaxed);
        loop {
            if prev >= target || prev < start {
                return 0;
            }
            match self.cursor.compare_exchange_weak(
                prev,
                target,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(now) => prev = now,
            }
        }
        let first_page = ((prev - start) as u64) * pc;
        (local * pc).min(c.npages).saturating_sub(first_page)
    }

    /// Pages in this round.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Take the next batch: fills `out` with page offsets of one block and returns the block
    /// index, or `None` when the round has no pages left.
    pub fn next_batch(&self, out: &mut Vec<u64>) -> Option<usize> {
        out.clear();
        let idx = self.cursor.fetch_add(1, Ordering::Relaxed);
        if idx >= self.chunks {
            return None;
        }
        let pos = self
            .chunk_starts
            .partition_point(|&s| s <= idx)
            .checked_sub(1)?;
        let (block, c) = self.blocks.get(pos)?;
        let local = idx - self.chunk_starts.get(pos)?;
        let first = (local * c.per_chunk) as u64;
        let last = (first + c.per_chunk as u64).min(c.npages);
        match &c.offsets {
            None => out.extend((first..last).map(|p| p * c.page_size)),
            Some(v) => out.extend_from_slice(v.get(first as usize..last as usize)?),
        }
        Some(*block)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(r: &RoundPages) -> Vec<(usize, Vec<u64>)> {
        let mut out = Vec::new();
        let mut v = Vec::new();
        while let Some(b) = r.next_batch(&mut v) {
            out.push((b, v.clone()));
        }
        out
    }

    #[test]
    fn skip_until_passes_over_whole_untaken_chunks_of_one_block_only() {
        // Block 0: 10 pages (chunks of 4: 0-3, 4-7, 8-9); block 1: 8 pages.
        let r = RoundPages::all(&[10 * 4096, 8 * 4096], 4096, 4);
        let mut v = Vec::new();
        assert_eq!(r.next_batch(&mut v), Some(0));
        assert_eq!(v, vec![0, 4096, 2 * 4096, 3 * 4096]);
        // A hole up to page 9: chunk 4-7 is wholly before it, chunk 8-9 is not.
        assert_eq!(r.skip_until(0, 9 * 4096), 4);
        // Asked again: nothing more to pass over.
        assert_eq!(r.skip_until(0, 9 * 4096), 0);
        assert_eq!(r.next_batch(&mut v), Some(0));
        assert_eq!(v, vec![8 * 4096, 9 * 4096]);
        // A hole past the block's end never reaches into block 1.
        assert_eq!(r.skip_until(0, 1 << 40), 0);
        let rest = drain(&r);
        assert_eq!(rest.len(), 2);
        assert!(rest.iter().all(|(b, _)| *b == 1));
        // A block given as offsets is never passed over.
        let sel = vec![(0, BlockPages::Offsets(vec![0, 4096, 8192, 12288, 16384]))];
        let r = RoundPages::new(sel, &[8 * 4096], 4096, 2);
        assert_eq!(r.next_batch(&mut v), Some(0));
        assert_eq!(r.skip_until(0, 8 * 4096), 0);
    }

    #[test]
    fn skip_until_counts_a_last_partial_chunk() {
        // 10 pages in chunks of 4: a hole to the end passes over 4-7 and 8-9 (6 pages).
        let r = RoundPages::all(&[10 * 4096], 4096, 4);
        let mut v = Vec::new();
        assert_eq!(r.next_batch(&mut v), Some(0));
        assert_eq!(r.skip_until(0, 10 * 4096), 6);
        assert_eq!(r.next_batch(&mut v), None);
    }

    #[test]
    fn all_pages_in_batches_never_crossing_blocks() {
        let r = RoundPages::all(&[10 * 4096, 3 * 4096], 4096, 4);
        assert_eq!(r.pages(), 13);
        let got = drain(&r);
        let sizes: Vec<(usize, usize)> = got.iter().map(|(b, v)| (*b, v.len())).collect();
        assert_eq!(sizes, vec![(0, 4), (0, 4), (0, 2), (1, 3)]);
        assert_eq!(got[2].1, vec![8 * 4096, 9 * 4096]);
    }

    #[test]
    fn offsets_and_bitmap_selections() {
        let sel = vec![
            (0, BlockPages::Offsets(vec![0, 4096 * 5, 123, 4096 * 99])),
            (1, BlockPages::Bitmap(vec![0b1010, 1])),
        ];
        let r = RoundPages::new(sel, &[8 * 4096, 128 * 4096], 4096, 128);
        let got = drain(&r);
        assert_eq!(
            got,
            vec![(0, vec![0, 4096 * 5]), (1, vec![4096, 3 * 4096, 64 * 4096])]
        );
    }

    #[test]
    fn concurrent_takers_see_each_batch_once() {
        let r = RoundPages::all(&[1000 * 4096], 4096, 7);
        let seen = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    let mut v = Vec::new();
                    while r.next_batch(&mut v).is_some() {
                        seen.lock().expect("lock").extend_from_slice(&v);
                    }
                });
            }
        });
        let mut all = seen.into_inner().expect("lock");
        all.sort_unstable();
        assert_eq!(all, (0..1000u64).map(|p| p * 4096).collect::<Vec<_>>());
    }
}
