//! Sealing of what the proxy stores in a shared store (Redis): AES-256-GCM under `shared.key_file`, so the store
//! never holds an access token, a refresh token or a password in the clear.
//!
//! A sealed value is `nonce (12 bytes) || ciphertext || tag (16 bytes)`. The nonce is random for every seal
//! (96 random bits: collisions stay negligible far beyond the few thousand tokens a year an account sees). The
//! value is bound to the name it is stored under (the AEAD's associated data), so a value copied to another key
//! does not open. A value that does not open (another key, tampering, another name) is simply absent.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

/// Why a sealing key is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not 64 hexadecimal characters.
    #[error("the shared key must be 32 random bytes written as 64 hex characters (found {found} characters{detail}); make one with `openssl rand -hex 32`")]
    Malformed {
        /// How many characters were found (after trimming white space).
        found: usize,
        /// `, not all hex` when the length was right but a character was not.
        detail: &'static str,
    },
}

/// The AES-256-GCM key that seals shared values. Its `Debug` never prints the key.
pub struct SealKey {
    key: LessSafeKey,
    rng: SystemRandom,
    /// A SHA-256 of the key, so a reload can tell a changed key from the same one without keeping the bytes.
    fingerprint: [u8; 32],
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey([redacted])")
    }
}

impl SealKey {
    /// A key from its 64-hex-character text (surrounding white space, such as a file's final newline, ignored).
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        let mut bytes = [0u8; 32];
        if text.len() != 64 {
            return Err(KeyError::Malformed {
                found: text.chars().count(),
                detail: "",
            });
        }
        for (i, pair) in text.as_bytes().chunks(2).enumerate() {
            let hi = hex_digit(pair[0]);
            let lo = hex_digit(pair[1]);
            match (hi, lo) {
                (Some(hi), Some(lo)) => bytes[i] = hi << 4 | lo,
                _ => {
                    return Err(KeyError::Malformed {
                        found: 64,
                        detail: ", not all hex",
                    })
                }
            }
        }
        let unbound =
            UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| KeyError::Malformed { found: 64, detail: "" })?;
        let fingerprint = ring::digest::digest(&ring::digest::SHA256, &bytes);
        let mut print = [0u8; 32];
        print.copy_from_slice(fingerprint.as_ref());
        Ok(Self {
            key: LessSafeKey::new(unbound),
            rng: SystemRandom::new(),
            fingerprint: print,
        })
    }

    /// Whether `other` is the same key (a reload that kept it needs no new Redis client).
    pub fn same_as(&self, other: &SealKey) -> bool {
        self.fingerprint == other.fingerprint
    }

    /// Seals `plain` for storage under `name`. `None` only if the system's random source fails.
    pub fn seal(&self, name: &str, plain: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(NONCE_LEN + plain.len() + AES_256_GCM.tag_len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let (head, body) = out.split_at_mut(NONCE_LEN);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(head.try_into().ok()?),
                Aad::from(name.as_bytes()),
                body,
            )
            .ok()?;
        out.extend_from_slice(tag.as_ref());
        Some(out)
    }

    /// Opens a value stored under `name`; `None` when it does not open (another key, another name, tampered,
    /// truncated).
    pub fn open(&self, name: &str, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return None;
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let mut body = body.to_vec();
        let plain = self
            .key
            .open_in_place(
                Nonce::try_assume_unique_for_key(nonce).ok()?,
                Aad::from(name.as_bytes()),
                &mut body,
            )
            .ok()?;
        let len = plain.len();
        body.truncate(len);
        Some(body)
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const OTHER: &str = "ff0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn sealed_value_opens_only_with_the_same_key_and_name() {
        let key = SealKey::from_hex(&format!("{KEY}\n")).unwrap();
        let sealed = key.seal("zp:1:token", b"eyJhbGciOi.secret.token").unwrap();
        assert_eq!(key.open("zp:1:token", &sealed).unwrap(), b"eyJhbGciOi.secret.token");
        assert!(key.open("zp:1:refresh", &sealed).is_none(), "bound to its name");
        assert!(SealKey::from_hex(OTHER).unwrap().open("zp:1:token", &sealed).is_none());
        let mut tampered = sealed.clone();
        tampered[NONCE_LEN + 2] ^= 1;
        assert!(key.open("zp:1:token", &tampered).is_none());
        assert!(key.open("zp:1:token", &sealed[..10]).is_none());
    }

    #[test]
    fn the_plain_text_appears_nowhere_in_the_sealed_value_and_nonces_differ() {
        let key = SealKey::from_hex(KEY).unwrap();
        let a = key.seal("n", b"access-token-value").unwrap();
        let b = key.seal("n", b"access-token-value").unwrap();
        assert_ne!(a, b);
        assert!(!a.windows(6).any(|w| w == b"access"));
    }

    #[test]
    fn malformed_keys_say_how_to_make_one() {
        let err = SealKey::from_hex("abcd").unwrap_err();
        assert!(err.to_string().contains("openssl rand -hex 32"), "{err}");
        assert!(SealKey::from_hex(&"zz".repeat(32)).is_err());
        assert_eq!(format!("{:?}", SealKey::from_hex(KEY).unwrap()), "SealKey([redacted])");
    }
}
