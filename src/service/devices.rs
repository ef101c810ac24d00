//! Device tokens (OWASP's "device cookie"): after a successful login the client gets an
//! opaque token naming this device for this account. A later login of the same account
//! that presents it is judged only by that device's own failures, so a stranger's failed
//! attempts can never lock the owner's known devices out.
//!
//! The token is `device id (16 bytes) || issued at (8 bytes, big-endian seconds) || HMAC`,
//! base64url, where the HMAC-SHA256 (under a server secret shared by every instance, see
//! `keys::DEVICE_SECRET`) covers the normalised email as well: a token is valid only for the
//! account it was issued to, and the email is not in the token. Checking it needs no
//! database read, so it happens before the limiter, like the rest of login's admission.

use std::time::Duration;

use aws_lc_rs::hmac;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use secrecy::ExposeSecret as _;
use uuid::Uuid;

/// How long a device stays known without logging in again: each successful login from it
/// issues a fresh token.
pub const DEVICE_TOKEN_TTL: Duration = Duration::from_secs(365 * 86400);
const DOMAIN: &[u8] = b"latchkey-device-v1\n";
const PAYLOAD: usize = 16 + 8;
const TOKEN_BYTES: usize = PAYLOAD + 32;

/// The key device tokens are signed with.
pub struct DeviceKey(hmac::Key);

impl DeviceKey {
    pub fn new(secret: &secrecy::SecretBox<[u8; 32]>) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, secret.expose_secret()))
    }

    fn mac_input(account: &str, payload: &[u8]) -> Vec<u8> {
        [DOMAIN, account.as_bytes(), b"\n", payload].concat()
    }

    /// A token naming `device` for `account` (the normalised email).
    pub fn issue(&self, account: &str, device: Uuid, now: DateTime<Utc>) -> String {
        let mut payload = Vec::with_capacity(TOKEN_BYTES);
        payload.extend_from_slice(device.as_bytes());
        payload.extend_from_slice(&now.timestamp().to_be_bytes());
        let tag = hmac::sign(&self.0, &Self::mac_input(account, &payload));
        payload.extend_from_slice(tag.as_ref());
        URL_SAFE_NO_PAD.encode(payload)
    }

    /// The device a token names, if it was issued for `account` and has not expired.
    pub fn verify(&self, account: &str, token: &str, now: DateTime<Utc>) -> Option<Uuid> {
        if token.len() > 128 {
            return None;
        }
        let raw = URL_SAFE_NO_PAD.decode(token).ok()?;
        if raw.len() != TOKEN_BYTES {
            return None;
        }
        let (payload, tag) = raw.split_at(PAYLOAD);
        hmac::verify(&self.0, &Self::mac_input(account, payload), tag).ok()?;
        let device = Uuid::from_slice(&payload[..16]).ok()?;
        let issued = i64::from_be_bytes(payload[16..].try_into().ok()?);
        let ttl = i64::try_from(DEVICE_TOKEN_TTL.as_secs()).unwrap_or(i64::MAX);
        (now.timestamp() < issued.saturating_add(ttl)).then_some(device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> DeviceKey {
        DeviceKey::new(&secrecy::SecretBox::new(Box::new([byte; 32])))
    }

    #[test]
    fn a_device_token_is_valid_only_for_its_account_key_and_lifetime() {
        let now = DateTime::from_timestamp(1_900_000_000, 0).expect("ts");
        let device = Uuid::new_v4();
        let token = key(1).issue("ada@example.com", device, now);
        assert_eq!(key(1).verify("ada@example.com", &token, now), Some(device));
        assert_eq!(key(1).verify("eve@example.com", &token, now), None, "another account");
        assert_eq!(key(2).verify("ada@example.com", &token, now), None, "another server secret");
        let later = now + chrono::Duration::from_std(DEVICE_TOKEN_TTL).expect("ttl");
        assert_eq!(key(1).verify("ada@example.com", &token, later), None, "expired");
        let mut forged = URL_SAFE_NO_PAD.decode(&token).expect("b64");
        forged[0] ^= 1;
        assert_eq!(
            key(1).verify("ada@example.com", &URL_SAFE_NO_PAD.encode(forged), now),
            None,
            "another device id"
        );
        assert_eq!(key(1).verify("ada@example.com", "garbage", now), None);
    }
}
