//! The whole flow, on PostgreSQL + Redis and on SQLite + the in-process store.

use reqwest::StatusCode;
use sea_orm::{ColumnTrait as _, EntityTrait as _, QueryFilter as _};
use serde_json::{Value, json};
use sha2::Digest as _;

use crate::helpers::{Backend, PASSWORD, Store, TestApp, Tokens, assert_problem};
use latchkey::store::entity::{refresh_token, user};

async fn full_flow(app: &TestApp) {
    // register
    let resp = app.register("  Ada.Lovelace@Example.COM ", PASSWORD).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let created: Value = resp.json().await.unwrap();
    assert_eq!(created["email"], "ada.lovelace@example.com", "emails are normalised");
    assert!(created["id"].is_string() && created["created_at"].is_string());

    // login, with the token response's shape and headers
    let resp = app.login("ada.lovelace@example.com", PASSWORD).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let first = Tokens::from(resp.json::<Value>().await.unwrap());
    assert_eq!(first.body["token_type"], "Bearer");
    assert_eq!(first.body["expires_in"], 900);
    assert_eq!(first.body["refresh_expires_in"], 30 * 86400);

    // me
    let resp = app.get("/v1/users/me", Some(&first.access)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let me: Value = resp.json().await.unwrap();
    assert_eq!(me["email"], "ada.lovelace@example.com");
    assert_eq!(me["id"], created["id"]);
    assert!(me["last_login_at"].is_string());

    // the session as the store sees it
    let resp = app.get("/v1/auth/session", Some(&first.access)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let session: Value = resp.json().await.unwrap();
    assert_eq!(session["session_id"], first.session_id.as_str());
    assert_eq!(session["user_id"], created["id"]);
    assert_eq!(session["roles"], json!([]));

    // refresh rotates
    let resp = app.refresh(&first.refresh).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let second = Tokens::from(resp.json::<Value>().await.unwrap());
    assert_ne!(second.refresh, first.refresh);
    assert_eq!(second.session_id, first.session_id, "same session");
    assert_eq!(app.get("/v1/users/me", Some(&second.access)).await.status(), StatusCode::OK);
    // replaying the old one within the grace window gets that same successor, no new branch
    let again = Tokens::from(app.refresh(&first.refresh).await.json::<Value>().await.unwrap());
    assert_eq!(again.refresh, second.refresh);

    // logout: the very same access tokens now fail, and so does the refresh token
    let resp = app.post_bearer("/v1/auth/logout", &second.access).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_problem(
        app.get("/v1/users/me", Some(&second.access)).await,
        StatusCode::UNAUTHORIZED,
        "token_revoked",
    )
    .await;
    assert_problem(
        app.get("/v1/auth/session", Some(&first.access)).await,
        StatusCode::UNAUTHORIZED,
        "token_revoked",
    )
    .await;
    assert_problem(app.refresh(&second.refresh).await, StatusCode::UNAUTHORIZED, "invalid_token").await;

    // what SQL holds: only hashes
    let stored = refresh_token::Entity::find().all(&app.state.db).await.unwrap();
    assert_eq!(stored.len(), 2);
    for row in &stored {
        assert_ne!(row.token_hash, first.refresh);
        assert_ne!(row.token_hash, second.refresh);
    }
    let expected = latchkey::password::hex(&sha2::Sha256::digest(second.refresh.as_bytes()));
    assert!(stored.iter().any(|r| r.token_hash == expected), "SHA-256 of the token");
    let account = user::Entity::find()
        .filter(user::Column::Email.eq("ada.lovelace@example.com"))
        .one(&app.state.db)
        .await
        .unwrap()
        .unwrap();
    assert!(
        account.password_hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
        "{}",
        account.password_hash
    );
}

#[tokio::test]
async fn full_flow_on_postgres_and_redis() {
    let app = TestApp::spawn(Backend::Postgres, Store::Redis).await;
    full_flow(&app).await;
}

#[tokio::test]
async fn full_flow_on_mariadb_and_redis() {
    let app = TestApp::spawn(Backend::MariaDb, Store::Redis).await;
    full_flow(&app).await;
}

#[tokio::test]
async fn full_flow_on_sqlite_and_in_process_store() {
    let app = TestApp::spawn(Backend::Sqlite, Store::InProcess).await;
    full_flow(&app).await;
}

#[tokio::test]
async fn duplicate_registration_is_409_email_taken() {
    let app = TestApp::spawn(Backend::Sqlite, Store::InProcess).await;
    assert_eq!(app.register("dup@example.com", PASSWORD).await.status(), StatusCode::CREATED);
    assert_problem(app.register(" DUP@example.com", PASSWORD).await, StatusCode::CONFLICT, "email_taken")
        .await;
}

#[tokio::test]
async fn tokens_survive_a_restart_and_work_on_every_instance() {
    let a = TestApp::spawn(Backend::Postgres, Store::Redis).await;
    let (_, tokens) = a.signed_in_user().await;
    let resources = a.resources.clone();
    a.stop().await;

    // A new process on the same database and Redis: same keys, same sessions.
    let b = TestApp::spawn_on(resources.clone(), &[]).await;
    let c = TestApp::spawn_on(resources, &[]).await;
    assert_eq!(b.get("/v1/users/me", Some(&tokens.access)).await.status(), StatusCode::OK);
    let jwks_b: Value = b.get("/.well-known/jwks.json", None).await.json().await.unwrap();
    let jwks_c: Value = c.get("/.well-known/jwks.json", None).await.json().await.unwrap();
    assert_eq!(jwks_b, jwks_c, "one signing key for every instance");
    assert_eq!(jwks_b["keys"].as_array().map(Vec::len), Some(1));

    // A refresh on one instance, a logout on another: the next request anywhere fails.
    let resp = c.refresh(&tokens.refresh).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let rotated = Tokens::from(resp.json::<Value>().await.unwrap());
    assert_eq!(b.get("/v1/users/me", Some(&rotated.access)).await.status(), StatusCode::OK);
    assert_eq!(b.post_bearer("/v1/auth/logout", &rotated.access).await.status(), StatusCode::NO_CONTENT);
    assert_problem(
        c.get("/v1/users/me", Some(&tokens.access)).await,
        StatusCode::UNAUTHORIZED,
        "token_revoked",
    )
    .await;
    assert_problem(
        c.get("/v1/users/me", Some(&rotated.access)).await,
        StatusCode::UNAUTHORIZED,
        "token_revoked",
    )
    .await;
}

#[tokio::test]
async fn with_the_in_process_store_a_restart_ends_sessions_but_keeps_keys() {
    let a = TestApp::spawn(Backend::Sqlite, Store::InProcess).await;
    let (_, tokens) = a.signed_in_user().await;
    let jwks_before: Value = a.get("/.well-known/jwks.json", None).await.json().await.unwrap();
    let resources = a.resources.clone();
    a.stop().await;

    let b = TestApp::spawn_on(resources, &[]).await;
    let jwks_after: Value = b.get("/.well-known/jwks.json", None).await.json().await.unwrap();
    assert_eq!(jwks_before, jwks_after, "the signing key is kept in SQL");
    // The signature still verifies; the session is simply not live in the new process.
    assert_problem(
        b.get("/v1/users/me", Some(&tokens.access)).await,
        StatusCode::UNAUTHORIZED,
        "token_revoked",
    )
    .await;
}

#[tokio::test]
async fn concurrent_starts_on_one_postgres_database_agree_on_schema_and_key() {
    concurrent_starts_agree_on_schema_and_key(Backend::Postgres).await;
}

#[tokio::test]
async fn concurrent_starts_on_one_mariadb_database_agree_on_schema_and_key() {
    concurrent_starts_agree_on_schema_and_key(Backend::MariaDb).await;
}

async fn concurrent_starts_agree_on_schema_and_key(backend: Backend) {
    // Three instances start at once on an empty database: they race to migrate and to
    // create the first signing key, and must end up with one schema and one key.
    let fresh = crate::helpers::Resources::new(backend, &Store::InProcess).await;
    let (a, b, c) = tokio::join!(
        TestApp::spawn_on(fresh.clone(), &[]),
        TestApp::spawn_on(fresh.clone(), &[]),
        TestApp::spawn_on(fresh, &[]),
    );
    let mut sets = Vec::new();
    for app in [&a, &b, &c] {
        let jwks: Value = app.get("/.well-known/jwks.json", None).await.json().await.unwrap();
        sets.push(jwks);
    }
    assert_eq!(sets[0]["keys"].as_array().map(Vec::len), Some(1), "exactly one key: {}", sets[0]);
    assert!(sets.iter().all(|s| *s == sets[0]), "{sets:?}");
}
