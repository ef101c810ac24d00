//! Issue 13, "ended means ended, whatever races": the attacks on revocation. A session
//! ended by any route stays ended — against a concurrent grace-window refresh, a Redis
//! failure between the SQL commit and the store delete, a user with tens of thousands of
//! sessions, a signing key deleted after a compromise, an unsealed key planted in SQL, and
//! an ambiguous refresh cookie.

use std::collections::HashSet;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use sea_orm::{ActiveModelTrait as _, ColumnTrait as _, EntityTrait as _, IntoActiveModel as _};
use sea_orm::{PaginatorTrait as _, QueryFilter as _, Set};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use uuid::Uuid;

use crate::helpers::{Backend, PASSWORD, Resources, Store, TestApp, Tokens, assert_problem, eventually};
use crate::sessions::audit_actions;
use crate::tokens::parts;
use latchkey::store::entity::{session, signing_key};

/// Runs one scenario on PostgreSQL + Redis and on SQLite + the in-process store, with
/// the server's tasks on two worker threads (races need real parallelism).
macro_rules! both {
    ($name:ident) => {
        both!($name, &[]);
    };
    ($name:ident, $env:expr) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres_redis() {
                super::$name(TestApp::spawn_with(Backend::Postgres, Store::Redis, $env).await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mariadb_redis() {
                super::$name(TestApp::spawn_with(Backend::MariaDb, Store::Redis, $env).await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite_in_process() {
                super::$name(TestApp::spawn_with(Backend::Sqlite, Store::InProcess, $env).await).await;
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

async fn user_id(app: &TestApp, access: &str) -> String {
    let me: Value = app.get("/v1/users/me", Some(access)).await.json().await.unwrap();
    me["id"].as_str().unwrap().to_owned()
}

/// Registers `email`, makes it an admin in SQL and logs it in.
async fn admin(app: &TestApp, email: &str) -> Tokens {
    let _ = app.register(email, PASSWORD).await;
    latchkey::service::users::grant_role(&app.state.db, email, "admin", app.clock.now()).await.unwrap();
    app.login_with(email, &[]).await
}

async fn live_sessions(app: &TestApp, user_id: &str) -> u64 {
    let uid: Uuid = user_id.parse().unwrap();
    session::Entity::find()
        .filter(session::Column::UserId.eq(uid))
        .filter(session::Column::RevokedAt.is_null())
        .count(&app.state.db)
        .await
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// 1. A logout racing a grace-window replay of the parent refresh token.

/// Logins, refreshes and replays by the hundred: the limits must not be what answers.
const RACE_ENV: &[(&str, &str)] = &[
    ("RATE_LIMIT_LOGIN_PER_IP", "100000/1m"),
    ("RATE_LIMIT_LOGIN_PER_ACCOUNT", "100000/1m"),
    ("RATE_LIMIT_REFRESH_PER_IP", "100000/1m"),
];
/// Races per way of ending a session, per configuration (5 ways: 250 races).
const RACES_PER_ENDING: usize = 50;

/// Every route that ends a session.
#[derive(Clone, Copy, Debug)]
enum Ending {
    Logout,
    LogoutAll,
    DeleteOwnSession,
    AdminRevoke,
    OAuthRevoke,
}

impl Ending {
    const ALL: [Self; 5] =
        [Self::Logout, Self::LogoutAll, Self::DeleteOwnSession, Self::AdminRevoke, Self::OAuthRevoke];

    /// Ends the session of `child` this way; the answer's status.
    async fn end(self, app: &TestApp, child: &Tokens, admin: &str, user_id: &str) -> StatusCode {
        let resp = match self {
            Self::Logout => app.post_bearer("/v1/auth/logout", &child.access).await,
            Self::LogoutAll => app.post_bearer("/v1/auth/logout-all", &child.access).await,
            Self::DeleteOwnSession => {
                app.delete(&format!("/v1/users/me/sessions/{}", child.session_id), &child.access).await
            }
            Self::AdminRevoke => {
                app.post_bearer(&format!("/v1/admin/users/{user_id}/revoke-sessions"), admin).await
            }
            Self::OAuthRevoke => app
                .client
                .post(app.url("/oauth/revoke"))
                .form(&[("token", child.access.as_str())])
                .send()
                .await
                .unwrap(),
        };
        resp.status()
    }
}

both!(logout_racing_a_grace_refresh_never_revives_the_session, RACE_ENV);
/// The attacker (or a flaky client) replays the parent refresh token R0 inside the grace
/// window exactly while the user ends the session: the replay re-activates the session
/// in the store. Whichever finishes last, every access token of the session — the child's
/// and the one the replay got — must be refused afterwards.
async fn logout_racing_a_grace_refresh_never_revives_the_session(app: TestApp) {
    let email = "racer@example.com";
    let _ = app.register(email, PASSWORD).await;
    let boss = admin(&app, "race-boss@example.com").await;
    let first = app.login_with(email, &[]).await;
    let user = user_id(&app, &first.access).await;

    let (mut revived, mut total) = (Vec::new(), 0);
    for ending in Ending::ALL {
        let mut count = 0;
        for _ in 0..RACES_PER_ENDING {
            let parent = app.login_with(email, &[]).await;
            let child = refreshed(&app, &parent.refresh).await;
            let (replay, ended) = tokio::join!(
                async {
                    let resp = app.refresh(&parent.refresh).await;
                    (resp.status(), resp.json::<Value>().await.unwrap())
                },
                ending.end(&app, &child, &boss.access, &user),
            );
            assert!(ended.is_success(), "{ending:?} answered {ended}");
            let mut access = vec![child.access.clone()];
            match replay {
                (StatusCode::OK, body) => access.push(body["access_token"].as_str().unwrap().to_owned()),
                (status, body) => assert_eq!(status, StatusCode::UNAUTHORIZED, "replay: {body}"),
            }
            for token in &access {
                let resp = app.get("/v1/auth/session", Some(token)).await;
                if resp.status() == StatusCode::OK {
                    count += 1;
                    break;
                }
                assert_problem(resp, StatusCode::UNAUTHORIZED, "token_revoked").await;
            }
        }
        total += count;
        revived.push(format!("{ending:?} {count}/{RACES_PER_ENDING}"));
    }
    assert_eq!(
        total,
        0,
        "{total} of {} ended sessions were revived ({})",
        RACES_PER_ENDING * Ending::ALL.len(),
        revived.join(", ")
    );
}

// ---------------------------------------------------------------------------------------
// 2. A user with 70,000 live sessions.

const PLANTED: usize = 70_000;
/// Rows per INSERT: 9 columns x 1,000 stays under SQLite's variable limit.
const CHUNK: usize = 1_000;

/// Inserts `PLANTED` live sessions of `user_id` straight into SQL. Each chunk of 1,000
/// shares one `last_used_at`, so a cursor that breaks ties badly shows.
async fn plant_sessions(app: &TestApp, user_id: &str) {
    let uid: Uuid = user_id.parse().unwrap();
    let now = app.clock.now();
    for start in (0..PLANTED).step_by(CHUNK) {
        let used = now - chrono::Duration::seconds(60 + i64::try_from(start / CHUNK).unwrap());
        let rows = (start..(start + CHUNK).min(PLANTED)).map(|_| session::ActiveModel {
            id: Set(Uuid::new_v4()),
            user_id: Set(uid),
            user_agent: Set(Some("planted/1.0".into())),
            ip_address: Set(Some("192.0.2.1".into())),
            last_used_ip: Set(Some("192.0.2.1".into())),
            created_at: Set(used),
            last_used_at: Set(used),
            expires_at: Set(now + chrono::Duration::days(30)),
            revoked_at: Set(None),
            location: Set(None),
            amr: Set("pwd".into()),
            auth_time: Set(used),
        });
        session::Entity::insert_many(rows).exec(&app.state.db).await.unwrap();
    }
}

both!(logout_all_and_admin_revoke_end_seventy_thousand_sessions);
/// A user (or an attacker holding the account) piles up 70,000 sessions: "log out
/// everywhere" and the admin's revoke must still end every one of them.
async fn logout_all_and_admin_revoke_end_seventy_thousand_sessions(app: TestApp) {
    let hoarder = app.user("hoarder@example.com").await;
    let hoarder_id = user_id(&app, &hoarder.access).await;
    plant_sessions(&app, &hoarder_id).await;
    assert_eq!(live_sessions(&app, &hoarder_id).await, PLANTED as u64 + 1);
    let started = std::time::Instant::now();
    let resp = app.post_bearer("/v1/auth/logout-all", &hoarder.access).await;
    eprintln!("logout-all of {} sessions took {:?}", PLANTED + 1, started.elapsed());
    let status = resp.status();
    assert_eq!(status, StatusCode::NO_CONTENT, "logout-all: {}", resp.text().await.unwrap());
    assert_eq!(live_sessions(&app, &hoarder_id).await, 0, "every session ended by logout-all");
    assert_problem(
        app.get("/v1/auth/session", Some(&hoarder.access)).await,
        StatusCode::UNAUTHORIZED,
        "token_revoked",
    )
    .await;

    let other = app.user("hoarder2@example.com").await;
    let other_id = user_id(&app, &other.access).await;
    plant_sessions(&app, &other_id).await;
    let boss = admin(&app, "boss@example.com").await;
    let resp = app.post_bearer(&format!("/v1/admin/users/{other_id}/revoke-sessions"), &boss.access).await;
    let status = resp.status();
    assert_eq!(status, StatusCode::NO_CONTENT, "admin revoke: {}", resp.text().await.unwrap());
    assert_eq!(live_sessions(&app, &other_id).await, 0, "every session ended by the admin");
    assert_problem(
        app.get("/v1/auth/session", Some(&other.access)).await,
        StatusCode::UNAUTHORIZED,
        "token_revoked",
    )
    .await;
}

/// One page of a session list: (ids, next_cursor).
async fn session_page(
    app: &TestApp,
    path: &str,
    token: &str,
    cursor: Option<&str>,
) -> (Vec<String>, Option<String>) {
    let mut query = vec![("limit", "100")];
    if let Some(c) = cursor {
        query.push(("cursor", c));
    }
    let resp = app.client.get(app.url(path)).bearer_auth(token).query(&query).send().await.unwrap();
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{path}: {body}");
    let sessions = body["sessions"].as_array().unwrap();
    assert!(sessions.len() <= 100, "{path}: a page of {} sessions (limit=100)", sessions.len());
    let ids = sessions.iter().map(|s| s["id"].as_str().unwrap().to_owned()).collect();
    assert!(body.get("next_cursor").is_some(), "{path}: next_cursor is always present (null at the end)");
    (ids, body["next_cursor"].as_str().map(str::to_owned))
}

both!(seventy_thousand_sessions_are_listed_page_by_page);
/// The session list of a user with 70,001 sessions comes in pages of at most 100 that
/// together show every session exactly once; `limit` outside 1..=100 is refused.
async fn seventy_thousand_sessions_are_listed_page_by_page(app: TestApp) {
    let hoarder = app.user("pager@example.com").await;
    let hoarder_id = user_id(&app, &hoarder.access).await;
    plant_sessions(&app, &hoarder_id).await;

    let mut seen = HashSet::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        pages += 1;
        assert!(pages <= PLANTED / 100 + 2, "the cursor never ends");
        let (ids, next) =
            session_page(&app, "/v1/users/me/sessions", &hoarder.access, cursor.as_deref()).await;
        for id in ids {
            assert!(seen.insert(id.clone()), "session {id} listed twice (page {pages})");
        }
        match next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(seen.len(), PLANTED + 1, "every session listed once, over {pages} pages");
    assert!(seen.contains(&hoarder.session_id));

    for bad in ["101", "0"] {
        let path = format!("/v1/users/me/sessions?limit={bad}");
        assert_problem(
            app.get(&path, Some(&hoarder.access)).await,
            StatusCode::BAD_REQUEST,
            "validation_failed",
        )
        .await;
    }

    // The admin's view of the same user pages the same way.
    let boss = admin(&app, "pager-boss@example.com").await;
    let path = format!("/v1/admin/users/{hoarder_id}/sessions");
    let (first, next) = session_page(&app, &path, &boss.access, None).await;
    assert_eq!(first.len(), 100);
    let next = next.expect("a second page");
    let (second, _) = session_page(&app, &path, &boss.access, Some(&next)).await;
    assert_eq!(second.len(), 100);
    let distinct: HashSet<&String> = first.iter().chain(&second).collect();
    assert_eq!(distinct.len(), 200, "pages do not overlap");
}

// ---------------------------------------------------------------------------------------
// 3. A signing key deleted after a compromise.

/// After a key leaks, the operator deletes its row: every instance stops accepting tokens
/// signed with it within `KEYS_REFRESH_INTERVAL`, even tokens it already verified and
/// remembers; logins go on with the remaining key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_signing_key_stops_verifying_on_every_instance_cached_tokens_included() {
    let env = [("KEYS_REFRESH_INTERVAL", "1s"), ("JWKS_MAX_AGE", "1s"), ("KEY_PREPUBLISH", "2s")];
    let a = TestApp::spawn_with(Backend::Postgres, Store::Redis, &env).await;
    let b = TestApp::spawn_on(a.resources.clone(), &env).await;
    let (_, stolen) = a.signed_in_user().await;
    let old_kid = parts(&stolen.access).0["kid"].as_str().unwrap().to_owned();
    // Verified once on each instance: now in each one's verified-token cache.
    for app in [&a, &b] {
        assert_eq!(app.get("/v1/auth/session", Some(&stolen.access)).await.status(), StatusCode::OK);
    }

    let rotated = latchkey::keys::rotate(&a.state.db, a.clock.now(), &a.state.keys.settings).await.unwrap();
    for app in [&a, &b] {
        let loaded = eventually(Duration::from_secs(5), || async {
            let jwks: Value = app.get("/.well-known/jwks.json", None).await.json().await.unwrap();
            jwks.to_string().contains(&rotated.kid)
        })
        .await;
        assert!(loaded, "the new key reaches every instance");
    }

    signing_key::Entity::delete_by_id(old_kid.clone()).exec(&a.state.db).await.unwrap();
    for app in [&a, &b] {
        let refused = eventually(Duration::from_secs(3), || async {
            app.get("/v1/auth/session", Some(&stolen.access)).await.status() == StatusCode::UNAUTHORIZED
        })
        .await;
        assert!(refused, "a token of the deleted key is still accepted after 3 s");
        assert_problem(
            app.get("/v1/auth/session", Some(&stolen.access)).await,
            StatusCode::UNAUTHORIZED,
            "invalid_token",
        )
        .await;
        let jwks: Value = app.get("/.well-known/jwks.json", None).await.json().await.unwrap();
        assert!(!jwks.to_string().contains(&old_kid), "the deleted key is no longer published: {jwks}");
    }

    // Past the new key's pre-publication, fresh logins are signed by it and work everywhere.
    if let Ok(wait) = (rotated.activates_at - a.clock.now()).to_std() {
        tokio::time::sleep(wait + Duration::from_millis(100)).await;
    }
    let (_, fresh) = a.signed_in_user().await;
    assert_eq!(parts(&fresh.access).0["kid"], rotated.kid.as_str());
    for app in [&a, &b] {
        assert_eq!(app.get("/v1/auth/session", Some(&fresh.access)).await.status(), StatusCode::OK);
    }
}

// ---------------------------------------------------------------------------------------
// 4. Key-encryption key: unsealed rows and a lone old KEK.

/// 32 random bytes, base64: a fresh KEK.
fn random_kek() -> String {
    let bytes = [Uuid::new_v4().into_bytes(), Uuid::new_v4().into_bytes()].concat();
    STANDARD.encode(bytes)
}

/// With `KEY_ENCRYPTION_KEY` set, someone with write access to SQL plants a key of their
/// own, unsealed, that would sign from now: it must be neither published, nor used to
/// sign, nor accepted on tokens the planter forges with it.
#[tokio::test]
async fn an_unsealed_key_planted_in_sql_is_refused_when_a_kek_is_set() {
    let kek = random_kek();
    let app = TestApp::spawn_with(Backend::Sqlite, Store::InProcess, &[("KEY_ENCRYPTION_KEY", &kek)]).await;
    let (email, victim) = app.signed_in_user().await;

    let planted = latchkey::keys::generate_ed25519(app.clock.now()).unwrap();
    assert!(planted.private_key_encryption.is_none(), "the planted row is in clear");
    planted.clone().into_active_model().insert(&app.state.db).await.unwrap();
    // Whether the reload fails or skips the row is the server's choice; using it is not.
    let _ = app.state.keys.reload(&app.state.db, app.clock.now()).await;

    let jwks: Value = app.get("/.well-known/jwks.json", None).await.json().await.unwrap();
    assert!(!jwks.to_string().contains(&planted.kid), "the planted key is published: {jwks}");
    let fresh = app.login_with(&email, &[]).await;
    assert_ne!(
        parts(&fresh.access).0["kid"],
        planted.kid.as_str(),
        "a login was signed with the planted key"
    );

    // A token for the victim's live session, forged with the planted private key.
    let (_, claims) = parts(&victim.access);
    let mut header = Header::new(Algorithm::EdDSA);
    header.typ = Some("at+jwt".into());
    header.kid = Some(planted.kid.clone());
    let forged =
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ed_der(&planted.private_key)).unwrap();
    assert_problem(
        app.get("/v1/auth/session", Some(&forged)).await,
        StatusCode::UNAUTHORIZED,
        "invalid_token",
    )
    .await;
}

/// `KEY_ENCRYPTION_KEY_OLD` alone (the new KEK forgotten during a KEK rotation) must stop
/// start-up rather than write keys in clear, naming both variables.
#[tokio::test]
async fn starting_with_only_the_old_kek_is_refused() {
    let resources = Resources::new(Backend::Sqlite, &Store::InProcess).await;
    let kek = random_kek();
    let result = TestApp::try_spawn_on(resources, &[("KEY_ENCRYPTION_KEY_OLD", &kek)]).await;
    let err = result.err().expect("start-up with only KEY_ENCRYPTION_KEY_OLD was accepted");
    let message = format!("{err:#}");
    assert!(
        message.contains("KEY_ENCRYPTION_KEY_OLD")
            && message.replace("KEY_ENCRYPTION_KEY_OLD", "").contains("KEY_ENCRYPTION_KEY"),
        "the message names both variables: {message}"
    );
}

// ---------------------------------------------------------------------------------------
// 5. Redis failing between the SQL commit and the store delete.

/// A TCP proxy to the shared Redis that the test can cut (every connection closed, new
/// ones closed on arrival) and restore.
struct CuttableProxy {
    port: u16,
    up: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl CuttableProxy {
    async fn start(upstream: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (up, _) = watch::channel(true);
        let watcher = up.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut up = watcher.subscribe();
                if !*up.borrow() {
                    continue; // dropped: closed on arrival
                }
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = up.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Self { port, up, task }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn cut(&self) {
        self.up.send_replace(false);
    }

    fn restore(&self) {
        self.up.send_replace(true);
    }
}

impl Drop for CuttableProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A revocation whose SQL commit succeeded but whose store delete failed (Redis down at
/// that moment) must still take effect once Redis is back, with no client retrying:
/// otherwise an attacker holding the token keeps using a session SQL says is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_lost_to_a_redis_outage_still_ends_the_session() {
    let proxy = CuttableProxy::start("127.0.0.1:6379").await;
    let resources = Resources::new(Backend::Postgres, &Store::RedisAt(proxy.url())).await;
    let app = TestApp::spawn_on(resources, &[("REDIS_RESPONSE_TIMEOUT", "300ms")]).await;
    let (_, stolen) = app.signed_in_user().await;
    assert_eq!(app.get("/v1/auth/session", Some(&stolen.access)).await.status(), StatusCode::OK);

    proxy.cut();
    let resp = app
        .client
        .post(app.url("/oauth/revoke"))
        .form(&[("token", stolen.access.as_str())])
        .send()
        .await
        .unwrap();
    assert!(
        [StatusCode::OK, StatusCode::SERVICE_UNAVAILABLE].contains(&resp.status()),
        "revoke during the outage: {}",
        resp.status()
    );
    let sid: Uuid = stolen.session_id.parse().unwrap();
    let row = session::Entity::find_by_id(sid).one(&app.state.db).await.unwrap().unwrap();
    assert!(row.revoked_at.is_some(), "the revocation is committed in SQL");
    proxy.restore();

    let last = std::sync::Mutex::new(String::new());
    let (app, last, access) = (&app, &last, stolen.access.as_str());
    let revoked = eventually(Duration::from_secs(10), || async move {
        let resp = app.get("/v1/auth/session", Some(access)).await;
        let status = resp.status();
        let body = resp.text().await.unwrap();
        let done = status == StatusCode::UNAUTHORIZED && body.contains("token_revoked");
        *last.lock().unwrap() = format!("{status} {body}");
        done
    })
    .await;
    assert!(
        revoked,
        "10 s after Redis came back the revoked session still answers: {}",
        last.lock().unwrap()
    );
}

// ---------------------------------------------------------------------------------------
// 6. Cookie mode: a host-only cookie that cannot be shadowed.

const COOKIE_ENV: &[(&str, &str)] = &[("REFRESH_TOKEN_COOKIE", "true")];
const HOST_COOKIE: &str = "__Host-latchkey_refresh";

/// The `Set-Cookie` of the refresh cookie in `resp`, if any.
fn refresh_set_cookie(resp: &reqwest::Response) -> Option<String> {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with(&format!("{HOST_COOKIE}=")))
        .map(str::to_owned)
}

fn attributes(set_cookie: &str) -> Vec<String> {
    set_cookie.split(';').skip(1).map(|a| a.trim().to_owned()).collect()
}

/// Registers, logs in in cookie mode: (access token, the refresh cookie's `Set-Cookie`
/// or, when there is none, every `Set-Cookie` of the answer).
async fn cookie_login(app: &TestApp) -> (String, Result<String, Vec<String>>) {
    let email = format!("cookie-{}@example.com", Uuid::new_v4().simple());
    assert_eq!(app.register(&email, PASSWORD).await.status(), StatusCode::CREATED);
    let resp = app.login(&email, PASSWORD).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let all = resp.headers().get_all("set-cookie").iter().map(|v| v.to_str().unwrap().to_owned()).collect();
    let cookie = refresh_set_cookie(&resp).ok_or(all);
    let access = resp.json::<Value>().await.unwrap()["access_token"].as_str().unwrap().to_owned();
    (access, cookie)
}

/// A sibling subdomain or a page under another path cannot set or shadow the refresh
/// cookie: it is a `__Host-` cookie (`Path=/`, `Secure`, no `Domain`), `HttpOnly` and
/// `SameSite=Strict`.
#[tokio::test]
async fn the_refresh_cookie_is_host_only_so_no_subdomain_can_shadow_it() {
    let app = TestApp::spawn_with(Backend::Sqlite, Store::InProcess, COOKIE_ENV).await;
    let (_, cookie) = cookie_login(&app).await;
    let cookie = cookie.unwrap_or_else(|all| panic!("no {HOST_COOKIE} cookie: {all:?}"));
    let attrs = attributes(&cookie);
    for want in ["Path=/", "Secure", "HttpOnly", "SameSite=Strict"] {
        assert!(attrs.iter().any(|a| a.eq_ignore_ascii_case(want)), "{want} missing: {cookie}");
    }
    assert!(!attrs.iter().any(|a| a.to_ascii_lowercase().starts_with("domain")), "a Domain: {cookie}");
}

/// A related-domain attacker plants a second refresh cookie beside the real one, hoping
/// the server picks theirs (login CSRF, session fixation) or the real one for them: a
/// request carrying two is refused, whatever their order.
#[tokio::test]
async fn a_request_carrying_two_refresh_cookies_is_refused() {
    let app = TestApp::spawn_with(Backend::Sqlite, Store::InProcess, COOKIE_ENV).await;
    let (_, cookie) = cookie_login(&app).await;
    let cookie = cookie.unwrap_or_else(|all| panic!("no {HOST_COOKIE} cookie: {all:?}"));
    let pair = cookie.split(';').next().unwrap().to_owned();
    let planted = format!("{HOST_COOKIE}=planted-by-a-sibling-domain");
    let refresh = |cookies: Vec<String>| {
        let mut req = app.client.post(app.url("/v1/auth/refresh")).header("x-requested-with", "x");
        for c in cookies {
            req = req.header("cookie", c);
        }
        req.json(&serde_json::json!({})).send()
    };
    for cookies in [
        vec![format!("{planted}; {pair}")],
        vec![format!("{pair}; {planted}")],
        vec![planted.clone(), pair.clone()],
    ] {
        let resp = refresh(cookies.clone()).await.unwrap();
        assert_problem(resp, StatusCode::BAD_REQUEST, "validation_failed").await;
    }
    // The real cookie alone still refreshes: the refusal was about the duplicate.
    assert_eq!(refresh(vec![pair]).await.unwrap().status(), StatusCode::OK);
}

/// "Log out everywhere" from a browser must also drop this browser's refresh cookie, or
/// the next person at the machine holds a cookie the app believes is gone.
#[tokio::test]
async fn logout_all_clears_the_refresh_cookie() {
    let app = TestApp::spawn_with(Backend::Sqlite, Store::InProcess, COOKIE_ENV).await;
    let (access, _) = cookie_login(&app).await;
    let resp = app.post_bearer("/v1/auth/logout-all", &access).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let all: Vec<_> = resp.headers().get_all("set-cookie").iter().cloned().collect();
    let cleared = refresh_set_cookie(&resp).unwrap_or_else(|| panic!("no {HOST_COOKIE} cleared: {all:?}"));
    let attrs = attributes(&cleared);
    // A browser ignores a __Host- Set-Cookie without Secure and Path=/: the clear must carry them.
    for want in ["Max-Age=0", "Path=/", "Secure"] {
        assert!(attrs.iter().any(|a| a.eq_ignore_ascii_case(want)), "{want} missing: {cleared}");
    }
}

// ---------------------------------------------------------------------------------------
// 7. The grace window leaves a trace.

both!(a_grace_replay_is_audited);
/// A replay inside the grace window is answered (the same successor), but it is also
/// what a thief racing the owner looks like: it must leave an audit row.
async fn a_grace_replay_is_audited(app: TestApp) {
    let (_, first) = app.signed_in_user().await;
    let second = refreshed(&app, &first.refresh).await;
    let again = refreshed(&app, &first.refresh).await;
    assert_eq!(again.refresh, second.refresh, "a grace replay");
    let audited = eventually(Duration::from_secs(5), || async {
        audit_actions(&app).await.iter().any(|(action, _)| action == "refresh_grace_replay")
    })
    .await;
    assert!(audited, "no refresh_grace_replay audit row: {:?}", audit_actions(&app).await);
}
