//! Control protocol: `Message::decode` on one arbitrary frame, and `read_message` over a
//! `Cursor` of arbitrary bytes (a sequence of frames).
//!
//! Properties, for any input: no panic; no allocation beyond the input (libFuzzer's
//! `-malloc_limit_mb` defaults to the RSS limit); a decoded message re-encodes to exactly the
//! bytes it came from (the encoding is canonical) and decodes back to the same value; a
//! decoded hello passes `Hello::validate`; `read_message` consumes exactly one frame
//! per message and reports `Closed` only at the end of the input.

#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use pagewire_transport::control::{read_message, write_message, ControlError, Message};

fn round_trip(frame: &[u8], m: &Message) {
    if let Message::Hello(h) = m {
        h.validate().expect("a decoded hello is valid");
    }
    let enc = m.encode();
    let len = u32::from_be_bytes(enc[..4].try_into().expect("4 bytes")) as usize;
    assert_eq!(len, enc.len() - 4, "length word");
    assert_eq!(
        &enc[4..],
        frame,
        "re-encoded {} differs from its frame",
        m.name()
    );
    let again = Message::decode(&enc[4..]).expect("an encoded message decodes");
    assert_eq!(&again, m, "message round trip");
    let mut out = Vec::new();
    write_message(&mut out, m).expect("write to a Vec");
    assert_eq!(out, enc, "write_message writes encode()");
}

fuzz_target!(|data: &[u8]| {
    // One frame (type + body), as the reader hands it to decode.
    match Message::decode(data) {
        Ok(m) => round_trip(data, &m),
        Err(e) => {
            let _ = e.to_string();
        }
    }

    // A stream of frames.
    let mut cur = Cursor::new(data);
    for _ in 0..64 {
        let start = cur.position() as usize;
        match read_message(&mut cur) {
            Ok(m) => {
                let end = cur.position() as usize;
                assert!(end - start > 4, "a message consumed no frame");
                round_trip(&data[start + 4..end], &m);
            }
            Err(ControlError::Closed) => {
                assert_eq!(start, data.len(), "Closed before the end of the input");
                break;
            }
            Err(e) => {
                let _ = e.to_string();
                break;
            }
        }
    }
});
