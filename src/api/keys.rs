//! `/.well-known/jwks.json`: the public keys that verify access tokens (RFC 7517).

use std::sync::Arc;

use poem::web::Data;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};
use serde::{Deserialize, Serialize};

use super::ApiTags;
use crate::error::ApiError;
use crate::state::AppState;

/// One public key (RFC 7517 §4). Only the members of the key's own type are present.
#[derive(Object, Serialize, Deserialize)]
pub struct JsonWebKey {
    pub kty: String,
    pub kid: String,
    pub alg: String,
    #[oai(rename = "use")]
    #[serde(rename = "use")]
    pub use_: String,
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub e: Option<String>,
}

#[derive(Object)]
pub struct JsonWebKeySet {
    pub keys: Vec<JsonWebKey>,
}

#[derive(ApiResponse)]
pub enum JwksResponse {
    /// The key set.
    #[oai(status = 200)]
    Ok(Json<JsonWebKeySet>, #[oai(header = "Cache-Control")] String),
}

pub struct KeysApi;

#[OpenApi(tag = "ApiTags::Keys")]
impl KeysApi {
    /// Public keys for verifying access tokens
    ///
    /// Match the token header's `kid`; verify with the key's `alg` only.
    #[oai(path = "/.well-known/jwks.json", method = "get", operation_id = "jwks")]
    async fn jwks(&self, state: Data<&Arc<AppState>>) -> Result<JwksResponse, ApiError> {
        let set = state.keys.current().jwks(state.clock.now());
        let keys = set
            .keys
            .iter()
            .map(|k| serde_json::to_value(k).and_then(serde_json::from_value::<JsonWebKey>))
            .collect::<Result<Vec<_>, _>>()
            .map_err(ApiError::internal)?;
        let max_age = state.config.jwks_max_age.as_secs();
        Ok(JwksResponse::Ok(Json(JsonWebKeySet { keys }), format!("public, max-age={max_age}")))
    }
}
