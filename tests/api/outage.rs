//! Redis is needed for sessions, not for start-up: the server fails closed while it is
//! away and heals by itself when it returns.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{Backend, PrivateRedis, Resources, Store, TestApp, assert_problem, eventually};

async fn ready(app: &TestApp) -> (StatusCode, Value) {
    let resp = app.get("/ready", None).await;
    (resp.status(), resp.json().await.unwrap())
}

#[tokio::test]
async fn starts_without_redis_fails_closed_and_heals_when_it_appears() {
    let mut redis = PrivateRedis::reserve();
    let resources = Resources::new(Backend::Postgres, &Store::RedisAt(redis.url())).await;
    let app = TestApp::spawn_on(resources, &[]).await;

    assert_eq!(app.get("/health", None).await.status(), StatusCode::OK);
    let (status, body) = ready(&app).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["checks"]["redis"], "unavailable", "{body}");
    assert_eq!(body["checks"]["database"], "ok", "{body}");

    // Register and login are rate limited in Redis, and login must make the session live:
    // without Redis they fail closed, quickly.
    for register in [true, false] {
        let started = Instant::now();
        let resp = if register {
            app.register("r@example.com", crate::helpers::PASSWORD).await
        } else {
            app.login("r@example.com", crate::helpers::PASSWORD).await
        };
        assert!(resp.headers().contains_key("retry-after"));
        assert_problem(resp, StatusCode::SERVICE_UNAVAILABLE, "service_unavailable").await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "failing closed must not hang: {:?}",
            started.elapsed()
        );
    }

    redis.start().await;
    assert!(
        eventually(Duration::from_secs(10), || async { ready(&app).await.0 == StatusCode::OK }).await,
        "/ready did not recover without a restart"
    );
    assert_eq!(app.register("r@example.com", crate::helpers::PASSWORD).await.status(), StatusCode::CREATED);
    let resp = app.login("r@example.com", crate::helpers::PASSWORD).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let tokens: Value = resp.json().await.unwrap();
    let access = tokens["access_token"].as_str().unwrap();
    assert_eq!(app.get("/v1/users/me", Some(access)).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn redis_going_away_makes_bearer_routes_503_until_it_returns() {
    let mut redis = PrivateRedis::reserve();
    redis.start().await;
    let resources = Resources::new(Backend::Sqlite, &Store::RedisAt(redis.url())).await;
    let app = TestApp::spawn_on(resources, &[]).await;
    let (_, tokens) = app.signed_in_user().await;
    assert_eq!(app.get("/v1/users/me", Some(&tokens.access)).await.status(), StatusCode::OK);

    redis.kill();
    for path in ["/v1/users/me", "/v1/auth/session"] {
        let started = Instant::now();
        let resp = app.get(path, Some(&tokens.access)).await;
        assert!(resp.headers().contains_key("retry-after"));
        assert_problem(resp, StatusCode::SERVICE_UNAVAILABLE, "service_unavailable").await;
        assert!(started.elapsed() < Duration::from_secs(5), "no hang: {:?}", started.elapsed());
    }
    for resp in [app.refresh(&tokens.refresh).await, app.login("x@example.com", "some password").await] {
        assert_problem(resp, StatusCode::SERVICE_UNAVAILABLE, "service_unavailable").await;
    }
    let (status, body) = ready(&app).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["checks"]["redis"], "unavailable");
    let metrics =
        app.client.get(format!("{}/metrics", app.metrics_address.as_ref().unwrap())).send().await.unwrap();
    let metrics = metrics.text().await.unwrap();
    assert!(metrics.contains(r#"latchkey_dependency_errors_total{dependency="redis"}"#), "{metrics}");

    // Back, empty (it keeps nothing on disk): the server reconnects by itself. The old
    // session's state is gone from Redis, so its token is refused as revoked, not passed.
    redis.start().await;
    assert!(
        eventually(Duration::from_secs(10), || async { ready(&app).await.0 == StatusCode::OK }).await,
        "/ready did not recover"
    );
    assert_problem(
        app.get("/v1/users/me", Some(&tokens.access)).await,
        StatusCode::UNAUTHORIZED,
        "token_revoked",
    )
    .await;
    let (_, fresh) = app.signed_in_user().await;
    assert_eq!(app.get("/v1/users/me", Some(&fresh.access)).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn postgres_going_away_fails_closed_and_heals() {
    use crate::helpers::PrivatePostgres;
    let pg = tokio::task::spawn_blocking(|| {
        let pg = PrivatePostgres::init();
        pg.start();
        pg
    })
    .await
    .unwrap();
    let resources = Resources::on_database(pg.url(), &Store::Redis);
    let app = TestApp::spawn_on(resources, &[("DATABASE_ACQUIRE_TIMEOUT", "1s")]).await;
    let (_, tokens) = app.signed_in_user().await;
    assert_eq!(app.get("/v1/users/me", Some(&tokens.access)).await.status(), StatusCode::OK);

    let pg = tokio::task::spawn_blocking(move || {
        pg.stop();
        pg
    })
    .await
    .unwrap();
    for _ in 0..2 {
        let started = Instant::now();
        let resp = app.get("/v1/users/me", Some(&tokens.access)).await;
        assert!(resp.headers().contains_key("retry-after"));
        assert_problem(resp, StatusCode::SERVICE_UNAVAILABLE, "service_unavailable").await;
        assert!(started.elapsed() < Duration::from_secs(5), "no hang: {:?}", started.elapsed());
    }
    assert_problem(
        app.refresh(&tokens.refresh).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "service_unavailable",
    )
    .await;
    assert_problem(
        app.login("x@example.com", "whatever pw").await,
        StatusCode::SERVICE_UNAVAILABLE,
        "service_unavailable",
    )
    .await;
    let (status, body) = ready(&app).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["checks"]["database"], "unavailable", "{body}");
    assert_eq!(body["checks"]["redis"], "ok", "{body}");
    // The bearer check itself needs no SQL: a session-only route keeps working.
    assert_eq!(app.get("/v1/auth/session", Some(&tokens.access)).await.status(), StatusCode::OK);

    let pg = tokio::task::spawn_blocking(move || {
        pg.start();
        pg
    })
    .await
    .unwrap();
    assert!(
        eventually(Duration::from_secs(15), || async { ready(&app).await.0 == StatusCode::OK }).await,
        "/ready did not recover without a restart"
    );
    assert_eq!(app.get("/v1/users/me", Some(&tokens.access)).await.status(), StatusCode::OK);
    let resp = app.refresh(&tokens.refresh).await;
    assert_eq!(resp.status(), StatusCode::OK);
    drop(pg);
}

/// PostgreSQL ends the server's connections (a failover, an administrator, a restart that
/// came and went between two requests): the profile reads that were using them fail
/// closed at worst, and the next ones run on new connections. Never a 500.
#[tokio::test]
async fn connections_ended_by_postgres_are_replaced_without_a_500() {
    let app = TestApp::spawn_with(Backend::Postgres, Store::Redis, &[]).await;
    let (_, tokens) = app.signed_in_user().await;
    let database = app.resources.pg_database.clone().unwrap();
    use sea_orm::ConnectionTrait as _;
    let admin = sea_orm::Database::connect(crate::helpers::admin_pg_url()).await.unwrap();
    let me = || async {
        let calls = (0..8).map(|_| async {
            let resp = app.get("/v1/users/me", Some(&tokens.access)).await;
            (resp.status(), resp.text().await.unwrap_or_default())
        });
        let answers = futures_util::future::join_all(calls).await;
        for (status, body) in &answers {
            if *status != StatusCode::OK {
                eprintln!("{status}: {body}");
            }
        }
        answers.into_iter().map(|(status, _)| status).collect::<Vec<_>>()
    };
    for round in 0..3 {
        // Keep the server's connections busy, then end every one of them (waiting up to 5 s
        // for each to be gone: termination is asynchronous).
        assert!(me().await.iter().all(|s| *s == StatusCode::OK), "round {round}: before");
        let ended = admin
            .query_all_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                format!(
                    "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity \
                     WHERE datname = '{database}' AND pid <> pg_backend_pid()"
                ),
            ))
            .await
            .unwrap();
        assert!(!ended.is_empty(), "round {round}: the server had connections to end");
        let first = me().await;
        assert!(
            first.iter().all(|s| *s == StatusCode::OK || *s == StatusCode::SERVICE_UNAVAILABLE),
            "round {round}: right after: {first:?}"
        );
        let next = me().await;
        assert!(next.iter().all(|s| *s == StatusCode::OK), "round {round}: the next requests: {next:?}");
    }
}
