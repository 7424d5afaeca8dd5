//! Software raw DEFLATE per page.
//!
//! Library chosen by measurement (docs/benchmarks.md, "Codec choice").

use super::{CodecError, PageCompressor, PageDecompressor};

/// Software DEFLATE compressor at a fixed level.
#[derive(Debug)]
pub struct DeflateCompressor {
    _level: i32,
}

impl DeflateCompressor {
    /// `level`: 1 (fastest) ..= 12 or the library's maximum; an unsupported level is an error.
    pub fn new(level: i32) -> Result<Self, CodecError> {
        todo!()
    }
}

impl PageCompressor for DeflateCompressor {
    fn compress(&mut self, page: &[u8], out: &mut [u8]) -> Option<usize> {
        todo!()
    }
}

/// Software raw DEFLATE decompressor with the exact-size rules.
#[derive(Debug)]
pub struct DeflateDecompressor {}

impl DeflateDecompressor {
    pub fn new() -> Self {
        todo!()
    }
}

impl Default for DeflateDecompressor {
    fn default() -> Self {
        Self::new()
    }
}

impl PageDecompressor for DeflateDecompressor {
    fn decompress(&mut self, input: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
        todo!()
    }
}
