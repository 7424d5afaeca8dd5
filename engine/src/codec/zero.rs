//! Zero-page detection: a word-wide OR over the page, as cheap as reading it.

/// True when every byte of `page` is zero.
pub fn is_zero_page(page: &[u8]) -> bool {
    todo!()
}
