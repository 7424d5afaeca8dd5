//! The VM's identity on the wire (`Config::vm_uuid`): a fixed uuid travels in the hello and in
//! every channel's init packet; without one each session gets a random uuid; a receiver that
//! knows its VM's uuid refuses another VM; and sessions of one VM (same uuid) stay fresh.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use pagewire::config::{format_uuid, parse_uuid};
use pagewire::Secret;
use pagewire::{
    Block, CodecKind, GuestRam, ReceiveInto, Receiver, ReceiverConfig, RoundPages, Sender,
    SenderConfig, SessionError,
};
use pagewire_transport::control::{self, Message};
use pagewire_transport::wire::{InitPacket, INIT_PACKET_LEN};

const SIZE: usize = 1 << 20;
const VM: &str = "6f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0";

fn vm() -> [u8; 16] {
    parse_uuid(VM).expect("uuid")
}

fn memory(fill: u8) -> Arc<GuestRam> {
    let b = Block::anonymous("pc.ram", SIZE).expect("map");
    // SAFETY: fresh block, not shared yet.
    let bytes = unsafe { b.as_mut_slice() };
    for (i, x) in bytes.iter_mut().enumerate() {
        *x = fill ^ (i / 4096) as u8 ^ (i % 251) as u8;
    }
    Arc::new(GuestRam::new(vec![b]).expect("layout"))
}

fn cfg(channels: u16) -> SenderConfig {
    SenderConfig::default()
        .codec(CodecKind::Deflate)
        .channels(channels)
        .idle_timeout(Duration::from_secs(10))
}

/// A receiver that records the hello's uuid and each channel's bytes, and acknowledges
/// rounds (no secret: channel streams start with their init packet).
fn recorder(listener: TcpListener) -> std::thread::JoinHandle<([u8; 16], Vec<Vec<u8>>)> {
    std::thread::spawn(move || {
        let (mut ctl, _) = listener.accept().expect("accept control");
        control::read_preamble(&mut ctl).expect("preamble");
        let challenge = Message::Challenge {
            nonce: [7; 32],
            secret_required: false,
        };
        control::write_message(&mut ctl, &challenge).expect("challenge");
        let hello = match control::read_message(&mut ctl).expect("hello") {
            Message::Hello(h) => h,
            other => panic!("expected hello, got {other:?}"),
        };
        control::write_message(
            &mut ctl,
            &Message::HelloOk {
                proof: None,
                fresh: false,
            },
        )
        .expect("hello-ok");
        let readers: Vec<_> = (0..hello.channels)
            .map(|_| {
                let (mut s, _): (TcpStream, _) = listener.accept().expect("accept channel");
                std::thread::spawn(move || {
                    let mut v = Vec::new();
                    s.read_to_end(&mut v).expect("record");
                    v
                })
            })
            .collect();
        loop {
            match control::read_message(&mut ctl).expect("control") {
                Message::RoundEnd { round } => {
                    control::write_message(&mut ctl, &Message::RoundDone { round })
                        .expect("round-done")
                }
                Message::End => {
                    control::write_message(&mut ctl, &Message::EndOk).expect("end-ok");
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        let streams = readers
            .into_iter()
            .map(|h| h.join().expect("reader"))
            .collect();
        (hello.uuid, streams)
    })
}

/// One recorded session of `c`: the hello's uuid and the uuid of each channel's init packet.
fn recorded_uuids(c: SenderConfig) -> ([u8; 16], Vec<[u8; 16]>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let rec = recorder(listener);
    let src = memory(1);
    let mut s = Sender::connect(addr, c, src).expect("connect");
    s.send_round(RoundPages::all(&[SIZE as u64], 4096, 128))
        .expect("round");
    s.finish().expect("finish");
    let (hello_uuid, streams) = rec.join().expect("recorder");
    let inits = streams
        .iter()
        .map(|v| {
            let head = v
                .get(..INIT_PACKET_LEN)
                .expect("stream holds an init packet");
            InitPacket::parse(head).expect("init packet").uuid
        })
        .collect();
    (hello_uuid, inits)
}

#[test]
fn fixed_uuid_in_the_hello_and_every_init_packet() {
    let c = cfg(3).vm_uuid(Some(vm()));
    let (hello, inits) = recorded_uuids(c);
    assert_eq!(format_uuid(&hello), VM);
    assert_eq!(inits.len(), 3);
    for (i, u) in inits.iter().enumerate() {
        assert_eq!(format_uuid(u), VM, "channel {i}'s init packet");
    }
}

#[test]
fn unset_uuid_is_random_per_session_and_shared_by_its_channels() {
    let (h1, i1) = recorded_uuids(cfg(2));
    let (h2, i2) = recorded_uuids(cfg(2));
    assert!(i1.iter().all(|u| *u == h1) && i2.iter().all(|u| *u == h2));
    assert_ne!(h1, h2, "two sessions without vm_uuid share a uuid");
    assert_ne!(h1, [0; 16]);
}

fn same(a: &GuestRam, b: &GuestRam) -> bool {
    // SAFETY: the sessions are over; nothing writes either memory.
    unsafe { a.block(0).expect("b").as_slice() == b.block(0).expect("b").as_slice() }
}

/// Two authenticated sessions of the same VM (same uuid, same secret) against one receiver
/// that expects that VM: both handshakes succeed, each with its own nonces (a fixed uuid does
/// not make a proof of one session valid in the other: see auth.rs's unit test).
#[test]
fn two_authenticated_sessions_of_one_vm() {
    let secret = Secret::new(b"one vm, two migrations, same key".to_vec()).expect("secret");
    let c = cfg(2).vm_uuid(Some(vm())).secret(Some(secret));
    let mut r = Receiver::bind(
        "127.0.0.1:0".parse().expect("addr"),
        ReceiverConfig::for_sender(&c),
    )
    .expect("bind");
    r.set_accept_timeout(Some(Duration::from_secs(10)));
    let addr = r.local_addr().expect("addr");
    let dst = memory(0);
    let into = dst.clone();
    let rt = std::thread::spawn(move || {
        let a = r.serve(ReceiveInto::Memory(into.clone()));
        let b = r.serve(ReceiveInto::Memory(into));
        (a, b)
    });
    for fill in [0x11u8, 0x22] {
        let src = memory(fill);
        let mut s = Sender::connect(addr, c.clone(), src.clone()).expect("connect");
        s.send_round(RoundPages::all(&[SIZE as u64], 4096, 128))
            .expect("round");
        s.finish().expect("finish");
        if fill == 0x22 {
            let (a, b) = rt.join().expect("join");
            a.expect("first session");
            b.expect("second session");
            assert!(same(&src, &dst));
            return;
        }
    }
}

#[test]
fn receiver_expecting_one_vm_refuses_another() {
    let mut r = Receiver::bind(
        "127.0.0.1:0".parse().expect("addr"),
        ReceiverConfig::for_sender(&cfg(1).vm_uuid(Some(vm()))),
    )
    .expect("bind");
    r.set_accept_timeout(Some(Duration::from_secs(3)));
    let addr = r.local_addr().expect("addr");
    let rejections = r.watch_rejections();
    let rt = std::thread::spawn(move || r.serve(ReceiveInto::Allocate));
    let other = parse_uuid("00000000-0000-4000-8000-000000000001").expect("uuid");
    let err = Sender::connect(addr, cfg(1).vm_uuid(Some(other)), memory(3))
        .expect_err("another VM's session must be refused");
    assert!(
        matches!(&err, SessionError::Peer(m) if m.contains(VM)),
        "{err}"
    );
    let rej = rejections
        .recv_timeout(Duration::from_secs(5))
        .expect("the receiver reports the refusal");
    assert!(
        rej.error.to_string().contains("expects VM"),
        "{}",
        rej.error
    );
    // The receiver kept waiting for its own VM and times out without a session.
    assert!(rt.join().expect("join").is_err());
}

/// A replay with a fixed uuid: session 1's channel token (same secret, same VM uuid, even the
/// same receiver nonce) does not open a channel of session 2, whose hello carried another
/// sender nonce.
#[test]
fn channel_token_of_another_hello_refused_with_the_same_uuid() {
    use pagewire_transport::control::{read_message, write_message, Hello, HelloAuth};
    use pagewire_transport::wire::{BlockSpec, Compression};
    use std::io::Write;

    let sec = Secret::new(b"one vm, two migrations, same key".to_vec()).expect("secret");
    let c = cfg(1).vm_uuid(Some(vm())).secret(Some(sec.clone()));
    let mut r = Receiver::bind(
        "127.0.0.1:0".parse().expect("addr"),
        ReceiverConfig::for_sender(&c),
    )
    .expect("bind");
    r.set_accept_timeout(Some(Duration::from_secs(5)));
    let addr = r.local_addr().expect("addr");
    let rej = r.watch_rejections();
    let _rt = std::thread::spawn(move || r.serve(ReceiveInto::Allocate));
    let mut ctl = TcpStream::connect(addr).expect("connect");
    control::write_preamble(&mut ctl).expect("preamble");
    let Message::Challenge { nonce: nonce_r, .. } = read_message(&mut ctl).expect("challenge")
    else {
        panic!("expected a challenge");
    };
    let uuid = vm();
    let nonce_s = [6u8; 32];
    let hello = Hello {
        uuid,
        page_size: 4096,
        pages_per_packet: 128,
        compression: Compression::Qpl,
        channels: 1,
        blocks: vec![BlockSpec {
            name: "pc.ram".into(),
            size: SIZE as u64,
        }],
        auth: Some(HelloAuth {
            nonce: nonce_s,
            mac: sec.sender_proof(&nonce_r, &nonce_s, &uuid),
        }),
        opening_sync: false,
    };
    write_message(&mut ctl, &Message::Hello(hello)).expect("hello");
    assert!(matches!(
        read_message(&mut ctl).expect("hello-ok"),
        Message::HelloOk { proof: Some(_), .. }
    ));
    // The token an earlier session (sender nonce [5; 32]) would have sent for channel 0.
    let old = sec.channel_token(&nonce_r, &[5u8; 32], &uuid, 0);
    let mut ch = TcpStream::connect(addr).expect("channel");
    ch.write_all(&old).expect("token");
    ch.write_all(
        &InitPacket {
            uuid,
            channel_id: 0,
        }
        .encode(),
    )
    .expect("init");
    let e = rej
        .recv_timeout(Duration::from_secs(5))
        .expect("refusal")
        .error;
    assert!(e.to_string().contains("token does not match"), "{e}");
}
