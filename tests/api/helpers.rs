//! The harness: `TestApp::spawn(Backend, Store)` starts a real server on port 0.

use std::collections::HashMap;
use std::net::TcpListener as StdListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use latchkey::clock::Clock;
use latchkey::config::Config;
use latchkey::startup::Application;
use latchkey::state::AppState;
use reqwest::{Response, StatusCode};
use sea_orm::{ConnectionTrait, Database};
use serde_json::{Value, json};
use tokio::sync::oneshot;

pub const PASSWORD: &str = "correct horse battery staple";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    /// The machine's MariaDB (or MySQL), a fresh database per test.
    MariaDb,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Store {
    InProcess,
    /// The shared Redis, under a key prefix of this test's own.
    Redis,
    /// A Redis at this URL (a private `redis-server`, possibly not running).
    RedisAt(String),
}

pub fn admin_pg_url() -> String {
    std::env::var("TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

pub fn admin_mysql_url() -> String {
    std::env::var("TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
}

fn shared_redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Where a test's data lives; dropped (database, keys, files) when the last app using it is.
pub struct Resources {
    pub database_url: String,
    pub pg_database: Option<String>,
    pub mysql_database: Option<String>,
    pub redis_prefix: String,
    pub redis_url: Option<String>,
    _dir: tempfile::TempDir,
}

impl Resources {
    /// Where this test's mails land as `.eml` files when no `SMTP_URL` is set.
    pub fn mail_dir(&self) -> std::path::PathBuf {
        self._dir.path().join("mail")
    }

    /// Resources on a database the test provides itself.
    pub fn on_database(database_url: String, store: &Store) -> Arc<Self> {
        Self::build(database_url, None, None, store, tempfile::tempdir().expect("tempdir"))
    }

    pub async fn new(backend: Backend, store: &Store) -> Arc<Self> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (database_url, pg_database, mysql_database) = match backend {
            Backend::Sqlite => {
                (format!("sqlite://{}?mode=rwc", dir.path().join("latchkey.db").display()), None, None)
            }
            Backend::Postgres => {
                let name = fresh_pg_database().await;
                (format!("{}/{name}", admin_pg_url()), Some(name), None)
            }
            Backend::MariaDb => {
                let name = fresh_mysql_database().await;
                (format!("{}/{name}", admin_mysql_url()), None, Some(name))
            }
        };
        Self::build(database_url, pg_database, mysql_database, store, dir)
    }

    fn build(
        database_url: String,
        pg_database: Option<String>,
        mysql_database: Option<String>,
        store: &Store,
        dir: tempfile::TempDir,
    ) -> Arc<Self> {
        let redis_url = match store {
            Store::InProcess => None,
            Store::Redis => Some(shared_redis_url()),
            Store::RedisAt(url) => Some(url.clone()),
        };
        Arc::new(Self {
            database_url,
            pg_database,
            mysql_database,
            redis_prefix: format!("lktest:{}:", uuid::Uuid::new_v4().simple()),
            redis_url,
            _dir: dir,
        })
    }
}

impl Drop for Resources {
    fn drop(&mut self) {
        let db = self.pg_database.take();
        let mysql_db = self.mysql_database.take();
        let prefix = self.redis_prefix.clone();
        let redis_url = self.redis_url.clone();
        // Async clean-up from a synchronous Drop: a thread with a runtime of its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            rt.block_on(async move {
                if let Some(db) = db {
                    drop_pg_database(&db).await;
                }
                if let Some(db) = mysql_db {
                    drop_mysql_database(&db).await;
                }
                if let Some(url) = redis_url {
                    delete_redis_prefix(&url, &prefix).await;
                }
            });
        })
        .join();
    }
}

static SWEPT: AtomicBool = AtomicBool::new(false);

/// Creates `lk_test_<unix time>_<random>`; the first call of a run also drops databases
/// left behind by runs that died more than an hour ago.
async fn fresh_pg_database() -> String {
    let admin =
        Database::connect(format!("{}/postgres", admin_pg_url())).await.expect("connect to PostgreSQL");
    if !SWEPT.swap(true, Ordering::SeqCst) {
        let cutoff = chrono::Utc::now().timestamp() - 3600;
        let rows = admin
            .query_all_raw(sea_orm::Statement::from_string(
                admin.get_database_backend(),
                "SELECT datname FROM pg_database WHERE datname LIKE 'lk_test_%'",
            ))
            .await
            .expect("list databases");
        for row in rows {
            let name: String = row.try_get("", "datname").expect("datname");
            let ts = name.split('_').nth(2).and_then(|t| t.parse::<i64>().ok()).unwrap_or(0);
            if ts < cutoff {
                let _ = admin
                    .execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .await;
            }
        }
    }
    let name = format!("lk_test_{}_{}", chrono::Utc::now().timestamp(), uuid::Uuid::new_v4().simple());
    admin.execute_unprepared(&format!("CREATE DATABASE \"{name}\"")).await.expect("create database");
    let _ = admin.close().await;
    name
}

async fn drop_pg_database(name: &str) {
    if let Ok(admin) = Database::connect(format!("{}/postgres", admin_pg_url())).await {
        let _ = admin.execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).await;
        let _ = admin.close().await;
    }
}

static SWEPT_MYSQL: AtomicBool = AtomicBool::new(false);

/// [`fresh_pg_database`] on the MariaDB/MySQL server: `lk_test_<unix time>_<random>`,
/// sweeping databases of runs that died more than an hour ago on the first call.
async fn fresh_mysql_database() -> String {
    let admin = Database::connect(admin_mysql_url()).await.expect("connect to MariaDB (TEST_MYSQL_URL)");
    if !SWEPT_MYSQL.swap(true, Ordering::SeqCst) {
        let cutoff = chrono::Utc::now().timestamp() - 3600;
        let rows = admin
            .query_all_raw(sea_orm::Statement::from_string(
                admin.get_database_backend(),
                "SELECT SCHEMA_NAME AS name FROM information_schema.SCHEMATA WHERE SCHEMA_NAME LIKE 'lk\\_test\\_%'",
            ))
            .await
            .expect("list databases");
        for row in rows {
            let name: String = row.try_get("", "name").expect("name");
            let ts = name.split('_').nth(2).and_then(|t| t.parse::<i64>().ok()).unwrap_or(0);
            if ts < cutoff {
                let _ = admin.execute_unprepared(&format!("DROP DATABASE IF EXISTS `{name}`")).await;
            }
        }
    }
    let name = format!("lk_test_{}_{}", chrono::Utc::now().timestamp(), uuid::Uuid::new_v4().simple());
    admin.execute_unprepared(&format!("CREATE DATABASE `{name}`")).await.expect("create database");
    let _ = admin.close().await;
    name
}

/// Drops the database after ending every connection still on it (PostgreSQL's `WITH
/// (FORCE)`): a connection left inside a transaction holds a metadata lock that would
/// make `DROP DATABASE` wait for it, and with it the test's end.
async fn drop_mysql_database(name: &str) {
    let Ok(admin) = Database::connect(admin_mysql_url()).await else {
        return;
    };
    let backend = admin.get_database_backend();
    let _ = admin.execute_unprepared("SET SESSION lock_wait_timeout = 10").await;
    let ids = admin
        .query_all_raw(sea_orm::Statement::from_sql_and_values(
            backend,
            "SELECT ID AS id FROM information_schema.PROCESSLIST WHERE DB = ? AND ID <> CONNECTION_ID()",
            [name.into()],
        ))
        .await
        .unwrap_or_default();
    for row in ids {
        if let Ok(id) = row.try_get::<u64>("", "id") {
            let _ = admin.execute_unprepared(&format!("KILL {id}")).await;
        }
    }
    let _ = admin.execute_unprepared(&format!("DROP DATABASE IF EXISTS `{name}`")).await;
    let _ = admin.close().await;
}

async fn delete_redis_prefix(url: &str, prefix: &str) {
    let Ok(client) = redis::Client::open(url) else {
        return;
    };
    let Ok(Ok(mut conn)) =
        tokio::time::timeout(Duration::from_secs(1), client.get_multiplexed_async_connection()).await
    else {
        return;
    };
    // SCAN, not KEYS: KEYS blocks the shared Redis for every other test while it walks
    // every key (a second with a few hundred thousand tombstones).
    let mut cursor: u64 = 0;
    loop {
        let Ok((next, keys)) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async::<(u64, Vec<String>)>(&mut conn)
            .await
        else {
            return;
        };
        if !keys.is_empty() {
            let _: Result<(), _> = redis::cmd("UNLINK").arg(keys).query_async(&mut conn).await;
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

/// A running server.
pub struct TestApp {
    pub address: String,
    pub metrics_address: Option<String>,
    pub client: reqwest::Client,
    pub state: Arc<AppState>,
    pub clock: Clock,
    pub resources: Arc<Resources>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    pub async fn spawn(backend: Backend, store: Store) -> Self {
        Self::spawn_with(backend, store, &[]).await
    }

    pub async fn spawn_with(backend: Backend, store: Store, env: &[(&str, &str)]) -> Self {
        let resources = Resources::new(backend, &store).await;
        Self::spawn_on(resources, env).await
    }

    /// Another instance on the same database and revocation store.
    pub async fn spawn_on(resources: Arc<Resources>, env: &[(&str, &str)]) -> Self {
        Self::try_spawn_on(resources, env).await.expect("build the application")
    }

    pub async fn try_spawn_on(resources: Arc<Resources>, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        // TEST_LOG=warn (any tracing filter) shows the servers' logs, for a failing test.
        if let Ok(filter) = std::env::var("TEST_LOG") {
            let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
        }
        let mut map: HashMap<String, String> = HashMap::from([
            ("LISTEN_ADDR".into(), "127.0.0.1:0".into()),
            ("DATABASE_URL".into(), resources.database_url.clone()),
            ("REDIS_KEY_PREFIX".into(), resources.redis_prefix.clone()),
            ("PASSWORD_HASH_WORKERS".into(), "2".into()),
            ("DATABASE_MAX_CONNECTIONS".into(), "5".into()),
            ("METRICS_ADDR".into(), "127.0.0.1:0".into()),
            // Most tests are about tokens: register answers 201 as without verification.
            // The account tests (accounts.rs) set optional or required themselves.
            ("EMAIL_VERIFICATION".into(), "off".into()),
            ("MAIL_DIR".into(), resources.mail_dir().display().to_string()),
        ]);
        if let Some(url) = &resources.redis_url {
            map.insert("REDIS_URL".into(), url.clone());
        }
        for (k, v) in env {
            map.insert((*k).into(), (*v).into());
        }
        let config = Config::from_map(&map)?;
        let clock = Clock::system();
        let app = Application::build(config, clock.clone()).await?;
        let address = format!("http://127.0.0.1:{}", app.port());
        let metrics_address = app.metrics_port().map(|p| format!("http://127.0.0.1:{p}"));
        let state = app.state();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        let client = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().expect("client");
        Ok(Self {
            address,
            metrics_address,
            client,
            state,
            clock,
            resources,
            stop: Some(stop),
            server: Some(server),
        })
    }

    /// Tells the server to stop, without waiting (`stop` then waits).
    pub fn signal_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// `host:port` of the public listener, for raw connections.
    pub fn host_port(&self) -> &str {
        self.address.trim_start_matches("http://")
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.expect("server task").expect("server stopped cleanly");
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Response {
        let mut req = self.client.get(self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().await.expect("request")
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Response {
        self.client.post(self.url(path)).json(body).send().await.expect("request")
    }

    pub async fn post_raw(&self, path: &str, body: &str) -> Response {
        self.client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .expect("request")
    }

    pub async fn post_bearer(&self, path: &str, token: &str) -> Response {
        self.client.post(self.url(path)).bearer_auth(token).send().await.expect("request")
    }

    pub async fn register(&self, email: &str, password: &str) -> Response {
        self.post_json("/v1/auth/register", &json!({"email": email, "password": password})).await
    }

    pub async fn login(&self, email: &str, password: &str) -> Response {
        self.post_json("/v1/auth/login", &json!({"email": email, "password": password})).await
    }

    pub async fn refresh(&self, refresh_token: &str) -> Response {
        self.post_json("/v1/auth/refresh", &json!({"refresh_token": refresh_token})).await
    }

    /// Registers a fresh user and logs in: (email, token response).
    pub async fn signed_in_user(&self) -> (String, Tokens) {
        let email = format!("user-{}@example.com", uuid::Uuid::new_v4().simple());
        assert_eq!(self.register(&email, PASSWORD).await.status(), StatusCode::CREATED);
        let resp = self.login(&email, PASSWORD).await;
        assert_eq!(resp.status(), StatusCode::OK);
        (email, Tokens::from(resp.json::<Value>().await.expect("json")))
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

#[derive(Clone, Debug)]
pub struct Tokens {
    pub access: String,
    pub refresh: String,
    pub session_id: String,
    pub body: Value,
}

impl From<Value> for Tokens {
    fn from(body: Value) -> Self {
        Self {
            access: body["access_token"].as_str().expect("access_token").to_owned(),
            refresh: body["refresh_token"].as_str().expect("refresh_token").to_owned(),
            session_id: body["session_id"].as_str().expect("session_id").to_owned(),
            body,
        }
    }
}

/// An access token's claims, read without verifying it (the server checks it when it is used).
pub fn claims(access: &str) -> Value {
    use base64::Engine as _;
    let payload = access.split('.').nth(1).expect("a JWT");
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).expect("base64url");
    serde_json::from_slice(&json).expect("JSON claims")
}

/// Asserts the one error shape and returns the body.
pub async fn assert_problem(resp: Response, status: StatusCode, code: &str) -> Value {
    let got = resp.status();
    let content_type =
        resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let www = resp.headers().get("www-authenticate").cloned();
    let text = resp.text().await.expect("body");
    assert_eq!(got, status, "status for {code}: {text}");
    assert!(content_type.starts_with("application/problem+json"), "content type {content_type:?}: {text}");
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    assert_eq!(body["code"], code, "{text}");
    assert_eq!(body["status"], status.as_u16(), "{text}");
    assert!(body["title"].is_string() && body["detail"].is_string(), "{text}");
    assert_eq!(body.as_object().map(|o| o.len()), Some(4), "exactly status, code, title, detail: {text}");
    if status == StatusCode::UNAUTHORIZED {
        let www = www.expect("401 carries WWW-Authenticate");
        let scheme = if code == "invalid_client" { "Basic" } else { "Bearer" };
        assert!(www.to_str().expect("ascii").starts_with(scheme), "{www:?}");
    }
    body
}

/// A `redis-server` of the test's own, on a free port; killed on drop.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<Child>,
}

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

impl PrivateRedis {
    /// A port with no Redis on it yet.
    pub fn reserve() -> Self {
        Self { port: free_port(), child: None }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub async fn start(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (is it installed?)");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `f` until it returns true or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl TestApp {
    pub async fn delete(&self, path: &str, token: &str) -> Response {
        self.client.delete(self.url(path)).bearer_auth(token).send().await.expect("request")
    }

    /// Logs in with extra request headers (user agent, forwarding headers).
    pub async fn login_with(&self, email: &str, headers: &[(&str, &str)]) -> Tokens {
        let mut req =
            self.client.post(self.url("/v1/auth/login")).json(&json!({"email": email, "password": PASSWORD}));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let body = resp.json::<Value>().await.expect("json");
        assert_eq!(status, StatusCode::OK, "login: {body}");
        Tokens::from(body)
    }

    /// Registers `email` (if new) and logs in.
    pub async fn user(&self, email: &str) -> Tokens {
        let _ = self.register(email, PASSWORD).await;
        self.login_with(email, &[]).await
    }
}

/// A PostgreSQL cluster of the test's own (initdb on a free port), which the test can
/// stop and start. Runs as the `postgres` user when the tests run as root.
pub struct PrivatePostgres {
    pub port: u16,
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
}

impl PrivatePostgres {
    fn run(&self, program: &str, args: &[&str]) -> std::process::Output {
        let program = self.bin.join(program);
        let as_root = Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false);
        let mut cmd = if as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        cmd.args(args).stdin(Stdio::null()).output().expect("run a PostgreSQL tool")
    }

    pub fn init() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL binaries in /usr/lib/postgresql")
            .filter_map(Result::ok)
            .map(|e| e.path().join("bin"))
            .find(|p| p.join("initdb").exists())
            .expect("initdb");
        let dir = tempfile::Builder::new().prefix("lk-pg-").tempdir().expect("tempdir");
        let _ = Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir.path()).status();
        let pg = Self { port: free_port(), dir, bin };
        let data = pg.data();
        let out = pg.run("initdb", &["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync"]);
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        pg
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn start(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log").display().to_string();
        let out = self.run("pg_ctl", &["-D", &self.data(), "-o", &opts, "-l", &log, "-w", "start"]);
        assert!(out.status.success(), "pg_ctl start: {}", String::from_utf8_lossy(&out.stderr));
    }

    pub fn stop(&self) {
        let _ = self.run("pg_ctl", &["-D", &self.data(), "-m", "immediate", "-w", "stop"]);
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs the test named `name` (its path in this binary, e.g. `bad_input::x`) again in a
/// process of its own and checks that it passed there; returns true in that process,
/// where the test does its work. For measurements of the whole process (its memory),
/// which the other tests running beside it in this one would blur.
pub fn alone(name: &str) -> bool {
    const MARK: &str = "LATCHKEY_TEST_ALONE";
    if std::env::var_os(MARK).is_some() {
        return true;
    }
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args([name, "--exact", "--test-threads=1", "--nocapture"])
        .env(MARK, "1")
        .stdin(Stdio::null())
        .output()
        .expect("run the test alone");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.contains("1 passed"), "{name} alone:\n{stdout}\n{stderr}");
    false
}

/// This process's resident memory, in KiB.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .expect("/proc/self/status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}
