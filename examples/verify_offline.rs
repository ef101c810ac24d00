//! Verify Latchkey access tokens in your own service, offline, from the issuer URL alone.
//!
//! Copy this into a downstream service. It fetches the authorization-server metadata
//! (RFC 8414) and the JWKS it names, caches the keys, and verifies each token locally:
//! the algorithm is the key's own, never the token header's, and `iss`, `aud` and `exp`
//! are checked. A token with an unknown `kid` (after a key rotation) makes it refetch the
//! JWKS — at most once per `REFETCH_COOLDOWN`, so a flood of forged `kid`s cannot make
//! it hammer the issuer.
//!
//! ```sh
//! cargo run --example verify_offline -- http://127.0.0.1:8080 "$ACCESS"
//! ```
//!
//! An offline check cannot see a logout: the token stays valid until it expires (15 min
//! by default). Call `GET /v1/auth/session` (or `/oauth/introspect`) where that matters.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::sync::Mutex;

const REFETCH_COOLDOWN: Duration = Duration::from_secs(30);

#[derive(Debug, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub sid: String,
    pub exp: i64,
    #[serde(default)]
    pub roles: Vec<String>,
}

#[derive(Deserialize)]
struct Metadata {
    issuer: String,
    jwks_uri: String,
}

struct Keys {
    by_kid: HashMap<String, (Algorithm, DecodingKey)>,
    fetched_at: Option<Instant>,
}

pub struct Verifier {
    http: reqwest::Client,
    issuer: String,
    jwks_uri: String,
    audience: String,
    keys: Mutex<Keys>,
}

impl Verifier {
    /// Discovers the JWKS from `{issuer}/.well-known/oauth-authorization-server`.
    pub async fn discover(issuer: &str, audience: &str) -> Result<Self, String> {
        let http =
            reqwest::Client::builder().timeout(Duration::from_secs(5)).build().map_err(|e| e.to_string())?;
        let url = format!("{}/.well-known/oauth-authorization-server", issuer.trim_end_matches('/'));
        let meta: Metadata =
            http.get(url).send().await.map_err(|e| e.to_string())?.json().await.map_err(|e| e.to_string())?;
        if meta.issuer.trim_end_matches('/') != issuer.trim_end_matches('/') {
            return Err(format!("metadata names another issuer: {}", meta.issuer));
        }
        let verifier = Self {
            http,
            issuer: meta.issuer,
            jwks_uri: meta.jwks_uri,
            audience: audience.to_owned(),
            keys: Mutex::new(Keys { by_kid: HashMap::new(), fetched_at: None }),
        };
        verifier.refetch(&mut *verifier.keys.lock().await).await?;
        Ok(verifier)
    }

    async fn refetch(&self, keys: &mut Keys) -> Result<(), String> {
        keys.fetched_at = Some(Instant::now());
        let set: JwkSet = self
            .http
            .get(&self.jwks_uri)
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        keys.by_kid =
            set.keys.iter().filter_map(|jwk| Some((jwk.common.key_id.clone()?, key_of(jwk)?))).collect();
        Ok(())
    }

    /// How many times the JWKS was fetched (for tests of the cooldown).
    pub async fn fetched_recently(&self) -> bool {
        self.keys.lock().await.fetched_at.is_some_and(|t| t.elapsed() < REFETCH_COOLDOWN)
    }

    pub async fn verify(&self, token: &str) -> Result<Claims, String> {
        let kid = jsonwebtoken::decode_header(token)
            .map_err(|e| e.to_string())?
            .kid
            .ok_or("the token has no kid")?;
        let (alg, key) = {
            let mut keys = self.keys.lock().await;
            if !keys.by_kid.contains_key(&kid)
                && keys.fetched_at.is_none_or(|t| t.elapsed() >= REFETCH_COOLDOWN)
            {
                self.refetch(&mut keys).await?;
            }
            keys.by_kid.get(&kid).cloned().ok_or("unknown kid")?
        };
        let mut validation = Validation::new(alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.leeway = 5;
        jsonwebtoken::decode::<Claims>(token, &key, &validation).map(|d| d.claims).map_err(|e| e.to_string())
    }
}

/// The key and its own algorithm; keys without `alg` or of other kinds are skipped.
fn key_of(jwk: &Jwk) -> Option<(Algorithm, DecodingKey)> {
    let alg: Algorithm = jwk.common.key_algorithm?.to_string().parse().ok()?;
    matches!(alg, Algorithm::EdDSA | Algorithm::ES256 | Algorithm::RS256).then_some(())?;
    Some((alg, DecodingKey::from_jwk(jwk).ok()?))
}

#[allow(dead_code)]
#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(issuer), Some(token)) = (args.next(), args.next()) else {
        eprintln!("usage: verify_offline ISSUER_URL ACCESS_TOKEN [AUDIENCE]");
        std::process::exit(2);
    };
    let audience = args.next().unwrap_or_else(|| "latchkey".into());
    let verifier = match Verifier::discover(&issuer, &audience).await {
        Ok(v) => v,
        Err(e) => {
            eprintln!("discovery failed: {e}");
            std::process::exit(1);
        }
    };
    match verifier.verify(&token).await {
        Ok(claims) => println!(
            "valid: sub={} sid={} roles={:?} exp={}",
            claims.sub, claims.sid, claims.roles, claims.exp
        ),
        Err(e) => {
            println!("invalid: {e}");
            std::process::exit(1);
        }
    }
}
