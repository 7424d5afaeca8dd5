//! Post-copy page request: `PageRequest::decode` on arbitrary 16 bytes against a layout taken
//! from the input.
//!
//! Properties, for any input: no panic; a request is accepted exactly when its magic is
//! "PWPR", its block index is in range, its offset is page-aligned and the page lies inside
//! the block; an accepted request re-encodes to the same bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pagewire::internals::{PageRequest, REQUEST_LEN};

fuzz_target!(|data: &[u8]| {
    let Some((req, rest)) = data.split_first_chunk::<REQUEST_LEN>() else {
        return;
    };
    // Page size 512..=65536 and up to 8 block sizes from the rest of the input.
    let page_size = 512u32 << (rest.first().copied().unwrap_or(0) % 8);
    let sizes: Vec<u64> = rest
        .get(1..)
        .unwrap_or_default()
        .chunks_exact(8)
        .take(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    match PageRequest::decode(req, &sizes, page_size) {
        Ok((block, offset)) => {
            assert_eq!(&req[..4], b"PWPR");
            let size = sizes[block];
            assert_eq!(offset % u64::from(page_size), 0);
            assert!(offset.checked_add(u64::from(page_size)).is_some_and(|e| e <= size));
            let enc = PageRequest {
                block: block as u32,
                offset,
            }
            .encode();
            assert_eq!(&enc, req, "re-encoded request differs");
        }
        Err(e) => assert!(!e.is_empty()),
    }
});
