//! Shared-secret authentication over real loopback sessions: the right secret works; a wrong
//! or missing one is refused on both sides before any page of guest memory is written.

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use pagewire::Secret;
use pagewire::{
    Block, CodecKind, GuestRam, ReceiveInto, Receiver, ReceiverConfig, RoundPages, Sender,
    SenderConfig, SessionError,
};
use pagewire_synth::{self as synth, PageSet};
use pagewire_transport::control::{
    read_message, write_message, write_preamble, Hello, HelloAuth, Message,
};
use pagewire_transport::wire::{BlockSpec, Compression, InitPacket};

const SIZE: usize = 2 << 20;

fn secret(s: &str) -> Secret {
    Secret::new(s.as_bytes().to_vec()).expect("secret")
}

fn cfg(secret: Option<Secret>) -> SenderConfig {
    SenderConfig::default()
        .codec(CodecKind::Deflate)
        .channels(2)
        .idle_timeout(Duration::from_secs(5))
        .secret(secret)
}

fn source() -> Arc<GuestRam> {
    let b = Block::anonymous("pc.ram", SIZE).expect("map");
    // SAFETY: fresh block.
    synth::fill(PageSet::Realistic, unsafe { b.as_mut_slice() }, 4096, 3);
    Arc::new(GuestRam::new(vec![b]).expect("layout"))
}

/// Destination memory filled with 0xAB, to prove nothing was written.
fn patterned() -> Arc<GuestRam> {
    let b = Block::anonymous("pc.ram", SIZE).expect("map");
    // SAFETY: fresh block.
    unsafe { b.as_mut_slice() }.fill(0xAB);
    Arc::new(GuestRam::new(vec![b]).expect("layout"))
}

fn untouched(m: &GuestRam) -> bool {
    // SAFETY: the session is over.
    unsafe { m.block(0).expect("block").as_slice() }
        .iter()
        .all(|&b| b == 0xAB)
}

type Serving = (
    std::net::SocketAddr,
    std::sync::mpsc::Receiver<pagewire::Rejection>,
    std::thread::JoinHandle<Result<pagewire::Received, SessionError>>,
);

fn serve(c: SenderConfig, into: ReceiveInto) -> Serving {
    let mut r = Receiver::bind(
        "127.0.0.1:0".parse().expect("addr"),
        ReceiverConfig::for_sender(&c),
    )
    .expect("bind");
    r.set_accept_timeout(Some(Duration::from_secs(10)));
    let addr = r.local_addr().expect("addr");
    let rejections = r.watch_rejections();
    (addr, rejections, std::thread::spawn(move || r.serve(into)))
}

/// The receiver refuses the connection (a logged line) and keeps serving.
fn refused(rx: &std::sync::mpsc::Receiver<pagewire::Rejection>) -> SessionError {
    rx.recv_timeout(Duration::from_secs(5))
        .expect("the receiver reports a refused connection")
        .error
}

#[test]
fn same_secret_round_trips() {
    let src = source();
    let dst = patterned();
    let (addr, _rej, rt) = serve(
        cfg(Some(secret("correct horse battery staple"))),
        ReceiveInto::Memory(dst.clone()),
    );
    let mut s = Sender::connect(
        addr,
        cfg(Some(secret("correct horse battery staple"))),
        src.clone(),
    )
    .expect("connect");
    s.send_round(RoundPages::all(&[SIZE as u64], 4096, 128))
        .expect("round");
    s.finish().expect("finish");
    rt.join().expect("join").expect("serve");
    // SAFETY: sessions over.
    assert!(unsafe { src.block(0).expect("b").as_slice() == dst.block(0).expect("b").as_slice() });
}

#[test]
fn wrong_secret_refused_on_both_sides_and_nothing_written() {
    let dst = patterned();
    let (addr, rej, rt) = serve(
        cfg(Some(secret("correct horse battery staple"))),
        ReceiveInto::Memory(dst.clone()),
    );
    let err = Sender::connect(
        addr,
        cfg(Some(secret("incorrect horse battery staple"))),
        source(),
    )
    .expect_err("refused");
    let msg = err.to_string();
    assert!(
        msg.contains("authentication failed") && msg.contains("does not match"),
        "{msg}"
    );
    let rerr = refused(&rej);
    assert!(matches!(rerr, SessionError::Auth(_)), "{rerr:?}");
    assert!(
        rerr.to_string()
            .contains("does not match this receiver's shared secret"),
        "{rerr}"
    );
    assert!(untouched(&dst));
    // The refused sender did not cost the session: the right one still migrates.
    let src = source();
    let good = cfg(Some(secret("correct horse battery staple")));
    let mut s = Sender::connect(addr, good, src.clone()).expect("connect");
    s.send_round(RoundPages::all(&[SIZE as u64], 4096, 128))
        .expect("round");
    s.finish().expect("finish");
    rt.join().expect("join").expect("serve");
    // SAFETY: sessions over.
    assert!(unsafe { src.block(0).expect("b").as_slice() == dst.block(0).expect("b").as_slice() });
}

#[test]
fn missing_secret_on_sender_refused_on_both_sides() {
    let dst = patterned();
    let (addr, rej, _rt) = serve(
        cfg(Some(secret("correct horse battery staple"))),
        ReceiveInto::Memory(dst.clone()),
    );
    let err = Sender::connect(addr, cfg(None), source()).expect_err("refused");
    assert!(matches!(err, SessionError::Auth(_)), "{err:?}");
    assert!(
        err.to_string().contains("requires a shared secret"),
        "{err}"
    );
    let rerr = refused(&rej);
    assert!(rerr.to_string().contains("no shared secret"), "{rerr}");
    assert!(untouched(&dst));
}

#[test]
fn secret_on_sender_only_is_refused() {
    let dst = patterned();
    let (addr, rej, _rt) = serve(cfg(None), ReceiveInto::Memory(dst.clone()));
    let err = Sender::connect(
        addr,
        cfg(Some(secret("correct horse battery staple"))),
        source(),
    )
    .expect_err("refused");
    assert!(err.to_string().contains("does not authenticate"), "{err}");
    let rerr = refused(&rej);
    assert!(
        rerr.to_string().contains("requires a shared secret"),
        "{rerr}"
    );
    assert!(untouched(&dst));
}

/// A peer that passes the control handshake but opens a channel with a bad token.
#[test]
fn channel_with_wrong_token_refused() {
    let sec = secret("correct horse battery staple");
    let dst = patterned();
    let (addr, rej, _rt) = serve(cfg(Some(sec.clone())), ReceiveInto::Memory(dst.clone()));
    let mut ctl = TcpStream::connect(addr).expect("connect");
    write_preamble(&mut ctl).expect("preamble");
    let Message::Challenge {
        nonce: nonce_r,
        secret_required: true,
    } = read_message(&mut ctl).expect("challenge")
    else {
        panic!("expected a challenge requiring a secret");
    };
    let uuid = [4u8; 16];
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
    match read_message(&mut ctl).expect("hello-ok") {
        Message::HelloOk { proof: Some(p), .. } => {
            assert!(sec.check_receiver(&nonce_r, &nonce_s, &uuid, &p))
        }
        other => panic!("{other:?}"),
    }
    let mut ch = TcpStream::connect(addr).expect("channel");
    // A token for another channel id: valid HMAC, wrong binding.
    ch.write_all(&sec.channel_token(&nonce_r, &nonce_s, &uuid, 1))
        .expect("token");
    ch.write_all(
        &InitPacket {
            uuid,
            channel_id: 0,
        }
        .encode(),
    )
    .expect("init");
    let rerr = refused(&rej);
    assert!(matches!(rerr, SessionError::Auth(_)), "{rerr:?}");
    assert!(rerr.to_string().contains("token does not match"), "{rerr}");
    assert!(untouched(&dst));
}

#[test]
fn non_loopback_peers_need_a_secret_or_insecure() {
    use pagewire::internals::peer_allowed;
    let lo: std::net::SocketAddr = "127.0.0.1:5000".parse().expect("addr");
    let lo6: std::net::SocketAddr = "[::1]:5000".parse().expect("addr");
    let far: std::net::SocketAddr = "192.0.2.10:5000".parse().expect("addr");
    assert!(peer_allowed(&ReceiverConfig::for_sender(&cfg(None)), &lo).is_ok());
    assert!(peer_allowed(&ReceiverConfig::for_sender(&cfg(None)), &lo6).is_ok());
    let e = peer_allowed(&ReceiverConfig::for_sender(&cfg(None)), &far).expect_err("refused");
    assert!(
        e.to_string().contains("not on loopback")
            && e.to_string().contains("`insecure` on the receiver"),
        "{e}"
    );
    assert!(peer_allowed(&ReceiverConfig::for_sender(&cfg(None)).insecure(true), &far).is_ok());
    assert!(peer_allowed(
        &ReceiverConfig::for_sender(&cfg(Some(secret("correct horse battery staple")))),
        &far
    )
    .is_ok());
}
