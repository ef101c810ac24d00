//! New passwords must reach PASSWORD_MIN_STRENGTH (a zxcvbn score), judged with the
//! account's email as context; the answer says why, never echoing the password.

use reqwest::StatusCode;

use crate::helpers::{Backend, PASSWORD, Store, TestApp, assert_problem};

#[tokio::test]
async fn a_common_password_is_refused_with_weak_password_and_helpful_feedback() {
    let app = TestApp::spawn(Backend::Sqlite, Store::InProcess).await;
    let body = assert_problem(
        app.register("ada@example.com", "password123").await,
        StatusCode::BAD_REQUEST,
        "weak_password",
    )
    .await;
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("common"), "zxcvbn's warning: {detail}");
    assert!(detail.contains("word"), "and its suggestion: {detail}");
    assert!(!detail.contains("password123"), "{detail}");
    // Nothing was created: the address is still free.
    assert_eq!(app.register("ada@example.com", PASSWORD).await.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn a_password_spelling_the_email_is_weak_for_that_account_only() {
    let app = TestApp::spawn(Backend::Sqlite, Store::InProcess).await;
    let password = "zq7-kestrel-plinth";
    let body = assert_problem(
        app.register("zq7-kestrel-plinth@example.com", password).await,
        StatusCode::BAD_REQUEST,
        "weak_password",
    )
    .await;
    assert!(!body["detail"].as_str().unwrap().contains("kestrel"), "{body}");
    assert_eq!(app.register("someone@example.com", password).await.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn a_strong_passphrase_is_accepted() {
    let app = TestApp::spawn(Backend::Postgres, Store::Redis).await;
    let resp = app.register("grace@example.com", "tangerine orbit velvet quarry lantern").await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(
        app.login("grace@example.com", "tangerine orbit velvet quarry lantern").await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn the_length_rule_is_checked_first() {
    let app = TestApp::spawn(Backend::Sqlite, Store::InProcess).await;
    let body = assert_problem(
        app.register("ada@example.com", "abc").await,
        StatusCode::BAD_REQUEST,
        "validation_failed",
    )
    .await;
    assert!(body["detail"].as_str().unwrap().contains("8 characters"), "{body}");
}

#[tokio::test]
async fn password_min_strength_0_accepts_weak_passwords() {
    let app = TestApp::spawn_with(Backend::Sqlite, Store::InProcess, &[("PASSWORD_MIN_STRENGTH", "0")]).await;
    assert_eq!(app.register("ada@example.com", "password123").await.status(), StatusCode::CREATED);
    assert_eq!(app.login("ada@example.com", "password123").await.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_bad_password_min_strength_stops_start_up_naming_it() {
    let resources = crate::helpers::Resources::new(Backend::Sqlite, &Store::InProcess).await;
    let err =
        TestApp::try_spawn_on(resources, &[("PASSWORD_MIN_STRENGTH", "5")]).await.err().expect("refused");
    assert!(err.to_string().contains("PASSWORD_MIN_STRENGTH"), "{err}");
}
