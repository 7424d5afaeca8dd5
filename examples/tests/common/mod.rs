//! Helpers shared by the binary's integration tests (each test file uses what it needs).
#![allow(dead_code)]

use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Output};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pagewire_transport::control::{self, Hello, Message};

use pagewire_synth::{self as synth, PageSet};

/// The `pagewire` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_pagewire");

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Whether something listens on 127.0.0.1:`port` (read from /proc, without connecting: a
/// probe connection would be taken for the session's control connection).
pub fn listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    std::fs::read_to_string("/proc/net/tcp").is_ok_and(|t| {
        t.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
        })
    })
}

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

/// What [`recorder`] yields: the sender's hello and its channel streams.
pub type Recording = (Hello, Vec<Vec<u8>>);

/// A receiver that speaks just enough of the control protocol (no secret) to record a sender's
/// channel streams verbatim: it takes the hello, accepts the channels, acknowledges every round
/// and the end. Returns the port to send to and a handle that yields the hello and the channel
/// streams, in the order the channels connected.
pub fn recorder() -> (u16, JoinHandle<Recording>) {
    recorder_ending(true)
}

/// [`recorder`], which at the sender's `end` answers `end-ok` (`confirm`) or closes the
/// control connection without a word (a confirmation lost on the way).
pub fn recorder_ending(confirm: bool) -> (u16, JoinHandle<Recording>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let rec = std::thread::spawn(move || {
        let (mut ctl, _) = listener.accept().expect("control");
        control::read_preamble(&mut ctl).expect("preamble");
        let challenge = Message::Challenge {
            nonce: [7; 32],
            secret_required: false,
        };
        control::write_message(&mut ctl, &challenge).expect("challenge");
        let Message::Hello(h) = control::read_message(&mut ctl).expect("hello") else {
            panic!("no hello")
        };
        control::write_message(
            &mut ctl,
            &Message::HelloOk {
                proof: None,
                fresh: false,
            },
        )
        .expect("ok");
        let readers: Vec<_> = (0..h.channels)
            .map(|_| {
                let (mut s, _) = listener.accept().expect("channel");
                std::thread::spawn(move || {
                    let mut v = Vec::new();
                    s.read_to_end(&mut v).expect("read");
                    v
                })
            })
            .collect();
        loop {
            match control::read_message(&mut ctl).expect("control") {
                Message::RoundEnd { round } => {
                    control::write_message(&mut ctl, &Message::RoundDone { round }).expect("rd")
                }
                Message::End => {
                    if confirm {
                        control::write_message(&mut ctl, &Message::EndOk).expect("eo");
                    }
                    break;
                }
                m => panic!("unexpected {m:?}"),
            }
        }
        let streams = readers
            .into_iter()
            .map(|h| h.join().expect("reader"))
            .collect();
        (h, streams)
    });
    (port, rec)
}
