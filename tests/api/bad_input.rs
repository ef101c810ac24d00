//! Bad input gets a clear 4xx with a stable code: never a 500, never a panic.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{Backend, PASSWORD, Store, TestApp, alone, assert_problem, rss_kib};

#[tokio::test]
async fn malformed_bodies_are_validation_failed() {
    let app = TestApp::spawn(Backend::Sqlite, Store::InProcess).await;
    let cases: &[(&str, &str)] = &[
        ("/v1/auth/register", "{not json"),
        ("/v1/auth/register", ""),
        ("/v1/auth/register", "[]"),
        ("/v1/auth/register", r#"{"email":"a@example.com"}"#),
        ("/v1/auth/register", r#"{"password":"long enough password"}"#),
        ("/v1/auth/register", r#"{"email":"a@example.com","password":"long enough password","admin":true}"#),
        ("/v1/auth/register", r#"{"email":42,"password":"long enough password"}"#),
        ("/v1/auth/register", r#"{"email":"a@example.com","password":12345678}"#),
        ("/v1/auth/register", r#"{"email":null,"password":"long enough password"}"#),
        ("/v1/auth/login", "{not json"),
        ("/v1/auth/login", r#"{"email":"a@example.com","password":"x","extra":1}"#),
        ("/v1/auth/refresh", "{}"),
        ("/v1/auth/refresh", r#"{"refresh_token":1}"#),
        ("/v1/auth/refresh", r#"{"refresh_token":"x","more":1}"#),
    ];
    for (path, body) in cases {
        let resp = app.post_raw(path, body).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{path} {body}");
        assert_problem(resp, StatusCode::BAD_REQUEST, "validation_failed").await;
    }
    // Not JSON at all.
    let resp = app
        .client
        .post(app.url("/v1/auth/login"))
        .header("content-type", "text/plain")
        .body("hi")
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_client_error());
    assert_problem(resp, StatusCode::BAD_REQUEST, "validation_failed").await;
}

#[tokio::test]
async fn invalid_emails_and_passwords_are_refused_at_registration() {
    // About the length rules alone: the strength rule would refuse the repeated `é`s below
    // (tests/api/passwords.rs tests it, and that length is checked first).
    let app = TestApp::spawn_with(Backend::Sqlite, Store::InProcess, &[("PASSWORD_MIN_STRENGTH", "0")]).await;
    for email in ["", "plain", "a@b", "a b@example.com", "@example.com"] {
        let body =
            assert_problem(app.register(email, PASSWORD).await, StatusCode::BAD_REQUEST, "validation_failed")
                .await;
        assert!(body["detail"].as_str().unwrap().contains("email"));
    }
    let too_long_email = format!("{}@example.com", "a".repeat(250));
    assert_problem(
        app.register(&too_long_email, PASSWORD).await,
        StatusCode::BAD_REQUEST,
        "validation_failed",
    )
    .await;
    for password in ["", "short", "1234567", "ééééééé"] {
        let body = assert_problem(
            app.register("p@example.com", password).await,
            StatusCode::BAD_REQUEST,
            "validation_failed",
        )
        .await;
        assert!(body["detail"].as_str().unwrap().contains("password"));
    }
    let huge = "x".repeat(1025);
    assert_problem(app.register("p@example.com", &huge).await, StatusCode::BAD_REQUEST, "validation_failed")
        .await;
    assert_problem(app.login("p@example.com", &huge).await, StatusCode::BAD_REQUEST, "validation_failed")
        .await;
    // 8 characters of 2 bytes each is long enough; 1024 characters is not too long.
    assert_eq!(app.register("p@example.com", "éééééééé").await.status(), StatusCode::CREATED);
    assert_eq!(app.register("q@example.com", &"é".repeat(1024)).await.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn wrong_password_and_unknown_email_are_indistinguishable() {
    let app = TestApp::spawn(Backend::Sqlite, Store::InProcess).await;
    assert_eq!(app.register("known@example.com", PASSWORD).await.status(), StatusCode::CREATED);
    let wrong = app.login("known@example.com", "not the password").await;
    let wrong_headers = wrong.headers().clone();
    let wrong_body = assert_problem(wrong, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    let unknown = app.login("nobody@example.com", "not the password").await;
    let unknown_headers = unknown.headers().clone();
    let unknown_body = assert_problem(unknown, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    assert_eq!(wrong_body, unknown_body);
    assert_eq!(wrong_headers["www-authenticate"], unknown_headers["www-authenticate"]);
    let malformed =
        assert_problem(app.login("not-an-email", "x").await, StatusCode::UNAUTHORIZED, "invalid_credentials")
            .await;
    assert_eq!(malformed, wrong_body);
}

#[tokio::test]
async fn oversized_bodies_are_413_whether_declared_or_streamed() {
    let app = TestApp::spawn(Backend::Sqlite, Store::InProcess).await;
    let big = json!({"email": "a@example.com", "password": "x".repeat(70_000)}).to_string();
    assert_problem(
        app.post_raw("/v1/auth/register", &big).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    )
    .await;
    // Chunked, without Content-Length.
    let stream = futures_stream(big);
    let resp = app
        .client
        .post(app.url("/v1/auth/register"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_problem(resp, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
}

/// An HTTP/2 client that sends neither Content-Length nor Transfer-Encoding (HTTP/2 has
/// no chunked encoding) and streams 64 MiB at a login. The server must stop at
/// `MAX_BODY_BYTES`, not read it all into memory first.
#[tokio::test]
async fn an_http2_body_streamed_without_a_length_is_cut_at_the_limit() {
    // The check reads this process's memory: other tests beside it would blur it.
    if !alone("bad_input::an_http2_body_streamed_without_a_length_is_cut_at_the_limit") {
        return;
    }
    let app = TestApp::spawn(Backend::Sqlite, Store::InProcess).await;
    let client = h2_client();
    let warm = client.get(app.url("/health")).send().await.unwrap();
    assert_eq!((warm.version(), warm.status()), (reqwest::Version::HTTP_2, StatusCode::OK));

    let before = rss_kib();
    let peak = Arc::new(AtomicU64::new(before));
    let sampler = tokio::spawn({
        let peak = Arc::clone(&peak);
        async move {
            loop {
                peak.fetch_max(rss_kib(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    const CHUNK: usize = 64 * 1024;
    let chunks = (0..1024)
        .map(|i| Ok::<_, std::io::Error>(if i == 0 { br#"{"email":""#.to_vec() } else { vec![b'a'; CHUNK] }));
    let resp = client
        .post(app.url("/v1/auth/login"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    sampler.abort();
    peak.fetch_max(rss_kib(), Ordering::Relaxed);
    let grown = peak.load(Ordering::Relaxed).saturating_sub(before);
    assert!(grown < 8 * 1024, "the server's memory grew by {grown} KiB while 64 MiB were streamed at it");
    assert_problem(resp, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
}

/// The same client sending a few bytes now and then: `HTTP_BODY_TIMEOUT` bounds it too.
#[tokio::test]
async fn an_http2_body_trickled_without_a_length_gets_408() {
    let app = TestApp::spawn_with(Backend::Sqlite, Store::InProcess, &[("HTTP_BODY_TIMEOUT", "1s")]).await;
    let trickle = futures_util::stream::unfold(0u32, |i| async move {
        (i < 40).then_some(())?;
        tokio::time::sleep(Duration::from_millis(250)).await;
        let chunk = if i == 0 { br#"{"email":""#.to_vec() } else { b"a".to_vec() };
        Some((Ok::<_, std::io::Error>(chunk), i + 1))
    });
    let started = std::time::Instant::now();
    let resp = h2_client()
        .post(app.url("/v1/auth/login"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(trickle))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_problem(resp, StatusCode::REQUEST_TIMEOUT, "request_timeout").await;
    assert!(started.elapsed() < Duration::from_secs(4), "answered after {:?}", started.elapsed());
}

/// HTTP/2 without the upgrade dance (h2c prior knowledge), as gRPC-style clients speak it.
fn h2_client() -> reqwest::Client {
    reqwest::Client::builder().http2_prior_knowledge().timeout(Duration::from_secs(30)).build().unwrap()
}

fn futures_stream(
    body: String,
) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send + 'static {
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        body.into_bytes().chunks(4096).map(|c| Ok(c.to_vec())).collect();
    futures_util::stream::iter(chunks)
}

#[tokio::test]
async fn unknown_routes_and_wrong_methods_get_the_json_body() {
    let app = TestApp::spawn(Backend::Sqlite, Store::InProcess).await;
    assert_problem(app.get("/no/such/route", None).await, StatusCode::NOT_FOUND, "not_found").await;
    assert_problem(
        app.get("/v1/auth/login", None).await,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    )
    .await;
    let resp = app.client.put(app.url("/v1/users/me")).send().await.unwrap();
    assert_problem(resp, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
}

#[tokio::test]
async fn equal_failures_have_equal_bodies_and_a_request_id_header() {
    let app = TestApp::spawn(Backend::Sqlite, Store::InProcess).await;
    let a = app.get("/v1/users/me", Some("garbage")).await;
    let b = app.get("/v1/users/me", Some("garbage")).await;
    let (ida, idb) = (a.headers()["x-request-id"].clone(), b.headers()["x-request-id"].clone());
    assert_ne!(ida, idb);
    assert_eq!(a.text().await.unwrap(), b.text().await.unwrap());
}
