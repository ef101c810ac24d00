//! Operations: metrics on their own listener, the audit log, graceful shutdown.

use std::process::{Command, Stdio};
use std::time::Duration;

use reqwest::StatusCode;
use sea_orm::{EntityTrait as _, QueryOrder as _};
use serde_json::Value;

use crate::helpers::{Backend, PASSWORD, Store, TestApp, assert_problem, eventually, free_port};
use latchkey::store::entity::audit_log;

pub async fn scrape(app: &TestApp) -> String {
    let url = format!("{}/metrics", app.metrics_address.as_ref().expect("metrics enabled"));
    let resp = app.client.get(url).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.text().await.unwrap()
}

pub fn value(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_move_with_requests_and_stay_off_the_public_listener() {
    let app =
        TestApp::spawn_with(Backend::Postgres, Store::Redis, &[("RATE_LIMIT_LOGIN_PER_IP", "2/1m")]).await;
    let before = scrape(&app).await;
    assert!(before.contains("latchkey_audit_queue_depth 0"), "{before}");
    // Dropped events are counted by class: the queue's share for noise, or all of it.
    for class in ["security", "noise"] {
        let series = format!(r#"latchkey_audit_events_dropped{{class="{class}"}} 0"#);
        assert!(before.contains(&series), "{before}");
    }
    app.signed_in_user().await;
    assert_eq!(app.login("nobody@example.com", "wrong password").await.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        app.login("nobody@example.com", "wrong password").await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    let after = scrape(&app).await;
    for name in [
        "# TYPE latchkey_http_requests counter",
        "# TYPE latchkey_http_request_duration_seconds histogram",
        "# TYPE latchkey_logins counter",
        "# TYPE latchkey_rate_limited counter",
        "# TYPE latchkey_dependency_duration_seconds histogram",
    ] {
        assert!(after.contains(name), "{name} missing:\n{after}");
    }
    assert_eq!(value(&after, r#"latchkey_logins_total{outcome="success"}"#), 1.0, "{after}");
    assert_eq!(value(&after, r#"latchkey_logins_total{outcome="invalid_credentials"}"#), 1.0);
    assert_eq!(value(&after, r#"latchkey_logins_total{outcome="rate_limited"}"#), 1.0);
    assert_eq!(value(&after, r#"latchkey_rate_limited_total{limit="login_per_ip"}"#), 1.0);
    assert_eq!(
        value(&after, r#"latchkey_http_requests_total{route="login",method="POST",status="200"}"#),
        1.0
    );
    assert_eq!(
        value(&after, r#"latchkey_http_requests_total{route="register",method="POST",status="201"}"#),
        1.0
    );
    assert_eq!(value(&after, r#"latchkey_http_request_duration_seconds_count{route="login"}"#), 3.0);
    assert!(value(&after, r#"latchkey_dependency_duration_seconds_count{dependency="redis"}"#) > 0.0);
    assert!(value(&after, r#"latchkey_dependency_duration_seconds_count{dependency="database"}"#) > 0.0);
    // Not on the public listener.
    assert_problem(app.get("/metrics", None).await, StatusCode::NOT_FOUND, "not_found").await;
}

/// The round trips a login makes. Redis: one for the limits and the cool-down together, one
/// to make the session live. PostgreSQL: one to read the account with its roles, one to
/// write the session, its refresh token and the last login. The benchmark's login figure
/// depends on it.
#[tokio::test]
async fn a_login_costs_two_redis_round_trips_and_four_sql_statements() {
    // No key refresh during the test (its reads would count).
    let app = TestApp::spawn_with(Backend::Postgres, Store::Redis, &[("KEYS_REFRESH_INTERVAL", "60s")]).await;
    let calls = |scrape: &str, dependency: &str| {
        value(scrape, &format!(r#"latchkey_dependency_duration_seconds_count{{dependency="{dependency}"}}"#))
    };
    // Audit rows are written in the background: wait for them, so that the counts hold
    // only the login's own statements and its one audit insert. Read on a connection of the
    // test's own, so that these reads are not counted.
    let db = sea_orm::Database::connect(app.resources.database_url.as_str()).await.unwrap();
    let audited = |n: usize| {
        let db = db.clone();
        async move {
            assert!(
                eventually(Duration::from_secs(5), || async {
                    audit_log::Entity::find().all(&db).await.unwrap().len() >= n
                })
                .await,
                "{n} audit rows"
            );
        }
    };
    let (email, _) = app.signed_in_user().await;
    // A first failure, so that the next success has failures to forget.
    assert_eq!(app.login(&email, "wrong password").await.status(), StatusCode::UNAUTHORIZED);
    audited(3).await;
    let before = scrape(&app).await;
    assert_eq!(app.login(&email, PASSWORD).await.status(), StatusCode::OK);
    audited(4).await;
    let first = scrape(&app).await;
    assert_eq!(
        calls(&first, "redis") - calls(&before, "redis"),
        3.0,
        "limits, forgetting the failure, the session"
    );
    assert_eq!(
        calls(&first, "database") - calls(&before, "database"),
        4.0,
        "account, writes, the session limit, audit row"
    );
    assert_eq!(app.login(&email, PASSWORD).await.status(), StatusCode::OK);
    audited(5).await;
    let second = scrape(&app).await;
    assert_eq!(calls(&second, "redis") - calls(&first, "redis"), 2.0, "limits, the session");
    assert_eq!(
        calls(&second, "database") - calls(&first, "database"),
        4.0,
        "account, writes, the session limit, audit row"
    );
}

#[tokio::test]
async fn a_scripted_sequence_leaves_exactly_its_audit_rows() {
    let app = TestApp::spawn(Backend::Sqlite, Store::InProcess).await;
    let ua = [("user-agent", "audit-test/1.0")];
    let resp = app
        .client
        .post(app.url("/v1/auth/register"))
        .header(ua[0].0, ua[0].1)
        .json(&serde_json::json!({"email": "audited@example.com", "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let user_id = resp.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    assert_eq!(app.login("audited@example.com", "wrong password").await.status(), StatusCode::UNAUTHORIZED);
    let tokens = app.login_with("audited@example.com", &ua).await;
    let resp = app.refresh(&tokens.refresh).await;
    let next: Value = resp.json().await.unwrap();
    assert_eq!(
        app.post_bearer("/v1/auth/logout", next["access_token"].as_str().unwrap()).await.status(),
        StatusCode::NO_CONTENT
    );

    let expected = ["register", "login_failure", "login_success", "refresh", "logout"];
    assert!(
        eventually(Duration::from_secs(5), || async {
            audit_log::Entity::find().all(&app.state.db).await.unwrap().len() >= expected.len()
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(1200)).await; // nothing more arrives
    let rows = audit_log::Entity::find()
        .order_by_asc(audit_log::Column::CreatedAt)
        .all(&app.state.db)
        .await
        .unwrap();
    let actions: Vec<&str> = rows.iter().map(|r| r.action.as_str()).collect();
    assert_eq!(actions, expected);
    for row in &rows {
        assert_eq!(row.user_id.map(|u| u.to_string()).as_deref(), Some(user_id.as_str()), "{row:?}");
        assert_eq!(row.ip_address.as_deref(), Some("127.0.0.1"));
        let detail = row.detail.as_ref().map(ToString::to_string).unwrap_or_default();
        for secret in [PASSWORD, tokens.refresh.as_str(), tokens.access.as_str()] {
            assert!(!detail.contains(secret), "a secret in the audit log: {row:?}");
        }
    }
    assert_eq!(rows[0].user_agent.as_deref(), Some("audit-test/1.0"));
    assert_eq!(rows[1].outcome, "invalid_credentials");
}

#[tokio::test]
async fn sigterm_finishes_in_flight_requests_and_drains_the_audit_log() {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("shutdown.db");
    let database_url = format!("sqlite://{}?mode=rwc", db_path.display());
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("DATABASE_URL", &database_url)
        .env("METRICS_ADDR", "off")
        .env("PASSWORD_HASH_WORKERS", "1")
        .env("RATE_LIMIT_LOGIN_PER_IP", "1000/1m")
        .env("RATE_LIMIT_LOGIN_PER_ACCOUNT", "1000/1m")
        .env("RUST_LOG", "warn")
        // Register answers 201 (no verification mail): this test is about the audit log.
        .env("EMAIL_VERIFICATION", "off")
        .env_remove("REDIS_URL")
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    assert!(
        eventually(Duration::from_secs(20), || async {
            client.get(format!("{base}/health")).send().await.is_ok_and(|r| r.status().is_success())
        })
        .await,
        "server did not start"
    );
    let body = serde_json::json!({"email": "calm@example.com", "password": PASSWORD});
    assert_eq!(
        client.post(format!("{base}/v1/auth/register")).json(&body).send().await.unwrap().status(),
        StatusCode::CREATED
    );

    // 24 logins at once on one hashing thread: they queue up and take a while.
    let logins: Vec<_> = (0..24)
        .map(|_| {
            let client = client.clone();
            let url = format!("{base}/v1/auth/login");
            let body = body.clone();
            tokio::spawn(async move { client.post(url).json(&body).send().await.map(|r| r.status()) })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());

    for login in logins {
        let status = login.await.unwrap().expect("an in-flight request was cut off");
        assert_eq!(status, StatusCode::OK);
    }
    let exit = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(exit.success(), "exit status {exit:?}");
    assert!(client.get(format!("{base}/health")).send().await.is_err(), "stopped accepting");

    // Every audit event reached SQL before the process exited.
    let db = sea_orm::Database::connect(&database_url).await.unwrap();
    let rows = audit_log::Entity::find().all(&db).await.unwrap();
    assert_eq!(rows.iter().filter(|r| r.action == "login_success").count(), 24);
    assert_eq!(rows.iter().filter(|r| r.action == "register").count(), 1);
}
