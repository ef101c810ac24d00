//! Scenario 8: one instance, then three sharing one PostgreSQL database and one Redis, the
//! load spread round-robin over them (connection `c` talks to instance `c % n`): bearer
//! checks, refreshes and logins. The Redis is the bench's own: a Redis Cluster of 3 masters
//! and 3 replicas (`redis-server --cluster-enabled yes`, `redis-cli --cluster create`,
//! passed as `REDIS_CLUSTER_NODES`), or with `--scale-redis single` one `redis-server`
//! (`REDIS_URL`). Being its only client besides the servers, the bench can also say what
//! each operation costs, from deltas around each measurement divided by the requests:
//!
//! - SQL statements: the servers' `latchkey_dependency_duration_seconds_count{dependency="database"}`
//!   (every statement of the request paths and the audit writer; not the mail workers);
//! - Redis store calls: the same metric for `redis` (one round trip each on one node; a
//!   cluster splits a multi-key call per node);
//! - Redis commands: `INFO commandstats` of the masters (Lua scripts' inner commands
//!   included; INFO, replication and cluster-topology commands left out);
//! - CPU time: user + system of the server processes, the Redis nodes (replicas included)
//!   and the PostgreSQL backends serving the benchmark's database, from `/proc/<pid>/stat`.

use std::collections::HashMap;

use super::*;

/// Which Redis scenario 8 runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RedisMode {
    /// The cluster when the server reads `REDIS_CLUSTER_NODES`, else (said in the output) one
    /// redis-server.
    Auto,
    /// A Redis Cluster of 3 masters and 3 replicas (`REDIS_CLUSTER_NODES`).
    Cluster,
    /// One redis-server (`REDIS_URL`).
    Single,
}

/// Redis processes of ours (in a directory of their own), killed on drop.
struct Redis {
    mode: RedisMode,
    nodes: Vec<(u16, Child)>,
}

impl Drop for Redis {
    fn drop(&mut self) {
        for (_, child) in &mut self.nodes {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A free port whose cluster-bus port (+10000) is free too.
fn free_node_port() -> anyhow::Result<u16> {
    for _ in 0..100 {
        let port = free_port()?;
        if port <= 55_535 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port pair for a Redis Cluster node")
}

async fn redis_conn(port: u16) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    Ok(client.get_multiplexed_async_connection().await?)
}

async fn info(port: u16, section: &str) -> anyhow::Result<String> {
    let mut conn = redis_conn(port).await?;
    Ok(redis::cmd("INFO").arg(section).query_async(&mut conn).await?)
}

/// Commands the bench or replication itself causes, not the servers' requests.
fn counted(command: &str) -> bool {
    !(["info", "replconf", "psync", "sync", "ping"].contains(&command)
        || command.starts_with("cluster|")
        || command.starts_with("config|")
        || command.starts_with("command|")
        || command.starts_with("client|"))
}

impl Redis {
    async fn start(mode: RedisMode, dir: &Path) -> anyhow::Result<Self> {
        let count = if mode == RedisMode::Single { 1 } else { 6 };
        let mut redis = Redis { mode, nodes: Vec::new() };
        for _ in 0..count {
            let port = free_node_port()?;
            let node_dir = dir.join(format!("redis-{port}"));
            std::fs::create_dir_all(&node_dir)?;
            let mut cmd = Command::new("redis-server");
            cmd.args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&node_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
            if mode != RedisMode::Single {
                cmd.args(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]);
                cmd.args(["--cluster-node-timeout", "2000"]);
            }
            redis.nodes.push((port, cmd.spawn().context("starting redis-server")?));
        }
        for (port, _) in &redis.nodes {
            let deadline = Instant::now() + Duration::from_secs(20);
            while info(*port, "server").await.is_err() {
                if Instant::now() > deadline {
                    bail!("redis-server on port {port} did not start");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if mode != RedisMode::Single {
            let status = Command::new("redis-cli")
                .args(["--cluster", "create"])
                .args(redis.nodes.iter().map(|(port, _)| format!("127.0.0.1:{port}")))
                .args(["--cluster-replicas", "1", "--cluster-yes"])
                .stdout(Stdio::null())
                .status()
                .context("redis-cli --cluster create")?;
            if !status.success() {
                bail!("redis-cli --cluster create failed");
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            for (port, _) in &redis.nodes {
                loop {
                    let mut conn = redis_conn(*port).await?;
                    let state: String = redis::cmd("CLUSTER").arg("INFO").query_async(&mut conn).await?;
                    if state.contains("cluster_state:ok") {
                        break;
                    }
                    if Instant::now() > deadline {
                        bail!("the Redis Cluster did not reach cluster_state:ok");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            // The servers wait for a replica to confirm each session write (`WAIT 1`): a
            // master whose replica is still loading its first copy confirms nothing.
            for (port, _) in &redis.nodes {
                loop {
                    let replication = info(*port, "replication").await?;
                    if !replication.contains("role:master") || replication.contains("state=online") {
                        break;
                    }
                    if Instant::now() > deadline {
                        bail!("a Redis Cluster master on port {port} has no replica online");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        Ok(redis)
    }

    fn env(&self) -> Vec<(String, String)> {
        let nodes: Vec<String> = self.nodes.iter().map(|(port, _)| format!("127.0.0.1:{port}")).collect();
        match self.mode {
            RedisMode::Single => vec![("REDIS_URL".to_owned(), format!("redis://{}", nodes[0]))],
            _ => vec![("REDIS_CLUSTER_NODES".to_owned(), nodes.join(","))],
        }
    }

    /// The masters' command counts, and (calls, µs) by command.
    async fn commands(&self) -> anyhow::Result<HashMap<String, u64>> {
        let mut calls = HashMap::new();
        for (port, _) in &self.nodes {
            if !info(*port, "replication").await?.contains("role:master") {
                continue;
            }
            for line in info(*port, "commandstats").await?.lines() {
                let Some((name, fields)) = line.strip_prefix("cmdstat_").and_then(|l| l.split_once(':'))
                else {
                    continue;
                };
                let n: u64 = fields
                    .split(',')
                    .find_map(|f| f.strip_prefix("calls="))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if counted(name) {
                    *calls.entry(name.to_owned()).or_default() += n;
                }
            }
        }
        Ok(calls)
    }

    fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(|(_, child)| child.id()).collect()
    }
}

/// User + system CPU time of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
    // Fields after the command name (which may hold spaces): state is the first, utime the 12th.
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12)
}

fn ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// A server of scenario 8, with its metrics listener.
struct Instance {
    server: Server,
    metrics: SocketAddr,
}

async fn get_text(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let resp = sender.send_request(build("GET", path, None, None)?).await?;
    let bytes = resp.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

impl Instance {
    async fn start(bin: &Path, env: &[(String, String)], dir: &Path) -> anyhow::Result<Self> {
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let mut env = env.to_vec();
        env.push(("METRICS_ADDR".to_owned(), metrics.to_string()));
        let server = Server::spawn(bin, &env, dir)?;
        server.wait_ready(Instant::now()).await?;
        let (_, body) = request(server.addr, "GET", "/ready", None, None).await?;
        if body["checks"]["redis"] != "ok" {
            bail!(
                "{NO_STORE} (/ready says {} with {:?}: this build does not read it)",
                body["checks"]["redis"],
                env.iter().map(|(k, _)| k.as_str()).filter(|k| k.starts_with("REDIS_")).collect::<Vec<_>>()
            );
        }
        Ok(Self { server, metrics })
    }

    /// (SQL statements, Redis store calls) so far, from the server's metrics.
    async fn calls(&self) -> anyhow::Result<(u64, u64)> {
        let text = get_text(self.metrics, "/metrics").await?;
        let count = |dependency: &str| -> u64 {
            text.lines()
                .filter(|l| l.starts_with("latchkey_dependency_duration_seconds_count{"))
                .filter(|l| l.contains(&format!("dependency=\"{dependency}\"")))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as u64
        };
        Ok((count("database"), count("redis")))
    }
}

/// PostgreSQL backends serving `database` (pid → CPU ticks).
async fn pg_backends(
    admin: &sea_orm::DatabaseConnection,
    database: &str,
) -> anyhow::Result<HashMap<u32, u64>> {
    use sea_orm::{ConnectionTrait as _, Statement};
    let rows = admin
        .query_all_raw(Statement::from_sql_and_values(
            sea_orm::DbBackend::Postgres,
            "SELECT pid FROM pg_stat_activity WHERE datname = $1",
            [database.into()],
        ))
        .await?;
    let mut out = HashMap::new();
    for row in rows {
        let pid: i32 = row.try_get("", "pid")?;
        let pid = u32::try_from(pid)?;
        out.insert(pid, cpu_ticks(pid));
    }
    Ok(out)
}

/// Everything counted at one moment.
struct Snapshot {
    sql: u64,
    store_calls: u64,
    commands: HashMap<String, u64>,
    server_ticks: u64,
    redis_ticks: u64,
    pg: HashMap<u32, u64>,
}

struct Counters<'a> {
    instances: &'a [Instance],
    redis: &'a Redis,
    admin: &'a sea_orm::DatabaseConnection,
    database: &'a str,
}

impl Counters<'_> {
    async fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let (mut sql, mut store_calls) = (0, 0);
        for instance in self.instances {
            let (s, r) = instance.calls().await?;
            sql += s;
            store_calls += r;
        }
        Ok(Snapshot {
            sql,
            store_calls,
            commands: self.redis.commands().await?,
            server_ticks: self.instances.iter().map(|i| cpu_ticks(i.server.child.id())).sum(),
            redis_ticks: self.redis.pids().into_iter().map(cpu_ticks).sum(),
            pg: pg_backends(self.admin, self.database).await?,
        })
    }
}

/// What one operation cost, on average over a measurement.
struct Cost {
    operation: String,
    requests: u64,
    sql: f64,
    store_calls: f64,
    commands: f64,
    by_command: Vec<(String, f64)>,
    server_cpu_ms: f64,
    redis_cpu_ms: f64,
    pg_cpu_ms: f64,
}

impl Cost {
    fn between(operation: &str, before: &Snapshot, after: &Snapshot, requests: u64) -> Self {
        let per = |n: u64| n as f64 / requests.max(1) as f64;
        let ms = |ticks: u64| per(ticks) * 1000.0 / ticks_per_second();
        let mut by_command: Vec<(String, f64)> = after
            .commands
            .iter()
            .map(|(name, n)| {
                (name.clone(), per(n.saturating_sub(before.commands.get(name).copied().unwrap_or(0))))
            })
            .filter(|(_, n)| *n > 0.0)
            .collect();
        by_command.sort_by(|a, b| b.1.total_cmp(&a.1));
        let pg_ticks: u64 =
            after.pg.iter().map(|(pid, t)| t.saturating_sub(before.pg.get(pid).copied().unwrap_or(0))).sum();
        Cost {
            operation: operation.to_owned(),
            requests,
            sql: per(after.sql.saturating_sub(before.sql)),
            store_calls: per(after.store_calls.saturating_sub(before.store_calls)),
            commands: by_command.iter().map(|(_, n)| n).sum(),
            by_command,
            server_cpu_ms: ms(after.server_ticks.saturating_sub(before.server_ticks)),
            redis_cpu_ms: ms(after.redis_ticks.saturating_sub(before.redis_ticks)),
            pg_cpu_ms: ms(pg_ticks),
        }
    }

    fn json(&self) -> Value {
        let by_command: serde_json::Map<String, Value> =
            self.by_command.iter().map(|(name, n)| (name.clone(), json!(n))).collect();
        json!({"operation": self.operation, "requests": self.requests, "sql_statements": self.sql,
               "redis_store_calls": self.store_calls, "redis_commands": self.commands,
               "redis_commands_by_name": by_command, "server_cpu_ms": self.server_cpu_ms,
               "redis_cpu_ms": self.redis_cpu_ms, "postgres_cpu_ms": self.pg_cpu_ms})
    }
}

/// One phase: the three operations against `n` instances.
struct Phase {
    instances: usize,
    stats: Vec<Stats>,
    costs: Vec<Cost>,
}

pub struct ScaleRun {
    mode: RedisMode,
    /// `--scale-redis auto` found no cluster support in the server.
    fallback: bool,
    phases: Vec<Phase>,
}

async fn phase(opts: &Opts, counters: &Counters<'_>, tag: &str) -> anyhow::Result<Phase> {
    let n = counters.instances.len();
    let addrs: Vec<SocketAddr> = counters.instances.iter().map(|i| i.server.addr).collect();
    let seeded = seed(addrs[0], opts.conns.max(8) * 2, tag).await?;
    let operations = [
        (
            "bearer check (GET /v1/auth/session)",
            Work::Get { path: "/v1/auth/session", tokens: Arc::clone(&seeded.access) },
        ),
        ("refresh (POST /v1/auth/refresh)", Work::Refresh { tokens: Arc::clone(&seeded.refresh) }),
        ("login (POST /v1/auth/login)", Work::Login { emails: Arc::clone(&seeded.emails) }),
    ];
    let (mut stats, mut costs) = (Vec::new(), Vec::new());
    for (operation, work) in operations {
        let name = format!("8. {operation}, {n} instance{}", if n == 1 { "" } else { "s" });
        let before = counters.snapshot().await?;
        let s = drive_on(&name, &addrs, opts.conns, opts.seconds, work).await?;
        let after = counters.snapshot().await?;
        costs.push(Cost::between(operation, &before, &after, s.requests));
        stats.push(s);
    }
    Ok(Phase { instances: n, stats, costs })
}

/// Scenario 8 (see the module's head).
pub async fn scenario(opts: &Opts, bin: &Path, dir: &Path) -> anyhow::Result<ScaleRun> {
    if opts.scale_redis != RedisMode::Auto {
        return scenario_on(opts, bin, dir, opts.scale_redis).await;
    }
    match scenario_on(opts, bin, dir, RedisMode::Cluster).await {
        Err(e) if e.to_string().contains(NO_STORE) => {
            println!("scenario 8: {e}; running it on one redis-server (REDIS_URL) instead");
            let mut run = scenario_on(opts, bin, dir, RedisMode::Single).await?;
            run.fallback = true;
            Ok(run)
        }
        other => other,
    }
}

/// What [`Instance::start`] says when the server does not use the Redis it was given.
const NO_STORE: &str = "the server does not use the Redis it was given";

async fn scenario_on(opts: &Opts, bin: &Path, dir: &Path, mode: RedisMode) -> anyhow::Result<ScaleRun> {
    eprintln!("running: 8. starting the scenario's Redis ({mode:?})");
    let redis = Redis::start(mode, dir).await?;
    let database = format!("lk_bench_{}_scale", std::process::id());
    create_database(&database).await?;
    let admin = sea_orm::Database::connect(format!("{}/postgres", pg_base())).await?;
    let result = async {
        let mut env = redis.env();
        env.push(("DATABASE_URL".to_owned(), format!("{}/{database}?sslmode=disable", pg_base())));
        env.push(("REDIS_KEY_PREFIX".to_owned(), "lkbench:".to_owned()));
        let mut instances = vec![Instance::start(bin, &env, dir).await?];
        let mut phases = Vec::new();
        let counters = Counters { instances: &instances, redis: &redis, admin: &admin, database: &database };
        phases.push(phase(opts, &counters, "one").await?);
        for _ in 0..2 {
            instances.push(Instance::start(bin, &env, dir).await?);
        }
        let counters = Counters { instances: &instances, redis: &redis, admin: &admin, database: &database };
        phases.push(phase(opts, &counters, "three").await?);
        for instance in instances {
            instance.server.stop();
        }
        Ok(ScaleRun { mode, fallback: false, phases })
    }
    .await;
    let _ = admin.close().await;
    drop_database(&database).await;
    drop(redis);
    result
}

impl ScaleRun {
    pub fn errors(&self) -> u64 {
        self.phases.iter().flat_map(|p| &p.stats).map(|s| s.errors).sum()
    }

    pub fn print(&self) {
        let redis = match (self.mode, self.fallback) {
            (RedisMode::Single, false) => "one redis-server",
            (RedisMode::Single, true) => "one redis-server (this server build reads no REDIS_CLUSTER_NODES)",
            _ => "a Redis Cluster of 3 masters + 3 replicas",
        };
        println!(
            "\n| scenario 8: instances sharing one PostgreSQL and {redis} | req/s | p50 ms | p99 ms | errors |"
        );
        println!("|---|---:|---:|---:|---:|");
        for s in self.phases.iter().flat_map(|p| &p.stats) {
            println!("| {} | {:.0} | {:.2} | {:.2} | {} |", s.name, s.rps(), s.p(0.50), s.p(0.99), s.errors);
        }
        if let [one, three] = &self.phases[..] {
            println!("\n| operation | 3 instances / 1 (req/s) |");
            println!("|---|---:|");
            for (a, b) in one.stats.iter().zip(&three.stats) {
                let ratio = if a.rps() > 0.0 { b.rps() / a.rps() } else { 0.0 };
                println!(
                    "| {} | {ratio:.2} |",
                    a.name.trim_start_matches("8. ").trim_end_matches(", 1 instance")
                );
            }
        }
        println!(
            "\n| cost per operation | instances | SQL statements | Redis store calls | Redis commands | server CPU ms | \
             Redis CPU ms | PostgreSQL CPU ms |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        for p in &self.phases {
            for c in &p.costs {
                println!(
                    "| {} | {} | {:.2} | {:.2} | {:.2} | {:.3} | {:.3} | {:.3} |",
                    c.operation,
                    p.instances,
                    c.sql,
                    c.store_calls,
                    c.commands,
                    c.server_cpu_ms,
                    c.redis_cpu_ms,
                    c.pg_cpu_ms
                );
            }
        }
        if let Some(last) = self.phases.last() {
            println!("\nRedis commands per operation, by name ({} instances):", last.instances);
            for c in &last.costs {
                let names: Vec<String> =
                    c.by_command.iter().map(|(name, n)| format!("{name} {n:.2}")).collect();
                println!("- {}: {}", c.operation, names.join(", "));
            }
        }
    }

    pub fn json(&self) -> Value {
        let phases: Vec<Value> = self
            .phases
            .iter()
            .map(|p| {
                json!({"instances": p.instances, "scenarios": p.stats.iter().map(Stats::json).collect::<Vec<_>>(),
                       "cost_per_operation": p.costs.iter().map(Cost::json).collect::<Vec<_>>()})
            })
            .collect();
        json!({"redis": format!("{:?}", self.mode).to_lowercase(), "cluster_unsupported_fallback": self.fallback,
               "phases": phases})
    }
}
