//! The bearer scheme: signature (algorithm pinned), `iss`, `aud`, `exp`, then the
//! session's presence in the revocation store, one round trip. A store that cannot answer
//! is a 503, never a pass.

use std::sync::Arc;

use poem::Request;
use poem_openapi::SecurityScheme;
use poem_openapi::auth::Bearer;

use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;
use crate::store::revocation::SessionRecord;
use crate::token::AccessClaims;

/// A verified access token whose session is live.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub claims: Arc<AccessClaims>,
    pub session: SessionRecord,
}

/// An access token from `POST /v1/auth/login` or `/v1/auth/refresh`.
#[derive(SecurityScheme)]
#[oai(ty = "bearer", bearer_format = "JWT", checker = "check_bearer")]
pub struct BearerAuth(pub Authenticated);

pub fn state(req: &Request) -> Result<&Arc<AppState>, ApiError> {
    req.data::<Arc<AppState>>().ok_or_else(|| ApiError::internal("application state is missing"))
}

async fn check_bearer(req: &Request, bearer: Bearer) -> poem::Result<Authenticated> {
    Ok(authenticate(state(req)?, &bearer.token).await?)
}

pub async fn authenticate(state: &AppState, token: &str) -> Result<Authenticated, ApiError> {
    let now = state.clock.now();
    let claims = state.keys.verify(token, &state.config.jwt_issuer, &state.config.jwt_audience, now)?;
    // This instance ended a session the store has not heard of: finish that before trusting
    // the store's answer (503 while it cannot).
    if state.revocations.is_dirty() {
        crate::service::sessions::reconcile(state).await?;
    }
    let session =
        state.store.session(claims.sid).await?.filter(|s| s.user_id == claims.sub).ok_or_else(|| {
            ApiError::new(ErrorCode::TokenRevoked, "The session has ended; refresh or log in again.")
        })?;
    Ok(Authenticated { claims, session })
}
