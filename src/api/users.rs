//! `/v1/users/me…`: the signed-in user's profile and sessions.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use poem::Request;
use poem::web::Data;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};
use uuid::Uuid;

use super::ApiTags;
use super::auth::{NoContent, SecretField, SignUpAccepted};
use super::client::client_info;
use super::security::BearerAuth;
use crate::domain::{Email, Password};
use crate::error::ApiError;
use crate::service::{accounts, auth, sessions};
use crate::state::AppState;

#[derive(Object)]
pub struct Profile {
    pub id: Uuid,
    pub email: String,
    /// Whether the current email address has been verified (also the access token's
    /// `email_verified` claim).
    pub email_verified: bool,
    /// The same as `email_verified` (kept for clients of the first version).
    pub is_verified: bool,
    pub roles: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub last_login_at: Option<DateTime<Utc>>,
}

/// One live session (a signed-in device).
#[derive(Object)]
pub struct SessionSummary {
    pub id: Uuid,
    /// The user agent sent at login.
    pub user_agent: Option<String>,
    /// A readable label derived from the user agent, e.g. "Firefox 132 on Linux".
    pub device: String,
    /// The client address of the last login or refresh.
    pub ip_address: Option<String>,
    /// Where the login came from, e.g. "Berlin, DE" (city and ISO country code) or just
    /// "DE", looked up in the server's `GEOIP_DATABASE` at login; `null` when the server has
    /// none or it does not know the address. Refreshes do not change it.
    pub location: Option<String>,
    pub created_at: DateTime<Utc>,
    /// The last login or refresh.
    pub last_used_at: DateTime<Utc>,
    /// The session's absolute end.
    pub expires_at: DateTime<Utc>,
    /// True for the session of the token making this request.
    pub current: bool,
}

/// A page of live sessions, most recently used first.
#[derive(Object)]
pub struct SessionList {
    pub sessions: Vec<SessionSummary>,
    /// Pass it as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

impl SessionList {
    pub fn from_page(page: sessions::Page, current: Option<Uuid>) -> Self {
        let sessions = page
            .rows
            .into_iter()
            .map(|s| SessionSummary {
                device: sessions::device_label(s.user_agent.as_deref()),
                current: Some(s.id) == current,
                id: s.id,
                ip_address: s.last_used_ip.or(s.ip_address),
                location: s.location,
                user_agent: s.user_agent,
                created_at: s.created_at,
                last_used_at: s.last_used_at,
                expires_at: s.expires_at,
            })
            .collect();
        Self { sessions, next_cursor: page.next_cursor }
    }
}

/// A new password, with the current one.
#[derive(Object)]
#[oai(deny_unknown_fields)]
pub struct ChangePasswordRequest {
    pub current_password: SecretField,
    /// A TOTP or recovery code: required when the account has TOTP on.
    pub code: Option<SecretField>,
    /// 8 to 1024 characters, at least `PASSWORD_MIN_STRENGTH`.
    pub new_password: SecretField,
}

/// A new email address, with the current password.
#[derive(Object)]
#[oai(deny_unknown_fields)]
pub struct ChangeEmailRequest {
    #[oai(validator(max_length = 254))]
    pub new_email: String,
    pub current_password: SecretField,
    /// A TOTP or recovery code: required when the account has TOTP on.
    pub code: Option<SecretField>,
}

/// The current password, to confirm a deletion.
#[derive(Object)]
#[oai(deny_unknown_fields)]
pub struct DeleteAccountRequest {
    pub current_password: SecretField,
    /// A TOTP or recovery code: required when the account has TOTP on.
    pub code: Option<SecretField>,
}

#[derive(ApiResponse)]
pub enum EmailChangeAccepted {
    /// A confirmation link is on its way to the new address (unless another account has
    /// it: the answer is the same), and a notice to the current one.
    #[oai(status = 202)]
    Accepted(Json<SignUpAccepted>),
}

pub fn default_page() -> u64 {
    50
}

pub struct UsersApi;

#[OpenApi(prefix_path = "/v1/users", tag = "ApiTags::Users")]
impl UsersApi {
    /// The signed-in user's profile
    #[oai(path = "/me", method = "get", operation_id = "me")]
    async fn me(&self, state: Data<&Arc<AppState>>, auth: BearerAuth) -> Result<Json<Profile>, ApiError> {
        let (user, roles) = auth::profile(&state, auth.0.claims.sub).await?;
        Ok(Json(Profile {
            id: user.id,
            email_verified: user.email_verified_at.is_some(),
            is_verified: user.email_verified_at.is_some(),
            email: user.email,
            roles,
            created_at: user.created_at,
            last_login_at: user.last_login_at,
        }))
    }

    /// Change the password
    ///
    /// Needs the current password (403 `wrong_password`; attempts count against the
    /// account's login budget). Every other session of the user ends; this one stays. A
    /// "password changed" mail goes out, and reset links mailed earlier stop working.
    #[oai(path = "/me/password", method = "post", operation_id = "changePassword")]
    async fn change_password(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
        auth: BearerAuth,
        body: Json<ChangePasswordRequest>,
    ) -> Result<NoContent, ApiError> {
        let current = Password::candidate(body.0.current_password.0)?;
        let new_password = Password::new(body.0.new_password.0)?;
        let code = body.0.code.map(|c| c.0);
        let client = client_info(req, &state);
        let claims = &auth.0.claims;
        accounts::change_password(
            &state,
            claims.sub,
            claims.sid,
            current,
            code.as_deref(),
            new_password,
            &client,
        )
        .await?;
        Ok(NoContent::Done)
    }

    /// Change the email address
    ///
    /// Needs the current password (403 `wrong_password`). A link valid
    /// `EMAIL_CHANGE_TTL` goes to the new address and a notice to the current one;
    /// nothing changes until the link is used (`POST /v1/auth/confirm-email`), which ends
    /// every other session. An address another account has gets the same answer and no
    /// link. Mail limits apply silently, as for sign-up.
    #[oai(path = "/me/email", method = "post", operation_id = "changeEmail")]
    async fn change_email(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
        auth: BearerAuth,
        body: Json<ChangeEmailRequest>,
    ) -> Result<EmailChangeAccepted, ApiError> {
        let new_email = Email::parse(&body.0.new_email)?;
        let current = Password::candidate(body.0.current_password.0)?;
        let code = body.0.code.map(|c| c.0);
        let client = client_info(req, &state);
        let claims = &auth.0.claims;
        accounts::change_email(&state, claims.sub, claims.sid, &new_email, current, code.as_deref(), &client)
            .await?;
        Ok(EmailChangeAccepted::Accepted(Json(SignUpAccepted {
            email: new_email.as_str().to_owned(),
            verification: "sent".into(),
        })))
    }

    /// Delete the account
    ///
    /// Needs the current password (403 `wrong_password`). Every session ends at once; the
    /// account, its sessions, roles and tokens are deleted; its audit rows stay without a
    /// user. An "account deleted" mail goes to the address.
    #[oai(path = "/me", method = "delete", operation_id = "deleteMe")]
    async fn delete_me(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
        auth: BearerAuth,
        body: Json<DeleteAccountRequest>,
    ) -> Result<NoContent, ApiError> {
        let current = Password::candidate(body.0.current_password.0)?;
        let code = body.0.code.map(|c| c.0);
        let client = client_info(req, &state);
        accounts::delete_own(&state, auth.0.claims.sub, current, code.as_deref(), &client).await?;
        Ok(NoContent::Done)
    }

    /// The signed-in user's live sessions
    #[oai(path = "/me/sessions", method = "get", operation_id = "mySessions")]
    async fn sessions(
        &self,
        state: Data<&Arc<AppState>>,
        auth: BearerAuth,
        /// The `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
        /// Sessions per page, 1 to 100 (default 50).
        #[oai(default = "default_page", validator(minimum(value = "1"), maximum(value = "100")))]
        limit: Query<u64>,
    ) -> Result<Json<SessionList>, ApiError> {
        let page = sessions::list_live(
            &state.db,
            auth.0.claims.sub,
            state.clock.now(),
            cursor.0.as_deref(),
            limit.0,
        )
        .await?;
        Ok(Json(SessionList::from_page(page, Some(auth.0.claims.sid))))
    }

    /// End one of the signed-in user's sessions
    ///
    /// Its access tokens are refused from the next request on; its refresh token stops
    /// working. Another user's session id is answered 404, like one that does not exist.
    #[oai(path = "/me/sessions/:id", method = "delete", operation_id = "endMySession")]
    async fn end_session(
        &self,
        state: Data<&Arc<AppState>>,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> Result<NoContent, ApiError> {
        sessions::end_own(&state, auth.0.claims.sub, id.0).await?;
        state.audit.record(
            crate::audit::AuditEvent::new("session_revoked", "success", state.clock.now())
                .user(auth.0.claims.sub)
                .detail(serde_json::json!({"session_id": id.0, "by": "owner"})),
        );
        Ok(NoContent::Done)
    }
}
