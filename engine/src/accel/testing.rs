//! A scripted accelerator for tests: real DEFLATE output (libdeflate), with busy answers,
//! failures and late completions injected on a deterministic schedule, so every fallback
//! branch of the sender runs without hardware.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::software::SoftwareDeflate;
use super::{Accelerator, Completion, JobDesc, Outcome, Path, Submit};
use crate::codec::CodecError;

/// The schedule.
#[derive(Clone, Debug)]
pub struct Script {
    /// For the j-th page job, answer `Busy` this many times (cycled) before accepting it.
    /// The sender retries 3 times, so a value of 4 or more sends the page to `fallback`.
    pub busy: Vec<u32>,
    /// Every n-th accepted job completes as `Failed` (0: never).
    pub fail_every: u64,
    /// Completions are released only after this many further `poll` calls.
    pub late_polls: u32,
    /// Jobs in flight at most.
    pub capacity: usize,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            busy: vec![0],
            fail_every: 0,
            late_polls: 0,
            capacity: 8,
        }
    }
}

/// What the script did, shared with the test.
#[derive(Debug, Default)]
pub struct ScriptCounts {
    pub busy_answers: AtomicU64,
    pub accepted: AtomicU64,
    pub failed: AtomicU64,
    pub fallbacks: AtomicU64,
}

/// The scripted accelerator (reports its jobs as hardware jobs).
#[derive(Debug)]
pub struct ScriptedAccel {
    inner: SoftwareDeflate,
    script: Script,
    job: u64,
    busy_left: Option<u32>,
    pending: VecDeque<(Completion, u32)>,
    counts: Arc<ScriptCounts>,
}

impl ScriptedAccel {
    /// A scripted accelerator and the counters it updates.
    pub fn new(script: Script) -> Result<(ScriptedAccel, Arc<ScriptCounts>), CodecError> {
        let counts = Arc::new(ScriptCounts::default());
        let inner = SoftwareDeflate::new(crate::codec::deflate::DEFAULT_LEVEL)?;
        let accel = ScriptedAccel {
            inner,
            script,
            job: 0,
            busy_left: None,
            pending: VecDeque::new(),
            counts: counts.clone(),
        };
        Ok((accel, counts))
    }
}

impl Accelerator for ScriptedAccel {
    fn name(&self) -> &'static str {
        "scripted"
    }

    fn capacity(&self) -> usize {
        self.script.capacity.max(1)
    }

    fn in_flight(&self) -> usize {
        self.pending.len()
    }

    unsafe fn submit(&mut self, j: JobDesc) -> Submit {
        if self.pending.len() >= self.capacity() {
            return Submit::Busy;
        }
        let busy = self.busy_left.get_or_insert_with(|| {
            let b = &self.script.busy;
            if b.is_empty() {
                0
            } else {
                b[(self.job % b.len() as u64) as usize]
            }
        });
        if *busy > 0 {
            *busy -= 1;
            self.counts.busy_answers.fetch_add(1, Ordering::Relaxed);
            return Submit::Busy;
        }
        self.busy_left = None;
        self.job += 1;
        let n = self.counts.accepted.fetch_add(1, Ordering::Relaxed) + 1;
        let outcome = if self.script.fail_every > 0 && n % self.script.fail_every == 0 {
            self.counts.failed.fetch_add(1, Ordering::Relaxed);
            Outcome::Failed(99)
        } else {
            // SAFETY: the caller's contract: buffers valid until poll returns the job.
            let (page, out) = unsafe {
                (
                    std::slice::from_raw_parts(j.input, j.in_len),
                    std::slice::from_raw_parts_mut(j.output, j.out_cap),
                )
            };
            self.inner.fallback(page, out)
        };
        self.pending.push_back((
            Completion {
                tag: j.tag,
                outcome,
                path: Path::Hardware,
            },
            self.script.late_polls,
        ));
        Submit::Accepted
    }

    fn poll(&mut self, done: &mut Vec<Completion>) {
        // Release from the front only, oldest first, once its delay has passed; later jobs
        // count down meanwhile (completion order = submission order, like one work queue).
        for (_, left) in self.pending.iter_mut() {
            *left = left.saturating_sub(1);
        }
        while self.pending.front().is_some_and(|(_, left)| *left == 0) {
            if let Some((c, _)) = self.pending.pop_front() {
                done.push(c);
            }
        }
    }

    fn fallback(&mut self, page: &[u8], out: &mut [u8]) -> Outcome {
        // When a busy page is sent here, the script's busy count for it is spent.
        self.busy_left = None;
        self.job += 1;
        self.counts.fallbacks.fetch_add(1, Ordering::Relaxed);
        self.inner.fallback(page, out)
    }
}
