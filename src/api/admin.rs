//! `/v1/admin/…`: for users with the `admin` role. The role is re-read from SQL on every
//! request, so a demoted admin loses these routes at once, whatever the token says.

use std::sync::Arc;

use poem::web::Data;
use poem_openapi::OpenApi;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use uuid::Uuid;

use super::ApiTags;
use super::auth::NoContent;
use super::security::BearerAuth;
use super::users::{SessionList, default_page};
use crate::audit::AuditEvent;
use crate::error::{ApiError, ErrorCode};
use crate::service::{auth, sessions};
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
