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
//!
//! The map also counts what the session commits: a page's first data claims it
//! ([`FreshMap::claim`]) before the data lands, and the claims are bounded by the receiver's
//! `max_memory`. A 1 TiB guest holding 1 GiB of data commits 1 GiB here, whatever its size.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::memory::GuestRam;

/// More pages were claimed than the limit allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverLimit {
    /// Bytes committed with the page that went over.
    pub committed: u64,
    /// The limit in bytes.
    pub limit: u64,
}

/// Per block, one bit per page: set once data was written into the page.
#[derive(Debug)]
pub struct FreshMap {
    page_shift: u32,
    /// Per block: its page count and bitmap words.
    blocks: Vec<(u64, Vec<AtomicU64>)>,
    /// Bytes of pages claimed so far, and the most that may be.
    committed: AtomicU64,
    limit: u64,
}

impl FreshMap {
    /// Every page of `mem` fresh (call only for memory that is all zero: just allocated), at
    /// most `limit` bytes of it to be claimed. `page_size` must be a power of two.
    pub fn new(mem: &GuestRam, page_size: u32, limit: u64) -> FreshMap {
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
        FreshMap {
            page_shift,
            blocks,
            committed: AtomicU64::new(0),
            limit,
        }
    }

    /// Data is about to be written into the page at `offset` of `block`: mark it written.
    /// `Ok(true)` when this call took a fresh page (counted against the limit; the caller may
    /// fault it in ahead of the data), `Ok(false)` when the page was written before or is
    /// outside the map. Fails when the page would take the committed bytes over the limit
    /// (the page stays marked: the session fails).
    pub fn claim(&self, block: usize, offset: u64) -> Result<bool, OverLimit> {
        let Some((w, m)) = self.bit(block, offset) else {
            return Ok(false);
        };
        if w.load(Ordering::Relaxed) & m != 0 || w.fetch_or(m, Ordering::Relaxed) & m != 0 {
            return Ok(false);
        }
        let size = 1u64 << self.page_shift;
        let committed = self.committed.fetch_add(size, Ordering::Relaxed) + size;
        if committed > self.limit {
            return Err(OverLimit {
                committed,
                limit: self.limit,
            });
        }
        Ok(true)
    }

    /// Bytes of pages claimed so far.
    #[cfg(test)]
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
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
        let mem = GuestRam::new(vec![
            Block::anonymous("a", 130 * 4096).expect("map"),
            Block::anonymous("b", 4096).expect("map"),
        ])
        .expect("mem");
        let f = FreshMap::new(&mem, 4096, u64::MAX);
        assert!(f.is_fresh(0, 0) && f.is_fresh(0, 129 * 4096) && f.is_fresh(1, 0));
        assert_eq!(f.claim(0, 129 * 4096), Ok(true));
        assert_eq!(f.claim(1, 0), Ok(true));
        assert!(!f.is_fresh(0, 129 * 4096));
        assert!(!f.is_fresh(1, 0));
        assert!(f.is_fresh(0, 128 * 4096));
        // Outside the map: not known to be fresh, nothing claimed.
        assert!(!f.is_fresh(0, 130 * 4096));
        assert!(!f.is_fresh(2, 0));
        assert_eq!(f.claim(5, 0), Ok(false));
        assert_eq!(f.committed(), 2 * 4096);
    }

    #[test]
    fn claims_count_each_page_once_and_stop_at_the_limit() {
        let mem = GuestRam::new(vec![Block::anonymous("a", 64 * 4096).expect("map")]).expect("mem");
        let f = FreshMap::new(&mem, 4096, 3 * 4096);
        assert_eq!(f.claim(0, 0), Ok(true));
        // A page claimed again (a later round's copy) costs nothing more.
        assert_eq!(f.claim(0, 0), Ok(false));
        assert_eq!(f.claim(0, 4096), Ok(true));
        assert_eq!(f.claim(0, 8192), Ok(true));
        assert_eq!(f.committed(), 3 * 4096);
        assert_eq!(
            f.claim(0, 63 * 4096),
            Err(OverLimit {
                committed: 4 * 4096,
                limit: 3 * 4096
            })
        );
    }
}
