//! Sessions: rotation with theft detection, the concurrent-refresh grace window, device
//! lists, revocation, admin routes, expiry and self-healing from SQL. Every rule runs on
//! PostgreSQL + Redis and on SQLite + the in-process store.

use std::time::Duration;

use futures_util::future::join_all;
use reqwest::StatusCode;
use sea_orm::{ColumnTrait as _, EntityTrait as _, PaginatorTrait as _, QueryFilter as _};
use serde_json::Value;
use uuid::Uuid;

use crate::helpers::{Backend, PrivateRedis, Resources, Store, TestApp, Tokens, assert_problem};
use latchkey::store::entity::{refresh_token, session};

/// Runs one scenario in both configurations.
macro_rules! both {
    ($name:ident) => {
        mod $name {
            use super::*;
            #[tokio::test]
            async fn postgres_redis() {
                super::$name(TestApp::spawn(Backend::Postgres, Store::Redis).await).await;
            }
            #[tokio::test]
            async fn mariadb_redis() {
                super::$name(TestApp::spawn(Backend::MariaDb, Store::Redis).await).await;
            }
            #[tokio::test]
            async fn sqlite_in_process() {
                super::$name(TestApp::spawn(Backend::Sqlite, Store::InProcess).await).await;
            }
        }
    };
}

async fn refreshed(app: &TestApp, refresh: &str) -> Tokens {
    let resp = app.refresh(refresh).await;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    Tokens::from(body)
}

async fn live_refresh_tokens(app: &TestApp, session_id: &str) -> u64 {
    let sid: Uuid = session_id.parse().unwrap();
    refresh_token::Entity::find()
        .filter(refresh_token::Column::SessionId.eq(sid))
        .filter(refresh_token::Column::RetiredAt.is_null())
        .filter(refresh_token::Column::RevokedAt.is_null())
        .count(&app.state.db)
        .await
        .unwrap()
}

both!(rotation_records_parent_and_child);
async fn rotation_records_parent_and_child(app: TestApp) {
    let (_, first) = app.signed_in_user().await;
    let second = refreshed(&app, &first.refresh).await;
    let third = refreshed(&app, &second.refresh).await;
    assert_ne!(second.refresh, third.refresh);
    let rows = refresh_token::Entity::find().all(&app.state.db).await.unwrap();
    assert_eq!(rows.len(), 3);
    let root = rows.iter().find(|r| r.parent_id.is_none()).unwrap();
    let child = rows.iter().find(|r| r.parent_id == Some(root.id)).unwrap();
    let grandchild = rows.iter().find(|r| r.parent_id == Some(child.id)).unwrap();
    assert!(root.retired_at.is_some() && child.retired_at.is_some() && grandchild.retired_at.is_none());
    assert_eq!(live_refresh_tokens(&app, &first.session_id).await, 1);
}

both!(replay_within_the_grace_window_returns_the_same_successor);
async fn replay_within_the_grace_window_returns_the_same_successor(app: TestApp) {
    let (_, first) = app.signed_in_user().await;
    let second = refreshed(&app, &first.refresh).await;
    app.clock.advance(Duration::from_secs(5));
    let again = refreshed(&app, &first.refresh).await;
    assert_eq!(again.refresh, second.refresh, "the same successor, not a new branch");
    assert_eq!(again.session_id, second.session_id);
    assert_eq!(app.get("/v1/users/me", Some(&again.access)).await.status(), StatusCode::OK);
    assert_eq!(live_refresh_tokens(&app, &first.session_id).await, 1);
    // The successor still rotates normally.
    refreshed(&app, &second.refresh).await;
}

both!(replay_after_the_successor_rotated_is_refused_without_revoking);
async fn replay_after_the_successor_rotated_is_refused_without_revoking(app: TestApp) {
    let (_, first) = app.signed_in_user().await;
    let second = refreshed(&app, &first.refresh).await;
    let third = refreshed(&app, &second.refresh).await;
    assert_problem(app.refresh(&first.refresh).await, StatusCode::UNAUTHORIZED, "refresh_token_reused").await;
    // Not theft: the session lives on.
    assert_eq!(app.get("/v1/users/me", Some(&third.access)).await.status(), StatusCode::OK);
    refreshed(&app, &third.refresh).await;
}

both!(replay_after_the_window_revokes_the_whole_session);
async fn replay_after_the_window_revokes_the_whole_session(app: TestApp) {
    let (_, first) = app.signed_in_user().await;
    let second = refreshed(&app, &first.refresh).await;
    app.clock.advance(Duration::from_secs(11));
    assert_problem(app.refresh(&first.refresh).await, StatusCode::UNAUTHORIZED, "refresh_token_reused").await;
    // The thief's replay ended the family: the legitimate holder's tokens die too.
    assert_problem(
        app.get("/v1/users/me", Some(&second.access)).await,
        StatusCode::UNAUTHORIZED,
        "token_revoked",
    )
    .await;
    assert!(app.refresh(&second.refresh).await.status() == StatusCode::UNAUTHORIZED);
    let sid: Uuid = first.session_id.parse().unwrap();
    let row = session::Entity::find_by_id(sid).one(&app.state.db).await.unwrap().unwrap();
    assert!(row.revoked_at.is_some());
    assert_eq!(live_refresh_tokens(&app, &first.session_id).await, 0);
    // And it is audited.
    assert!(
        crate::helpers::eventually(Duration::from_secs(5), || async {
            audit_actions(&app).await.iter().any(|(a, _)| a == "refresh_token_reused")
        })
        .await
    );
}

pub async fn audit_actions(app: &TestApp) -> Vec<(String, String)> {
    use latchkey::store::entity::audit_log;
    audit_log::Entity::find()
        .all(&app.state.db)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.action, r.outcome))
        .collect()
}

both!(eight_concurrent_refreshes_share_one_successor);
async fn eight_concurrent_refreshes_share_one_successor(app: TestApp) {
    let (_, first) = app.signed_in_user().await;
    let app = std::sync::Arc::new(app);
    let tasks = (0..8).map(|_| {
        let app = app.clone();
        let token = first.refresh.clone();
        tokio::spawn(async move {
            let resp = app.refresh(&token).await;
            let status = resp.status();
            (status, resp.json::<Value>().await.unwrap())
        })
    });
    let results: Vec<(StatusCode, Value)> = join_all(tasks).await.into_iter().map(Result::unwrap).collect();
    for (status, body) in &results {
        assert_eq!(*status, StatusCode::OK, "{body}");
    }
    let successor = results[0].1["refresh_token"].clone();
    assert!(
        results.iter().all(|(_, b)| b["refresh_token"] == successor),
        "one successor for all: {results:?}"
    );
    assert_eq!(live_refresh_tokens(&app, &first.session_id).await, 1, "exactly one live refresh token");
    let access = results[7].1["access_token"].as_str().unwrap();
    assert_eq!(app.get("/v1/auth/session", Some(access)).await.status(), StatusCode::OK);
}

both!(session_list_with_device_and_ip);
async fn session_list_with_device_and_ip(app: TestApp) {
    let firefox = "Mozilla/5.0 (X11; Linux x86_64; rv:132.0) Gecko/20100101 Firefox/132.0";
    let _ = app.register("dev@example.com", crate::helpers::PASSWORD).await;
    let a = app.login_with("dev@example.com", &[("user-agent", firefox)]).await;
    let b = app.login_with("dev@example.com", &[("user-agent", "curl/8.5.0")]).await;
    let resp = app.get("/v1/users/me/sessions", Some(&a.access)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    let sessions = body["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 2, "{body}");
    let mine = sessions.iter().find(|s| s["id"] == a.session_id.as_str()).unwrap();
    assert_eq!(mine["current"], true);
    assert_eq!(mine["user_agent"], firefox);
    assert_eq!(mine["device"], "Firefox 132 on Linux");
    assert_eq!(mine["ip_address"], "127.0.0.1");
    for field in ["created_at", "last_used_at", "expires_at"] {
        assert!(mine[field].is_string(), "{field}: {mine}");
    }
    let other = sessions.iter().find(|s| s["id"] == b.session_id.as_str()).unwrap();
    assert_eq!(other["current"], false);

    // Delete the other one: its tokens stop at once.
    let resp = app.delete(&format!("/v1/users/me/sessions/{}", b.session_id), &a.access).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_problem(app.get("/v1/users/me", Some(&b.access)).await, StatusCode::UNAUTHORIZED, "token_revoked")
        .await;
    assert_eq!(app.refresh(&b.refresh).await.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(app.get("/v1/users/me", Some(&a.access)).await.status(), StatusCode::OK);
    let body: Value = app.get("/v1/users/me/sessions", Some(&a.access)).await.json().await.unwrap();
    assert_eq!(body["sessions"].as_array().unwrap().len(), 1);
}

both!(another_users_session_is_not_found);
async fn another_users_session_is_not_found(app: TestApp) {
    let mallory = app.user("mallory@example.com").await;
    let victim = app.user("victim@example.com").await;
    let resp = app.delete(&format!("/v1/users/me/sessions/{}", victim.session_id), &mallory.access).await;
    let not_found = assert_problem(resp, StatusCode::NOT_FOUND, "not_found").await;
    let resp = app.delete(&format!("/v1/users/me/sessions/{}", Uuid::new_v4()), &mallory.access).await;
    assert_eq!(
        assert_problem(resp, StatusCode::NOT_FOUND, "not_found").await,
        not_found,
        "indistinguishable"
    );
    assert_eq!(app.get("/v1/users/me", Some(&victim.access)).await.status(), StatusCode::OK);
    let resp = app.delete("/v1/users/me/sessions/not-a-uuid", &mallory.access).await;
    assert!(resp.status().is_client_error());
    // The route exists and works on one's own session.
    let own = app.delete(&format!("/v1/users/me/sessions/{}", mallory.session_id), &mallory.access).await;
    assert_eq!(own.status(), StatusCode::NO_CONTENT);
}

both!(logout_all_ends_every_session);
async fn logout_all_ends_every_session(app: TestApp) {
    let a = app.user("many@example.com").await;
    let b = app.login_with("many@example.com", &[]).await;
    let other = app.user("bystander@example.com").await;
    let resp = app.post_bearer("/v1/auth/logout-all", &a.access).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    for t in [&a, &b] {
        assert_problem(
            app.get("/v1/users/me", Some(&t.access)).await,
            StatusCode::UNAUTHORIZED,
            "token_revoked",
        )
        .await;
        assert_eq!(app.refresh(&t.refresh).await.status(), StatusCode::UNAUTHORIZED);
    }
    assert_eq!(app.get("/v1/users/me", Some(&other.access)).await.status(), StatusCode::OK);
}

both!(admin_routes_need_the_role_in_sql);
async fn admin_routes_need_the_role_in_sql(app: TestApp) {
    let user = app.user("plain@example.com").await;
    let user_id = app.get("/v1/users/me", Some(&user.access)).await.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let sessions_path = format!("/v1/admin/users/{user_id}/sessions");
    let revoke_path = format!("/v1/admin/users/{user_id}/revoke-sessions");
    assert_problem(app.get(&sessions_path, Some(&user.access)).await, StatusCode::FORBIDDEN, "forbidden")
        .await;
    assert_problem(app.post_bearer(&revoke_path, &user.access).await, StatusCode::FORBIDDEN, "forbidden")
        .await;

    let _ = app.register("boss@example.com", crate::helpers::PASSWORD).await;
    latchkey::service::users::grant_role(&app.state.db, "boss@example.com", "admin", app.clock.now())
        .await
        .unwrap();
    let admin = app.login_with("boss@example.com", &[]).await;
    let (_, claims) = crate::tokens::parts(&admin.access);
    assert_eq!(claims["roles"], serde_json::json!(["admin"]));
    let resp = app.get(&sessions_path, Some(&admin.access)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["sessions"][0]["id"], user.session_id.as_str());
    let resp = app.post_bearer(&revoke_path, &admin.access).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_problem(
        app.get("/v1/users/me", Some(&user.access)).await,
        StatusCode::UNAUTHORIZED,
        "token_revoked",
    )
    .await;

    // Demoted in SQL: refused on the very next request, although the token still says admin.
    latchkey::service::users::revoke_role(&app.state.db, "boss@example.com", "admin").await.unwrap();
    assert_problem(app.get(&sessions_path, Some(&admin.access)).await, StatusCode::FORBIDDEN, "forbidden")
        .await;
}

both!(concurrent_profile_reads_each_get_their_own_account);
/// `/v1/users/me` reads of concurrent requests share SQL queries: each must still get its
/// own account, and see a change made in SQL just before it.
async fn concurrent_profile_reads_each_get_their_own_account(app: TestApp) {
    let emails: Vec<String> = (0..10).map(|i| format!("reader-{i}@example.com")).collect();
    let mut tokens = Vec::new();
    for email in &emails {
        tokens.push(app.user(email).await);
    }
    latchkey::service::users::grant_role(&app.state.db, &emails[3], "support", app.clock.now())
        .await
        .unwrap();
    latchkey::service::users::grant_role(&app.state.db, &emails[3], "admin", app.clock.now()).await.unwrap();

    let app = &app;
    let reads = (0..6).flat_map(|_| tokens.iter().enumerate()).map(|(i, t)| async move {
        let resp = app.get("/v1/users/me", Some(&t.access)).await;
        assert_eq!(resp.status(), StatusCode::OK);
        (i, resp.json::<Value>().await.unwrap())
    });
    for (i, me) in join_all(reads).await {
        assert_eq!(me["email"], emails[i].as_str(), "request {i} got another account's profile");
        let roles = if i == 3 { serde_json::json!(["admin", "support"]) } else { serde_json::json!([]) };
        assert_eq!(me["roles"], roles);
    }

    latchkey::service::users::revoke_role(&app.state.db, &emails[3], "admin").await.unwrap();
    let me: Value = app.get("/v1/users/me", Some(&tokens[3].access)).await.json().await.unwrap();
    assert_eq!(me["roles"], serde_json::json!(["support"]), "the next read sees the change");
}

both!(concurrent_session_checks_each_see_their_own_session);
/// Bearer checks of concurrent requests share reads of the revocation store: each must
/// still be judged by its own session, and a logout just before must show.
async fn concurrent_session_checks_each_see_their_own_session(app: TestApp) {
    let mut tokens = Vec::new();
    for i in 0..10 {
        tokens.push(app.user(&format!("checker-{i}@example.com")).await);
    }
    assert_eq!(app.post_bearer("/v1/auth/logout", &tokens[4].access).await.status(), StatusCode::NO_CONTENT);

    let app = &app;
    let checks = (0..6).flat_map(|_| tokens.iter().enumerate()).map(|(i, t)| async move {
        let resp = app.get("/v1/auth/session", Some(&t.access)).await;
        (i, resp.status(), resp.json::<Value>().await.unwrap())
    });
    for (i, status, body) in join_all(checks).await {
        if i == 4 {
            assert_eq!(status, StatusCode::UNAUTHORIZED, "request {i}: its session was logged out");
            continue;
        }
        assert_eq!(status, StatusCode::OK, "request {i} was judged by another session: {body}");
        assert_eq!(body["session_id"], tokens[i].session_id.as_str());
    }
}

both!(a_session_ends_at_its_absolute_lifetime);
async fn a_session_ends_at_its_absolute_lifetime(app: TestApp) {
    let (_, first) = app.signed_in_user().await;
    assert_eq!(first.body["refresh_expires_in"], 30 * 86400);
    app.clock.advance(Duration::from_secs(20 * 86400));
    let second = refreshed(&app, &first.refresh).await;
    let left = second.body["refresh_expires_in"].as_u64().unwrap();
    assert!((10 * 86400 - 5..=10 * 86400).contains(&left), "refreshing does not extend the session: {left}");
    let sid: Uuid = first.session_id.parse().unwrap();
    let row = session::Entity::find_by_id(sid).one(&app.state.db).await.unwrap().unwrap();
    let child = refresh_token::Entity::find()
        .filter(refresh_token::Column::SessionId.eq(sid))
        .filter(refresh_token::Column::RetiredAt.is_null())
        .one(&app.state.db)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(child.expires_at, row.expires_at, "SQL expiry of the token is the session's");
    app.clock.advance(Duration::from_secs(10 * 86400 + 1));
    assert_problem(app.refresh(&second.refresh).await, StatusCode::UNAUTHORIZED, "invalid_token").await;

    // The pruner removes long-expired sessions and their tokens, in bounded batches.
    app.clock.advance(Duration::from_secs(8 * 86400));
    let removed =
        latchkey::service::sessions::prune_expired(&app.state.db, app.clock.now(), 1).await.unwrap();
    assert_eq!(removed, 1);
    assert!(session::Entity::find_by_id(sid).one(&app.state.db).await.unwrap().is_none());
    assert_eq!(refresh_token::Entity::find().count(&app.state.db).await.unwrap(), 0);
}

#[tokio::test]
async fn trusted_proxies_are_honoured_only_when_configured() {
    let xff = [("x-forwarded-for", "203.0.113.50")];
    let direct = TestApp::spawn(Backend::Sqlite, Store::InProcess).await;
    direct.user("p@example.com").await;
    let t = direct.login_with("p@example.com", &xff).await;
    let body: Value = direct.get("/v1/users/me/sessions", Some(&t.access)).await.json().await.unwrap();
    assert!(body["sessions"].as_array().unwrap().iter().all(|s| s["ip_address"] == "127.0.0.1"), "{body}");

    let proxied =
        TestApp::spawn_with(Backend::Sqlite, Store::InProcess, &[("TRUSTED_PROXIES", "127.0.0.1/32")]).await;
    let _ = proxied.register("p@example.com", crate::helpers::PASSWORD).await;
    let t = proxied.login_with("p@example.com", &xff).await;
    let body: Value = proxied.get("/v1/users/me/sessions", Some(&t.access)).await.json().await.unwrap();
    assert_eq!(body["sessions"][0]["ip_address"], "203.0.113.50", "{body}");
}

#[tokio::test]
async fn redis_data_loss_is_healed_by_one_refresh() {
    let mut redis = PrivateRedis::reserve();
    redis.start().await;
    let resources = Resources::new(Backend::Postgres, &Store::RedisAt(redis.url())).await;
    let app = TestApp::spawn_on(resources, &[]).await;
    let (_, first) = app.signed_in_user().await;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("FLUSHALL").query_async::<()>(&mut conn).await.unwrap();

    // Until the client refreshes, the store says "not live": refresh once, as told.
    assert_problem(
        app.get("/v1/users/me", Some(&first.access)).await,
        StatusCode::UNAUTHORIZED,
        "token_revoked",
    )
    .await;
    let second = refreshed(&app, &first.refresh).await;
    assert_eq!(app.get("/v1/users/me", Some(&second.access)).await.status(), StatusCode::OK);
    let body: Value = app.get("/v1/auth/session", Some(&second.access)).await.json().await.unwrap();
    assert_eq!(body["session_id"], first.session_id.as_str());
}

#[tokio::test]
async fn in_process_store_restart_is_healed_by_one_refresh() {
    let a = TestApp::spawn(Backend::Sqlite, Store::InProcess).await;
    let (_, first) = a.signed_in_user().await;
    let resources = a.resources.clone();
    a.stop().await;
    let b = TestApp::spawn_on(resources, &[]).await;
    assert_problem(
        b.get("/v1/users/me", Some(&first.access)).await,
        StatusCode::UNAUTHORIZED,
        "token_revoked",
    )
    .await;
    let second = refreshed(&b, &first.refresh).await;
    assert_eq!(second.session_id, first.session_id);
    assert_eq!(b.get("/v1/users/me", Some(&second.access)).await.status(), StatusCode::OK);
}
