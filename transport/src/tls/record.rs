//! The TLS 1.3 record layer (RFC 8446 §5), sans-IO: sealing plaintext into records and
//! opening records in place, with the traffic keys rustls derived during the handshake.
//!
//! rustls runs the handshake; its traffic secrets are then taken out of it
//! (`dangerous_extract_secrets`) and the records are sealed and opened here, so that the
//! sender seals a packet's pieces (header, length array, guest pages, compressed pages)
//! straight into its slot's own send buffer and the receiver opens records in its own
//! buffer and copies each page once, to its destination. The same extracted keys are what
//! kernel TLS (`setsockopt(SOL_TLS, TLS_TX)`) takes, so a kTLS stage can replace [`Sealer`]
//! without touching the handshake.
//!
//! A record on the wire: `23 3 3 len_hi len_lo` (5-byte header, also the AEAD's additional
//! data), then `len` bytes: AEAD(plaintext ‖ inner content type) ‖ 16-byte tag. The nonce is
//! the 12-byte IV XOR the 64-bit record sequence number (left-padded).

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::ConnectionTrafficSecrets;

use super::TlsError;

/// Bytes of a record header.
pub const HEADER_LEN: usize = 5;
/// Bytes of an AEAD tag (every TLS 1.3 suite).
pub const TAG_LEN: usize = 16;
/// Largest plaintext of one record.
pub const MAX_PLAINTEXT: usize = 16384;
/// Largest record body (RFC 8446 §5.2: plaintext + 256).
pub const MAX_BODY: usize = MAX_PLAINTEXT + 256;
/// Bytes a record adds to its plaintext: header, inner content type, tag.
pub const OVERHEAD: usize = HEADER_LEN + 1 + TAG_LEN;

const CT_ALERT: u8 = 21;
const CT_HANDSHAKE: u8 = 22;
const CT_APPLICATION_DATA: u8 = 23;

/// Records one key may seal before it must be replaced: AES-GCM's confidentiality limit
/// (RFC 8446 §5.5: 2^24.5 full-size records). pagewire does not send KeyUpdate, so a
/// connection ends with an error at this point instead of exceeding it (with 16 KiB records
/// that is after about 380 GiB on one channel).
pub const MAX_RECORDS: u64 = 23_726_566;

/// One direction's traffic key, IV and record sequence number.
pub struct Direction {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
    suite: &'static str,
}

impl std::fmt::Debug for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Direction")
            .field("suite", &self.suite)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl Direction {
    /// The key material rustls extracted for one direction, at sequence number `seq`.
    pub fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Direction, TlsError> {
        let (alg, suite, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
                (&aead::AES_128_GCM, "AES-128-GCM", key.as_ref(), iv.as_ref())
            }
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
                (&aead::AES_256_GCM, "AES-256-GCM", key.as_ref(), iv.as_ref())
            }
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (
                &aead::CHACHA20_POLY1305,
                "CHACHA20-POLY1305",
                key.as_ref(),
                iv.as_ref(),
            ),
            _ => {
                return Err(TlsError::Setup(
                    "negotiated an AEAD this record layer lacks".into(),
                ))
            }
        };
        let key = UnboundKey::new(alg, key)
            .map_err(|_| TlsError::Setup("traffic key of the wrong length".into()))?;
        let iv: [u8; 12] = iv
            .try_into()
            .map_err(|_| TlsError::Setup("traffic IV is not 12 bytes".into()))?;
        Ok(Direction {
            key: LessSafeKey::new(key),
            iv,
            seq,
            suite,
        })
    }

    /// The AEAD in use (for logs).
    pub fn suite(&self) -> &'static str {
        self.suite
    }

    /// The nonce of the next record; advances the sequence number.
    fn next_nonce(&mut self) -> Result<Nonce, TlsError> {
        if self.seq >= MAX_RECORDS {
            return Err(TlsError::KeyExhausted);
        }
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq += 1;
        Ok(Nonce::assume_unique_for_key(n))
    }
}

/// Seals plaintext into application-data records.
#[derive(Debug)]
pub struct Sealer {
    dir: Direction,
    record_size: usize,
}

impl Sealer {
    /// A sealer whose records carry at most `record_size` plaintext bytes (clamped to
    /// 1..=16384).
    pub fn new(dir: Direction, record_size: usize) -> Sealer {
        Sealer {
            dir,
            record_size: record_size.clamp(1, MAX_PLAINTEXT),
        }
    }

    /// Plaintext bytes per record.
    pub fn record_size(&self) -> usize {
        self.record_size
    }

    /// The AEAD in use.
    pub fn suite(&self) -> &'static str {
        self.dir.suite()
    }

    /// Bytes on the wire for `plain` bytes of plaintext.
    pub fn sealed_len(&self, plain: usize) -> usize {
        plain + plain.div_ceil(self.record_size) * OVERHEAD
    }

    /// Seal the concatenation of `pieces` into records appended to `out` (cleared first).
    /// Each record is assembled in `out` (one copy of each plaintext byte, into memory that
    /// is then encrypted in place while it is still in cache) and sealed in place.
    pub fn seal<'a, I>(&mut self, pieces: I, out: &mut Vec<u8>) -> Result<(), TlsError>
    where
        I: IntoIterator<Item = &'a [u8]>,
    {
        let pieces: I::IntoIter = pieces.into_iter();
        out.clear();
        let mut record_start = None::<usize>;
        let mut room = 0usize;
        for mut piece in pieces {
            while !piece.is_empty() {
                if record_start.is_none() {
                    record_start = Some(out.len());
                    out.extend_from_slice(&[CT_APPLICATION_DATA, 3, 3, 0, 0]);
                    room = self.record_size;
                }
                let take = piece.len().min(room);
                let (now, rest) = piece.split_at(take);
                out.extend_from_slice(now);
                piece = rest;
                room -= take;
                if room == 0 {
                    if let Some(start) = record_start.take() {
                        self.close_record(out, start)?;
                    }
                }
            }
        }
        if let Some(start) = record_start {
            self.close_record(out, start)?;
        }
        Ok(())
    }

    /// Finish the record that starts at `out[start]`: inner content type, length, seal, tag.
    fn close_record(&mut self, out: &mut Vec<u8>, start: usize) -> Result<(), TlsError> {
        out.push(CT_APPLICATION_DATA);
        let body = out.len() - start - HEADER_LEN + TAG_LEN;
        let len = u16::try_from(body).map_err(|_| TlsError::Setup("record too long".into()))?;
        let mut header = [CT_APPLICATION_DATA, 3, 3, 0, 0];
        header[3..5].copy_from_slice(&len.to_be_bytes());
        let nonce = self.dir.next_nonce()?;
        let Some(rec) = out.get_mut(start..) else {
            return Err(TlsError::Setup("record start beyond buffer".into()));
        };
        let (hdr, plain) = rec.split_at_mut(HEADER_LEN);
        hdr.copy_from_slice(&header);
        let tag = self
            .dir
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), plain)
            .map_err(|_| TlsError::Setup("sealing a record failed".into()))?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }
}

/// Where the next bytes of a [`RecordReader`] come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Nothing is buffered: the stream may end cleanly here.
    Boundary,
    /// A record is partly buffered (`have` of `want` bytes, header included).
    MidRecord { have: usize, want: usize },
}

/// Buffers ciphertext, opens whole records in place and exposes their plaintext. Plaintext
/// is visible only after its record's tag has been verified, so nothing of a record that
/// fails authentication ever leaves this buffer.
pub struct RecordReader {
    dir: Direction,
    buf: Vec<u8>,
    /// Unprocessed ciphertext: `buf[start..end]`.
    start: usize,
    end: usize,
    /// Opened plaintext not yet consumed: `buf[p0..p1]`.
    p0: usize,
    p1: usize,
    records: u64,
}

impl std::fmt::Debug for RecordReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordReader")
            .field("dir", &self.dir)
            .field("buffered", &(self.end - self.start))
            .field("plaintext", &(self.p1 - self.p0))
            .finish()
    }
}

impl RecordReader {
    /// A reader whose buffer holds `capacity` bytes (at least one largest record).
    pub fn new(dir: Direction, capacity: usize) -> RecordReader {
        RecordReader {
            dir,
            buf: vec![0; capacity.max(HEADER_LEN + MAX_BODY)],
            start: 0,
            end: 0,
            p0: 0,
            p1: 0,
            records: 0,
        }
    }

    /// The receive buffer's address and length, for registering it with io_uring. It is
    /// allocated once, in [`RecordReader::new`], and never moves or resizes.
    pub fn region(&mut self) -> (*mut u8, usize) {
        (self.buf.as_mut_ptr(), self.buf.len())
    }

    /// Records opened so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// The AEAD in use.
    pub fn suite(&self) -> &'static str {
        self.dir.suite()
    }

    /// Authenticated plaintext ready to be consumed.
    pub fn plaintext(&self) -> &[u8] {
        self.buf.get(self.p0..self.p1).unwrap_or_default()
    }

    /// Mark `n` bytes of [`RecordReader::plaintext`] consumed.
    pub fn consume(&mut self, n: usize) {
        self.p0 = (self.p0 + n).min(self.p1);
    }

    /// Whether the stream may end here (no partial record, no unconsumed plaintext).
    pub fn need(&self) -> Need {
        let have = self.end - self.start;
        if have == 0 {
            return Need::Boundary;
        }
        let want = match self.buf.get(self.start + 3..self.start + 5) {
            Some(&[a, b]) if have >= HEADER_LEN => HEADER_LEN + u16::from_be_bytes([a, b]) as usize,
            _ => HEADER_LEN,
        };
        Need::MidRecord { have, want }
    }

    /// Free space for the next receive (compacting the buffer when its plaintext has been
    /// consumed). Never empty while a record is incomplete.
    pub fn space(&mut self) -> &mut [u8] {
        if self.p0 == self.p1 && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            self.p0 = 0;
            self.p1 = 0;
        }
        self.buf.get_mut(self.end..).unwrap_or_default()
    }

    /// `n` bytes were received into [`RecordReader::space`].
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Open the next whole buffered record if the previous one's plaintext is consumed.
    /// `Ok(true)`: a record was opened (its plaintext may be empty); `Ok(false)`: more bytes
    /// are needed first.
    pub fn open_next(&mut self) -> Result<bool, TlsError> {
        if self.p0 != self.p1 {
            return Ok(false);
        }
        let have = self.end - self.start;
        if have < HEADER_LEN {
            return Ok(false);
        }
        let Some(hdr) = self.buf.get(self.start..self.start + HEADER_LEN) else {
            return Ok(false);
        };
        let header: [u8; HEADER_LEN] = [hdr[0], hdr[1], hdr[2], hdr[3], hdr[4]];
        let len = u16::from_be_bytes([header[3], header[4]]) as usize;
        if header[0] != CT_APPLICATION_DATA || header[1] != 3 || header[2] != 3 {
            return Err(TlsError::NotTls {
                detail: format!(
                    "record {} starts with bytes {:02x} {:02x} {:02x}, not a TLS 1.3 record header",
                    self.records, header[0], header[1], header[2]
                ),
            });
        }
        if !(TAG_LEN + 1..=MAX_BODY).contains(&len) {
            return Err(TlsError::BadRecord {
                record: self.records,
                detail: format!("length {len} outside {}..={MAX_BODY}", TAG_LEN + 1),
            });
        }
        if have < HEADER_LEN + len {
            return Ok(false);
        }
        let body_start = self.start + HEADER_LEN;
        let nonce = self.dir.next_nonce()?;
        let record = self.records;
        let Some(body) = self.buf.get_mut(body_start..body_start + len) else {
            return Ok(false);
        };
        let plain = self
            .dir
            .key
            .open_in_place(nonce, Aad::from(header), body)
            .map_err(|_| TlsError::Auth { record })?;
        // Inner plaintext: content ‖ type ‖ zero padding.
        let Some(type_at) = plain.iter().rposition(|&b| b != 0) else {
            return Err(TlsError::BadRecord {
                record,
                detail: "no content type".into(),
            });
        };
        let ctype = plain[type_at];
        self.records += 1;
        self.start = body_start + len;
        match ctype {
            CT_APPLICATION_DATA => {
                self.p0 = body_start;
                self.p1 = body_start + type_at;
                Ok(true)
            }
            CT_ALERT => {
                let desc = plain.get(1).copied().unwrap_or(0);
                Err(TlsError::Alert(rustls::AlertDescription::from(desc)))
            }
            CT_HANDSHAKE => Err(TlsError::BadRecord {
                record,
                detail:
                    "post-handshake message (key update or ticket), which pagewire does not use"
                        .into(),
            }),
            other => Err(TlsError::BadRecord {
                record,
                detail: format!("content type {other}"),
            }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;
    use rustls::crypto::cipher::{AeadKey, Iv};

    fn pair(seq: u64) -> (Direction, Direction) {
        let mk = || ConnectionTrafficSecrets::Aes256Gcm {
            key: AeadKey::from([7u8; 32]),
            iv: Iv::from([9u8; 12]),
        };
        (
            Direction::new(seq, mk()).unwrap(),
            Direction::new(seq, mk()).unwrap(),
        )
    }

    fn read_all(r: &mut RecordReader, wire: &[u8], chunk: usize) -> Result<Vec<u8>, TlsError> {
        let mut out = Vec::new();
        let mut pos = 0;
        loop {
            while r.open_next()? {
                out.extend_from_slice(r.plaintext());
                let n = r.plaintext().len();
                r.consume(n);
            }
            if pos == wire.len() {
                return Ok(out);
            }
            let space = r.space();
            let n = space.len().min(chunk).min(wire.len() - pos);
            space[..n].copy_from_slice(&wire[pos..pos + n]);
            r.filled(n);
            pos += n;
        }
    }

    #[test]
    fn gathers_pieces_into_records_and_back() {
        for rs in [4096, 16384, 1000] {
            let (tx, rx) = pair(3);
            let mut s = Sealer::new(tx, rs);
            let a: Vec<u8> = (0..1344u32).map(|i| i as u8).collect();
            let b: Vec<u8> = (0..40_000u32).map(|i| (i * 7) as u8).collect();
            let c = vec![0xabu8; 5];
            let mut wire = Vec::new();
            s.seal([&a[..], &b[..], &c[..]], &mut wire).unwrap();
            let total = a.len() + b.len() + c.len();
            assert_eq!(wire.len(), s.sealed_len(total), "record size {rs}");
            let mut r = RecordReader::new(rx, 20_000);
            let got = read_all(&mut r, &wire, 777).unwrap();
            let want: Vec<u8> = [a, b, c].concat();
            assert_eq!(got, want);
            assert_eq!(r.records(), total.div_ceil(rs) as u64);
            assert_eq!(r.need(), Need::Boundary);
        }
    }

    #[test]
    fn a_flipped_byte_anywhere_fails_authentication_and_exposes_nothing() {
        let (tx, _) = pair(0);
        let mut s = Sealer::new(tx, 4096);
        let data = vec![0x5au8; 10_000];
        let mut wire = Vec::new();
        s.seal([&data[..]], &mut wire).unwrap();
        let rec_len = 4096 + OVERHEAD;
        for at in [5, 100, 4096 + 5, rec_len + 3, wire.len() - 1] {
            let mut bad = wire.clone();
            bad[at] ^= 1;
            let (_, rx) = pair(0);
            let mut r = RecordReader::new(rx, 1 << 16);
            let space = r.space();
            space[..bad.len()].copy_from_slice(&bad);
            r.filled(bad.len());
            let hit = (at / rec_len) as u64;
            let mut good = Vec::new();
            let err = loop {
                match r.open_next() {
                    Ok(true) => {
                        good.extend_from_slice(r.plaintext());
                        let n = r.plaintext().len();
                        r.consume(n);
                    }
                    Ok(false) => panic!("byte {at}: every record opened"),
                    Err(e) => break e,
                }
            };
            assert!(
                matches!(err, TlsError::Auth { record } if record == hit),
                "{at}: {err}"
            );
            assert!(r.plaintext().is_empty());
            // Only the records before the altered one were exposed, and intact.
            assert_eq!(good, data[..hit as usize * 4096]);
        }
        // A dropped record: the next one is opened with the wrong sequence number.
        let (_, rx) = pair(0);
        let mut r = RecordReader::new(rx, 1 << 16);
        let first = 4096 + OVERHEAD;
        let rest = &wire[first..];
        r.space()[..rest.len()].copy_from_slice(rest);
        r.filled(rest.len());
        assert!(matches!(r.open_next(), Err(TlsError::Auth { record: 0 })));
    }

    #[test]
    fn partial_record_is_mid_record() {
        let (tx, rx) = pair(0);
        let mut s = Sealer::new(tx, 4096);
        let mut wire = Vec::new();
        s.seal([&[1u8; 100][..]], &mut wire).unwrap();
        let mut r = RecordReader::new(rx, 1 << 16);
        r.space()[..50].copy_from_slice(&wire[..50]);
        r.filled(50);
        assert!(!r.open_next().unwrap());
        assert_eq!(
            r.need(),
            Need::MidRecord {
                have: 50,
                want: wire.len()
            }
        );
    }

    #[test]
    fn plaintext_is_not_a_record() {
        let (_, rx) = pair(0);
        let mut r = RecordReader::new(rx, 1 << 16);
        r.space()[..8].copy_from_slice(&[0x11, 0x22, 0x33, 0x44, 0, 0, 0, 1]);
        r.filled(8);
        assert!(matches!(r.open_next(), Err(TlsError::NotTls { .. })));
    }

    #[test]
    fn key_use_is_bounded() {
        let (tx, _) = pair(MAX_RECORDS);
        let mut s = Sealer::new(tx, 4096);
        let mut wire = Vec::new();
        assert!(matches!(
            s.seal([&[1u8; 10][..]], &mut wire),
            Err(TlsError::KeyExhausted)
        ));
    }
}
