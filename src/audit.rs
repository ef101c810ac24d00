//! The audit log: events go into a bounded channel; a background worker writes them to
//! `audit_logs` in batches (by size, or at the latest every second). The request path
//! never waits on the database for it. A full channel drops the event, counts it and
//! logs it: never silently. On shutdown the worker drains the channel before it stops.
//!
//! Events come in two classes (issue 14: a flood of refusals crowded out the events that
//! matter). `Noise`, the refusals anyone can cause at will, may fill at most half of the
//! channel; the other half is reserved for `Security` events, which noise can never take.
//!
//! Floods are written once: for each key (a limit and its bucket, say `login_per_ip:<ip>`)
//! only the first refusal in a `FLOOD_WINDOW` becomes a row. The others are only counted,
//! and their number is written in one summary row when the window closes: by the key's
//! next refusal, by the sweep every `SWEEP_EVERY`, or at shutdown, whichever comes first.

use std::hash::BuildHasher as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::{DatabaseConnection, EntityTrait as _, Set};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::clock::Clock;
use crate::store::entity::audit_log;

const BATCH: usize = 100;
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// One row per key and window; the rest of the window's refusals are counted.
const FLOOD_WINDOW: Duration = Duration::from_secs(60);
/// Keys whose windows are remembered. Past that, quick_cache forgets the coldest first, so
/// a stream of one-off strangers does not push out a key that keeps coming back.
const FLOOD_KEYS: usize = 4096;
/// How often windows that closed without a further refusal get their summary row.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

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

/// What became of a refusal handed to `Auditor::record_refusal`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Flood {
    /// The first of its key in this window: queued to be written.
    Recorded,
    /// A repeat within the window: counted, to be written in the window's summary.
    Suppressed,
}

/// The sending side, cloned into the application state.
#[derive(Clone)]
pub struct Auditor {
    tx: mpsc::Sender<AuditEvent>,
    shared: Arc<Shared>,
}

/// One key's current window.
struct Window {
    /// The refusal that opened it; the summary repeats its action, outcome and client.
    first: AuditEvent,
    suppressed: u64,
}

impl Window {
    fn end(&self) -> DateTime<Utc> {
        self.first.at + chrono::Duration::from_std(FLOOD_WINDOW).unwrap_or(chrono::Duration::MAX)
    }

    /// The row that writes what was counted, dated `at`; once.
    fn summary(&mut self, at: DateTime<Utc>) -> Option<AuditEvent> {
        if self.suppressed == 0 {
            return None;
        }
        let mut row = self.first.clone();
        row.at = at;
        row.detail = Some(serde_json::json!({
            "suppressed": std::mem::take(&mut self.suppressed),
            "since": self.first.at.to_rfc3339(),
        }));
        Some(row)
    }
}

/// What to do with a refusal.
#[derive(Debug)]
enum Admit {
    Suppressed,
    /// Write `event`, after the summary of the key's previous window if it had repeats.
    Write {
        summary: Option<Box<AuditEvent>>,
        event: AuditEvent,
    },
}

/// The windows of the keys seen lately: a fixed-capacity map, O(1) per refusal. Keys are
/// stored hashed (with a per-process random seed, so nobody can aim a collision), which
/// keeps every entry small whatever the key, and keeps emails out of memory dumps.
struct Floods {
    windows: quick_cache::sync::Cache<u64, Arc<Mutex<Option<Window>>>>,
    seed: std::hash::RandomState,
}

impl Floods {
    fn new(capacity: usize) -> Self {
        Self { windows: quick_cache::sync::Cache::new(capacity), seed: std::hash::RandomState::new() }
    }

    fn admit(&self, key: &str, event: AuditEvent) -> Admit {
        let id = self.seed.hash_one(key);
        let Ok(window) = self
            .windows
            .get_or_insert_with(&id, || Ok::<_, std::convert::Infallible>(Arc::new(Mutex::new(None))));
        let mut window = window.lock().unwrap_or_else(PoisonError::into_inner);
        // A clock that went back counts as the same window.
        if let Some(open) = window.as_mut().filter(|w| event.at < w.end()) {
            open.suppressed += 1;
            return Admit::Suppressed;
        }
        let summary = window.as_mut().and_then(|closed| {
            let end = closed.end();
            closed.summary(end).map(Box::new)
        });
        *window = Some(Window { first: event.clone(), suppressed: 0 });
        Admit::Write { summary, event }
    }

    /// Summaries of the windows closed by `now` (or of every window, at shutdown).
    fn sweep(&self, now: DateTime<Utc>, all: bool) -> Vec<AuditEvent> {
        let mut rows = Vec::new();
        for (_, window) in self.windows.iter() {
            let mut window = window.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(w) = window.as_mut() else { continue };
            let end = w.end();
            if all || now >= end {
                rows.extend(w.summary(now.min(end)));
            }
        }
        rows
    }
}

/// What the senders and the writer share.
struct Shared {
    /// Noise events in the channel now; the writer gives a slot back as it takes one out.
    noise_queued: AtomicUsize,
    noise_share: usize,
    /// Dropped events since start, by `Class::index`.
    dropped: [AtomicU64; 2],
    floods: Floods,
    /// Deleted accounts whose events may still be queued: written without the user.
    forgotten: Mutex<std::collections::VecDeque<Uuid>>,
}

/// How many deleted accounts the writer keeps in mind; the queue drains within seconds, so
/// the most recent are the ones that matter.
const FORGOTTEN: usize = 1024;

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

/// The worker's handle: `shutdown` writes the open windows' counts, drains the queue into
/// SQL and waits for it.
pub struct AuditWorker {
    auditor: Auditor,
    clock: Clock,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    sweeper: JoinHandle<()>,
}

impl Auditor {
    /// `capacity` events may wait (at least 1); noise may take at most `capacity / 2` of them.
    /// `clock` closes the flood windows.
    pub fn start(db: DatabaseConnection, capacity: usize, clock: Clock) -> (Self, AuditWorker) {
        let capacity = capacity.max(1);
        let (tx, rx) = mpsc::channel(capacity);
        let shared = Arc::new(Shared {
            noise_queued: AtomicUsize::new(0),
            noise_share: capacity / 2,
            dropped: [AtomicU64::new(0), AtomicU64::new(0)],
            floods: Floods::new(FLOOD_KEYS),
            forgotten: Mutex::new(std::collections::VecDeque::with_capacity(FORGOTTEN)),
        });
        let auditor = Self { tx, shared: Arc::clone(&shared) };
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run(db, rx, shared, stopped.clone()));
        let sweeper = tokio::spawn(sweep_every(auditor.clone(), clock.clone(), stopped));
        (auditor.clone(), AuditWorker { auditor, clock, stop, task, sweeper })
    }

    /// Records a refusal under the flood rule: the first for `key` in its window is queued,
    /// the rest are counted and written as one summary row when the window closes. `key`
    /// names the limit and its bucket (`login_per_ip:<ip>`); it is never written anywhere.
    pub fn record_refusal(&self, key: &str, event: AuditEvent) -> Flood {
        match self.shared.floods.admit(key, event) {
            Admit::Suppressed => Flood::Suppressed,
            Admit::Write { summary, event } => {
                if let Some(summary) = summary {
                    self.record(*summary);
                }
                self.record(event);
                Flood::Recorded
            }
        }
    }

    /// Queues the summaries of the windows closed by `now` (of every window if `all`).
    fn sweep(&self, now: DateTime<Utc>, all: bool) {
        for row in self.shared.floods.sweep(now, all) {
            self.record(row);
        }
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
        if class == Class::Security || total == 1 || total.is_multiple_of(1000) {
            tracing::warn!(
                action = event.action,
                outcome = event.outcome,
                class = class.as_str(),
                dropped_total = total,
                "{message}"
            );
        }
    }

    /// The account is deleted: its events still queued are written without the user (the
    /// rows already written are the deleter's to clear).
    pub fn forget_user(&self, user_id: Uuid) {
        let mut forgotten = self.shared.forgotten.lock().unwrap_or_else(PoisonError::into_inner);
        if forgotten.len() == FORGOTTEN {
            forgotten.pop_front();
        }
        forgotten.push_back(user_id);
    }

    /// Events of `class` dropped because their share of the queue was full, since start.
    pub fn dropped_of(&self, class: Class) -> u64 {
        self.shared.dropped[class.index()].load(Ordering::Relaxed)
    }

    /// Events waiting to be written.
    pub fn depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

impl AuditWorker {
    pub async fn shutdown(self) {
        // The sweeper stops first (it never stops inside a sweep: a sweep has no await), so
        // that nothing is queued after the writer's last drain.
        self.sweeper.abort();
        let _ = self.sweeper.await;
        // Counts of windows still open would be lost with the process: write them now.
        self.auditor.sweep(self.clock.now(), true);
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Until the worker's handle stops it or is dropped.
async fn sweep_every(auditor: Auditor, clock: Clock, mut stopped: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => auditor.sweep(clock.now(), false),
            _ = stopped.changed() => return,
        }
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
        forget(&shared, &mut batch);
        write(&db, &mut batch).await;
    }
    // Drain what is left.
    while let Ok(event) = rx.try_recv() {
        take(&mut batch, event);
        if batch.len() >= BATCH {
            forget(&shared, &mut batch);
            write(&db, &mut batch).await;
        }
    }
    forget(&shared, &mut batch);
    write(&db, &mut batch).await;
}

/// Takes deleted accounts out of the events about to be written.
fn forget(shared: &Shared, batch: &mut [AuditEvent]) {
    let forgotten = shared.forgotten.lock().unwrap_or_else(PoisonError::into_inner);
    if forgotten.is_empty() {
        return;
    }
    for event in batch.iter_mut() {
        if event.user_id.is_some_and(|id| forgotten.contains(&id)) {
            event.user_id = None;
        }
    }
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
        let (auditor, worker) = Auditor::start(db.clone(), 4, Clock::system());
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

    fn refusal(at: DateTime<Utc>, ip: &str) -> AuditEvent {
        let mut event = AuditEvent::new("rate_limited", "login_per_ip", at);
        event.ip = ip.parse().ok();
        event
    }

    fn secs(n: i64) -> chrono::Duration {
        chrono::Duration::seconds(n)
    }

    #[test]
    fn the_first_refusal_per_key_and_window_is_written_the_rest_are_counted() {
        let floods = Floods::new(16);
        let t0 = Utc::now();
        let Admit::Write { summary: None, event } =
            floods.admit("login_per_ip:192.0.2.1", refusal(t0, "192.0.2.1"))
        else {
            panic!("the first refusal is written")
        };
        assert_eq!(event.at, t0);
        for i in 1..=41 {
            let at = t0 + chrono::Duration::milliseconds(i * 1000);
            assert!(matches!(
                floods.admit("login_per_ip:192.0.2.1", refusal(at, "192.0.2.1")),
                Admit::Suppressed
            ));
        }
        // Another key has a window of its own.
        assert!(matches!(
            floods.admit("login_per_ip:192.0.2.2", refusal(t0 + secs(5), "192.0.2.2")),
            Admit::Write { summary: None, .. }
        ));
        // The next refusal after the window writes the count, then itself.
        let Admit::Write { summary: Some(summary), event } =
            floods.admit("login_per_ip:192.0.2.1", refusal(t0 + secs(61), "192.0.2.1"))
        else {
            panic!("a new window")
        };
        assert_eq!(summary.action, "rate_limited");
        assert_eq!(summary.outcome, "login_per_ip");
        assert_eq!(summary.ip, "192.0.2.1".parse().ok());
        assert_eq!(summary.at, t0 + secs(60), "dated at the window's end");
        assert_eq!(summary.detail.as_ref().and_then(|d| d["suppressed"].as_u64()), Some(41));
        assert_eq!(summary.detail.as_ref().and_then(|d| d["since"].as_str()), Some(t0.to_rfc3339().as_str()));
        assert!(event.detail.is_none());
        assert_eq!(event.at, t0 + secs(61));
    }

    #[test]
    fn a_sweep_writes_the_count_of_closed_windows_once() {
        let floods = Floods::new(16);
        let t0 = Utc::now();
        let key = "login_per_account:someone";
        assert!(matches!(floods.admit(key, refusal(t0, "192.0.2.1")), Admit::Write { .. }));
        assert!(matches!(floods.admit(key, refusal(t0 + secs(1), "192.0.2.9")), Admit::Suppressed));
        assert!(floods.sweep(t0 + secs(59), false).is_empty(), "still open");
        let swept = floods.sweep(t0 + secs(65), false);
        assert_eq!(swept.len(), 1);
        assert_eq!(swept[0].detail.as_ref().and_then(|d| d["suppressed"].as_u64()), Some(1));
        assert_eq!(swept[0].ip, "192.0.2.1".parse().ok(), "the window's first client");
        assert!(floods.sweep(t0 + secs(70), false).is_empty(), "written once");
        // After the sweep, the next refusal opens a window without a summary.
        assert!(matches!(
            floods.admit(key, refusal(t0 + secs(80), "192.0.2.1")),
            Admit::Write { summary: None, .. }
        ));
        // At shutdown, open windows are written too.
        assert!(matches!(floods.admit(key, refusal(t0 + secs(81), "192.0.2.1")), Admit::Suppressed));
        let swept = floods.sweep(t0 + secs(90), true);
        assert_eq!(swept.len(), 1);
        assert_eq!(swept[0].at, t0 + secs(90));
    }

    #[test]
    fn strangers_cannot_grow_the_window_map() {
        let floods = Floods::new(64);
        let t0 = Utc::now();
        for i in 0..10_000u32 {
            let ip = std::net::Ipv4Addr::from(i).to_string();
            let _ = floods.admit(&format!("login_per_ip:{ip}"), refusal(t0, &ip));
        }
        assert!(floods.windows.len() <= 64 + 64 / 4, "{}", floods.windows.len());
    }

    /// An auditor's refusals: written once, counted, the count written when the window closes.
    #[tokio::test]
    async fn repeated_refusals_leave_one_row_and_a_summary() {
        let (db, _dir) = database().await;
        let clock = Clock::system();
        let (auditor, worker) = Auditor::start(db.clone(), 100, clock.clone());
        let t0 = clock.now();
        let mut suppressed = 0;
        for i in 0..500 {
            let at = t0 + chrono::Duration::milliseconds(i * 10);
            if auditor.record_refusal("login_per_ip:192.0.2.1", refusal(at, "192.0.2.1")) == Flood::Suppressed
            {
                suppressed += 1;
            }
        }
        assert_eq!(suppressed, 499);
        worker.shutdown().await;
        let rows = audit_log::Entity::find().all(&db).await.unwrap();
        assert_eq!(rows.len(), 2, "{rows:?}");
        let counted: u64 = rows.iter().filter_map(|r| r.detail.as_ref()?.get("suppressed")?.as_u64()).sum();
        assert_eq!(counted, 499, "the open window is written at shutdown");
    }
}
