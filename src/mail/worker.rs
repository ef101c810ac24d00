//! The background workers that drain the outbox.
//!
//! A worker leases one due row at a time: on PostgreSQL with `FOR UPDATE SKIP LOCKED`, so
//! workers of several instances each take a different row without waiting on one another;
//! on SQLite with a compare-and-swap `UPDATE`. A lease sets `status = 'sending'`, counts
//! the attempt and moves `next_attempt_at` (= `lease_until`) to the lease's end, so a row
//! whose worker died is due again once its lease expires. The outcome is written only if
//! the row still carries this lease's attempt count (the fencing token). A temporary
//! failure is retried after `MAIL_RETRY_BASE · 2^(attempt-1)` (at most `MAIL_RETRY_MAX`);
//! a permanent one, or the last of `MAIL_MAX_ATTEMPTS`, leaves the row `abandoned` with
//! its error. Stopping lets a send in progress finish (bounded) and leaves the rest queued.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use lettre::message::Mailbox;
use sea_orm::sea_query::Expr;
use sea_orm::sea_query::{LockBehavior, LockType};
use sea_orm::{
    ColumnTrait as _, ConnectionTrait, DatabaseConnection, DbBackend, DbErr, EntityTrait as _,
    PaginatorTrait as _, QueryFilter as _, QueryOrder as _, QuerySelect as _, Statement,
    TransactionTrait as _,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::TEMPLATE_NAMES;
use super::transport::{self, SendError, Transport};
use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::store::entity::email_outbox::{self, Column};

pub const QUEUED: &str = "queued";
pub const SENDING: &str = "sending";
pub const SENT: &str = "sent";
pub const ABANDONED: &str = "abandoned";

/// How often the queue-depth gauges are refreshed.
const GAUGE_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct WorkerSettings {
    pub workers: usize,
    pub poll_interval: Duration,
    pub lease: Duration,
    pub max_attempts: u32,
    pub retry_base: Duration,
    pub retry_max: Duration,
    pub from: Mailbox,
    /// How long stopping waits for sends in progress.
    pub stop_grace: Duration,
}

impl WorkerSettings {
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            workers: config.mail_workers,
            poll_interval: config.mail_poll_interval,
            lease: config.mail_lease,
            max_attempts: config.mail_max_attempts,
            retry_base: config.mail_retry_base,
            retry_max: config.mail_retry_max,
            from: config.email_from.clone(),
            stop_grace: config.shutdown_timeout.min(transport::SMTP_TIMEOUT),
        }
    }

    /// The wait before the attempt after attempt `n` (1-based).
    fn backoff(&self, n: i32) -> Duration {
        let doublings = u32::try_from(n.saturating_sub(1)).unwrap_or(0).min(30);
        self.retry_base.saturating_mul(1 << doublings).min(self.retry_max)
    }
}

struct Ctx {
    db: DatabaseConnection,
    transport: Transport,
    settings: WorkerSettings,
    metrics: Arc<Metrics>,
    clock: Clock,
}

/// The running workers; [`MailWorker::shutdown`] stops them.
pub struct MailWorker {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    grace: Duration,
}

impl MailWorker {
    pub fn start(
        db: DatabaseConnection,
        transport: Transport,
        settings: WorkerSettings,
        metrics: Arc<Metrics>,
        clock: Clock,
    ) -> Self {
        let (stop, stopped) = watch::channel(false);
        let grace = settings.stop_grace;
        let workers = settings.workers;
        let ctx = Arc::new(Ctx { db, transport, settings, metrics, clock });
        let mut tasks: Vec<JoinHandle<()>> =
            (0..workers).map(|_| tokio::spawn(run(Arc::clone(&ctx), stopped.clone()))).collect();
        tasks.push(tokio::spawn(gauges(ctx, stopped)));
        Self { stop, tasks, grace }
    }

    /// Stops taking mail, waits (bounded) for sends in progress, and returns. Unsent mail
    /// stays in the outbox; a send cut off by the bound is retried once its lease expires.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + self.grace;
        for task in self.tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                tracing::warn!("a mail send did not finish in time; it is retried after its lease expires");
                abort.abort();
            }
        }
    }
}

async fn run(ctx: Arc<Ctx>, mut stop: watch::Receiver<bool>) {
    loop {
        if *stop.borrow() {
            return;
        }
        match lease(&ctx).await {
            // Straight on to the next one: the queue may hold more.
            Ok(Some(row)) => {
                deliver(&ctx, row).await;
                continue;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "leasing mail from the outbox failed; will retry"),
        }
        tokio::select! {
            changed = stop.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(ctx.settings.poll_interval) => {}
        }
    }
}

/// Takes one due row (queued and due, or sending with an expired lease), or none.
async fn lease(ctx: &Ctx) -> Result<Option<email_outbox::Model>, DbErr> {
    let now = ctx.clock.now();
    let until = now + chrono::Duration::from_std(ctx.settings.lease).unwrap_or(chrono::Duration::MAX);
    match ctx.db.get_database_backend() {
        DbBackend::Postgres => {
            let sql = "UPDATE email_outbox \
                SET status = $1, attempts = attempts + 1, lease_until = $2, next_attempt_at = $2 \
                WHERE id = (SELECT id FROM email_outbox \
                    WHERE status IN ($3, $1) AND next_attempt_at <= $4 \
                    ORDER BY next_attempt_at LIMIT 1 FOR UPDATE SKIP LOCKED) \
                RETURNING *";
            let stmt = Statement::from_sql_and_values(
                DbBackend::Postgres,
                sql,
                [SENDING.into(), until.into(), QUEUED.into(), now.into()],
            );
            email_outbox::Entity::find().from_raw_sql(stmt).one(&ctx.db).await
        }
        DbBackend::MySql => {
            // No UPDATE … RETURNING: in one transaction the SELECT locks the row (skipping
            // one another worker holds), the UPDATE takes it, and the commit hands it over.
            let txn = ctx.db.begin().await?;
            let taken = take(&txn, now, until, true).await?;
            txn.commit().await?;
            Ok(taken)
        }
        _ => take(&ctx.db, now, until, false).await,
    }
}

/// The first due row, read then taken by a compare-and-swap UPDATE: SQLite writes one at
/// a time, so the UPDATE that still finds the row as it was read owns it; a worker that
/// loses the race finds it changed and takes nothing. With `lock` (MySQL, in the caller's
/// transaction) the read locks the row and skips rows other workers have locked.
async fn take(
    conn: &impl ConnectionTrait,
    now: DateTime<Utc>,
    until: DateTime<Utc>,
    lock: bool,
) -> Result<Option<email_outbox::Model>, DbErr> {
    let mut due = email_outbox::Entity::find()
        .filter(Column::Status.is_in([QUEUED, SENDING]))
        .filter(Column::NextAttemptAt.lte(now))
        .order_by_asc(Column::NextAttemptAt);
    if lock {
        due = due.lock_with_behavior(LockType::Update, LockBehavior::SkipLocked);
    }
    let Some(row) = due.one(conn).await? else {
        return Ok(None);
    };
    let attempts = row.attempts + 1;
    let taken = email_outbox::Entity::update_many()
        .col_expr(Column::Status, Expr::value(SENDING))
        .col_expr(Column::Attempts, Expr::value(attempts))
        .col_expr(Column::LeaseUntil, Expr::value(Some(until)))
        .col_expr(Column::NextAttemptAt, Expr::value(until))
        .filter(Column::Id.eq(row.id))
        .filter(Column::Status.eq(row.status.clone()))
        .filter(Column::Attempts.eq(row.attempts))
        .exec(conn)
        .await?;
    Ok((taken.rows_affected == 1).then(|| email_outbox::Model {
        status: SENDING.to_owned(),
        attempts,
        lease_until: Some(until),
        next_attempt_at: until,
        ..row
    }))
}

/// The metrics label of a stored template name: one of a fixed set.
fn template_label(name: &str) -> &'static str {
    TEMPLATE_NAMES.iter().copied().find(|t| *t == name).unwrap_or("other")
}

enum Outcome {
    Sent,
    Retry(DateTime<Utc>, String),
    Abandoned(String),
}

async fn deliver(ctx: &Ctx, row: email_outbox::Model) {
    let max = i32::try_from(ctx.settings.max_attempts).unwrap_or(i32::MAX);
    let result = if row.attempts > max {
        // Leased again after its last attempt's lease expired (the instance stopped or
        // lost the database mid-send): the attempts are spent.
        Err(SendError { permanent: true, reason: "no attempts left after an interrupted send".into() })
    } else {
        match transport::message(&ctx.settings.from, &row) {
            Ok(message) => ctx.transport.send(&message, row.id).await,
            Err(e) => Err(e),
        }
    };
    let now = ctx.clock.now();
    let outcome = match result {
        Ok(()) => Outcome::Sent,
        Err(e) if e.permanent || row.attempts >= max => {
            let reason = if e.permanent {
                e.reason
            } else {
                format!("{} (after {} attempts)", e.reason, row.attempts)
            };
            Outcome::Abandoned(reason)
        }
        Err(e) => {
            let wait = chrono::Duration::from_std(ctx.settings.backoff(row.attempts))
                .unwrap_or(chrono::Duration::MAX);
            Outcome::Retry(now + wait, e.reason)
        }
    };
    let template = template_label(&row.template);
    let label = match &outcome {
        Outcome::Sent => {
            tracing::info!(id = %row.id, template, attempt = row.attempts, "mail sent");
            "sent"
        }
        Outcome::Retry(at, reason) => {
            tracing::warn!(id = %row.id, template, attempt = row.attempts, retry_at = %at, error = %reason, "mail not sent; will retry");
            "retried"
        }
        Outcome::Abandoned(reason) => {
            tracing::error!(id = %row.id, template, attempt = row.attempts, error = %reason, "mail abandoned");
            "abandoned"
        }
    };
    ctx.metrics.mail(template, label);
    // A few tries: if the outcome cannot be written, the lease expires and the mail is
    // sent again (at least once, never lost).
    for attempt in 0..3 {
        match record(ctx, &row, &outcome, now).await {
            Ok(()) => return,
            Err(e) if attempt == 2 => {
                tracing::error!(id = %row.id, error = %e, "recording a mail's outcome failed; it will be retried after its lease");
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn record(
    ctx: &Ctx,
    row: &email_outbox::Model,
    outcome: &Outcome,
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    let update =
        email_outbox::Entity::update_many().col_expr(Column::LeaseUntil, Expr::value(None::<DateTime<Utc>>));
    let update = match outcome {
        // A sent or abandoned mail's bodies go: they hold live links, which SQL must not
        // keep once they are of no more use (the subject stays, for people to read).
        Outcome::Sent => update
            .col_expr(Column::Status, Expr::value(SENT))
            .col_expr(Column::SentAt, Expr::value(Some(now)))
            .col_expr(Column::TextBody, Expr::value(""))
            .col_expr(Column::HtmlBody, Expr::value("")),
        Outcome::Retry(at, reason) => update
            .col_expr(Column::Status, Expr::value(QUEUED))
            .col_expr(Column::NextAttemptAt, Expr::value(*at))
            .col_expr(Column::LastError, Expr::value(Some(truncate(reason)))),
        Outcome::Abandoned(reason) => update
            .col_expr(Column::Status, Expr::value(ABANDONED))
            .col_expr(Column::LastError, Expr::value(Some(truncate(reason))))
            .col_expr(Column::TextBody, Expr::value(""))
            .col_expr(Column::HtmlBody, Expr::value("")),
    };
    update
        .filter(Column::Id.eq(row.id))
        .filter(Column::Status.eq(SENDING))
        .filter(Column::Attempts.eq(row.attempts))
        .exec(&ctx.db)
        .await
        .map(|_| ())
}

/// Errors are kept for people to read, not to fill the table.
fn truncate(reason: &str) -> String {
    reason.chars().take(1000).collect()
}

/// Refreshes the queue depth and the oldest queued mail's age.
async fn gauges(ctx: Arc<Ctx>, mut stop: watch::Receiver<bool>) {
    loop {
        let pending = || email_outbox::Entity::find().filter(Column::Status.is_in([QUEUED, SENDING]));
        let depth = pending().count(&ctx.db).await;
        let oldest = pending().order_by_asc(Column::CreatedAt).one(&ctx.db).await;
        match (depth, oldest) {
            (Ok(depth), Ok(oldest)) => {
                let age = oldest.map_or(0, |row| (ctx.clock.now() - row.created_at).num_seconds().max(0));
                ctx.metrics.mail_queue(depth, age);
            }
            (Err(e), _) | (_, Err(e)) => tracing::debug!(error = %e, "reading the outbox's depth failed"),
        }
        tokio::select! {
            changed = stop.changed() => if changed.is_err() || *stop.borrow() { return },
            () = tokio::time::sleep(GAUGE_INTERVAL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let settings = WorkerSettings {
            workers: 1,
            poll_interval: Duration::from_secs(1),
            lease: Duration::from_secs(300),
            max_attempts: 10,
            retry_base: Duration::from_secs(30),
            retry_max: Duration::from_secs(3600),
            from: "Latchkey <no-reply@example.com>".parse().expect("mailbox"),
            stop_grace: Duration::from_secs(1),
        };
        let waits: Vec<u64> = (1..=9).map(|n| settings.backoff(n).as_secs()).collect();
        assert_eq!(waits, [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]);
        assert_eq!(settings.backoff(1000), Duration::from_secs(3600));
    }

    #[test]
    fn unknown_templates_share_one_label() {
        assert_eq!(template_label("reset_password"), "reset_password");
        assert_eq!(template_label("something else"), "other");
    }
}
