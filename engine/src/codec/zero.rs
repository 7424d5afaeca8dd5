//! Zero-page detection: a word-wide OR over the page, as cheap as reading it.

/// Bytes OR-ed together between two early-exit checks: four cache lines. Short enough that a
/// non-zero page (the common case for pages that are not zero) stops after one block, long
/// enough that the compiler turns the inner loop into wide vector ORs.
const BLOCK: usize = 256;

/// Word width of the inner OR.
const WORD: usize = 16;

/// True when every byte of `page` is zero. Works for any length (an empty slice is zero).
#[inline]
pub fn is_zero_page(page: &[u8]) -> bool {
    let mut blocks = page.chunks_exact(BLOCK);
    for block in &mut blocks {
        if or_words(block) != 0 {
            return false;
        }
    }
    let tail = blocks.remainder();
    let mut words = tail.chunks_exact(WORD);
    let mut acc = 0u128;
    for w in &mut words {
        acc |= load(w);
    }
    acc == 0 && words.remainder().iter().all(|&b| b == 0)
}

/// OR of every 16-byte word of `block` (whose length is a multiple of `WORD`).
#[inline(always)]
fn or_words(block: &[u8]) -> u128 {
    block.chunks_exact(WORD).fold(0u128, |acc, w| acc | load(w))
}

/// Native-endian load of a `WORD`-byte chunk (the length is guaranteed by `chunks_exact`, so
/// the fallback branch is never taken and is optimised out).
#[inline(always)]
fn load(w: &[u8]) -> u128 {
    match <[u8; WORD]>::try_from(w) {
        Ok(a) => u128::from_ne_bytes(a),
        Err(_) => u128::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_all_zero() {
        assert!(is_zero_page(&[]));
        for len in [
            1usize, 7, 8, 15, 16, 17, 255, 256, 257, 4095, 4096, 4097, 65536,
        ] {
            assert!(is_zero_page(&vec![0u8; len]), "len {len}");
        }
    }

    #[test]
    fn single_non_zero_byte_anywhere() {
        // Aligned and unaligned lengths, and unaligned starts (sub-slices of a bigger buffer).
        let lens = [
            1usize, 2, 7, 8, 9, 15, 16, 17, 31, 33, 255, 256, 257, 511, 1000, 4095, 4096, 4097,
            8192,
        ];
        let mut backing = vec![0u8; 8192 + 64];
        for &len in &lens {
            for start in [0usize, 1, 3, 8, 13] {
                let mut positions = vec![0, len - 1, len / 2];
                if len > 300 {
                    // Position classes around block and word boundaries.
                    positions.extend([15, 16, 17, 255, 256, 257, len - 17, len - 16, len - 15]);
                }
                for pos in positions {
                    for value in [1u8, 0x80, 0xff] {
                        backing[start + pos] = value;
                        let page = &backing[start..start + len];
                        assert!(!is_zero_page(page), "len {len} start {start} pos {pos}");
                        backing[start + pos] = 0;
                        assert!(is_zero_page(&backing[start..start + len]));
                    }
                }
            }
        }
    }

    #[test]
    fn every_position_of_a_page() {
        let mut page = vec![0u8; 4096];
        for pos in 0..page.len() {
            page[pos] = 0x10;
            assert!(!is_zero_page(&page), "pos {pos}");
            page[pos] = 0;
        }
        assert!(is_zero_page(&page));
    }
}
