//! The TLS record reader (`pagewire_transport::tls::RecordReader`) on hostile ciphertext.
//!
//! The first byte picks a mode:
//!
//! * odd: the rest is the ciphertext stream, delivered in chunks whose sizes come from the
//!   second byte.
//! * even: the rest is a recipe: plaintext pieces sealed by a `Sealer` with the same keys
//!   (record size from the input), then the recipe's edits applied to the sealed stream (flip,
//!   drop, duplicate or truncate bytes).
//!
//! Both sides update their keys every 8 records (KeyUpdate records in the sealed stream).
//!
//! Properties, for any input: no panic; the reader only ever exposes plaintext of records
//! that verified, so the plaintext read is always a prefix of what was sealed (recipe mode),
//! and an unedited stream reads back exactly.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pagewire_transport::tls::{Direction, RecordReader, Sealer, Suite};

/// Keys updated every 8 records, so that sealed streams carry KeyUpdate records.
fn dir() -> Direction {
    Direction::new(Suite::Aes256GcmSha384, &[0x42; 48])
        .expect("key")
        .with_records_per_key(16)
}

/// Feed `wire` in chunks of `chunk` bytes; return the plaintext read and whether it ended
/// with an error.
fn read(wire: &[u8], chunk: usize) -> (Vec<u8>, bool) {
    let mut r = RecordReader::new(dir(), 1 << 15);
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        loop {
            let p = r.plaintext();
            if !p.is_empty() {
                out.extend_from_slice(p);
                let n = p.len();
                r.consume(n);
                continue;
            }
            match r.open_next() {
                Ok(true) => {}
                Ok(false) => break,
                Err(_) => return (out, true),
            }
        }
        if pos >= wire.len() {
            return (out, false);
        }
        let space = r.space();
        if space.is_empty() {
            return (out, true);
        }
        let n = space.len().min(chunk.max(1)).min(wire.len() - pos);
        space[..n].copy_from_slice(&wire[pos..pos + n]);
        r.filled(n);
        pos += n;
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 1 {
        let chunk = rest.first().map_or(1, |&c| c as usize * 64 + 1);
        let _ = read(rest, chunk);
        return;
    }
    // Recipe: [record size byte][n pieces][piece lengths...][edits...]
    let mut it = rest.iter().copied();
    let record = 512 + it.next().unwrap_or(0) as usize * 64;
    let npieces = it.next().unwrap_or(1) as usize % 6 + 1;
    let mut plain = Vec::new();
    let mut bounds = Vec::new();
    for i in 0..npieces {
        let len = it.next().unwrap_or(0) as usize * 97;
        let start = plain.len();
        plain.extend((0..len).map(|j| (j * 31 + i) as u8));
        bounds.push((start, plain.len()));
    }
    let mut sealer = Sealer::new(dir(), record);
    let mut wire = Vec::new();
    let pieces = bounds.iter().map(|&(a, b)| &plain[a..b]);
    if sealer.seal(pieces, &mut wire).is_err() {
        return;
    }
    let mut edited = false;
    while let (Some(op), Some(at)) = (it.next(), it.next()) {
        if wire.is_empty() {
            break;
        }
        let at = (at as usize * 131) % wire.len();
        edited = true;
        match op % 4 {
            0 => wire[at] ^= 1 << (op >> 5),
            1 => {
                wire.remove(at);
            }
            2 => {
                let b = wire[at];
                wire.insert(at, b);
            }
            _ => wire.truncate(at),
        }
    }
    let chunk = record / 3 + 1;
    let (got, failed) = read(&wire, chunk);
    assert!(
        plain.starts_with(&got),
        "exposed plaintext that was never sealed"
    );
    if !edited {
        assert!(!failed, "an intact stream failed");
        assert_eq!(got, plain, "an intact stream did not read back");
    }
});
