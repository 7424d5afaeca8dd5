//! Page-compression engines behind one interface, so the sender's loop treats an IAA
//! accelerator, QPL's software path and the built-in DEFLATE the same way: submit a page job
//! (which may be refused as busy), poll for completions between io_uring completions, and
//! never block while other work can progress.
//!
//! * [`software::SoftwareDeflate`]: libdeflate, synchronous (a job completes at submit).
//! * `qpl::QplCompressor` ([`qpl`], feature `qpl`): QPL, hardware jobs (IAA) completing
//!   asynchronously, or QPL's software path (synchronous).
//! * [`testing::ScriptedAccel`]: injects busy answers, failures and late completions so
//!   every fallback branch of the sender is tested without hardware.

pub mod qpl;
pub mod software;
pub mod testing;

use serde::Serialize;

/// Which kind of path ran a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Path {
    /// An accelerator (IAA through QPL's hardware path).
    Hardware,
    /// The CPU.
    Software,
}

/// A job's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Compressed into this many bytes (1 ..= the output capacity).
    Compressed(usize),
    /// The output would not fit in the capacity: send the page raw.
    DidNotFit,
    /// The engine failed (status code): send the page raw.
    Failed(u32),
}

/// The answer to a submission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Submit {
    /// The job runs; its completion will come from [`Accelerator::poll`].
    Accepted,
    /// The engine's queue is full: try again (the sender retries three times, then uses
    /// [`Accelerator::fallback`]).
    Busy,
}

/// A finished job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The tag given at submission.
    pub tag: u64,
    /// What happened.
    pub outcome: Outcome,
    /// Where it ran.
    pub path: Path,
}

/// One compression job: a page in, at most `out_cap` bytes out.
#[derive(Clone, Copy, Debug)]
pub struct JobDesc {
    pub tag: u64,
    pub input: *const u8,
    pub in_len: usize,
    pub output: *mut u8,
    pub out_cap: usize,
}

/// A page-compression engine owned by one channel thread.
pub trait Accelerator: Send {
    /// Short name for logs and stats ("deflate", "qpl-hardware", "qpl-software", ...).
    fn name(&self) -> &'static str;

    /// Most jobs in flight at once; [`Accelerator::submit`] answers `Busy` beyond it.
    fn capacity(&self) -> usize;

    /// Jobs submitted and not yet returned by [`Accelerator::poll`].
    fn in_flight(&self) -> usize;

    /// Start a job.
    ///
    /// # Safety
    /// `job.input..+in_len` must stay readable and `job.output..+out_cap` writable and
    /// otherwise unused until the job's completion has been returned by `poll`.
    unsafe fn submit(&mut self, job: JobDesc) -> Submit;

    /// Append finished jobs to `done`; never blocks.
    fn poll(&mut self, done: &mut Vec<Completion>);

    /// Compress `page` into `out` synchronously on the CPU (the path for a page whose
    /// submission stayed busy).
    fn fallback(&mut self, page: &[u8], out: &mut [u8]) -> Outcome;
}
