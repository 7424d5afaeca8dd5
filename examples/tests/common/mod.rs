//! Helpers shared by the binary's integration tests (each test file uses what it needs).
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Output};
use std::time::{Duration, Instant};

use pagewire_synth::{self as synth, PageSet};

/// The `pagewire` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_pagewire");

/// Write `size` bytes of the realistic page mix (seeded) to `path`.
pub fn make_image(path: &Path, size: usize, seed: u64) {
    let mut v = vec![0u8; size];
    synth::fill(PageSet::Realistic, &mut v, 4096, seed);
    std::fs::write(path, &v).expect("write image");
}

/// Wait for `child` to exit within `limit`; kill it and fail the test (with its output) if it
/// does not.
pub fn wait_output(mut child: Child, limit: Duration) -> Output {
    let t = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "process did not exit within {limit:?}; stdout: {} stderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
