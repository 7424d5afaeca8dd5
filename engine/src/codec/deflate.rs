//! Software raw DEFLATE per page.
//!
//! Library chosen by measurement (docs/benchmarks.md, "Codec choice"): libdeflate, through
//! `libdeflater` for compression (a safe wrapper is enough there) and through
//! `libdeflate-sys` for decompression, because only `libdeflate_deflate_decompress_ex`
//! reports how many input bytes the stream used, which the exact-length rule needs.

use std::fmt;
use std::ptr::NonNull;

use libdeflate_sys::{
    libdeflate_alloc_decompressor, libdeflate_decompressor, libdeflate_deflate_decompress_ex,
    libdeflate_free_decompressor, libdeflate_result_LIBDEFLATE_BAD_DATA as BAD_DATA,
    libdeflate_result_LIBDEFLATE_INSUFFICIENT_SPACE as INSUFFICIENT_SPACE,
    libdeflate_result_LIBDEFLATE_SUCCESS as SUCCESS,
};

use super::{CodecError, PageCompressor, PageDecompressor};

/// Compression level used when none is configured: libdeflate level 1, the fastest, whose
/// ratio on 4 KiB pages is within a few percent of the middle levels (docs/benchmarks.md).
pub const DEFAULT_LEVEL: i32 = 1;
/// Lowest accepted level.
pub const MIN_LEVEL: i32 = 1;
/// Highest accepted level (libdeflate's maximum).
pub const MAX_LEVEL: i32 = 12;

const _: () = assert!(MIN_LEVEL <= DEFAULT_LEVEL && DEFAULT_LEVEL <= MAX_LEVEL);

/// Software DEFLATE compressor at a fixed level.
pub struct DeflateCompressor {
    inner: libdeflater::Compressor,
    level: i32,
}

impl fmt::Debug for DeflateCompressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeflateCompressor")
            .field("library", &"libdeflate")
            .field("level", &self.level)
            .finish()
    }
}

impl DeflateCompressor {
    /// `level`: 1 (fastest) ..= 12 or the library's maximum; an unsupported level is an error.
    pub fn new(level: i32) -> Result<Self, CodecError> {
        if !(MIN_LEVEL..=MAX_LEVEL).contains(&level) {
            return Err(CodecError::Setting(format!(
                "DEFLATE level {level} is not supported (expected {MIN_LEVEL}..={MAX_LEVEL})"
            )));
        }
        let lvl = libdeflater::CompressionLvl::new(level).map_err(|e| {
            CodecError::Setting(format!(
                "DEFLATE level {level} rejected by libdeflate: {e:?}"
            ))
        })?;
        Ok(Self {
            inner: libdeflater::Compressor::new(lvl),
            level,
        })
    }

    /// The level this compressor was made with.
    pub fn level(&self) -> i32 {
        self.level
    }
}

impl Default for DeflateCompressor {
    /// A compressor at [`DEFAULT_LEVEL`].
    fn default() -> Self {
        let lvl = libdeflater::CompressionLvl::new(DEFAULT_LEVEL)
            .unwrap_or_else(|_| libdeflater::CompressionLvl::best());
        Self {
            inner: libdeflater::Compressor::new(lvl),
            level: DEFAULT_LEVEL,
        }
    }
}

impl PageCompressor for DeflateCompressor {
    fn compress(&mut self, page: &[u8], out: &mut [u8]) -> Option<usize> {
        if out.is_empty() {
            return None;
        }
        // libdeflate returns 0 ("insufficient space") when the stream does not fit in
        // `out.len()` bytes; it never writes past `out`.
        match self.inner.deflate_compress(page, out) {
            Ok(n) if n > 0 && n <= out.len() => Some(n),
            _ => None,
        }
    }
}

/// Software raw DEFLATE decompressor with the exact-size rules.
pub struct DeflateDecompressor {
    raw: NonNull<libdeflate_decompressor>,
}

// SAFETY: a libdeflate decompressor is a plain heap object with no thread affinity; it is
// used only through `&mut self`, so moving it to another thread is sound.
unsafe impl Send for DeflateDecompressor {}

impl fmt::Debug for DeflateDecompressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeflateDecompressor")
            .field("library", &"libdeflate")
            .finish()
    }
}

impl DeflateDecompressor {
    /// A decompressor (about 11 KiB of state). Panics only when memory is exhausted.
    pub fn new() -> Self {
        // SAFETY: plain allocation call without arguments; the result is checked for NULL.
        let raw = unsafe { libdeflate_alloc_decompressor() };
        match NonNull::new(raw) {
            Some(raw) => Self { raw },
            None => panic!("libdeflate_alloc_decompressor returned NULL: out of memory"),
        }
    }
}

impl Default for DeflateDecompressor {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for DeflateDecompressor {
    fn drop(&mut self) {
        // SAFETY: `raw` came from libdeflate_alloc_decompressor and is freed exactly once here.
        unsafe { libdeflate_free_decompressor(self.raw.as_ptr()) }
    }
}

impl PageDecompressor for DeflateDecompressor {
    fn decompress(&mut self, input: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
        let mut used_in: usize = 0;
        let mut produced: usize = 0;
        // SAFETY: `raw` is a live decompressor owned by `self` (exclusive through `&mut self`);
        // the input pointer/length pair and the output pointer/length pair come from valid
        // slices that outlive the call; libdeflate reads at most `input.len()` bytes, writes
        // at most `out.len()` bytes (it is hardened against arbitrary input), and writes the
        // two counters through pointers to live locals.
        let status = unsafe {
            libdeflate_deflate_decompress_ex(
                self.raw.as_ptr(),
                input.as_ptr().cast(),
                input.len(),
                out.as_mut_ptr().cast(),
                out.len(),
                &mut used_in,
                &mut produced,
            )
        };
        match status {
            SUCCESS => {
                if produced != out.len() {
                    Err(CodecError::WrongOutputSize {
                        got: produced,
                        expected: out.len(),
                    })
                } else if used_in != input.len() {
                    Err(CodecError::TrailingInput {
                        used: used_in,
                        zlen: input.len(),
                    })
                } else {
                    Ok(())
                }
            }
            INSUFFICIENT_SPACE => Err(oversized(input, out.len())),
            BAD_DATA => Err(CodecError::Corrupt(format!(
                "invalid raw DEFLATE stream ({} bytes)",
                input.len()
            ))),
            other => Err(CodecError::Corrupt(format!(
                "libdeflate returned status {other} on a {}-byte stream",
                input.len()
            ))),
        }
    }
}

/// Error for a stream that inflates past `expected` bytes. Only on this (hostile or broken
/// input) path, the real inflated size is counted for the message with a streaming inflater in
/// a fixed 32 KiB window, so a stream that claims megabytes costs no allocation beyond that.
/// DEFLATE expands at most ~1032:1, so the count is bounded by the input length.
fn oversized(input: &[u8], expected: usize) -> CodecError {
    use miniz_oxide::inflate::core::{decompress, DecompressorOxide};
    use miniz_oxide::inflate::TINFLStatus;

    const WINDOW: usize = 32 * 1024; // a power of two >= the DEFLATE window, as miniz requires
    let mut state = Box::<DecompressorOxide>::default();
    let mut window = vec![0u8; WINDOW];
    let mut in_pos = 0usize;
    let mut out_pos = 0usize;
    let mut total = 0usize;
    loop {
        let (status, read, written) = decompress(
            &mut state,
            input.get(in_pos..).unwrap_or(&[]),
            &mut window,
            out_pos,
            0, // raw DEFLATE, all input present, wrapping output buffer
        );
        in_pos += read;
        total += written;
        out_pos = (out_pos + written) & (WINDOW - 1);
        match status {
            TINFLStatus::HasMoreOutput if read > 0 || written > 0 => continue,
            TINFLStatus::Done => {
                return CodecError::WrongOutputSize {
                    got: total,
                    expected,
                }
            }
            _ => {
                return CodecError::Corrupt(format!(
                    "raw DEFLATE stream ({} bytes) inflates past the {expected}-byte page \
                     ({total} bytes) and is then invalid",
                    input.len()
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PAGE: usize = 4096;

    fn text_page() -> Vec<u8> {
        let words = [
            "the ",
            "memory ",
            "page ",
            "of ",
            "a ",
            "guest ",
            "is ",
            "sent ",
            "over ",
            "wire ",
            "and ",
            "compressed\n",
            "migration ",
            "round ",
            "dirty ",
            "fn main() {}\n",
        ];
        let mut page = Vec::with_capacity(PAGE + 32);
        let mut x = 12345u32;
        while page.len() < PAGE {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            page.extend_from_slice(words[(x >> 16) as usize % words.len()].as_bytes());
        }
        page.truncate(PAGE);
        page
    }

    fn random_page(seed: u64) -> Vec<u8> {
        let mut s = seed;
        let mut page = Vec::with_capacity(PAGE);
        while page.len() < PAGE {
            // splitmix64
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            page.extend_from_slice(&z.to_le_bytes());
        }
        page
    }

    fn compress(page: &[u8]) -> Vec<u8> {
        let mut c = DeflateCompressor::new(DEFAULT_LEVEL).expect("level 1");
        let mut out = vec![0u8; page.len() - 1];
        let n = c.compress(page, &mut out).expect("compressible page");
        out.truncate(n);
        out
    }

    /// Raw DEFLATE of `data` at any size (libdeflate with a big enough buffer).
    fn deflate_any(data: &[u8]) -> Vec<u8> {
        let lvl = libdeflater::CompressionLvl::new(1).expect("level 1");
        let mut c = libdeflater::Compressor::new(lvl);
        let mut out = vec![0u8; c.deflate_compress_bound(data.len())];
        let n = c.deflate_compress(data, &mut out).expect("bound is enough");
        out.truncate(n);
        out
    }

    #[test]
    fn levels() {
        assert!(DeflateCompressor::new(0).is_err());
        assert!(DeflateCompressor::new(13).is_err());
        assert!(DeflateCompressor::new(-1).is_err());
        for level in MIN_LEVEL..=MAX_LEVEL {
            let c = DeflateCompressor::new(level).expect("valid level");
            assert_eq!(c.level(), level);
        }
        assert_eq!(DeflateCompressor::default().level(), DEFAULT_LEVEL);
    }

    #[test]
    fn round_trip_text_and_zero_pages() {
        let mut d = DeflateDecompressor::new();
        for page in [text_page(), vec![0u8; PAGE]] {
            for level in [1, 6, 12] {
                let mut c = DeflateCompressor::new(level).expect("level");
                let mut z = vec![0u8; PAGE - 1];
                let n = c.compress(&page, &mut z).expect("fits");
                assert!(n < PAGE / 2, "level {level}: {n} bytes");
                let mut back = vec![0xAAu8; PAGE];
                d.decompress(&z[..n], &mut back).expect("valid");
                assert_eq!(back, page);
            }
        }
    }

    #[test]
    fn random_page_does_not_fit() {
        let mut c = DeflateCompressor::default();
        let mut z = vec![0u8; PAGE - 1];
        for seed in 0..16 {
            assert_eq!(c.compress(&random_page(seed), &mut z), None, "seed {seed}");
        }
        // The compressor stays usable after a failed attempt.
        let page = text_page();
        let n = c.compress(&page, &mut z).expect("fits");
        let mut back = vec![0u8; PAGE];
        DeflateDecompressor::new()
            .decompress(&z[..n], &mut back)
            .expect("valid");
        assert_eq!(back, page);
    }

    #[test]
    fn random_page_round_trips_with_a_big_enough_buffer() {
        let page = random_page(7);
        let mut c = DeflateCompressor::default();
        let mut z = vec![0u8; 2 * PAGE];
        let n = c.compress(&page, &mut z).expect("fits in 2 pages");
        assert!(n >= PAGE);
        let mut back = vec![0u8; PAGE];
        DeflateDecompressor::new()
            .decompress(&z[..n], &mut back)
            .expect("valid");
        assert_eq!(back, page);
    }

    #[test]
    fn tiny_output_limit() {
        let mut c = DeflateCompressor::default();
        assert_eq!(c.compress(&text_page(), &mut []), None);
        assert_eq!(c.compress(&text_page(), &mut [0u8; 3]), None);
    }

    #[test]
    fn rejects_empty_input() {
        let mut out = vec![0u8; PAGE];
        let err = DeflateDecompressor::new()
            .decompress(&[], &mut out)
            .expect_err("empty");
        assert!(matches!(err, CodecError::Corrupt(_)), "{err:?}");
    }

    #[test]
    fn rejects_corrupt_bytes() {
        let mut d = DeflateDecompressor::new();
        let mut out = vec![0u8; PAGE];
        // Reserved block type 3.
        assert!(matches!(
            d.decompress(&[0x07, 0, 0, 0], &mut out),
            Err(CodecError::Corrupt(_))
        ));
        // Stored block whose LEN/NLEN do not match.
        assert!(matches!(
            d.decompress(&[0x01, 0x10, 0x00, 0x00, 0x00], &mut out),
            Err(CodecError::Corrupt(_))
        ));
        // A truncated valid stream.
        let z = compress(&text_page());
        assert!(d.decompress(&z[..z.len() / 2], &mut out).is_err());
        // Every single-byte corruption of a valid stream is an error or a wrong page,
        // never a panic; most are errors.
        let page = text_page();
        let mut errors = 0;
        for i in 0..z.len() {
            let mut bad = z.clone();
            bad[i] ^= 0x5A;
            match d.decompress(&bad, &mut out) {
                Err(_) => errors += 1,
                Ok(()) => assert_eq!(out.len(), PAGE),
            }
        }
        assert!(errors > z.len() / 2, "{errors} of {}", z.len());
        // The decompressor is still fine afterwards.
        d.decompress(&z, &mut out).expect("valid");
        assert_eq!(out, page);
    }

    #[test]
    fn rejects_short_output() {
        let z = deflate_any(&text_page()[..PAGE - 100]);
        let mut out = vec![0u8; PAGE];
        assert_eq!(
            DeflateDecompressor::new().decompress(&z, &mut out),
            Err(CodecError::WrongOutputSize {
                got: PAGE - 100,
                expected: PAGE
            })
        );
    }

    #[test]
    fn rejects_long_output_and_reports_its_size() {
        let mut d = DeflateDecompressor::new();
        let mut out = vec![0u8; PAGE];
        let mut long = text_page();
        long.extend_from_slice(&text_page()[..1]);
        let z = deflate_any(&long);
        assert_eq!(
            d.decompress(&z, &mut out),
            Err(CodecError::WrongOutputSize {
                got: PAGE + 1,
                expected: PAGE
            })
        );
        // A tiny stream that inflates to a megabyte of zeros.
        let z = deflate_any(&vec![0u8; 1 << 20]);
        assert!(z.len() < 2048);
        assert_eq!(
            d.decompress(&z, &mut out),
            Err(CodecError::WrongOutputSize {
                got: 1 << 20,
                expected: PAGE
            })
        );
    }

    #[test]
    fn rejects_long_output_followed_by_garbage() {
        // Inflates past a page, then turns invalid: still an error, not a panic.
        let mut long = text_page();
        long.extend_from_slice(&text_page());
        let mut z = deflate_any(&long);
        let n = z.len();
        z.truncate(n - 4);
        let mut out = vec![0u8; PAGE];
        assert!(DeflateDecompressor::new().decompress(&z, &mut out).is_err());
    }

    #[test]
    fn rejects_trailing_garbage() {
        let page = text_page();
        let mut z = compress(&page);
        let n = z.len();
        z.extend_from_slice(b"trailing");
        let mut out = vec![0u8; PAGE];
        assert_eq!(
            DeflateDecompressor::new().decompress(&z, &mut out),
            Err(CodecError::TrailingInput {
                used: n,
                zlen: n + 8
            })
        );
        // A single trailing zero byte is trailing input too.
        let mut z = compress(&page);
        z.push(0);
        assert!(matches!(
            DeflateDecompressor::new().decompress(&z, &mut out),
            Err(CodecError::TrailingInput { .. })
        ));
    }

    #[test]
    fn decompressor_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<DeflateDecompressor>();
        assert_send::<DeflateCompressor>();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_input_never_panics(input in proptest::collection::vec(any::<u8>(), 0..5000),
                                        out_len in prop_oneof![Just(PAGE), 0usize..9000]) {
            // Guard bytes around the output detect any write outside it.
            let mut buf = vec![0xC3u8; out_len + 64];
            let mut d = DeflateDecompressor::new();
            let res = d.decompress(&input, &mut buf[32..32 + out_len]);
            prop_assert!(buf[..32].iter().all(|&b| b == 0xC3));
            prop_assert!(buf[32 + out_len..].iter().all(|&b| b == 0xC3));
            if res.is_ok() {
                // Exactly filled and exactly consumed: re-inflating with a larger buffer gives
                // the same size.
                let mut bigger = vec![0u8; out_len + 1];
                let again = d.decompress(&input, &mut bigger);
                prop_assert_eq!(
                    again,
                    Err(CodecError::WrongOutputSize { got: out_len, expected: out_len + 1 })
                );
            }
        }

        #[test]
        fn mutated_streams_never_panic(seed in any::<u64>(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
            let mut page = text_page();
            let r = random_page(seed);
            page[..64].copy_from_slice(&r[..64]);
            let mut z = compress(&page);
            for (i, x) in flips {
                let n = z.len();
                z[i % n] ^= x;
            }
            let mut out = vec![0u8; PAGE];
            let _ = DeflateDecompressor::new().decompress(&z, &mut out);
        }

        #[test]
        fn round_trip_any_page(data in proptest::collection::vec(any::<u8>(), PAGE..=PAGE)) {
            let mut c = DeflateCompressor::default();
            let mut z = vec![0u8; PAGE - 1];
            if let Some(n) = c.compress(&data, &mut z) {
                let mut out = vec![0u8; PAGE];
                DeflateDecompressor::new().decompress(&z[..n], &mut out).expect("own output");
                prop_assert_eq!(out, data);
            }
        }
    }
}
