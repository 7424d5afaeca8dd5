//! Intel QPL as an [`Accelerator`] (sender) and a [`PageDecompressor`] (receiver).
//!
//! Hardware is detected the way QEMU's multifd-qpl does it: by initialising a hardware job;
//! failure (QPL status 500..=503 where there is no IAA) means the software path. With
//! hardware, one job per page slot is submitted without waiting and completions are polled
//! with `qpl_check_job` from the channel's loop, between io_uring completions (QEMU instead
//! blocks in `qpl_wait_job`). A busy work queue answers `Submit::Busy`; the sender retries
//! three times and then compresses the page with [`Accelerator::fallback`] on QPL's software
//! path. An output that does not fit (status 2) or any failure sends the page raw.
//!
//! QPL needs the crate's `qpl` feature (qpl-sys). Without it the settings ([`QplSettings`])
//! remain, so [`SenderConfig`](crate::SenderConfig) is the same in every build, but [`compressor`] and
//! [`decompressor`] answer [`QplSetupError::NotBuilt`] and `auto` picks deflate. The qpl
//! *framing* (raw DEFLATE per page, multifd flag 0x08) needs no QPL: the deflate codec writes
//! it and the built-in decoder reads it, from QEMU's multifd-qpl too.

#[cfg(feature = "qpl")]
use std::time::{Duration, Instant};

#[cfg(feature = "qpl")]
use qpl_sys::{flag, level, op, path, status, Job, Operation, Qpl, QplError};
use serde::Serialize;

use super::Accelerator;
#[cfg(feature = "qpl")]
use super::{Completion, JobDesc, Outcome, Path, Submit};
#[cfg(feature = "qpl")]
use crate::codec::CodecError;
use crate::codec::PageDecompressor;

/// QPL's default compression level (`qpl_default_level`), also without qpl-sys.
const LEVEL_DEFAULT: u32 = 1;
#[cfg(feature = "qpl")]
const _: () = assert!(LEVEL_DEFAULT == level::DEFAULT);

/// Huffman coding of QPL compression jobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Huffman {
    /// Fixed Huffman codes (QEMU's multifd-qpl setting): fastest, ~25-30 % more bytes.
    Fixed,
    /// Dynamic Huffman codes (QPL_FLAG_DYNAMIC_HUFFMAN).
    Dynamic,
}

impl std::str::FromStr for Huffman {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fixed" => Ok(Huffman::Fixed),
            "dynamic" => Ok(Huffman::Dynamic),
            o => Err(format!(
                "unknown Huffman mode '{o}' (expected fixed or dynamic)"
            )),
        }
    }
}

/// Which QPL path a compressor may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QplPath {
    /// Hardware if an IAA work queue is available, else software.
    Auto,
    /// Hardware only (an error where there is none).
    Hardware,
    /// QPL's software path only.
    Software,
}

/// Settings of QPL compression.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct QplSettings {
    pub huffman: Huffman,
    /// 1 (default) or 3 (high, software path only).
    pub level: u32,
    pub path: QplPath,
    /// Hardware jobs per channel (one per page slot of a packet).
    pub hw_jobs: usize,
}

impl Default for QplSettings {
    fn default() -> Self {
        QplSettings {
            huffman: Huffman::Fixed,
            level: LEVEL_DEFAULT,
            path: QplPath::Auto,
            hw_jobs: 128,
        }
    }
}

#[cfg(feature = "qpl")]
impl QplSettings {
    fn operation(&self) -> Operation {
        let mut flags = flag::FIRST | flag::LAST | flag::OMIT_VERIFY;
        if self.huffman == Huffman::Dynamic {
            flags |= flag::DYNAMIC_HUFFMAN;
        }
        Operation {
            op: op::COMPRESS,
            flags,
            level: self.level,
        }
    }
}

/// Try to initialise a hardware job: `Ok(Some)` with IAA, `Ok(None)` (and the reason) without.
#[cfg(feature = "qpl")]
fn hardware_job(qpl: &'static Qpl) -> Result<Option<Job>, QplError> {
    match Job::new(qpl, path::HARDWARE) {
        Ok(j) => Ok(Some(j)),
        Err(QplError::Status { status: s, .. })
            if (status::INIT_HW_NOT_SUPPORTED..=status::INIT_WORK_QUEUES_NOT_AVAILABLE)
                .contains(&s) =>
        {
            tracing::info!(
                status = s,
                reason = qpl_sys::status_name(s),
                "no IAA hardware path; using QPL's software path"
            );
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Whether QPL's hardware path (an IAA work queue) is usable on this host (probed once).
#[cfg(feature = "qpl")]
pub fn hardware_available() -> bool {
    static HW: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HW.get_or_init(|| {
        Qpl::load()
            .ok()
            .and_then(|q| hardware_job(q).ok().flatten())
            .is_some()
    })
}

/// Whether QPL's hardware path is usable: never in a build without the `qpl` feature.
#[cfg(not(feature = "qpl"))]
pub fn hardware_available() -> bool {
    false
}

/// QPL's version where libqpl.so.1 loads, else why it cannot be used (without the `qpl`
/// feature: that).
pub fn library_version() -> Result<String, String> {
    #[cfg(feature = "qpl")]
    {
        Qpl::load().map(|q| q.version()).map_err(|e| e.to_string())
    }
    #[cfg(not(feature = "qpl"))]
    {
        Err(NOT_BUILT.into())
    }
}

/// What errors say when this build has no QPL.
pub const NOT_BUILT: &str = "pagewire was built without the `qpl` feature";

/// A QPL compression engine for one channel (`QplCompressor::new`), boxed.
pub fn compressor(s: QplSettings) -> Result<Box<dyn Accelerator>, QplSetupError> {
    #[cfg(feature = "qpl")]
    {
        Ok(Box::new(QplCompressor::new(s)?))
    }
    #[cfg(not(feature = "qpl"))]
    {
        let _ = s;
        Err(QplSetupError::NotBuilt)
    }
}

/// A QPL page decompressor (`QplDecompressor::new`), boxed.
pub fn decompressor(software_only: bool) -> Result<Box<dyn PageDecompressor>, QplSetupError> {
    #[cfg(feature = "qpl")]
    {
        Ok(Box::new(QplDecompressor::new(software_only)?))
    }
    #[cfg(not(feature = "qpl"))]
    {
        let _ = software_only;
        Err(QplSetupError::NotBuilt)
    }
}

#[cfg(feature = "qpl")]
struct HwSlot {
    job: Job,
    /// (tag, output capacity) of the job in flight.
    tag: Option<(u64, usize)>,
}

/// QPL compression for one channel.
#[cfg(feature = "qpl")]
pub struct QplCompressor {
    hw: Vec<HwSlot>,
    free: Vec<usize>,
    in_flight: usize,
    sw: Job,
    operation: Operation,
    done: Vec<Completion>,
}

#[cfg(feature = "qpl")]
impl std::fmt::Debug for QplCompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QplCompressor")
            .field("hw_jobs", &self.hw.len())
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

/// Errors setting QPL up.
#[derive(Debug, thiserror::Error)]
pub enum QplSetupError {
    #[cfg(feature = "qpl")]
    #[error(transparent)]
    Qpl(#[from] QplError),
    /// This build has no QPL.
    #[error("{NOT_BUILT} (codec deflate writes the same qpl framing, and the built-in decoder reads it)")]
    NotBuilt,
    #[error("QPL hardware path requested but no IAA work queue is available")]
    NoHardware,
    #[error("QPL level {0} is not supported (1 = default, 3 = high; high runs on the software path only)")]
    Level(u32),
}

#[cfg(feature = "qpl")]
impl QplCompressor {
    /// Load QPL and set up the jobs `s` asks for.
    pub fn new(s: QplSettings) -> Result<QplCompressor, QplSetupError> {
        if s.level != level::DEFAULT && s.level != level::HIGH {
            return Err(QplSetupError::Level(s.level));
        }
        let qpl = Qpl::load()?;
        let mut hw = Vec::new();
        let want_hw = s.path != QplPath::Software && s.level == level::DEFAULT;
        if want_hw {
            if let Some(first) = hardware_job(qpl)? {
                hw.push(HwSlot {
                    job: first,
                    tag: None,
                });
                for _ in 1..s.hw_jobs.max(1) {
                    hw.push(HwSlot {
                        job: Job::new(qpl, path::HARDWARE)?,
                        tag: None,
                    });
                }
            }
        }
        if s.path == QplPath::Hardware && hw.is_empty() {
            return Err(QplSetupError::NoHardware);
        }
        let free = (0..hw.len()).rev().collect();
        Ok(QplCompressor {
            hw,
            free,
            in_flight: 0,
            sw: Job::new(qpl, path::SOFTWARE)?,
            operation: s.operation(),
            done: Vec::new(),
        })
    }

    /// True when jobs run on IAA.
    pub fn has_hardware(&self) -> bool {
        !self.hw.is_empty()
    }
}

#[cfg(feature = "qpl")]
fn outcome(st: u32, total_out: u32, cap: usize) -> Outcome {
    match st {
        status::OK if total_out > 0 && (total_out as usize) <= cap => {
            Outcome::Compressed(total_out as usize)
        }
        status::OK => Outcome::Failed(st),
        status::MORE_OUTPUT_NEEDED => Outcome::DidNotFit,
        other => Outcome::Failed(other),
    }
}

#[cfg(feature = "qpl")]
impl Accelerator for QplCompressor {
    fn name(&self) -> &'static str {
        if self.hw.is_empty() {
            "qpl-software"
        } else {
            "qpl-hardware"
        }
    }

    fn capacity(&self) -> usize {
        if self.hw.is_empty() {
            usize::MAX
        } else {
            self.hw.len()
        }
    }

    fn in_flight(&self) -> usize {
        self.in_flight + self.done.len()
    }

    unsafe fn submit(&mut self, j: JobDesc) -> Submit {
        if self.hw.is_empty() {
            // SAFETY: the caller's contract covers the buffers; the software job completes
            // within this call.
            let (page, out) = unsafe {
                (
                    std::slice::from_raw_parts(j.input, j.in_len),
                    std::slice::from_raw_parts_mut(j.output, j.out_cap),
                )
            };
            let o = self.fallback(page, out);
            self.done.push(Completion {
                tag: j.tag,
                outcome: o,
                path: Path::Software,
            });
            return Submit::Accepted;
        }
        let Some(i) = self.free.pop() else {
            return Submit::Busy;
        };
        let op = self.operation;
        let Some(slot) = self.hw.get_mut(i) else {
            return Submit::Busy;
        };
        // SAFETY: the caller keeps both buffers valid until poll() returns this job.
        unsafe {
            slot.job
                .prepare(op, j.input, j.in_len as u32, j.output, j.out_cap as u32)
        };
        match slot.job.submit() {
            status::OK | status::BEING_PROCESSED => {
                slot.tag = Some((j.tag, j.out_cap));
                self.in_flight += 1;
                Submit::Accepted
            }
            status::QUEUES_ARE_BUSY_ERR => {
                self.free.push(i);
                Submit::Busy
            }
            st => {
                self.free.push(i);
                self.done.push(Completion {
                    tag: j.tag,
                    outcome: Outcome::Failed(st),
                    path: Path::Hardware,
                });
                Submit::Accepted
            }
        }
    }

    fn poll(&mut self, done: &mut Vec<Completion>) {
        done.append(&mut self.done);
        if self.in_flight == 0 {
            return;
        }
        for (i, slot) in self.hw.iter_mut().enumerate() {
            let Some((tag, cap)) = slot.tag else { continue };
            let st = slot.job.check();
            if st == status::BEING_PROCESSED {
                continue;
            }
            done.push(Completion {
                tag,
                outcome: outcome(st, slot.job.total_out(), cap),
                path: Path::Hardware,
            });
            slot.tag = None;
            self.in_flight -= 1;
            self.free.push(i);
        }
    }

    fn fallback(&mut self, page: &[u8], out: &mut [u8]) -> Outcome {
        let Ok(in_len) = u32::try_from(page.len()) else {
            return Outcome::Failed(u32::MAX);
        };
        let Ok(cap) = u32::try_from(out.len()) else {
            return Outcome::Failed(u32::MAX);
        };
        let mut op = self.operation;
        // The software path supports every level; the hardware settings apply unchanged.
        op.level = op.level.max(level::DEFAULT);
        // SAFETY: both slices outlive the synchronous software job.
        unsafe {
            self.sw
                .prepare(op, page.as_ptr(), in_len, out.as_mut_ptr(), cap)
        };
        let st = self.sw.submit();
        outcome(st, self.sw.total_out(), out.len())
    }
}

/// QPL decompression: the hardware path when IAA is present, else QPL's software path.
#[cfg(feature = "qpl")]
pub struct QplDecompressor {
    job: Job,
    hardware: bool,
}

#[cfg(feature = "qpl")]
impl std::fmt::Debug for QplDecompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QplDecompressor")
            .field("hardware", &self.hardware)
            .finish()
    }
}

#[cfg(feature = "qpl")]
impl QplDecompressor {
    /// Load QPL; use hardware unless `software_only`.
    pub fn new(software_only: bool) -> Result<QplDecompressor, QplError> {
        let qpl = Qpl::load()?;
        if !software_only {
            if let Some(job) = hardware_job(qpl)? {
                return Ok(QplDecompressor {
                    job,
                    hardware: true,
                });
            }
        }
        Ok(QplDecompressor {
            job: Job::new(qpl, path::SOFTWARE)?,
            hardware: false,
        })
    }

    /// True when jobs run on IAA.
    pub fn has_hardware(&self) -> bool {
        self.hardware
    }
}

#[cfg(feature = "qpl")]
impl PageDecompressor for QplDecompressor {
    fn decompress(&mut self, input: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
        let (Ok(in_len), Ok(cap)) = (u32::try_from(input.len()), u32::try_from(out.len())) else {
            return Err(CodecError::Setting("page too large for QPL".into()));
        };
        let op = Operation {
            op: op::DECOMPRESS,
            flags: flag::FIRST | flag::LAST,
            level: level::DEFAULT,
        };
        // SAFETY: both slices outlive the job: the software path completes in submit, and
        // the hardware path is polled to completion below before returning.
        unsafe {
            self.job
                .prepare(op, input.as_ptr(), in_len, out.as_mut_ptr(), cap)
        };
        let mut st = self.job.submit();
        if self.hardware && (st == status::OK || st == status::BEING_PROCESSED) {
            let t0 = Instant::now();
            loop {
                st = self.job.check();
                if st != status::BEING_PROCESSED {
                    break;
                }
                if t0.elapsed() > Duration::from_secs(1) {
                    // Never return while the device may still write into `out`.
                    st = self.job.wait();
                    break;
                }
                std::hint::spin_loop();
            }
        }
        match st {
            status::OK => {
                let got = self.job.total_out() as usize;
                let used = self.job.total_in() as usize;
                if got != out.len() {
                    Err(CodecError::WrongOutputSize {
                        got,
                        expected: out.len(),
                    })
                } else if used != input.len() {
                    Err(CodecError::TrailingInput {
                        used,
                        zlen: input.len(),
                    })
                } else {
                    Ok(())
                }
            }
            status::MORE_OUTPUT_NEEDED => Err(CodecError::WrongOutputSize {
                got: out.len() + 1,
                expected: out.len(),
            }),
            other => Err(CodecError::Corrupt(format!(
                "QPL status {other} ({})",
                qpl_sys::status_name(other)
            ))),
        }
    }
}

#[cfg(test)]
#[cfg(feature = "qpl")]
mod tests {
    use super::*;
    use crate::codec::{DeflateCompressor, DeflateDecompressor, PageCompressor};
    use pagewire_synth::{self as synth, PageSet};

    fn qpl_or_skip(test: &str) -> bool {
        match Qpl::load() {
            Ok(_) => true,
            Err(e) => {
                eprintln!("SKIP {test}: {e}");
                false
            }
        }
    }

    fn pages() -> Vec<u8> {
        let mut v = vec![0u8; 256 * 4096];
        synth::fill(PageSet::Realistic, &mut v, 4096, 17);
        v
    }

    #[test]
    fn qpl_pages_decode_with_builtin_decoder() {
        if !qpl_or_skip("qpl_pages_decode_with_builtin_decoder") {
            return;
        }
        for huffman in [Huffman::Fixed, Huffman::Dynamic] {
            let s = QplSettings {
                huffman,
                path: QplPath::Software,
                ..Default::default()
            };
            let mut c = QplCompressor::new(s).expect("qpl");
            let mut d = DeflateDecompressor::new();
            let (mut compressed, mut raw) = (0, 0);
            for page in pages().chunks(4096) {
                let mut out = vec![0u8; 4095];
                match c.fallback(page, &mut out) {
                    Outcome::Compressed(n) => {
                        let mut back = vec![0u8; 4096];
                        d.decompress(&out[..n], &mut back)
                            .expect("built-in decodes QPL output");
                        assert_eq!(back, page);
                        compressed += 1;
                    }
                    Outcome::DidNotFit => raw += 1,
                    Outcome::Failed(s) => panic!("QPL failed: {s}"),
                }
            }
            assert!(
                compressed > 100 && raw > 0,
                "{huffman:?}: {compressed} compressed, {raw} raw"
            );
        }
    }

    #[test]
    fn builtin_pages_decode_with_qpl() {
        if !qpl_or_skip("builtin_pages_decode_with_qpl") {
            return;
        }
        let mut c = DeflateCompressor::new(1).expect("deflate");
        let mut d = QplDecompressor::new(true).expect("qpl");
        let mut n_ok = 0;
        for page in pages().chunks(4096) {
            let mut out = vec![0u8; 4095];
            if let Some(n) = c.compress(page, &mut out) {
                let mut back = vec![0u8; 4096];
                d.decompress(&out[..n], &mut back)
                    .expect("QPL decodes libdeflate output");
                assert_eq!(back, page);
                n_ok += 1;
            }
        }
        assert!(n_ok > 100);
    }

    #[test]
    fn qpl_decoder_enforces_exact_sizes() {
        if !qpl_or_skip("qpl_decoder_enforces_exact_sizes") {
            return;
        }
        let mut c = DeflateCompressor::new(1).expect("deflate");
        let mut d = QplDecompressor::new(true).expect("qpl");
        let page = vec![7u8; 4096];
        let mut out = vec![0u8; 4095];
        let n = c.compress(&page, &mut out).expect("fits");
        // Half a page inflates to too little.
        let half = vec![7u8; 2048];
        let mut hz = vec![0u8; 4095];
        let hn = c.compress(&half, &mut hz).expect("fits");
        let mut back = vec![0u8; 4096];
        assert!(matches!(
            d.decompress(&hz[..hn], &mut back),
            Err(CodecError::WrongOutputSize { .. })
        ));
        // Two pages' worth inflates to too much.
        let double = vec![7u8; 8192];
        let mut dz = vec![0u8; 8192];
        let dn = c.compress(&double, &mut dz).expect("fits");
        assert!(d.decompress(&dz[..dn], &mut back).is_err());
        // Garbage.
        assert!(d.decompress(&[0xFF; 100], &mut back).is_err());
        // The right stream still works after errors.
        d.decompress(&out[..n], &mut back).expect("valid");
        assert_eq!(back, page);
    }

    #[test]
    fn hardware_path_refused_without_iaa() {
        if !qpl_or_skip("hardware_path_refused_without_iaa") {
            return;
        }
        if hardware_available() {
            eprintln!("SKIP hardware_path_refused_without_iaa: this host has IAA");
            return;
        }
        let s = QplSettings {
            path: QplPath::Hardware,
            ..Default::default()
        };
        assert!(matches!(
            QplCompressor::new(s),
            Err(QplSetupError::NoHardware)
        ));
        let auto = QplCompressor::new(QplSettings::default()).expect("auto falls back to software");
        assert!(!auto.has_hardware());
        assert_eq!(auto.name(), "qpl-software");
    }
}
