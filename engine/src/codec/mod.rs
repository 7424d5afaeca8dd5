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
    /// Needs the `qpl` feature (without it a sender asking for it fails with
    /// [`QplSetupError::NotBuilt`](crate::accel::qpl::QplSetupError::NotBuilt)).
    Qpl,
    /// Follows the link: each page compressed (see [`resolve_auto`] for the compressor) or sent
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

/// Which compressor `auto` uses for the pages it compresses ([`crate::SenderConfig::auto_compressor`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AutoCompressor {
    /// Chosen for the host by [`resolve_auto`]: qpl (with deflate as a ladder's stronger
    /// rung) where libqpl loads, else deflate.
    #[default]
    Pick,
    /// The deflate codec's compressor (libdeflate).
    Deflate,
    /// QPL: IAA hardware where a work queue is usable, QPL's software path otherwise.
    Qpl,
    /// A ladder: qpl (as [`AutoCompressor::Qpl`]; or the engine an embedder passes to
    /// [`crate::Sender::connect_with_engines`]) and the deflate codec's compressor for the
    /// pages a slow link waits for anyway.
    Ladder,
}

impl AutoCompressor {
    /// Name as the CLI spells it.
    pub fn name(self) -> &'static str {
        match self {
            AutoCompressor::Pick => "pick",
            AutoCompressor::Deflate => "deflate",
            AutoCompressor::Qpl => "qpl",
            AutoCompressor::Ladder => "ladder",
        }
    }
}

impl std::str::FromStr for AutoCompressor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pick" => Ok(AutoCompressor::Pick),
            "deflate" => Ok(AutoCompressor::Deflate),
            "qpl" => Ok(AutoCompressor::Qpl),
            "ladder" => Ok(AutoCompressor::Ladder),
            other => Err(format!(
                "unknown compressor '{other}' for codec auto (expected pick, deflate, qpl or ladder)"
            )),
        }
    }
}

/// The compressor behind `auto` on this host, given the embedder's preference, and why.
/// [`AutoCompressor::Pick`] takes `qpl` wherever libqpl.so.1 loads (IAA hardware if a work
/// queue is usable, else QPL's software path), with the deflate codec's compressor as the
/// stronger rung of a ladder for slow links ([`auto_ladder`]); `deflate` where it does not.
/// (Without the `qpl` feature: always `deflate`, saying so.)
pub fn resolve_auto(pref: AutoCompressor) -> (CodecKind, String) {
    let qpl = crate::accel::qpl::library_version();
    let path = || {
        if crate::accel::qpl::hardware_available() {
            "IAA hardware path"
        } else {
            "software path (no IAA work queue is available)"
        }
    };
    match (pref, qpl) {
        (AutoCompressor::Deflate, _) => (CodecKind::Deflate, "using deflate: asked for".into()),
        (AutoCompressor::Qpl | AutoCompressor::Ladder, Ok(version)) => (
            CodecKind::Qpl,
            format!("using qpl (asked for): QPL {version}, {}", path()),
        ),
        (AutoCompressor::Qpl | AutoCompressor::Ladder, Err(e)) => (
            CodecKind::Deflate,
            format!("using deflate: qpl was asked for but {e}"),
        ),
        (AutoCompressor::Pick, Err(e)) => (CodecKind::Deflate, format!("using deflate: {e}")),
        (AutoCompressor::Pick, Ok(version)) => (
            CodecKind::Qpl,
            format!(
                "using qpl: QPL {version}, {}; deflate takes the pages while the link's backlog is long",
                path()
            ),
        ),
    }
}

/// Whether `auto` runs a ladder of two compressors: qpl, and the deflate codec's compressor
/// for the pages a slow link waits for anyway (it sends fewer bytes at more CPU): asked for,
/// or picked where qpl is. (A channel whose compressor is deflate anyway runs it alone.)
pub fn auto_ladder(pref: AutoCompressor) -> bool {
    match pref {
        AutoCompressor::Ladder => true,
        AutoCompressor::Pick => resolve_auto(pref).0 == CodecKind::Qpl,
        AutoCompressor::Deflate | AutoCompressor::Qpl => false,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_compressor_names_round_trip() {
        for c in [
            AutoCompressor::Pick,
            AutoCompressor::Deflate,
            AutoCompressor::Qpl,
            AutoCompressor::Ladder,
        ] {
            assert_eq!(c.name().parse::<AutoCompressor>(), Ok(c));
        }
        let e = "zstd".parse::<AutoCompressor>();
        assert!(
            e.as_ref()
                .is_err_and(|e| e.contains("pick, deflate, qpl or ladder")),
            "{e:?}"
        );
    }

    /// The pick is qpl, with deflate as a ladder's stronger rung, exactly where libqpl loads;
    /// a compressor asked for runs alone.
    #[test]
    fn the_pick_is_a_ladder_where_qpl_loads() {
        let loads = crate::accel::qpl::library_version().is_ok();
        assert_eq!(auto_ladder(AutoCompressor::Pick), loads);
        assert!(!auto_ladder(AutoCompressor::Deflate));
        assert!(!auto_ladder(AutoCompressor::Qpl));
        assert!(auto_ladder(AutoCompressor::Ladder));
        let (c, why) = resolve_auto(AutoCompressor::Pick);
        let want = if loads {
            CodecKind::Qpl
        } else {
            CodecKind::Deflate
        };
        assert_eq!(c, want, "{why}");
    }

    /// Deflate asked for is deflate on any host; qpl asked for is qpl where libqpl loads
    /// (IAA or QPL's software path) and deflate, with the reason, where it does not.
    #[test]
    fn auto_compressor_preference_is_honoured() {
        let (c, why) = resolve_auto(AutoCompressor::Deflate);
        assert_eq!(c, CodecKind::Deflate, "{why}");
        let (c, why) = resolve_auto(AutoCompressor::Qpl);
        match crate::accel::qpl::library_version() {
            Ok(_) => assert_eq!(c, CodecKind::Qpl, "{why}"),
            Err(_) => {
                assert_eq!(c, CodecKind::Deflate, "{why}");
                assert!(why.contains("qpl was asked for"), "{why}");
            }
        }
    }
}
