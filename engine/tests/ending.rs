//! How a session ends: the receiver's commit step decides what the sender's `finish` says, a
//! commit longer than the idle timeout keeps the sender waiting, and a confirmation lost after
//! the end is "outcome unknown", not "failed".

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pagewire::{
    Block, CodecKind, GuestRam, ReceiveInto, Receiver, ReceiverConfig, RoundPages, Sender,
    SenderConfig, SessionError,
};
use pagewire_synth::{self as synth, PageSet};

const PS: u32 = 4096;
const SIZE: usize = 4 << 20;

fn memory(seed: u64) -> Arc<GuestRam> {
    let b = Block::anonymous("pc.ram", SIZE).expect("map");
    // SAFETY: fresh block, not shared yet.
    synth::fill(
        PageSet::Realistic,
        unsafe { b.as_mut_slice() },
        PS as usize,
        seed,
    );
    Arc::new(GuestRam::new(vec![b]).expect("layout"))
}

fn cfg(idle: Duration) -> SenderConfig {
    SenderConfig::default()
        .codec(CodecKind::None)
        .channels(2)
        .idle_timeout(idle)
}

fn receiver(c: &SenderConfig) -> (Receiver, SocketAddr) {
    let mut r = Receiver::bind(
        "127.0.0.1:0".parse().expect("addr"),
        ReceiverConfig::for_sender(c),
    )
    .expect("bind");
    r.set_accept_timeout(Some(Duration::from_secs(20)));
    let addr = r.local_addr().expect("addr");
    (r, addr)
}

/// One round of every page, then `finish`.
fn migrate(addr: SocketAddr, c: &SenderConfig, src: &Arc<GuestRam>) -> Result<(), SessionError> {
    let mut s = Sender::connect(addr, c.clone(), src.clone())?;
    s.send_round(RoundPages::all(&[SIZE as u64], PS, c.pages_per_packet))?;
    s.finish().map(|_| ())
}

fn same(a: &GuestRam, b: &GuestRam) -> bool {
    // SAFETY: both sessions are over; nothing writes either memory.
    unsafe { a.blocks()[0].as_slice() == b.blocks()[0].as_slice() }
}

#[test]
fn a_failed_commit_fails_the_senders_finish() {
    let c = cfg(Duration::from_secs(10));
    let src = memory(1);
    let (r, addr) = receiver(&c);
    let rt = std::thread::spawn(move || {
        r.serve_and_commit(ReceiveInto::Allocate, |_, _| {
            Err("writing received.img: No space left on device".into())
        })
    });
    let e = migrate(addr, &c, &src).expect_err("the sender succeeded though the commit failed");
    assert!(!e.outcome_unknown(), "{e}");
    assert!(
        matches!(&e, SessionError::Peer(m) if m.contains("No space left on device")),
        "sender: {e}"
    );
    let r_err = rt.join().expect("join").expect_err("receiver succeeded");
    assert!(
        matches!(r_err, SessionError::Commit(_)),
        "receiver: {r_err}"
    );
}

#[test]
fn a_commit_longer_than_the_idle_timeout_keeps_the_sender_waiting() {
    // The commit takes three idle timeouts; the receiver's end-pending messages (every third
    // of one) keep the sender from giving up, and it returns only after the commit.
    let idle = Duration::from_millis(600);
    let c = cfg(idle);
    let src = memory(2);
    let committed = Arc::new(AtomicBool::new(false));
    let flag = committed.clone();
    let (r, addr) = receiver(&c);
    let rt = std::thread::spawn(move || {
        r.serve_and_commit(ReceiveInto::Allocate, move |mem, state| {
            assert!(state.is_empty());
            assert_eq!(mem.total_len(), SIZE as u64);
            std::thread::sleep(idle * 3);
            flag.store(true, Ordering::SeqCst);
            Ok(())
        })
    });
    migrate(addr, &c, &src).expect("finish");
    assert!(
        committed.load(Ordering::SeqCst),
        "finish returned before the commit completed"
    );
    let got = rt.join().expect("join").expect("serve");
    assert!(same(&src, &got.memory));
}

/// A proxy for the control connection (the first one accepted) that forwards everything but
/// cuts both directions once the sender's `end` frame has gone through, so the receiver's
/// `end-ok` never arrives. Every other connection is forwarded verbatim.
fn cut_after_end(to: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for (i, c) in l.incoming().enumerate() {
            let Ok(down) = c else { return };
            let Ok(up) = TcpStream::connect(to) else {
                return;
            };
            let (mut d2, mut u2) = (
                down.try_clone().expect("clone"),
                up.try_clone().expect("clone"),
            );
            let control = i == 0;
            let cut = Arc::new(AtomicBool::new(false));
            let cut2 = cut.clone();
            // Receiver -> sender.
            std::thread::spawn(move || {
                let mut buf = [0u8; 64 << 10];
                loop {
                    let n = match u2.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if cut2.load(Ordering::SeqCst) || d2.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = d2.shutdown(Shutdown::Both);
            });
            // Sender -> receiver, frame by frame on the control connection.
            std::thread::spawn(move || {
                let (mut from, mut to) = (down, up);
                if !control {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(Shutdown::Write);
                    return;
                }
                // The sender's preamble, then frames.
                let mut preamble = [0u8; 8];
                if from.read_exact(&mut preamble).is_err() || to.write_all(&preamble).is_err() {
                    return;
                }
                loop {
                    let mut len = [0u8; 4];
                    if from.read_exact(&mut len).is_err() {
                        break;
                    }
                    let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
                    if from.read_exact(&mut frame).is_err() {
                        break;
                    }
                    let end = frame == [5];
                    if end {
                        // From now on nothing goes back to the sender.
                        cut.store(true, Ordering::SeqCst);
                    }
                    if to.write_all(&len).is_err() || to.write_all(&frame).is_err() {
                        break;
                    }
                    if end {
                        // Let the receiver answer, then cut the sender off.
                        std::thread::sleep(Duration::from_millis(300));
                        let _ = from.shutdown(Shutdown::Both);
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn a_confirmation_lost_after_the_end_is_outcome_unknown() {
    let c = cfg(Duration::from_secs(10));
    let src = memory(3);
    let (r, raddr) = receiver(&c);
    let rt = std::thread::spawn(move || r.serve(ReceiveInto::Allocate));
    let paddr = cut_after_end(raddr);
    let e = migrate(paddr, &c, &src).expect_err("the sender saw a confirmation");
    assert!(e.outcome_unknown(), "sender: {e}");
    assert!(e.to_string().contains("outcome unknown"), "{e}");
    // The receiver did complete, with every page.
    let got = rt.join().expect("join").expect("serve");
    assert!(same(&src, &got.memory));
}

/// How the destination's session ended when the source gave up after one round: `how` gets
/// the sender after that round.
fn abandoned_by(how: impl FnOnce(Sender)) -> SessionError {
    let c = cfg(Duration::from_secs(20));
    let (r, addr) = receiver(&c);
    let dst = memory(2);
    let dest = std::thread::spawn(move || r.serve(ReceiveInto::Memory(dst)));
    let src = memory(1);
    let mut s = Sender::connect(addr, c.clone(), src.clone()).expect("connect");
    s.send_round(RoundPages::all(&[SIZE as u64], PS, c.pages_per_packet))
        .expect("round");
    how(s);
    let Err(e) = dest.join().expect("receiver thread") else {
        panic!("the destination's session must fail");
    };
    e
}

/// The destination tells "the source abandoned the migration" from a network failure, with
/// the source's reason, however the source gave up: `abandon`, an abort from another thread,
/// or dropping the sender.
#[test]
fn a_source_that_gives_up_is_reported_as_abandoned_not_as_a_network_failure() {
    let e = abandoned_by(|s| s.abandon("the guest did not converge in 30 rounds"));
    assert!(
        matches!(&e, SessionError::Abandoned { reason } if reason == "the guest did not converge in 30 rounds"),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "the source abandoned the migration: the guest did not converge in 30 rounds"
    );

    // Aborted from another thread: the next round fails with Aborted here and the
    // destination hears it was abandoned (not "connection reset").
    let e = abandoned_by(|mut s| {
        let h = s.abort_handle();
        std::thread::spawn(move || h.abort()).join().expect("abort");
        let err = s
            .send_round(RoundPages::all(&[SIZE as u64], PS, 128))
            .expect_err("aborted");
        assert!(matches!(err, SessionError::Aborted), "{err:?}");
    });
    assert!(
        matches!(&e, SessionError::Abandoned { reason } if reason.contains("aborted")),
        "{e:?}"
    );

    // Dropped before finishing.
    let e = abandoned_by(drop);
    assert!(
        matches!(&e, SessionError::Abandoned { reason } if reason.contains("dropped")),
        "{e:?}"
    );
}
