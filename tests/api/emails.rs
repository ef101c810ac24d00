//! Emails: one address, one account, however its characters are encoded; invisible
//! characters refused; the login limiter counts the same normalised address.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{Backend, PASSWORD, Store, TestApp, assert_problem};

/// `é` as one code point (NFC) and as `e` + U+0301 (NFD).
const NFC: &str = "ren\u{e9}@example.com";
const NFD: &str = "rene\u{301}@example.com";

#[tokio::test]
async fn nfc_and_nfd_forms_of_one_address_register_one_account() {
    let app = TestApp::spawn(Backend::Postgres, Store::InProcess).await;
    let resp = app.register(NFC, PASSWORD).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let created: Value = resp.json().await.unwrap();
    assert_eq!(created["email"], NFC);
    assert_problem(app.register(NFD, PASSWORD).await, StatusCode::CONFLICT, "email_taken").await;
    // Either form logs in to that one account.
    assert_eq!(app.login(NFD, PASSWORD).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn an_internationalised_address_is_stored_with_an_ascii_domain_and_logs_in_either_way() {
    let app = TestApp::spawn(Backend::Sqlite, Store::InProcess).await;
    let resp = app.register("ÜBER@BÜCHER.example", PASSWORD).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let created: Value = resp.json().await.unwrap();
    assert_eq!(created["email"], "über@xn--bcher-kva.example");
    for form in ["über@xn--bcher-kva.example", "über@bücher.example", "U\u{308}BER@XN--BCHER-KVA.EXAMPLE"]
    {
        assert_eq!(app.login(form, PASSWORD).await.status(), StatusCode::OK, "{form}");
    }
    assert_problem(
        app.register("über@xn--bcher-kva.example", PASSWORD).await,
        StatusCode::CONFLICT,
        "email_taken",
    )
    .await;
}

#[tokio::test]
async fn an_address_with_an_invisible_character_is_refused() {
    let app = TestApp::spawn(Backend::Sqlite, Store::InProcess).await;
    for bad in [
        "ali\u{200b}ce@example.com",
        "alice@exam\u{ad}ple.com",
        "\u{feff}alice@example.com",
        "alice\u{202e}@example.com",
        "alice@example\u{2066}.com",
    ] {
        let body =
            assert_problem(app.register(bad, PASSWORD).await, StatusCode::BAD_REQUEST, "validation_failed")
                .await;
        assert!(body["detail"].as_str().unwrap().contains("email"), "{body}");
    }
    // Not a look-alike of a real account either: the visible address is still free.
    assert_eq!(app.register("alice@example.com", PASSWORD).await.status(), StatusCode::CREATED);
}

async fn login_from(app: &TestApp, email: &str, password: &str, ip: &str) -> reqwest::Response {
    app.client
        .post(app.url("/v1/auth/login"))
        .header("x-forwarded-for", ip)
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn another_encoding_of_the_address_buys_no_new_login_budget() {
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        Store::InProcess,
        &[
            ("RATE_LIMIT_LOGIN_PER_ACCOUNT", "3/1m"),
            ("TRUSTED_PROXIES", "127.0.0.1"),
            ("LOGIN_COOLDOWN_THRESHOLD", "100"),
        ],
    )
    .await;
    assert_eq!(app.register(NFC, PASSWORD).await.status(), StatusCode::CREATED);
    for (i, form) in [NFC, NFD, "RENE\u{301}@EXAMPLE.COM"].into_iter().enumerate() {
        let resp = login_from(&app, form, "wrong password", &format!("203.0.113.{i}")).await;
        assert_problem(resp, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    }
    let resp = login_from(&app, NFD, PASSWORD, "203.0.113.99").await;
    assert_problem(resp, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
}

#[tokio::test]
async fn malformed_emails_are_charged_per_address_but_start_no_account_cooldown() {
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        Store::InProcess,
        &[
            ("RATE_LIMIT_LOGIN_PER_IP", "4/1m"),
            ("RATE_LIMIT_LOGIN_PER_ACCOUNT", "1/1m"),
            ("LOGIN_COOLDOWN_THRESHOLD", "1"),
            ("LOGIN_COOLDOWN_BASE", "1m"),
            ("LOGIN_COOLDOWN_MAX", "1m"),
            ("TRUSTED_PROXIES", "127.0.0.1"),
        ],
    )
    .await;
    assert_eq!(app.register("known@example.com", PASSWORD).await.status(), StatusCode::CREATED);
    let wrong = assert_problem(
        login_from(&app, "known@example.com", "wrong password", "198.51.100.1").await,
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
    )
    .await;
    // The same malformed address again and again, from fresh client addresses: no account
    // budget and no cool-down builds up for it (it cannot be an account), and each attempt
    // is answered exactly like a wrong password.
    for i in 0..3 {
        let resp =
            login_from(&app, "not-an-email", "wrong password", &format!("198.51.100.{}", 10 + i)).await;
        let body = assert_problem(resp, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        assert_eq!(body, wrong);
    }
    // It is still charged to the client's address.
    for _ in 0..4 {
        let resp = login_from(&app, "not-an-email", "wrong password", "198.51.100.50").await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    }
    let resp = login_from(&app, "not-an-email", "wrong password", "198.51.100.50").await;
    assert_problem(resp, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
}
