//! The audit log: events go into a bounded channel; a background worker writes them to
//! `audit_logs` in batches (by size, or at the latest every second). The request path
//! never waits on the database for it. A full channel drops the event, counts it and
//! logs it: never silently. On shutdown the worker drains the channel before it stops.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
}

/// The sending side, cloned into the application state.
#[derive(Clone)]
pub struct Auditor {
    tx: mpsc::Sender<AuditEvent>,
    dropped: Arc<AtomicU64>,
}

/// The worker's handle: `shutdown` drains the queue into SQL and waits for it.
pub struct AuditWorker {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Auditor {
    pub fn start(db: DatabaseConnection, capacity: usize) -> (Self, AuditWorker) {
        let (tx, rx) = mpsc::channel(capacity);
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run(db, rx, stopped));
        (Self { tx, dropped: Arc::new(AtomicU64::new(0)) }, AuditWorker { stop, task })
    }

    pub fn record(&self, event: AuditEvent) {
        if let Err(e) = self.tx.try_send(event) {
            let total = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            let event = match &e {
                mpsc::error::TrySendError::Full(ev) | mpsc::error::TrySendError::Closed(ev) => ev,
            };
            tracing::warn!(
                action = event.action,
                outcome = event.outcome,
                dropped_total = total,
                "audit queue full; event dropped"
            );
        }
    }

    /// Events dropped because the queue was full, since start.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
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

async fn run(db: DatabaseConnection, mut rx: mpsc::Receiver<AuditEvent>, mut stopped: watch::Receiver<bool>) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            event = rx.recv() => match event {
                Some(event) => batch.push(event),
                None => break,
            },
            _ = stopped.changed() => break,
        }
        // Gather more for at most a second, or until the batch is full.
        let deadline = tokio::time::Instant::now() + FLUSH_EVERY;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(event)) => batch.push(event),
                _ => break,
            }
        }
        write(&db, &mut batch).await;
    }
    // Drain what is left.
    while let Ok(event) = rx.try_recv() {
        batch.push(event);
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
