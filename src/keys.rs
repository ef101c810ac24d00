//! Signing keys, signing, verification and the JWKS: the only module that touches
//! jsonwebtoken.
//!
//! Access tokens are JWTs (RFC 9068: `typ: at+jwt`, header `kid`) signed with the
//! algorithm of `JWT_ALGORITHM`: EdDSA (Ed25519, the default), ES256, RS256, or HS256 with
//! an explicit `JWT_SECRET`. Asymmetric keys live in SQL (`signing_keys`, private keys
//! sealed under `KEY_ENCRYPTION_KEY` when it is set), so every instance and every restart
//! signs and verifies with the same keys. Each key is published from creation, signs from
//! `activates_at` (so a rotation is pre-published for `KEY_PREPUBLISH`), and stays
//! published until `retires_at`, after the last token it signed has expired. Each
//! instance reloads the set every `KEYS_REFRESH_INTERVAL`. Verification pins the algorithm
//! to the key's own and checks `typ`, `iss`, `aud` and `exp` against the server's clock.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use aws_lc_rs::encoding::AsDer as _;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chacha20poly1305::aead::{Aead as _, KeyInit as _, Payload};
use chrono::{DateTime, Utc};
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use sea_orm::sea_query::{Expr, ExprTrait as _};
use sea_orm::{
    ActiveModelTrait as _, ColumnTrait as _, ConnectionTrait, EntityTrait as _, IntoActiveModel as _,
    QueryFilter as _, QueryOrder as _, Set,
};
use secrecy::{ExposeSecret as _, SecretBox, SecretString};
use sha2::{Digest as _, Sha256};

use crate::error::{ApiError, ErrorCode};
use crate::store::entity::{server_secret, signing_key};
use crate::token::AccessClaims;

/// Clock skew tolerated on `exp`.
pub const LEEWAY: Duration = Duration::from_secs(5);
pub const ACCESS_TOKEN_TYPE: &str = "at+jwt";
/// How a private key is sealed: its associated data binds the ciphertext to the row's kid,
/// algorithm and activation time, so a row edited in SQL no longer opens. The first format
/// bound the kid only; rows in it are re-sealed at start.
const SEALED_WITH: &str = "chacha20poly1305-v2";
const SEALED_WITH_KID_ONLY: &str = "chacha20poly1305";

/// A key-encryption key: 32 bytes.
pub type Kek = SecretBox<[u8; 32]>;

/// Everything about keys that comes from configuration.
#[derive(Debug)]
pub struct KeySettings {
    pub algorithm: Algorithm,
    pub hmac_secret: Option<SecretString>,
    pub kek: Option<Kek>,
    pub old_kek: Option<Kek>,
    /// How long a new key is published before it signs.
    pub prepublish: Duration,
    /// How long a token lives (a retired key stays published this long, plus leeway).
    pub access_token_ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("database: {0}")]
    Db(#[from] sea_orm::DbErr),
    #[error("signing key {kid}: {reason}")]
    Invalid { kid: String, reason: String },
    #[error("no usable signing key")]
    NoSigner,
    #[error("generating a key: {0}")]
    Generate(String),
}

fn invalid(kid: &str, reason: impl std::fmt::Display) -> KeyError {
    KeyError::Invalid { kid: kid.to_owned(), reason: reason.to_string() }
}

pub fn parse_algorithm(name: &str) -> Option<Algorithm> {
    match name {
        "EdDSA" => Some(Algorithm::EdDSA),
        "ES256" => Some(Algorithm::ES256),
        "RS256" => Some(Algorithm::RS256),
        "HS256" => Some(Algorithm::HS256),
        _ => None,
    }
}

pub fn algorithm_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::EdDSA => "EdDSA",
        Algorithm::ES256 => "ES256",
        Algorithm::RS256 => "RS256",
        Algorithm::HS256 => "HS256",
        _ => "unsupported",
    }
}

/// PKCS#8 v1 prefix of an Ed25519 private key; the 32-byte seed follows (STACK trap 2).
const ED25519_PKCS8_V1_PREFIX: [u8; 16] =
    [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];

/// A new private key for `alg`, as PKCS#8 DER.
fn generate_pkcs8(alg: Algorithm) -> Result<Vec<u8>, KeyError> {
    let err = |e: aws_lc_rs::error::Unspecified| KeyError::Generate(e.to_string());
    match alg {
        Algorithm::EdDSA => {
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).map_err(|e| KeyError::Generate(e.to_string()))?;
            Ok([ED25519_PKCS8_V1_PREFIX.as_slice(), &seed].concat())
        }
        Algorithm::ES256 => {
            let rng = aws_lc_rs::rand::SystemRandom::new();
            let doc = aws_lc_rs::signature::EcdsaKeyPair::generate_pkcs8(
                &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                &rng,
            )
            .map_err(err)?;
            Ok(doc.as_ref().to_vec())
        }
        Algorithm::RS256 => {
            let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).map_err(err)?;
            Ok(pair.as_der().map_err(err)?.as_ref().to_vec())
        }
        other => Err(KeyError::Generate(format!("{other:?} keys are not generated"))),
    }
}

fn encoding_key(alg: Algorithm, pkcs8: &[u8]) -> Result<EncodingKey, jsonwebtoken::errors::Error> {
    match alg {
        Algorithm::EdDSA => Ok(EncodingKey::from_ed_der(pkcs8)),
        Algorithm::ES256 => Ok(EncodingKey::from_ec_der(pkcs8)),
        // jsonwebtoken wants PKCS#1 DER for RSA; its PEM reader unwraps PKCS#8.
        _ => {
            let pem = format!(
                "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
                STANDARD.encode(pkcs8)
            );
            EncodingKey::from_rsa_pem(pem.as_bytes())
        }
    }
}

/// RFC 7638 thumbprint: SHA-256 over the required members in lexicographic order.
pub fn thumbprint(jwk: &Jwk) -> Option<String> {
    let canonical = match &jwk.algorithm {
        AlgorithmParameters::OctetKeyPair(k) => format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#, k.x),
        AlgorithmParameters::EllipticCurve(k) => {
            format!(r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#, k.x, k.y)
        }
        AlgorithmParameters::RSA(k) => format!(r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#, k.e, k.n),
        _ => return None,
    };
    Some(URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes())))
}

/// The public JWK of a private key, with `kid` (its thumbprint), `alg` and `use: sig`.
fn public_jwk(alg: Algorithm, encoding: &EncodingKey) -> Result<Jwk, KeyError> {
    let mut jwk = Jwk::from_encoding_key(encoding, alg).map_err(|e| invalid("(new)", e))?;
    let kid = thumbprint(&jwk).ok_or_else(|| invalid("(new)", "not an asymmetric key"))?;
    jwk.common.key_id = Some(kid);
    jwk.common.public_key_use = Some(PublicKeyUse::Signature);
    Ok(jwk)
}

/// What a sealed key is bound to: kid, algorithm and activation time (whole seconds, which
/// every database keeps exactly).
fn associated_data(kid: &str, algorithm: &str, activates_at: DateTime<Utc>) -> Vec<u8> {
    format!("{kid}\n{algorithm}\n{}", activates_at.timestamp()).into_bytes()
}

fn seal(kek: &Kek, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, KeyError> {
    let cipher = chacha20poly1305::ChaCha20Poly1305::new(kek.expose_secret().into());
    let mut nonce = [0u8; 12];
    getrandom::fill(&mut nonce).map_err(|e| KeyError::Generate(e.to_string()))?;
    let sealed = cipher
        .encrypt(&nonce.into(), Payload { msg: plain, aad })
        .map_err(|_| KeyError::Generate("sealing a private key failed".into()))?;
    Ok([nonce.as_slice(), &sealed].concat())
}

fn unseal(kek: &Kek, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    let (nonce, ciphertext) = sealed.split_at_checked(12)?;
    let nonce: [u8; 12] = nonce.try_into().ok()?;
    let cipher = chacha20poly1305::ChaCha20Poly1305::new(kek.expose_secret().into());
    cipher.decrypt(&nonce.into(), Payload { msg: ciphertext, aad }).ok()
}

/// The associated data a row was sealed with, by its format; `None` for clear rows and
/// unknown formats.
fn row_aad(row: &signing_key::Model) -> Option<Vec<u8>> {
    match row.private_key_encryption.as_deref()? {
        SEALED_WITH => Some(associated_data(&row.kid, &row.algorithm, row.activates_at)),
        SEALED_WITH_KID_ONLY => Some(row.kid.as_bytes().to_vec()),
        _ => None,
    }
}

/// A new key as a `signing_keys` row: published now, signing from `activates_at`.
pub fn generate(
    alg: Algorithm,
    now: DateTime<Utc>,
    activates_at: DateTime<Utc>,
    kek: Option<&Kek>,
) -> Result<signing_key::Model, KeyError> {
    let pkcs8 = generate_pkcs8(alg)?;
    let encoding = encoding_key(alg, &pkcs8).map_err(|e| invalid("(new)", e))?;
    let jwk = public_jwk(alg, &encoding)?;
    let kid = jwk.common.key_id.clone().unwrap_or_default();
    let public_jwk = serde_json::to_string(&jwk).map_err(|e| invalid(&kid, e))?;
    let algorithm = algorithm_name(alg).to_owned();
    let (private_key, private_key_encryption) = match kek {
        Some(kek) => (
            seal(kek, &associated_data(&kid, &algorithm, activates_at), &pkcs8)?,
            Some(SEALED_WITH.to_owned()),
        ),
        None => (pkcs8, None),
    };
    Ok(signing_key::Model {
        kid,
        algorithm,
        public_jwk,
        private_key,
        private_key_encryption,
        created_at: now,
        activates_at,
        retires_at: None,
    })
}

/// An Ed25519 key active from `now`, in clear: what tests use to forge foreign tokens.
pub fn generate_ed25519(now: DateTime<Utc>) -> Result<signing_key::Model, KeyError> {
    generate(Algorithm::EdDSA, now, now, None)
}

/// The private key of a row in clear, opened with the current or the previous KEK. With a
/// KEK configured, a row in clear is refused: it can only have been written by someone
/// with access to SQL but not to the KEK (keys are sealed from the moment one is set).
fn private_key(row: &signing_key::Model, settings: &KeySettings) -> Result<Vec<u8>, KeyError> {
    if row.private_key_encryption.is_none() {
        if settings.kek.is_some() {
            return Err(invalid(&row.kid, "stored in clear while KEY_ENCRYPTION_KEY is set; refused"));
        }
        return Ok(row.private_key.clone());
    }
    let aad = row_aad(row).ok_or_else(|| invalid(&row.kid, "sealed in an unknown format"))?;
    [settings.kek.as_ref(), settings.old_kek.as_ref()]
        .into_iter()
        .flatten()
        .find_map(|kek| unseal(kek, &aad, &row.private_key))
        .ok_or_else(|| {
            invalid(&row.kid, "the private key is sealed and KEY_ENCRYPTION_KEY (or KEY_ENCRYPTION_KEY_OLD) does not open it, or the row was altered")
        })
}

/// Start-up work under the start-up lock: make every key sealed under the current KEK in
/// the current format (re-sealing those under the old KEK or the old format), and make sure
/// a key of the configured algorithm exists. Keys found in clear are sealed only when no key
/// is sealed yet (the KEK is being turned on); once keys are sealed, a clear row is refused
/// (here and at load), never sealed into trust. Any usable key of the algorithm not yet
/// retired counts, even one that activates a moment from now (the instance that made it
/// may have a clock slightly ahead of ours).
pub async fn prepare(
    db: &impl ConnectionTrait,
    now: DateTime<Utc>,
    settings: &KeySettings,
) -> Result<(), KeyError> {
    let rows = signing_key::Entity::find().all(db).await?;
    let turning_on = settings.kek.is_some() && rows.iter().all(|r| r.private_key_encryption.is_none());
    if let Some(kek) = &settings.kek {
        for row in &rows {
            let current = row.private_key_encryption.as_deref() == Some(SEALED_WITH)
                && row_aad(row).is_some_and(|aad| unseal(kek, &aad, &row.private_key).is_some());
            if current {
                continue;
            }
            let plain = match row.private_key_encryption {
                None if turning_on => row.private_key.clone(),
                None => {
                    tracing::error!(kid = %row.kid, "a signing key is stored in clear beside sealed ones; refused (delete the row)");
                    continue;
                }
                Some(_) => private_key(row, settings)?,
            };
            let aad = associated_data(&row.kid, &row.algorithm, row.activates_at);
            signing_key::Entity::update_many()
                .col_expr(signing_key::Column::PrivateKey, Expr::value(seal(kek, &aad, &plain)?))
                .col_expr(signing_key::Column::PrivateKeyEncryption, Expr::value(SEALED_WITH))
                .filter(signing_key::Column::Kid.eq(row.kid.clone()))
                .exec(db)
                .await?;
            tracing::info!(kid = %row.kid, "sealed a signing key under the current key-encryption key");
        }
    }
    if settings.algorithm == Algorithm::HS256 {
        return Ok(());
    }
    let name = algorithm_name(settings.algorithm);
    let trusted =
        |k: &signing_key::Model| settings.kek.is_none() || turning_on || k.private_key_encryption.is_some();
    let usable =
        rows.iter().any(|k| k.algorithm == name && k.retires_at.is_none_or(|r| r > now) && trusted(k));
    if !usable {
        let row = generate(settings.algorithm, now, now, settings.kek.as_ref())?;
        let kid = row.kid.clone();
        row.into_active_model().insert(db).await?;
        tracing::info!(%kid, algorithm = name, "generated a new signing key");
    }
    Ok(())
}

/// Publishes a new key now, signing after `prepublish`; every current key of the same
/// algorithm retires once the tokens it can still sign have expired. Returns the new row.
pub async fn rotate(
    db: &impl ConnectionTrait,
    now: DateTime<Utc>,
    settings: &KeySettings,
) -> Result<signing_key::Model, KeyError> {
    if settings.algorithm == Algorithm::HS256 {
        return Err(KeyError::Generate("HS256 uses JWT_SECRET; rotate it by changing the secret".into()));
    }
    let prepublish =
        chrono::Duration::from_std(settings.prepublish).map_err(|e| KeyError::Generate(e.to_string()))?;
    let lifetime = chrono::Duration::from_std(settings.access_token_ttl + LEEWAY)
        .map_err(|e| KeyError::Generate(e.to_string()))?;
    let row = generate(settings.algorithm, now, now + prepublish, settings.kek.as_ref())?;
    let retires_at = row.activates_at + lifetime;
    signing_key::Entity::update_many()
        .col_expr(signing_key::Column::RetiresAt, Expr::value(retires_at))
        .filter(signing_key::Column::RetiresAt.is_null())
        .exec(db)
        .await?;
    row.clone().into_active_model().insert(db).await?;
    Ok(row)
}

/// A key this instance can verify with, and sign with once active.
struct Key {
    kid: Arc<str>,
    alg: Algorithm,
    encoding: EncodingKey,
    decoding: DecodingKey,
    /// `None` for HMAC: never published.
    public: Option<Jwk>,
    activates_at: DateTime<Utc>,
    retires_at: Option<DateTime<Utc>>,
}

impl Key {
    fn live(&self, now: DateTime<Utc>) -> bool {
        self.retires_at.is_none_or(|r| r > now)
    }

    fn from_row(row: &signing_key::Model, settings: &KeySettings) -> Result<Self, KeyError> {
        let alg = parse_algorithm(&row.algorithm)
            .filter(|a| *a != Algorithm::HS256)
            .ok_or_else(|| invalid(&row.kid, format!("unsupported algorithm {}", row.algorithm)))?;
        let pkcs8 = private_key(row, settings)?;
        let encoding = encoding_key(alg, &pkcs8).map_err(|e| invalid(&row.kid, e))?;
        let public: Jwk = serde_json::from_str(&row.public_jwk).map_err(|e| invalid(&row.kid, e))?;
        // The published key must be the private key's own.
        let derived = public_jwk(alg, &encoding)?;
        if derived.algorithm != public.algorithm {
            return Err(invalid(&row.kid, "the public key does not match the private key"));
        }
        let decoding = DecodingKey::from_jwk(&public).map_err(|e| invalid(&row.kid, e))?;
        Ok(Key {
            kid: Arc::from(row.kid.as_str()),
            alg,
            encoding,
            decoding,
            public: Some(public),
            activates_at: row.activates_at,
            retires_at: row.retires_at,
        })
    }

    fn hmac(secret: &SecretString) -> Self {
        let bytes = secret.expose_secret().as_bytes();
        let digest = Sha256::digest([b"latchkey-hs256-kid:".as_slice(), bytes].concat());
        Key {
            kid: Arc::from(format!("hs256-{}", &URL_SAFE_NO_PAD.encode(digest)[..16])),
            alg: Algorithm::HS256,
            encoding: EncodingKey::from_secret(bytes),
            decoding: DecodingKey::from_secret(bytes),
            public: None,
            activates_at: DateTime::<Utc>::UNIX_EPOCH,
            retires_at: None,
        }
    }
}

/// The keys this instance signs and verifies with, at one moment.
pub struct KeyRing {
    algorithm: Algorithm,
    /// Newest activation first.
    keys: Vec<Arc<Key>>,
    by_kid: HashMap<Arc<str>, Arc<Key>>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing").field("kids", &self.by_kid.keys().collect::<Vec<_>>()).finish()
    }
}

impl KeyRing {
    /// Every key not yet retired, and the HMAC key when HS256 is configured.
    pub async fn load(
        db: &impl ConnectionTrait,
        now: DateTime<Utc>,
        settings: &KeySettings,
    ) -> Result<Self, KeyError> {
        let rows = signing_key::Entity::find()
            .filter(signing_key::Column::RetiresAt.is_null().or(signing_key::Column::RetiresAt.gt(now)))
            .order_by_desc(signing_key::Column::ActivatesAt)
            .order_by_asc(signing_key::Column::Kid)
            .all(db)
            .await?;
        let mut keys = Vec::with_capacity(rows.len() + 1);
        if settings.algorithm == Algorithm::HS256 {
            let secret = settings.hmac_secret.as_ref().ok_or(KeyError::NoSigner)?;
            keys.push(Arc::new(Key::hmac(secret)));
        }
        // A row that cannot be trusted (in clear under a KEK, altered, sealed under another
        // KEK) is left out, never used: one bad row must not stop the others from loading.
        let mut refused = None;
        for row in &rows {
            match Key::from_row(row, settings) {
                Ok(key) => keys.push(Arc::new(key)),
                Err(e) => {
                    tracing::error!(error = %e, "a signing key was refused");
                    refused.get_or_insert(e);
                }
            }
        }
        let by_kid = keys.iter().map(|k| (k.kid.clone(), Arc::clone(k))).collect();
        let ring = Self { algorithm: settings.algorithm, keys, by_kid };
        if ring.signer(now).is_none() {
            return Err(refused.unwrap_or(KeyError::NoSigner));
        }
        Ok(ring)
    }

    /// The newest active key of the configured algorithm; if clock skew between instances
    /// leaves the only one a moment in the future, the earliest of them.
    fn signer(&self, now: DateTime<Utc>) -> Option<&Arc<Key>> {
        let candidates = || self.keys.iter().filter(|k| k.alg == self.algorithm && k.live(now));
        candidates().find(|k| k.activates_at <= now).or_else(|| candidates().min_by_key(|k| k.activates_at))
    }

    /// The public keys at `now` (RFC 7517). Empty with HS256: the secret is never published.
    pub fn jwks(&self, now: DateTime<Utc>) -> JwkSet {
        let mut keys: Vec<Jwk> =
            self.keys.iter().filter(|k| k.live(now)).filter_map(|k| k.public.clone()).collect();
        keys.sort_by(|a, b| a.common.key_id.cmp(&b.common.key_id));
        JwkSet { keys }
    }

    pub fn sign(&self, claims: &AccessClaims, now: DateTime<Utc>) -> Result<String, ApiError> {
        let key = self.signer(now).ok_or_else(|| ApiError::internal("no signing key is active"))?;
        let mut header = Header::new(key.alg);
        header.typ = Some(ACCESS_TOKEN_TYPE.into());
        header.kid = Some(key.kid.to_string());
        jsonwebtoken::encode(&header, claims, &key.encoding).map_err(ApiError::internal)
    }

    /// The key a token names, with its algorithm pinned; `None` for anything else.
    fn key_for(&self, token: &str, now: DateTime<Utc>) -> Option<&Arc<Key>> {
        let header = jsonwebtoken::decode_header(token).ok()?;
        let key = self.by_kid.get(header.kid.as_deref()?)?;
        let typ_ok = header.typ.as_deref().is_some_and(|t| {
            t.eq_ignore_ascii_case(ACCESS_TOKEN_TYPE) || t.eq_ignore_ascii_case("application/at+jwt")
        });
        (header.alg == key.alg && key.live(now) && typ_ok).then_some(key)
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
        self.verify_with_kid(token, issuer, audience, now).map(|(claims, _)| claims)
    }

    /// `verify`, also naming the key that verified the token.
    fn verify_with_kid(
        &self,
        token: &str,
        issuer: &str,
        audience: &str,
        now: DateTime<Utc>,
    ) -> Result<(AccessClaims, Arc<str>), ApiError> {
        let key = self
            .key_for(token, now)
            .ok_or_else(|| ApiError::invalid_token("The token is malformed or not signed by a known key."))?;
        let mut validation = Validation::new(key.alg);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        // Expiry is checked below against the server's clock, so tests can control time.
        validation.validate_exp = false;
        validation.leeway = 0;
        let data = jsonwebtoken::decode::<AccessClaims>(token, &key.decoding, &validation)
            .map_err(|_| ApiError::invalid_token("The token's signature or claims are not valid."))?;
        check_expiry(&data.claims, now)?;
        Ok((data.claims, Arc::clone(&key.kid)))
    }
}

/// `exp` against the server's clock, with `LEEWAY`.
fn check_expiry(claims: &AccessClaims, now: DateTime<Utc>) -> Result<(), ApiError> {
    let leeway = i64::try_from(LEEWAY.as_secs()).unwrap_or(0);
    if now.timestamp() > claims.exp.saturating_add(leeway) {
        return Err(ApiError::new(ErrorCode::TokenExpired, "The access token has expired; refresh it."));
    }
    Ok(())
}

/// Verified tokens remembered, so a token presented again skips the signature check.
/// Keyed by the SHA-256 of the exact token bytes (the signature over the same bytes
/// cannot change); each entry still has its `exp` checked on every use, and the store is
/// still asked on every request.
const VERIFIED_CAPACITY: usize = 10_000;

/// The current `KeyRing`, swapped whole on reload, and the verified-token cache.
pub struct KeyCache {
    ring: RwLock<Arc<KeyRing>>,
    /// The claims and the kid that verified them.
    verified: quick_cache::sync::Cache<[u8; 32], (Arc<AccessClaims>, Arc<str>)>,
    pub settings: KeySettings,
}

impl KeyCache {
    pub fn new(ring: KeyRing, settings: KeySettings) -> Self {
        Self {
            ring: RwLock::new(Arc::new(ring)),
            verified: quick_cache::sync::Cache::new(VERIFIED_CAPACITY),
            settings,
        }
    }

    /// `KeyRing::verify`, remembering the result for tokens seen before.
    pub fn verify(
        &self,
        token: &str,
        issuer: &str,
        audience: &str,
        now: DateTime<Utc>,
    ) -> Result<Arc<AccessClaims>, ApiError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let ring = self.current();
        if let Some((claims, kid)) = self.verified.get(&digest) {
            // Only while the key that verified it is still trusted: a key removed from the
            // ring (an emergency) takes its tokens with it, cached or not.
            if ring.by_kid.get(&*kid).is_some_and(|k| k.live(now)) {
                if let Err(e) = check_expiry(&claims, now) {
                    self.verified.remove(&digest);
                    return Err(e);
                }
                return Ok(claims);
            }
            self.verified.remove(&digest);
        }
        let (claims, kid) = ring.verify_with_kid(token, issuer, audience, now)?;
        let claims = Arc::new(claims);
        self.verified.insert(digest, (Arc::clone(&claims), kid));
        Ok(claims)
    }

    pub fn current(&self) -> Arc<KeyRing> {
        match self.ring.read() {
            Ok(ring) => Arc::clone(&ring),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Re-reads `signing_keys`; on failure the previous ring stays in use.
    pub async fn reload(&self, db: &impl ConnectionTrait, now: DateTime<Utc>) -> Result<(), KeyError> {
        let ring = Arc::new(KeyRing::load(db, now, &self.settings).await?);
        let vanished = self.current().by_kid.keys().any(|kid| !ring.by_kid.contains_key(kid));
        // The new ring first, then the cache: a token verified in between against a key that
        // just vanished is dropped too (and every hit re-checks its key anyway).
        match self.ring.write() {
            Ok(mut slot) => *slot = ring,
            Err(poisoned) => *poisoned.into_inner() = ring,
        }
        if vanished {
            self.verified.clear();
        }
        Ok(())
    }
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCache").field("ring", &self.current()).finish_non_exhaustive()
    }
}

/// The server secret that signs device tokens.
pub const DEVICE_SECRET: &str = "device_token";

/// The sealing format of user secrets (TOTP): ChaCha20-Poly1305, the row's purpose and
/// owner as associated data, so a sealed value cannot be moved to another row.
pub const USER_SECRET_SEALING: &str = "chacha20poly1305";

/// Seals a user's secret under the KEK when one is set: `(stored bytes, format)`; without
/// a KEK, the bytes in the clear and no format. `context` names the row (`totp\n<user>`).
pub fn seal_user_secret(
    settings: &KeySettings,
    context: &str,
    plain: &[u8],
) -> Result<(Vec<u8>, Option<String>), KeyError> {
    match &settings.kek {
        Some(kek) => Ok((seal(kek, context.as_bytes(), plain)?, Some(USER_SECRET_SEALING.to_owned()))),
        None => Ok((plain.to_vec(), None)),
    }
}

/// Opens what [`seal_user_secret`] stored, with the KEK or the old one; `None` when neither
/// opens it. A row in the clear (written before a KEK was set) opens as it is; its owner
/// re-seals it on use.
pub fn open_user_secret(
    settings: &KeySettings,
    context: &str,
    stored: &[u8],
    format: Option<&str>,
) -> Option<Vec<u8>> {
    match format {
        None => Some(stored.to_vec()),
        Some(USER_SECRET_SEALING) => [settings.kek.as_ref(), settings.old_kek.as_ref()]
            .into_iter()
            .flatten()
            .find_map(|kek| unseal(kek, context.as_bytes(), stored)),
        Some(_) => None,
    }
}

fn secret_aad(name: &str) -> Vec<u8> {
    format!("server_secret\n{name}").into_bytes()
}

/// Start-up work under the start-up lock: the secret `name` exists (32 random bytes), sealed
/// under the current KEK when one is set.
pub async fn prepare_secret(
    db: &impl ConnectionTrait,
    name: &str,
    now: DateTime<Utc>,
    settings: &KeySettings,
) -> Result<(), KeyError> {
    let row = server_secret::Entity::find_by_id(name.to_owned()).one(db).await?;
    let plain = match &row {
        Some(row) => open_secret(row, settings)?,
        None => {
            let mut fresh = vec![0u8; 32];
            getrandom::fill(&mut fresh).map_err(|e| KeyError::Generate(e.to_string()))?;
            fresh
        }
    };
    let (secret, encryption) = match &settings.kek {
        Some(kek) => (seal(kek, &secret_aad(name), &plain)?, Some(SEALED_WITH.to_owned())),
        None => (plain, None),
    };
    match row {
        None => {
            server_secret::ActiveModel {
                name: Set(name.to_owned()),
                secret: Set(secret),
                secret_encryption: Set(encryption),
                created_at: Set(now),
            }
            .insert(db)
            .await?;
        }
        // Re-sealed only when its sealing changes (a KEK turned on or rotated).
        Some(row)
            if row.secret_encryption.is_none() != settings.kek.is_none() || settings.old_kek.is_some() =>
        {
            server_secret::Entity::update_many()
                .col_expr(server_secret::Column::Secret, Expr::value(secret))
                .col_expr(server_secret::Column::SecretEncryption, Expr::value(encryption))
                .filter(server_secret::Column::Name.eq(name))
                .exec(db)
                .await?;
        }
        Some(_) => {}
    }
    Ok(())
}

fn open_secret(row: &server_secret::Model, settings: &KeySettings) -> Result<Vec<u8>, KeyError> {
    if row.secret_encryption.is_none() {
        return Ok(row.secret.clone());
    }
    [settings.kek.as_ref(), settings.old_kek.as_ref()]
        .into_iter()
        .flatten()
        .find_map(|kek| unseal(kek, &secret_aad(&row.name), &row.secret))
        .ok_or_else(|| {
            invalid(&row.name, "the server secret is sealed and KEY_ENCRYPTION_KEY does not open it")
        })
}

/// The secret `name`, opened (it exists once `prepare_secret` has run).
pub async fn server_secret(
    db: &impl ConnectionTrait,
    name: &str,
    settings: &KeySettings,
) -> Result<SecretBox<[u8; 32]>, KeyError> {
    let row = server_secret::Entity::find_by_id(name.to_owned())
        .one(db)
        .await?
        .ok_or_else(|| invalid(name, "the server secret is missing"))?;
    let bytes: [u8; 32] = open_secret(&row, settings)?
        .try_into()
        .map_err(|_| invalid(name, "the server secret is not 32 bytes"))?;
    Ok(SecretBox::new(Box::new(bytes)))
}

/// Decodes `KEY_ENCRYPTION_KEY`: 32 bytes, base64 (standard or URL-safe).
pub fn parse_kek(raw: &str) -> Result<Kek, String> {
    let raw = raw.trim();
    let bytes = STANDARD
        .decode(raw)
        .or_else(|_| URL_SAFE_NO_PAD.decode(raw.trim_end_matches('=')))
        .map_err(|_| "must be 32 bytes, base64-encoded (e.g. `openssl rand -base64 32`)".to_owned())?;
    let key: [u8; 32] = bytes
        .try_into()
        .map_err(|_| "must be exactly 32 bytes, base64-encoded (`openssl rand -base64 32`)".to_owned())?;
    Ok(SecretBox::new(Box::new(key)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(alg: Algorithm) -> KeySettings {
        KeySettings {
            algorithm: alg,
            hmac_secret: Some(SecretString::from("x".repeat(32))),
            kek: None,
            old_kek: None,
            prepublish: Duration::from_secs(330),
            access_token_ttl: Duration::from_secs(900),
        }
    }

    fn ring(alg: Algorithm) -> KeyRing {
        let now = Utc::now();
        let s = settings(alg);
        let mut keys = Vec::new();
        if alg == Algorithm::HS256 {
            keys.push(Arc::new(Key::hmac(s.hmac_secret.as_ref().expect("secret"))));
        } else {
            let row = generate(alg, now, now, None).expect("key");
            keys.push(Arc::new(Key::from_row(&row, &s).expect("load")));
        }
        let by_kid = keys.iter().map(|k| (k.kid.clone(), Arc::clone(k))).collect();
        KeyRing { algorithm: alg, keys, by_kid }
    }

    fn claims(now: DateTime<Utc>) -> AccessClaims {
        AccessClaims {
            iss: "http://issuer".into(),
            aud: "aud".into(),
            sub: uuid::Uuid::new_v4(),
            client_id: "latchkey".into(),
            sid: uuid::Uuid::new_v4(),
            jti: uuid::Uuid::new_v4(),
            iat: now.timestamp(),
            exp: now.timestamp() + 900,
            roles: vec![],
            email_verified: false,
            amr: vec!["pwd".into()],
            auth_time: now.timestamp(),
        }
    }

    #[test]
    fn every_algorithm_signs_and_verifies_with_kid_and_typ() {
        for alg in [Algorithm::EdDSA, Algorithm::ES256, Algorithm::RS256, Algorithm::HS256] {
            let ring = ring(alg);
            let now = Utc::now();
            let c = claims(now);
            let token = ring.sign(&c, now).expect("sign");
            let header = jsonwebtoken::decode_header(&token).expect("header");
            assert_eq!(header.typ.as_deref(), Some("at+jwt"));
            assert_eq!(header.alg, alg);
            assert_eq!(ring.verify(&token, "http://issuer", "aud", now).expect("verify"), c, "{alg:?}");
            let published = ring.jwks(now).keys.len();
            assert_eq!(
                published,
                usize::from(alg != Algorithm::HS256),
                "{alg:?}: the HMAC secret is never published"
            );
        }
    }

    #[test]
    fn refuses_wrong_issuer_audience_and_expiry() {
        let ring = ring(Algorithm::EdDSA);
        let now = Utc::now();
        let token = ring.sign(&claims(now), now).expect("sign");
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
        let jwk: Jwk = serde_json::from_str(
            r#"{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}"#,
        )
        .expect("jwk");
        assert_eq!(thumbprint(&jwk).as_deref(), Some("kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"));
        // RFC 7638 section 3.1: its example RSA key.
        let rsa: Jwk = serde_json::from_str(r#"{"kty":"RSA","e":"AQAB","n":"0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"}"#).expect("jwk");
        assert_eq!(thumbprint(&rsa).as_deref(), Some("NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"));
    }

    #[test]
    fn private_keys_are_sealed_under_the_kek() {
        let kek = parse_kek(&STANDARD.encode([7u8; 32])).expect("kek");
        let now = Utc::now();
        let row = generate(Algorithm::EdDSA, now, now, Some(&kek)).expect("key");
        assert_eq!(row.private_key_encryption.as_deref(), Some(SEALED_WITH));
        let mut s = settings(Algorithm::EdDSA);
        assert!(Key::from_row(&row, &s).is_err(), "no KEK: refused, not used in clear");
        s.kek = Some(kek);
        assert!(Key::from_row(&row, &s).is_ok());
        let other = parse_kek(&STANDARD.encode([8u8; 32])).expect("kek");
        s.old_kek = s.kek.take();
        s.kek = Some(other);
        assert!(Key::from_row(&row, &s).is_ok(), "the old KEK still opens it during a KEK rotation");
        assert!(parse_kek("short").is_err());

        // The seal binds the row: moved activation, changed algorithm, or another kid fail.
        let mut moved = row.clone();
        moved.activates_at = row.activates_at - chrono::Duration::days(30);
        assert!(Key::from_row(&moved, &s).is_err(), "an altered activation time is refused");
        let mut relabelled = row.clone();
        relabelled.algorithm = "ES256".into();
        assert!(Key::from_row(&relabelled, &s).is_err());
        let mut downgraded = row.clone();
        downgraded.private_key_encryption = Some(SEALED_WITH_KID_ONLY.into());
        assert!(Key::from_row(&downgraded, &s).is_err(), "the old format's data does not open a new seal");

        // A row sealed in the first format (kid only) still opens, until start-up re-seals it.
        let pkcs8 = generate_pkcs8(Algorithm::EdDSA).expect("pkcs8");
        let mut legacy = generate(Algorithm::EdDSA, now, now, None).expect("key");
        legacy.private_key =
            seal(s.old_kek.as_ref().expect("kek"), legacy.kid.as_bytes(), &pkcs8).expect("seal");
        legacy.private_key_encryption = Some(SEALED_WITH_KID_ONLY.into());
        assert!(private_key(&legacy, &s).is_ok_and(|k| k == pkcs8));

        // With a KEK set, a key in clear is never used.
        let clear = generate(Algorithm::EdDSA, now, now, None).expect("key");
        assert!(Key::from_row(&clear, &s).is_err(), "a clear row under a KEK is refused");
    }
}
