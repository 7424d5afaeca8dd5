//! A broken or malicious SENDER against the real receiver, over real loopback sockets.
//!
//! Every test plays a fake sender (plain `std::net::TcpStream`, hand-built bytes) against
//! `pagewire::Receiver` and asserts the exact error the receiver returns: right variant,
//! right channel, right packet, right field. A receiver that panics, hangs, or accepts the
//! stream fails the test (see [`Serving::result`]). One positive control test
//! (`valid_hand_built_stream_is_accepted`) proves the fake sender speaks the protocol, so each
//! negative test fails for the reason it names.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use pagewire::error::{ChannelErrorKind, Place};
use pagewire::internals::{CodecError, DeflateCompressor, PageCompressor};
use pagewire::SessionError;
use pagewire::{
    Block, ChannelError, GuestRam, ReceiveInto, Received, Receiver, ReceiverConfig, SenderConfig,
};
use pagewire_transport::control::{
    read_message, write_message, write_preamble, ControlError, Hello, Message,
};
use pagewire_transport::wire::{
    encode_header, encode_zlens, header_len, BlockSpec, Compression, Field, HeaderFields,
    InitPacket, WireError, FLAG_SYNC,
};

// ---------------------------------------------------------------------------------------------
// Shared set-up: receiver in a thread, fake sender, packet builders, assertions.
// ---------------------------------------------------------------------------------------------

const PS: u32 = 4096;
const PSU: usize = PS as usize;
/// Small packets keep the tests light: header_len(8) = 384 bytes.
const PPP: u32 = 8;
const BLOCK: &str = "pc.ram";
const BLOCK_PAGES: u64 = 64;
const BLOCK_SIZE: u64 = BLOCK_PAGES * PS as u64;
/// The receiver's idle timeout in every test (bounds any wait it does on us).
const IDLE: Duration = Duration::from_secs(2);
/// A receiver that has not returned after this long is hung.
const HANG_LIMIT: Duration = Duration::from_secs(10);
const UUID: [u8; 16] = *b"hostile-sender!!";
const PATTERN: u8 = 0xAB;
/// Where most hostile packets sit: the first packet of channel 0, packet_num 5.
const PLACE5: Place = Place::Packet {
    index: 0,
    packet_num: 5,
};

// RAM header byte offsets (docs/wire-format.md §1.2).
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 4;
const OFF_FLAGS: usize = 8;
const OFF_PAGES_ALLOC: usize = 12;
const OFF_NORMAL_PAGES: usize = 16;
const OFF_NEXT_PACKET_SIZE: usize = 20;
const OFF_ZERO_PAGES: usize = 32;
const OFF_BLOCK_NAME: usize = 64;
const OFF_OFFSETS: usize = 320;

fn cfg() -> ReceiverConfig {
    ReceiverConfig::default().idle_timeout(IDLE)
}

/// What the receiver did: finished `serve`, or refused a connection before any session
/// (it then goes on serving).
#[allow(clippy::large_enum_variant)] // a test's channel message; size does not matter
enum Event {
    Done(Result<Received, SessionError>),
    Refused(SessionError),
}

/// A receiver serving one session on its own thread.
struct Serving {
    addr: SocketAddr,
    rx: mpsc::Receiver<Event>,
    /// Refusals `result()` passed over.
    skipped_refusals: std::cell::Cell<usize>,
}

fn serve(into: ReceiveInto) -> Serving {
    serve_with(cfg(), into)
}

fn serve_with(cfg: ReceiverConfig, into: ReceiveInto) -> Serving {
    serve_for(cfg, into, Duration::from_secs(5))
}

/// [`serve_with`], waiting up to `accept_timeout` for a session.
fn serve_for(cfg: ReceiverConfig, into: ReceiveInto, accept_timeout: Duration) -> Serving {
    let mut r = Receiver::bind("127.0.0.1:0".parse().unwrap(), cfg).expect("bind");
    r.set_accept_timeout(Some(accept_timeout));
    let addr = r.local_addr().expect("local_addr");
    let (tx, rx) = mpsc::channel();
    let refusals = r.watch_rejections();
    let tx2 = tx.clone();
    thread::spawn(move || {
        while let Ok(rej) = refusals.recv() {
            if tx2.send(Event::Refused(rej.error)).is_err() {
                break;
            }
        }
    });
    thread::Builder::new()
        .name("receiver".into())
        .spawn(move || {
            let _ = tx.send(Event::Done(r.serve(into)));
        })
        .expect("spawn receiver");
    Serving {
        addr,
        rx,
        skipped_refusals: std::cell::Cell::new(0),
    }
}

impl Serving {
    /// What `serve` returned; fails the test if the receiver hung or panicked.
    fn result(&self) -> Result<Received, SessionError> {
        loop {
            match self.event() {
                Event::Done(r) => return r,
                Event::Refused(_) => self.skipped_refusals.set(self.skipped_refusals.get() + 1),
            }
        }
    }

    fn event(&self) -> Event {
        match self.rx.recv_timeout(HANG_LIMIT) {
            Ok(e) => e,
            Err(RecvTimeoutError::Timeout) => {
                panic!("receiver hung: nothing happened within {HANG_LIMIT:?}")
            }
            Err(RecvTimeoutError::Disconnected) => panic!("receiver thread panicked"),
        }
    }

    /// The first error: `serve` failing, or a connection refused before any session;
    /// fails the test if the receiver accepted the stream.
    fn error(&self) -> SessionError {
        match self.event() {
            Event::Done(Ok(_)) => panic!("receiver accepted a hostile stream"),
            Event::Done(Err(e)) | Event::Refused(e) => e,
        }
    }

    /// The connection was refused without ending the session: `serve` has not returned.
    fn refused(&self) -> SessionError {
        match self.event() {
            Event::Refused(e) => e,
            Event::Done(r) => {
                panic!("expected a refused connection and a receiver still serving, got {r:?}")
            }
        }
    }
}

fn hello(compression: Compression, channels: u16, block_size: u64) -> Hello {
    Hello {
        uuid: UUID,
        page_size: PS,
        pages_per_packet: PPP,
        compression,
        channels,
        blocks: vec![BlockSpec {
            name: BLOCK.into(),
            size: block_size,
        }],
        auth: None,
        // Hand-built streams start with data, as recordings from before the opening SYNC do.
        opening_sync: false,
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(HANG_LIMIT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// A control connection that has sent its preamble (nothing read yet).
fn connect_control(addr: SocketAddr) -> TcpStream {
    let mut c = connect(addr);
    write_preamble(&mut c).expect("preamble");
    c
}

/// Connect the control connection, take the receiver's challenge (no secret configured) and
/// send `hello`, without reading the answer.
fn send_hello(addr: SocketAddr, h: &Hello) -> TcpStream {
    let mut c = connect_control(addr);
    match read_message(&mut c) {
        Ok(Message::Challenge {
            secret_required: false,
            ..
        }) => {}
        other => panic!("expected a challenge without secret, got {other:?}"),
    }
    write_message(&mut c, &Message::Hello(h.clone())).expect("send hello");
    c
}

/// Control connection through a successful hello.
fn handshake(addr: SocketAddr, h: &Hello) -> TcpStream {
    let mut c = send_hello(addr, h);
    match read_message(&mut c) {
        Ok(Message::HelloOk { proof: None, .. }) => c,
        other => panic!("expected hello-ok, got {other:?}"),
    }
}

/// A channel connection that has sent its init packet.
fn open_channel(addr: SocketAddr, uuid: [u8; 16], channel_id: u8) -> TcpStream {
    let mut s = connect(addr);
    s.write_all(&InitPacket { uuid, channel_id }.encode())
        .expect("send init packet");
    s
}

/// A fake sender through the handshake, with its channels connected.
struct Fake {
    control: TcpStream,
    chans: Vec<TcpStream>,
}

fn session(srv: &Serving, compression: Compression, channels: u16) -> Fake {
    let control = handshake(srv.addr, &hello(compression, channels, BLOCK_SIZE));
    let chans = (0..channels)
        .map(|id| open_channel(srv.addr, UUID, id as u8))
        .collect();
    Fake { control, chans }
}

impl Fake {
    /// Write bytes on channel `ch`. Errors are ignored: the receiver may legitimately have
    /// rejected the stream and closed the connection already.
    fn send(&mut self, ch: usize, bytes: &[u8]) {
        let _ = self.chans[ch].write_all(bytes);
    }
    /// Close channel `ch` (the peer sees EOF).
    fn close(&mut self, ch: usize) {
        let s = self.chans.remove(ch);
        drop(s);
    }
    /// End round 1 as a sender does: `round-end`, expect `round-done`, close the channels,
    /// then `end`, expect `end-ok`.
    fn end_after_one_round(&mut self) {
        write_message(&mut self.control, &Message::RoundEnd { round: 1 }).unwrap();
        assert_eq!(
            read_message(&mut self.control).unwrap(),
            Message::RoundDone { round: 1 }
        );
        self.chans.clear();
        write_message(&mut self.control, &Message::End).unwrap();
        assert_eq!(read_message(&mut self.control).unwrap(), Message::EndOk);
    }
}

/// The sender learns the failure on the control connection: a `Message::Error` whose text is
/// the receiver's error.
fn expect_error_on_control(control: &mut TcpStream, needle: &str) {
    let mut msg = read_message(control);
    // The receiver's challenge opens every control connection; a test that never read it
    // finds it first.
    if let Ok(Message::Challenge { .. }) = msg {
        msg = read_message(control);
    }
    match msg {
        Ok(Message::Error { message }) => assert!(
            message.contains(needle),
            "control error {message:?} does not contain {needle:?}"
        ),
        other => panic!("expected an error message on control, got {other:?}"),
    }
}

/// A page of text (compresses well) that differs per `seed`.
fn text_page(seed: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(PSU);
    let mut i = 0u32;
    while p.len() < PSU {
        p.extend_from_slice(format!("page {seed} line {i}: the quick brown fox\n").as_bytes());
        i += 1;
    }
    p.truncate(PSU);
    p
}

/// A page of pseudo-random bytes (sent raw).
fn noise_page(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..PSU)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Raw DEFLATE of `data` (must fit in `page_size - 1` bytes).
fn deflate(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; PSU - 1];
    let n = DeflateCompressor::default()
        .compress(data, &mut out)
        .expect("test data compresses");
    out.truncate(n);
    out
}

/// One page of a hand-built packet.
enum Page {
    /// Raw page (zlen == page size in the qpl framing).
    Raw(u64, Vec<u8>),
    /// Compressed bytes (raw DEFLATE, or garbage) with the zlen they claim.
    Deflate(u64, Vec<u8>),
    /// Zero page (no payload).
    Zero(u64),
}

/// A packet as three byte strings, so tests can corrupt or cut any part.
struct Packet {
    header: Vec<u8>,
    zlens: Vec<u8>,
    payload: Vec<u8>,
}

impl Packet {
    fn bytes(&self) -> Vec<u8> {
        [&self.header[..], &self.zlens, &self.payload].concat()
    }
    fn set_u32(&mut self, at: usize, v: u32) {
        self.header[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }
    fn set_u64(&mut self, at: usize, v: u64) {
        self.header[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }
    fn get_u32(&self, at: usize) -> u32 {
        u32::from_be_bytes(self.header[at..at + 4].try_into().unwrap())
    }
}

/// A valid packet of `BLOCK` in the given framing: normal pages first (in the order given),
/// then zero pages.
fn packet(compression: Compression, packet_num: u64, pages: &[Page]) -> Packet {
    let mut offsets = Vec::new();
    let mut zlens = Vec::new();
    let mut payload = Vec::new();
    for p in pages {
        match p {
            Page::Raw(off, data) => {
                assert_eq!(data.len(), PSU);
                offsets.push(*off);
                zlens.push(PS);
                payload.extend_from_slice(data);
            }
            Page::Deflate(off, z) => {
                assert_eq!(compression, Compression::Qpl);
                offsets.push(*off);
                zlens.push(z.len() as u32);
                payload.extend_from_slice(z);
            }
            Page::Zero(_) => {}
        }
    }
    let normal = offsets.len() as u32;
    let mut zero = 0;
    for p in pages {
        if let Page::Zero(off) = p {
            offsets.push(*off);
            zero += 1;
        }
    }
    let zlen_bytes = if compression == Compression::Qpl {
        let mut b = vec![0u8; 4 * zlens.len()];
        encode_zlens(&mut b, &zlens);
        b
    } else {
        Vec::new()
    };
    let fields = HeaderFields {
        flags: compression.flag(),
        pages_alloc: PPP,
        normal_pages: normal,
        next_packet_size: (zlen_bytes.len() + payload.len()) as u32,
        packet_num,
        zero_pages: zero,
    };
    let mut header = vec![0u8; header_len(PPP)];
    encode_header(&mut header, &fields, BLOCK, &offsets);
    Packet {
        header,
        zlens: zlen_bytes,
        payload,
    }
}

/// A SYNC packet as pagewire's sender writes it.
fn sync_packet(packet_num: u64) -> Vec<u8> {
    let mut header = vec![0u8; header_len(PPP)];
    let fields = HeaderFields {
        flags: FLAG_SYNC,
        pages_alloc: PPP,
        packet_num,
        ..HeaderFields::default()
    };
    encode_header(&mut header, &fields, "", &[]);
    header
}

/// A typical qpl packet: a raw page, a compressed page and a zero page.
fn qpl_packet(packet_num: u64) -> Packet {
    packet(
        Compression::Qpl,
        packet_num,
        &[
            Page::Raw(0x3000, noise_page(packet_num)),
            Page::Deflate(0x1000, deflate(&text_page(packet_num as u32))),
            Page::Zero(0x5000),
        ],
    )
}

fn channel_error(e: &SessionError) -> &ChannelError {
    match e {
        SessionError::Channel(c) => c,
        other => panic!("expected a channel error, got {other:?} ({other})"),
    }
}

/// The error is `channel <channel>, <place>: field <field>: ...` from header/length-array
/// validation, and its text names channel, packet and field.
fn assert_wire(e: &SessionError, channel: u16, place: Place, field: Field) {
    let c = channel_error(e);
    assert_eq!(c.channel, channel, "wrong channel in: {e}");
    assert_eq!(c.place, place, "wrong place in: {e}");
    match &c.kind {
        ChannelErrorKind::Wire(WireError::Invalid { field: f, .. }) => {
            assert_eq!(*f, field, "wrong field in: {e}")
        }
        other => panic!("expected a wire error on field {field}, got {other:?} ({e})"),
    }
    let text = e.to_string();
    assert!(text.contains(&format!("channel {channel}")), "{text}");
    if let Place::Packet { packet_num, .. } = place {
        assert!(text.contains(&format!("packet_num {packet_num}")), "{text}");
    }
    assert!(text.contains(&format!("field {field}")), "{text}");
}

/// `ClosedMid { what, got, need }` at `place` on `channel`.
fn assert_closed_mid(
    e: &SessionError,
    channel: u16,
    place: Place,
    what: &str,
    got: usize,
    need: usize,
) {
    let c = channel_error(e);
    assert_eq!((c.channel, c.place), (channel, place), "{e}");
    match &c.kind {
        ChannelErrorKind::ClosedMid {
            what: w,
            got: g,
            need: n,
        } => assert_eq!((*w, *g, *n), (what, got, need), "{e}"),
        other => panic!("expected closed mid-{what}, got {other:?} ({e})"),
    }
    assert!(e.to_string().contains(&format!("mid-{what}")), "{e}");
}

/// Guest memory with one block `BLOCK` of `pages` pages, every byte `PATTERN`.
fn patterned_memory(pages: u64) -> Arc<GuestRam> {
    let block = Block::anonymous(BLOCK, (pages * PS as u64) as usize).unwrap();
    // SAFETY: the block was just created and nothing else references it yet.
    unsafe { block.as_mut_slice() }.fill(PATTERN);
    Arc::new(GuestRam::new(vec![block]).unwrap())
}

fn assert_untouched(mem: &GuestRam) {
    let bytes = mem.block(0).unwrap().to_vec();
    if let Some(i) = bytes.iter().position(|&b| b != PATTERN) {
        panic!(
            "guest memory written by a rejected packet: byte {i:#x} (page {}) is {:#04x}",
            i / PSU,
            bytes[i]
        );
    }
}

/// Run one hostile packet (after an optional valid prefix) through a 1-channel qpl session
/// and return the error; also checks the sender is told on the control connection.
fn reject_qpl_bytes(bytes: &[u8]) -> SessionError {
    let srv = serve(ReceiveInto::Allocate);
    let mut f = session(&srv, Compression::Qpl, 1);
    f.send(0, bytes);
    let e = srv.error();
    expect_error_on_control(&mut f.control, &e.to_string());
    e
}

// ---------------------------------------------------------------------------------------------
// Positive control.
// ---------------------------------------------------------------------------------------------

#[test]
fn valid_hand_built_stream_is_accepted() {
    let mem = patterned_memory(BLOCK_PAGES);
    let srv = serve(ReceiveInto::Memory(mem.clone()));
    let mut f = session(&srv, Compression::Qpl, 1);

    let raw0 = noise_page(1);
    let text0 = text_page(2);
    let raw1 = noise_page(3);
    let text1 = text_page(4);
    let p0 = packet(
        Compression::Qpl,
        0,
        &[
            Page::Raw(0x3000, raw0.clone()),
            Page::Deflate(0x1000, deflate(&text0)),
            Page::Zero(0x5000),
        ],
    );
    // Offsets unsorted, compressed page first, as QEMU may send them.
    let p1 = packet(
        Compression::Qpl,
        1,
        &[
            Page::Deflate(0x8000, deflate(&text1)),
            Page::Raw(0x2000, raw1.clone()),
            Page::Zero(0x9000),
        ],
    );
    f.send(0, &p0.bytes());
    f.send(0, &p1.bytes());
    f.send(0, &sync_packet(2));
    // The sender closes its channels, then says End.
    f.end_after_one_round();

    let got = srv.result().expect("a valid stream is accepted");
    assert!(Arc::ptr_eq(&got.memory, &mem));
    assert_eq!(got.uuid, UUID);
    assert_eq!(got.stats.rounds, 1);
    assert_eq!(got.stats.total.pages_normal, 4);
    assert_eq!(got.stats.total.pages_zero, 2);
    assert_eq!(got.stats.total.pages_raw, 2);
    assert_eq!(got.stats.total.pages_compressed, 2);
    assert_eq!(got.stats.total.sync_packets, 1);

    let bytes = mem.block(0).unwrap().to_vec();
    let zero = vec![0u8; PSU];
    for page in 0..BLOCK_PAGES as usize {
        let got = &bytes[page * PSU..(page + 1) * PSU];
        let want: &[u8] = match page * PSU {
            0x3000 => &raw0,
            0x1000 => &text0,
            0x5000 | 0x9000 => &zero,
            0x8000 => &text1,
            0x2000 => &raw1,
            _ => {
                assert!(got.iter().all(|&b| b == PATTERN), "page {page} was written");
                continue;
            }
        };
        assert!(got == want, "page {page} differs from what was sent");
    }
}

// ---------------------------------------------------------------------------------------------
// Peer closes mid-packet.
// ---------------------------------------------------------------------------------------------

#[test]
fn peer_closes_mid_header() {
    let srv = serve(ReceiveInto::Allocate);
    let mut f = session(&srv, Compression::Qpl, 1);
    let p = qpl_packet(5);
    f.send(0, &p.header[..100]);
    f.close(0);
    let e = srv.error();
    assert_closed_mid(
        &e,
        0,
        Place::Header { index: 0 },
        "header",
        100,
        header_len(PPP),
    );
    expect_error_on_control(&mut f.control, "mid-header");
}

#[test]
fn peer_closes_mid_length_array() {
    let srv = serve(ReceiveInto::Allocate);
    let mut f = session(&srv, Compression::Qpl, 1);
    let p = qpl_packet(5);
    f.send(0, &p.header);
    f.send(0, &p.zlens[..4]);
    f.close(0);
    let e = srv.error();
    assert_closed_mid(&e, 0, PLACE5, "length array", 4, 8);
    expect_error_on_control(&mut f.control, "mid-length array");
}

#[test]
fn peer_closes_mid_payload() {
    let srv = serve(ReceiveInto::Allocate);
    let mut f = session(&srv, Compression::Qpl, 1);
    // A valid packet first, so the failing one is packet #1 on this channel.
    f.send(0, &qpl_packet(4).bytes());
    let p = qpl_packet(5);
    f.send(0, &p.header);
    f.send(0, &p.zlens);
    f.send(0, &p.payload[..1000]);
    f.close(0);
    let e = srv.error();
    let place = Place::Packet {
        index: 1,
        packet_num: 5,
    };
    assert_closed_mid(&e, 0, place, "payload", 1000, p.payload.len());
    expect_error_on_control(&mut f.control, "mid-payload");
}

#[test]
fn peer_closes_between_packets_with_round_open() {
    let srv = serve(ReceiveInto::Allocate);
    let mut f = session(&srv, Compression::Qpl, 1);
    f.send(0, &qpl_packet(4).bytes());
    f.close(0);
    let e = srv.error();
    let c = channel_error(&e);
    assert_eq!(
        (c.channel, c.place),
        (0, Place::Between { index: 1 }),
        "{e}"
    );
    assert!(
        matches!(c.kind, ChannelErrorKind::OpenRound { packets: 1 }),
        "{e}"
    );
    expect_error_on_control(&mut f.control, "after its last SYNC");
}

#[test]
fn end_with_round_open_is_refused() {
    // Pages without a SYNC, channels closed, then End: never EndOk.
    let srv = serve(ReceiveInto::Allocate);
    let mut f = session(&srv, Compression::Qpl, 2);
    f.send(0, &sync_packet(0));
    f.send(1, &qpl_packet(1).bytes());
    f.chans.clear();
    write_message(&mut f.control, &Message::End).unwrap();
    let e = srv.error();
    let c = channel_error(&e);
    assert_eq!(c.channel, 1, "{e}");
    assert!(
        matches!(c.kind, ChannelErrorKind::OpenRound { packets: 1 }),
        "{e}"
    );
    expect_error_on_control(&mut f.control, "round not ended");
}

#[test]
fn channels_closed_but_no_end_times_out() {
    let srv = serve(ReceiveInto::Allocate);
    let mut f = session(&srv, Compression::Qpl, 1);
    f.send(0, &sync_packet(0));
    write_message(&mut f.control, &Message::RoundEnd { round: 1 }).unwrap();
    assert_eq!(
        read_message(&mut f.control).unwrap(),
        Message::RoundDone { round: 1 }
    );
    let t = Instant::now();
    f.chans.clear();
    let e = srv.error();
    assert!(
        t.elapsed() < IDLE + Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    assert!(matches!(e, SessionError::Timeout(_)), "{e:?}");
    assert!(e.to_string().contains("no end"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Payload content.
// ---------------------------------------------------------------------------------------------

fn assert_codec(e: &SessionError, place: Place, page: usize, offset: u64) -> CodecError {
    let c = channel_error(e);
    assert_eq!((c.channel, c.place), (0, place), "{e}");
    match &c.kind {
        ChannelErrorKind::Codec {
            page: p,
            offset: o,
            source,
        } => {
            assert_eq!((*p, *o), (page, offset), "{e}");
            let text = e.to_string();
            assert!(
                text.contains("channel 0") && text.contains(&format!("page {page}")),
                "{text}"
            );
            source.clone()
        }
        other => panic!("expected a codec error, got {other:?} ({e})"),
    }
}

#[test]
fn corrupt_deflate_payload() {
    // 0xFF: BFINAL=1, BTYPE=11 (reserved) — never valid DEFLATE.
    let p = packet(
        Compression::Qpl,
        5,
        &[
            Page::Raw(0x3000, noise_page(1)),
            Page::Deflate(0x1000, vec![0xFF; 100]),
        ],
    );
    let e = reject_qpl_bytes(&p.bytes());
    let src = assert_codec(&e, PLACE5, 1, 0x1000);
    assert!(matches!(src, CodecError::Corrupt(_)), "{src:?}");
}

#[test]
fn deflate_inflating_to_less_than_a_page() {
    let half = &text_page(9)[..PSU / 2];
    let p = packet(Compression::Qpl, 5, &[Page::Deflate(0x1000, deflate(half))]);
    let e = reject_qpl_bytes(&p.bytes());
    let src = assert_codec(&e, PLACE5, 0, 0x1000);
    assert_eq!(
        src,
        CodecError::WrongOutputSize {
            got: PSU / 2,
            expected: PSU
        }
    );
}

#[test]
fn deflate_inflating_to_more_than_a_page() {
    let mut two = text_page(9);
    two.extend_from_slice(&text_page(10));
    let p = packet(Compression::Qpl, 5, &[Page::Deflate(0x1000, deflate(&two))]);
    let e = reject_qpl_bytes(&p.bytes());
    let src = assert_codec(&e, PLACE5, 0, 0x1000);
    assert!(
        matches!(src, CodecError::WrongOutputSize { expected, .. } if expected == PSU),
        "{src:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Length array.
// ---------------------------------------------------------------------------------------------

/// `qpl_packet(5)` (zlens: page 0 raw, page 1 compressed) with zlen `i` replaced and the
/// header left as it was.
fn with_zlen(i: usize, zlen: u32) -> Packet {
    let mut p = qpl_packet(5);
    p.zlens[4 * i..4 * i + 4].copy_from_slice(&zlen.to_be_bytes());
    p
}

#[test]
fn zlen_zero() {
    let p = with_zlen(1, 0);
    let e = reject_qpl_bytes(&p.bytes());
    assert_wire(&e, 0, PLACE5, Field::Zlen);
    assert!(e.to_string().contains("page 1: 0"), "{e}");
}

#[test]
fn zlen_larger_than_page() {
    let p = with_zlen(0, PS + 1);
    let e = reject_qpl_bytes(&p.bytes());
    assert_wire(&e, 0, PLACE5, Field::Zlen);
    assert!(
        e.to_string().contains(&format!("page 0: {}", PS + 1)),
        "{e}"
    );
}

#[test]
fn next_packet_size_disagrees_with_zlens() {
    // Within the header's bounds (4n..=4n + n*page), but not 4n + sum(zlen).
    let mut p = qpl_packet(5);
    let npsize = p.get_u32(OFF_NEXT_PACKET_SIZE);
    p.set_u32(OFF_NEXT_PACKET_SIZE, npsize + 1);
    let e = reject_qpl_bytes(&p.bytes());
    assert_wire(&e, 0, PLACE5, Field::NextPacketSize);
    assert!(e.to_string().contains("sum of zlen"), "{e}");
}

#[test]
fn next_packet_size_out_of_header_bounds() {
    let mut p = qpl_packet(5);
    // 2 normal pages: at most 8 + 2 * 4096.
    p.set_u32(OFF_NEXT_PACKET_SIZE, 8 + 2 * PS + 1);
    let e = reject_qpl_bytes(&p.bytes());
    assert_wire(&e, 0, PLACE5, Field::NextPacketSize);
}

// ---------------------------------------------------------------------------------------------
// Offsets and block names.
// ---------------------------------------------------------------------------------------------

#[test]
fn offset_unaligned_on_second_channel() {
    // Channel 1 of 2, after one valid packet there: the error names channel 1, packet #1.
    let srv = serve(ReceiveInto::Allocate);
    let mut f = session(&srv, Compression::Qpl, 2);
    f.send(1, &qpl_packet(6).bytes());
    let mut p = qpl_packet(7);
    p.set_u64(OFF_OFFSETS + 8, 0x1000 + 512); // page 1 (normal)
    f.send(1, &p.bytes());
    let e = srv.error();
    let place = Place::Packet {
        index: 1,
        packet_num: 7,
    };
    assert_wire(&e, 1, place, Field::Offset);
    assert!(e.to_string().contains("page 1 (normal)"), "{e}");
    expect_error_on_control(&mut f.control, "field offset");
}

#[test]
fn offset_past_block_end() {
    let mut p = qpl_packet(5);
    p.set_u64(OFF_OFFSETS + 16, BLOCK_SIZE); // page 2 (the zero page), one past the end
    let e = reject_qpl_bytes(&p.bytes());
    assert_wire(&e, 0, PLACE5, Field::Offset);
    assert!(e.to_string().contains("page 2 (zero)"), "{e}");
    assert!(e.to_string().contains("past the end"), "{e}");
}

#[test]
fn offset_overflowing_u64() {
    let mut p = qpl_packet(5);
    p.set_u64(OFF_OFFSETS, u64::MAX - (PS as u64 - 1)); // page-aligned, + page_size overflows
    let e = reject_qpl_bytes(&p.bytes());
    assert_wire(&e, 0, PLACE5, Field::Offset);
}

#[test]
fn unknown_block_name() {
    let mut p = qpl_packet(5);
    p.header[OFF_BLOCK_NAME..OFF_BLOCK_NAME + 7].copy_from_slice(b"pc.rom\0");
    let e = reject_qpl_bytes(&p.bytes());
    assert_wire(&e, 0, PLACE5, Field::BlockName);
    assert!(e.to_string().contains("pc.rom"), "{e}");
}

#[test]
fn block_name_not_nul_terminated() {
    let mut p = qpl_packet(5);
    p.header[OFF_BLOCK_NAME..OFF_BLOCK_NAME + 256].fill(b'A');
    let e = reject_qpl_bytes(&p.bytes());
    assert_wire(&e, 0, PLACE5, Field::BlockName);
    assert!(e.to_string().contains("NUL"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Header fields.
// ---------------------------------------------------------------------------------------------

/// `qpl_packet(5)` with one header u32 replaced, sent in full; returns the error.
fn reject_header_u32(at: usize, value: u32) -> SessionError {
    let mut p = qpl_packet(5);
    p.set_u32(at, value);
    reject_qpl_bytes(&p.bytes())
}

#[test]
fn wrong_magic() {
    let e = reject_header_u32(OFF_MAGIC, 0x4433_2211);
    assert_wire(&e, 0, PLACE5, Field::Magic);
}

#[test]
fn wrong_version() {
    let e = reject_header_u32(OFF_VERSION, 2);
    assert_wire(&e, 0, PLACE5, Field::Version);
}

#[test]
fn unknown_flag_bit() {
    let e = reject_header_u32(OFF_FLAGS, Compression::Qpl.flag() | 0x80);
    assert_wire(&e, 0, PLACE5, Field::Flags);
    assert!(e.to_string().contains("unknown bits"), "{e}");
}

#[test]
fn device_state_flag() {
    let e = reject_header_u32(OFF_FLAGS, Compression::Qpl.flag() | 0x40);
    assert_wire(&e, 0, PLACE5, Field::Flags);
    assert!(e.to_string().contains("device state"), "{e}");
}

#[test]
fn two_compression_bits() {
    let e = reject_header_u32(OFF_FLAGS, 0x08 | 0x04);
    assert_wire(&e, 0, PLACE5, Field::Flags);
}

#[test]
fn compression_flag_mismatch() {
    // Session qpl, packet says none (and is a consistent none packet of 2 raw pages).
    let p = packet(
        Compression::None,
        5,
        &[
            Page::Raw(0x3000, noise_page(1)),
            Page::Raw(0x4000, noise_page(2)),
        ],
    );
    let e = reject_qpl_bytes(&p.bytes());
    assert_wire(&e, 0, PLACE5, Field::Flags);
    assert!(e.to_string().contains("session uses qpl"), "{e}");
}

#[test]
fn compression_flag_mismatch_none_session() {
    // Session none, packet qpl.
    let srv = serve(ReceiveInto::Allocate);
    let mut f = session(&srv, Compression::None, 1);
    f.send(0, &qpl_packet(5).bytes());
    let e = srv.error();
    assert_wire(&e, 0, PLACE5, Field::Flags);
    assert!(e.to_string().contains("session uses none"), "{e}");
}

#[test]
fn sync_with_pages() {
    let mut p = qpl_packet(5);
    let flags = p.get_u32(OFF_FLAGS);
    p.set_u32(OFF_FLAGS, flags | FLAG_SYNC);
    let e = reject_qpl_bytes(&p.bytes());
    assert_wire(&e, 0, PLACE5, Field::Flags);
    assert!(e.to_string().contains("SYNC"), "{e}");
}

#[test]
fn sync_with_payload() {
    let mut h = sync_packet(5);
    h[OFF_NEXT_PACKET_SIZE..OFF_NEXT_PACKET_SIZE + 4].copy_from_slice(&16u32.to_be_bytes());
    let e = reject_qpl_bytes(&h);
    assert_wire(&e, 0, PLACE5, Field::NextPacketSize);
}

#[test]
fn normal_plus_zero_exceeds_pages_alloc() {
    // 2 normal + 7 zero = 9 > 8.
    let e = reject_header_u32(OFF_ZERO_PAGES, PPP - 1);
    assert_wire(&e, 0, PLACE5, Field::ZeroPages);
}

#[test]
fn normal_plus_zero_overflowing_u32() {
    // 2 + 0xFFFF_FFFF would wrap to 1 in u32.
    let e = reject_header_u32(OFF_ZERO_PAGES, u32::MAX);
    assert_wire(&e, 0, PLACE5, Field::ZeroPages);
}

#[test]
fn normal_pages_exceeds_pages_alloc() {
    let e = reject_header_u32(OFF_NORMAL_PAGES, PPP + 1);
    assert_wire(&e, 0, PLACE5, Field::NormalPages);
}

#[test]
fn pages_alloc_mismatch() {
    let e = reject_header_u32(OFF_PAGES_ALLOC, PPP * 2);
    assert_wire(&e, 0, PLACE5, Field::PagesAlloc);
}

#[test]
fn pages_alloc_huge() {
    let e = reject_header_u32(OFF_PAGES_ALLOC, u32::MAX);
    assert_wire(&e, 0, PLACE5, Field::PagesAlloc);
}

// ---------------------------------------------------------------------------------------------
// Channel init packets.
// ---------------------------------------------------------------------------------------------

fn assert_init(e: &SessionError, field: Field) {
    match e {
        SessionError::Init {
            source: WireError::Invalid { field: f, .. },
            ..
        } => assert_eq!(*f, field, "{e}"),
        other => panic!("expected an init packet error on {field}, got {other:?} ({other})"),
    }
    assert!(e.to_string().contains(&format!("field {field}")), "{e}");
}

#[test]
fn init_wrong_uuid() {
    let srv = serve(ReceiveInto::Allocate);
    let mut control = handshake(srv.addr, &hello(Compression::Qpl, 1, BLOCK_SIZE));
    let mut other = UUID;
    other[0] ^= 1;
    let _ch = open_channel(srv.addr, other, 0);
    // A connection of another session (stale or stray): refused, the session goes on.
    let e = srv.refused();
    assert_init(&e, Field::Uuid);
    session_survives(&srv, &mut control);
}

#[test]
fn init_channel_id_equals_channels() {
    let srv = serve(ReceiveInto::Allocate);
    let mut control = handshake(srv.addr, &hello(Compression::Qpl, 2, BLOCK_SIZE));
    let _c0 = open_channel(srv.addr, UUID, 0);
    let _c2 = open_channel(srv.addr, UUID, 2);
    let e = srv.error();
    assert_init(&e, Field::ChannelId);
    expect_error_on_control(&mut control, "field channel_id");
}

#[test]
fn init_duplicate_channel_id() {
    let srv = serve(ReceiveInto::Allocate);
    let mut control = handshake(srv.addr, &hello(Compression::Qpl, 2, BLOCK_SIZE));
    let _a = open_channel(srv.addr, UUID, 0);
    // Let the first connection be accepted first (accept order = connection order anyway).
    thread::sleep(Duration::from_millis(50));
    let _b = open_channel(srv.addr, UUID, 0);
    let e = srv.error();
    // The engine checks duplicates (docs/wire-format.md §2.1 rule 6, field channel_id).
    assert_init(&e, Field::ChannelId);
    assert!(e.to_string().contains("channel 0 connected twice"), "{e}");
    expect_error_on_control(&mut control, "connected twice");
}

#[test]
fn init_bad_magic() {
    let srv = serve(ReceiveInto::Allocate);
    let mut control = handshake(srv.addr, &hello(Compression::Qpl, 1, BLOCK_SIZE));
    let mut ch = connect(srv.addr);
    let mut init = InitPacket {
        uuid: UUID,
        channel_id: 0,
    }
    .encode();
    init[0] ^= 0xFF;
    ch.write_all(&init).unwrap();
    // A stranger's connection: refused and logged, the session goes on.
    let e = srv.refused();
    assert_init(&e, Field::Magic);
    session_survives(&srv, &mut control);
}

/// After a stranger was refused, the real sender's channel still joins and a round completes.
fn session_survives(srv: &Serving, control: &mut TcpStream) {
    let mut ch = open_channel(srv.addr, UUID, 0);
    ch.write_all(&sync_packet(0)).unwrap();
    write_message(control, &Message::RoundEnd { round: 1 }).unwrap();
    assert_eq!(
        read_message(control).unwrap(),
        Message::RoundDone { round: 1 }
    );
    drop(ch);
    write_message(control, &Message::End).unwrap();
    assert_eq!(read_message(control).unwrap(), Message::EndOk);
    assert_eq!(srv.result().expect("the session completes").stats.rounds, 1);
}

#[test]
fn init_short_then_silent() {
    // Half an init packet, then nothing: bounded by the idle timeout.
    let srv = serve(ReceiveInto::Allocate);
    let mut control = handshake(srv.addr, &hello(Compression::Qpl, 1, BLOCK_SIZE));
    let mut ch = connect(srv.addr);
    let init = InitPacket {
        uuid: UUID,
        channel_id: 0,
    }
    .encode();
    let t = Instant::now();
    ch.write_all(&init[..32]).unwrap();
    // The silent connection's handshake times out on its own thread (refused, logged), and
    // since no channel ever joined, the session fails too, saying so; in either order.
    let (mut refusal, mut ended) = (None, None);
    while refusal.is_none() || ended.is_none() {
        match srv.event() {
            Event::Refused(e) => refusal = Some(e),
            Event::Done(r) => ended = Some(r),
        }
    }
    let took = t.elapsed();
    assert!(took < IDLE + Duration::from_secs(2), "took {took:?}");
    // Its own deadline, or the session's end (the same idle timeout, counted from the hello)
    // closing it first: either way it names what it waited for.
    match refusal {
        Some(e @ SessionError::HandshakeTimeout { .. }) => {
            assert!(e.to_string().contains("waiting for its init packet"), "{e}")
        }
        Some(e @ SessionError::Handshake(_)) => {
            let t = e.to_string();
            assert!(
                t.contains("stopped serving") && t.contains("its init packet"),
                "{t}"
            )
        }
        other => panic!("expected a handshake timeout, got {other:?}"),
    }
    match ended {
        Some(Err(e)) => assert!(matches!(e, SessionError::Timeout(_)), "{e:?}"),
        other => panic!("expected the session to time out, got {other:?}"),
    }
    expect_error_on_control(&mut control, "only 0 of 1 channels");
}

// ---------------------------------------------------------------------------------------------
// Hello.
// ---------------------------------------------------------------------------------------------

#[test]
fn hello_with_zlib_compression() {
    let srv = serve(ReceiveInto::Allocate);
    let mut control = send_hello(srv.addr, &hello(Compression::Zlib, 1, BLOCK_SIZE));
    let e = srv.error();
    // Rejected while decoding the hello (docs/wire-format.md §3.3: `hello: field compression`),
    // before the receiver's own compression check.
    match &e {
        SessionError::Control(ControlError::Invalid { msg, field, .. }) => {
            assert_eq!((*msg, *field), ("hello", "compression"), "{e}")
        }
        other => panic!("expected a hello error on compression, got {other:?} ({other})"),
    }
    expect_error_on_control(&mut control, "hello: field compression");
}

#[test]
fn hello_memory_layout_mismatch() {
    let mem = patterned_memory(BLOCK_PAGES);
    let srv = serve(ReceiveInto::Memory(mem.clone()));
    let mut control = send_hello(srv.addr, &hello(Compression::Qpl, 1, BLOCK_SIZE / 2));
    let e = srv.error();
    let want = format!(
        "block '{BLOCK}' is {} bytes on the sender but {BLOCK_SIZE} here",
        BLOCK_SIZE / 2
    );
    match &e {
        SessionError::Handshake(msg) => assert_eq!(msg, &want, "{e}"),
        other => panic!("expected a handshake error, got {other:?} ({other})"),
    }
    expect_error_on_control(&mut control, &want);
    assert_untouched(&mem);
}

#[test]
fn hello_unknown_block_for_memory() {
    let mem = patterned_memory(BLOCK_PAGES);
    let srv = serve(ReceiveInto::Memory(mem.clone()));
    let mut h = hello(Compression::Qpl, 1, BLOCK_SIZE);
    h.blocks[0].name = "pc.bios".into();
    let mut control = send_hello(srv.addr, &h);
    let e = srv.error();
    match &e {
        SessionError::Handshake(msg) => assert!(msg.contains("'pc.bios' does not exist"), "{e}"),
        other => panic!("expected a handshake error, got {other:?} ({other})"),
    }
    expect_error_on_control(&mut control, "does not exist");
}

#[test]
fn hello_asking_for_too_much_memory() {
    let srv = serve_with(cfg().max_memory(BLOCK_SIZE), ReceiveInto::Allocate);
    let mut control = send_hello(srv.addr, &hello(Compression::Qpl, 1, 1 << 40));
    // 1 TiB is over 256 x max_memory: refused before anything is mapped.
    let e = srv.error();
    assert!(
        matches!(&e, SessionError::Handshake(m) if m.contains("the most this receiver maps")),
        "{e:?}"
    );
    expect_error_on_control(&mut control, "the most this receiver maps");
}

// ---------------------------------------------------------------------------------------------
// A stalled peer.
// ---------------------------------------------------------------------------------------------

#[test]
fn stalled_peer_times_out() {
    let srv = serve(ReceiveInto::Allocate);
    let mut f = session(&srv, Compression::Qpl, 1);
    let p = qpl_packet(5);
    let t = Instant::now();
    f.send(0, &p.header[..50]);
    let e = srv.error();
    let took = t.elapsed();
    assert!(
        took >= IDLE.mul_f32(0.9) && took < IDLE + Duration::from_secs(2),
        "idle timeout of {IDLE:?} took {took:?}"
    );
    let c = channel_error(&e);
    assert_eq!((c.channel, c.place), (0, Place::Header { index: 0 }), "{e}");
    assert!(
        matches!(c.kind, ChannelErrorKind::Idle { secs } if secs == IDLE.as_secs_f64()),
        "{e}"
    );
    expect_error_on_control(&mut f.control, "idle timeout");
}

#[test]
fn stalled_peer_mid_payload_times_out() {
    let srv = serve(ReceiveInto::Allocate);
    let mut f = session(&srv, Compression::Qpl, 1);
    let p = qpl_packet(5);
    let t = Instant::now();
    f.send(0, &p.header);
    f.send(0, &p.zlens);
    f.send(0, &p.payload[..10]);
    let e = srv.error();
    let took = t.elapsed();
    assert!(took < IDLE + Duration::from_secs(2), "took {took:?}");
    let c = channel_error(&e);
    assert_eq!((c.channel, c.place), (0, PLACE5), "{e}");
    assert!(matches!(c.kind, ChannelErrorKind::Idle { .. }), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Memory safety of rejection: nothing is written before validation.
// ---------------------------------------------------------------------------------------------

#[test]
fn rejected_header_leaves_memory_untouched() {
    let mem = patterned_memory(BLOCK_PAGES);
    let srv = serve(ReceiveInto::Memory(mem.clone()));
    let mut f = session(&srv, Compression::Qpl, 1);
    // Pages 0-2 are valid (raw 0x3000, compressed 0x1000, zero 0x5000); page 3 (a zero page)
    // is past the block end. If any payload byte were read before the whole header is
    // validated, page 0x3000 would change; if zero pages were applied early, page 0x5000.
    let mut p = packet(
        Compression::Qpl,
        5,
        &[
            Page::Raw(0x3000, noise_page(1)),
            Page::Deflate(0x1000, deflate(&text_page(2))),
            Page::Zero(0x5000),
            Page::Zero(0x6000),
        ],
    );
    p.set_u64(OFF_OFFSETS + 24, BLOCK_SIZE + 0x1000);
    f.send(0, &p.bytes());
    let e = srv.error();
    assert_wire(&e, 0, PLACE5, Field::Offset);
    assert_untouched(&mem);
}

#[test]
fn rejected_length_array_leaves_memory_untouched() {
    let mem = patterned_memory(BLOCK_PAGES);
    let srv = serve(ReceiveInto::Memory(mem.clone()));
    let mut f = session(&srv, Compression::Qpl, 1);
    // Raw page first, then a zlen of 0: the raw page's bytes must not land in memory.
    let mut p = qpl_packet(5);
    p.zlens[4..8].copy_from_slice(&0u32.to_be_bytes());
    f.send(0, &p.bytes());
    let e = srv.error();
    assert_wire(&e, 0, PLACE5, Field::Zlen);
    assert_untouched(&mem);
}

// ---------------------------------------------------------------------------------------------
// More positive control and control-connection misbehaviour.
// ---------------------------------------------------------------------------------------------

/// Packets far smaller than a full length array arrive back to back in one write, SYNC
/// included: the receiver's read-ahead (a header's read takes up to a length array more)
/// then holds the rest of a packet, the next packet's header and the SYNC, and every byte
/// still goes where its own packet says.
#[test]
fn small_qpl_packets_in_one_write_land_exactly() {
    let mem = patterned_memory(BLOCK_PAGES);
    let srv = serve(ReceiveInto::Memory(mem.clone()));
    let mut f = session(&srv, Compression::Qpl, 1);
    let mut want = Vec::new();
    let mut stream = Vec::new();
    for i in 0..12u64 {
        let page = text_page(40 + i as u32);
        let off = i * PS as u64;
        // Alternately compressed (a few hundred bytes) and raw, with a zero page now and then.
        let mut pages = vec![if i % 2 == 0 {
            Page::Deflate(off, deflate(&page))
        } else {
            Page::Raw(off, page.clone())
        }];
        if i % 3 == 0 {
            pages.push(Page::Zero(off + 32 * PS as u64));
        }
        stream.extend(packet(Compression::Qpl, i, &pages).bytes());
        want.push((off, page));
    }
    stream.extend(sync_packet(12));
    f.send(0, &stream);
    f.end_after_one_round();
    let got = srv.result().expect("a valid stream is accepted");
    assert_eq!(got.stats.total.packets, 12);
    assert_eq!(got.stats.total.sync_packets, 1);
    assert_eq!(got.stats.total.pages_compressed, 6);
    let bytes = mem.block(0).unwrap().to_vec();
    for (off, page) in &want {
        let o = *off as usize;
        assert!(bytes[o..o + PSU] == page[..], "page at {off:#x}");
    }
    for i in [0u64, 3, 6, 9] {
        let o = (i as usize + 32) * PSU;
        assert!(bytes[o..o + PSU].iter().all(|&x| x == 0), "zero page {i}");
    }
    for page in 12..32usize {
        let got = &bytes[page * PSU..(page + 1) * PSU];
        assert!(got.iter().all(|&x| x == PATTERN), "page {page} was written");
    }
}

#[test]
fn valid_none_stream_with_qemu_style_sync_is_accepted() {
    let mem = patterned_memory(BLOCK_PAGES);
    let srv = serve(ReceiveInto::Memory(mem.clone()));
    let mut f = session(&srv, Compression::None, 2);
    let a = noise_page(11);
    let b = text_page(12);
    f.send(
        0,
        &packet(
            Compression::None,
            0,
            &[Page::Raw(0x4000, a.clone()), Page::Zero(0x7000)],
        )
        .bytes(),
    );
    f.send(
        1,
        &packet(Compression::None, 1, &[Page::Raw(0x6000, b.clone())]).bytes(),
    );
    // QEMU >= 9.2's SYNC: everything but magic, version, flags and packet_num zero.
    for (ch, num) in [(0, 2u64), (1, 3)] {
        let mut h = vec![0u8; header_len(PPP)];
        h[0..4].copy_from_slice(&0x1122_3344u32.to_be_bytes());
        h[4..8].copy_from_slice(&1u32.to_be_bytes());
        h[8..12].copy_from_slice(&FLAG_SYNC.to_be_bytes());
        h[24..32].copy_from_slice(&num.to_be_bytes());
        f.send(ch, &h);
    }
    // The sender closes its channels, then says End.
    f.end_after_one_round();
    let got = srv.result().expect("a valid stream is accepted");
    assert_eq!(got.stats.rounds, 1);
    assert_eq!(got.stats.total.sync_packets, 2);
    let bytes = mem.block(0).unwrap().to_vec();
    for page in 0..BLOCK_PAGES as usize {
        let got = &bytes[page * PSU..(page + 1) * PSU];
        match page * PSU {
            0x4000 => assert!(got == &a[..], "page {page}"),
            0x6000 => assert!(got == &b[..], "page {page}"),
            0x7000 => assert!(got.iter().all(|&x| x == 0), "page {page}"),
            _ => assert!(got.iter().all(|&x| x == PATTERN), "page {page} was written"),
        }
    }
}

/// A sender that announces the opening SYNC (FEATURE_OPENING_SYNC) opens each channel with a
/// SYNC, as QEMU does at setup: that SYNC ends no round.
#[test]
fn opening_sync_ends_no_round() {
    let mem = patterned_memory(BLOCK_PAGES);
    let srv = serve(ReceiveInto::Memory(mem.clone()));
    let h = Hello {
        opening_sync: true,
        ..hello(Compression::None, 1, BLOCK_SIZE)
    };
    let mut control = handshake(srv.addr, &h);
    let mut ch = open_channel(srv.addr, UUID, 0);
    let a = noise_page(21);
    ch.write_all(&sync_packet(0)).unwrap();
    ch.write_all(&packet(Compression::None, 1, &[Page::Raw(0x4000, a.clone())]).bytes())
        .unwrap();
    ch.write_all(&sync_packet(2)).unwrap();
    write_message(&mut control, &Message::RoundEnd { round: 1 }).unwrap();
    assert_eq!(
        read_message(&mut control).unwrap(),
        Message::RoundDone { round: 1 }
    );
    drop(ch);
    write_message(&mut control, &Message::End).unwrap();
    assert_eq!(read_message(&mut control).unwrap(), Message::EndOk);
    let got = srv
        .result()
        .expect("a stream with an opening SYNC is accepted");
    assert_eq!(got.stats.rounds, 1);
    assert_eq!(got.stats.total.sync_packets, 2, "opening SYNC + round 1's");
    let bytes = mem.block(0).unwrap().to_vec();
    assert!(bytes[0x4000..0x5000] == a[..]);
}

/// The hello announced the opening SYNC, but the channel starts with data: refused, naming the
/// channel, the packet and the field.
#[test]
fn announced_opening_sync_missing() {
    let mem = patterned_memory(BLOCK_PAGES);
    let srv = serve(ReceiveInto::Memory(mem.clone()));
    let h = Hello {
        opening_sync: true,
        ..hello(Compression::None, 1, BLOCK_SIZE)
    };
    let mut control = handshake(srv.addr, &h);
    let mut ch = open_channel(srv.addr, UUID, 0);
    let _ =
        ch.write_all(&packet(Compression::None, 0, &[Page::Raw(0x4000, noise_page(1))]).bytes());
    expect_error_on_control(&mut control, "expected the opening SYNC");
    let err = srv.result().expect_err("refused").to_string();
    assert!(err.contains("channel 0, packet #0"), "{err}");
    assert!(err.contains("field flags"), "{err}");
    let bytes = mem.block(0).unwrap().to_vec();
    assert!(bytes.iter().all(|&b| b == PATTERN), "memory untouched");
}

#[test]
fn missing_channel_connection_times_out() {
    // The hello announces 2 channels; only one connects.
    let srv = serve(ReceiveInto::Allocate);
    let t = Instant::now();
    let mut control = handshake(srv.addr, &hello(Compression::Qpl, 2, BLOCK_SIZE));
    let _c0 = open_channel(srv.addr, UUID, 0);
    let e = srv.error();
    let took = t.elapsed();
    assert!(took < IDLE + Duration::from_secs(2), "took {took:?}");
    assert!(matches!(e, SessionError::Timeout(_)), "{e:?}");
    assert!(
        e.to_string().contains("only 1 of 2 channels connected"),
        "{e}"
    );
    expect_error_on_control(&mut control, "only 1 of 2 channels");
}

#[test]
fn silent_before_hello_times_out() {
    let srv = serve(ReceiveInto::Allocate);
    let t = Instant::now();
    let _control = connect_control(srv.addr);
    let e = srv.error();
    let took = t.elapsed();
    assert!(took < IDLE + Duration::from_secs(2), "took {took:?}");
    // Named as the handshake's timeout, with what it waited for; not an OS error's text.
    match &e {
        SessionError::HandshakeTimeout { waiting_for, .. } => {
            assert_eq!(*waiting_for, "its hello", "{e}")
        }
        other => panic!("expected a handshake timeout, got {other:?} ({other})"),
    }
    assert!(!e.to_string().contains("os error"), "{e}");
}

#[test]
fn round_end_without_sync_times_out() {
    // round-end for a round no channel has synced, channel silent: bounded by the idle
    // timeout, and the sender gets an error, never a round-done.
    let srv = serve(ReceiveInto::Allocate);
    let mut f = session(&srv, Compression::Qpl, 1);
    let t = Instant::now();
    write_message(&mut f.control, &Message::RoundEnd { round: 1 }).unwrap();
    let e = srv.error();
    let took = t.elapsed();
    assert!(took < IDLE + Duration::from_secs(2), "took {took:?}");
    let c = channel_error(&e);
    assert_eq!((c.channel, c.place), (0, Place::Header { index: 0 }), "{e}");
    assert!(matches!(c.kind, ChannelErrorKind::Idle { .. }), "{e}");
    expect_error_on_control(&mut f.control, "idle timeout");
}

#[test]
fn round_end_out_of_order() {
    let srv = serve(ReceiveInto::Allocate);
    let mut f = session(&srv, Compression::Qpl, 1);
    write_message(&mut f.control, &Message::RoundEnd { round: 2 }).unwrap();
    let e = srv.error();
    match &e {
        SessionError::Handshake(msg) => {
            assert_eq!(msg, "round-end for round 2 after round 0", "{e}")
        }
        other => panic!("expected a handshake error, got {other:?} ({other})"),
    }
    expect_error_on_control(&mut f.control, "round-end for round 2");
}

#[test]
fn unexpected_control_message() {
    let srv = serve(ReceiveInto::Allocate);
    let mut f = session(&srv, Compression::Qpl, 1);
    write_message(
        &mut f.control,
        &Message::HelloOk {
            proof: None,
            fresh: false,
        },
    )
    .unwrap();
    let e = srv.error();
    assert!(
        matches!(
            e,
            SessionError::Unexpected {
                expected: "round-end or end",
                got: "hello-ok"
            }
        ),
        "{e:?}"
    );
    expect_error_on_control(&mut f.control, "got hello-ok");
}

#[test]
fn first_control_message_not_hello() {
    let srv = serve(ReceiveInto::Allocate);
    let mut control = connect_control(srv.addr);
    write_message(&mut control, &Message::End).unwrap();
    let e = srv.error();
    assert!(
        matches!(
            e,
            SessionError::Unexpected {
                expected: "hello",
                got: "end"
            }
        ),
        "{e:?}"
    );
    expect_error_on_control(&mut control, "expected hello, got end");
}

#[test]
fn oversized_control_frame() {
    let srv = serve(ReceiveInto::Allocate);
    let mut control = connect_control(srv.addr);
    // Length word of 16 MiB, then silence: rejected before any body is read or allocated.
    control.write_all(&(16u32 << 20).to_be_bytes()).unwrap();
    let e = srv.error();
    assert!(
        matches!(e, SessionError::Control(ControlError::FrameTooLarge { .. })),
        "{e:?}"
    );
    expect_error_on_control(&mut control, "control frame of");
}

// ---------------------------------------------------------------------------------------------
// Found by these tests: a signal is taken for an idle peer.
// ---------------------------------------------------------------------------------------------

/// Environment variable telling a re-executed copy of this binary to run the test body.
const CHILD_ENV: &str = "PAGEWIRE_HOSTILE_CHILD";

/// Run test `name` alone in a child process (re-executing this test binary), so process-wide
/// effects (signal handlers, signals to threads) cannot touch the other tests. Returns true
/// in the child, where the caller runs the body.
fn in_child_process(name: &str) -> bool {
    if std::env::var_os(CHILD_ENV).is_some() {
        return true;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            name,
            "--exact",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .output()
        .expect("re-run the test binary");
    assert!(
        out.status.success(),
        "child run of {name} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    false
}

/// Thread ids of the receiver's channel threads in this process.
fn channel_threads() -> Vec<libc::pid_t> {
    let mut tids = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim().starts_with("pw-recv-") {
            if let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
                tids.push(tid);
            }
        }
    }
    tids
}

#[test]
fn signal_to_channel_thread_is_not_an_idle_timeout() {
    if !in_child_process("signal_to_channel_thread_is_not_an_idle_timeout") {
        return;
    }
    extern "C" fn ignore_signal(_: libc::c_int) {}
    // SAFETY: a zeroed sigaction is valid; the handler is async-signal-safe (does nothing);
    // this process runs this test alone (see in_child_process).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = ignore_signal as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
    }
    let mem = patterned_memory(BLOCK_PAGES);
    let srv = serve(ReceiveInto::Memory(mem.clone()));
    let mut f = session(&srv, Compression::Qpl, 1);
    // Wait for the channel thread to block in its first receive, then signal it.
    let t = Instant::now();
    let tids = loop {
        let tids = channel_threads();
        if !tids.is_empty() || t.elapsed() > Duration::from_secs(2) {
            break tids;
        }
        thread::sleep(Duration::from_millis(10));
    };
    assert!(!tids.is_empty(), "no pw-recv thread found");
    thread::sleep(Duration::from_millis(200));
    for tid in tids {
        // SAFETY: tgkill with a thread id of this process and a signal that has a handler.
        let r = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGUSR1) };
        assert_eq!(r, 0);
    }
    thread::sleep(Duration::from_millis(200));
    // The session must go on as if nothing happened.
    let raw = noise_page(21);
    f.send(
        0,
        &packet(Compression::Qpl, 0, &[Page::Raw(0x2000, raw.clone())]).bytes(),
    );
    f.send(0, &sync_packet(1));
    // The sender closes its channels, then says End.
    f.end_after_one_round();
    srv.result().expect("a signal is not a failure");
    assert!(mem.block(0).unwrap().to_vec()[0x2000..0x3000] == raw[..]);
}

// ---------------------------------------------------------------------------------------------
// Round barrier: an older copy of a page never overwrites a newer one across channels.
// ---------------------------------------------------------------------------------------------

#[test]
fn round_barrier_keeps_the_newer_copy_across_channels() {
    let mem = patterned_memory(BLOCK_PAGES);
    let srv = serve(ReceiveInto::Memory(mem.clone()));
    let mut f = session(&srv, Compression::None, 2);
    let old = text_page(1);
    let new = text_page(2);
    // Channel 1 races ahead: round 1 ends at once on it, then round 2 resends page 0x1000.
    f.send(1, &sync_packet(10));
    f.send(
        1,
        &packet(Compression::None, 11, &[Page::Raw(0x1000, new.clone())]).bytes(),
    );
    f.send(1, &sync_packet(12));
    // Give channel 1 every chance to run ahead; its round-2 packet is already in the socket.
    thread::sleep(Duration::from_millis(200));
    // Channel 0 delivers round 1's (older) copy late, then ends rounds 1 and 2.
    f.send(
        0,
        &packet(Compression::None, 1, &[Page::Raw(0x1000, old.clone())]).bytes(),
    );
    f.send(0, &sync_packet(2));
    f.send(0, &sync_packet(13));
    for round in 1..=2 {
        write_message(&mut f.control, &Message::RoundEnd { round }).unwrap();
        assert_eq!(
            read_message(&mut f.control).unwrap(),
            Message::RoundDone { round }
        );
    }
    f.chans.clear();
    write_message(&mut f.control, &Message::End).unwrap();
    assert_eq!(read_message(&mut f.control).unwrap(), Message::EndOk);
    let got = srv.result().expect("valid session");
    assert_eq!(got.stats.rounds, 2);
    let bytes = mem.block(0).unwrap().to_vec();
    assert!(
        bytes[0x1000..0x2000] == new[..],
        "round 1's copy overwrote round 2's"
    );
}

// ---------------------------------------------------------------------------------------------
// The front door: strangers before a session cost a logged line, never the session.
// ---------------------------------------------------------------------------------------------

fn threads_now() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("Threads:")
                    .map(|v| v.trim().parse().unwrap_or(0))
            })
        })
        .unwrap_or(0)
}

/// A real sender's session over `srv`, through the library.
fn real_session(srv: &Serving, mem: &Arc<GuestRam>) {
    let src = {
        let b = Block::anonymous(BLOCK, BLOCK_SIZE as usize).unwrap();
        // SAFETY: fresh block.
        unsafe { b.as_mut_slice() }.fill(0x3C);
        Arc::new(GuestRam::new(vec![b]).unwrap())
    };
    let c = pagewire::SenderConfig::default()
        .idle_timeout(IDLE)
        .pages_per_packet(PPP);
    let mut s = pagewire::Sender::connect(srv.addr, c, src).expect("the real sender connects");
    s.send_round(pagewire::RoundPages::all(&[BLOCK_SIZE], PS, PPP))
        .expect("round");
    s.finish().expect("finish");
    srv.result().expect("the session completes");
    assert!(mem.block(0).unwrap().to_vec().iter().all(|&b| b == 0x3C));
}

#[test]
fn garbage_http_scans_and_silence_do_not_cost_the_session() {
    let mem = patterned_memory(BLOCK_PAGES);
    let srv = serve(ReceiveInto::Memory(mem.clone()));
    // Silent, held open for the whole session: must not block anyone.
    let _silent = connect(srv.addr);
    // A port scan: connect and close.
    drop(connect(srv.addr));
    // An HTTP request.
    let mut http = connect(srv.addr);
    http.write_all(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
        .unwrap();
    // Random garbage.
    let mut junk = connect(srv.addr);
    junk.write_all(&[0xFF; 300]).unwrap();
    // The real sender arrives while those handshakes are pending, and migrates.
    real_session(&srv, &mem);
    // Each stranger cost a refusal, reported (and logged); the HTTP request was told why.
    let mut refusals = srv.skipped_refusals.get();
    while refusals < 4 {
        match srv.rx.recv_timeout(IDLE + Duration::from_secs(2)) {
            Ok(Event::Refused(_)) => refusals += 1,
            _ => break,
        }
    }
    assert_eq!(refusals, 4, "each stranger was refused");
}

/// A client that connects and sends nothing is closed by the receiver at the handshake
/// timeout, while the receiver goes on serving (its socket does not stay open until the
/// receiver exits); the refusal names the timeout and what was awaited, not an OS error.
#[test]
fn a_silent_client_is_closed_at_the_handshake_timeout() {
    let mem = patterned_memory(BLOCK_PAGES);
    let srv = serve_for(cfg(), ReceiveInto::Memory(mem.clone()), 6 * HANG_LIMIT);
    let mut silent = connect(srv.addr);
    silent.set_read_timeout(Some(3 * HANG_LIMIT)).unwrap();
    let t = Instant::now();
    let mut byte = [0u8; 1];
    match std::io::Read::read(&mut silent, &mut byte) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!(
            "expected the receiver to close the silent connection, got {other:?} after {:?}",
            t.elapsed()
        ),
    }
    // Closed by its deadline, not at once.
    assert!(
        t.elapsed() >= IDLE - Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );
    match srv.refused() {
        e @ SessionError::HandshakeTimeout { waiting_for, .. } => {
            assert_eq!(waiting_for, "its first bytes", "{e}");
            assert!(!e.to_string().contains("os error"), "{e}");
        }
        other => panic!("expected a handshake timeout, got {other:?} ({other})"),
    }
    // The receiver is still serving: a real sender migrates.
    real_session(&srv, &mem);
}

/// A second sender while a session runs is told at once that the receiver is busy (not
/// that it lacks TLS, nor nothing until a timeout), and the running session completes.
#[test]
fn a_second_sender_during_a_session_is_told_the_receiver_is_busy() {
    let mem = patterned_memory(BLOCK_PAGES);
    let srv = serve(ReceiveInto::Memory(mem.clone()));
    let mut first = session(&srv, Compression::None, 1);
    let src = {
        let b = Block::anonymous(BLOCK, BLOCK_SIZE as usize).unwrap();
        Arc::new(GuestRam::new(vec![b]).unwrap())
    };
    let Err(e) =
        pagewire::Sender::connect(srv.addr, SenderConfig::default().idle_timeout(IDLE), src)
    else {
        panic!("a second session was accepted");
    };
    let text = e.to_string();
    assert!(text.contains("busy with another session"), "{text}");
    assert!(!text.contains("tls"), "{text}");
    assert!(matches!(srv.refused(), SessionError::Busy));
    // The first session is untouched.
    first.send(0, &sync_packet(0));
    first.end_after_one_round();
    assert_eq!(
        srv.result()
            .expect("the first session completes")
            .stats
            .rounds,
        1
    );
}

#[test]
fn a_connection_flood_is_bounded_and_the_session_survives() {
    let mem = patterned_memory(BLOCK_PAGES);
    let srv = serve(ReceiveInto::Memory(mem.clone()));
    let before = threads_now();
    // 300 connections that never send anything valid, all held open.
    let flood: Vec<TcpStream> = (0..300)
        .filter_map(|_| TcpStream::connect(srv.addr).ok())
        .collect();
    assert!(
        flood.len() >= 250,
        "flood connections made: {}",
        flood.len()
    );
    thread::sleep(Duration::from_millis(500));
    let during = threads_now();
    assert!(
        during <= before + pagewire::internals::MAX_HANDSHAKES + 8,
        "threads grew from {before} to {during}: handshakes must be capped"
    );
    // The real sender still gets in once the pending handshakes time out or are refused.
    real_session(&srv, &mem);
    drop(flood);
}
