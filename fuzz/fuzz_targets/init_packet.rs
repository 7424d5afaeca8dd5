//! Channel init packet: `InitPacket::parse` and `InitPacket::check` on arbitrary bytes.
//!
//! Properties, for any input: no panic; parse succeeds only on exactly 64 bytes; a parsed
//! packet re-encodes to the same magic, version, uuid and channel id and parses back to the
//! same value; `check` accepts exactly `uuid == session uuid && channel_id < channels`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pagewire_transport::wire::{InitPacket, INIT_PACKET_LEN};

/// A session uuid to check foreign packets against.
const SESSION_UUID: [u8; 16] = *b"fuzz-session-id!";

fuzz_target!(|data: &[u8]| {
    // Session parameters for `check` taken from the input's last byte, so the fuzzer also
    // explores the channel count (0 ..= 255, and 256 with the top bit of the byte before).
    let channels = match data {
        [.., a, b] => u32::from(*b) + u32::from(*a & 1) * 256,
        [b] => u32::from(*b),
        [] => 0,
    };
    match InitPacket::parse(data) {
        Ok(p) => {
            assert_eq!(data.len(), INIT_PACKET_LEN, "parse accepted a wrong length");
            let enc = p.encode();
            // magic, version, uuid, channel id: bytes 0..25 are all parse reads.
            assert_eq!(enc[..25], data[..25], "re-encoded init packet differs");
            assert!(enc[25..].iter().all(|&b| b == 0), "reserved bytes not zero");
            let q = InitPacket::parse(&enc).expect("an encoded init packet parses");
            assert_eq!(p, q, "init packet round trip");

            let id = u32::from(p.channel_id);
            let expect_ok = p.uuid == SESSION_UUID && id < channels;
            let got = p.check(&SESSION_UUID, channels);
            assert_eq!(got.is_ok(), expect_ok, "check({channels}) gave {got:?}");
            if let Err(e) = got {
                assert!(e.field().is_some(), "check error names no field: {e}");
                let _ = e.to_string();
            }
            // Against its own uuid: exactly the channel bound decides.
            assert!(p.check(&p.uuid, id + 1).is_ok());
            assert!(p.check(&p.uuid, id).is_err());
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
