//! Builds without the optional features (`tls`, `qpl`): what a session does when a peer or
//! the embedder asks for what this build lacks. Every test here runs only in the builds it is
//! about (CI runs them with `--no-default-features --features vm-memory`); the default build
//! covers the same situations with the feature present (tests/tls.rs, tests/accel.rs).

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

#[cfg(not(feature = "tls"))]
mod without_tls {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::Arc;
    use std::time::Duration;

    use pagewire::{Block, GuestRam, ReceiveInto, Receiver, ReceiverConfig, Sender, SenderConfig};
    use pagewire_transport::control::{self, Message};

    const NOT_BUILT: &str = "pagewire was built without the `tls` feature";

    /// A TLS sender's ClientHello reaches a receiver built without TLS: refused at once, the
    /// reason in the receiver's rejection and in the error frame the sender reads (a TLS
    /// sender quotes it: transport's `handshake::finish`).
    #[test]
    fn a_client_hello_is_refused_naming_the_feature() {
        let mut r =
            Receiver::bind("127.0.0.1:0".parse().unwrap(), ReceiverConfig::default()).unwrap();
        r.set_accept_timeout(Some(Duration::from_secs(3)));
        let rejections = r.watch_rejections();
        let addr = r.local_addr().unwrap();
        let rt = std::thread::spawn(move || r.serve(ReceiveInto::Allocate));

        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // A ClientHello's record: type 22 (handshake), version 3.1, 200 bytes holding
        // handshake type 1 (client_hello) and its length.
        let mut hello = vec![
            0x16, 0x03, 0x01, 0x00, 0xc8, 0x01, 0x00, 0x00, 0xc4, 0x03, 0x03,
        ];
        hello.resize(5 + 0xc8, 0);
        s.write_all(&hello).unwrap();
        match control::read_message(&mut s).unwrap() {
            Message::Error { message } => {
                assert!(message.contains("starts a TLS handshake"), "{message}");
                assert!(message.contains(NOT_BUILT), "{message}");
            }
            other => panic!("expected an error frame, got {}", other.name()),
        }
        let refused = rejections
            .recv_timeout(Duration::from_secs(5))
            .unwrap()
            .error
            .to_string();
        assert!(refused.contains(NOT_BUILT), "receiver: {refused}");
        assert!(rt.join().unwrap().is_err(), "no session came");
    }

    /// A sender built without TLS meets a TLS receiver, here one that closes after the
    /// clear-text preamble as a TLS receiver does with bytes that are not a TLS record: the
    /// error says this sender cannot speak TLS, and why.
    #[test]
    fn a_receiver_waiting_for_tls_is_explained_by_the_feature() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let peer = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut preamble = [0u8; 8];
            let _ = c.read_exact(&mut preamble);
        });
        let mem =
            Arc::new(GuestRam::new(vec![Block::anonymous("pc.ram", 1 << 20).unwrap()]).unwrap());
        let e = Sender::connect(addr, SenderConfig::default(), mem)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot speak TLS"), "{e}");
        assert!(e.contains(NOT_BUILT), "{e}");
        peer.join().unwrap();
    }
}

#[cfg(not(feature = "qpl"))]
mod without_qpl {
    use std::sync::Arc;

    use pagewire::config::Decoder;
    use pagewire::internals::auto_ladder;
    use pagewire::{resolve_auto, AutoCompressor};
    use pagewire::{Block, CodecKind, GuestRam, Sender, SenderConfig};

    const NOT_BUILT: &str = "pagewire was built without the `qpl` feature";

    /// Codec qpl asked for: the sender fails before it connects, naming the feature.
    #[test]
    fn codec_qpl_names_the_feature() {
        let cfg = SenderConfig::default().codec(CodecKind::Qpl);
        let mem =
            Arc::new(GuestRam::new(vec![Block::anonymous("pc.ram", 1 << 20).unwrap()]).unwrap());
        // Nothing listens there: the engines are set up before the first connection.
        let e = Sender::connect("127.0.0.1:9".parse().unwrap(), cfg, mem)
            .unwrap_err()
            .to_string();
        assert!(e.contains(NOT_BUILT), "{e}");
    }

    /// The QPL decoder asked for fails the same way; `auto` decodes with the built-in one.
    #[test]
    fn the_qpl_decoder_names_the_feature() {
        let e = pagewire::internals::decoder_for(Decoder::Qpl)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(NOT_BUILT), "{e}");
        assert!(pagewire::internals::decoder_for(Decoder::Auto).is_ok());
        assert!(!pagewire::qpl_hardware_available());
    }

    /// `auto` compresses with deflate, alone, and says why; qpl asked for falls back too.
    #[test]
    fn auto_picks_deflate() {
        for pref in [
            AutoCompressor::Pick,
            AutoCompressor::Qpl,
            AutoCompressor::Ladder,
        ] {
            let (c, why) = resolve_auto(pref);
            assert_eq!(c, CodecKind::Deflate, "{why}");
            assert!(why.contains(NOT_BUILT), "{why}");
        }
        assert!(!auto_ladder(AutoCompressor::Pick));
    }
}
