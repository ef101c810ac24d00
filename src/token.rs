//! Keys, signing, verification and the JWKS: the only module that touches jsonwebtoken.
//!
//! Access tokens are JWTs (RFC 9068: `typ: at+jwt`, header `kid`) signed with Ed25519.
//! Signing keys live in SQL (`signing_keys`) so every instance and every restart signs and
//! verifies with the same keys; one is generated on first start (under the start-up lock).
//! Verification pins the algorithm to the key's own and checks `iss`, `aud` and `exp`
//! against the server's clock (a small leeway). Refresh tokens are opaque random strings;
//! only their SHA-256 is ever stored.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use sea_orm::{
    ActiveModelTrait as _, ConnectionTrait, EntityTrait as _, IntoActiveModel as _, QueryOrder as _,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use uuid::Uuid;

use crate::error::{ApiError, ErrorCode};
use crate::store::entity::signing_key;

/// Clock skew tolerated on `exp`.
pub const LEEWAY: Duration = Duration::from_secs(5);
pub const ACCESS_TOKEN_TYPE: &str = "at+jwt";

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
}

struct Key {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    decoding: DecodingKey,
    public: Jwk,
}

/// The keys this instance signs and verifies with.
pub struct KeyRing {
    signer: Arc<Key>,
    verifiers: HashMap<String, Arc<Key>>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("signer", &self.signer.kid)
            .field("verifiers", &self.verifiers.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("database: {0}")]
    Db(#[from] sea_orm::DbErr),
    #[error("signing key {kid}: {reason}")]
    Invalid { kid: String, reason: String },
    #[error("no usable signing key")]
    NoSigner,
    #[error("random number generator: {0}")]
    Random(String),
}

/// PKCS#8 v1 prefix of an Ed25519 private key; the 32-byte seed follows (STACK trap 2).
const ED25519_PKCS8_V1_PREFIX: [u8; 16] =
    [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];

/// RFC 7638 thumbprint of an Ed25519 public key: SHA-256 over the required members in
/// lexicographic order, base64url. (jsonwebtoken's `thumbprint()` refuses OKP keys.)
pub fn ed25519_thumbprint(x: &str) -> String {
    let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

fn key_from_row(row: &signing_key::Model) -> Result<Key, KeyError> {
    let invalid = |reason: String| KeyError::Invalid { kid: row.kid.clone(), reason };
    if row.private_key_encryption.is_some() {
        return Err(invalid("the private key is encrypted and no key-encryption key is configured".into()));
    }
    match row.algorithm.as_str() {
        "EdDSA" => {
            let encoding = EncodingKey::from_ed_der(&row.private_key);
            let public: Jwk = serde_json::from_str(&row.public_jwk).map_err(|e| invalid(e.to_string()))?;
            let AlgorithmParameters::OctetKeyPair(okp) = &public.algorithm else {
                return Err(invalid("public key is not an OKP key".into()));
            };
            // The stored public key must be the private key's own.
            let derived =
                Jwk::from_encoding_key(&encoding, Algorithm::EdDSA).map_err(|e| invalid(e.to_string()))?;
            match &derived.algorithm {
                AlgorithmParameters::OctetKeyPair(d) if d.x == okp.x => {}
                _ => return Err(invalid("public key does not match the private key".into())),
            }
            let decoding = DecodingKey::from_ed_components(&okp.x).map_err(|e| invalid(e.to_string()))?;
            Ok(Key { kid: row.kid.clone(), alg: Algorithm::EdDSA, encoding, decoding, public })
        }
        other => Err(invalid(format!("unsupported algorithm {other}"))),
    }
}

/// A new Ed25519 key as a `signing_keys` row, active from `now`.
pub fn generate_ed25519(now: DateTime<Utc>) -> Result<signing_key::Model, KeyError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
    let mut der = Vec::with_capacity(48);
    der.extend_from_slice(&ED25519_PKCS8_V1_PREFIX);
    der.extend_from_slice(&seed);
    let encoding = EncodingKey::from_ed_der(&der);
    let mut jwk = Jwk::from_encoding_key(&encoding, Algorithm::EdDSA)
        .map_err(|e| KeyError::Invalid { kid: "(new)".into(), reason: e.to_string() })?;
    let AlgorithmParameters::OctetKeyPair(okp) = &jwk.algorithm else {
        return Err(KeyError::Invalid { kid: "(new)".into(), reason: "not an OKP key".into() });
    };
    let kid = ed25519_thumbprint(&okp.x);
    jwk.common.key_id = Some(kid.clone());
    jwk.common.public_key_use = Some(PublicKeyUse::Signature);
    let public_jwk = serde_json::to_string(&jwk)
        .map_err(|e| KeyError::Invalid { kid: kid.clone(), reason: e.to_string() })?;
    Ok(signing_key::Model {
        kid,
        algorithm: "EdDSA".into(),
        public_jwk,
        private_key: der,
        private_key_encryption: None,
        created_at: now,
        activates_at: now,
        retires_at: None,
    })
}

/// Makes sure a signing key exists; run once at start, under the start-up lock.
pub async fn ensure_signing_key(db: &impl ConnectionTrait, now: DateTime<Utc>) -> Result<(), KeyError> {
    let keys = signing_key::Entity::find().all(db).await?;
    // Any key not yet retired counts, even one that activates a moment from now (the
    // instance that made it may have a clock slightly ahead of ours): generating a second
    // "first" key would split instances.
    let usable = keys.iter().any(|k| k.retires_at.is_none_or(|r| r > now));
    if !usable {
        let row = generate_ed25519(now)?;
        let kid = row.kid.clone();
        row.into_active_model().insert(db).await?;
        tracing::info!(%kid, "generated a new Ed25519 signing key");
    }
    Ok(())
}

impl KeyRing {
    /// Loads every key that still verifies; the newest active one signs.
    pub async fn load(db: &impl ConnectionTrait, now: DateTime<Utc>) -> Result<Self, KeyError> {
        let rows = signing_key::Entity::find()
            .order_by_desc(signing_key::Column::ActivatesAt)
            .order_by_asc(signing_key::Column::Kid)
            .all(db)
            .await?;
        let mut verifiers = HashMap::new();
        let mut signer = None;
        for row in rows.iter().filter(|r| r.retires_at.is_none_or(|t| t > now)) {
            let key = Arc::new(key_from_row(row)?);
            if signer.is_none() && row.activates_at <= now {
                signer = Some(Arc::clone(&key));
            }
            verifiers.insert(row.kid.clone(), key);
        }
        // Clock skew between instances can leave a just-created key a moment in the future;
        // the earliest one then signs rather than nothing.
        let signer = match signer {
            Some(key) => key,
            None => rows
                .iter()
                .filter(|r| r.retires_at.is_none_or(|t| t > now))
                .min_by_key(|r| r.activates_at)
                .and_then(|r| verifiers.get(&r.kid).cloned())
                .ok_or(KeyError::NoSigner)?,
        };
        Ok(Self { signer, verifiers })
    }

    /// The public keys, as published at `/.well-known/jwks.json`.
    pub fn jwks(&self) -> JwkSet {
        let mut keys: Vec<Jwk> = self.verifiers.values().map(|k| k.public.clone()).collect();
        keys.sort_by(|a, b| a.common.key_id.cmp(&b.common.key_id));
        JwkSet { keys }
    }

    pub fn sign(&self, claims: &AccessClaims) -> Result<String, ApiError> {
        let mut header = Header::new(self.signer.alg);
        header.typ = Some(ACCESS_TOKEN_TYPE.into());
        header.kid = Some(self.signer.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.signer.encoding).map_err(ApiError::internal)
    }

    /// Signature (algorithm pinned to the key's own), `typ`, `iss`, `aud`, then `exp`
    /// against `now`. Says nothing about revocation: that is the store's question.
    pub fn verify(
        &self,
        token: &str,
        issuer: &str,
        audience: &str,
        now: DateTime<Utc>,
    ) -> Result<AccessClaims, ApiError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| ApiError::invalid_token("The token is malformed."))?;
        let key = header
            .kid
            .as_deref()
            .and_then(|kid| self.verifiers.get(kid))
            .ok_or_else(|| ApiError::invalid_token("The token was not signed by a known key."))?;
        if header.alg != key.alg {
            return Err(ApiError::invalid_token("The token's algorithm does not match its key."));
        }
        if !header.typ.as_deref().is_some_and(|t| {
            t.eq_ignore_ascii_case(ACCESS_TOKEN_TYPE) || t.eq_ignore_ascii_case("application/at+jwt")
        }) {
            return Err(ApiError::invalid_token("The token is not an access token."));
        }
        let mut validation = Validation::new(key.alg);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        // Expiry is checked below against the server's clock, so tests can control time.
        validation.validate_exp = false;
        validation.leeway = 0;
        let data = jsonwebtoken::decode::<AccessClaims>(token, &key.decoding, &validation)
            .map_err(|_| ApiError::invalid_token("The token's signature or claims are not valid."))?;
        let claims = data.claims;
        let leeway = i64::try_from(LEEWAY.as_secs()).unwrap_or(0);
        if now.timestamp() > claims.exp.saturating_add(leeway) {
            return Err(ApiError::new(ErrorCode::TokenExpired, "The access token has expired; refresh it."));
        }
        Ok(claims)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> KeyRing {
        let now = Utc::now();
        let model = generate_ed25519(now).expect("key");
        let key = Arc::new(key_from_row(&model).expect("load"));
        KeyRing { signer: Arc::clone(&key), verifiers: HashMap::from([(model.kid, key)]) }
    }

    fn claims(now: DateTime<Utc>) -> AccessClaims {
        AccessClaims {
            iss: "http://issuer".into(),
            aud: "aud".into(),
            sub: Uuid::new_v4(),
            client_id: "latchkey".into(),
            sid: Uuid::new_v4(),
            jti: Uuid::new_v4(),
            iat: now.timestamp(),
            exp: now.timestamp() + 900,
            roles: vec![],
        }
    }

    #[test]
    fn signs_and_verifies_with_kid_and_typ() {
        let ring = ring();
        let now = Utc::now();
        let c = claims(now);
        let token = ring.sign(&c).expect("sign");
        let header = jsonwebtoken::decode_header(&token).expect("header");
        assert_eq!(header.typ.as_deref(), Some("at+jwt"));
        assert_eq!(header.alg, Algorithm::EdDSA);
        assert_eq!(header.kid.as_deref(), Some(ring.signer.kid.as_str()));
        assert_eq!(ring.verify(&token, "http://issuer", "aud", now).expect("verify"), c);
    }

    #[test]
    fn refuses_wrong_issuer_audience_and_expiry() {
        let ring = ring();
        let now = Utc::now();
        let token = ring.sign(&claims(now)).expect("sign");
        assert_eq!(
            ring.verify(&token, "http://other", "aud", now).unwrap_err().code,
            ErrorCode::InvalidToken
        );
        assert_eq!(
            ring.verify(&token, "http://issuer", "other", now).unwrap_err().code,
            ErrorCode::InvalidToken
        );
        let later = now + chrono::Duration::seconds(900 + 6);
        assert_eq!(
            ring.verify(&token, "http://issuer", "aud", later).unwrap_err().code,
            ErrorCode::TokenExpired
        );
        let within_leeway = now + chrono::Duration::seconds(900 + 4);
        assert!(ring.verify(&token, "http://issuer", "aud", within_leeway).is_ok());
    }

    #[test]
    fn kid_is_the_rfc7638_thumbprint() {
        // RFC 8037 appendix A.3: the thumbprint of its example Ed25519 key.
        assert_eq!(
            ed25519_thumbprint("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
    }

    #[test]
    fn refresh_tokens_are_256_bit_and_hashed() {
        let t = new_refresh_token().expect("token");
        assert_eq!(URL_SAFE_NO_PAD.decode(&t).expect("b64").len(), 32);
        assert_ne!(t, new_refresh_token().expect("token"));
        let h = refresh_token_hash(&t);
        assert_eq!(h.len(), 64);
        assert!(!h.contains(&t));
    }
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
