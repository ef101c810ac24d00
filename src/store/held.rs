//! PostgreSQL connections kept by the `/v1/users/me` batcher between its queries.
//!
//! sqlx pings every connection it takes back into its pool (a Sync and the server's
//! ReadyForQuery; no option turns it off): a second PostgreSQL round trip for every
//! query, as costly as the one-row read itself. Under load the profile batcher runs a
//! query every few hundred microseconds, so it keeps the connections it used instead of
//! handing each one back:
//!
//! - a connection is kept only after a query on it succeeded; one whose query failed is
//!   dropped, and sqlx's ping on its way back decides whether the pool keeps it. A failed
//!   query hands back the other kept connections too: a failover or an administrator ends
//!   them all at once, and each would otherwise fail one more batch of requests;
//! - a kept connection is reused only within [`KEEP_FOR`] of that success; a sweeper
//!   hands back every connection kept longer, so a quiet server holds none and the pool's
//!   own idle checks apply as before; it hands back all of them as soon as the pool is
//!   closed, so a shutdown does not wait for them;
//! - under unbroken load a connection still goes back after [`HAND_BACK_AFTER`], so the
//!   pool's maximum lifetime keeps applying to it.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use sea_orm::sqlx::pool::PoolConnection;
use sea_orm::sqlx::{PgConnection, PgPool, Postgres};

/// How long a connection is kept after the query that last used it.
pub const KEEP_FOR: Duration = Duration::from_secs(1);
/// How long a connection is kept in all, however busy.
pub const HAND_BACK_AFTER: Duration = Duration::from_secs(60);

pub struct Held {
    pool: PgPool,
    kept: Mutex<Vec<Kept>>,
    max: usize,
}

struct Kept {
    conn: PoolConnection<Postgres>,
    /// When it was taken from the pool, and when a query last succeeded on it.
    since: Instant,
    used: Instant,
}

impl Held {
    /// Keeps at most `max` connections of `pool`, and sweeps them out after [`KEEP_FOR`].
    pub fn start(pool: PgPool, max: usize) -> Arc<Self> {
        let closed = pool.close_event();
        let held = Arc::new(Self { pool, kept: Mutex::new(Vec::with_capacity(max)), max });
        let weak = Arc::downgrade(&held);
        tokio::spawn(async move {
            tokio::select! {
                () = sweep(Weak::clone(&weak)) => {}
                () = closed => {
                    if let Some(held) = weak.upgrade() {
                        held.sweep_once(Duration::ZERO);
                    }
                }
            }
        });
        held
    }

    /// Runs `query` on a kept connection, or on one from the pool, and keeps the
    /// connection if the query succeeded.
    pub async fn run<T>(
        &self,
        query: impl AsyncFnOnce(&mut PgConnection) -> Result<T, sea_orm::sqlx::Error>,
    ) -> Result<T, sea_orm::sqlx::Error> {
        let (mut conn, since) = match self.take() {
            Some(kept) => (kept.conn, kept.since),
            None => (self.pool.acquire().await?, Instant::now()),
        };
        let answer = query(&mut conn).await;
        match answer {
            Ok(_) if since.elapsed() < HAND_BACK_AFTER => {
                self.keep(Kept { conn, since, used: Instant::now() })
            }
            Ok(_) => {}
            Err(_) => self.sweep_once(Duration::ZERO),
        }
        // Unless kept, `conn` is dropped here: back to the pool, through sqlx's ping.
        answer
    }

    /// The most recently kept connection, if it is still fresh. Stale ones are handed
    /// back to the pool (outside the lock: that spawns sqlx's return task).
    fn take(&self) -> Option<Kept> {
        let mut kept = self.kept.lock().ok()?;
        let last = kept.pop()?;
        drop(kept);
        (last.used.elapsed() < KEEP_FOR).then_some(last)
    }

    fn keep(&self, conn: Kept) {
        if let Ok(mut kept) = self.kept.lock()
            && kept.len() < self.max
        {
            kept.push(conn);
        }
        // Otherwise `conn` is dropped here: back to the pool.
    }

    /// Hands back every connection kept longer than `older_than`.
    fn sweep_once(&self, older_than: Duration) {
        let stale: Vec<_> = match self.kept.lock() {
            Ok(mut kept) => {
                let (fresh, stale) = kept.drain(..).partition(|k| k.used.elapsed() < older_than);
                *kept = fresh;
                stale
            }
            Err(_) => return,
        };
        drop(stale);
    }

    #[cfg(test)]
    fn kept(&self) -> usize {
        self.kept.lock().map(|kept| kept.len()).unwrap_or(0)
    }
}

async fn sweep(held: Weak<Held>) {
    let mut tick = tokio::time::interval(KEEP_FOR / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match held.upgrade() {
            Some(held) => held.sweep_once(KEEP_FOR),
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use sea_orm::sqlx::postgres::PgPoolOptions;

    use super::*;

    async fn pool() -> PgPool {
        let url = std::env::var("TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        PgPoolOptions::new()
            .max_connections(4)
            .connect(&format!("{url}/postgres?sslmode=disable"))
            .await
            .expect("pool")
    }

    async fn backend(conn: &mut PgConnection) -> Result<i32, sea_orm::sqlx::Error> {
        sea_orm::sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(conn).await
    }

    /// `backend` after a pause, so that two at once hold two connections.
    async fn slow_backend(conn: &mut PgConnection) -> Result<i32, sea_orm::sqlx::Error> {
        tokio::time::sleep(Duration::from_millis(50)).await;
        backend(conn).await
    }

    #[tokio::test]
    async fn a_connection_is_kept_between_queries_and_handed_back_when_quiet() {
        let pool = pool().await;
        let held = Held::start(pool.clone(), 1);
        let first = held.run(backend).await.expect("query");
        assert_eq!(held.kept(), 1, "kept after a successful query");
        assert_eq!(held.run(backend).await.expect("query"), first, "the same connection again");
        tokio::time::sleep(KEEP_FOR * 2).await;
        assert_eq!(held.kept(), 0, "the sweeper handed it back");
        // Back in the pool: the pool can close without waiting for it.
        tokio::time::timeout(Duration::from_secs(5), pool.close()).await.expect("the pool closes");
    }

    #[tokio::test]
    async fn closing_the_pool_does_not_wait_for_kept_connections() {
        let pool = pool().await;
        let held = Held::start(pool.clone(), 1);
        held.run(backend).await.expect("query");
        assert_eq!(held.kept(), 1);
        let started = std::time::Instant::now();
        pool.close().await;
        assert!(started.elapsed() < KEEP_FOR / 4, "closing took {:?}", started.elapsed());
        assert_eq!(held.kept(), 0);
    }

    #[tokio::test]
    async fn a_connection_whose_query_failed_is_not_kept() {
        let held = Held::start(pool().await, 2);
        let failed = held
            .run(async |conn| backend(conn).await.and(Err::<i32, _>(sea_orm::sqlx::Error::RowNotFound)))
            .await;
        assert!(failed.is_err());
        assert_eq!(held.kept(), 0);
        // The next query gets a connection from the pool and works.
        held.run(backend).await.expect("query");
        assert_eq!(held.kept(), 1);
    }

    #[tokio::test]
    async fn a_failed_query_hands_back_every_kept_connection() {
        let held = Held::start(pool().await, 2);
        let (a, b) = tokio::join!(held.run(slow_backend), held.run(slow_backend));
        assert_ne!(a.expect("query"), b.expect("query"), "two connections at once");
        assert_eq!(held.kept(), 2);
        let failed = held
            .run(async |conn| backend(conn).await.and(Err::<i32, _>(sea_orm::sqlx::Error::RowNotFound)))
            .await;
        assert!(failed.is_err());
        assert_eq!(held.kept(), 0, "the other connection went back too");
    }

    #[tokio::test]
    async fn at_most_max_connections_are_kept() {
        let held = Held::start(pool().await, 1);
        let (a, b) = tokio::join!(held.run(slow_backend), held.run(slow_backend));
        assert_ne!(a.expect("query"), b.expect("query"), "two connections at once");
        assert_eq!(held.kept(), 1);
    }
}
