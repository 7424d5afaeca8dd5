//! The built-in DEFLATE (libdeflate) as an [`Accelerator`]: every job completes at submit.

use super::{Accelerator, Completion, JobDesc, Outcome, Path, Submit};
use crate::codec::{CodecError, DeflateCompressor, PageCompressor};

/// libdeflate on the calling thread.
#[derive(Debug)]
pub struct SoftwareDeflate {
    c: DeflateCompressor,
    done: Vec<Completion>,
}

impl SoftwareDeflate {
    /// A compressor at `level` (1..=12).
    pub fn new(level: i32) -> Result<SoftwareDeflate, CodecError> {
        Ok(SoftwareDeflate {
            c: DeflateCompressor::new(level)?,
            done: Vec::new(),
        })
    }
}

impl Accelerator for SoftwareDeflate {
    fn name(&self) -> &'static str {
        "deflate"
    }

    fn capacity(&self) -> usize {
        usize::MAX
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }

    unsafe fn submit(&mut self, job: JobDesc) -> Submit {
        // SAFETY: the caller guarantees both buffers are valid for the job's lifetime, which
        // ends inside this call.
        let (page, out) = unsafe {
            (
                std::slice::from_raw_parts(job.input, job.in_len),
                std::slice::from_raw_parts_mut(job.output, job.out_cap),
            )
        };
        let outcome = self.fallback(page, out);
        self.done.push(Completion {
            tag: job.tag,
            outcome,
            path: Path::Software,
        });
        Submit::Accepted
    }

    fn poll(&mut self, done: &mut Vec<Completion>) {
        done.append(&mut self.done);
    }

    fn fallback(&mut self, page: &[u8], out: &mut [u8]) -> Outcome {
        match self.c.compress(page, out) {
            Some(n) => Outcome::Compressed(n),
            None => Outcome::DidNotFit,
        }
    }
}
