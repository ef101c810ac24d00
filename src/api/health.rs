//! `/health` (liveness) and `/ready` (SQL and Redis both answer).

use std::sync::Arc;
use std::time::Duration;

use poem::web::Data;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};

use super::ApiTags;
use crate::state::AppState;
use crate::store::db;

#[derive(Object)]
pub struct Health {
    /// `ok` while the process serves.
    pub status: String,
}

#[derive(Object)]
pub struct Checks {
    /// `ok` or `unavailable`.
    pub database: String,
    /// `ok`, `unavailable`, or `in-process` when no `REDIS_URL` is set.
    pub redis: String,
}

#[derive(Object)]
pub struct Readiness {
    /// `ok` when every dependency answers, else `unavailable`.
    pub status: String,
    pub checks: Checks,
}

#[derive(ApiResponse)]
pub enum ReadyResponse {
    /// Every dependency answers.
    #[oai(status = 200)]
    Ready(Json<Readiness>),
    /// A dependency does not answer; `checks` says which.
    #[oai(status = 503)]
    NotReady(Json<Readiness>, #[oai(header = "Retry-After")] u64),
}

pub struct HealthApi;

/// How long `/ready` waits for each dependency.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

#[OpenApi(tag = "ApiTags::Health")]
impl HealthApi {
    /// Liveness
    #[oai(path = "/health", method = "get", operation_id = "health")]
    async fn health(&self) -> Json<Health> {
        Json(Health { status: "ok".into() })
    }

    /// Readiness: SQL and the revocation store both answer
    #[oai(path = "/ready", method = "get", operation_id = "ready")]
    async fn ready(&self, state: Data<&Arc<AppState>>) -> ReadyResponse {
        let (database, redis) = tokio::join!(db::ping(&state.db, CHECK_TIMEOUT), async {
            match tokio::time::timeout(CHECK_TIMEOUT, state.store.ping()).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("timed out".to_owned()),
            }
        });
        if let Err(e) = &database {
            tracing::warn!(error = %e, "readiness: database unavailable");
        }
        if let Err(e) = &redis {
            tracing::warn!(error = %e, "readiness: redis unavailable");
        }
        let ok = database.is_ok() && redis.is_ok();
        let word = |r: &Result<(), String>| if r.is_ok() { "ok" } else { "unavailable" }.to_owned();
        let redis_word =
            if state.store.kind() == "in-process" { "in-process".to_owned() } else { word(&redis) };
        let body = Readiness {
            status: if ok { "ok" } else { "unavailable" }.into(),
            checks: Checks { database: word(&database), redis: redis_word },
        };
        if ok { ReadyResponse::Ready(Json(body)) } else { ReadyResponse::NotReady(Json(body), 1) }
    }
}
