//! Access-token claims and refresh tokens (opaque random strings; only their SHA-256 is
//! ever stored), and the sealing of a rotated token's successor. Keys, signing and
//! verification live in `keys`.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use uuid::Uuid;

use crate::error::ApiError;

/// The claims of an access token (RFC 9068 plus `sid` and `roles`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccessClaims {
    pub iss: String,
    pub aud: String,
    pub sub: Uuid,
    pub client_id: String,
    pub sid: Uuid,
    pub jti: Uuid,
    pub iat: i64,
    pub exp: i64,
    #[serde(default)]
    pub roles: Vec<String>,
    /// Whether the user's current email address has been verified (issue 15).
    #[serde(default)]
    pub email_verified: bool,
}

/// A new refresh token: 256 bits from the OS CSPRNG, base64url (43 characters).
pub fn new_refresh_token() -> Result<String, ApiError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(ApiError::internal)?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// What SQL stores instead of the refresh token: its SHA-256, hex.
pub fn refresh_token_hash(token: &str) -> String {
    crate::password::hex(&Sha256::digest(token.as_bytes()))
}

/// The successor of a rotated refresh token, sealed under a key only the parent's holder
/// can derive, so SQL can hand "the same successor" back during the grace window without
/// ever storing a usable token. The parent is 256 random bits, so one SHA-256 with a
/// domain label is a sound key derivation; the key is unique per parent, so a random
/// 96-bit nonce never repeats under it.
pub fn seal_successor(parent: &str, successor: &str) -> Result<Vec<u8>, ApiError> {
    use chacha20poly1305::aead::{Aead as _, KeyInit as _, Payload};
    let cipher = chacha20poly1305::ChaCha20Poly1305::new(&successor_key(parent).into());
    let mut nonce = [0u8; 12];
    getrandom::fill(&mut nonce).map_err(ApiError::internal)?;
    let sealed = cipher
        .encrypt(&nonce.into(), Payload { msg: successor.as_bytes(), aad: SEAL_AAD })
        .map_err(|_| ApiError::internal("sealing the successor failed"))?;
    Ok([nonce.as_slice(), &sealed].concat())
}

/// `None` unless `parent` is the token the successor was sealed under.
pub fn open_successor(parent: &str, sealed: &[u8]) -> Option<String> {
    use chacha20poly1305::aead::{Aead as _, KeyInit as _, Payload};
    let (nonce, ciphertext) = sealed.split_at_checked(12)?;
    let nonce: [u8; 12] = nonce.try_into().ok()?;
    let cipher = chacha20poly1305::ChaCha20Poly1305::new(&successor_key(parent).into());
    let plain = cipher.decrypt(&nonce.into(), Payload { msg: ciphertext, aad: SEAL_AAD }).ok()?;
    String::from_utf8(plain).ok()
}

const SEAL_AAD: &[u8] = b"latchkey refresh successor v1";

fn successor_key(parent: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"latchkey:successor-seal:v1:");
    h.update(parent.as_bytes());
    h.finalize().into()
}

#[cfg(test)]
mod seal_tests {
    use super::*;

    #[test]
    fn only_the_parent_opens_its_successor() {
        let parent = new_refresh_token().expect("token");
        let child = new_refresh_token().expect("token");
        let sealed = seal_successor(&parent, &child).expect("seal");
        assert!(!sealed.windows(child.len()).any(|w| w == child.as_bytes()), "not in clear");
        assert_eq!(open_successor(&parent, &sealed).as_deref(), Some(child.as_str()));
        assert_eq!(open_successor(&child, &sealed), None);
        let mut tampered = sealed.clone();
        if let Some(b) = tampered.last_mut() {
            *b ^= 1;
        }
        assert_eq!(open_successor(&parent, &tampered), None);
        assert_eq!(open_successor(&parent, &sealed[..5]), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_tokens_are_256_bit_and_only_hashed() {
        let t = new_refresh_token().expect("token");
        assert_eq!(URL_SAFE_NO_PAD.decode(&t).expect("b64").len(), 32);
        assert_ne!(t, new_refresh_token().expect("token"));
        let h = refresh_token_hash(&t);
        assert_eq!(h.len(), 64);
        assert!(!h.contains(&t));
    }
}
