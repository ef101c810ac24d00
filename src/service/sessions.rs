//! Sessions: listing, ending (one, all, or a whole family on theft) and pruning.
//!
//! Ending a session writes SQL first (the truth), then deletes it from the revocation
//! store (the instant effect). Both steps are idempotent, so a retry after a store
//! failure finishes the job.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait as _};
use sea_orm::{
    ColumnTrait as _, ConnectionTrait, EntityTrait as _, QueryFilter as _, QueryOrder as _, QuerySelect as _,
    TransactionTrait as _,
};
use uuid::Uuid;

use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;
use crate::store::entity::{refresh_token, session};

/// How long ended sessions stay in SQL (for the session list's history and audits)
/// before the pruner deletes them with their refresh tokens.
pub const RETENTION: chrono::Duration = chrono::Duration::days(7);
pub const PRUNE_BATCH: u64 = 500;
pub const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// The user's live sessions, most recently used first.
pub async fn list_live(
    db: &impl ConnectionTrait,
    user_id: Uuid,
    now: DateTime<Utc>,
) -> Result<Vec<session::Model>, ApiError> {
    Ok(session::Entity::find()
        .filter(session::Column::UserId.eq(user_id))
        .filter(session::Column::RevokedAt.is_null())
        .filter(session::Column::ExpiresAt.gt(now))
        .order_by_desc(session::Column::LastUsedAt)
        .all(db)
        .await?)
}

/// Which sessions to end.
#[derive(Clone, Copy, Debug)]
pub enum Scope {
    One(Uuid),
    AllOfUser(Uuid),
}

/// Ends the sessions in `scope`; returns their ids. Idempotent.
pub async fn end(state: &AppState, scope: Scope) -> Result<Vec<Uuid>, ApiError> {
    let now = state.clock.now();
    let txn = state.db.begin().await?;
    let mut query = session::Entity::find().select_only().column(session::Column::Id);
    query = match scope {
        Scope::One(id) => query.filter(session::Column::Id.eq(id)),
        // Only sessions not yet ended: their store entries are what must go.
        Scope::AllOfUser(user) => {
            query.filter(session::Column::UserId.eq(user)).filter(session::Column::RevokedAt.is_null())
        }
    };
    let ids: Vec<Uuid> = query.into_tuple().all(&txn).await?;
    if ids.is_empty() {
        txn.commit().await?;
        return Ok(ids);
    }
    session::Entity::update_many()
        .col_expr(session::Column::RevokedAt, Expr::value(now))
        .filter(session::Column::Id.is_in(ids.clone()))
        .filter(session::Column::RevokedAt.is_null())
        .exec(&txn)
        .await?;
    refresh_token::Entity::update_many()
        .col_expr(refresh_token::Column::RevokedAt, Expr::value(now))
        .col_expr(refresh_token::Column::SuccessorSealed, Expr::value(Option::<Vec<u8>>::None))
        .filter(refresh_token::Column::SessionId.is_in(ids.clone()))
        .filter(refresh_token::Column::RevokedAt.is_null())
        .exec(&txn)
        .await?;
    let jtis: Vec<Uuid> = refresh_token::Entity::find()
        .select_only()
        .column(refresh_token::Column::Id)
        .filter(refresh_token::Column::SessionId.is_in(ids.clone()))
        .filter(refresh_token::Column::RetiredAt.is_null())
        .into_tuple()
        .all(&txn)
        .await?;
    txn.commit().await?;
    state.store.revoke(&ids, &jtis).await?;
    Ok(ids)
}

/// Ends one of the user's own sessions. Another user's session is "not found", exactly
/// like one that does not exist.
pub async fn end_own(state: &AppState, user_id: Uuid, session_id: Uuid) -> Result<(), ApiError> {
    let owned =
        session::Entity::find_by_id(session_id).one(&state.db).await?.is_some_and(|s| s.user_id == user_id);
    if !owned {
        return Err(ApiError::new(ErrorCode::NotFound, "No such session."));
    }
    end(state, Scope::One(session_id)).await?;
    Ok(())
}

/// Deletes up to `batch` sessions that expired or ended more than `RETENTION` ago (their
/// refresh tokens go with them, by cascade), and forgets sealed successors whose grace
/// window is over. Returns how many sessions it deleted.
pub async fn prune_expired(
    db: &impl ConnectionTrait,
    now: DateTime<Utc>,
    batch: u64,
) -> Result<u64, ApiError> {
    let cutoff = now - RETENTION;
    let ids: Vec<Uuid> = session::Entity::find()
        .select_only()
        .column(session::Column::Id)
        .filter(session::Column::ExpiresAt.lt(cutoff).or(session::Column::RevokedAt.lt(cutoff)))
        .limit(batch)
        .into_tuple()
        .all(db)
        .await?;
    if ids.is_empty() {
        return Ok(0);
    }
    // Explicitly, not only by cascade: SQLite enforces cascades only with foreign_keys on.
    refresh_token::Entity::delete_many()
        .filter(refresh_token::Column::SessionId.is_in(ids.clone()))
        .exec(db)
        .await?;
    let deleted = session::Entity::delete_many().filter(session::Column::Id.is_in(ids)).exec(db).await?;
    Ok(deleted.rows_affected)
}

/// Forgets sealed successors once their grace window is over.
pub async fn forget_sealed_successors(
    db: &impl ConnectionTrait,
    now: DateTime<Utc>,
    grace: Duration,
) -> Result<u64, ApiError> {
    let grace = chrono::Duration::from_std(grace).map_err(ApiError::internal)?;
    let res = refresh_token::Entity::update_many()
        .col_expr(refresh_token::Column::SuccessorSealed, Expr::value(Option::<Vec<u8>>::None))
        .filter(refresh_token::Column::SuccessorSealed.is_not_null())
        .filter(refresh_token::Column::RetiredAt.lt(now - grace))
        .exec(db)
        .await?;
    Ok(res.rows_affected)
}

/// The background pruner: every `PRUNE_EVERY`, in batches, until nothing is left.
pub fn spawn_pruner(state: std::sync::Weak<AppState>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PRUNE_EVERY);
        loop {
            tick.tick().await;
            let Some(state) = state.upgrade() else { return };
            if let Err(e) = prune_all(&state).await {
                tracing::warn!(error = %e, "pruning expired sessions failed; will retry");
            }
        }
    });
}

async fn prune_all(state: &Arc<AppState>) -> Result<(), ApiError> {
    let now = state.clock.now();
    forget_sealed_successors(&state.db, now, state.config.refresh_reuse_grace).await?;
    let mut total = 0;
    loop {
        let n = prune_expired(&state.db, now, PRUNE_BATCH).await?;
        total += n;
        if n < PRUNE_BATCH {
            break;
        }
        tokio::task::yield_now().await;
    }
    if total > 0 {
        tracing::info!(sessions = total, "pruned expired sessions");
    }
    Ok(())
}

/// A readable label for a user agent, e.g. "Firefox 132 on Linux".
pub fn device_label(user_agent: Option<&str>) -> String {
    let Some(ua) = user_agent.filter(|ua| !ua.trim().is_empty()) else {
        return "Unknown device".to_owned();
    };
    match woothee::parser::Parser::new().parse(ua) {
        Some(r)
            if r.name != woothee::woothee::VALUE_UNKNOWN
                && matches!(r.category, "pc" | "smartphone" | "mobilephone" | "appliance") =>
        {
            let major = r.version.split('.').next().unwrap_or("");
            let browser = if major.is_empty() || major == woothee::woothee::VALUE_UNKNOWN {
                r.name.to_owned()
            } else {
                format!("{} {major}", r.name)
            };
            if r.os == woothee::woothee::VALUE_UNKNOWN { browser } else { format!("{browser} on {}", r.os) }
        }
        // Not a browser (a library, a crawler, an app): name the first product token ("curl/8.5.0" → "curl 8.5.0").
        _ => ua
            .split_whitespace()
            .next()
            .map_or_else(|| "Unknown device".to_owned(), |p| p.replacen('/', " ", 1)),
    }
}

#[cfg(test)]
mod tests {
    use super::device_label;

    #[test]
    fn device_labels_are_readable() {
        assert_eq!(
            device_label(Some("Mozilla/5.0 (X11; Linux x86_64; rv:132.0) Gecko/20100101 Firefox/132.0")),
            "Firefox 132 on Linux"
        );
        let chrome_mac = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36";
        assert!(
            device_label(Some(chrome_mac)).starts_with("Chrome 131 on Mac"),
            "{}",
            device_label(Some(chrome_mac))
        );
        assert_eq!(device_label(Some("curl/8.5.0")), "curl 8.5.0");
        assert_eq!(device_label(None), "Unknown device");
    }
}
