//! Page codecs: every page is compressed on its own (raw DEFLATE, RFC 1951), as QEMU's
//! multifd-qpl does, so any page decodes independently of the others.
//!
//! Rules for every DEFLATE codec (DESIGN.md §4): the compressed output must fit in
//! `page_size - 1` bytes, otherwise the page is sent raw; decompression must produce exactly
//! one page and consume exactly the compressed length.

use thiserror::Error;

pub mod deflate;
pub mod entropy;
pub mod zero;

pub use deflate::{DeflateCompressor, DeflateDecompressor};
pub use zero::is_zero_page;

/// Which codec a session uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CodecKind {
    /// Raw pages, multifd compression flag 0x00.
    None,
    /// Software raw DEFLATE per page, multifd qpl framing (flag 0x08).
    Deflate,
    /// Intel QPL: IAA hardware where present, QPL's software path otherwise (flag 0x08).
    Qpl,
    /// Follows the link: each page compressed (qpl on IAA hardware, else deflate) or sent
    /// raw, decided per page by the channel loop (`channel::pace`); qpl framing (flag 0x08).
    Auto,
}

impl CodecKind {
    /// Name as the CLI spells it.
    pub fn name(self) -> &'static str {
        match self {
            CodecKind::None => "none",
            CodecKind::Deflate => "deflate",
            CodecKind::Qpl => "qpl",
            CodecKind::Auto => "auto",
        }
    }
}

impl std::str::FromStr for CodecKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(CodecKind::None),
            "deflate" => Ok(CodecKind::Deflate),
            "qpl" => Ok(CodecKind::Qpl),
            "auto" => Ok(CodecKind::Auto),
            other => Err(format!(
                "unknown codec '{other}' (expected none, deflate, qpl or auto)"
            )),
        }
    }
}

/// The compressor behind `auto` on this host: `qpl` where an IAA work queue is usable through
/// libqpl.so.1, else `deflate`. Returns the codec and why it was chosen.
pub fn resolve_auto() -> (CodecKind, String) {
    match qpl_sys::Qpl::load() {
        Err(e) => (CodecKind::Deflate, format!("using deflate: {e}")),
        Ok(q) if crate::accel::qpl::hardware_available() => (
            CodecKind::Qpl,
            format!(
                "using qpl: IAA hardware path available (QPL {})",
                q.version()
            ),
        ),
        Ok(q) => (
            CodecKind::Deflate,
            format!(
                "using deflate: QPL {} is installed but no IAA work queue is available \
                 (see docs/benchmarks.md for the software paths compared)",
                q.version()
            ),
        ),
    }
}

/// Errors of the codec layer.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CodecError {
    /// Compressed data that is not valid raw DEFLATE.
    #[error("corrupt DEFLATE data: {0}")]
    Corrupt(String),
    /// Valid DEFLATE that inflates to other than exactly one page.
    #[error("DEFLATE data inflates to {got} bytes, expected exactly {expected}")]
    WrongOutputSize { got: usize, expected: usize },
    /// A DEFLATE stream that ends before all `zlen` input bytes were used.
    #[error("DEFLATE stream ends after {used} of {zlen} bytes")]
    TrailingInput { used: usize, zlen: usize },
    /// A setting the codec cannot honour.
    #[error("codec setting: {0}")]
    Setting(String),
}

/// Compresses single pages. One per engine thread (not shared).
pub trait PageCompressor: Send {
    /// Compress `page` into `out`. `out.len()` is the limit (the engine passes
    /// `page_size - 1`). Returns `Some(n)` with the compressed length when it fits,
    /// `None` when it does not (the page is then sent raw).
    fn compress(&mut self, page: &[u8], out: &mut [u8]) -> Option<usize>;
}

/// Decompresses single pages. One per engine thread.
pub trait PageDecompressor: Send {
    /// Inflate `input` (exactly one raw DEFLATE stream, all of it used) into `out`, which it
    /// must fill exactly. Never panics and never writes outside `out`, whatever `input` is.
    fn decompress(&mut self, input: &[u8], out: &mut [u8]) -> Result<(), CodecError>;
}
