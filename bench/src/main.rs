//! `cargo run --release -p latchkey-bench`: Latchkey's benchmark.
//!
//! Builds and starts the release server as a separate process (PostgreSQL + Redis, and
//! again SQLite + the in-process store), seeds users, drives load over loopback from this
//! process with keep-alive HTTP/1.1 connections (hyper; latency in an HDR histogram; any
//! non-2xx counts as an error), and prints a table plus `target/bench/latest.json`.
//! Rate limits are raised through their variables: all load comes from one address.
//!
//! `--smoke` runs every scenario for a fraction of a second (CI); `--server PATH` uses a
//! server binary already built; `--seconds N` sets each scenario's length; `--limiter-only`
//! runs scenario 7 (the in-process limiter holding 200,000 keys) alone; `--scale-only` runs
//! scenario 8 (one, then three instances, and each operation's cost: see `scale.rs`) alone.
#![allow(clippy::print_stdout)]

mod scale;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt as _, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

const PASSWORD: &str = "correct horse battery staple";

/// Turns that scenarios 1 to 3 take, each for `--seconds / ROUNDS`; scenario 5 and the
/// argon2 bound take as many.
const ROUNDS: usize = 5;

/// Starts the release server against the local PostgreSQL and Redis, drives load over
/// loopback, and prints a table and target/bench/latest.json (see BENCHMARKS.md).
#[derive(clap::Parser)]
#[command(name = "latchkey-bench")]
struct Opts {
    /// Every scenario for a fraction of a second with 4 connections: checks that the bench
    /// runs and gets no errors; its figures mean nothing.
    #[arg(long)]
    smoke: bool,
    /// A server binary to run instead of building target/release/latchkey.
    #[arg(long, value_name = "PATH")]
    server: Option<PathBuf>,
    /// How long each scenario runs.
    #[arg(long, value_name = "N", default_value_t = 10.0)]
    seconds: f64,
    /// Keep-alive connections per scenario.
    #[arg(long = "connections", value_name = "N", default_value_t = 32)]
    conns: usize,
    /// Internal: be the process that hashes beside scenario 2 at this many hashes a second
    /// (scenario 6's reference), for `--seconds`, then exit.
    #[arg(long, value_name = "PER_SECOND", hide = true)]
    hash_beside: Option<f64>,
    /// Run only scenario 7: the in-process limiter with 200,000 keys offered (no PostgreSQL or
    /// Redis needed).
    #[arg(long)]
    limiter_only: bool,
    /// Run only scenario 8: one instance, then three sharing PostgreSQL and a Redis of the
    /// bench's own, and what each operation costs.
    #[arg(long)]
    scale_only: bool,
    /// Scenario 8's Redis: a Redis Cluster of 3 masters + 3 replicas (REDIS_CLUSTER_NODES),
    /// one redis-server (REDIS_URL), or auto: the cluster if the server reads
    /// REDIS_CLUSTER_NODES, else one redis-server (the output says which).
    #[arg(long, value_enum, default_value = "auto")]
    scale_redis: scale::RedisMode,
}

fn parse_opts() -> Opts {
    let mut opts = <Opts as clap::Parser>::parse();
    if opts.smoke {
        opts.seconds = 0.25;
        opts.conns = 4;
    }
    opts
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A server process of ours.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn spawn(bin: &Path, env: &[(String, String)], dir: &Path) -> anyhow::Result<Self> {
        let port = free_port()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let mut cmd = Command::new(bin);
        cmd.current_dir(dir)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("LISTEN_ADDR", addr.to_string())
            .env("METRICS_ADDR", "off")
            .env("RUST_LOG", "warn")
            .env("RATE_LIMIT_LOGIN_PER_IP", "100000000/1s")
            .env("RATE_LIMIT_LOGIN_PER_ACCOUNT", "100000000/1s")
            .env("RATE_LIMIT_REGISTER_PER_IP", "100000000/1s")
            .env("RATE_LIMIT_REFRESH_PER_IP", "100000000/1s")
            .env("PASSWORD_HASH_QUEUE", "4096")
            // The token paths are measured: sign-up without a verification mail (and its
            // answer floor), as before email verification existed.
            .env("EMAIL_VERIFICATION", "off")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        // Allocator knobs pass through, so their effect can be measured.
        for (k, v) in std::env::vars().filter(|(k, _)| k.starts_with("MIMALLOC_")) {
            cmd.env(k, v);
        }
        Ok(Self { child: cmd.spawn().context("starting the server")?, addr })
    }

    /// Polls `/ready` until 200; returns how long that took from `since`.
    async fn wait_ready(&self, since: Instant) -> anyhow::Result<Duration> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(resp) = request(self.addr, "GET", "/ready", None, None).await
                && resp.0 == 200
            {
                return Ok(since.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        bail!("the server did not become ready")
    }

    /// (current RSS, peak RSS) in KiB, from /proc.
    fn rss_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    fn stop(mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

/// A server left running by an error is killed.
impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One request on a fresh connection (setup only, not measured).
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<Value>,
) -> anyhow::Result<(u16, Value)> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = build(method, path, bearer, body.map(|b| Bytes::from(b.to_string())))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await?.to_bytes();
    Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
}

fn build(
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<Bytes>,
) -> anyhow::Result<Request<Full<Bytes>>> {
    let mut req = Request::builder().method(method).uri(path).header("host", "127.0.0.1");
    if let Some(token) = bearer {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    Ok(req.body(Full::new(body.unwrap_or_default()))?)
}

/// What each connection of a scenario sends.
#[derive(Clone)]
enum Work {
    Get {
        path: &'static str,
        tokens: Arc<Vec<String>>,
    },
    /// Each connection rotates its own chain of refresh tokens.
    Refresh {
        tokens: Arc<Vec<String>>,
    },
    Login {
        emails: Arc<Vec<String>>,
    },
}

#[derive(Debug)]
struct Stats {
    name: String,
    requests: u64,
    errors: u64,
    elapsed: Duration,
    hist: Histogram<u64>,
}

impl Stats {
    /// Adds a round of a scenario to its total so far, if any.
    fn add(total: &mut Option<Stats>, round: Stats) -> anyhow::Result<()> {
        match total {
            Some(total) => {
                total.requests += round.requests;
                total.errors += round.errors;
                total.elapsed += round.elapsed;
                total.hist.add(round.hist)?;
            }
            None => *total = Some(round),
        }
        Ok(())
    }

    fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    fn p(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }

    fn json(&self) -> Value {
        json!({"scenario": self.name, "requests": self.requests, "errors": self.errors, "req_per_s": self.rps(),
               "p50_ms": self.p(0.50), "p99_ms": self.p(0.99), "max_ms": self.hist.max() as f64 / 1000.0})
    }
}

/// Keeps `conns` keep-alive connections busy for `secs`, one request at a time each.
async fn drive(name: &str, addr: SocketAddr, conns: usize, secs: f64, work: Work) -> anyhow::Result<Stats> {
    drive_on(name, &[addr], conns, secs, work).await
}

/// [`drive`] spread over several servers: connection `c` talks to `addrs[c % addrs.len()]`.
async fn drive_on(
    name: &str,
    addrs: &[SocketAddr],
    conns: usize,
    secs: f64,
    work: Work,
) -> anyhow::Result<Stats> {
    eprintln!("running: {name}");
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..conns {
        let (stop, work) = (Arc::clone(&stop), work.clone());
        let addr = addrs[c % addrs.len()];
        tasks.push(tokio::spawn(async move { connection(addr, c, conns, work, stop).await }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut stats = Stats {
        name: name.to_owned(),
        requests: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        hist: Histogram::new_with_bounds(1, 60_000_000, 3)?,
    };
    for t in tasks {
        let (n, e, h) = t.await??;
        stats.requests += n;
        stats.errors += e;
        stats.hist.add(h)?;
    }
    stats.elapsed = started.elapsed();
    Ok(stats)
}

async fn connection(
    addr: SocketAddr,
    c: usize,
    conns: usize,
    work: Work,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<(u64, u64, Histogram<u64>)> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut n, mut errors) = (0u64, 0u64);
    let mut refresh = match &work {
        Work::Refresh { tokens } => tokens.get(c).cloned(),
        _ => None,
    };
    let mut seq = c;
    'reconnect: while !stop.load(Ordering::Relaxed) {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        while !stop.load(Ordering::Relaxed) {
            let req = match &work {
                Work::Get { path, tokens } => {
                    let token = (!tokens.is_empty()).then(|| tokens[seq % tokens.len()].as_str());
                    build("GET", path, token, None)?
                }
                Work::Refresh { .. } => {
                    let Some(token) = refresh.as_deref() else { return Ok((n, errors, hist)) };
                    build(
                        "POST",
                        "/v1/auth/refresh",
                        None,
                        Some(Bytes::from(json!({"refresh_token": token}).to_string())),
                    )?
                }
                Work::Login { emails } => {
                    let body = json!({"email": emails[seq % emails.len()], "password": PASSWORD}).to_string();
                    build("POST", "/v1/auth/login", None, Some(Bytes::from(body)))?
                }
            };
            seq += conns;
            let t0 = Instant::now();
            let resp = match sender.send_request(req).await {
                Ok(resp) => resp,
                Err(_) => {
                    errors += 1;
                    continue 'reconnect;
                }
            };
            let ok = resp.status().is_success();
            let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            hist.record(u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX).max(1))?;
            n += 1;
            if !ok {
                errors += 1;
            }
            if let Work::Refresh { .. } = work
                && ok
            {
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                refresh = v["refresh_token"].as_str().map(str::to_owned);
            }
        }
    }
    Ok((n, errors, hist))
}

/// The argon2 bound: argon2id hashes on all cores in about `secs`, with the server's own
/// parameters and hashing code (working memory kept between hashes), one thread per core;
/// returns the hashes and the time they took.
fn argon2_bound(secs: f64) -> (u64, Duration) {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let threads: Vec<_> = (0..cores)
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || -> u64 {
                let Ok(mut hasher) = latchkey::password::Hasher::new() else { return 0 };
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    if hasher.hash(PASSWORD.as_bytes()).is_ok() {
                        n += 1;
                    }
                }
                n
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    let total: u64 = threads.into_iter().map(|t| t.join().unwrap_or(0)).sum();
    (total, started.elapsed())
}

/// Scenario 6's reference, run as a process of its own: the storm's argon2 work without the
/// server. One thread per core at the lowest priority (as the server's hashing threads),
/// with the server's hashing code, paced to `per_second` hashes in all, for `secs`.
fn hash_beside(per_second: f64, secs: f64) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let interval = Duration::from_secs_f64(cores as f64 / per_second.max(0.1));
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let threads: Vec<_> = (0..cores)
        .map(|_| {
            std::thread::spawn(move || {
                let _ = thread_priority::set_current_thread_priority(thread_priority::ThreadPriority::Min);
                let Ok(mut hasher) = latchkey::password::Hasher::new() else { return };
                let mut next = Instant::now();
                while next < until {
                    let _ = hasher.hash(PASSWORD.as_bytes());
                    next += interval;
                    std::thread::sleep(next.min(until).saturating_duration_since(Instant::now()));
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// Starts [`hash_beside`] in a child process of this binary.
fn spawn_hash_beside(per_second: f64, secs: f64) -> anyhow::Result<Child> {
    Command::new(std::env::current_exe()?)
        .args(["--hash-beside", &per_second.to_string(), "--seconds", &secs.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .context("starting the reference hashing process")
}

/// Scenario 7's load: logins from new clients, one address each (`X-Forwarded-For` through
/// a trusted proxy), so each request makes the in-process limiter store a key it has never
/// seen. The email is malformed: the answer (401) costs no hashing and no SQL read, only the
/// limiter's work and an audit event.
async fn new_client_connection(
    addr: SocketAddr,
    next: Arc<AtomicU64>,
    end: u64,
) -> anyhow::Result<(u64, u64, Histogram<u64>)> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut n, mut errors) = (0u64, 0u64);
    let body = Bytes::from(json!({"email": "not an email", "password": PASSWORD}).to_string());
    'reconnect: loop {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= end {
                return Ok((n, errors, hist));
            }
            let mut req = build("POST", "/v1/auth/login", None, Some(body.clone()))?;
            let client = format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255);
            req.headers_mut().insert("x-forwarded-for", client.parse()?);
            let t0 = Instant::now();
            let resp = match sender.send_request(req).await {
                Ok(resp) => resp,
                Err(_) => {
                    errors += 1;
                    continue 'reconnect;
                }
            };
            let status = resp.status().as_u16();
            let _ = resp.into_body().collect().await;
            hist.record(u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX).max(1))?;
            n += 1;
            // 401: answered like a wrong password. Anything else (a 429 from a full table
            // included) is an error here: this load never fills the table with cool-downs.
            if status != 401 {
                errors += 1;
            }
        }
    }
}

/// `count` logins from new clients `from..from + count` over `conns` connections, with
/// `GET /health` on two more connections beside them: (new clients, health).
async fn new_clients(
    name: &str,
    addr: SocketAddr,
    conns: usize,
    from: u64,
    count: u64,
) -> anyhow::Result<(Stats, Stats)> {
    eprintln!("running: {name}");
    let next = Arc::new(AtomicU64::new(from));
    let stop = Arc::new(AtomicBool::new(false));
    let health_conns = 2;
    let health: Vec<_> = (0..health_conns)
        .map(|c| {
            let work = Work::Get { path: "/health", tokens: Arc::new(Vec::new()) };
            tokio::spawn(connection(addr, c, health_conns, work, Arc::clone(&stop)))
        })
        .collect();
    let started = Instant::now();
    let flood: Vec<_> = (0..conns)
        .map(|_| tokio::spawn(new_client_connection(addr, Arc::clone(&next), from + count)))
        .collect();
    let mut clients = Stats {
        name: name.to_owned(),
        requests: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        hist: Histogram::new_with_bounds(1, 60_000_000, 3)?,
    };
    for t in flood {
        let (n, e, h) = t.await??;
        clients.requests += n;
        clients.errors += e;
        clients.hist.add(h)?;
    }
    clients.elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut beside = Stats {
        name: format!("{name}: GET /health beside"),
        requests: 0,
        errors: 0,
        elapsed: clients.elapsed,
        hist: Histogram::new_with_bounds(1, 60_000_000, 3)?,
    };
    for t in health {
        let (n, e, h) = t.await??;
        beside.requests += n;
        beside.errors += e;
        beside.hist.add(h)?;
    }
    Ok((clients, beside))
}

/// Scenario 7's figures.
struct LimiterRun {
    empty: Stats,
    empty_health: Stats,
    fill: Stats,
    full: Stats,
    full_health: Stats,
    rss_after_kib: u64,
    /// 7c: the limiter alone, in this process: (empty, full) for takes, then for failures.
    alone: [(Takes, Takes); 2],
}

/// New-key takes timed one by one (nanoseconds).
struct Takes {
    count: u64,
    elapsed: Duration,
    hist: Histogram<u64>,
}

impl Takes {
    fn per_second(&self) -> f64 {
        self.count as f64 / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    fn json(&self) -> Value {
        json!({"takes": self.count, "per_s": self.per_second(), "p50_us": self.hist.value_at_quantile(0.5) as f64 / 1000.0,
               "p99_us": self.hist.value_at_quantile(0.99) as f64 / 1000.0, "max_us": self.hist.max() as f64 / 1000.0})
    }
}

/// What 7c asks of the limiter for each new key.
#[derive(Clone, Copy)]
enum LimiterOp {
    /// A token from a new client's bucket (30 an hour: it stays in use).
    Take,
    /// A failed login of a new account (one failure: remembered, not cooling down).
    Fail,
}

/// 7c: the server's in-process limiter without HTTP: `op` for `count` new keys from `from`,
/// each timed, at the given clock time.
async fn timed_ops(
    limits: &latchkey::store::limits::MemoryLimits,
    op: LimiterOp,
    from: u64,
    count: u64,
    now_ms: i64,
) -> anyhow::Result<Takes> {
    use latchkey::store::limits::LimitStore as _;
    let rate = latchkey::config::Rate { capacity: 30, period: Duration::from_secs(3600) };
    let policy = latchkey::rate_limit::CooldownPolicy { threshold: 5, base_ms: 1_000, max_ms: 300_000 };
    let keys: Vec<String> = (from..from + count)
        .map(|i| format!("10.{}.{}.{}@example.com", (i >> 16) & 255, (i >> 8) & 255, i & 255))
        .collect();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let started = Instant::now();
    for key in &keys {
        let t0 = Instant::now();
        match op {
            LimiterOp::Take => limits.take(key, rate, now_ms).await.map(drop)?,
            LimiterOp::Fail => limits.record_failure(key, policy, now_ms).await?,
        }
        hist.record(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX).max(1))?;
    }
    Ok(Takes { count, elapsed: started.elapsed(), hist })
}

/// 7c: for buckets and for failure records, an empty table's new keys, then `offered` keys
/// in all, then a full table's new keys: [(empty, full) takes, (empty, full) failures].
async fn limiter_alone(first: u64, offered: u64, last: u64) -> anyhow::Result<[(Takes, Takes); 2]> {
    let mut out = Vec::new();
    for op in [LimiterOp::Take, LimiterOp::Fail] {
        eprintln!("running: 7c. the limiter alone");
        let limits = latchkey::store::limits::MemoryLimits::default();
        let empty = timed_ops(&limits, op, 0, first, 0).await?;
        timed_ops(&limits, op, first, offered - first, 1).await?;
        let full = timed_ops(&limits, op, offered, last, 2).await?;
        out.push((empty, full));
    }
    let [takes, failures]: [(Takes, Takes); 2] = out.try_into().map_err(|_| anyhow::anyhow!("two runs"))?;
    Ok([takes, failures])
}

/// Scenario 7: the in-process limiter (SQLite, no Redis) offered 200,000 keys, which is
/// past its bound (100,000 buckets), so every new key after that makes room. New clients'
/// throughput and `/health`'s p99 beside them: with an empty table, while it fills, and
/// with it full. The per-address login budget is a real one (30 an hour), so the buckets
/// stay in use (not idle) and each new key evicts a bucket in use.
async fn limiter_scenario(opts: &Opts, bin: &Path, dir: &Path) -> anyhow::Result<LimiterRun> {
    let (first, offered, last) = if opts.smoke { (500, 2_000, 500) } else { (20_000, 200_000, 20_000) };
    let db = dir.join("limiter.db");
    let env = vec![
        ("DATABASE_URL".to_owned(), format!("sqlite://{}?mode=rwc", db.display())),
        ("TRUSTED_PROXIES".to_owned(), "127.0.0.1".to_owned()),
        ("RATE_LIMIT_LOGIN_PER_IP".to_owned(), "30/1h".to_owned()),
        ("LOGIN_COOLDOWN_THRESHOLD".to_owned(), "1000000000".to_owned()),
        // A full audit queue logs each event it drops: not this scenario's subject.
        ("RUST_LOG".to_owned(), "error".to_owned()),
    ];
    let server = Server::spawn(bin, &env, dir)?;
    server.wait_ready(Instant::now()).await?;
    let addr = server.addr;
    let conns = opts.conns;
    let (empty, empty_health) = new_clients("7a. new clients, empty limiter", addr, conns, 0, first).await?;
    let (fill, _) = new_clients("7. filling the limiter", addr, conns, first, offered - first).await?;
    let name = format!("7b. new clients, limiter full ({offered} keys offered)");
    let (full, full_health) = new_clients(&name, addr, conns, offered, last).await?;
    let (rss_after_kib, _) = server.rss_kib();
    server.stop();
    let _ = std::fs::remove_file(&db);
    let alone = limiter_alone(first, offered, last).await?;
    Ok(LimiterRun { empty, empty_health, fill, full, full_health, rss_after_kib, alone })
}

impl LimiterRun {
    fn all(&self) -> [&Stats; 5] {
        [&self.empty, &self.empty_health, &self.fill, &self.full, &self.full_health]
    }

    fn print(&self) {
        println!("\n| scenario 7: in-process limiter | req/s | p50 ms | p99 ms | max ms | errors |");
        println!("|---|---:|---:|---:|---:|---:|");
        for s in self.all() {
            println!(
                "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {} |",
                s.name,
                s.rps(),
                s.p(0.50),
                s.p(0.99),
                s.hist.max() as f64 / 1000.0,
                s.errors
            );
        }
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        println!(
            "new clients, full / empty: {:.2} × the throughput; /health p99 beside them {:.2} ms (empty) and {:.2} \
             ms (full); server RSS after {:.1} MiB",
            ratio(self.full.rps(), self.empty.rps()),
            self.empty_health.p(0.99),
            self.full_health.p(0.99),
            self.rss_after_kib as f64 / 1024.0
        );
        let us = |t: &Takes, q: f64| t.hist.value_at_quantile(q) as f64 / 1000.0;
        for ((empty, full), what) in
            self.alone.iter().zip(["take of a new key", "record_failure of a new account"])
        {
            println!(
                "7c. the limiter alone (MemoryLimits::{what}, this process): empty {:.0}/s (p99 {:.1} µs, max \
                 {:.1} µs), full {:.0}/s (p99 {:.1} µs, max {:.1} µs)",
                empty.per_second(),
                us(empty, 0.99),
                empty.hist.max() as f64 / 1000.0,
                full.per_second(),
                us(full, 0.99),
                full.hist.max() as f64 / 1000.0
            );
        }
    }

    fn json(&self) -> Value {
        json!({"scenarios": self.all().map(Stats::json), "rss_after_kib": self.rss_after_kib,
               "alone_takes": [self.alone[0].0.json(), self.alone[0].1.json()],
               "alone_failures": [self.alone[1].0.json(), self.alone[1].1.json()]})
    }

    fn errors(&self) -> u64 {
        self.all().iter().map(|s| s.errors).sum()
    }
}

struct Seeded {
    emails: Arc<Vec<String>>,
    access: Arc<Vec<String>>,
    refresh: Arc<Vec<String>>,
}

async fn seed(addr: SocketAddr, users: usize, tag: &str) -> anyhow::Result<Seeded> {
    let (mut emails, mut access, mut refresh) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..users {
        let email = format!("bench-{tag}-{i}@example.com");
        let (status, _) = request(
            addr,
            "POST",
            "/v1/auth/register",
            None,
            Some(json!({"email": email, "password": PASSWORD})),
        )
        .await?;
        if status != 201 && status != 202 {
            bail!("seeding: register answered {status}");
        }
        let (status, tokens) = request(
            addr,
            "POST",
            "/v1/auth/login",
            None,
            Some(json!({"email": email, "password": PASSWORD})),
        )
        .await?;
        if status != 200 {
            bail!("seeding: login answered {status}");
        }
        access.push(tokens["access_token"].as_str().unwrap_or_default().to_owned());
        refresh.push(tokens["refresh_token"].as_str().unwrap_or_default().to_owned());
        emails.push(email);
    }
    Ok(Seeded { emails: Arc::new(emails), access: Arc::new(access), refresh: Arc::new(refresh) })
}

fn server_binary(opts: &Opts) -> anyhow::Result<PathBuf> {
    if let Some(path) = &opts.server {
        return std::fs::canonicalize(path).with_context(|| format!("--server {}", path.display()));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("workspace root")?.to_path_buf();
    println!("building the release server (cargo build --release --bin latchkey) …");
    let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cargo.args(["build", "--release", "--quiet", "-p", "latchkey", "--bin", "latchkey"]).current_dir(&root);
    // Not the variables `cargo run` set for this package: build scripts that watch them
    // (ring's watches CARGO_MANIFEST_DIR) would rebuild half the tree on every run.
    for (key, _) in std::env::vars() {
        if ["CARGO_MANIFEST_", "CARGO_PKG_", "CARGO_CRATE_", "CARGO_BIN_", "CARGO_PRIMARY_PACKAGE"]
            .iter()
            .any(|prefix| key.starts_with(prefix))
        {
            cargo.env_remove(key);
        }
    }
    let status = cargo.status()?;
    if !status.success() {
        bail!("building the server failed");
    }
    Ok(root.join("target/release/latchkey"))
}

async fn create_database(name: &str) -> anyhow::Result<()> {
    use sea_orm::ConnectionTrait as _;
    let admin = sea_orm::Database::connect(format!("{}/postgres", pg_base())).await?;
    admin.execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).await?;
    admin.execute_unprepared(&format!("CREATE DATABASE \"{name}\"")).await?;
    admin.close().await?;
    Ok(())
}

async fn drop_database(name: &str) {
    use sea_orm::ConnectionTrait as _;
    if let Ok(admin) = sea_orm::Database::connect(format!("{}/postgres", pg_base())).await {
        let _ = admin.execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).await;
        let _ = admin.close().await;
    }
}

/// Leaves the shared Redis as it found it.
async fn delete_redis_keys(pattern: &str) {
    let url = std::env::var("BENCH_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let Ok(client) = redis::Client::open(url) else { return };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else { return };
    let mut cursor: u64 = 0;
    loop {
        let Ok((next, keys)): Result<(u64, Vec<String>), _> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
        else {
            return;
        };
        if !keys.is_empty() {
            let _: Result<(), _> = redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

fn pg_base() -> String {
    std::env::var("BENCH_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let opts = parse_opts();
    if let Some(per_second) = opts.hash_beside {
        return hash_beside(per_second, opts.seconds);
    }
    let bin = server_binary(&opts)?;
    let dir = std::env::temp_dir().join(format!("latchkey-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    if opts.limiter_only {
        let result = limiter_scenario(&opts, &bin, &dir).await;
        let _ = std::fs::remove_dir_all(&dir);
        let run = result?;
        run.print();
        let errors = run.errors();
        if errors > 0 {
            bail!("{errors} requests failed");
        }
        return Ok(());
    }
    if opts.scale_only {
        let result = scale::scenario(&opts, &bin, &dir).await;
        let _ = std::fs::remove_dir_all(&dir);
        let run = result?;
        run.print();
        write_json(
            &json!({"when": chrono::Utc::now().to_rfc3339(), "smoke": opts.smoke, "connections": opts.conns,
                           "seconds_per_scenario": opts.seconds, "scale": run.json()}),
        )?;
        let errors = run.errors();
        if errors > 0 {
            bail!("{errors} requests failed");
        }
        return Ok(());
    }
    let db_name = format!("lk_bench_{}", std::process::id());
    create_database(&db_name).await?;
    let result = run(&opts, &bin, &dir, &db_name).await;
    drop_database(&db_name).await;
    delete_redis_keys(&format!("lkbench:{}:*", std::process::id())).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Writes target/bench/latest.json; returns its path.
fn write_json(out: &Value) -> anyhow::Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("workspace root")?;
    let path = root.join("target/bench/latest.json");
    std::fs::create_dir_all(path.parent().context("dir")?)?;
    std::fs::write(&path, serde_json::to_string_pretty(out)?)?;
    Ok(path)
}

async fn run(opts: &Opts, bin: &Path, dir: &Path, db_name: &str) -> anyhow::Result<()> {
    let secs = opts.seconds;
    let conns = opts.conns;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    println!(
        "latchkey-bench: {cores} cores, {conns} keep-alive connections, {secs} s per scenario. All load comes from \
         127.0.0.1, so the rate limits are raised through RATE_LIMIT_* for this run."
    );
    let redis_env = vec![
        // Loopback: TLS would only add rustls' root-store load and a handshake (~90 ms)
        // to every new connection, start-up included.
        ("DATABASE_URL".to_owned(), format!("{}/{db_name}?sslmode=disable", pg_base())),
        (
            "REDIS_URL".to_owned(),
            std::env::var("BENCH_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
        ),
        ("REDIS_KEY_PREFIX".to_owned(), format!("lkbench:{}:", std::process::id())),
    ];

    // Start once to apply migrations, then measure a start with them already applied.
    let first = Server::spawn(bin, &redis_env, dir)?;
    first.wait_ready(Instant::now()).await?;
    first.stop();
    let started = Instant::now();
    let server = Server::spawn(bin, &redis_env, dir)?;
    let start_to_ready = server.wait_ready(started).await?;
    let addr = server.addr;

    // Idle: start plus one login (a registration and a login: two hashes), then quiet.
    // 200 ms after, the hashing thread still holds its argon2 block; it leaves after
    // 2 s without work (latchkey::password::IDLE_WORKER_EXIT), and the block with it.
    seed(addr, 1, "idle").await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (after_login_rss, _) = server.rss_kib();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (idle_rss, _) = server.rss_kib();

    let users = conns.max(8) * 2;
    let seeded = seed(addr, users, "pg").await?;

    let mut results = Vec::new();
    let none = Arc::new(Vec::new());
    // Scenarios 1 to 3 are compared with each other, so they take turns in short rounds:
    // this machine slows down and speeds up in phases of a few seconds, which would otherwise
    // land on one scenario and not the others.
    let rounds = if opts.smoke { 1 } else { ROUNDS };
    let turn = secs / rounds as f64;
    let compared = [
        ("1. GET /health", "/health", Arc::clone(&none)),
        ("2. GET /v1/auth/session (Redis)", "/v1/auth/session", Arc::clone(&seeded.access)),
        ("3. GET /v1/users/me", "/v1/users/me", Arc::clone(&seeded.access)),
    ];
    let mut totals: [Option<Stats>; 3] = [None, None, None];
    for _ in 0..rounds {
        for ((name, path, tokens), total) in compared.iter().zip(&mut totals) {
            let part = drive(name, addr, conns, turn, Work::Get { path, tokens: Arc::clone(tokens) }).await?;
            Stats::add(total, part)?;
        }
    }
    let [Some(health), Some(session), Some(me)] = totals else { bail!("no rounds ran") };
    let refresh = drive(
        "4. POST /v1/auth/refresh",
        addr,
        conns,
        secs,
        Work::Refresh { tokens: Arc::clone(&seeded.refresh) },
    )
    .await?;
    // 5 and the argon2 bound it is compared with take turns as well.
    let mut login: Option<Stats> = None;
    let (mut hashes, mut hashing) = (0, Duration::ZERO);
    for _ in 0..rounds {
        let login_turn = Work::Login { emails: Arc::clone(&seeded.emails) };
        Stats::add(&mut login, drive("5. POST /v1/auth/login", addr, conns, turn, login_turn).await?)?;
        let (n, took) = argon2_bound(turn.min(1.0));
        hashes += n;
        hashing += took;
    }
    let Some(login) = login else { bail!("no rounds ran") };
    let bound = hashes as f64 / hashing.as_secs_f64().max(f64::MIN_POSITIVE);

    // 6: a login storm at full argon2 capacity while scenario 2 runs.
    let fresh = seed(addr, conns.max(8), "mix").await?;
    let storm_emails = Arc::clone(&fresh.emails);
    let storm = tokio::spawn(async move {
        drive("6. login storm", addr, (cores * 4).max(4), secs + 1.0, Work::Login { emails: storm_emails })
            .await
    });
    let checks = Work::Get { path: "/v1/auth/session", tokens: Arc::clone(&fresh.access) };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let under_storm =
        drive("6. GET /v1/auth/session under a login storm", addr, conns, secs, checks.clone()).await?;
    let storm = storm.await??;
    let (_, peak_rss) = server.rss_kib();

    // 6's reference: scenario 2 again beside the same argon2 work at the storm's rate, done
    // by another process at the same priority: what that much hashing costs the checks'
    // tail on this machine when the server itself does no login work.
    let mut beside = spawn_hash_beside(storm.rps(), secs + 1.0)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let under_hashing =
        drive("6b. GET /v1/auth/session beside that hashing in another process", addr, conns, secs, checks)
            .await?;
    let _ = beside.wait();
    server.stop();

    // 2 again, with SQLite and the in-process store.
    let sqlite_env =
        vec![("DATABASE_URL".to_owned(), format!("sqlite://{}?mode=rwc", dir.join("bench.db").display()))];
    let local = Server::spawn(bin, &sqlite_env, dir)?;
    local.wait_ready(Instant::now()).await?;
    let local_seeded = seed(local.addr, conns.max(8), "local").await?;
    let local_session = drive(
        "2b. GET /v1/auth/session (in-process store)",
        local.addr,
        conns,
        secs,
        Work::Get { path: "/v1/auth/session", tokens: Arc::clone(&local_seeded.access) },
    )
    .await?;
    local.stop();

    // 7: the in-process limiter holding 200,000 keys.
    let limiter = limiter_scenario(opts, bin, dir).await?;
    // 8: one instance, then three, and what each operation costs.
    let scale = scale::scenario(opts, bin, dir).await?;

    let all =
        [&health, &session, &local_session, &me, &refresh, &login, &storm, &under_storm, &under_hashing];
    for s in all {
        results.push(s.json());
    }

    println!("\n| scenario | req/s | p50 ms | p99 ms | errors |");
    println!("|---|---:|---:|---:|---:|");
    for s in all {
        println!("| {} | {:.0} | {:.2} | {:.2} | {} |", s.name, s.rps(), s.p(0.50), s.p(0.99), s.errors);
    }
    println!("| argon2id bound ({cores} threads, m=19456 t=2 p=1) | {bound:.1} hashes/s | | | |");
    limiter.print();
    scale.print();

    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let targets = [
        ("session (Redis) / health >= 0.60", ratio(session.rps(), health.rps()), 0.60, true),
        ("me / health >= 0.35", ratio(me.rps(), health.rps()), 0.35, true),
        ("login / argon2 bound >= 0.90", ratio(login.rps(), bound), 0.90, true),
        (
            "session p99 under storm / idle p99 <= 2.0",
            ratio(under_storm.p(0.99), session.p(0.99)),
            2.0,
            false,
        ),
        ("idle RSS MiB (3 s after one login) <= 40", idle_rss as f64 / 1024.0, 40.0, false),
        ("peak RSS MiB <= 150", peak_rss as f64 / 1024.0, 150.0, false),
        ("start to ready ms <= 300", start_to_ready.as_secs_f64() * 1000.0, 300.0, false),
    ];
    println!("\n| target | measured | met |");
    println!("|---|---:|---|");
    let mut target_json = Vec::new();
    for (name, value, limit, at_least) in targets {
        let met = if at_least { value >= limit } else { value <= limit };
        println!("| {name} | {value:.2} | {} |", if met { "yes" } else { "no" });
        target_json.push(json!({"target": name, "measured": value, "met": met}));
    }
    let reference = ratio(under_hashing.p(0.99), session.p(0.99));
    println!(
        "\nFor scenario 6, a reference: the same checks beside the storm's hashing ({:.0} hashes/s) done by \
         another process, p99 / idle p99 = {reference:.2}.",
        storm.rps()
    );
    let errors: u64 = all.iter().map(|s| s.errors).sum::<u64>() + limiter.errors() + scale.errors();

    let out = json!({
        "when": chrono::Utc::now().to_rfc3339(),
        "cores": cores,
        "connections": conns,
        "seconds_per_scenario": secs,
        "smoke": opts.smoke,
        "scenarios": results,
        "argon2_hashes_per_s": bound,
        "idle_rss_kib": idle_rss,
        "rss_200ms_after_login_kib": after_login_rss,
        "peak_rss_kib": peak_rss,
        "start_to_ready_ms": start_to_ready.as_secs_f64() * 1000.0,
        "targets": target_json,
        "session_p99_beside_hashing_elsewhere_over_idle": reference,
        "limiter": limiter.json(),
        "scale": scale.json(),
        "errors": errors,
    });
    let path = write_json(&out)?;
    println!(
        "\nidle RSS {:.1} MiB ({:.1} MiB 200 ms after the login), peak RSS {:.1} MiB, start to ready {:.0} \
         ms; JSON: {}",
        idle_rss as f64 / 1024.0,
        after_login_rss as f64 / 1024.0,
        peak_rss as f64 / 1024.0,
        start_to_ready.as_secs_f64() * 1000.0,
        path.display()
    );
    if errors > 0 {
        bail!("{errors} requests failed (non-2xx or connection errors)");
    }
    Ok(())
}
