//! Sessions: listing, ending (one, all, or a whole family on theft), reconciling the
//! revocation store with SQL, and pruning.
//!
//! Ending sessions is one SQL transaction (the truth): the sessions get `revoked_at`, their
//! refresh tokens `revoked_at`, by set-based statements that work for any number of
//! sessions, and a `revocation_jobs` row records what was ended. Then the revocation store
//! gets a tombstone per session and a revoked mark per token, in bounded batches, and the
//! job is deleted. If the store write fails (or the process dies first), the job stays: the
//! instance that saw the failure retries every second and does it before it trusts the
//! store again, and every instance sweeps the jobs every minute and at start.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait as _, Query};
use sea_orm::{
    ActiveModelTrait as _, ColumnTrait as _, Condition, ConnectionTrait, DbBackend, DbErr, EntityTrait as _,
    QueryFilter as _, QueryOrder as _, QuerySelect as _, QueryTrait, Set, TransactionTrait as _,
};
use uuid::Uuid;

use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;
use crate::store::entity::{refresh_token, revocation_job, session};
use crate::store::revocation::{Ending, StoreError};

/// How long ended sessions stay in SQL (for the session list's history and audits)
/// before the pruner deletes them with their refresh tokens.
pub const RETENTION: chrono::Duration = chrono::Duration::days(7);
pub const PRUNE_BATCH: u64 = 500;
pub const PRUNE_EVERY: Duration = Duration::from_secs(600);
/// Sessions (and token hashes) per store call, and ids bound per SQL statement.
pub const BATCH: usize = 1000;
/// How often an instance that failed to write a revocation to the store tries again.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(1);
/// How often every instance looks in SQL for revocations the store may not have seen (left
/// by an instance that died between its commit and the store write).
pub const SWEEP_EVERY: u32 = 60;
/// The largest page of the session lists.
pub const MAX_PAGE: u64 = 100;

/// One page of a user's live sessions, most recently used first.
pub struct Page {
    pub rows: Vec<session::Model>,
    /// Where the next page starts; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// A position in the list: the last row's (last use, id), opaque to clients.
struct Cursor {
    last_used_at: DateTime<Utc>,
    id: Uuid,
}

impl Cursor {
    fn encode(row: &session::Model) -> String {
        let nanos = row.last_used_at.timestamp_nanos_opt().unwrap_or(i64::MAX);
        URL_SAFE_NO_PAD.encode(format!("{nanos}.{}", row.id.simple()))
    }

    fn decode(raw: &str) -> Result<Self, ApiError> {
        let bad = || ApiError::validation("cursor: not a cursor this API returned");
        let text = URL_SAFE_NO_PAD.decode(raw).map_err(|_| bad())?;
        let text = std::str::from_utf8(&text).map_err(|_| bad())?;
        let (nanos, id) = text.split_once('.').ok_or_else(bad)?;
        let nanos: i64 = nanos.parse().map_err(|_| bad())?;
        Ok(Cursor { last_used_at: DateTime::from_timestamp_nanos(nanos), id: id.parse().map_err(|_| bad())? })
    }
}

/// A page of the user's live sessions, most recently used first, after `cursor`.
pub async fn list_live(
    db: &impl ConnectionTrait,
    user_id: Uuid,
    now: DateTime<Utc>,
    cursor: Option<&str>,
    limit: u64,
) -> Result<Page, ApiError> {
    let limit = limit.clamp(1, MAX_PAGE);
    let mut query = session::Entity::find()
        .filter(session::Column::UserId.eq(user_id))
        .filter(session::Column::RevokedAt.is_null())
        .filter(session::Column::ExpiresAt.gt(now));
    if let Some(raw) = cursor {
        let c = Cursor::decode(raw)?;
        query = query.filter(
            session::Column::LastUsedAt
                .lt(c.last_used_at)
                .or(session::Column::LastUsedAt.eq(c.last_used_at).and(session::Column::Id.lt(c.id))),
        );
        if db.get_database_backend() == DbBackend::MySql {
            // MariaDB costs the cursor's range like the user's whole index prefix and then
            // reads from the newest session down, past every row before the cursor: each
            // page would read all the pages before it. On the range, a page reads its own.
            use sea_orm::sea_query::extension::mysql::{
                IndexHintScope, IndexName, MySqlSelectStatementExt as _,
            };
            QueryTrait::query(&mut query)
                .force_index(IndexName::new("idx_sessions_user_last_used"), IndexHintScope::All);
        }
    }
    let mut rows = query
        .order_by_desc(session::Column::LastUsedAt)
        .order_by_desc(session::Column::Id)
        .limit(limit + 1)
        .all(db)
        .await?;
    let more = rows.len() as u64 > limit;
    rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let next_cursor = if more { rows.last().map(Cursor::encode) } else { None };
    Ok(Page { rows, next_cursor })
}

/// Which sessions to end.
#[derive(Clone, Debug)]
pub enum Scope {
    One(Uuid),
    AllOfUser(Uuid),
    /// Every session of the user but `keep` (the one that changed the password or email).
    AllOfUserExcept {
        user: Uuid,
        keep: Uuid,
    },
    /// Some sessions of one user (at most `BATCH` ids).
    These {
        user: Uuid,
        ids: Vec<Uuid>,
    },
}

/// Whether this instance failed to tell the store of a revocation that SQL has, and the
/// lock that lets one task at a time reconcile.
#[derive(Default)]
pub struct Pending {
    dirty: AtomicBool,
    reconciling: tokio::sync::Mutex<()>,
}

impl Pending {
    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }

    fn mark(&self) {
        self.dirty.store(true, Ordering::Release);
    }
}

/// Sessions ended in SQL whose revocation store write is still to come (see [`finish`]).
#[must_use = "the store must be told: pass it to sessions::finish after the commit"]
pub struct Ended {
    job: Uuid,
    sessions: Vec<(Uuid, DateTime<Utc>)>,
    hashes: Vec<String>,
    now: DateTime<Utc>,
}

/// Ends the sessions in `scope`; returns the ids of those that were live in SQL.
/// Idempotent: ending an ended session changes nothing.
pub async fn end(state: &AppState, scope: Scope) -> Result<Vec<Uuid>, ApiError> {
    let txn = state.db.begin().await?;
    let ended = end_in(&txn, &scope, state.clock.now()).await?;
    txn.commit().await?;
    finish(state, ended).await
}

/// The SQL half of [`end`], in the caller's transaction, so that ending sessions commits
/// with whatever else ends them (a password change, an email change): the sessions and
/// their refresh tokens get `revoked_at` and a `revocation_jobs` row records it. After the
/// commit, hand the result to [`finish`].
pub async fn end_in(
    txn: &impl ConnectionTrait,
    scope: &Scope,
    now: DateTime<Utc>,
) -> Result<Ended, ApiError> {
    let (sessions, tokens, job_user, job_session) = match scope {
        Scope::One(id) => (
            Condition::all().add(session::Column::Id.eq(*id)),
            Condition::all().add(refresh_token::Column::SessionId.eq(*id)),
            None,
            Some(*id),
        ),
        Scope::AllOfUser(user) => (
            Condition::all().add(session::Column::UserId.eq(*user)),
            Condition::all().add(refresh_token::Column::UserId.eq(*user)),
            Some(*user),
            None,
        ),
        Scope::AllOfUserExcept { user, keep } => (
            Condition::all().add(session::Column::UserId.eq(*user)).add(session::Column::Id.ne(*keep)),
            Condition::all()
                .add(refresh_token::Column::UserId.eq(*user))
                .add(refresh_token::Column::SessionId.ne(*keep)),
            Some(*user),
            None,
        ),
        Scope::These { user, ids } => (
            Condition::all()
                .add(session::Column::UserId.eq(*user))
                .add(session::Column::Id.is_in(ids.clone())),
            Condition::all()
                .add(refresh_token::Column::UserId.eq(*user))
                .add(refresh_token::Column::SessionId.is_in(ids.clone())),
            Some(*user),
            None,
        ),
    };
    let sessions = sessions.add(session::Column::RevokedAt.is_null());
    let tokens = tokens.add(refresh_token::Column::RevokedAt.is_null());
    let job = Uuid::now_v7();

    let (ended, hashes) = if txn.get_database_backend() == DbBackend::MySql {
        end_locked(txn, sessions, tokens, now).await?
    } else {
        end_returning(txn, sessions, tokens, now).await?
    };
    if !ended.is_empty() {
        revocation_job::ActiveModel {
            id: Set(job),
            user_id: Set(job_user),
            session_id: Set(job_session),
            created_at: Set(now),
        }
        .insert(txn)
        .await?;
    }
    Ok(Ended { job, sessions: ended, hashes, now })
}

type EndedRows = (Vec<(Uuid, DateTime<Utc>)>, Vec<String>);

/// [`end_in`] where UPDATE … RETURNING exists (PostgreSQL, SQLite): each statement ends
/// the rows that are live when it runs and says which they were.
async fn end_returning(
    txn: &impl ConnectionTrait,
    sessions: Condition,
    tokens: Condition,
    now: DateTime<Utc>,
) -> Result<EndedRows, DbErr> {
    let mut sessions = session::Entity::update_many()
        .col_expr(session::Column::RevokedAt, Expr::value(now))
        .filter(sessions)
        .into_query();
    sessions.returning(Query::returning().columns([session::Column::Id, session::Column::ExpiresAt]));
    let mut tokens = refresh_token::Entity::update_many()
        .col_expr(refresh_token::Column::RevokedAt, Expr::value(now))
        .col_expr(refresh_token::Column::SuccessorSealed, Expr::value(Option::<Vec<u8>>::None))
        .filter(tokens)
        .into_query();
    tokens.returning(Query::returning().column(refresh_token::Column::TokenHash));
    let ended = txn
        .query_all(&sessions)
        .await?
        .iter()
        .map(|r| Ok((r.try_get("", "id")?, r.try_get("", "expires_at")?)))
        .collect::<Result<Vec<(Uuid, DateTime<Utc>)>, DbErr>>()?;
    let hashes = txn
        .query_all(&tokens)
        .await?
        .iter()
        .map(|r| r.try_get::<String>("", "token_hash"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((ended, hashes))
}

/// [`end_in`] on MySQL, which has no UPDATE … RETURNING: the live rows are read with
/// `FOR UPDATE` (a locking read sees the newest committed row and holds it to the commit,
/// as PostgreSQL's UPDATE does), then exactly those are updated by id. A racing end waits
/// on the locks and then finds the rows ended; a row inserted meanwhile is not touched,
/// as on PostgreSQL, where it would not be in the UPDATE's snapshot either.
async fn end_locked(
    txn: &impl ConnectionTrait,
    sessions: Condition,
    tokens: Condition,
    now: DateTime<Utc>,
) -> Result<EndedRows, DbErr> {
    let ended: Vec<(Uuid, DateTime<Utc>)> = session::Entity::find()
        .select_only()
        .columns([session::Column::Id, session::Column::ExpiresAt])
        .filter(sessions)
        .lock_exclusive()
        .into_tuple()
        .all(txn)
        .await?;
    for chunk in ended.chunks(BATCH) {
        session::Entity::update_many()
            .col_expr(session::Column::RevokedAt, Expr::value(now))
            .filter(session::Column::Id.is_in(chunk.iter().map(|(id, _)| *id)))
            .exec(txn)
            .await?;
    }
    let revoked: Vec<(Uuid, String)> = refresh_token::Entity::find()
        .select_only()
        .columns([refresh_token::Column::Id, refresh_token::Column::TokenHash])
        .filter(tokens)
        .lock_exclusive()
        .into_tuple()
        .all(txn)
        .await?;
    for chunk in revoked.chunks(BATCH) {
        refresh_token::Entity::update_many()
            .col_expr(refresh_token::Column::RevokedAt, Expr::value(now))
            .col_expr(refresh_token::Column::SuccessorSealed, Expr::value(Option::<Vec<u8>>::None))
            .filter(refresh_token::Column::Id.is_in(chunk.iter().map(|(id, _)| *id)))
            .exec(txn)
            .await?;
    }
    Ok((ended, revoked.into_iter().map(|(_, hash)| hash).collect()))
}

/// The store half of [`end`], after the commit of [`end_in`]'s transaction: tombstones
/// and revoked marks, then the job row goes. A store failure leaves the job for the
/// reconciler (and this instance reconciles before it trusts the store again), so the
/// revocation is certain once SQL has committed; the error says the store is behind.
pub async fn finish(state: &AppState, ended: Ended) -> Result<Vec<Uuid>, ApiError> {
    let Ended { job, sessions: ended, hashes, now } = ended;
    if ended.is_empty() {
        return Ok(Vec::new());
    }
    if let Err(e) = tell_store(state, &ended, &hashes, now).await {
        state.revocations.mark();
        tracing::warn!(error = %e, sessions = ended.len(), "ended in SQL; the revocation store will be told as soon as it answers");
        return Err(e.into());
    }
    // A failure here only means the reconciler writes the same tombstones once more.
    if let Err(e) = revocation_job::Entity::delete_by_id(job).exec(&state.db).await {
        tracing::warn!(error = %e, "deleting a finished revocation job failed; the reconciler will repeat it");
    }
    Ok(ended.into_iter().map(|(id, _)| id).collect())
}

/// [`finish`] for a change that already stands once committed (a password, email or factor
/// change): SQL has the sessions ended and a revocation job records it, so a store that does
/// not answer only delays the store's copy, which the reconciler finishes; logged, not raised.
pub async fn finish_or_defer(state: &AppState, ended: Ended) {
    if let Err(e) = finish(state, ended).await {
        tracing::warn!(error = %e.detail, "the revocation store will learn of these ended sessions from the reconciler");
    }
}

/// Tombstones for the sessions and revoked marks for the tokens, `BATCH` at a time.
async fn tell_store(
    state: &AppState,
    ended: &[(Uuid, DateTime<Utc>)],
    hashes: &[String],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let endings: Vec<Ending> = ended
        .iter()
        .map(|(id, exp)| Ending { session_id: *id, ttl: crate::clock::until(now, *exp) })
        .collect();
    let (mut sessions, mut tokens) = (endings.chunks(BATCH), hashes.chunks(BATCH));
    loop {
        match (sessions.next(), tokens.next()) {
            (None, None) => return Ok(()),
            (s, t) => state.store.end(s.unwrap_or_default(), t.unwrap_or_default()).await?,
        }
    }
}

/// Tells the store of every revocation job left in SQL, and deletes the jobs. Returns how
/// many jobs it finished.
pub async fn reconcile(state: &AppState) -> Result<usize, ApiError> {
    let _one_at_a_time = state.revocations.reconciling.lock().await;
    // Cleared before looking, so a failure that lands while we look keeps its mark.
    state.revocations.dirty.store(false, Ordering::Release);
    let result = reconcile_jobs(state).await;
    if result.is_err() {
        state.revocations.mark();
    }
    result
}

async fn reconcile_jobs(state: &AppState) -> Result<usize, ApiError> {
    let now = state.clock.now();
    let mut done = 0;
    loop {
        let jobs = revocation_job::Entity::find()
            .order_by_asc(revocation_job::Column::CreatedAt)
            .limit(100)
            .all(&state.db)
            .await?;
        if jobs.is_empty() {
            return Ok(done);
        }
        for job in jobs {
            // The job's sessions, `BATCH` at a time in id order. Any session that ended
            // later is ended too, so taking it along is harmless.
            let mut after: Option<Uuid> = None;
            loop {
                let mut query = session::Entity::find()
                    .select_only()
                    .column(session::Column::Id)
                    .column(session::Column::ExpiresAt)
                    .filter(session::Column::RevokedAt.is_not_null())
                    .filter(session::Column::ExpiresAt.gt(now));
                query = match (job.user_id, job.session_id) {
                    (Some(user), _) => query
                        .filter(session::Column::UserId.eq(user))
                        .filter(session::Column::RevokedAt.gte(job.created_at)),
                    (None, Some(id)) => query.filter(session::Column::Id.eq(id)),
                    (None, None) => break,
                };
                if let Some(after) = after {
                    query = query.filter(session::Column::Id.gt(after));
                }
                let ended: Vec<(Uuid, DateTime<Utc>)> = query
                    .order_by_asc(session::Column::Id)
                    .limit(BATCH as u64)
                    .into_tuple()
                    .all(&state.db)
                    .await?;
                let Some(&(last, _)) = ended.last() else { break };
                let hashes: Vec<String> = refresh_token::Entity::find()
                    .select_only()
                    .column(refresh_token::Column::TokenHash)
                    .filter(refresh_token::Column::SessionId.is_in(ended.iter().map(|(id, _)| *id)))
                    .filter(refresh_token::Column::ExpiresAt.gt(now))
                    .into_tuple()
                    .all(&state.db)
                    .await?;
                tell_store(state, &ended, &hashes, now).await?;
                if ended.len() < BATCH {
                    break;
                }
                after = Some(last);
            }
            revocation_job::Entity::delete_by_id(job.id).exec(&state.db).await?;
            done += 1;
        }
    }
}

/// The reconciler: at start (a process that died between a commit and the store leaves
/// work behind), every `RECONCILE_EVERY` while this instance has a failed store write, and
/// every `SWEEP_EVERY` ticks in any case.
pub fn spawn_reconciler(state: std::sync::Weak<AppState>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(RECONCILE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        for n in 0u32.. {
            tick.tick().await;
            let Some(state) = state.upgrade() else { return };
            if n % SWEEP_EVERY != 0 && !state.revocations.is_dirty() {
                continue;
            }
            match reconcile(&state).await {
                Ok(0) => failing = false,
                Ok(n) => {
                    failing = false;
                    tracing::info!(jobs = n, "told the revocation store of sessions ended in SQL");
                }
                // Once per outage, not once a second.
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e.detail, "reconciling revocations failed; retrying every second");
                }
                Err(_) => {}
            }
        }
    });
}

/// Ends the user's least recently used sessions beyond `MAX_SESSIONS_PER_USER`; the
/// newest (the one just created) always stays.
pub async fn enforce_limit(state: &AppState, user_id: Uuid) -> Result<usize, ApiError> {
    let now = state.clock.now();
    let extra: Vec<Uuid> = session::Entity::find()
        .select_only()
        .column(session::Column::Id)
        .filter(session::Column::UserId.eq(user_id))
        .filter(session::Column::RevokedAt.is_null())
        .filter(session::Column::ExpiresAt.gt(now))
        .order_by_desc(session::Column::LastUsedAt)
        .order_by_desc(session::Column::Id)
        .offset(state.config.max_sessions_per_user)
        .limit(BATCH as u64)
        .into_tuple()
        .all(&state.db)
        .await?;
    if extra.is_empty() {
        return Ok(0);
    }
    Ok(end(state, Scope::These { user: user_id, ids: extra }).await?.len())
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
