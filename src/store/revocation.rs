//! The revocation store: which sessions are live right now, which have ended, and what
//! state each refresh token is in.
//!
//! A session is live while its record is present. Ending it writes a tombstone that lives
//! as long as the session could have, and deletes the record; activation (after a login or
//! a refresh committed in SQL) refuses to write the record of a session that carries a
//! tombstone, atomically (a Lua script on Redis, one locked step in-process). So a refresh
//! that read the session from SQL just before a logout committed cannot bring it back: the
//! store and SQL can only disagree in the direction that refuses.
//!
//! Refresh tokens are keyed by their SHA-256 (what SQL stores), with the session's
//! remaining lifetime as TTL. Their state only moves forward (live → retired → revoked),
//! so a late write cannot make a spent token look live again. The refresh path and
//! introspection read it: a revoked token is refused and a live one is rotated without the
//! two SQL reads that find it; no entry (Redis flushed, restarted) means "ask SQL".
//!
//! The bearer check asks one question per request (`session`); with Redis, the questions of
//! concurrent requests share one `MGET`, sent after each of them was asked.
//!
//! Two implementations behind one trait: Redis (shared by every instance) and an
//! in-process map with the same semantics (single instance only).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures_util::{StreamExt as _, TryStreamExt as _};
use uuid::Uuid;

use crate::store::batch::Batcher;
use crate::store::redis_conn::{Mode, RedisConn, Timeouts};

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

/// The facts of a live refresh token, as SQL had them when it was issued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenInfo {
    pub jti: Uuid,
    pub session_id: Uuid,
    pub user_id: Uuid,
    pub issued_at: DateTime<Utc>,
    /// The session's end.
    pub expires_at: DateTime<Utc>,
}

/// A refresh token's state in the store. Only moves forward: live → retired → revoked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenState {
    Live(TokenInfo),
    /// Rotated: presenting it again is a reuse, judged in SQL (grace window or theft).
    Retired,
    /// Its session has ended.
    Revoked,
}

impl TokenState {
    fn encode(&self) -> String {
        match self {
            TokenState::Live(i) => format!(
                "L {} {} {} {} {}",
                i.jti,
                i.session_id,
                i.user_id,
                nanos(i.issued_at),
                nanos(i.expires_at)
            ),
            TokenState::Retired => "R".to_owned(),
            TokenState::Revoked => "X".to_owned(),
        }
    }

    fn decode(raw: &str) -> Option<Self> {
        let mut parts = raw.split(' ');
        match parts.next()? {
            "R" => Some(TokenState::Retired),
            "X" => Some(TokenState::Revoked),
            "L" => {
                let mut next = || parts.next();
                let jti = next()?.parse().ok()?;
                let session_id = next()?.parse().ok()?;
                let user_id = next()?.parse().ok()?;
                // Exactly as SQL has them: a successor's expiry is copied from here.
                let issued_at = DateTime::from_timestamp_nanos(next()?.parse().ok()?);
                let expires_at = DateTime::from_timestamp_nanos(next()?.parse().ok()?);
                Some(TokenState::Live(TokenInfo { jti, session_id, user_id, issued_at, expires_at }))
            }
            _ => None,
        }
    }

    /// The order states move in: a write never moves a token backwards.
    fn rank(&self) -> u8 {
        match self {
            TokenState::Live(_) => 0,
            TokenState::Retired => 1,
            TokenState::Revoked => 2,
        }
    }
}

fn nanos(t: DateTime<Utc>) -> i64 {
    t.timestamp_nanos_opt().unwrap_or(i64::MAX)
}

/// Makes a session live with its current refresh token: written after the SQL commit
/// that created or rotated it. Idempotent: writing it twice changes nothing.
#[derive(Clone, Debug)]
pub struct Activation {
    pub session_id: Uuid,
    pub record: SessionRecord,
    /// The SHA-256 of the live refresh token, and its facts.
    pub token_hash: String,
    pub token: TokenInfo,
    /// The SHA-256 of the token it replaced, now retired.
    pub retired_hash: Option<String>,
    pub ttl: Duration,
}

/// What an activation found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activated {
    Live,
    /// The session had ended (a tombstone): nothing was written.
    Ended,
}

/// A session to end, with how long its tombstone must outlive any activation: the time
/// the session had left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ending {
    pub session_id: Uuid,
    pub ttl: Duration,
}

#[async_trait]
pub trait RevocationStore: Send + Sync + 'static {
    /// "redis" or "in-process", for logs and `/ready`.
    fn kind(&self) -> &'static str;
    async fn ping(&self) -> Result<(), StoreError>;
    /// The live session, or `None` when it was revoked, expired or never existed.
    async fn session(&self, session_id: Uuid) -> Result<Option<SessionRecord>, StoreError>;
    /// Makes the session live, unless it has ended.
    async fn activate(&self, activation: &Activation) -> Result<Activated, StoreError>;
    /// Ends sessions at once (tombstone, record gone) and marks refresh tokens revoked.
    /// Idempotent.
    async fn end(&self, sessions: &[Ending], token_hashes: &[String]) -> Result<(), StoreError>;
    /// What the store knows of a refresh token; `None`: ask SQL.
    async fn refresh_token(&self, token_hash: &str) -> Result<Option<TokenState>, StoreError>;

    /// Short-lived state that must be shared by every instance and used at most once (MFA
    /// tickets, WebAuthn ceremonies): `value` under `key` for `ttl`.
    async fn stash(&self, key: &str, value: &str, ttl: Duration) -> Result<(), StoreError>;
    /// The stashed value, left in place.
    async fn peek(&self, key: &str) -> Result<Option<String>, StoreError>;
    /// The stashed value, deleted in the same step: of concurrent takers, one gets it.
    async fn take(&self, key: &str) -> Result<Option<String>, StoreError>;
    /// Adds one to the counter at `key` (which lives `ttl` from its first count) and
    /// returns the new count.
    async fn count(&self, key: &str, ttl: Duration) -> Result<u64, StoreError>;
}

/// The most stashed values and counters the in-process store holds: they are created by
/// requests (a passkey login's challenge needs no account), so they are bounded; past it,
/// new ones are refused (503) until old ones expire.
pub const MAX_STASHED: usize = 100_000;

/// Session lookups per `MGET` at most, and `MGET`s in flight at once: requests that
/// arrive while they run go together in the next one.
const SESSION_BATCH: usize = 64;
const SESSION_READS_IN_FLIGHT: usize = 2;

/// Activation, atomically: nothing if the session has a tombstone; token states only move
/// forward (a late activation cannot make a retired or revoked token live again).
/// KEYS: session record, tombstone, live token, [retired token].
/// ARGV: record, TTL in ms, live token state.
const ACTIVATE: &str = r"
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local cur = redis.call('GET', KEYS[3])
if not cur or string.sub(cur, 1, 1) == 'L' then
  redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[2])
end
if KEYS[4] then
  local old = redis.call('GET', KEYS[4])
  if not old or string.sub(old, 1, 1) == 'L' then
    redis.call('SET', KEYS[4], 'R', 'PX', ARGV[2])
  end
end
return 1
";

/// On a cluster, the session's half of an activation (its record and tombstone share the
/// session's hash slot): nothing if the session has ended.
/// KEYS: session record, tombstone. ARGV: record, TTL in ms.
const ACTIVATE_SESSION: &str = r"
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
";

/// On a cluster, one refresh token's state (its key has a slot of its own), forward only:
/// only an absent or live state is overwritten. KEYS: the token. ARGV: state, TTL in ms.
const ADVANCE_TOKEN: &str = r"
local cur = redis.call('GET', KEYS[1])
if not cur or string.sub(cur, 1, 1) == 'L' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1
";

/// Cluster pipelines (one per hash slot) in flight at once for one `end`.
const END_CONCURRENCY: usize = 32;

/// Redis keys: `{prefix}s:{<session>}` (the record), `{prefix}e:{<session>}` (the
/// tombstone: the braces make both one hash slot) and `{prefix}rt:<token hash>`.
///
/// **On a Redis Cluster** (STACK trap 19: a script's or a transaction's keys must share a
/// slot) the work is split by slot. A session's record and tombstone share the session's
/// tag, so activation's tombstone check and record write stay one atomic script, and ending
/// stays one `MULTI` per session. A refresh token's state is looked up by its hash alone, so
/// it cannot share the session's slot: its writes are separate, forward-only single-key
/// scripts, sent concurrently with the session's. That gives up nothing that matters:
///
/// - A token state written `Live` for a session that ended meanwhile (its activation's
///   session script found the tombstone) is never believed on its own. The refresh path
///   rotates a `Live` token only through SQL's compare-and-swap (`UPDATE refresh_tokens …
///   WHERE id = ? AND retired_at IS NULL AND revoked_at IS NULL`, rows affected checked,
///   `service::auth::rotate`), and ending a session revokes its tokens in the same SQL
///   transaction, so the swap refuses and the request is judged from SQL (ended);
///   introspection also requires the session's record, which the tombstone keeps away.
/// - A lost `Retired` mark reads `Live` or absent: the same compare-and-swap refuses a
///   retired token, and SQL judges the reuse.
///
/// **Durability** (Cluster and Sentinel): every write of `activate` and `end` waits for a
/// replica (`WAIT 1`, on the connection that wrote, see [`RedisConn::durable`]); if none
/// confirms within half the response timeout the call fails (503 at the edge, and `end`'s
/// revocation job stays for the reconciler). A logout that was answered is therefore on a
/// replica when its master dies, so the promoted replica refuses the session, and a login
/// or refresh that was answered is still live after the failover. A single server has no
/// replica: no `WAIT`, and one script and one `MULTI` as always.
pub struct RedisStore {
    conn: RedisConn,
    /// Where the writes that wait for a replica go (Cluster, Sentinel): `WAIT` blocks the
    /// connection it is sent on, and the bearer check's reads must not queue behind it.
    durable: RedisConn,
    prefix: String,
    activate: redis::Script,
    activate_session: redis::Script,
    advance_token: redis::Script,
    wait_ms: u64,
    /// The bearer check's lookups. One `GET` per request cost a `writev` and a Redis
    /// command each, the largest part of a check's CPU after the HTTP exchange itself. On a
    /// cluster the `MGET` is split by slot ([`mget_by_slot`]).
    sessions: Batcher<Uuid, SessionRecord, StoreError>,
}

impl RedisStore {
    /// A store on one Redis server at `url`. Does not connect: the manager connects on first
    /// use and reconnects by itself, so the server starts while Redis is down and heals
    /// when it returns. Call it within the Tokio runtime: it starts the task that batches
    /// session lookups.
    pub fn new(
        url: &str,
        prefix: &str,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let timeouts = Timeouts { connect: connect_timeout, response: response_timeout };
        let conn = RedisConn::single(url, timeouts).map_err(redis_err)?;
        Ok(Self::on(conn.clone(), conn, prefix, timeouts))
    }

    /// A store on any [`RedisConn`] (single, cluster, sentinel), with `durable` (a second
    /// connection to the same Redis) for the writes that wait for a replica. Within the
    /// Tokio runtime.
    pub fn on(conn: RedisConn, durable: RedisConn, prefix: &str, timeouts: Timeouts) -> Self {
        let sessions = {
            let (conn, prefix) = (conn.clone(), prefix.to_owned());
            Batcher::spawn(SESSION_BATCH, SESSION_READS_IN_FLIGHT, move |ids: Vec<Uuid>| {
                let mut conn = conn.clone();
                let keys: Vec<String> = ids.iter().map(|id| session_key(&prefix, *id)).collect();
                async move {
                    let raw: Vec<Option<String>> = if conn.mode() == Mode::Cluster {
                        mget_by_slot(&conn, &keys).await?
                    } else {
                        redis::cmd("MGET").arg(&keys).query_async(&mut conn).await.map_err(redis_err)?
                    };
                    Ok(ids
                        .into_iter()
                        .zip(raw)
                        .filter_map(|(id, raw)| Some((id, SessionRecord::decode(raw.as_deref()?)?)))
                        .collect())
                }
            })
        };
        Self {
            conn,
            durable,
            prefix: prefix.to_owned(),
            activate: redis::Script::new(ACTIVATE),
            activate_session: redis::Script::new(ACTIVATE_SESSION),
            advance_token: redis::Script::new(ADVANCE_TOKEN),
            wait_ms: timeouts.wait_ms(),
            sessions,
        }
    }

    /// The shared connection, for the rate limiter.
    pub fn connection(&self) -> RedisConn {
        self.conn.clone()
    }

    fn tombstone_key(&self, id: Uuid) -> String {
        format!("{}e:{{{id}}}", self.prefix)
    }

    fn token_key(&self, hash: &str) -> String {
        format!("{}rt:{hash}", self.prefix)
    }

    fn stash_key(&self, key: &str) -> String {
        format!("{}x:{key}", self.prefix)
    }

    /// Adds the writes that end `sessions` and revoke `token_hashes` to `pipe`.
    fn end_commands(&self, pipe: &mut redis::Pipeline, sessions: &[Ending], token_hashes: &[String]) {
        for s in sessions {
            // The tombstone first: from here on no activation can write the record.
            if !s.ttl.is_zero() {
                pipe.cmd("SET").arg(self.tombstone_key(s.session_id)).arg(1).arg("PX").arg(ttl_ms(s.ttl));
            }
            pipe.cmd("DEL").arg(session_key(&self.prefix, s.session_id));
        }
        for hash in token_hashes {
            // Only entries that exist: a missing one already means "ask SQL".
            pipe.cmd("SET").arg(self.token_key(hash)).arg("X").arg("XX").arg("KEEPTTL");
        }
    }

    /// `activate` on a cluster: the session's script and each token's, concurrently, each
    /// acknowledged by a replica.
    async fn activate_by_slot(&self, a: &Activation) -> Result<Activated, StoreError> {
        let ttl = ttl_ms(a.ttl);
        let mut session = redis::pipe();
        session.invoke_script(
            self.activate_session
                .key(session_key(&self.prefix, a.session_id))
                .key(self.tombstone_key(a.session_id))
                .arg(a.record.encode())
                .arg(ttl),
        );
        let mut writes = vec![session];
        let live = TokenState::Live(a.token).encode();
        let retired = a.retired_hash.as_deref().map(|h| (h, TokenState::Retired.encode()));
        for (hash, state) in std::iter::once((a.token_hash.as_str(), live)).chain(retired) {
            let mut token = redis::pipe();
            token.invoke_script(self.advance_token.key(self.token_key(hash)).arg(state).arg(ttl));
            writes.push(token);
        }
        let scripts = [&self.activate_session, &self.advance_token];
        let answers = futures_util::future::try_join_all(
            writes.iter().map(|pipe| self.durable.durable(pipe, &scripts, self.wait_ms)),
        )
        .await
        .map_err(redis_err)?;
        let written = match answers.first().and_then(|replies| replies.first()) {
            Some(reply) => redis::from_redis_value_ref::<i64>(reply).map_err(parse_err)?,
            None => return Err(StoreError::new("the activation script did not answer")),
        };
        Ok(if written == 1 { Activated::Live } else { Activated::Ended })
    }

    /// `end` on a cluster: one transaction per session (its slot), one write per token,
    /// concurrently, each acknowledged by a replica.
    async fn end_by_slot(&self, sessions: &[Ending], token_hashes: &[String]) -> Result<(), StoreError> {
        let per_session = sessions.iter().map(|s| {
            let mut pipe = redis::pipe();
            pipe.cmd("MULTI");
            self.end_commands(&mut pipe, std::slice::from_ref(s), &[]);
            pipe.cmd("EXEC");
            pipe
        });
        let per_token = token_hashes.iter().map(|h| {
            let mut pipe = redis::pipe();
            self.end_commands(&mut pipe, &[], std::slice::from_ref(h));
            pipe
        });
        let pipes: Vec<redis::Pipeline> = per_session.chain(per_token).collect();
        let writes: Vec<_> = pipes.iter().map(|pipe| self.durable.durable(pipe, &[], self.wait_ms)).collect();
        futures_util::stream::iter(writes)
            .buffer_unordered(END_CONCURRENCY)
            .try_for_each(|_| async { Ok(()) })
            .await
            .map_err(redis_err)
    }
}

/// `MGET` of keys in many slots, on a cluster: one `MGET` per slot, all sent at once, so
/// the commands for one node leave together on its multiplexed connection (one round trip
/// per node). Not the cluster client's own split: redis 1.8 answered a cross-slot `MGET`
/// with "Mismatch in the number of multi-slot results" after a failover until restarted.
async fn mget_by_slot(conn: &RedisConn, keys: &[String]) -> Result<Vec<Option<String>>, StoreError> {
    let mut slots: HashMap<redis::cluster_routing::Slot, Vec<usize>> = HashMap::new();
    for (i, key) in keys.iter().enumerate() {
        slots.entry(redis::cluster_routing::Slot::for_key(key)).or_default().push(i);
    }
    let reads = slots.into_values().map(|indices| {
        let mut conn = conn.clone();
        let mut mget = redis::cmd("MGET");
        for i in &indices {
            mget.arg(&keys[*i]);
        }
        async move {
            let values: Vec<Option<String>> = mget.query_async(&mut conn).await.map_err(redis_err)?;
            Ok::<_, StoreError>(indices.into_iter().zip(values))
        }
    });
    let mut found = vec![None; keys.len()];
    for part in futures_util::future::try_join_all(reads).await? {
        for (i, value) in part {
            if let Some(slot) = found.get_mut(i) {
                *slot = value;
            }
        }
    }
    Ok(found)
}

fn session_key(prefix: &str, id: Uuid) -> String {
    format!("{prefix}s:{{{id}}}")
}

fn redis_err(e: redis::RedisError) -> StoreError {
    StoreError(e.to_string())
}

fn parse_err(e: redis::ParsingError) -> StoreError {
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
        self.conn.check().await.map_err(redis_err)
    }

    async fn session(&self, session_id: Uuid) -> Result<Option<SessionRecord>, StoreError> {
        self.sessions.get(session_id).await
    }

    async fn activate(&self, a: &Activation) -> Result<Activated, StoreError> {
        let mode = self.durable.mode();
        if mode == Mode::Cluster {
            return self.activate_by_slot(a).await;
        }
        let mut call = self.activate.prepare_invoke();
        call.key(session_key(&self.prefix, a.session_id))
            .key(self.tombstone_key(a.session_id))
            .key(self.token_key(&a.token_hash));
        if let Some(old) = &a.retired_hash {
            call.key(self.token_key(old));
        }
        call.arg(a.record.encode()).arg(ttl_ms(a.ttl)).arg(TokenState::Live(a.token).encode());
        let written: i64 = if mode == Mode::Sentinel {
            let mut pipe = redis::pipe();
            pipe.invoke_script(&call);
            let replies =
                self.durable.durable(&pipe, &[&self.activate], self.wait_ms).await.map_err(redis_err)?;
            match replies.first() {
                Some(reply) => redis::from_redis_value_ref(reply).map_err(parse_err)?,
                None => return Err(StoreError::new("the activation script did not answer")),
            }
        } else {
            let mut conn = self.conn.clone();
            call.invoke_async(&mut conn).await.map_err(redis_err)?
        };
        Ok(if written == 1 { Activated::Live } else { Activated::Ended })
    }

    async fn end(&self, sessions: &[Ending], token_hashes: &[String]) -> Result<(), StoreError> {
        if sessions.is_empty() && token_hashes.is_empty() {
            return Ok(());
        }
        match self.conn.mode() {
            Mode::Cluster => self.end_by_slot(sessions, token_hashes).await,
            Mode::Sentinel => {
                // One node: one transaction, then `WAIT` on the same connection.
                let mut pipe = redis::pipe();
                pipe.cmd("MULTI");
                self.end_commands(&mut pipe, sessions, token_hashes);
                pipe.cmd("EXEC");
                self.durable.durable(&pipe, &[], self.wait_ms).await.map(|_| ()).map_err(redis_err)
            }
            Mode::Single => {
                let mut pipe = redis::pipe();
                pipe.atomic();
                self.end_commands(&mut pipe, sessions, token_hashes);
                let mut conn = self.conn.clone();
                pipe.query_async::<()>(&mut conn).await.map_err(redis_err)
            }
        }
    }

    async fn refresh_token(&self, token_hash: &str) -> Result<Option<TokenState>, StoreError> {
        let mut conn = self.conn.clone();
        let raw: Option<String> = redis::cmd("GET")
            .arg(self.token_key(token_hash))
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        Ok(raw.as_deref().and_then(TokenState::decode))
    }

    async fn stash(&self, key: &str, value: &str, ttl: Duration) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("SET")
            .arg(self.stash_key(key))
            .arg(value)
            .arg("PX")
            .arg(ttl_ms(ttl))
            .query_async::<()>(&mut conn)
            .await
            .map_err(redis_err)
    }

    async fn peek(&self, key: &str) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("GET").arg(self.stash_key(key)).query_async(&mut conn).await.map_err(redis_err)
    }

    async fn take(&self, key: &str) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("GETDEL").arg(self.stash_key(key)).query_async(&mut conn).await.map_err(redis_err)
    }

    async fn count(&self, key: &str, ttl: Duration) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        let key = self.stash_key(key);
        let (count, _): (u64, i64) = redis::pipe()
            .atomic()
            .cmd("INCR")
            .arg(&key)
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(ttl_ms(ttl))
            .arg("NX")
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        Ok(count)
    }
}

/// The in-process store: the same semantics in maps behind one lock, for a single
/// instance. Expired entries are invisible at once and removed by `sweep`, which the
/// server runs periodically, so memory follows the number of live and recently ended
/// sessions.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Maps>,
}

#[derive(Default)]
struct Maps {
    sessions: HashMap<Uuid, (SessionRecord, Instant)>,
    tombstones: HashMap<Uuid, Instant>,
    tokens: HashMap<String, (TokenState, Instant)>,
    stashed: HashMap<String, (String, Instant)>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn sweep(&self) {
        let now = Instant::now();
        if let Ok(mut m) = self.inner.lock() {
            m.sessions.retain(|_, (_, until)| *until > now);
            m.tombstones.retain(|_, until| *until > now);
            m.tokens.retain(|_, (_, until)| *until > now);
            m.stashed.retain(|_, (_, until)| *until > now);
        }
    }

    /// Live session records held (expired ones until the next sweep).
    pub fn len(&self) -> usize {
        self.inner.lock().map_or(0, |m| m.sessions.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn poisoned<T>(_: T) -> StoreError {
    StoreError("in-process store lock poisoned".into())
}

impl Maps {
    /// Room for one more stashed entry: expired ones go first; none past [`MAX_STASHED`].
    fn room(&mut self, key: &str, now: Instant) -> Result<(), StoreError> {
        if self.stashed.len() >= MAX_STASHED && !self.stashed.contains_key(key) {
            self.stashed.retain(|_, (_, until)| *until > now);
            if self.stashed.len() >= MAX_STASHED {
                return Err(StoreError("the in-process store's short-lived entries are full".into()));
            }
        }
        Ok(())
    }

    /// Writes a token state unless the present one is further along.
    fn advance_token(&mut self, hash: &str, state: TokenState, until: Instant, now: Instant) {
        let current = self.tokens.get(hash).filter(|(_, u)| *u > now).map(|(s, _)| s.rank());
        if current.is_none_or(|rank| rank <= state.rank()) {
            self.tokens.insert(hash.to_owned(), (state, until));
        }
    }
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
        let m = self.inner.lock().map_err(poisoned)?;
        Ok(m.sessions
            .get(&session_id)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(record, _)| record.clone()))
    }

    async fn activate(&self, a: &Activation) -> Result<Activated, StoreError> {
        let now = Instant::now();
        let until = now + a.ttl;
        let mut m = self.inner.lock().map_err(poisoned)?;
        if m.tombstones.get(&a.session_id).is_some_and(|t| *t > now) {
            return Ok(Activated::Ended);
        }
        m.sessions.insert(a.session_id, (a.record.clone(), until));
        m.advance_token(&a.token_hash, TokenState::Live(a.token), until, now);
        if let Some(old) = &a.retired_hash {
            m.advance_token(old, TokenState::Retired, until, now);
        }
        Ok(Activated::Live)
    }

    async fn end(&self, sessions: &[Ending], token_hashes: &[String]) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut m = self.inner.lock().map_err(poisoned)?;
        for s in sessions {
            if !s.ttl.is_zero() {
                m.tombstones.insert(s.session_id, now + s.ttl);
            }
            m.sessions.remove(&s.session_id);
        }
        for hash in token_hashes {
            if let Some((state, until)) = m.tokens.get_mut(hash.as_str())
                && *until > now
            {
                *state = TokenState::Revoked;
            }
        }
        Ok(())
    }

    async fn refresh_token(&self, token_hash: &str) -> Result<Option<TokenState>, StoreError> {
        let m = self.inner.lock().map_err(poisoned)?;
        Ok(m.tokens.get(token_hash).filter(|(_, until)| *until > Instant::now()).map(|(s, _)| *s))
    }

    async fn stash(&self, key: &str, value: &str, ttl: Duration) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut m = self.inner.lock().map_err(poisoned)?;
        m.room(key, now)?;
        m.stashed.insert(key.to_owned(), (value.to_owned(), now + ttl));
        Ok(())
    }

    async fn peek(&self, key: &str) -> Result<Option<String>, StoreError> {
        let m = self.inner.lock().map_err(poisoned)?;
        Ok(m.stashed.get(key).filter(|(_, until)| *until > Instant::now()).map(|(v, _)| v.clone()))
    }

    async fn take(&self, key: &str) -> Result<Option<String>, StoreError> {
        let mut m = self.inner.lock().map_err(poisoned)?;
        Ok(m.stashed.remove(key).filter(|(_, until)| *until > Instant::now()).map(|(v, _)| v))
    }

    async fn count(&self, key: &str, ttl: Duration) -> Result<u64, StoreError> {
        let now = Instant::now();
        let mut m = self.inner.lock().map_err(poisoned)?;
        m.room(key, now)?;
        let entry = m.stashed.entry(key.to_owned()).or_insert_with(|| ("0".to_owned(), now + ttl));
        if entry.1 <= now {
            *entry = ("0".to_owned(), now + ttl);
        }
        let count = entry.0.parse::<u64>().unwrap_or(0) + 1;
        entry.0 = count.to_string();
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(session_id: Uuid) -> TokenInfo {
        TokenInfo {
            jti: Uuid::now_v7(),
            session_id,
            user_id: Uuid::new_v4(),
            issued_at: DateTime::from_timestamp(1_900_000_000, 123_456_789).expect("ts"),
            expires_at: DateTime::from_timestamp(2_000_000_000, 987_654_321).expect("ts"),
        }
    }

    fn activation(ttl: Duration) -> Activation {
        let session_id = Uuid::new_v4();
        let token = info(session_id);
        Activation {
            session_id,
            // The record keeps whole seconds (what `/v1/auth/session` shows).
            record: SessionRecord {
                user_id: token.user_id,
                expires_at: DateTime::from_timestamp(token.expires_at.timestamp(), 0).expect("ts"),
            },
            token_hash: format!("h-{}", Uuid::new_v4().simple()),
            token,
            retired_hash: None,
            ttl,
        }
    }

    /// The contract both stores keep: live, ended, tombstone, token states.
    async fn stash_contract(store: &dyn RevocationStore) {
        let key = format!("k{}", Uuid::new_v4().simple());
        assert_eq!(store.take(&key).await.expect("take"), None);
        store.stash(&key, "v1", Duration::from_secs(60)).await.expect("stash");
        assert_eq!(store.peek(&key).await.expect("peek").as_deref(), Some("v1"));
        assert_eq!(store.take(&key).await.expect("take").as_deref(), Some("v1"));
        assert_eq!(store.take(&key).await.expect("take"), None, "taken once");
        let counter = format!("c{}", Uuid::new_v4().simple());
        for n in 1..=3 {
            assert_eq!(store.count(&counter, Duration::from_secs(60)).await.expect("count"), n);
        }
        let short = format!("s{}", Uuid::new_v4().simple());
        store.stash(&short, "v", Duration::from_millis(50)).await.expect("stash");
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(store.peek(&short).await.expect("peek"), None, "expired");
    }

    async fn contract(store: &dyn RevocationStore) {
        stash_contract(store).await;
        let a = activation(Duration::from_secs(60));
        assert_eq!(store.activate(&a).await.expect("activate"), Activated::Live);
        assert_eq!(store.session(a.session_id).await.expect("get"), Some(a.record.clone()));
        assert_eq!(store.refresh_token(&a.token_hash).await.expect("token"), Some(TokenState::Live(a.token)));

        // Rotation: the new token live, the old one retired.
        let mut next = a.clone();
        next.token_hash = format!("h-{}", Uuid::new_v4().simple());
        next.token = info(a.session_id);
        next.retired_hash = Some(a.token_hash.clone());
        assert_eq!(store.activate(&next).await.expect("activate"), Activated::Live);
        assert_eq!(store.refresh_token(&a.token_hash).await.expect("token"), Some(TokenState::Retired));
        // A late activation of the first token cannot make it live again.
        assert_eq!(store.activate(&a).await.expect("activate"), Activated::Live);
        assert_eq!(store.refresh_token(&a.token_hash).await.expect("token"), Some(TokenState::Retired));

        let ending = Ending { session_id: a.session_id, ttl: Duration::from_secs(60) };
        let hashes = [a.token_hash.clone(), next.token_hash.clone(), "h-unknown".to_owned()];
        store.end(&[ending], &hashes).await.expect("end");
        assert_eq!(store.session(a.session_id).await.expect("get"), None);
        assert_eq!(store.refresh_token(&next.token_hash).await.expect("token"), Some(TokenState::Revoked));
        assert_eq!(store.refresh_token("h-unknown").await.expect("token"), None, "no entry is made up");
        // The race the tombstone closes: an activation that read SQL before the end.
        assert_eq!(store.activate(&next).await.expect("activate"), Activated::Ended);
        assert_eq!(store.session(a.session_id).await.expect("get"), None, "ended stays ended");
        assert_eq!(store.refresh_token(&next.token_hash).await.expect("token"), Some(TokenState::Revoked));
        store.end(&[ending], &hashes).await.expect("idempotent");
    }

    #[tokio::test]
    async fn memory_store_keeps_the_contract() {
        contract(&MemoryStore::new()).await;
    }

    #[tokio::test]
    async fn redis_store_keeps_the_contract() {
        let url = std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let prefix = format!("lkunit:{}:", Uuid::new_v4().simple());
        let store =
            RedisStore::new(&url, &prefix, Duration::from_secs(1), Duration::from_secs(2)).expect("store");
        contract(&store).await;
        let mut conn = store.connection();
        let keys: Vec<String> =
            redis::cmd("KEYS").arg(format!("{prefix}*")).query_async(&mut conn).await.expect("keys");
        let _: () = redis::cmd("DEL").arg(keys).query_async(&mut conn).await.expect("clean up");
    }

    #[tokio::test]
    async fn memory_store_ttl_and_sweep() {
        let store = MemoryStore::new();
        let short = activation(Duration::from_millis(20));
        store.activate(&short).await.expect("activate");
        store
            .end(&[Ending { session_id: Uuid::new_v4(), ttl: Duration::from_millis(20) }], &[])
            .await
            .expect("end");
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert_eq!(
            store.session(short.session_id).await.expect("get"),
            None,
            "expired entries are invisible"
        );
        assert_eq!(store.refresh_token(&short.token_hash).await.expect("token"), None);
        store.sweep();
        let m = store.inner.lock().expect("lock");
        assert!(m.sessions.is_empty() && m.tombstones.is_empty() && m.tokens.is_empty(), "sweep frees all");
    }

    #[test]
    fn records_and_states_round_trip() {
        let r = SessionRecord {
            user_id: Uuid::new_v4(),
            expires_at: DateTime::from_timestamp(1_900_000_000, 0).expect("ts"),
        };
        assert_eq!(SessionRecord::decode(&r.encode()), Some(r));
        assert_eq!(SessionRecord::decode("garbage"), None);
        for s in [TokenState::Live(info(Uuid::new_v4())), TokenState::Retired, TokenState::Revoked] {
            assert_eq!(TokenState::decode(&s.encode()), Some(s));
        }
        assert_eq!(TokenState::decode("L 1 2"), None);
    }
}
