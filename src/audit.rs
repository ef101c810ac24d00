//! The audit log: events go into a bounded channel; a background worker writes them to
//! `audit_logs` in batches (by size, or at the latest every second). The request path
//! never waits on the database for it. A full channel drops the event, counts it and
//! logs it: never silently. On shutdown the worker drains the channel before it stops.
//!
//! Events come in two classes (issue 14: a flood of refusals crowded out the events that
//! matter). `Noise`, the refusals anyone can cause at will, may fill at most half of the
//! channel; the other half is reserved for `Security` events, which noise can never take.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::{DatabaseConnection, EntityTrait as _, Set};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::store::entity::audit_log;

const BATCH: usize = 100;
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// One audited action. `detail` is small and never holds a secret.
#[derive(Clone, Debug)]
pub struct AuditEvent {
    pub action: &'static str,
    pub outcome: &'static str,
    pub user_id: Option<Uuid>,
    pub ip: Option<IpAddr>,
    pub user_agent: Option<String>,
    pub detail: Option<serde_json::Value>,
    pub at: DateTime<Utc>,
}

impl AuditEvent {
    pub fn new(action: &'static str, outcome: &'static str, at: DateTime<Utc>) -> Self {
        Self { action, outcome, user_id: None, ip: None, user_agent: None, detail: None, at }
    }

    pub fn user(mut self, id: Uuid) -> Self {
        self.user_id = Some(id);
        self
    }

    pub fn client(mut self, client: &crate::service::ClientInfo) -> Self {
        self.ip = client.ip;
        self.user_agent = client.user_agent.as_ref().map(|ua| ua.chars().take(512).collect());
        self
    }

    pub fn detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = Some(detail);
        self
    }

    /// Noise is what a stranger can produce at will and in bulk: refusals. Everything else
    /// (logins, refreshes, reuse, logouts, revocations, registrations, keys, admin actions),
    /// and any action added later until it is listed here, is security.
    pub fn class(&self) -> Class {
        match self.action {
            "rate_limited" => Class::Noise,
            _ => Class::Security,
        }
    }
}

/// Which share of the audit queue an event may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// May use the whole queue.
    Security,
    /// May use at most half of it (rounded down).
    Noise,
}

impl Class {
    pub const ALL: [Class; 2] = [Class::Security, Class::Noise];

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Security => "security",
            Class::Noise => "noise",
        }
    }

    fn index(self) -> usize {
        match self {
            Class::Security => 0,
            Class::Noise => 1,
        }
    }
}

/// The sending side, cloned into the application state.
#[derive(Clone)]
pub struct Auditor {
    tx: mpsc::Sender<AuditEvent>,
    shared: Arc<Shared>,
}

/// What the senders and the writer share.
struct Shared {
    /// Noise events in the channel now; the writer gives a slot back as it takes one out.
    noise_queued: AtomicUsize,
    noise_share: usize,
    /// Dropped events since start, by `Class::index`.
    dropped: [AtomicU64; 2],
}

impl Shared {
    fn take_noise_slot(&self) -> bool {
        self.noise_queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.noise_share).then_some(n + 1))
            .is_ok()
    }

    fn release_noise_slot(&self) {
        let _ = self.noise_queued.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// The writer took `event` out of the channel.
    fn taken(&self, event: &AuditEvent) {
        if event.class() == Class::Noise {
            self.release_noise_slot();
        }
    }
}

/// The worker's handle: `shutdown` drains the queue into SQL and waits for it.
pub struct AuditWorker {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Auditor {
    /// `capacity` events may wait (at least 1); noise may take at most `capacity / 2` of them.
    pub fn start(db: DatabaseConnection, capacity: usize) -> (Self, AuditWorker) {
        let capacity = capacity.max(1);
        let (tx, rx) = mpsc::channel(capacity);
        let shared = Arc::new(Shared {
            noise_queued: AtomicUsize::new(0),
            noise_share: capacity / 2,
            dropped: [AtomicU64::new(0), AtomicU64::new(0)],
        });
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run(db, rx, Arc::clone(&shared), stopped));
        (Self { tx, shared }, AuditWorker { stop, task })
    }

    pub fn record(&self, event: AuditEvent) {
        let class = event.class();
        if class == Class::Noise && !self.shared.take_noise_slot() {
            self.dropped(&event, class, "the audit queue's share for noise is full; event dropped");
            return;
        }
        if let Err(e) = self.tx.try_send(event) {
            let event = e.into_inner();
            if class == Class::Noise {
                self.shared.release_noise_slot();
            }
            self.dropped(&event, class, "audit queue full; event dropped");
        }
    }

    fn dropped(&self, event: &AuditEvent, class: Class, message: &'static str) {
        let total = self.shared.dropped[class.index()].fetch_add(1, Ordering::Relaxed) + 1;
        // Every lost security event is logged; noise, which comes in floods, only now and then.
        if class == Class::Security || total == 1 || total % 1000 == 0 {
            tracing::warn!(
                action = event.action,
                outcome = event.outcome,
                class = class.as_str(),
                dropped_total = total,
                "{message}"
            );
        }
    }

    /// Events of `class` dropped because their share of the queue was full, since start.
    pub fn dropped_of(&self, class: Class) -> u64 {
        self.shared.dropped[class.index()].load(Ordering::Relaxed)
    }

    /// Events dropped since start, of either class.
    pub fn dropped_total(&self) -> u64 {
        Class::ALL.iter().map(|c| self.dropped_of(*c)).sum()
    }

    /// Events waiting to be written.
    pub fn depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

impl AuditWorker {
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn run(
    db: DatabaseConnection,
    mut rx: mpsc::Receiver<AuditEvent>,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let take = |batch: &mut Vec<AuditEvent>, event: AuditEvent| {
        shared.taken(&event);
        batch.push(event);
    };
    loop {
        tokio::select! {
            event = rx.recv() => match event {
                Some(event) => take(&mut batch, event),
                None => break,
            },
            _ = stopped.changed() => break,
        }
        // Gather more for at most a second, or until the batch is full.
        let deadline = tokio::time::Instant::now() + FLUSH_EVERY;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(event)) => take(&mut batch, event),
                _ => break,
            }
        }
        write(&db, &mut batch).await;
    }
    // Drain what is left.
    while let Ok(event) = rx.try_recv() {
        take(&mut batch, event);
        if batch.len() >= BATCH {
            write(&db, &mut batch).await;
        }
    }
    write(&db, &mut batch).await;
}

async fn write(db: &DatabaseConnection, batch: &mut Vec<AuditEvent>) {
    if batch.is_empty() {
        return;
    }
    let rows = batch.drain(..).map(|e| audit_log::ActiveModel {
        id: Set(Uuid::now_v7()),
        user_id: Set(e.user_id),
        action: Set(e.action.to_owned()),
        outcome: Set(e.outcome.to_owned()),
        ip_address: Set(e.ip.map(|ip| ip.to_string())),
        user_agent: Set(e.user_agent),
        created_at: Set(e.at),
        detail: Set(e.detail),
    });
    let rows: Vec<_> = rows.collect();
    let count = rows.len();
    // One retry: a brief database blip should not lose the batch.
    for attempt in 0..2 {
        match audit_log::Entity::insert_many(rows.clone()).exec_without_returning(db).await {
            Ok(_) => return,
            Err(e) if attempt == 0 => {
                tracing::warn!(error = %e, "audit write failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => tracing::error!(error = %e, lost = count, "audit write failed; events lost"),
        }
    }
}

/// Deletes up to `batch` audit rows older than `before`; returns how many.
pub async fn prune(
    db: &DatabaseConnection,
    before: DateTime<Utc>,
    batch: u64,
) -> Result<u64, sea_orm::DbErr> {
    use sea_orm::{ColumnTrait as _, QueryFilter as _, QuerySelect as _};
    let ids: Vec<Uuid> = audit_log::Entity::find()
        .select_only()
        .column(audit_log::Column::Id)
        .filter(audit_log::Column::CreatedAt.lt(before))
        .limit(batch)
        .into_tuple()
        .all(db)
        .await?;
    if ids.is_empty() {
        return Ok(0);
    }
    let res = audit_log::Entity::delete_many().filter(audit_log::Column::Id.is_in(ids)).exec(db).await?;
    Ok(res.rows_affected)
}

/// Every ten minutes, deletes audit rows older than `AUDIT_RETENTION`, in batches.
pub fn spawn_pruner(state: std::sync::Weak<crate::state::AppState>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(600));
        loop {
            tick.tick().await;
            let Some(state) = state.upgrade() else { return };
            let Ok(retention) = chrono::Duration::from_std(state.config.audit_retention) else { return };
            let before = state.clock.now() - retention;
            loop {
                match prune(&state.db, before, 1000).await {
                    Ok(1000) => tokio::task::yield_now().await,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "pruning the audit log failed; will retry");
                        break;
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use sea_orm::{ColumnTrait as _, EntityTrait as _, QueryFilter as _};

    use super::*;

    async fn database() -> (DatabaseConnection, tempfile::TempDir) {
        use migration::MigratorTrait as _;
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("audit.db").display());
        let db = sea_orm::Database::connect(url).await.unwrap();
        migration::Migrator::up(&db, None).await.unwrap();
        (db, dir)
    }

    async fn rows(db: &DatabaseConnection, action: &str) -> usize {
        audit_log::Entity::find().filter(audit_log::Column::Action.eq(action)).all(db).await.unwrap().len()
    }

    /// The writer cannot run between these calls (one thread, no await): the queue really
    /// is full of noise when the security event arrives.
    #[tokio::test]
    async fn a_queue_full_of_noise_still_takes_a_security_event() {
        let (db, _dir) = database().await;
        let (auditor, worker) = Auditor::start(db.clone(), 4);
        let now = Utc::now();
        for _ in 0..10 {
            auditor.record(AuditEvent::new("rate_limited", "login_per_ip", now));
        }
        auditor.record(AuditEvent::new("login_success", "success", now));
        auditor.record(AuditEvent::new("refresh_token_reused", "session_revoked", now));
        worker.shutdown().await;
        assert_eq!(rows(&db, "login_success").await, 1);
        assert_eq!(rows(&db, "refresh_token_reused").await, 1);
        assert_eq!(rows(&db, "rate_limited").await, 2, "noise gets half of the queue");
        assert_eq!(auditor.dropped_of(Class::Noise), 8);
        assert_eq!(auditor.dropped_of(Class::Security), 0);
    }
}
