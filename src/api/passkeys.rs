//! Passkeys: `/v1/users/me/passkeys…` (register, list, remove, signed in) and
//! `/v1/auth/passkey…` (passwordless login). Each ceremony is two calls: options (with a
//! `challenge_id`), then the authenticator's answer with that `challenge_id`.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use poem::Request;
use poem::web::Data;
use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};
use uuid::Uuid;

use super::ApiTags;
use super::auth::{NoContent, SecretField, TokenResponse, cookie_response};
use super::client::client_info;
use super::security::BearerAuth;
use crate::domain::Password;
use crate::error::ApiError;
use crate::service::passkeys::{self, Ceremony, Summary};
use crate::state::AppState;

/// The first step of a ceremony.
#[derive(Object)]
pub struct CeremonyOptions {
    /// Names this ceremony: send it back with the authenticator's answer, within 5 minutes.
    /// Each one works once.
    pub challenge_id: String,
    /// The WebAuthn options, `{publicKey: {…}}` (login: also `mediation: "conditional"`),
    /// binary fields in base64url: decode them and pass `publicKey` to
    /// `navigator.credentials.create()` (registration) or `.get()` (login).
    pub options: serde_json::Value,
}

impl From<Ceremony> for CeremonyOptions {
    fn from(c: Ceremony) -> Self {
        Self { challenge_id: c.challenge_id, options: c.options }
    }
}

/// A new passkey: the authenticator's answer to the registration options.
#[derive(Object)]
#[oai(deny_unknown_fields)]
pub struct RegisterPasskeyRequest {
    /// From `POST /v1/users/me/passkeys/options`.
    #[oai(validator(max_length = 64))]
    pub challenge_id: String,
    /// The `PublicKeyCredential` from `navigator.credentials.create()`, as JSON with its
    /// binary fields in base64url (`PublicKeyCredential.toJSON()`).
    pub credential: serde_json::Value,
    /// A label for the user, e.g. "YubiKey" or "Laptop" (1 to 64 characters).
    #[oai(validator(max_length = 256))]
    pub name: String,
}

/// A passwordless login: the authenticator's answer to the login options.
#[derive(Object)]
#[oai(deny_unknown_fields)]
pub struct PasskeyLoginRequest {
    /// From `POST /v1/auth/passkey/options`.
    #[oai(validator(max_length = 64))]
    pub challenge_id: String,
    /// The `PublicKeyCredential` from `navigator.credentials.get()`, as JSON with its binary
    /// fields in base64url (`PublicKeyCredential.toJSON()`).
    pub credential: serde_json::Value,
}

/// The current password, to confirm a passkey's removal.
#[derive(Object)]
#[oai(deny_unknown_fields)]
pub struct RemovePasskeyRequest {
    pub current_password: SecretField,
    /// A TOTP or recovery code: required when the account has TOTP on.
    pub code: Option<SecretField>,
}

/// One of the user's passkeys.
#[derive(Object)]
pub struct PasskeySummary {
    pub id: Uuid,
    pub name: String,
    pub created_at: DateTime<Utc>,
    /// The last login or second factor it gave; `null` if never used.
    pub last_used_at: Option<DateTime<Utc>>,
}

impl From<Summary> for PasskeySummary {
    fn from(s: Summary) -> Self {
        Self { id: s.id, name: s.name, created_at: s.created_at, last_used_at: s.last_used_at }
    }
}

/// A new passkey.
#[derive(Object)]
pub struct CreatedPasskey {
    pub id: Uuid,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Object)]
pub struct PasskeyList {
    /// Oldest first.
    pub passkeys: Vec<PasskeySummary>,
}

#[derive(ApiResponse)]
pub enum PasskeyCreated {
    /// The passkey is registered; the user's other sessions have ended.
    #[oai(status = 201)]
    Created(Json<CreatedPasskey>),
}

pub struct PasskeysApi;

#[OpenApi(tag = "ApiTags::Passkeys")]
impl PasskeysApi {
    /// Start registering a passkey
    ///
    /// Creation options for a new passkey of the signed-in user (user verification
    /// required, a discoverable credential preferred so it can sign in without a password;
    /// the account's passkeys are excluded). 400 `validation_failed` when the account has
    /// 50 passkeys; 404 `not_found` when passkeys are not enabled on this server. Counts
    /// against `RATE_LIMIT_LOGIN_PER_IP` like the login options (429 `rate_limited`).
    #[oai(
        path = "/v1/users/me/passkeys/options",
        method = "post",
        operation_id = "passkeyRegistrationOptions"
    )]
    async fn registration_options(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
        auth: BearerAuth,
    ) -> Result<Json<CeremonyOptions>, ApiError> {
        let client = client_info(req, &state);
        let ceremony = passkeys::registration_options(&state, auth.0.claims.sub, &client).await?;
        Ok(Json(ceremony.into()))
    }

    /// Register a passkey
    ///
    /// The authenticator's answer to the options of `challenge_id` (each works once, for 5
    /// minutes). Every other session of the user ends; this one stays. From then on, a
    /// password login asks for a second factor (403 `mfa_required`). 400
    /// `validation_failed` for an unknown, used or expired `challenge_id`, a credential
    /// that does not verify (another origin, another challenge, no user verification), a
    /// passkey already registered, or a bad name.
    #[oai(path = "/v1/users/me/passkeys", method = "post", operation_id = "registerPasskey")]
    async fn register(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
        auth: BearerAuth,
        body: Json<RegisterPasskeyRequest>,
    ) -> Result<PasskeyCreated, ApiError> {
        let client = client_info(req, &state);
        let claims = &auth.0.claims;
        let body = body.0;
        let created = passkeys::register(
            &state,
            claims.sub,
            claims.sid,
            &body.challenge_id,
            body.credential,
            &body.name,
            &client,
        )
        .await?;
        Ok(PasskeyCreated::Created(Json(CreatedPasskey {
            id: created.id,
            name: created.name,
            created_at: created.created_at,
        })))
    }

    /// The signed-in user's passkeys
    #[oai(path = "/v1/users/me/passkeys", method = "get", operation_id = "myPasskeys")]
    async fn list(
        &self,
        state: Data<&Arc<AppState>>,
        auth: BearerAuth,
    ) -> Result<Json<PasskeyList>, ApiError> {
        let passkeys = passkeys::list(&state, auth.0.claims.sub).await?;
        Ok(Json(PasskeyList { passkeys: passkeys.into_iter().map(Into::into).collect() }))
    }

    /// Remove a passkey
    ///
    /// Needs the current password (403 `wrong_password`; attempts count against the
    /// account's login budget) and, when the account has TOTP on, a `code` (401
    /// `invalid_mfa_code`). Every other session of the user ends. Another user's passkey id
    /// is answered 404, like one that does not exist. With its last passkey (and no TOTP)
    /// gone, password logins no longer ask for a second factor.
    #[oai(path = "/v1/users/me/passkeys/:id", method = "delete", operation_id = "removePasskey")]
    async fn remove(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
        auth: BearerAuth,
        id: Path<Uuid>,
        body: Json<RemovePasskeyRequest>,
    ) -> Result<NoContent, ApiError> {
        let current = Password::candidate(body.0.current_password.0)?;
        let code = body.0.code.map(|c| c.0);
        let client = client_info(req, &state);
        let claims = &auth.0.claims;
        passkeys::remove(&state, claims.sub, claims.sid, id.0, current, code.as_deref(), &client).await?;
        Ok(NoContent::Done)
    }

    /// Start a passwordless login
    ///
    /// Request options for a discoverable passkey (no account named; user verification
    /// required; `mediation: "conditional"` for autofill UI — drop it for a modal prompt).
    /// Counts against `RATE_LIMIT_LOGIN_PER_IP` (429 `rate_limited`).
    #[oai(path = "/v1/auth/passkey/options", method = "post", operation_id = "passkeyLoginOptions")]
    async fn login_options(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
    ) -> Result<Json<CeremonyOptions>, ApiError> {
        let client = client_info(req, &state);
        Ok(Json(passkeys::login_options(&state, &client).await?.into()))
    }

    /// Log in with a passkey
    ///
    /// The authenticator's assertion for the options of `challenge_id` (each works once, for
    /// 5 minutes). Returns the token response of a login, with `amr` `["hwk", "user", "mfa"]`
    /// in the access token. Any failure — an unknown, used or expired challenge, an unknown
    /// passkey, a bad signature, another origin, a signature counter that went backwards, a
    /// disabled account — is the same 401 `invalid_credentials`.
    #[oai(path = "/v1/auth/passkey", method = "post", operation_id = "passkeyLogin")]
    async fn login(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
        body: Json<PasskeyLoginRequest>,
    ) -> Result<TokenResponse, ApiError> {
        let client = client_info(req, &state);
        let body = body.0;
        let tokens = passkeys::login(&state, &body.challenge_id, body.credential, &client).await?;
        Ok(cookie_response(&state.config, tokens, true))
    }
}
