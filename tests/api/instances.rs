//! Three real server processes (the `latchkey` binary) on one PostgreSQL database and the
//! shared Redis under one key prefix, behind a client that spreads requests over them
//! round-robin and moves on to the next instance only when a connection is refused (the
//! request never reached a server). A logout through one instance is refused by the others
//! on the very next request; one instance killed with SIGKILL under load loses nothing that
//! was acknowledged; a rolling restart with SIGTERM under load fails no request at all.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{Backend, PASSWORD, Resources, Store, Tokens, assert_problem};

const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(15);

/// The two load tests take turns: each runs three servers and a handful of busy clients,
/// and on two cores both at once would measure the machine rather than the servers.
static UNDER_LOAD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A free port below the kernel's ephemeral range (32768–60999 by default), so that while an
/// instance is down for its restart no `bind(0)` and no outgoing connection elsewhere in the
/// suite can take it: the instance comes back on the same address.
fn fixed_port() -> u16 {
    for _ in 0..200 {
        let port = 20_000 + (uuid::Uuid::new_v4().as_u128() % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000..32000");
}

/// One `latchkey serve` process on its own fixed port; killed on drop.
struct Instance {
    name: char,
    port: u16,
    env: Vec<(String, String)>,
    dir: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl Instance {
    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log_path(&self, start: u32) -> PathBuf {
        self.dir.join(format!("{}-{start}.log", self.name))
    }

    fn start(&mut self) {
        self.starts += 1;
        let log = std::fs::File::create(self.log_path(self.starts)).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_latchkey"));
        cmd.arg("serve")
            .current_dir(&self.dir)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        if let Ok(path) = std::env::var("PATH") {
            cmd.env("PATH", path);
        }
        self.child = Some(cmd.spawn().expect("start latchkey"));
    }

    /// The end of this instance's logs, every start of it, for a failure's message.
    fn logs(&self) -> String {
        let mut out = String::new();
        for start in 1..=self.starts {
            let text = std::fs::read_to_string(self.log_path(start)).unwrap_or_default();
            let tail: String = text
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            out.push_str(&format!("--- instance {} (start {start}) ---\n{tail}\n", self.name));
        }
        out
    }

    /// Waits for `/ready` to answer 200 (bounded; fails early if the process exits).
    async fn wait_ready(&mut self) {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("instance {} exited while starting ({status}):\n{}", self.name, self.logs());
            }
            if let Ok(resp) = client.get(format!("{}/ready", self.base())).send().await
                && resp.status() == StatusCode::OK
            {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "instance {} not ready after 60 s:\n{}",
                self.name,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the process to exit: how it ended and how long it took.
    async fn terminate(&mut self) -> (ExitStatus, Duration) {
        let mut child = self.child.take().expect("a running instance");
        let started = Instant::now();
        // The shell's own `kill`: no signal crate for one call, no `procps` needed in CI.
        let sent =
            Command::new("sh").arg("-c").arg(format!("kill -TERM {}", child.id())).status().expect("sh");
        assert!(sent.success(), "kill -TERM failed");
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return (status, started.elapsed());
            }
            if started.elapsed() > SHUTDOWN_TIMEOUT + Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("instance {} still running 10 s past SHUTDOWN_TIMEOUT:\n{}", self.name, self.logs());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three instances on one fresh PostgreSQL database and one Redis key prefix.
struct Cluster {
    // Declared first, dropped first: the processes end before their database is dropped.
    instances: Vec<Instance>,
    _resources: Arc<Resources>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Self {
        let resources = Resources::new(Backend::Postgres, &Store::Redis).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let mail = dir.path().join("mail");
        let shutdown = format!("{}s", SHUTDOWN_TIMEOUT.as_secs());
        let common: Vec<(&str, &str)> = vec![
            ("DATABASE_URL", &resources.database_url),
            ("REDIS_URL", resources.redis_url.as_deref().expect("Redis")),
            ("REDIS_KEY_PREFIX", &resources.redis_prefix),
            ("PASSWORD_HASH_WORKERS", "1"),
            ("DATABASE_MAX_CONNECTIONS", "5"),
            ("EMAIL_VERIFICATION", "off"),
            ("MAIL_DIR", mail.to_str().expect("utf-8 path")),
            ("SHUTDOWN_TIMEOUT", &shutdown),
            // Every client here is 127.0.0.1: the limits are not what is tested.
            ("RATE_LIMIT_LOGIN_PER_IP", "100000/1m"),
            ("RATE_LIMIT_LOGIN_PER_ACCOUNT", "100000/1m"),
            ("RATE_LIMIT_REGISTER_PER_IP", "100000/1m"),
            ("RATE_LIMIT_REFRESH_PER_IP", "100000/1m"),
            // A refresh cut off by a kill is retried after the load stops: still in grace.
            ("REFRESH_REUSE_GRACE", "120s"),
            ("METRICS_ADDR", "off"),
            ("RUST_LOG", "info"),
        ];
        let mut instances = Vec::new();
        for name in ['A', 'B', 'C'] {
            let port = fixed_port();
            let mut env: Vec<(String, String)> =
                common.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
            env.push(("LISTEN_ADDR".into(), format!("127.0.0.1:{port}")));
            let mut instance =
                Instance { name, port, env, dir: dir.path().to_owned(), child: None, starts: 0 };
            // All three at once on the fresh database: the migration lock keeps them apart.
            instance.start();
            instances.push(instance);
        }
        for instance in &mut instances {
            instance.wait_ready().await;
        }
        Self { instances, _resources: resources, _dir: dir }
    }

    fn spread(&self) -> Spread {
        Spread {
            bases: Arc::new(self.instances.iter().map(Instance::base).collect()),
            client: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap(),
            next: Arc::new(AtomicUsize::new(0)),
            tally: Arc::new(Tally::default()),
        }
    }

    fn logs(&self) -> String {
        self.instances.iter().map(Instance::logs).collect()
    }
}

/// A plain client on one instance.
fn direct() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

// ---------------------------------------------------------------------------------------
// The client that spreads requests.

#[derive(Default)]
struct Tally {
    answered: AtomicU64,
    /// Connections refused, each retried on the next instance.
    refused: AtomicU64,
}

/// Round-robin over the instances; on to the next one only when the connection was
/// refused. Anything else (a reset, a connection closed before the answer, a timeout, a
/// 5xx) is the caller's to judge: the request may have reached a server.
#[derive(Clone)]
struct Spread {
    bases: Arc<Vec<String>>,
    client: reqwest::Client,
    next: Arc<AtomicUsize>,
    tally: Arc<Tally>,
}

struct Answer {
    status: StatusCode,
    body: String,
}

#[derive(Debug)]
struct Failure {
    what: String,
    /// Which instance the request went to (`None`: every one refused).
    instance: Option<usize>,
    sent_at: Instant,
    error: String,
}

/// A refused connection: the request never left the client.
fn refused(e: &reqwest::Error) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        source = err.source();
    }
    false
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(err) = source {
        out.push_str(&format!(": {err}"));
        source = err.source();
    }
    out
}

impl Spread {
    /// A separate client on the same instances (its own connections), like another user.
    fn another(&self) -> Self {
        Self {
            client: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap(),
            ..self.clone()
        }
    }

    async fn send(
        &self,
        what: &str,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Result<Answer, Failure> {
        let first = self.next.fetch_add(1, SeqCst);
        for i in 0..self.bases.len() {
            let instance = (first + i) % self.bases.len();
            let mut req = self.client.request(method.clone(), format!("{}{path}", self.bases[instance]));
            if let Some(token) = token {
                req = req.bearer_auth(token);
            }
            if let Some(body) = body {
                req = req.json(body);
            }
            let sent_at = Instant::now();
            let result = async {
                let resp = req.send().await?;
                let status = resp.status();
                Ok::<_, reqwest::Error>((status, resp.text().await?))
            }
            .await;
            match result {
                Ok((status, body)) => {
                    self.tally.answered.fetch_add(1, SeqCst);
                    if status.is_server_error() {
                        let error = format!("{status}: {body}");
                        return Err(Failure { what: what.into(), instance: Some(instance), sent_at, error });
                    }
                    return Ok(Answer { status, body });
                }
                Err(e) if refused(&e) => {
                    self.tally.refused.fetch_add(1, SeqCst);
                }
                Err(e) => {
                    let error = chain(&e);
                    return Err(Failure { what: what.into(), instance: Some(instance), sent_at, error });
                }
            }
        }
        Err(Failure {
            what: what.into(),
            instance: None,
            sent_at: Instant::now(),
            error: "every instance refused the connection".into(),
        })
    }

    /// A request that must answer `expected`; its JSON body.
    async fn expect(
        &self,
        what: &str,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        expected: StatusCode,
    ) -> Result<Value, Failure> {
        let sent_at = Instant::now();
        let answer = self.send(what, method, path, token, body).await?;
        if answer.status != expected {
            let error = format!("{} (expected {expected}): {}", answer.status, answer.body);
            return Err(Failure { what: what.into(), instance: None, sent_at, error });
        }
        Ok(serde_json::from_str(&answer.body).unwrap_or(Value::Null))
    }

    async fn login(&self, email: &str) -> Result<Tokens, Failure> {
        let body = json!({"email": email, "password": PASSWORD});
        self.expect("login", Method::POST, "/v1/auth/login", None, Some(&body), StatusCode::OK)
            .await
            .map(Tokens::from)
    }

    async fn refresh(&self, refresh: &str) -> Result<Tokens, Failure> {
        let body = json!({"refresh_token": refresh});
        self.expect("refresh", Method::POST, "/v1/auth/refresh", None, Some(&body), StatusCode::OK)
            .await
            .map(Tokens::from)
    }

    async fn bearer(&self, path: &str, access: &str) -> Result<Value, Failure> {
        self.expect(path, Method::GET, path, Some(access), None, StatusCode::OK).await
    }

    async fn register(&self) -> String {
        let email = format!("user-{}@example.com", uuid::Uuid::new_v4().simple());
        let body = json!({"email": email, "password": PASSWORD});
        self.expect("register", Method::POST, "/v1/auth/register", None, Some(&body), StatusCode::CREATED)
            .await
            .expect("register");
        email
    }
}

// ---------------------------------------------------------------------------------------
// Load: clients checking bearer tokens, refreshing, and now and then logging in.

/// A session as its client knows it: the last tokens it was given, and the refresh token
/// whose rotation got no answer, if one did not.
struct Session {
    tokens: Tokens,
    unanswered_refresh: Option<String>,
}

#[derive(Default)]
struct WorkerReport {
    sessions: Vec<Session>,
    failures: Vec<Failure>,
}

async fn worker(spread: Spread, email: String, stop: Arc<AtomicBool>) -> WorkerReport {
    let mut report = WorkerReport::default();
    let mut current: Option<Tokens> = None;
    let mut i = 0u64;
    while !stop.load(SeqCst) {
        i += 1;
        let Some(tokens) = current.take() else {
            match spread.login(&email).await {
                Ok(tokens) => current = Some(tokens),
                Err(failure) => report.failures.push(failure),
            }
            continue;
        };
        match i % 6 {
            0 => match spread.refresh(&tokens.refresh).await {
                Ok(next) => current = Some(next),
                Err(failure) => {
                    report.failures.push(failure);
                    // Its fate is unknown to this client: checked once the load is over.
                    let unanswered_refresh = Some(tokens.refresh.clone());
                    report.sessions.push(Session { tokens, unanswered_refresh });
                }
            },
            3 if i % 30 == 3 => {
                // A new session beside the others; this one is kept for the final check.
                report.sessions.push(Session { tokens, unanswered_refresh: None });
            }
            _ => {
                let path = if i.is_multiple_of(2) { "/v1/auth/session" } else { "/v1/users/me" };
                if let Err(failure) = spread.bearer(path, &tokens.access).await {
                    report.failures.push(failure);
                }
                current = Some(tokens);
            }
        }
    }
    if let Some(tokens) = current {
        report.sessions.push(Session { tokens, unanswered_refresh: None });
    }
    report
}

const WORKERS: usize = 6;

struct Load {
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<WorkerReport>>,
}

impl Load {
    async fn start(spread: &Spread) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::new();
        for _ in 0..WORKERS {
            let spread = spread.another();
            let email = spread.register().await;
            workers.push(tokio::spawn(worker(spread, email, Arc::clone(&stop))));
        }
        Self { stop, workers }
    }

    async fn finish(self) -> WorkerReport {
        self.stop.store(true, SeqCst);
        let mut all = WorkerReport::default();
        for worker in self.workers {
            let report = worker.await.expect("worker");
            all.sessions.extend(report.sessions);
            all.failures.extend(report.failures);
        }
        all
    }
}

/// Every session a client was told about still works, on the instances that are up: its
/// last access token passes the bearer check and its last refresh token rotates. A refresh
/// that got no answer is replayed: within the grace window the server either rotates it
/// now or hands back the successor it made then — never `refresh_token_reused`.
async fn assert_nothing_lost(spread: &Spread, sessions: &[Session], logs: impl Fn() -> String) {
    let mut lost = Vec::new();
    for (n, session) in sessions.iter().enumerate() {
        match &session.unanswered_refresh {
            Some(refresh) => {
                if let Err(f) = spread.refresh(refresh).await {
                    lost.push(format!("session {n}: replaying the unanswered refresh: {}", f.error));
                }
            }
            None => {
                if let Err(f) = spread.bearer("/v1/auth/session", &session.tokens.access).await {
                    lost.push(format!("session {n}: its last access token: {}", f.error));
                }
                if let Err(f) = spread.refresh(&session.tokens.refresh).await {
                    lost.push(format!("session {n}: its last refresh token: {}", f.error));
                }
            }
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {} sessions lost:\n{}\n{}",
        lost.len(),
        sessions.len(),
        lost.join("\n"),
        logs()
    );
}

fn describe(failures: &[&Failure], started: Instant) -> String {
    failures
        .iter()
        .map(|f| {
            let at = f.sent_at.saturating_duration_since(started);
            let instance = f.instance.map_or("-".into(), |i| ["A", "B", "C"][i].to_owned());
            format!("  {at:>8.3?} {:<18} on {instance}: {}", f.what, f.error)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------
// 1. Logout through one instance, refused by the others on the next request.

/// Logout, logout-all and ending one session by id, each through instance A: the very next
/// request on B and C with that session's access token is `token_revoked`, and its refresh
/// token is refused there too — even though B and C had just verified (and cached) the
/// access token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_through_one_instance_is_refused_by_the_others_on_the_next_request() {
    let cluster = Cluster::start().await;
    let (a, others) =
        (cluster.instances[0].base(), [cluster.instances[1].base(), cluster.instances[2].base()]);
    let client = direct();
    let spread = cluster.spread();
    let email = spread.register().await;

    let login = || async {
        let resp = client
            .post(format!("{a}/v1/auth/login"))
            .json(&json!({"email": email, "password": PASSWORD}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        Tokens::from(resp.json::<Value>().await.unwrap())
    };
    let session_ok = |base: String, access: String| {
        let client = client.clone();
        async move {
            let resp =
                client.get(format!("{base}/v1/auth/session")).bearer_auth(&access).send().await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "{base}: {}", resp.text().await.unwrap());
        }
    };
    let refused_everywhere_else = |tokens: Tokens| {
        let (client, others) = (client.clone(), others.clone());
        async move {
            for base in &others {
                let resp = client
                    .get(format!("{base}/v1/auth/session"))
                    .bearer_auth(&tokens.access)
                    .send()
                    .await
                    .unwrap();
                assert_problem(resp, StatusCode::UNAUTHORIZED, "token_revoked").await;
                let resp = client
                    .post(format!("{base}/v1/auth/refresh"))
                    .json(&json!({"refresh_token": tokens.refresh}))
                    .send()
                    .await
                    .unwrap();
                assert_problem(resp, StatusCode::UNAUTHORIZED, "invalid_token").await;
            }
        }
    };

    // Logout.
    let one = login().await;
    for base in &others {
        session_ok(base.clone(), one.access.clone()).await;
    }
    let resp = client.post(format!("{a}/v1/auth/logout")).bearer_auth(&one.access).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    refused_everywhere_else(one).await;

    // Ending another session by its id: that one is refused, the caller's own goes on.
    let (keeper, ended) = (login().await, login().await);
    for base in &others {
        session_ok(base.clone(), ended.access.clone()).await;
    }
    let resp = client
        .delete(format!("{a}/v1/users/me/sessions/{}", ended.session_id))
        .bearer_auth(&keeper.access)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    refused_everywhere_else(ended).await;
    for base in &others {
        session_ok(base.clone(), keeper.access.clone()).await;
    }

    // Logout-all: every session of the user, the caller's and the others.
    let second = login().await;
    for base in &others {
        session_ok(base.clone(), keeper.access.clone()).await;
        session_ok(base.clone(), second.access.clone()).await;
    }
    let resp =
        client.post(format!("{a}/v1/auth/logout-all")).bearer_auth(&second.access).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    refused_everywhere_else(second).await;
    refused_everywhere_else(keeper).await;
}

// ---------------------------------------------------------------------------------------
// 2. SIGKILL under load.

/// Under steady load spread over the three, one instance is killed with SIGKILL. The two
/// others keep serving: the only failures are requests that were on the killed instance
/// when it died (a refused connection to it is retried on the next one). Nothing the
/// clients were told is lost: every session's last tokens work afterwards, and a refresh
/// cut off by the kill can be replayed (no `refresh_token_reused`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instance_killed_under_load_loses_nothing_and_the_others_keep_serving() {
    let _turn = UNDER_LOAD.lock().await;
    let mut cluster = Cluster::start().await;
    let spread = cluster.spread();
    let started = Instant::now();
    let load = Load::start(&spread).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    const KILLED: usize = 1;
    let answered_before = spread.tally.answered.load(SeqCst);
    cluster.instances[KILLED].kill();
    let killed_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let report = load.finish().await;
    let answered_after = spread.tally.answered.load(SeqCst) - answered_before;

    // A request in flight on the killed instance when it died may fail; nothing else may.
    let (cut_off, failed): (Vec<&Failure>, Vec<&Failure>) =
        report.failures.iter().partition(|f| f.instance == Some(KILLED) && f.sent_at <= killed_at);
    assert!(
        failed.is_empty(),
        "{} requests failed besides those cut off by the kill (killed at {:?}):\n{}\n{}",
        failed.len(),
        killed_at - started,
        describe(&failed, started),
        cluster.logs()
    );
    assert!(cut_off.len() <= WORKERS, "at most one request per client in flight: {cut_off:?}");
    assert!(answered_after > 50, "the survivors kept serving: {answered_after} answers after the kill");
    assert!(
        spread.tally.refused.load(SeqCst) > 0,
        "requests reached for the dead instance and were moved on"
    );

    let sessions = report.sessions;
    eprintln!(
        "SIGKILL under load: {} sessions, {answered_after} answers after the kill, {} cut off, {} refused",
        sessions.len(),
        cut_off.len(),
        spread.tally.refused.load(SeqCst)
    );
    assert_nothing_lost(&spread, &sessions, || cluster.logs()).await;
}

// ---------------------------------------------------------------------------------------
// 3. A rolling restart with SIGTERM under load.

/// Each instance in turn gets SIGTERM under load, exits 0 within `SHUTDOWN_TIMEOUT`, comes
/// back on the same port and becomes ready before the next one goes. A client that only
/// moves on when a connection is refused sees no failure at all over the whole run — no
/// reset, no connection closed before its answer, no 5xx — and the tokens issued before the
/// restarts still work after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_fails_no_request() {
    let _turn = UNDER_LOAD.lock().await;
    let mut cluster = Cluster::start().await;
    let spread = cluster.spread();
    // A session issued before the restarts and left alone during them.
    let bystander_email = spread.register().await;
    let bystander = spread.login(&bystander_email).await.expect("login");

    let started = Instant::now();
    let load = Load::start(&spread).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut marks = Vec::new();
    for n in 0..cluster.instances.len() {
        let instance = &mut cluster.instances[n];
        marks.push(format!("{:>8.3?} SIGTERM to {}", started.elapsed(), instance.name));
        let (status, took) = instance.terminate().await;
        marks.push(format!("{:>8.3?} {} exited ({status}) after {took:?}", started.elapsed(), instance.name));
        assert!(status.success(), "instance {} exited with {status}:\n{}", instance.name, instance.logs());
        assert!(took < SHUTDOWN_TIMEOUT, "instance {} took {took:?} to stop", instance.name);
        instance.start();
        instance.wait_ready().await;
        marks.push(format!("{:>8.3?} {} ready again", started.elapsed(), instance.name));
        // Let the load reach it before the next one goes.
        let answered = spread.tally.answered.load(SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(spread.tally.answered.load(SeqCst) > answered, "the load goes on");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let report = load.finish().await;

    let failures: Vec<&Failure> = report.failures.iter().collect();
    assert!(
        failures.is_empty(),
        "{} requests failed during the rolling restart ({} answered, {} refused and retried):\n{}\n{}\n{}",
        failures.len(),
        spread.tally.answered.load(SeqCst),
        spread.tally.refused.load(SeqCst),
        describe(&failures, started),
        marks.join("\n"),
        cluster.logs()
    );
    eprintln!(
        "rolling restart: {} answered, {} refused and retried, {} sessions\n{}",
        spread.tally.answered.load(SeqCst),
        spread.tally.refused.load(SeqCst),
        report.sessions.len(),
        marks.join("\n")
    );
    let mut sessions = report.sessions;
    sessions.push(Session { tokens: bystander, unanswered_refresh: None });
    assert_nothing_lost(&spread, &sessions, || cluster.logs()).await;
}
