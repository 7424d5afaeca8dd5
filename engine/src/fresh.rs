//! Which pages of receiver-allocated memory may hold something.
//!
//! Memory the receiver maps itself ([`crate::ReceiveInto::Allocate`]) starts all zero, and a
//! page stays zero until a packet writes data into it. A zero page listed for a page that
//! no packet has written yet needs no work: checking it would fault it in (and reading every
//! page of a mostly idle 16 GiB guest costs seconds and page tables). A page is *fresh* while
//! this session has written no data into it; fresh pages are skipped, the others keep the
//! check-and-zero of [`crate::channel::apply::finish_packet`].
//!
//! The map is one bit per page, set (with an atomic OR) when a packet's data lands. Rounds
//! are ordered by the round barrier, so a later round sees every bit an earlier one set.
//! Memory the receiver did not allocate (a VMM's own) has no map: nothing is known of it.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::memory::GuestMemory;

/// Per block, one bit per page: set once data was written into the page.
#[derive(Debug)]
pub struct FreshMap {
    page_shift: u32,
    /// Per block: its page count and bitmap words.
    blocks: Vec<(u64, Vec<AtomicU64>)>,
}

impl FreshMap {
    /// Every page of `mem` fresh (call only for memory that is all zero: just allocated).
    /// `page_size` must be a power of two.
    pub fn new(mem: &GuestMemory, page_size: u32) -> FreshMap {
        let page_shift = page_size.max(1).trailing_zeros();
        let blocks = mem
            .blocks()
            .iter()
            .map(|b| {
                let pages = (b.len() as u64) >> page_shift;
                let words = (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
                (pages, words)
            })
            .collect();
        FreshMap { page_shift, blocks }
    }

    fn bit(&self, block: usize, offset: u64) -> Option<(&AtomicU64, u64)> {
        let page = offset >> self.page_shift;
        let (pages, words) = self.blocks.get(block)?;
        if page >= *pages {
            return None;
        }
        let word = words.get(usize::try_from(page / 64).ok()?)?;
        Some((word, 1u64 << (page % 64)))
    }

    /// Data is being written into the page at `offset` of `block`.
    pub fn mark_written(&self, block: usize, offset: u64) {
        if let Some((w, m)) = self.bit(block, offset) {
            w.fetch_or(m, Ordering::Relaxed);
        }
    }

    /// Whether the page at `offset` of `block` is still as allocated (all zero). Unknown
    /// pages (outside the map) are not fresh.
    pub fn is_fresh(&self, block: usize, offset: u64) -> bool {
        self.bit(block, offset)
            .is_some_and(|(w, m)| w.load(Ordering::Relaxed) & m == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Block;

    #[test]
    fn pages_stop_being_fresh_once_written() {
        let mem = GuestMemory::new(vec![
            Block::anonymous("a", 130 * 4096).expect("map"),
            Block::anonymous("b", 4096).expect("map"),
        ])
        .expect("mem");
        let f = FreshMap::new(&mem, 4096);
        assert!(f.is_fresh(0, 0) && f.is_fresh(0, 129 * 4096) && f.is_fresh(1, 0));
        f.mark_written(0, 129 * 4096);
        f.mark_written(1, 0);
        assert!(!f.is_fresh(0, 129 * 4096));
        assert!(!f.is_fresh(1, 0));
        assert!(f.is_fresh(0, 128 * 4096));
        // Outside the map: not known to be fresh.
        assert!(!f.is_fresh(0, 130 * 4096));
        assert!(!f.is_fresh(2, 0));
        f.mark_written(5, 0);
    }
}
