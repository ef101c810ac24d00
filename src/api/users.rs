//! `/v1/users/me`: the signed-in user's profile.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use poem::web::Data;
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi};
use uuid::Uuid;

use super::ApiTags;
use super::security::BearerAuth;
use crate::error::ApiError;
use crate::service::auth;
use crate::state::AppState;

#[derive(Object)]
pub struct Profile {
    pub id: Uuid,
    pub email: String,
    pub is_verified: bool,
    pub roles: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub last_login_at: Option<DateTime<Utc>>,
}

pub struct UsersApi;

#[OpenApi(prefix_path = "/v1/users", tag = "ApiTags::Users")]
impl UsersApi {
    /// The signed-in user's profile
    #[oai(path = "/me", method = "get", operation_id = "me")]
    async fn me(
        &self,
        state: Data<&Arc<AppState>>,
        auth: BearerAuth,
    ) -> Result<Json<Profile>, ApiError> {
        let (user, roles) = auth::profile(&state, auth.0.claims.sub).await?;
        Ok(Json(Profile {
            id: user.id,
            email: user.email,
            is_verified: user.is_verified,
            roles,
            created_at: user.created_at,
            last_login_at: user.last_login_at,
        }))
    }
}
