//! One Redis connection for the three ways Redis is deployed: a single server
//! (`REDIS_URL`), a Redis Cluster (`REDIS_CLUSTER_NODES`) and Redis behind Sentinel
//! (`REDIS_SENTINEL_NODES` + `REDIS_SENTINEL_MASTER`).
//!
//! [`RedisConn`] implements `redis::aio::ConnectionLike` and `Clone`, so the revocation
//! store and the rate limiter send commands, pipelines and scripts the same way in every
//! mode; where a mode needs other work (hash slots, replica acknowledgement) they ask
//! [`RedisConn::mode`]. Every mode connects lazily (the server starts while Redis is down)
//! and bounds each request by `REDIS_CONNECT_TIMEOUT` / `REDIS_RESPONSE_TIMEOUT`, so a
//! Redis that does not answer costs a request one timeout (503), never a hang.
//!
//! - **Single**: the `ConnectionManager` the server always had (reconnects by itself).
//! - **Cluster**: the redis crate's async cluster client: it follows `MOVED`/`ASK` and
//!   splits multi-key reads (`MGET`) by slot, sending the parts to their nodes at once over
//!   one multiplexed connection per node. Its retries are bounded (a few, tens of
//!   milliseconds apart) and the whole request, retries included, by the response timeout:
//!   during a failover requests fail closed quickly. It does not, however, look for a new
//!   topology when a node stops answering (redis 1.8 reconnects to the dead address
//!   forever), so on connection errors, timeouts and `CLUSTERDOWN`/`TRYAGAIN` the
//!   connection is rebuilt from the seed nodes (single-flight, at most every
//!   [`REBUILD_EVERY`]), which reads the slot map afresh and finds the promoted replica.
//! - **Sentinel**: the redis crate has no failover-aware manager (STACK trap 20: one kept
//!   writing to a demoted master). Here the master is resolved through the sentinels (and
//!   checked with `ROLE`), and re-resolved, single-flight, whenever the connection to it
//!   fails, times out, answers `READONLY` (it was demoted), or a write finds no replica to
//!   acknowledge it (see [`RedisConn::durable`]).
//!
//! **Replica acknowledgement.** Redis replicates asynchronously: a write a master
//! acknowledged can die with it. In Cluster and Sentinel modes the writes that must survive
//! a failover (a session's record and tombstone, a refresh token's state) end their pipeline
//! with `WAIT 1 <ms>` on the same node connection, and count as done only when a replica has
//! them ([`RedisConn::durable`]). A single server has no replica to wait for: no `WAIT`.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
use redis::sentinel::{Sentinel, SentinelNodeConnectionInfo};
use redis::{Cmd, ErrorKind, FromRedisValue, Pipeline, RedisError, RedisFuture, RedisResult, Value};

/// Which deployment the connection talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Single,
    Cluster,
    Sentinel,
}

/// How long to wait for a connection and for an answer.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub connect: Duration,
    pub response: Duration,
}

impl Timeouts {
    /// How long `WAIT` may wait for a replica: half the response timeout, so its answer
    /// (or its refusal) arrives before the client gives up on the request.
    pub fn wait_ms(&self) -> u64 {
        u64::try_from(self.response.as_millis() / 2).unwrap_or(u64::MAX).max(10)
    }
}

#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConn),
    Sentinel(SentinelConn),
}

impl RedisConn {
    /// A single server at `url`; does not connect yet.
    pub fn single(url: &str, t: Timeouts) -> RedisResult<Self> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(t.connect))
            .set_response_timeout(Some(t.response))
            // Fail a request fast while Redis is down; the next request tries again.
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        Ok(Self::Single(ConnectionManager::new_lazy_with_config(client, config)?))
    }

    /// A Redis Cluster reached through any of `nodes` (URLs); connects in the background
    /// and on use, so the server starts while the cluster is down.
    pub fn cluster(nodes: &[String], t: Timeouts) -> RedisResult<Self> {
        let client = redis::cluster::ClusterClientBuilder::new(nodes.to_vec())
            .connection_timeout(t.connect)
            .response_timeout(t.response)
            // Retries and redirects (MOVED, ASK, a failover's TRYAGAIN/CLUSTERDOWN) stay
            // within one response timeout: a request fails closed instead of queueing.
            .overall_response_timeout(Some(t.response))
            .retries(3)
            .min_retry_wait(10)
            .max_retry_wait(100)
            .build()?;
        let config = redis::cluster::ClusterConfig::new()
            .set_connection_timeout(t.connect)
            .set_response_timeout(t.response);
        let conn = client.get_pending_async_connection_with_config(config.clone());
        Ok(Self::Cluster(ClusterConn(Arc::new(ClusterShared {
            client,
            config,
            current: RwLock::new((0, conn)),
            rebuilt_at: std::sync::Mutex::new(Instant::now()),
        }))))
    }

    /// The master named `master` as the sentinels at `sentinels` (URLs) know it. Credentials
    /// and TLS of the first sentinel URL are also used for the master.
    pub fn sentinel(sentinels: &[String], master: &str, t: Timeouts) -> RedisResult<Self> {
        let first = redis::IntoConnectionInfo::into_connection_info(
            sentinels.first().map(String::as_str).unwrap_or_default(),
        )?;
        let node =
            SentinelNodeConnectionInfo::default().set_redis_connection_info(first.redis_settings().clone());
        let node = match first.addr() {
            redis::ConnectionAddr::TcpTls { insecure, .. } => {
                node.set_tls_mode(if *insecure { redis::TlsMode::Insecure } else { redis::TlsMode::Secure })
            }
            _ => node,
        };
        let sentinel = Sentinel::build(sentinels.to_vec())?;
        Ok(Self::Sentinel(SentinelConn(Arc::new(Shared {
            master: master.to_owned(),
            node,
            timeouts: t,
            resolver: tokio::sync::Mutex::new(Resolver { sentinel, generation: 0, failed_at: None }),
            current: RwLock::new(None),
        }))))
    }

    pub fn mode(&self) -> Mode {
        match self {
            Self::Single(_) => Mode::Single,
            Self::Cluster(_) => Mode::Cluster,
            Self::Sentinel(_) => Mode::Sentinel,
        }
    }

    /// Runs `pipe` (not `atomic()`: a transaction inside it is spelled `MULTI` … `EXEC`),
    /// then `WAIT 1 <wait_ms>` on the same connection, and answers the pipeline's replies
    /// only if a replica acknowledged every write before it. A `NOSCRIPT` (a node that has
    /// not seen `scripts` yet, a newly promoted replica) loads them and runs it again.
    ///
    /// Keys of one pipeline must share a hash slot (on a cluster it goes to that slot's
    /// master, and `WAIT` counts that master's replicas).
    pub async fn durable(
        &self,
        pipe: &Pipeline,
        scripts: &[&redis::Script],
        wait_ms: u64,
    ) -> RedisResult<Vec<Value>> {
        let mut pipe = pipe.clone();
        pipe.cmd("WAIT").arg(1).arg(wait_ms);
        let mut conn = self.clone();
        let mut replies: Vec<Value> = match pipe.query_async(&mut conn).await {
            Err(e) if e.kind() == ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                for script in scripts {
                    script.load_async(&mut conn).await?;
                }
                pipe.query_async(&mut conn).await?
            }
            other => other?,
        };
        let acknowledged = match replies.pop() {
            Some(reply) => i64::from_redis_value(reply).map_err(RedisError::from)?,
            None => 0,
        };
        if acknowledged < 1 {
            if let Self::Sentinel(s) = self {
                // A master without replicas may be one the sentinels have replaced.
                s.suspect();
            }
            return Err(RedisError::from((
                ErrorKind::Io,
                "no replica acknowledged the write in time",
                format!("WAIT 1 {wait_ms} answered {acknowledged}"),
            )));
        }
        Ok(replies)
    }

    /// Whether Redis can serve: `PING` (through the current master with Sentinel); on a
    /// cluster, `CLUSTER INFO` of every master must say `cluster_state:ok`.
    pub async fn check(&self) -> RedisResult<()> {
        let mut conn = self.clone();
        match &mut conn {
            Self::Cluster(cluster) => {
                let info = redis::cmd("CLUSTER").arg("INFO").clone();
                let (generation, mut current) = cluster.current();
                let answers = match current
                    .route_command(info, RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None)))
                    .await
                {
                    Ok(answers) => answers,
                    Err(e) => {
                        if topology_may_have_changed(&e) {
                            cluster.rebuild(generation);
                        }
                        return Err(e);
                    }
                };
                let texts: Vec<String> = match answers {
                    Value::Map(pairs) => pairs
                        .into_iter()
                        .map(|(_, v)| String::from_redis_value(v).map_err(RedisError::from))
                        .collect::<RedisResult<_>>()?,
                    other => vec![String::from_redis_value(other).map_err(RedisError::from)?],
                };
                if texts.is_empty()
                    || !texts.iter().all(|t| t.lines().any(|l| l.trim() == "cluster_state:ok"))
                {
                    return Err(RedisError::from((ErrorKind::Io, "the cluster is not ok (cluster_state)")));
                }
                Ok(())
            }
            _ => redis::cmd("PING").query_async::<String>(&mut conn).await.map(|_| ()),
        }
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
            Self::Sentinel(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Sentinel(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
            Self::Sentinel(_) => 0,
        }
    }
}

/// The least time between two rebuilds of a cluster connection.
pub const REBUILD_EVERY: Duration = Duration::from_millis(500);

/// A cluster connection, rebuilt from the seed nodes when the topology may have changed.
#[derive(Clone)]
pub struct ClusterConn(Arc<ClusterShared>);

struct ClusterShared {
    client: redis::cluster::ClusterClient,
    config: redis::cluster::ClusterConfig,
    current: RwLock<(u64, ClusterConnection)>,
    rebuilt_at: std::sync::Mutex<Instant>,
}

/// Errors after which a cluster's slot map may be stale (a node died, a failover runs).
fn topology_may_have_changed(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.kind(),
            ErrorKind::Server(
                redis::ServerErrorKind::ClusterDown
                    | redis::ServerErrorKind::TryAgain
                    | redis::ServerErrorKind::MasterDown
                    | redis::ServerErrorKind::ReadOnly
            )
        )
}

impl ClusterConn {
    fn current(&self) -> (u64, ClusterConnection) {
        match self.0.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces connection `generation` (not a newer one) by a fresh one, unless one was
    /// made less than [`REBUILD_EVERY`] ago.
    fn rebuild(&self, generation: u64) {
        let Ok(mut rebuilt_at) = self.0.rebuilt_at.lock() else { return };
        if rebuilt_at.elapsed() < REBUILD_EVERY {
            return;
        }
        let Ok(mut current) = self.0.current.write() else { return };
        if current.0 != generation {
            return;
        }
        let fresh = self.0.client.get_pending_async_connection_with_config(self.0.config.clone());
        *current = (generation + 1, fresh);
        *rebuilt_at = Instant::now();
        tracing::info!("redis cluster: reconnecting from the seed nodes to read the slot map afresh");
    }
}

impl ConnectionLike for ClusterConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let (generation, mut conn) = self.current();
            let answer = conn.req_packed_command(cmd).await;
            if let Err(e) = &answer
                && topology_may_have_changed(e)
            {
                self.rebuild(generation);
            }
            answer
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let (generation, mut conn) = self.current();
            let answer = conn.req_packed_commands(pipeline, offset, count).await;
            let changed = match &answer {
                Err(e) => topology_may_have_changed(e),
                Ok(values) => values.iter().any(|v| {
                    matches!(v, Value::ServerError(e) if matches!(
                        e.kind(),
                        Some(
                            redis::ServerErrorKind::ClusterDown
                                | redis::ServerErrorKind::TryAgain
                                | redis::ServerErrorKind::ReadOnly
                        )
                    ))
                }),
            };
            if changed {
                self.rebuild(generation);
            }
            answer
        })
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// After a failed master lookup, requests fail at once for this long instead of each
/// asking the sentinels again.
const RESOLVE_BACKOFF: Duration = Duration::from_millis(100);

/// The master behind Sentinel: a multiplexed connection to it, replaced when it fails.
#[derive(Clone)]
pub struct SentinelConn(Arc<Shared>);

struct Shared {
    master: String,
    node: SentinelNodeConnectionInfo,
    timeouts: Timeouts,
    /// Held while the master is looked up: concurrent requests wait for one lookup.
    resolver: tokio::sync::Mutex<Resolver>,
    /// The current master's connection and the lookup that found it.
    current: RwLock<Option<(u64, MultiplexedConnection)>>,
}

struct Resolver {
    sentinel: Sentinel,
    generation: u64,
    failed_at: Option<Instant>,
}

/// Errors after which the master may have changed: look it up again.
fn master_may_have_moved(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.kind(),
            ErrorKind::Server(redis::ServerErrorKind::ReadOnly | redis::ServerErrorKind::MasterDown)
        )
}

/// Errors after which one more try, on the master the sentinels name now, is worth it: the
/// command was refused (`READONLY`), or the connection was found dead (the old master's,
/// after a failover). Not a timeout: a slow master must fail the request fast. Every write
/// the store sends is idempotent or harmless to repeat (a counter, at worst, counts twice).
fn worth_one_more(e: &RedisError) -> bool {
    e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.kind() == ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
}

impl SentinelConn {
    fn current(&self) -> Option<(u64, MultiplexedConnection)> {
        self.0.current.read().ok().and_then(|c| c.clone())
    }

    /// Forgets the connection of lookup `generation` (not a newer one).
    fn forget(&self, generation: u64) {
        if let Ok(mut current) = self.0.current.write()
            && current.as_ref().is_some_and(|(g, _)| *g == generation)
        {
            *current = None;
        }
    }

    /// Forgets the current master: the next request looks it up again.
    fn suspect(&self) {
        if let Some((generation, _)) = self.current() {
            self.forget(generation);
        }
    }

    async fn connection(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        if let Some(current) = self.current() {
            return Ok(current);
        }
        let mut resolver = self.0.resolver.lock().await;
        // Another request may have found it while this one waited.
        if let Some(current) = self.current() {
            return Ok(current);
        }
        if resolver.failed_at.is_some_and(|at| at.elapsed() < RESOLVE_BACKOFF) {
            return Err(RedisError::from((ErrorKind::Io, "no master found through the sentinels")));
        }
        let t = self.0.timeouts;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(t.connect))
            .set_response_timeout(Some(t.response));
        let lookup = async {
            let client = resolver.sentinel.async_master_for(&self.0.master, Some(&self.0.node)).await?;
            client.get_multiplexed_async_connection_with_config(&config).await
        };
        // The sentinels' own connections have no timeout: bound the whole lookup.
        let found = match tokio::time::timeout(t.connect + t.response, lookup).await {
            Ok(found) => found,
            Err(_) => Err(RedisError::from((ErrorKind::Io, "the sentinels did not answer in time"))),
        };
        match found {
            Ok(conn) => {
                resolver.generation += 1;
                resolver.failed_at = None;
                let current = (resolver.generation, conn);
                if let Ok(mut slot) = self.0.current.write() {
                    *slot = Some(current.clone());
                }
                tracing::info!(master = %self.0.master, "redis: connected to the master the sentinels name");
                Ok(current)
            }
            Err(e) => {
                resolver.failed_at = Some(Instant::now());
                Err(e)
            }
        }
    }
}

impl ConnectionLike for SentinelConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let (generation, mut conn) = self.connection().await?;
            let answer = conn.req_packed_command(cmd).await;
            match answer {
                Err(e) if master_may_have_moved(&e) => {
                    self.forget(generation);
                    if worth_one_more(&e) {
                        let (_, mut conn) = self.connection().await?;
                        return conn.req_packed_command(cmd).await;
                    }
                    Err(e)
                }
                other => other,
            }
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let (generation, mut conn) = self.connection().await?;
            let mut answer = conn.req_packed_commands(pipeline, offset, count).await;
            if let Err(e) = &answer
                && master_may_have_moved(e)
                && worth_one_more(e)
            {
                self.forget(generation);
                let (_, mut conn) = self.connection().await?;
                answer = conn.req_packed_commands(pipeline, offset, count).await;
            }
            let moved = match &answer {
                Err(e) => master_may_have_moved(e),
                // A pipeline's error replies come back as values.
                Ok(values) => values.iter().any(|v| {
                    matches!(v, Value::ServerError(e) if matches!(
                        e.kind(),
                        Some(redis::ServerErrorKind::ReadOnly | redis::ServerErrorKind::MasterDown)
                    ) || e.code() == "READONLY")
                }),
            };
            if moved {
                self.forget(generation);
            }
            answer
        })
    }

    fn get_db(&self) -> i64 {
        0
    }
}
