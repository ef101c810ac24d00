//! The SQL pool and migrations.
//!
//! PostgreSQL or MySQL/MariaDB in production, SQLite as the embedded default (WAL and a
//! busy timeout, so concurrent writers wait instead of failing). Pending migrations are
//! applied at start; on PostgreSQL under an advisory lock and on MySQL under a named lock
//! (`GET_LOCK`), so several instances starting at once apply them exactly once.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use migration::{Migrator, MigratorTrait};
use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr, Statement};
use secrecy::ExposeSecret;

use crate::config::Config;

/// An arbitrary constant: the key of the advisory lock that serialises migrations.
const MIGRATION_LOCK_KEY: i64 = 0x6c61_7463_686b_6579; // "latchkey"

/// How long an instance waits on MySQL for another one's migrations before giving up.
/// PostgreSQL's advisory lock waits without limit; `GET_LOCK` needs one, so a generous one.
const MYSQL_LOCK_WAIT: Duration = Duration::from_secs(600);

/// Connections sit idle at most this long before the pool pings them on checkout.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(5);

/// When a query last found its connection ended by the server (milliseconds after
/// [`START`], plus one; zero for never). A failover or an administrator ends every
/// connection at once, and the idle ones in the pool do not know it yet: for
/// [`PING_IF_IDLE_FOR`] twice over the pool pings each connection before handing it out,
/// so one failed query does not become one per pooled connection. Process-wide: with
/// several pools in one process (the tests) the others ping for a while too, which costs
/// a round trip, not a failure.
static ENDED_AT: AtomicU64 = AtomicU64::new(0);
static START: LazyLock<Instant> = LazyLock::new(Instant::now);

fn since_start() -> u64 {
    u64::try_from(START.elapsed().as_millis()).unwrap_or(u64::MAX).saturating_add(1)
}

/// Records that a query found its connection ended or broken.
pub fn connection_ended() {
    ENDED_AT.store(since_start(), Relaxed);
}

fn connections_suspect() -> bool {
    let ended = ENDED_AT.load(Relaxed);
    let window = u64::try_from((PING_IF_IDLE_FOR * 2).as_millis()).unwrap_or(u64::MAX);
    ended != 0 && since_start().saturating_sub(ended) < window
}

pub async fn connect(config: &Config) -> Result<DatabaseConnection, DbErr> {
    connect_with(config, config.database_max_connections).await
}

/// A pool of at most `max` connections. One, for work that must stay on one session: an
/// advisory lock, or SQLite's per-connection `PRAGMA foreign_keys` that `migrate fresh`
/// turns off.
pub async fn connect_with(config: &Config, max: u32) -> Result<DatabaseConnection, DbErr> {
    let mut opts = ConnectOptions::new(config.database_url.expose_secret().to_owned());
    opts.max_connections(max)
        .min_connections(config.database_min_connections.min(max))
        .acquire_timeout(config.database_acquire_timeout)
        .connect_timeout(config.database_acquire_timeout)
        .idle_timeout(config.database_idle_timeout)
        .sqlx_logging(false)
        // sqlx pings every connection it hands out by default: a second round trip for
        // each query. Ping only one that has sat idle long enough to have been dropped,
        // or any while connections are being found ended; a busy connection that broke
        // fails its query (503) and is closed on release.
        .test_before_acquire_if_idle_for(PING_IF_IDLE_FOR)
        .map_sqlx_postgres_before_acquire(|conn, _| {
            Box::pin(async move {
                if connections_suspect() {
                    // An error discards the connection; the pool tries another or opens one.
                    sea_orm::sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
        .map_sqlx_mysql_before_acquire(|conn, _| {
            Box::pin(async move {
                if connections_suspect() {
                    sea_orm::sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
        // MySQL's default isolation, REPEATABLE READ, reads every plain SELECT of a
        // transaction from its first snapshot, and its locking reads take gap locks.
        // The queries here were written for PostgreSQL's READ COMMITTED (each statement
        // sees what was committed before it; a guarded UPDATE re-checks the newest row),
        // so every MySQL session is set to that.
        .map_sqlx_mysql_pool_opts(|o| {
            o.after_connect(|conn, _| {
                Box::pin(async move {
                    use sea_orm::sqlx::Executor as _;
                    conn.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED").await.map(|_| ())
                })
            })
        })
        .map_sqlx_sqlite_opts(|o| {
            o.journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(5))
                .foreign_keys(true)
        });
    Database::connect(opts).await
}

/// `SELECT 1` within `timeout`: what `/ready` asks.
pub async fn ping(db: &DatabaseConnection, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, db.ping()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// Runs `work` under the start-up lock: on PostgreSQL and MySQL on a one-connection pool
/// holding the lock (released and closed whatever `work` returns); on SQLite on `db`.
async fn with_startup_lock<T>(
    config: &Config,
    db: &DatabaseConnection,
    work: impl AsyncFnOnce(&DatabaseConnection) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    if db.get_database_backend() == DbBackend::Sqlite {
        return work(db).await;
    }
    let conn = locked_connection(config).await?;
    let result = work(&conn).await;
    let unlocked = unlock(&conn).await;
    let _ = conn.close().await;
    let value = result?;
    unlocked?;
    Ok(value)
}

/// Migrations and the first signing key, under one start-up lock on PostgreSQL and MySQL so several
/// instances starting at once neither race on DDL nor each generate a "first" key.
pub async fn migrate_and_prepare(
    config: &Config,
    db: &DatabaseConnection,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<()> {
    with_startup_lock(config, db, async |conn| {
        Migrator::up(conn, None).await?;
        let settings = config.key_settings();
        crate::keys::prepare(conn, now, &settings).await?;
        crate::keys::prepare_secret(conn, crate::keys::DEVICE_SECRET, now, &settings).await?;
        Ok(())
    })
    .await
}

/// A one-connection pool holding the start-up lock (a lock belongs to a session; MySQL's
/// named lock also outlives the implicit commits of DDL, which a transaction would not).
async fn locked_connection(config: &Config) -> anyhow::Result<DatabaseConnection> {
    let conn = connect_with(config, 1).await?;
    match conn.get_database_backend() {
        DbBackend::MySql => {
            // Named locks are server-wide, advisory locks per database: the database's name
            // in the lock's keeps databases on one server apart (names stop at 64 chars).
            let lock = Statement::from_sql_and_values(
                DbBackend::MySql,
                "SELECT GET_LOCK(LEFT(CONCAT('latchkey_startup:', DATABASE()), 64), ?) AS got",
                [MYSQL_LOCK_WAIT.as_secs().into()],
            );
            let got = conn.query_one_raw(lock).await?.map(|row| row.try_get::<Option<i64>>("", "got"));
            match got.transpose()?.flatten() {
                Some(1) => {}
                _ => {
                    let _ = conn.close().await;
                    anyhow::bail!(
                        "the start-up lock (MySQL GET_LOCK) was not granted within {} s: another \
                         instance is still migrating, or holds the lock while stuck",
                        MYSQL_LOCK_WAIT.as_secs()
                    );
                }
            }
        }
        _ => {
            let lock = Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT pg_advisory_lock($1)",
                [MIGRATION_LOCK_KEY.into()],
            );
            conn.execute_raw(lock).await?;
        }
    }
    Ok(conn)
}

async fn unlock(conn: &DatabaseConnection) -> Result<(), DbErr> {
    let unlock = match conn.get_database_backend() {
        DbBackend::MySql => Statement::from_string(
            DbBackend::MySql,
            "SELECT RELEASE_LOCK(LEFT(CONCAT('latchkey_startup:', DATABASE()), 64))",
        ),
        _ => Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pg_advisory_unlock($1)",
            [MIGRATION_LOCK_KEY.into()],
        ),
    };
    conn.execute_raw(unlock).await.map(|_| ())
}

/// Rotates the signing key when the newest one is older than `every`; under the start-up
/// lock on PostgreSQL and MySQL, so instances do not rotate twice.
pub async fn rotate_if_due(
    config: &Config,
    db: &DatabaseConnection,
    now: chrono::DateTime<chrono::Utc>,
    every: Duration,
) -> anyhow::Result<bool> {
    use crate::store::entity::signing_key;
    use sea_orm::{EntityTrait as _, QueryOrder as _};
    let every = chrono::Duration::from_std(every).unwrap_or(chrono::Duration::MAX);
    let due = async |conn: &DatabaseConnection| -> Result<bool, DbErr> {
        let newest =
            signing_key::Entity::find().order_by_desc(signing_key::Column::CreatedAt).one(conn).await?;
        Ok(newest.is_some_and(|k| now - k.created_at >= every))
    };
    // A cheap look first, without the lock; then again under it.
    if !due(db).await? {
        return Ok(false);
    }
    let rotated = with_startup_lock(config, db, async |conn| {
        if !due(conn).await? {
            return Ok(false);
        }
        crate::keys::rotate(conn, now, &config.key_settings()).await?;
        Ok(true)
    })
    .await?;
    if rotated {
        tracing::info!("rotated the signing key");
    }
    Ok(rotated)
}
