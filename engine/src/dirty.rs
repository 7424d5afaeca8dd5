//! A round's dirty set, gathered from the VMM's dirty-tracking sources.
//!
//! A VMM learns which guest pages changed from more than one place: KVM's per-slot dirty
//! bitmap (`KVM_GET_DIRTY_LOG`: what the vCPUs wrote), and its own tracking of what device
//! emulation wrote (vm-memory's `AtomicBitmap`, see [`crate::vmm`]). A [`DirtyLog`] is one
//! bitmap per block of a [`GuestRam`] that ORs them all together; [`DirtyLog::take_round`]
//! turns it into the [`RoundPages`] a [`crate::Sender`] sends and starts the next set empty.
//!
//! Bit `i` of word `w` (little-endian bit order, KVM's and vm-memory's) stands for page
//! `64 × w + i` of the block.

use thiserror::Error;

use crate::memory::GuestRam;
use crate::pages::{BlockPages, RoundPages};

/// Errors of dirty-set bookkeeping: each names the VMM-side mismatch (a wrong slot, a bitmap
/// of another size) that would otherwise silently lose dirty pages.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DirtyError {
    /// No block with this index.
    #[error("dirty log: no block {block} (the memory has {blocks})")]
    NoBlock { block: usize, blocks: usize },
    /// A bitmap longer than its block, or with bits set past the block's last page.
    #[error(
        "dirty log: block {block} has {pages} pages but the bitmap covers {bitmap_pages} \
         (bits set past the end: is it another slot's bitmap?)"
    )]
    BitmapSize {
        block: usize,
        pages: u64,
        bitmap_pages: u64,
    },
    /// A byte range outside the block.
    #[error("dirty log: range {offset:#x}+{len:#x} is outside block {block} ({size:#x} bytes)")]
    Range {
        block: usize,
        offset: u64,
        len: u64,
        size: u64,
    },
    /// A guest memory with another number of regions than the log has blocks.
    #[error("dirty log: the memory has {regions} regions but the log {blocks} blocks")]
    Layout { regions: usize, blocks: usize },
    /// A bitmap whose pages are not this log's pages.
    #[error("dirty log: block {block}: the bitmap tracks pages of {got} bytes, this log {want}")]
    PageSize { block: usize, got: u64, want: u64 },
}

/// One dirty bitmap per block of a guest memory layout.
#[derive(Clone, Debug)]
pub struct DirtyLog {
    page_size: u32,
    /// (pages in the block, bitmap words)
    blocks: Vec<(u64, Vec<u64>)>,
}

impl DirtyLog {
    /// An empty log for `mem`'s layout, with `page_size`-byte pages (the session's).
    pub fn new(mem: &GuestRam, page_size: u32) -> DirtyLog {
        let ps = u64::from(page_size.max(1));
        let blocks = mem
            .blocks()
            .iter()
            .map(|b| {
                let pages = b.len() as u64 / ps;
                (pages, vec![0u64; pages.div_ceil(64) as usize])
            })
            .collect();
        DirtyLog { page_size, blocks }
    }

    /// The page size this log counts in.
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// Number of blocks.
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    fn block_mut(&mut self, block: usize) -> Result<&mut (u64, Vec<u64>), DirtyError> {
        let blocks = self.blocks.len();
        self.blocks
            .get_mut(block)
            .ok_or(DirtyError::NoBlock { block, blocks })
    }

    /// OR a dirty bitmap of block `block` into the log: KVM's `KVM_GET_DIRTY_LOG` result for
    /// the slot that maps the block, or vm-memory's bitmap words. Shorter bitmaps cover the
    /// block's first pages; a bitmap with a bit set past the block's last page is refused
    /// (it belongs to another slot) and nothing is added.
    pub fn add_bitmap(&mut self, block: usize, words: &[u64]) -> Result<(), DirtyError> {
        let (pages, bits) = self.block_mut(block)?;
        let pages = *pages;
        let beyond = words.iter().enumerate().any(|(w, &word)| {
            let first = w as u64 * 64;
            if first >= pages {
                word != 0
            } else if pages - first < 64 {
                word >> (pages - first) != 0
            } else {
                false
            }
        });
        if beyond {
            return Err(DirtyError::BitmapSize {
                block,
                pages,
                bitmap_pages: words.len() as u64 * 64,
            });
        }
        for (dst, src) in bits.iter_mut().zip(words) {
            *dst |= src;
        }
        Ok(())
    }

    /// Mark `len` bytes at `offset` of block `block` dirty (every page they touch).
    pub fn mark_range(&mut self, block: usize, offset: u64, len: u64) -> Result<(), DirtyError> {
        let ps = u64::from(self.page_size.max(1));
        let (pages, bits) = self.block_mut(block)?;
        let size = *pages * ps;
        let end = offset.checked_add(len).filter(|&e| e <= size);
        let Some(end) = end else {
            return Err(DirtyError::Range {
                block,
                offset,
                len,
                size,
            });
        };
        if len == 0 {
            return Ok(());
        }
        for page in offset / ps..end.div_ceil(ps) {
            if let Some(w) = bits.get_mut((page / 64) as usize) {
                *w |= 1 << (page % 64);
            }
        }
        Ok(())
    }

    /// Mark every page of every block dirty (the first round).
    pub fn mark_all(&mut self) {
        for (pages, bits) in &mut self.blocks {
            bits.fill(u64::MAX);
            let tail = *pages % 64;
            if let (Some(last), true) = (bits.last_mut(), tail != 0) {
                *last = (1u64 << tail) - 1;
            }
        }
    }

    /// OR another log of the same layout into this one.
    pub fn merge(&mut self, other: &DirtyLog) {
        for ((_, a), (_, b)) in self.blocks.iter_mut().zip(&other.blocks) {
            for (x, y) in a.iter_mut().zip(b) {
                *x |= y;
            }
        }
    }

    /// Dirty pages in the log.
    pub fn pages(&self) -> u64 {
        self.blocks
            .iter()
            .flat_map(|(_, b)| b.iter())
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Whether no page is dirty.
    pub fn is_empty(&self) -> bool {
        self.blocks.iter().all(|(_, b)| b.iter().all(|w| *w == 0))
    }

    /// Whether page `page` of block `block` is dirty.
    pub fn is_dirty(&self, block: usize, page: u64) -> bool {
        self.blocks
            .get(block)
            .and_then(|(_, b)| b.get((page / 64) as usize))
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// The bitmap words of block `block`.
    pub fn words(&self, block: usize) -> Option<&[u64]> {
        self.blocks.get(block).map(|(_, b)| b.as_slice())
    }

    /// The log's pages as a round (batches of `pages_per_packet`), leaving the log empty for
    /// the next round.
    pub fn take_round(&mut self, pages_per_packet: u32) -> RoundPages {
        let ps = u64::from(self.page_size.max(1));
        let sizes: Vec<u64> = self.blocks.iter().map(|(p, _)| p * ps).collect();
        let selection = self
            .blocks
            .iter_mut()
            .enumerate()
            .filter(|(_, (_, b))| b.iter().any(|w| *w != 0))
            .map(|(i, (_, b))| {
                let words = std::mem::replace(b, vec![0; b.len()]);
                (i, BlockPages::Bitmap(words))
            })
            .collect();
        RoundPages::new(selection, &sizes, self.page_size, pages_per_packet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Block;

    fn mem() -> GuestRam {
        GuestRam::new(vec![
            Block::anonymous("a", 100 * 4096).expect("map"),
            Block::anonymous("b", 64 * 4096).expect("map"),
        ])
        .expect("layout")
    }

    fn drain(r: &RoundPages) -> Vec<(usize, u64)> {
        let mut v = Vec::new();
        let mut out = Vec::new();
        while let Some(b) = r.next_batch(&mut v) {
            out.extend(v.iter().map(|o| (b, o / 4096)));
        }
        out
    }

    #[test]
    fn bitmaps_and_ranges_or_together_and_take_empties() {
        let m = mem();
        let mut log = DirtyLog::new(&m, 4096);
        assert!(log.is_empty());
        log.add_bitmap(0, &[0b1001, 1 << 35]).expect("kvm bitmap");
        log.add_bitmap(0, &[0b0011]).expect("second source");
        log.mark_range(1, 4096 * 63 + 10, 1).expect("range");
        log.mark_range(1, 4095, 2).expect("range over two pages");
        assert_eq!(log.pages(), 7);
        assert!(log.is_dirty(0, 99) && log.is_dirty(1, 63) && !log.is_dirty(1, 2));
        let r = log.take_round(2);
        assert_eq!(r.pages(), 7);
        assert_eq!(
            drain(&r),
            vec![(0, 0), (0, 1), (0, 3), (0, 99), (1, 0), (1, 1), (1, 63)]
        );
        assert!(log.is_empty(), "take_round leaves the log empty");
    }

    #[test]
    fn foreign_bitmaps_and_ranges_refused() {
        let m = mem();
        let mut log = DirtyLog::new(&m, 4096);
        // Block a has 100 pages: bit 100 (word 1, bit 36) is past its end.
        assert!(matches!(
            log.add_bitmap(0, &[0, 1 << 36]),
            Err(DirtyError::BitmapSize { block: 0, .. })
        ));
        assert!(matches!(
            log.add_bitmap(1, &[0, 1]),
            Err(DirtyError::BitmapSize { .. })
        ));
        assert!(log.is_empty(), "a refused bitmap adds nothing");
        assert!(matches!(
            log.add_bitmap(2, &[1]),
            Err(DirtyError::NoBlock {
                block: 2,
                blocks: 2
            })
        ));
        assert!(matches!(
            log.mark_range(1, 64 * 4096 - 1, 2),
            Err(DirtyError::Range { .. })
        ));
        assert!(log.mark_range(1, u64::MAX, 2).is_err());
        log.add_bitmap(1, &[u64::MAX]).expect("all 64 pages of b");
        assert_eq!(log.pages(), 64);
    }

    #[test]
    fn mark_all_covers_exactly_every_page_and_merge_ors() {
        let m = mem();
        let mut all = DirtyLog::new(&m, 4096);
        all.mark_all();
        assert_eq!(all.pages(), 164);
        let mut one = DirtyLog::new(&m, 4096);
        one.mark_range(0, 0, 1).expect("range");
        let mut two = DirtyLog::new(&m, 4096);
        two.mark_range(1, 4096, 1).expect("range");
        one.merge(&two);
        assert_eq!(one.pages(), 2);
        assert_eq!(all.take_round(128).pages(), 164);
    }
}
