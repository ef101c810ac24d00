//! Redis Cluster and Redis behind Sentinel, on real engines the tests start (free ports,
//! temp dirs, killed on drop): the whole flow, the limiter, and the two guarantees across a
//! failover — no session that was live is lost, no session that was logged out comes back
//! — with the server following the new master by itself.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt as _;
use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{
    Backend, PASSWORD, Resources, Store, TestApp, Tokens, assert_problem, eventually, free_port,
};

/// Short enough that a failover takes a second or two.
const NODE_TIMEOUT_MS: u64 = 1000;

/// A `redis-server` process of the test's own.
struct Node {
    port: u16,
    args: Vec<String>,
    child: Option<Child>,
}

impl Node {
    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (is it installed?)");
        self.child = Some(child);
    }

    async fn start(&mut self) {
        self.spawn();
        wait_for_port(self.port).await;
    }

    /// SIGKILL: no shutdown, no last flush to the replicas.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let status = Command::new("kill").arg(signal).arg(child.id().to_string()).status().expect("kill");
            assert!(status.success(), "kill {signal}");
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.signal("-CONT");
        self.kill();
    }
}

async fn wait_for_port(port: u16) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("redis did not start on port {port}");
}

/// A port that is free, and whose neighbour 10000 above (Redis Cluster's default bus port)
/// does not matter: the bus port is set explicitly.
fn ports(n: usize) -> Vec<u16> {
    let mut ports = Vec::new();
    while ports.len() < n {
        let p = free_port();
        if !ports.contains(&p) {
            ports.push(p);
        }
    }
    ports
}

async fn query(addr: &str, cmd: &mut redis::Cmd) -> redis::RedisResult<redis::Value> {
    let client = redis::Client::open(format!("redis://{addr}"))?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(2)));
    let mut conn = client.get_multiplexed_async_connection_with_config(&config).await?;
    cmd.query_async(&mut conn).await
}

async fn text(addr: &str, cmd: &mut redis::Cmd) -> String {
    match query(addr, cmd).await {
        Ok(v) => redis::from_redis_value::<String>(v).unwrap_or_default(),
        Err(_) => String::new(),
    }
}

fn common_args(port: u16, dir: &Path) -> Vec<String> {
    [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        &dir.display().to_string(),
        "--repl-diskless-sync",
        "yes",
        "--repl-diskless-sync-delay",
        "0",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect()
}

/// 3 masters, 3 replicas.
struct Cluster {
    nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn reserve() -> Self {
        let dir = tempfile::Builder::new().prefix("lk-cluster-").tempdir().expect("tempdir");
        let all = ports(12);
        let nodes = (0..6)
            .map(|i| {
                let (port, bus) = (all[i], all[i + 6]);
                let mut args = common_args(port, dir.path());
                args.extend(
                    [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        &dir.path().join(format!("nodes-{port}.conf")).display().to_string(),
                        "--cluster-node-timeout",
                        &NODE_TIMEOUT_MS.to_string(),
                        "--cluster-port",
                        &bus.to_string(),
                        // A replica may always take over, however long it was cut off.
                        "--cluster-replica-validity-factor",
                        "0",
                    ]
                    .map(str::to_owned),
                );
                Node { port, args, child: None }
            })
            .collect();
        Self { nodes, _dir: dir }
    }

    fn seeds(&self) -> String {
        self.nodes.iter().map(Node::addr).collect::<Vec<_>>().join(",")
    }

    async fn start(&mut self) {
        for node in &mut self.nodes {
            node.spawn();
        }
        for node in &self.nodes {
            wait_for_port(node.port).await;
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &self.nodes {
            create.arg(node.addr());
        }
        let out = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli --cluster create");
        assert!(out.status.success(), "cluster create: {}", String::from_utf8_lossy(&out.stdout));
        self.wait_healthy().await;
    }

    /// Every running node says `cluster_state:ok`, and every master has a replica in sync.
    async fn wait_healthy(&self) {
        let ok = eventually(Duration::from_secs(30), || async {
            let mut masters_with_replica = 0;
            for node in self.nodes.iter().filter(|n| n.child.is_some()) {
                let info = text(&node.addr(), redis::cmd("CLUSTER").arg("INFO")).await;
                if !info.contains("cluster_state:ok") {
                    return false;
                }
                let repl = text(&node.addr(), redis::cmd("INFO").arg("replication")).await;
                if repl.contains("role:master") && repl.contains("slave0:") && repl.contains("state=online") {
                    masters_with_replica += 1;
                }
            }
            masters_with_replica == 3
        })
        .await;
        assert!(ok, "the cluster did not become healthy");
    }

    /// The master serving `slot`: (its node index, its replica's index, its slot ranges).
    async fn pair_for_slot(&self, slot: u16) -> (usize, usize, Vec<(u16, u16)>) {
        let running = self.nodes.iter().find(|n| n.child.is_some()).expect("a running node");
        let nodes = text(&running.addr(), redis::cmd("CLUSTER").arg("NODES")).await;
        let lines: Vec<Vec<&str>> = nodes.lines().map(|l| l.split(' ').collect()).collect();
        let index_of = |addr: &str| {
            let port: u16 = addr.split(['@', ':']).nth(1).and_then(|p| p.parse().ok()).expect("port");
            self.nodes.iter().position(|n| n.port == port).expect("known node")
        };
        let ranges = |l: &Vec<&str>| -> Vec<(u16, u16)> {
            l.iter()
                .skip(8)
                .filter_map(|range| {
                    let (a, b) = range.split_once('-').unwrap_or((range, range));
                    Some((a.parse().ok()?, b.parse().ok()?))
                })
                .collect()
        };
        let master = lines
            .iter()
            .find(|l| {
                l.len() > 8
                    && l[2].contains("master")
                    && !l[2].contains("fail")
                    && ranges(l).iter().any(|(a, b)| *a <= slot && slot <= *b)
            })
            .expect("a master for the slot");
        let replica = lines.iter().find(|l| l[3] == master[0] && !l[2].contains("fail")).expect("a replica");
        (index_of(master[1]), index_of(replica[1]), ranges(master))
    }
}

/// The hash slot of a session's keys (`{<session id>}`): CRC16 (XMODEM) mod 16384.
fn slot_of(session_id: &str) -> u16 {
    let mut crc: u16 = 0;
    for byte in session_id.bytes() {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc % 16384
}

/// Settings shared by the tests: many sessions per user, no rate limit in the way, and a
/// response timeout that leaves `WAIT` half a second.
const ENV: &[(&str, &str)] = &[
    ("MAX_SESSIONS_PER_USER", "100000"),
    ("RATE_LIMIT_LOGIN_PER_IP", "100000/1m"),
    ("RATE_LIMIT_LOGIN_PER_ACCOUNT", "100000/1m"),
    ("RATE_LIMIT_REFRESH_PER_IP", "100000/1m"),
    ("RATE_LIMIT_REGISTER_PER_IP", "100000/1m"),
    ("REDIS_RESPONSE_TIMEOUT", "1s"),
];

async fn ready_redis(app: &TestApp) -> (StatusCode, String) {
    let resp = app.get("/ready", None).await;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    (status, body["checks"]["redis"].as_str().unwrap_or_default().to_owned())
}

async fn session_status(app: &TestApp, access: &str) -> StatusCode {
    app.get("/v1/auth/session", Some(access)).await.status()
}

/// Register, login, bearer check, refresh, logout, logout-all; then a login limit trips on
/// a second instance that shares the store.
async fn full_flow(app: &TestApp, env: &[(&str, &str)]) {
    let (email, first) = app.signed_in_user().await;
    assert_eq!(session_status(app, &first.access).await, StatusCode::OK);
    let resp = app.refresh(&first.refresh).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let rotated = Tokens::from(resp.json::<Value>().await.unwrap());
    assert_eq!(rotated.session_id, first.session_id);
    assert_eq!(session_status(app, &rotated.access).await, StatusCode::OK);
    // The rotated-out token is retired (reuse outside the grace window is judged by SQL).
    assert_eq!(app.post_bearer("/v1/auth/logout", &rotated.access).await.status(), StatusCode::NO_CONTENT);
    assert_problem(
        app.get("/v1/auth/session", Some(&rotated.access)).await,
        StatusCode::UNAUTHORIZED,
        "token_revoked",
    )
    .await;
    assert_eq!(app.refresh(&rotated.refresh).await.status(), StatusCode::UNAUTHORIZED);

    let a = app.login_with(&email, &[]).await;
    let b = app.login_with(&email, &[]).await;
    assert_eq!(app.post_bearer("/v1/auth/logout-all", &a.access).await.status(), StatusCode::NO_CONTENT);
    for t in [&a, &b] {
        assert_eq!(session_status(app, &t.access).await, StatusCode::UNAUTHORIZED);
    }

    // The login limiter (three checks, each key in its own slot), across two instances.
    let mut strict: Vec<(&str, &str)> = env.to_vec();
    strict.push(("RATE_LIMIT_LOGIN_PER_ACCOUNT", "2/1m"));
    let other = TestApp::spawn_on(app.resources.clone(), &strict).await;
    let limited = format!("limited-{}@example.com", uuid::Uuid::new_v4().simple());
    assert_eq!(other.register(&limited, PASSWORD).await.status(), StatusCode::CREATED);
    assert_eq!(other.login(&limited, PASSWORD).await.status(), StatusCode::OK);
    assert_eq!(other.login(&limited, "wrong password, twice").await.status(), StatusCode::UNAUTHORIZED);
    let resp = other.login(&limited, PASSWORD).await;
    assert!(resp.headers().contains_key("retry-after"));
    assert_problem(resp, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    // A logout through one instance is refused by the other at once.
    let t = other.login_with(&email, &[]).await;
    assert_eq!(session_status(&other, &t.access).await, StatusCode::OK);
    assert_eq!(app.post_bearer("/v1/auth/logout", &t.access).await.status(), StatusCode::NO_CONTENT);
    assert_eq!(session_status(&other, &t.access).await, StatusCode::UNAUTHORIZED);
}

/// `n` sessions of `email`, logged in concurrently.
async fn sessions(app: &TestApp, email: &str, n: usize) -> Vec<Tokens> {
    futures_util::stream::iter(0..n).map(|_| login_retrying(app, email)).buffer_unordered(8).collect().await
}

/// A login, sent again while it answers 503, as a client would: a login whose writes no
/// replica confirmed in time is refused (fail closed), never acknowledged. (Seen once in
/// twenty runs with the whole suite beside it; the guarantees are about acknowledged ones.)
async fn login_retrying(app: &TestApp, email: &str) -> Tokens {
    for _ in 0..20 {
        let resp = app.login(email, PASSWORD).await;
        let status = resp.status();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let body = resp.json::<Value>().await.expect("json");
        assert_eq!(status, StatusCode::OK, "login: {body}");
        return Tokens::from(body);
    }
    panic!("a login answered 503 twenty times in a row");
}

/// Logs out every session, concurrently; answers the status each logout got.
async fn log_out(app: &TestApp, all: &[Tokens]) -> Vec<StatusCode> {
    futures_util::stream::iter(all)
        .map(|t| async { app.post_bearer("/v1/auth/logout", &t.access).await.status() })
        .buffered(16)
        .collect()
        .await
}

/// Every live session answers 200, every logged-out one 401, within `within`.
async fn guarantees_hold(app: &TestApp, live: &[Tokens], ended: &[Tokens], within: Duration) {
    let check = || async {
        let lives = futures_util::stream::iter(live)
            .map(|t| session_status(app, &t.access))
            .buffered(16)
            .collect::<Vec<_>>()
            .await;
        let ends = futures_util::stream::iter(ended)
            .map(|t| session_status(app, &t.access))
            .buffered(16)
            .collect::<Vec<_>>()
            .await;
        // Any 200 among the ended is a resurrection: fail at once, never wait it out.
        let resurrected = ends.iter().filter(|s| **s == StatusCode::OK).count();
        assert_eq!(resurrected, 0, "{resurrected} of {} logged-out sessions came back", ended.len());
        let healed =
            lives.iter().all(|s| *s == StatusCode::OK) && ends.iter().all(|s| *s == StatusCode::UNAUTHORIZED);
        if !healed {
            let odd =
                |all: &[StatusCode], want| all.iter().filter(|s| **s != want).copied().collect::<Vec<_>>();
            eprintln!(
                "not yet: live {:?}, ended {:?}",
                odd(&lives, StatusCode::OK),
                odd(&ends, StatusCode::UNAUTHORIZED)
            );
        }
        healed
    };
    assert!(eventually(within, check).await, "the server did not heal within {within:?}");
}

#[tokio::test]
async fn redis_cluster_serves_the_flow_and_survives_master_failovers() {
    let mut cluster = Cluster::reserve();
    let seeds = cluster.seeds();
    let mut env = ENV.to_vec();
    env.push(("REDIS_CLUSTER_NODES", &seeds));
    let resources = Resources::new(Backend::Postgres, &Store::InProcess).await;
    // Started before the cluster exists: it serves /health and fails closed until then.
    let app = TestApp::spawn_on(resources, &env).await;
    assert_eq!(app.get("/health", None).await.status(), StatusCode::OK);
    assert_eq!(ready_redis(&app).await, (StatusCode::SERVICE_UNAVAILABLE, "unavailable".into()));
    cluster.start().await;
    assert!(
        eventually(Duration::from_secs(15), || async { ready_redis(&app).await.0 == StatusCode::OK }).await,
        "/ready did not see the cluster"
    );
    assert_eq!(ready_redis(&app).await.1, "ok");

    full_flow(&app, &env).await;

    let email = format!("many-{}@example.com", uuid::Uuid::new_v4().simple());
    assert_eq!(app.register(&email, PASSWORD).await.status(), StatusCode::CREATED);
    let mut live = sessions(&app, &email, 60).await;
    let mut ended: Vec<Tokens> = Vec::new();
    for round in 0..2 {
        // The master of the first fresh session's slot goes down right after the logouts.
        let fresh = sessions(&app, &email, 90).await;
        let (master, replica, owned) = cluster.pair_for_slot(slot_of(&fresh[0].session_id)).await;
        let lagging = round == 1;
        if lagging {
            // The replica falls behind: stopped, and cut off from its master, so the
            // logouts below reach the master only. Acknowledging them would be a lie.
            cluster.nodes[replica].signal("-STOP");
            let _ = query(
                &cluster.nodes[master].addr(),
                redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("replica"),
            )
            .await;
        }
        let (stay, leave) = fresh.split_at(30);
        let answers = log_out(&app, leave).await;
        if lagging {
            let on_master = leave
                .iter()
                .zip(&answers)
                .filter(|(t, _)| {
                    let slot = slot_of(&t.session_id);
                    owned.iter().any(|(a, b)| *a <= slot && slot <= *b)
                })
                .map(|(_, s)| *s)
                .collect::<Vec<_>>();
            assert!(!on_master.is_empty());
            assert!(
                on_master.iter().all(|s| *s == StatusCode::SERVICE_UNAVAILABLE),
                "logouts no replica confirmed must not be acknowledged: {on_master:?}"
            );
        } else {
            assert!(answers.iter().all(|s| *s == StatusCode::NO_CONTENT), "{answers:?}");
        }
        cluster.nodes[master].kill();
        if lagging {
            cluster.nodes[replica].signal("-CONT");
        }
        live.extend_from_slice(stay);
        // Only an answered logout is a promise. (Once one logout could not be confirmed,
        // this instance answers 503 to every bearer request, logouts included, until the
        // store has it: those never started. The client retries them below.)
        let mut unanswered = Vec::new();
        for (t, answer) in leave.iter().zip(&answers) {
            if *answer == StatusCode::NO_CONTENT {
                ended.push(t.clone());
            } else {
                unanswered.push(t.clone());
            }
        }
        let promoted = eventually(Duration::from_secs(20), || async {
            text(&cluster.nodes[replica].addr(), redis::cmd("INFO").arg("replication"))
                .await
                .contains("role:master")
        })
        .await;
        assert!(promoted, "the replica was not promoted");
        if !lagging {
            // Reads heal on their own once the replica is promoted, with the dead master
            // still gone.
            guarantees_hold(&app, &live, &ended, Duration::from_secs(20)).await;
        }
        // The supervisor restarts the dead node; it rejoins as a replica, and writes to
        // its slots (which wait for a replica) work again.
        cluster.nodes[master].start().await;
        cluster.wait_healthy().await;
        guarantees_hold(&app, &live, &ended, Duration::from_secs(20)).await;
        for t in &unanswered {
            let answer = app.post_bearer("/v1/auth/logout", &t.access).await.status();
            assert!([StatusCode::NO_CONTENT, StatusCode::UNAUTHORIZED].contains(&answer), "{answer}");
        }
        ended.extend(unanswered);
        guarantees_hold(&app, &live, &ended, Duration::from_secs(5)).await;
        assert_eq!(ready_redis(&app).await, (StatusCode::OK, "ok".into()));
    }
    // Writes everywhere again: new sessions, refreshes, logouts.
    let more = sessions(&app, &email, 12).await;
    for t in &more {
        assert_eq!(app.refresh(&t.refresh).await.status(), StatusCode::OK);
    }
    assert!(log_out(&app, &more).await.iter().all(|s| *s == StatusCode::NO_CONTENT));
    ended.extend(more);
    guarantees_hold(&app, &live, &ended, Duration::from_secs(5)).await;
}

/// One master, one replica, three sentinels.
struct Sentinels {
    master: Node,
    replica: Node,
    sentinels: Vec<Node>,
    _dir: tempfile::TempDir,
}

const MASTER_NAME: &str = "lkmaster";

impl Sentinels {
    async fn start() -> Self {
        let dir = tempfile::Builder::new().prefix("lk-sentinel-").tempdir().expect("tempdir");
        let p = ports(5);
        let data = |port: u16| {
            let d = dir.path().join(port.to_string());
            std::fs::create_dir_all(&d).expect("data dir");
            d
        };
        let mut master = Node { port: p[0], args: common_args(p[0], &data(p[0])), child: None };
        let mut replica_args = common_args(p[1], &data(p[1]));
        replica_args.extend(["--replicaof".to_owned(), "127.0.0.1".to_owned(), p[0].to_string()]);
        let mut replica = Node { port: p[1], args: replica_args, child: None };
        master.start().await;
        replica.start().await;
        let mut sentinels = Vec::new();
        for &port in &p[2..] {
            let conf = dir.path().join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\n\
                     sentinel monitor {MASTER_NAME} 127.0.0.1 {} 2\n\
                     sentinel down-after-milliseconds {MASTER_NAME} {NODE_TIMEOUT_MS}\n\
                     sentinel failover-timeout {MASTER_NAME} 5000\n\
                     sentinel parallel-syncs {MASTER_NAME} 1\n",
                    data(port).display(),
                    p[0]
                ),
            )
            .expect("sentinel.conf");
            let mut s =
                Node { port, args: vec![conf.display().to_string(), "--sentinel".to_owned()], child: None };
            s.start().await;
            sentinels.push(s);
        }
        let set = Self { master, replica, sentinels, _dir: dir };
        let ready = eventually(Duration::from_secs(30), || async {
            let mut ok = true;
            for s in &set.sentinels {
                let check = text(&s.addr(), redis::cmd("SENTINEL").arg("CKQUORUM").arg(MASTER_NAME)).await;
                let replicas =
                    query(&s.addr(), redis::cmd("SENTINEL").arg("REPLICAS").arg(MASTER_NAME)).await;
                let known = matches!(replicas, Ok(redis::Value::Array(ref r)) if !r.is_empty());
                ok &= check.starts_with("OK") && known;
            }
            ok && set.replica_in_sync(&set.master).await
        })
        .await;
        assert!(ready, "the sentinels did not settle");
        set
    }

    async fn replica_in_sync(&self, master: &Node) -> bool {
        let repl = text(&master.addr(), redis::cmd("INFO").arg("replication")).await;
        repl.contains("role:master") && repl.contains("state=online")
    }

    fn seeds(&self) -> String {
        self.sentinels.iter().map(Node::addr).collect::<Vec<_>>().join(",")
    }

    async fn master_port(&self) -> Option<u16> {
        let v = query(
            &self.sentinels[0].addr(),
            redis::cmd("SENTINEL").arg("GET-MASTER-ADDR-BY-NAME").arg(MASTER_NAME),
        )
        .await
        .ok()?;
        let (_, port): (String, String) = redis::from_redis_value(v).ok()?;
        port.parse().ok()
    }
}

#[tokio::test]
async fn redis_sentinel_follows_a_failover_without_a_restart() {
    let mut set = Sentinels::start().await;
    let seeds = set.seeds();
    let mut env = ENV.to_vec();
    env.push(("REDIS_SENTINEL_NODES", &seeds));
    env.push(("REDIS_SENTINEL_MASTER", MASTER_NAME));
    let resources = Resources::new(Backend::Postgres, &Store::InProcess).await;
    let app = TestApp::spawn_on(resources, &env).await;
    assert!(
        eventually(Duration::from_secs(10), || async { ready_redis(&app).await.0 == StatusCode::OK }).await,
        "/ready did not see the master"
    );
    full_flow(&app, &env).await;

    let email = format!("many-{}@example.com", uuid::Uuid::new_v4().simple());
    assert_eq!(app.register(&email, PASSWORD).await.status(), StatusCode::CREATED);
    let all = sessions(&app, &email, 120).await;
    let (live, ended) = all.split_at(40);
    assert!(log_out(&app, ended).await.iter().all(|s| *s == StatusCode::NO_CONTENT));
    // The master dies right after acknowledging the logouts.
    set.master.kill();
    let promoted = set.replica.port;
    assert!(
        eventually(Duration::from_secs(30), || async { set.master_port().await == Some(promoted) }).await,
        "the sentinels did not promote the replica"
    );
    guarantees_hold(&app, live, ended, Duration::from_secs(20)).await;
    assert_eq!(ready_redis(&app).await, (StatusCode::OK, "ok".into()));

    // The old master comes back; the sentinels make it a replica of the new one, and
    // writes (which wait for a replica) work again.
    set.master.start().await;
    assert!(
        eventually(Duration::from_secs(30), || async { set.replica_in_sync(&set.replica).await }).await,
        "the old master did not rejoin as a replica"
    );
    let more = sessions(&app, &email, 10).await;
    for t in &more {
        assert_eq!(app.refresh(&t.refresh).await.status(), StatusCode::OK);
    }
    let mut ended = ended.to_vec();
    assert!(log_out(&app, &more).await.iter().all(|s| *s == StatusCode::NO_CONTENT));
    ended.extend(more);
    guarantees_hold(&app, live, &ended, Duration::from_secs(5)).await;
}
