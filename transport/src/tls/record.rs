//! The TLS 1.3 record layer (RFC 8446 §5), sans-IO: sealing plaintext into records and
//! opening records in place, with the traffic keys rustls derived during the handshake.
//!
//! rustls runs the handshake; the two application traffic secrets are then taken out of it
//! (see [`super::handshake`]) and the records are sealed and opened here, so that the
//! sender seals a packet's pieces (header, length array, guest pages, compressed pages)
//! straight into its slot's own send buffer and the receiver opens records in its own
//! buffer and copies each page once, to its destination. The same keys are what kernel TLS
//! (`setsockopt(SOL_TLS, TLS_TX)`) takes, so a kTLS stage can replace [`Sealer`] without
//! touching the handshake.
//!
//! A record on the wire: `23 3 3 len_hi len_lo` (5-byte header, also the AEAD's additional
//! data), then `len` bytes: AEAD(plaintext ‖ inner content type) ‖ 16-byte tag. The nonce is
//! the 12-byte IV XOR the 64-bit record sequence number (left-padded).
//!
//! Key updates (RFC 8446 §4.6.3, §7.2): a [`Sealer`] sends a KeyUpdate when its key has
//! protected half of [`MAX_RECORDS`] records — one record of inner content type handshake
//! (22) holding exactly `24 0 0 1 0` (key_update, length 1, update_not_requested), sealed
//! with the old key — and seals everything after it with application_traffic_secret_N+1 =
//! HKDF-Expand-Label(secret_N, "traffic upd", "", Hash.length), sequence number 0. A
//! [`RecordReader`] accepts such a record, switches its receiving key right after it, and
//! remembers a peer's update_requested for the connection's sealer to answer
//! ([`RecordReader::take_update_request`], [`Sealer::request_key_update`]). Anything else
//! after the handshake in a handshake record is refused.

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::hkdf::{self, Prk};
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

/// Handshake message type key_update (RFC 8446 §4).
const HT_KEY_UPDATE: u8 = 24;
/// A KeyUpdate message with update_not_requested: type, 24-bit length 1, request_update 0.
const KEY_UPDATE: [u8; 5] = [HT_KEY_UPDATE, 0, 0, 1, 0];
/// Bytes a KeyUpdate record takes on the wire.
pub const KEY_UPDATE_LEN: usize = KEY_UPDATE.len() + OVERHEAD;

/// Records one key may protect: AES-GCM's confidentiality limit (RFC 8446 §5.5: 2^24.5
/// full-size records; with 16 KiB records about 380 GiB). A sealer updates its key at half
/// of it; a reader refuses a peer that exceeds it.
pub const MAX_RECORDS: u64 = 23_726_566;

/// A TLS 1.3 cipher suite: the AEAD and the hash of its key schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suite {
    Aes128GcmSha256,
    Aes256GcmSha384,
    Chacha20Poly1305Sha256,
}

impl Suite {
    /// The suite of keys rustls extracted (TLS 1.3 pairs each AEAD with one hash).
    pub fn of(secrets: &ConnectionTrafficSecrets) -> Result<Suite, TlsError> {
        match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { .. } => Ok(Suite::Aes128GcmSha256),
            ConnectionTrafficSecrets::Aes256Gcm { .. } => Ok(Suite::Aes256GcmSha384),
            ConnectionTrafficSecrets::Chacha20Poly1305 { .. } => Ok(Suite::Chacha20Poly1305Sha256),
            _ => Err(TlsError::Setup(
                "negotiated an AEAD this record layer lacks".into(),
            )),
        }
    }

    /// The AEAD's name (for logs).
    pub fn name(self) -> &'static str {
        match self {
            Suite::Aes128GcmSha256 => "AES-128-GCM",
            Suite::Aes256GcmSha384 => "AES-256-GCM",
            Suite::Chacha20Poly1305Sha256 => "CHACHA20-POLY1305",
        }
    }

    fn aead(self) -> &'static aead::Algorithm {
        match self {
            Suite::Aes128GcmSha256 => &aead::AES_128_GCM,
            Suite::Aes256GcmSha384 => &aead::AES_256_GCM,
            Suite::Chacha20Poly1305Sha256 => &aead::CHACHA20_POLY1305,
        }
    }

    fn hkdf(self) -> hkdf::Algorithm {
        match self {
            Suite::Aes128GcmSha256 | Suite::Chacha20Poly1305Sha256 => hkdf::HKDF_SHA256,
            Suite::Aes256GcmSha384 => hkdf::HKDF_SHA384,
        }
    }

    /// Bytes of a traffic secret (the hash's output).
    pub fn secret_len(self) -> usize {
        hkdf::KeyType::len(&self.hkdf())
    }
}

/// An output length for HKDF-Expand.
struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-Expand-Label(secret, label, "", len) (RFC 8446 §7.1): `expand` gets the HkdfLabel
/// (the info of HKDF-Expand) for `len` bytes of output.
fn with_label<R>(
    label: &[u8],
    len: usize,
    expand: impl FnOnce(&[&[u8]]) -> Result<R, aws_lc_rs::error::Unspecified>,
) -> Result<R, TlsError> {
    let err = || {
        TlsError::Setup(format!(
            "HKDF-Expand-Label({})",
            String::from_utf8_lossy(label)
        ))
    };
    let len = u16::try_from(len).map_err(|_| err())?.to_be_bytes();
    let label_len = [u8::try_from(6 + label.len()).map_err(|_| err())?];
    expand(&[&len, &label_len, b"tls13 ", label, &[0]]).map_err(|_| err())
}

/// HKDF-Expand-Label(secret, label, "", out.len()) into `out`.
fn expand_label(secret: &Prk, label: &[u8], out: &mut [u8]) -> Result<(), TlsError> {
    with_label(label, out.len(), |info| {
        secret.expand(info, Len(out.len()))?.fill(out)
    })
}

/// Key bytes derived from a traffic secret, overwritten when dropped.
struct KeyBytes {
    key: [u8; 32],
    len: usize,
    iv: [u8; 12],
}

impl KeyBytes {
    /// RFC 8446 §7.3: key = HKDF-Expand-Label(secret, "key", "", key_length), iv likewise.
    fn derive(suite: Suite, secret: &Prk) -> Result<KeyBytes, TlsError> {
        let mut k = KeyBytes {
            key: [0; 32],
            len: suite.aead().key_len().min(32),
            iv: [0; 12],
        };
        let len = k.len;
        expand_label(secret, b"key", &mut k.key[..len])?;
        expand_label(secret, b"iv", &mut k.iv)?;
        Ok(k)
    }

    fn key(&self) -> &[u8] {
        self.key.get(..self.len).unwrap_or_default()
    }
}

impl Drop for KeyBytes {
    fn drop(&mut self) {
        self.key.fill(0);
        self.iv.fill(0);
        std::hint::black_box(&mut *self);
    }
}

/// One direction's traffic secret, key, IV and record sequence number.
pub struct Direction {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
    suite: Suite,
    /// application_traffic_secret_N, the next generation's source.
    secret: Prk,
    /// Records one key may protect.
    limit: u64,
    /// Key updates so far (N).
    updates: u64,
}

impl std::fmt::Debug for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Direction")
            .field("suite", &self.suite)
            .field("seq", &self.seq)
            .field("updates", &self.updates)
            .finish_non_exhaustive()
    }
}

impl Direction {
    /// A direction from its application traffic secret (`Suite::secret_len` bytes), at
    /// sequence number 0.
    pub fn new(suite: Suite, secret: &[u8]) -> Result<Direction, TlsError> {
        if secret.len() != suite.secret_len() {
            return Err(TlsError::Setup(format!(
                "a {} traffic secret has {} bytes; this one has {}",
                suite.name(),
                suite.secret_len(),
                secret.len()
            )));
        }
        Direction::from_prk(suite, Prk::new_less_safe(suite.hkdf(), secret))
    }

    pub(crate) fn from_prk(suite: Suite, secret: Prk) -> Result<Direction, TlsError> {
        let k = KeyBytes::derive(suite, &secret)?;
        Ok(Direction {
            key: aead_key(suite, &k)?,
            iv: k.iv,
            seq: 0,
            suite,
            secret,
            limit: MAX_RECORDS,
            updates: 0,
        })
    }

    /// Lower the number of records one key may protect (tests: many key updates in a short
    /// session). Clamped to 2..=[`MAX_RECORDS`].
    #[doc(hidden)]
    pub fn with_records_per_key(mut self, records: u64) -> Direction {
        self.limit = records.clamp(2, MAX_RECORDS);
        self
    }

    /// Whether these are the key and IV rustls derived (`secrets`, at sequence number 0).
    pub fn matches(&self, secrets: &ConnectionTrafficSecrets) -> bool {
        let (key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv }
            | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
            | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (key.as_ref(), iv.as_ref()),
            _ => return false,
        };
        match KeyBytes::derive(self.suite, &self.secret) {
            Ok(k) => Suite::of(secrets).ok() == Some(self.suite) && k.key() == key && k.iv == iv,
            Err(_) => false,
        }
    }

    /// The AEAD in use (for logs).
    pub fn suite(&self) -> &'static str {
        self.suite.name()
    }

    /// Key updates so far.
    pub fn key_updates(&self) -> u64 {
        self.updates
    }

    /// Whether a sealer should update its key before its next record (half the limit used).
    fn update_due(&self) -> bool {
        self.seq >= self.limit / 2
    }

    /// Move to the next generation: secret_N+1 = HKDF-Expand-Label(secret_N, "traffic upd",
    /// "", Hash.length), its key and IV, sequence number 0.
    fn update(&mut self) -> Result<(), TlsError> {
        let hash = self.suite.hkdf();
        let next = with_label(b"traffic upd", hkdf::KeyType::len(&hash), |info| {
            self.secret.expand(info, hash).map(Prk::from)
        })?;
        let k = KeyBytes::derive(self.suite, &next)?;
        self.key = aead_key(self.suite, &k)?;
        self.iv = k.iv;
        self.secret = next;
        self.seq = 0;
        self.updates += 1;
        Ok(())
    }

    /// The nonce of the next record; advances the sequence number.
    fn next_nonce(&mut self) -> Result<Nonce, TlsError> {
        if self.seq >= self.limit {
            return Err(TlsError::KeyExhausted { limit: self.limit });
        }
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq += 1;
        Ok(Nonce::assume_unique_for_key(n))
    }
}

fn aead_key(suite: Suite, k: &KeyBytes) -> Result<LessSafeKey, TlsError> {
    let key = UnboundKey::new(suite.aead(), k.key())
        .map_err(|_| TlsError::Setup("traffic key of the wrong length".into()))?;
    Ok(LessSafeKey::new(key))
}

/// Seals plaintext into application-data records, updating its key (a KeyUpdate record
/// first) when the key has protected half the records it may, or when the peer asked.
#[derive(Debug)]
pub struct Sealer {
    dir: Direction,
    record_size: usize,
    /// The peer sent update_requested: send a KeyUpdate before the next record.
    update_requested: bool,
}

impl Sealer {
    /// A sealer whose records carry at most `record_size` plaintext bytes (clamped to
    /// 1..=16384).
    pub fn new(dir: Direction, record_size: usize) -> Sealer {
        Sealer {
            dir,
            record_size: record_size.clamp(1, MAX_PLAINTEXT),
            update_requested: false,
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

    /// KeyUpdates sent so far.
    pub fn key_updates(&self) -> u64 {
        self.dir.key_updates()
    }

    /// The peer asked for a key update (RFC 8446 §4.6.3: answer before the next application
    /// data): the next record is preceded by this side's KeyUpdate.
    pub fn request_key_update(&mut self) {
        self.update_requested = true;
    }

    /// Bytes on the wire for `plain` bytes of plaintext sealed next (KeyUpdate records
    /// included).
    pub fn sealed_len(&self, plain: usize) -> usize {
        let records = plain.div_ceil(self.record_size) as u64;
        // Each key carries `per_key` application records, then a KeyUpdate.
        let per_key = (self.dir.limit / 2).max(1);
        let before_first = if self.update_requested {
            0
        } else {
            per_key.saturating_sub(self.dir.seq)
        };
        let updates = records.saturating_sub(before_first).div_ceil(per_key);
        plain + records as usize * OVERHEAD + updates as usize * KEY_UPDATE_LEN
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
                    if self.update_requested || self.dir.update_due() {
                        self.key_update(out)?;
                    }
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
                        self.close_record(out, start, CT_APPLICATION_DATA)?;
                    }
                }
            }
        }
        if let Some(start) = record_start {
            self.close_record(out, start, CT_APPLICATION_DATA)?;
        }
        Ok(())
    }

    /// Append a KeyUpdate record (update_not_requested) sealed with the current key, then
    /// switch to the next generation.
    fn key_update(&mut self, out: &mut Vec<u8>) -> Result<(), TlsError> {
        let start = out.len();
        out.extend_from_slice(&[CT_APPLICATION_DATA, 3, 3, 0, 0]);
        out.extend_from_slice(&KEY_UPDATE);
        self.close_record(out, start, CT_HANDSHAKE)?;
        self.dir.update()?;
        self.update_requested = false;
        tracing::debug!(updates = self.dir.updates, "TLS: sent KeyUpdate");
        Ok(())
    }

    /// Finish the record that starts at `out[start]`: inner content type, length, seal, tag.
    fn close_record(&mut self, out: &mut Vec<u8>, start: usize, ctype: u8) -> Result<(), TlsError> {
        out.push(ctype);
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

pub use super::Need;

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
    /// The peer's last KeyUpdate had update_requested, not yet taken.
    update_requested: bool,
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
            update_requested: false,
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

    /// KeyUpdates received so far.
    pub fn key_updates(&self) -> u64 {
        self.dir.key_updates()
    }

    /// Whether the peer asked for a key update since the last call (its KeyUpdate had
    /// update_requested); the connection's [`Sealer::request_key_update`] answers it. A
    /// channel's receiver, which never sends, ignores it.
    pub fn take_update_request(&mut self) -> bool {
        std::mem::take(&mut self.update_requested)
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
        // A handshake record after the handshake must be exactly one KeyUpdate.
        let update = (ctype == CT_HANDSHAKE).then(|| parse_key_update(&plain[..type_at]));
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
            CT_HANDSHAKE => {
                let requested = match update {
                    Some(Ok(r)) => r,
                    Some(Err(detail)) => return Err(TlsError::BadRecord { record, detail }),
                    None => false,
                };
                // The peer seals everything after this record with its next key.
                self.dir.update()?;
                self.update_requested |= requested;
                self.p0 = self.start;
                self.p1 = self.start;
                tracing::debug!(
                    updates = self.dir.updates,
                    requested,
                    "TLS: received KeyUpdate"
                );
                Ok(true)
            }
            other => Err(TlsError::BadRecord {
                record,
                detail: format!("content type {other}"),
            }),
        }
    }
}

/// The handshake bytes of one record after the handshake: `Ok(update_requested)` for a
/// well-formed KeyUpdate that fills the record, else what is wrong with them.
fn parse_key_update(msg: &[u8]) -> Result<bool, String> {
    let Some((&kind, rest)) = msg.split_first() else {
        return Err("an empty handshake record".into());
    };
    if kind != HT_KEY_UPDATE {
        return Err(format!(
            "handshake message type {kind} after the handshake; only key_update (24) may follow it"
        ));
    }
    let Some((len, body)) = rest.split_first_chunk::<3>() else {
        return Err(format!(
            "a key_update cut at its record's end ({} bytes); it must fill one record",
            msg.len()
        ));
    };
    let len = u32::from_be_bytes([0, len[0], len[1], len[2]]);
    if len != 1 {
        return Err(format!("a key_update of length {len}; it must be 1"));
    }
    match body {
        [0] => Ok(false),
        [1] => Ok(true),
        [v] => Err(format!(
            "key_update request_update {v}; it must be 0 or 1"
        )),
        [] => Err("a key_update cut at its record's end (4 bytes); it must fill one record".into()),
        [_, more @ ..] => Err(format!(
            "a key_update followed by {} more handshake bytes in its record; it must end its record",
            more.len()
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    fn dir(seq: u64, records_per_key: u64) -> Direction {
        let mut d = Direction::new(Suite::Aes256GcmSha384, &[7u8; 48])
            .unwrap()
            .with_records_per_key(records_per_key);
        d.seq = seq;
        d
    }

    fn pair(seq: u64) -> (Direction, Direction) {
        (dir(seq, MAX_RECORDS), dir(seq, MAX_RECORDS))
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
        // A reader refuses a peer that keeps one key past the limit.
        let mut d = dir(0, 8);
        for _ in 0..8 {
            d.next_nonce().unwrap();
        }
        assert!(matches!(
            d.next_nonce(),
            Err(TlsError::KeyExhausted { limit: 8 })
        ));
        // A sealer updates its key instead (the KeyUpdate record uses the old key's last
        // allowed sequence number at most).
        let (tx, rx) = (dir(0, 8), dir(0, 8));
        let mut s = Sealer::new(tx, 16);
        let mut r = RecordReader::new(rx, 1 << 16);
        let data = vec![3u8; 16 * 100];
        let mut wire = Vec::new();
        s.seal([&data[..]], &mut wire).unwrap();
        assert_eq!(read_all(&mut r, &wire, 999).unwrap(), data);
        assert_eq!(s.key_updates(), 24, "100 records, 4 per key");
    }

    #[test]
    fn matches_only_the_keys_its_secret_gives() {
        use rustls::crypto::cipher::{AeadKey, Iv};
        let d = dir(0, MAX_RECORDS);
        let k = KeyBytes::derive(Suite::Aes256GcmSha384, &d.secret).unwrap();
        let mut key = [0u8; 32];
        key.copy_from_slice(k.key());
        let same = ConnectionTrafficSecrets::Aes256Gcm {
            key: AeadKey::from(key),
            iv: Iv::from(k.iv),
        };
        assert!(d.matches(&same));
        let mut other = key;
        other[31] ^= 1;
        let wrong_key = ConnectionTrafficSecrets::Aes256Gcm {
            key: AeadKey::from(other),
            iv: Iv::from(k.iv),
        };
        assert!(!d.matches(&wrong_key));
        let wrong_suite = ConnectionTrafficSecrets::Chacha20Poly1305 {
            key: AeadKey::from(key),
            iv: Iv::from(k.iv),
        };
        assert!(!d.matches(&wrong_suite));
        assert!(
            Direction::new(Suite::Aes128GcmSha256, &[1; 48]).is_err(),
            "SHA-256 secrets have 32 bytes"
        );
    }

    /// A reader with `records_per_key`, fed `wire` whole.
    fn reader_with(wire: &[u8], records_per_key: u64) -> RecordReader {
        let mut r = RecordReader::new(dir(0, records_per_key), 1 << 16);
        r.space()[..wire.len()].copy_from_slice(wire);
        r.filled(wire.len());
        r
    }

    #[test]
    fn seals_and_opens_across_many_key_updates() {
        for (rs, per_key) in [(1000, 10), (16384, 3), (4096, 2), (777, 301)] {
            let mut s = Sealer::new(dir(0, per_key), rs);
            let mut r = RecordReader::new(dir(0, per_key), 40_000);
            let mut sent = Vec::new();
            let mut got = Vec::new();
            let mut records = 0;
            for i in 0..60u32 {
                let piece: Vec<u8> = (0..(i * 2999) % 70_000 + 1)
                    .map(|j| (j ^ i) as u8)
                    .collect();
                let mut wire = Vec::new();
                let want = s.sealed_len(piece.len());
                s.seal(
                    [&piece[..4.min(piece.len())], &piece[4.min(piece.len())..]],
                    &mut wire,
                )
                .unwrap();
                assert_eq!(wire.len(), want, "sealed_len counts the KeyUpdate records");
                records += piece.len().div_ceil(rs) as u64;
                got.extend(read_all(&mut r, &wire, 1500).unwrap());
                sent.extend(piece);
            }
            assert_eq!(got, sent, "record size {rs}, {per_key} records per key");
            let per = per_key / 2;
            assert_eq!(s.key_updates(), (records - 1) / per, "{rs}/{per_key}");
            assert_eq!(r.key_updates(), s.key_updates());
            assert!(s.key_updates() >= 10, "{rs}/{per_key}: {}", s.key_updates());
            assert_eq!(r.need(), Need::Boundary);
        }
    }

    #[test]
    fn key_update_is_one_handshake_record_as_rfc_8446_says() {
        // Two records per key: the third record is preceded by a KeyUpdate.
        let mut s = Sealer::new(dir(0, 4), 10);
        let mut wire = Vec::new();
        s.seal([&[1u8; 30][..]], &mut wire).unwrap();
        let rec = 10 + OVERHEAD;
        assert_eq!(wire.len(), 3 * rec + KEY_UPDATE_LEN);
        let ku = &wire[2 * rec..2 * rec + KEY_UPDATE_LEN];
        assert_eq!(
            ku[..HEADER_LEN],
            [23, 3, 3, 0, 22],
            "outer header: application data"
        );
        // Opened with the old key at sequence number 2: key_update, length 1,
        // update_not_requested, inner content type handshake.
        let mut old = dir(2, 4);
        let nonce = old.next_nonce().unwrap();
        let mut body = ku[HEADER_LEN..].to_vec();
        let header: [u8; 5] = ku[..HEADER_LEN].try_into().unwrap();
        let plain = old
            .key
            .open_in_place(nonce, Aad::from(header), &mut body)
            .unwrap();
        assert_eq!(plain, [24, 0, 0, 1, 0, 22]);
        // The record after it is sealed with secret_1 at sequence number 0.
        let mut next = dir(0, 4);
        next.update().unwrap();
        let nonce = next.next_nonce().unwrap();
        let tail = &wire[2 * rec + KEY_UPDATE_LEN..];
        let header: [u8; 5] = tail[..HEADER_LEN].try_into().unwrap();
        let mut body = tail[HEADER_LEN..].to_vec();
        let plain = next
            .key
            .open_in_place(nonce, Aad::from(header), &mut body)
            .unwrap();
        assert_eq!(plain[..10], [1u8; 10]);
    }

    #[test]
    fn a_requested_update_is_answered_before_the_next_record() {
        let mut s = Sealer::new(dir(0, MAX_RECORDS), 100);
        let mut wire = Vec::new();
        s.request_key_update();
        assert_eq!(s.sealed_len(50), 50 + OVERHEAD + KEY_UPDATE_LEN);
        s.seal([&[5u8; 50][..]], &mut wire).unwrap();
        assert_eq!(wire.len(), 50 + OVERHEAD + KEY_UPDATE_LEN);
        assert_eq!(s.key_updates(), 1);
        let mut r = reader_with(&wire, MAX_RECORDS);
        assert!(r.open_next().unwrap(), "the KeyUpdate record comes first");
        assert!(r.plaintext().is_empty());
        assert_eq!(r.key_updates(), 1);
        assert!(r.open_next().unwrap());
        assert_eq!(r.plaintext(), [5u8; 50]);
        // Answered once.
        s.seal([&[5u8; 50][..]], &mut wire).unwrap();
        assert_eq!(wire.len(), 50 + OVERHEAD);
        assert_eq!(s.key_updates(), 1);
    }

    /// A stream of one record whose inner plaintext is `msg` with content type handshake,
    /// sealed with the initial key.
    fn handshake_record(msg: &[u8]) -> Vec<u8> {
        let mut s = Sealer::new(dir(0, MAX_RECORDS), MAX_PLAINTEXT);
        let mut out = vec![CT_APPLICATION_DATA, 3, 3, 0, 0];
        out.extend_from_slice(msg);
        s.close_record(&mut out, 0, CT_HANDSHAKE).unwrap();
        out
    }

    #[test]
    fn a_peers_update_request_is_remembered_for_the_sealer() {
        let mut r = reader_with(&handshake_record(&[24, 0, 0, 1, 1]), MAX_RECORDS);
        assert!(r.open_next().unwrap());
        assert!(r.plaintext().is_empty());
        assert_eq!(r.key_updates(), 1);
        assert!(r.take_update_request());
        assert!(!r.take_update_request(), "taken once");
        let mut r = reader_with(&handshake_record(&[24, 0, 0, 1, 0]), MAX_RECORDS);
        assert!(r.open_next().unwrap());
        assert!(!r.take_update_request());
    }

    #[test]
    fn malformed_key_updates_are_refused() {
        for (msg, says) in [
            (&[][..], "empty handshake record"),
            (&[4, 0, 0, 1, 0][..], "type 4 after the handshake"),
            (&[24, 0, 0, 2, 0, 0][..], "length 2"),
            (&[24, 0, 0, 0][..], "length 0"),
            (&[24, 0, 0, 1, 2][..], "request_update 2"),
            (&[24, 0, 0, 1, 0xff][..], "request_update 255"),
            (&[24, 0, 0][..], "cut at its record's end (3 bytes)"),
            (&[24, 0, 0, 1][..], "cut at its record's end (4 bytes)"),
            (
                &[24, 0, 0, 1, 0, 24, 0, 0, 1, 0][..],
                "followed by 5 more handshake bytes",
            ),
        ] {
            let mut r = reader_with(&handshake_record(msg), MAX_RECORDS);
            let err = r.open_next().unwrap_err();
            let text = err.to_string();
            assert!(
                matches!(err, TlsError::BadRecord { record: 0, .. }) && text.contains(says),
                "{msg:?}: {text}"
            );
            assert!(!text.contains('\n'), "one line: {text}");
            assert_eq!(r.key_updates(), 0, "{msg:?}: no key change");
        }
        // An all-zero handshake record has no content type at all.
        let mut r = reader_with(&handshake_record(&[0, 0, 0]), MAX_RECORDS);
        assert!(r.open_next().is_err());
    }
}
