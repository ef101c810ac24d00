//! The revocation store: which sessions are live right now.
//!
//! A session is live while its record is present; logout deletes it, so the next request
//! carrying any access token of that session fails at once, on every instance. The bearer
//! check asks one question per request (`session`); with Redis, the questions of
//! concurrent requests share one `MGET`, sent after each of them was asked. Refresh-token jti
//! metadata sits beside it with the same TTL. SQL stays the truth: this is a cache of it
//! that answers fast and forgets on expiry.
//!
//! Two implementations behind one trait: Redis (shared by every instance) and an
//! in-process map with the same TTL semantics (single instance only).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redis::AsyncCommands as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use uuid::Uuid;

use crate::store::batch::Batcher;

#[derive(Clone, Debug, thiserror::Error)]
#[error("store unavailable: {0}")]
pub struct StoreError(String);

impl StoreError {
    pub fn new(reason: impl Into<String>) -> Self {
        Self(reason.into())
    }
}

/// What the store knows of a live session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    pub user_id: Uuid,
    /// The session's absolute end (login + REFRESH_TOKEN_TTL).
    pub expires_at: DateTime<Utc>,
}

impl SessionRecord {
    fn encode(&self) -> String {
        format!("{} {}", self.user_id, self.expires_at.timestamp())
    }

    fn decode(raw: &str) -> Option<Self> {
        let (user, exp) = raw.split_once(' ')?;
        Some(Self {
            user_id: user.parse().ok()?,
            expires_at: DateTime::from_timestamp(exp.parse().ok()?, 0)?,
        })
    }
}

/// Makes a session live with its current refresh token: written after the SQL commit
/// that created or rotated it. Idempotent: writing it twice changes nothing.
#[derive(Clone, Debug)]
pub struct Activation {
    pub session_id: Uuid,
    pub record: SessionRecord,
    pub refresh_jti: Uuid,
    pub retired_jti: Option<Uuid>,
    pub ttl: Duration,
}

#[async_trait]
pub trait RevocationStore: Send + Sync + 'static {
    /// "redis" or "in-process", for logs and `/ready`.
    fn kind(&self) -> &'static str;
    async fn ping(&self) -> Result<(), StoreError>;
    /// The live session, or `None` when it was revoked, expired or never existed.
    async fn session(&self, session_id: Uuid) -> Result<Option<SessionRecord>, StoreError>;
    async fn activate(&self, activation: &Activation) -> Result<(), StoreError>;
    /// Ends sessions at once, with the given refresh-token jtis. Idempotent.
    async fn revoke(&self, session_ids: &[Uuid], refresh_jtis: &[Uuid]) -> Result<(), StoreError>;
}

/// Session lookups per `MGET` at most, and `MGET`s in flight at once: requests that
/// arrive while they run go together in the next one.
const SESSION_BATCH: usize = 64;
const SESSION_READS_IN_FLIGHT: usize = 2;

/// Redis keys are `{prefix}s:{session_id}` and `{prefix}rt:{jti}`.
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    /// The bearer check's lookups. One `GET` per request cost a `writev` and a Redis
    /// command each, the largest part of a check's CPU after the HTTP exchange itself.
    sessions: Batcher<Uuid, SessionRecord, StoreError>,
}

impl RedisStore {
    /// Does not connect: the manager connects on first use and reconnects by itself, so
    /// the server starts while Redis is down and heals when it returns. Call it within
    /// the Tokio runtime: it starts the task that batches session lookups.
    pub fn new(
        url: &str,
        prefix: &str,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(|e| StoreError(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(response_timeout))
            // Fail a request fast while Redis is down; the next request tries again.
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let conn =
            ConnectionManager::new_lazy_with_config(client, config).map_err(|e| StoreError(e.to_string()))?;
        let sessions = {
            let (conn, prefix) = (conn.clone(), prefix.to_owned());
            Batcher::spawn(SESSION_BATCH, SESSION_READS_IN_FLIGHT, move |ids: Vec<Uuid>| {
                let mut conn = conn.clone();
                let keys: Vec<String> = ids.iter().map(|id| session_key(&prefix, *id)).collect();
                async move {
                    let raw: Vec<Option<String>> =
                        redis::cmd("MGET").arg(&keys).query_async(&mut conn).await.map_err(redis_err)?;
                    Ok(ids
                        .into_iter()
                        .zip(raw)
                        .filter_map(|(id, raw)| Some((id, SessionRecord::decode(raw.as_deref()?)?)))
                        .collect())
                }
            })
        };
        Ok(Self { conn, prefix: prefix.to_owned(), sessions })
    }

    /// The shared multiplexed connection, for the rate limiter.
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    fn session_key(&self, id: Uuid) -> String {
        session_key(&self.prefix, id)
    }

    fn refresh_key(&self, jti: Uuid) -> String {
        format!("{}rt:{jti}", self.prefix)
    }
}

fn session_key(prefix: &str, id: Uuid) -> String {
    format!("{prefix}s:{id}")
}

fn redis_err(e: redis::RedisError) -> StoreError {
    StoreError(e.to_string())
}

fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[async_trait]
impl RevocationStore for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING").query_async::<String>(&mut conn).await.map_err(redis_err)?;
        Ok(())
    }

    async fn session(&self, session_id: Uuid) -> Result<Option<SessionRecord>, StoreError> {
        self.sessions.get(session_id).await
    }

    async fn activate(&self, a: &Activation) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let ms = ttl_ms(a.ttl);
        let meta = serde_json::json!({
            "sid": a.session_id,
            "sub": a.record.user_id,
            "exp": a.record.expires_at.timestamp(),
        })
        .to_string();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("SET")
            .arg(self.session_key(a.session_id))
            .arg(a.record.encode())
            .arg("PX")
            .arg(ms)
            .ignore()
            .cmd("SET")
            .arg(self.refresh_key(a.refresh_jti))
            .arg(meta)
            .arg("PX")
            .arg(ms)
            .ignore();
        if let Some(old) = a.retired_jti {
            pipe.cmd("DEL").arg(self.refresh_key(old)).ignore();
        }
        pipe.query_async::<()>(&mut conn).await.map_err(redis_err)
    }

    async fn revoke(&self, session_ids: &[Uuid], refresh_jtis: &[Uuid]) -> Result<(), StoreError> {
        let keys: Vec<String> = session_ids
            .iter()
            .map(|s| self.session_key(*s))
            .chain(refresh_jtis.iter().map(|j| self.refresh_key(*j)))
            .collect();
        if keys.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        conn.del::<_, ()>(keys).await.map_err(redis_err)
    }
}

/// The in-process store: the same semantics in a map, for a single instance. Expired
/// entries are invisible at once and removed by `sweep`, which the server runs
/// periodically, so memory follows the number of live sessions.
#[derive(Default)]
pub struct MemoryStore {
    sessions: Mutex<HashMap<Uuid, (SessionRecord, Instant)>>,
    refresh: Mutex<HashMap<Uuid, Instant>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn sweep(&self) {
        let now = Instant::now();
        if let Ok(mut s) = self.sessions.lock() {
            s.retain(|_, (_, until)| *until > now);
        }
        if let Ok(mut r) = self.refresh.lock() {
            r.retain(|_, until| *until > now);
        }
    }

    pub fn len(&self) -> usize {
        self.sessions.lock().map_or(0, |s| s.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn poisoned<T>(_: T) -> StoreError {
    StoreError("in-process store lock poisoned".into())
}

#[async_trait]
impl RevocationStore for MemoryStore {
    fn kind(&self) -> &'static str {
        "in-process"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn session(&self, session_id: Uuid) -> Result<Option<SessionRecord>, StoreError> {
        let sessions = self.sessions.lock().map_err(poisoned)?;
        Ok(sessions
            .get(&session_id)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(record, _)| record.clone()))
    }

    async fn activate(&self, a: &Activation) -> Result<(), StoreError> {
        let until = Instant::now() + a.ttl;
        self.sessions.lock().map_err(poisoned)?.insert(a.session_id, (a.record.clone(), until));
        let mut refresh = self.refresh.lock().map_err(poisoned)?;
        refresh.insert(a.refresh_jti, until);
        if let Some(old) = a.retired_jti {
            refresh.remove(&old);
        }
        Ok(())
    }

    async fn revoke(&self, session_ids: &[Uuid], refresh_jtis: &[Uuid]) -> Result<(), StoreError> {
        let mut sessions = self.sessions.lock().map_err(poisoned)?;
        for id in session_ids {
            sessions.remove(id);
        }
        drop(sessions);
        let mut refresh = self.refresh.lock().map_err(poisoned)?;
        for jti in refresh_jtis {
            refresh.remove(jti);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn activation(ttl: Duration) -> Activation {
        Activation {
            session_id: Uuid::new_v4(),
            record: SessionRecord {
                user_id: Uuid::new_v4(),
                expires_at: DateTime::from_timestamp(2_000_000_000, 0).expect("ts"),
            },
            refresh_jti: Uuid::new_v4(),
            retired_jti: None,
            ttl,
        }
    }

    #[tokio::test]
    async fn memory_store_live_revoke_and_ttl() {
        let store = MemoryStore::new();
        let a = activation(Duration::from_secs(60));
        store.activate(&a).await.expect("activate");
        assert_eq!(store.session(a.session_id).await.expect("get"), Some(a.record.clone()));
        store.revoke(&[a.session_id], &[a.refresh_jti]).await.expect("revoke");
        assert_eq!(store.session(a.session_id).await.expect("get"), None);

        let short = activation(Duration::from_millis(20));
        store.activate(&short).await.expect("activate");
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert_eq!(
            store.session(short.session_id).await.expect("get"),
            None,
            "expired entries are invisible"
        );
        store.sweep();
        assert!(store.is_empty(), "sweep frees expired entries");
    }

    #[test]
    fn session_record_round_trips() {
        let r = SessionRecord {
            user_id: Uuid::new_v4(),
            expires_at: DateTime::from_timestamp(1_900_000_000, 0).expect("ts"),
        };
        assert_eq!(SessionRecord::decode(&r.encode()), Some(r));
        assert_eq!(SessionRecord::decode("garbage"), None);
    }
}
