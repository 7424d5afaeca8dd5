//! Connection authentication with a shared secret: HMAC-SHA256 (RustCrypto's `hmac` and
//! `sha2`) over fresh per-session nonces. No home-made cryptography: every proof is one HMAC
//! with a distinct label, checked in constant time.
//!
//! Handshake (docs/wire-format.md §3.4):
//! 1. receiver → sender, on the control connection: `challenge { nonce_r, secret_required }`;
//! 2. sender → receiver: `hello` carrying `nonce_s` and
//!    `HMAC(secret, "pagewire v2 sender" ‖ nonce_r ‖ nonce_s ‖ uuid)`;
//! 3. receiver → sender: `hello-ok` carrying `HMAC(secret, "pagewire v2 receiver" ‖ nonce_r ‖
//!    nonce_s ‖ uuid)`, so the sender knows it talks to a holder of the secret too;
//! 4. each channel connection opens with `HMAC(secret, "pagewire v2 channel" ‖ nonce_r ‖
//!    nonce_s ‖ uuid ‖ channel_id)` (32 bytes) before its init packet.
//!
//! `nonce_r` is fresh for every control connection and `nonce_s` for every hello, and every
//! proof covers both, so no proof can be replayed into another session. The uuid adds no
//! freshness: it is the VM's identity and an embedder may fix it (`SenderConfig::vm_uuid`), so two
//! sessions of one VM carry the same uuid and still have unrelated proofs. This authenticates who may connect; it does not encrypt or sign the page stream
//! (run the migration network on a trusted link or inside an encrypted tunnel for that).

use std::path::Path;
use std::sync::Arc;

use hmac::{Hmac, KeyInit, Mac};
use pagewire_transport::control::{MAC_LEN, NONCE_LEN};
use sha2::Sha256;

use crate::error::SessionError;

type HmacSha256 = Hmac<Sha256>;

/// Shortest secret accepted (bytes).
pub const MIN_SECRET_LEN: usize = 16;

/// A shared secret. Its bytes never appear in Debug output or logs.
#[derive(Clone)]
pub struct Secret(Arc<Vec<u8>>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    /// A secret from bytes (at least [`MIN_SECRET_LEN`]).
    pub fn new(bytes: Vec<u8>) -> Result<Secret, SessionError> {
        if bytes.len() < MIN_SECRET_LEN {
            return Err(SessionError::Config(format!(
                "the shared secret has {} bytes; at least {MIN_SECRET_LEN} are required",
                bytes.len()
            )));
        }
        Ok(Secret(Arc::new(bytes)))
    }

    /// Read a secret file (trailing newlines are not part of the secret).
    pub fn from_file(path: &Path) -> Result<Secret, SessionError> {
        let mut bytes = std::fs::read(path)
            .map_err(|e| SessionError::Config(format!("secret file {}: {e}", path.display())))?;
        while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            bytes.pop();
        }
        Secret::new(bytes)
            .map_err(|e| SessionError::Config(format!("secret file {}: {e}", path.display())))
    }

    fn mac(&self, label: &[u8], parts: &[&[u8]]) -> HmacSha256 {
        // HMAC takes keys of any length: new_from_slice cannot fail for it.
        let mut m = match HmacSha256::new_from_slice(&self.0) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC accepts keys of any length"),
        };
        m.update(label);
        for p in parts {
            m.update(p);
        }
        m
    }

    fn tag(&self, label: &[u8], parts: &[&[u8]]) -> [u8; MAC_LEN] {
        self.mac(label, parts).finalize().into_bytes().into()
    }

    fn check(&self, label: &[u8], parts: &[&[u8]], got: &[u8; MAC_LEN]) -> bool {
        self.mac(label, parts).verify_slice(got).is_ok()
    }

    /// The sender's proof in its hello.
    pub fn sender_proof(
        &self,
        nonce_r: &[u8; NONCE_LEN],
        nonce_s: &[u8; NONCE_LEN],
        uuid: &[u8; 16],
    ) -> [u8; MAC_LEN] {
        self.tag(b"pagewire v2 sender", &[nonce_r, nonce_s, uuid])
    }

    /// Check a sender's proof (constant time).
    pub fn check_sender(
        &self,
        nonce_r: &[u8; NONCE_LEN],
        nonce_s: &[u8; NONCE_LEN],
        uuid: &[u8; 16],
        got: &[u8; MAC_LEN],
    ) -> bool {
        self.check(b"pagewire v2 sender", &[nonce_r, nonce_s, uuid], got)
    }

    /// The receiver's proof in its hello-ok.
    pub fn receiver_proof(
        &self,
        nonce_r: &[u8; NONCE_LEN],
        nonce_s: &[u8; NONCE_LEN],
        uuid: &[u8; 16],
    ) -> [u8; MAC_LEN] {
        self.tag(b"pagewire v2 receiver", &[nonce_r, nonce_s, uuid])
    }

    /// Check a receiver's proof (constant time).
    pub fn check_receiver(
        &self,
        nonce_r: &[u8; NONCE_LEN],
        nonce_s: &[u8; NONCE_LEN],
        uuid: &[u8; 16],
        got: &[u8; MAC_LEN],
    ) -> bool {
        self.check(b"pagewire v2 receiver", &[nonce_r, nonce_s, uuid], got)
    }

    /// The token that opens channel `id`'s connection.
    pub fn channel_token(
        &self,
        nonce_r: &[u8; NONCE_LEN],
        nonce_s: &[u8; NONCE_LEN],
        uuid: &[u8; 16],
        id: u8,
    ) -> [u8; MAC_LEN] {
        self.tag(b"pagewire v2 channel", &[nonce_r, nonce_s, uuid, &[id]])
    }

    /// Check a channel token (constant time).
    pub fn check_channel(
        &self,
        nonce_r: &[u8; NONCE_LEN],
        nonce_s: &[u8; NONCE_LEN],
        uuid: &[u8; 16],
        id: u8,
        got: &[u8; MAC_LEN],
    ) -> bool {
        self.check(
            b"pagewire v2 channel",
            &[nonce_r, nonce_s, uuid, &[id]],
            got,
        )
    }
}

/// A fresh random nonce from the operating system.
pub fn nonce() -> Result<[u8; NONCE_LEN], SessionError> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| SessionError::Internal(format!("random nonce: {e}")))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_depend_on_secret_nonces_and_role() {
        let a = Secret::new(b"0123456789abcdef-a".to_vec()).expect("secret");
        let b = Secret::new(b"0123456789abcdef-b".to_vec()).expect("secret");
        let (r, s, u) = ([1u8; 32], [2u8; 32], [3u8; 16]);
        let p = a.sender_proof(&r, &s, &u);
        assert!(a.check_sender(&r, &s, &u, &p));
        assert!(!b.check_sender(&r, &s, &u, &p), "another secret");
        assert!(
            !a.check_sender(&[9u8; 32], &s, &u, &p),
            "another challenge (no replay)"
        );
        assert!(
            !a.check_receiver(&r, &s, &u, &p),
            "a sender proof is not a receiver proof"
        );
        let t = a.channel_token(&r, &s, &u, 0);
        assert!(a.check_channel(&r, &s, &u, 0, &t));
        assert!(!a.check_channel(&r, &s, &u, 1, &t), "token is per channel");
    }

    /// A fixed VM uuid (SenderConfig::vm_uuid) must not make proofs replayable: with the same
    /// secret and uuid, a new session (new nonce_r from the receiver, new nonce_s from the
    /// sender) accepts none of the old session's proofs or tokens.
    #[test]
    fn same_uuid_two_sessions_proofs_do_not_replay() {
        let k = Secret::new(b"0123456789abcdef-k".to_vec()).expect("secret");
        let uuid = [0x42u8; 16];
        let (r1, s1) = ([1u8; 32], [2u8; 32]);
        let (r2, s2) = ([3u8; 32], [4u8; 32]);
        let sp = k.sender_proof(&r1, &s1, &uuid);
        let rp = k.receiver_proof(&r1, &s1, &uuid);
        let ct = k.channel_token(&r1, &s1, &uuid, 0);
        // The old proofs checked against session 2's nonces, and against one new nonce each.
        for (r, s) in [(r2, s2), (r2, s1), (r1, s2)] {
            assert!(!k.check_sender(&r, &s, &uuid, &sp));
            assert!(!k.check_receiver(&r, &s, &uuid, &rp));
            assert!(!k.check_channel(&r, &s, &uuid, 0, &ct));
        }
        // Session 2's own proofs are fine.
        assert!(k.check_channel(&r2, &s2, &uuid, 0, &k.channel_token(&r2, &s2, &uuid, 0)));
    }

    #[test]
    fn short_secrets_refused_and_file_newline_trimmed() {
        assert!(Secret::new(b"short".to_vec()).is_err());
        let dir = std::env::temp_dir().join(format!("pw-secret-{}", std::process::id()));
        std::fs::write(&dir, b"0123456789abcdefXYZ\n").expect("write");
        let s = Secret::from_file(&dir).expect("read");
        let direct = Secret::new(b"0123456789abcdefXYZ".to_vec()).expect("secret");
        let (r, n, u) = ([1u8; 32], [2u8; 32], [3u8; 16]);
        assert_eq!(s.sender_proof(&r, &n, &u), direct.sender_proof(&r, &n, &u));
        let _ = std::fs::remove_file(&dir);
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
    }
}
