//! `/v1/admin/…`: for users with the `admin` role. The role is re-read from SQL on every
//! request, so a demoted admin loses these routes at once, whatever the token says.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use poem::Request;
use poem::web::Data;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi};
use uuid::Uuid;

use super::ApiTags;
use super::auth::NoContent;
use super::client::client_info;
use super::security::BearerAuth;
use super::users::{SessionList, default_page};
use crate::audit::AuditEvent;
use crate::error::{ApiError, ErrorCode};
use crate::service::{accounts, auth, sessions, users};
use crate::state::AppState;

pub const ADMIN_ROLE: &str = "admin";

async fn require_admin(state: &AppState, auth: &BearerAuth) -> Result<(), ApiError> {
    let roles = auth::roles_of(&state.db, auth.0.claims.sub).await?;
    if roles.iter().any(|r| r == ADMIN_ROLE) {
        Ok(())
    } else {
        Err(ApiError::new(ErrorCode::Forbidden, "This route needs the admin role."))
    }
}

/// An account, as admins see it.
#[derive(Object)]
pub struct UserSummary {
    pub id: Uuid,
    pub email: String,
    pub email_verified: bool,
    /// When the account was disabled; `null` while it can log in.
    pub disabled_at: Option<DateTime<Utc>>,
    pub roles: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub last_login_at: Option<DateTime<Utc>>,
}

impl From<users::Profile> for UserSummary {
    fn from((account, roles): users::Profile) -> Self {
        Self {
            id: account.id,
            email_verified: account.email_verified_at.is_some(),
            email: account.email,
            disabled_at: account.disabled_at,
            roles,
            created_at: account.created_at,
            last_login_at: account.last_login_at,
        }
    }
}

/// A page of accounts, oldest first.
#[derive(Object)]
pub struct UserList {
    pub users: Vec<UserSummary>,
    /// Pass it as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// A user's roles: exactly these, afterwards.
#[derive(Object)]
#[oai(deny_unknown_fields)]
pub struct Roles {
    /// At most 32 names of 1 to 64 characters from a-z, 0-9, `_ - : .`.
    pub roles: Vec<String>,
}

pub struct AdminApi;

#[OpenApi(prefix_path = "/v1/admin", tag = "ApiTags::Admin")]
impl AdminApi {
    /// A user's live sessions (admin)
    #[oai(path = "/users/:id/sessions", method = "get", operation_id = "adminUserSessions")]
    async fn user_sessions(
        &self,
        state: Data<&Arc<AppState>>,
        auth: BearerAuth,
        id: Path<Uuid>,
        /// The `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
        /// Sessions per page, 1 to 100 (default 50).
        #[oai(default = "default_page", validator(minimum(value = "1"), maximum(value = "100")))]
        limit: Query<u64>,
    ) -> Result<Json<SessionList>, ApiError> {
        require_admin(&state, &auth).await?;
        let page =
            sessions::list_live(&state.db, id.0, state.clock.now(), cursor.0.as_deref(), limit.0).await?;
        Ok(Json(SessionList::from_page(page, Some(auth.0.claims.sid))))
    }

    /// List and search users (admin)
    ///
    /// Oldest first; `query` matches any part of the email, case-insensitively.
    #[oai(path = "/users", method = "get", operation_id = "adminListUsers")]
    async fn list_users(
        &self,
        state: Data<&Arc<AppState>>,
        auth: BearerAuth,
        /// Part of the email to look for.
        query: Query<Option<String>>,
        /// The `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
        /// Users per page, 1 to 100 (default 50).
        #[oai(default = "default_page", validator(minimum(value = "1"), maximum(value = "100")))]
        limit: Query<u64>,
    ) -> Result<Json<UserList>, ApiError> {
        require_admin(&state, &auth).await?;
        let page = accounts::list_users(&state, query.0.as_deref(), cursor.0.as_deref(), limit.0).await?;
        Ok(Json(UserList {
            users: page.users.into_iter().map(UserSummary::from).collect(),
            next_cursor: page.next_cursor,
        }))
    }

    /// Disable a user (admin)
    ///
    /// Every session of the user ends at once, and their logins are answered like a wrong
    /// password until they are enabled again. Mailed links they hold stop working.
    #[oai(path = "/users/:id/disable", method = "post", operation_id = "adminDisableUser")]
    async fn disable_user(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> Result<NoContent, ApiError> {
        require_admin(&state, &auth).await?;
        accounts::disable(&state, id.0).await?;
        admin_audit(&state, req, "user_disabled", id.0, auth.0.claims.sub);
        Ok(NoContent::Done)
    }

    /// Enable a disabled user (admin)
    #[oai(path = "/users/:id/enable", method = "post", operation_id = "adminEnableUser")]
    async fn enable_user(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> Result<NoContent, ApiError> {
        require_admin(&state, &auth).await?;
        accounts::enable(&state, id.0).await?;
        admin_audit(&state, req, "user_enabled", id.0, auth.0.claims.sub);
        Ok(NoContent::Done)
    }

    /// Set a user's roles (admin)
    ///
    /// The user has exactly these roles afterwards. Admin routes see the change on the
    /// next request; access tokens carry it from the next refresh.
    #[oai(path = "/users/:id/roles", method = "put", operation_id = "adminSetUserRoles")]
    async fn set_roles(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
        auth: BearerAuth,
        id: Path<Uuid>,
        body: Json<Roles>,
    ) -> Result<Json<Roles>, ApiError> {
        require_admin(&state, &auth).await?;
        let roles = accounts::set_roles(&state, id.0, body.0.roles).await?;
        let client = client_info(req, &state);
        state.audit.record(
            AuditEvent::new("roles_changed", "success", state.clock.now())
                .user(id.0)
                .client(&client)
                .detail(serde_json::json!({"roles": roles, "by_admin": auth.0.claims.sub})),
        );
        Ok(Json(Roles { roles }))
    }

    /// Delete a user (admin)
    ///
    /// As self-deletion: every session ends at once, then the account, its sessions,
    /// roles and tokens are deleted; its audit rows stay without a user.
    #[oai(path = "/users/:id", method = "delete", operation_id = "adminDeleteUser")]
    async fn delete_user(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> Result<NoContent, ApiError> {
        require_admin(&state, &auth).await?;
        let client = client_info(req, &state);
        accounts::delete_account(&state, id.0, Some(auth.0.claims.sub), &client).await?;
        Ok(NoContent::Done)
    }

    /// End every session of a user (admin)
    #[oai(path = "/users/:id/revoke-sessions", method = "post", operation_id = "adminRevokeUserSessions")]
    async fn revoke_sessions(
        &self,
        state: Data<&Arc<AppState>>,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> Result<NoContent, ApiError> {
        require_admin(&state, &auth).await?;
        let ended = sessions::end(&state, sessions::Scope::AllOfUser(id.0)).await?;
        state.audit.record(
            AuditEvent::new("session_revoked", "success", state.clock.now())
                .user(id.0)
                .detail(serde_json::json!({"sessions": ended.len(), "by_admin": auth.0.claims.sub})),
        );
        Ok(NoContent::Done)
    }
}

fn admin_audit(state: &AppState, req: &Request, action: &'static str, user: Uuid, admin: Uuid) {
    let client = client_info(req, state);
    state.audit.record(
        AuditEvent::new(action, "success", state.clock.now())
            .user(user)
            .client(&client)
            .detail(serde_json::json!({"by_admin": admin})),
    );
}
