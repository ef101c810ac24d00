//! The standards other software already speaks: authorization-server metadata (RFC 8414),
//! the refresh grant at a token endpoint (RFC 6749 §6), revocation (RFC 7009) and
//! introspection (RFC 7662).

use std::sync::Arc;

use poem::Request;
use poem::web::Data;
use poem_openapi::auth::Basic;
use poem_openapi::payload::{Form, Json};
use poem_openapi::{ApiResponse, Object, OpenApi, SecurityScheme};

use super::ApiTags;
use super::auth::{TokenResponse, cookie_response};
use super::client::client_info;
use super::security::state;
use crate::error::{ApiError, ErrorCode};
use crate::keys::algorithm_name;
use crate::service::limit::{self, Limit};
use crate::service::{auth, clients, sessions};
use crate::state::AppState;
use crate::store::entity::session;
use crate::store::revocation::TokenState;
use crate::token::refresh_token_hash;
use sea_orm::EntityTrait as _;

/// RFC 8414 metadata. Only fields that are true: Latchkey has no authorization endpoint
/// and issues no ID tokens.
#[derive(Object)]
pub struct ServerMetadata {
    pub issuer: String,
    pub jwks_uri: String,
    pub token_endpoint: String,
    pub revocation_endpoint: String,
    pub introspection_endpoint: String,
    /// Required by RFC 8414; empty, as there is no authorization endpoint.
    pub response_types_supported: Vec<String>,
    pub grant_types_supported: Vec<String>,
    pub token_endpoint_auth_methods_supported: Vec<String>,
    pub revocation_endpoint_auth_methods_supported: Vec<String>,
    pub introspection_endpoint_auth_methods_supported: Vec<String>,
    /// The algorithm access tokens are signed with (RFC 9068 tokens, verified with the
    /// JWKS); named like the OIDC field for libraries that look for it.
    pub access_token_signing_alg_values_supported: Vec<String>,
    pub service_documentation: String,
}

/// `grant_type=refresh_token&refresh_token=…`, form-encoded.
#[derive(Object, serde::Deserialize)]
pub struct TokenRequest {
    pub grant_type: Option<String>,
    pub refresh_token: Option<String>,
    pub scope: Option<String>,
    pub client_id: Option<String>,
}

/// An OAuth error (RFC 6749 §5.2).
#[derive(Object)]
pub struct OAuthError {
    pub error: String,
    pub error_description: String,
}

#[derive(ApiResponse)]
pub enum OAuthTokenResponse {
    /// Tokens issued.
    #[oai(status = 200)]
    Ok(
        Json<super::auth::TokenResponseBody>,
        #[oai(header = "Cache-Control")] String,
        #[oai(header = "Pragma")] String,
    ),
    /// `invalid_request`, `unsupported_grant_type` or `invalid_grant`.
    #[oai(status = 400)]
    Error(Json<OAuthError>, #[oai(header = "Cache-Control")] String),
}

fn oauth_error(error: &str, description: &str) -> OAuthTokenResponse {
    OAuthTokenResponse::Error(
        Json(OAuthError { error: error.to_owned(), error_description: description.to_owned() }),
        "no-store".into(),
    )
}

#[derive(Object, serde::Deserialize)]
pub struct RevokeRequest {
    pub token: Option<String>,
    pub token_type_hint: Option<String>,
}

#[derive(ApiResponse)]
pub enum RevokeResponse {
    /// Always, even for unknown tokens (RFC 7009 §2.2).
    #[oai(status = 200)]
    Ok,
}

#[derive(Object, serde::Deserialize)]
pub struct IntrospectRequest {
    pub token: Option<String>,
    pub token_type_hint: Option<String>,
}

/// RFC 7662 §2.2. Inactive tokens carry only `active: false`.
#[derive(Object, Default)]
pub struct Introspection {
    pub active: bool,
    #[oai(skip_serializing_if_is_none)]
    pub token_type: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub sub: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub client_id: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub iss: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub aud: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub exp: Option<i64>,
    #[oai(skip_serializing_if_is_none)]
    pub iat: Option<i64>,
    #[oai(skip_serializing_if_is_none)]
    pub jti: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub sid: Option<String>,
    /// Access tokens: how the session was authenticated (RFC 8176).
    #[oai(skip_serializing_if_is_none)]
    pub amr: Option<Vec<String>>,
    /// Access tokens: when (Unix seconds).
    #[oai(skip_serializing_if_is_none)]
    pub auth_time: Option<i64>,
}

/// A registered confidential client (`latchkey client create`), with HTTP Basic.
#[derive(SecurityScheme)]
#[oai(ty = "basic", checker = "check_client")]
pub struct ClientAuth(pub String);

async fn check_client(req: &Request, basic: Basic) -> poem::Result<String> {
    let state = state(req)?;
    let client = client_info(req, state);
    let address = limit::ip_key(state, &client);
    let failures = Limit::ClientAuthFailuresPerIp;
    // Failed attempts spend a small per-address budget. Once it is spent, every attempt is
    // refused before the secret is compared: a right guess must look like a wrong one.
    limit::check(state, failures, &address, CLIENT_AUTH_FAILURES, &client).await?;
    if clients::authenticate(&state.db, &basic.username, &basic.password).await? {
        return Ok(basic.username);
    }
    limit::charge(state, failures, &address, CLIENT_AUTH_FAILURES, &client).await?;
    Err(ApiError::new(ErrorCode::InvalidClient, "Unknown client or wrong secret.").into())
}

const CLIENT_AUTH_FAILURES: crate::config::Rate =
    crate::config::Rate { capacity: 10, period: std::time::Duration::from_secs(60) };

pub struct OAuthApi;

impl OAuthApi {
    fn metadata(state: &AppState) -> ServerMetadata {
        let base = state.config.jwt_issuer.trim_end_matches('/');
        let list = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        ServerMetadata {
            issuer: state.config.jwt_issuer.clone(),
            jwks_uri: format!("{base}/.well-known/jwks.json"),
            token_endpoint: format!("{base}/oauth/token"),
            revocation_endpoint: format!("{base}/oauth/revoke"),
            introspection_endpoint: format!("{base}/oauth/introspect"),
            response_types_supported: vec![],
            grant_types_supported: list(&["refresh_token"]),
            token_endpoint_auth_methods_supported: list(&["none"]),
            revocation_endpoint_auth_methods_supported: list(&["none"]),
            introspection_endpoint_auth_methods_supported: list(&["client_secret_basic"]),
            access_token_signing_alg_values_supported: vec![
                algorithm_name(state.config.jwt_algorithm).to_owned(),
            ],
            service_documentation: format!("{base}/docs"),
        }
    }
}

#[OpenApi(tag = "ApiTags::OAuth")]
impl OAuthApi {
    /// Authorization-server metadata (RFC 8414)
    #[oai(path = "/.well-known/oauth-authorization-server", method = "get", operation_id = "oauthMetadata")]
    async fn oauth_metadata(&self, state: Data<&Arc<AppState>>) -> Json<ServerMetadata> {
        Json(Self::metadata(&state))
    }

    /// The same metadata, at the path OpenID Connect libraries look for
    ///
    /// Latchkey is not an OpenID provider: there is no ID token, userinfo or authorization
    /// endpoint, so strict OIDC clients refuse this document.
    #[oai(path = "/.well-known/openid-configuration", method = "get", operation_id = "openidConfiguration")]
    async fn openid_configuration(&self, state: Data<&Arc<AppState>>) -> Json<ServerMetadata> {
        Json(Self::metadata(&state))
    }

    /// Token endpoint: the refresh grant (RFC 6749 §6)
    ///
    /// Open to public clients, no client authentication. The same rotation rules as
    /// `/v1/auth/refresh`; errors are OAuth-style (`invalid_grant`, 400).
    #[oai(path = "/oauth/token", method = "post", operation_id = "oauthToken")]
    async fn token(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
        body: Form<TokenRequest>,
    ) -> Result<OAuthTokenResponse, ApiError> {
        match body.0.grant_type.as_deref() {
            Some("refresh_token") => {}
            Some(_) => {
                return Ok(oauth_error(
                    "unsupported_grant_type",
                    "Only grant_type=refresh_token is supported.",
                ));
            }
            None => return Ok(oauth_error("invalid_request", "grant_type is required.")),
        }
        let Some(refresh) = body.0.refresh_token.filter(|t| !t.is_empty()) else {
            return Ok(oauth_error("invalid_request", "refresh_token is required."));
        };
        let client = client_info(req, &state);
        match auth::refresh(&state, &refresh, &client).await {
            Ok(tokens) => match cookie_response(&state.config, tokens, false) {
                TokenResponse::Ok(body, cache, pragma, ..) => Ok(OAuthTokenResponse::Ok(body, cache, pragma)),
            },
            Err(e) if matches!(e.code, ErrorCode::InvalidToken | ErrorCode::RefreshTokenReused) => {
                Ok(oauth_error("invalid_grant", &e.detail))
            }
            Err(e) => Err(e),
        }
    }

    /// Token revocation (RFC 7009)
    ///
    /// Revoking an access or a refresh token ends its whole session, as logout does.
    /// Always 200, even for unknown tokens.
    #[oai(path = "/oauth/revoke", method = "post", operation_id = "oauthRevoke")]
    async fn revoke(
        &self,
        state: Data<&Arc<AppState>>,
        body: Form<RevokeRequest>,
    ) -> Result<RevokeResponse, ApiError> {
        let Some(presented) = body.0.token.filter(|t| !t.is_empty() && t.len() <= 8192) else {
            return Ok(RevokeResponse::Ok);
        };
        if let Some(session_id) = session_of(&state, &presented).await? {
            sessions::end(&state, sessions::Scope::One(session_id)).await?;
        }
        Ok(RevokeResponse::Ok)
    }

    /// Token introspection (RFC 7662)
    ///
    /// For resource servers that want revocation-aware checks. Callers authenticate as
    /// a registered confidential client with HTTP Basic. Expired, revoked, unknown or
    /// malformed tokens are `{"active": false}`.
    #[oai(path = "/oauth/introspect", method = "post", operation_id = "oauthIntrospect")]
    async fn introspect(
        &self,
        state: Data<&Arc<AppState>>,
        _client: ClientAuth,
        body: Form<IntrospectRequest>,
    ) -> Result<Json<Introspection>, ApiError> {
        let Some(presented) = body.0.token.filter(|t| !t.is_empty() && t.len() <= 8192) else {
            return Ok(Json(Introspection::default()));
        };
        Ok(Json(introspect(&state, &presented).await?))
    }
}

/// The session a token belongs to, if it is a token of ours at all: a verifiable access
/// token (even expired), or a known refresh token.
async fn session_of(state: &AppState, presented: &str) -> Result<Option<uuid::Uuid>, ApiError> {
    match state.keys.verify(
        presented,
        &state.config.jwt_issuer,
        &state.config.jwt_audience,
        state.clock.now(),
    ) {
        Ok(claims) => return Ok(Some(claims.sid)),
        Err(e) if e.code == ErrorCode::TokenExpired => return Ok(None),
        Err(_) => {}
    }
    if presented.len() > 128 {
        return Ok(None);
    }
    let row = auth::find_refresh_token(&state.db, &refresh_token_hash(presented)).await?;
    Ok(row.map(|r| r.session_id))
}

async fn introspect(state: &AppState, presented: &str) -> Result<Introspection, ApiError> {
    let now = state.clock.now();
    if let Ok(claims) =
        state.keys.verify(presented, &state.config.jwt_issuer, &state.config.jwt_audience, now)
    {
        let live = state.store.session(claims.sid).await?.is_some_and(|s| s.user_id == claims.sub);
        if !live {
            return Ok(Introspection::default());
        }
        return Ok(Introspection {
            active: true,
            token_type: Some("access_token".into()),
            sub: Some(claims.sub.to_string()),
            client_id: Some(claims.client_id.clone()),
            iss: Some(claims.iss.clone()),
            aud: Some(claims.aud.clone()),
            exp: Some(claims.exp),
            iat: Some(claims.iat),
            jti: Some(claims.jti.to_string()),
            sid: Some(claims.sid.to_string()),
            amr: Some(claims.amr.clone()),
            auth_time: Some(claims.auth_time),
        });
    }
    if presented.len() > 128 {
        return Ok(Introspection::default());
    }
    // The store knows most refresh tokens' state; SQL answers when it has no entry.
    let hash = refresh_token_hash(presented);
    match state.store.refresh_token(&hash).await? {
        Some(TokenState::Live(t)) => {
            let live = t.expires_at > now
                && state.store.session(t.session_id).await?.is_some_and(|s| s.user_id == t.user_id);
            if !live {
                return Ok(Introspection::default());
            }
            return Ok(Introspection {
                active: true,
                token_type: Some("refresh_token".into()),
                sub: Some(t.user_id.to_string()),
                client_id: Some(state.config.jwt_client_id.clone()),
                iss: Some(state.config.jwt_issuer.clone()),
                exp: Some(t.expires_at.timestamp()),
                iat: Some(t.issued_at.timestamp()),
                jti: Some(t.jti.to_string()),
                sid: Some(t.session_id.to_string()),
                ..Introspection::default()
            });
        }
        Some(TokenState::Retired | TokenState::Revoked) => return Ok(Introspection::default()),
        None => {}
    }
    let Some(row) = auth::find_refresh_token(&state.db, &hash).await? else {
        return Ok(Introspection::default());
    };
    let session = session::Entity::find_by_id(row.session_id).one(&state.db).await?;
    let live = row.retired_at.is_none()
        && row.revoked_at.is_none()
        && session.as_ref().is_some_and(|s| s.revoked_at.is_none() && s.expires_at > now);
    if !live {
        return Ok(Introspection::default());
    }
    Ok(Introspection {
        active: true,
        token_type: Some("refresh_token".into()),
        sub: Some(row.user_id.to_string()),
        client_id: Some(state.config.jwt_client_id.clone()),
        iss: Some(state.config.jwt_issuer.clone()),
        exp: Some(row.expires_at.timestamp()),
        iat: Some(row.created_at.timestamp()),
        jti: Some(row.id.to_string()),
        sid: Some(row.session_id.to_string()),
        ..Introspection::default()
    })
}
