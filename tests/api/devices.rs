//! Device tokens: a stranger's failed logins can never lock the owner's known devices out
//! (issue 14: the cool-down that protects the owner).

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{Backend, PASSWORD, Store, TestApp, assert_problem};

/// Every login comes through a trusted proxy, so each can claim its own client address; a
/// cool-down lasts long enough to outlive a slow test.
const ENV: &[(&str, &str)] =
    &[("TRUSTED_PROXIES", "127.0.0.1"), ("LOGIN_COOLDOWN_BASE", "1m"), ("LOGIN_COOLDOWN_MAX", "10m")];

macro_rules! both {
    ($name:ident) => {
        mod $name {
            use super::*;
            #[tokio::test]
            async fn postgres_redis() {
                super::$name(TestApp::spawn_with(Backend::Postgres, Store::Redis, ENV).await).await;
            }
            #[tokio::test]
            async fn mariadb_redis() {
                super::$name(TestApp::spawn_with(Backend::MariaDb, Store::Redis, ENV).await).await;
            }
            #[tokio::test]
            async fn sqlite_in_process() {
                super::$name(TestApp::spawn_with(Backend::Sqlite, Store::InProcess, ENV).await).await;
            }
        }
    };
}

async fn login(
    app: &TestApp,
    email: &str,
    password: &str,
    ip: &str,
    device: Option<&str>,
) -> reqwest::Response {
    let mut body = json!({"email": email, "password": password});
    if let Some(d) = device {
        body["device_token"] = json!(d);
    }
    app.client.post(app.url("/v1/auth/login")).header("x-forwarded-for", ip).json(&body).send().await.unwrap()
}

both!(a_stranger_hammering_the_account_cannot_lock_out_the_owners_device);
async fn a_stranger_hammering_the_account_cannot_lock_out_the_owners_device(app: TestApp) {
    let email = "owner@example.com";
    assert_eq!(app.register(email, PASSWORD).await.status(), StatusCode::CREATED);
    let resp = login(&app, email, PASSWORD, "198.51.100.1", None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let device = resp.json::<Value>().await.unwrap()["device_token"].as_str().unwrap().to_owned();

    // The attacker: 50 wrong passwords from their network.
    let mut statuses = Vec::new();
    for _ in 0..50 {
        statuses.push(login(&app, email, "not the password", "203.0.113.7", None).await.status().as_u16());
    }
    assert!(statuses.contains(&429), "the attacker is slowed down: {statuses:?}");

    // The owner, from yet another address, with the device token: straight in.
    let resp = login(&app, email, PASSWORD, "192.0.2.55", Some(&device)).await;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, StatusCode::OK, "the owner's device is judged by its own failures only: {body}");
    assert!(body["device_token"].is_string(), "a fresh device token: {body}");

    // The attacker's network is cooling down, even with the right password.
    let resp = login(&app, email, PASSWORD, "203.0.113.7", None).await;
    assert_problem(resp, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;

    // A device token of another account counts for nothing here.
    assert_eq!(app.register("mallory@example.com", PASSWORD).await.status(), StatusCode::CREATED);
    let resp = login(&app, "mallory@example.com", PASSWORD, "203.0.113.9", None).await;
    let foreign = resp.json::<Value>().await.unwrap()["device_token"].as_str().unwrap().to_owned();
    let resp = login(&app, email, PASSWORD, "203.0.113.7", Some(&foreign)).await;
    assert_problem(resp, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
}

both!(a_device_that_fails_on_its_own_cools_down_on_its_own);
async fn a_device_that_fails_on_its_own_cools_down_on_its_own(app: TestApp) {
    let email = "forgetful@example.com";
    assert_eq!(app.register(email, PASSWORD).await.status(), StatusCode::CREATED);
    let resp = login(&app, email, PASSWORD, "198.51.100.2", None).await;
    let device = resp.json::<Value>().await.unwrap()["device_token"].as_str().unwrap().to_owned();
    // A trusted device is not a free pass for guessing: its own failures cool it down.
    let mut last = StatusCode::OK;
    for _ in 0..8 {
        last = login(&app, email, "wrong guess", "198.51.100.2", Some(&device)).await.status();
    }
    assert_eq!(last, StatusCode::TOO_MANY_REQUESTS);
    let resp = login(&app, email, PASSWORD, "198.51.100.2", Some(&device)).await;
    assert_problem(resp, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    // Other places are not affected by that device's failures.
    assert_eq!(login(&app, email, PASSWORD, "192.0.2.80", None).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn cookie_mode_keeps_the_device_in_a_host_only_cookie() {
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        Store::InProcess,
        &[("TRUSTED_PROXIES", "127.0.0.1"), ("REFRESH_TOKEN_COOKIE", "true")],
    )
    .await;
    let email = "cookie-owner@example.com";
    assert_eq!(app.register(email, PASSWORD).await.status(), StatusCode::CREATED);
    let resp = login(&app, email, PASSWORD, "198.51.100.3", None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let cookies: Vec<String> =
        resp.headers().get_all("set-cookie").iter().map(|v| v.to_str().unwrap().to_owned()).collect();
    assert!(resp.headers().get("x-latchkey-set-cookie").is_none(), "the internal header never leaves");
    let device = cookies.iter().find(|c| c.starts_with("__Host-latchkey_device=")).expect("device cookie");
    assert!(cookies.iter().any(|c| c.starts_with("__Host-latchkey_refresh=")), "{cookies:?}");
    for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/;"] {
        assert!(device.contains(attr), "{device}");
    }
    let body: Value = resp.json().await.unwrap();
    assert!(body.get("device_token").is_none(), "not in the body in cookie mode: {body}");
    let pair = device.split(';').next().unwrap().to_owned();

    for _ in 0..30 {
        let _ = login(&app, email, "not the password", "203.0.113.20", None).await;
    }
    let resp = app
        .client
        .post(app.url("/v1/auth/login"))
        .header("x-forwarded-for", "192.0.2.99")
        .header("cookie", pair)
        .json(&json!({"email": email, "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "the device cookie is the device token");
}

#[tokio::test]
async fn malformed_emails_leave_no_failure_records() {
    let app = TestApp::spawn_with(Backend::Postgres, Store::Redis, ENV).await;
    for i in 0..20 {
        let resp = login(&app, &format!("not-an-email-{i}"), "whatever", "203.0.113.30", None).await;
        assert_problem(resp, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    }
    let client = redis::Client::open(app.resources.redis_url.clone().unwrap()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}cool:*", app.resources.redis_prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(keys.is_empty(), "failure records for addresses that cannot be accounts: {keys:?}");
}
