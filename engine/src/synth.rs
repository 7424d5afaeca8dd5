//! Synthetic guest memory that looks like a real guest's, for the demo, tests and benchmarks.
//!
//! Deterministic for a given seed (no dependency on a system RNG), so benchmarks of different
//! implementations run on the same pages.

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
pub fn fill(set: PageSet, buf: &mut [u8], page_size: usize, seed: u64) {
    todo!()
}
