//! Accounts over email (issue 15), end to end: every flow follows the link in the mail it
//! received — from `.eml` files in MAIL_DIR, or from a real SMTP server (aiosmtpd) — and
//! checks what ended. Enumeration: known and unknown addresses get the same status, body
//! and time, and the mail limits count both alike. One-time tokens: reuse, expiry, the
//! wrong purpose, and a token replaced by a newer one.

use std::time::{Duration, Instant};

use latchkey::store::entity::{audit_log, email_outbox, one_time_token, user};
use reqwest::StatusCode;
use sea_orm::{ColumnTrait as _, EntityTrait as _, QueryFilter as _};
use serde_json::{Value, json};

use crate::helpers::{Backend, PASSWORD, Store, TestApp, assert_problem, claims, eventually};
use crate::mail::SmtpSink;

const NEW_PASSWORD: &str = "a brand new passphrase for ada";

macro_rules! both {
    ($name:ident) => {
        mod $name {
            use super::*;
            #[tokio::test]
            async fn postgres_redis() {
                super::$name(Backend::Postgres, Store::Redis).await;
            }
            #[tokio::test]
            async fn mariadb_redis() {
                super::$name(Backend::MariaDb, Store::Redis).await;
            }
            #[tokio::test]
            async fn sqlite_in_process() {
                super::$name(Backend::Sqlite, Store::InProcess).await;
            }
        }
    };
}

/// Where a test's mail arrives: `.eml` files in the app's MAIL_DIR, or a real SMTP server.
pub struct Mailbox {
    sink: Option<SmtpSink>,
    dir: std::path::PathBuf,
}

/// One received mail, decoded.
#[derive(Debug, Clone)]
pub struct Received {
    pub to: String,
    pub subject: String,
    pub text: String,
    pub html: String,
}

impl Received {
    /// The token of the mail's link (`…#token=…`), from the text part.
    pub fn token(&self) -> String {
        let (_, after) = self.text.split_once("#token=").unwrap_or_else(|| panic!("no link in {self:?}"));
        after.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').collect()
    }

    pub fn link(&self) -> String {
        let start = self.text.find("http").unwrap_or_else(|| panic!("no link in {self:?}"));
        self.text[start..].split_whitespace().next().unwrap().to_owned()
    }
}

/// A raw MIME message, decoded.
pub fn parse(raw: &[u8]) -> Received {
    let mail = mailparse::parse_mail(raw).expect("a MIME message");
    let header = |name: &str| {
        mail.headers
            .iter()
            .find(|h| h.get_key().eq_ignore_ascii_case(name))
            .map(|h| h.get_value())
            .unwrap_or_default()
    };
    let mut text = String::new();
    let mut html = String::new();
    let mut parts = vec![&mail];
    while let Some(part) = parts.pop() {
        parts.extend(part.subparts.iter());
        match part.ctype.mimetype.as_str() {
            "text/plain" => text = part.get_body().expect("body"),
            "text/html" => html = part.get_body().expect("body"),
            _ => {}
        }
    }
    Received { to: header("To"), subject: header("Subject"), text, html }
}

impl Mailbox {
    pub fn all(&self) -> Vec<Received> {
        let dir = self.sink.as_ref().map(|s| s.dir()).unwrap_or(self.dir.as_path());
        let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
        entries
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
            .map(|e| parse(&std::fs::read(e.path()).expect("read mail")))
            .collect()
    }

    /// The mails to `to` whose subject contains `about`.
    pub fn to(&self, to: &str, about: &str) -> Vec<Received> {
        self.all().into_iter().filter(|m| m.to.contains(to) && m.subject.contains(about)).collect()
    }

    /// Waits for the `n`th mail to `to` about `about`.
    pub async fn nth(&self, to: &str, about: &str, n: usize) -> Received {
        let arrived = eventually(Duration::from_secs(15), || async { self.to(to, about).len() >= n }).await;
        let all = self.all();
        assert!(arrived, "mail {n} to {to} about {about:?} never came; have: {all:#?}");
        nth_written(self, to, about, n)
    }

    pub async fn first(&self, to: &str, about: &str) -> Received {
        self.nth(to, about, 1).await
    }
}

/// The `n`th mail (from 1) to `to` about `about`, in the order they were queued.
fn nth_written(mailbox: &Mailbox, to: &str, about: &str, n: usize) -> Received {
    let dir = mailbox.sink.as_ref().map(|s| s.dir()).unwrap_or(mailbox.dir.as_path());
    let mut files: Vec<(std::time::SystemTime, String, Received)> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
        .map(|e| {
            let modified = e.metadata().unwrap().modified().unwrap();
            (modified, e.file_name().to_string_lossy().into_owned(), parse(&std::fs::read(e.path()).unwrap()))
        })
        .filter(|(_, _, m)| m.to.contains(to) && m.subject.contains(about))
        .collect();
    // Outbox ids are UUIDv7: the file names sort in queueing order (the sink's are random,
    // so there the write time orders them).
    if mailbox.sink.is_some() {
        files.sort_by_key(|(t, _, _)| *t);
    } else {
        files.sort_by(|a, b| a.1.cmp(&b.1));
    }
    files.into_iter().nth(n - 1).map(|(_, _, m)| m).unwrap()
}

/// An app with email verification `mode` and fast mail; the PostgreSQL and MariaDB ones send
/// through a real SMTP server.
pub async fn spawn(backend: Backend, store: Store, mode: &str, extra: &[(&str, &str)]) -> (TestApp, Mailbox) {
    let sink = match backend {
        Backend::Postgres | Backend::MariaDb => Some(SmtpSink::start(&[]).await),
        Backend::Sqlite => None,
    };
    let url = sink.as_ref().map(SmtpSink::url);
    let mut env = vec![("EMAIL_VERIFICATION", mode), ("MAIL_POLL_INTERVAL", "50ms")];
    if let Some(url) = &url {
        env.push(("SMTP_URL", url.as_str()));
    }
    env.extend_from_slice(extra);
    let app = TestApp::spawn_with(backend, store, &env).await;
    let dir = app.resources.mail_dir();
    (app, Mailbox { sink, dir })
}

fn fresh_email(tag: &str) -> String {
    format!("{tag}-{}@example.com", uuid::Uuid::new_v4().simple())
}

async fn json_of(resp: reqwest::Response) -> (StatusCode, Value) {
    let status = resp.status();
    let body = resp.json::<Value>().await.unwrap_or(Value::Null);
    (status, body)
}

async fn login_ok(app: &TestApp, email: &str, password: &str) -> crate::helpers::Tokens {
    let (status, body) = json_of(app.login(email, password).await).await;
    assert_eq!(status, StatusCode::OK, "login {email}: {body}");
    crate::helpers::Tokens::from(body)
}

async fn me(app: &TestApp, access: &str) -> Value {
    let (status, body) = json_of(app.get("/v1/users/me", Some(access)).await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn post(app: &TestApp, path: &str, body: Value) -> reqwest::Response {
    app.post_json(path, &body).await
}

async fn post_bearer(app: &TestApp, path: &str, access: &str, body: Value) -> reqwest::Response {
    app.client.post(app.url(path)).bearer_auth(access).json(&body).send().await.unwrap()
}

async fn session_status(app: &TestApp, access: &str) -> StatusCode {
    app.get("/v1/auth/session", Some(access)).await.status()
}

async fn sign_up(app: &TestApp, mailbox: &Mailbox, email: &str) -> String {
    let (status, body) = json_of(app.register(email, PASSWORD).await).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body, json!({"email": email, "verification": "sent"}));
    mailbox.first(email, "Confirm your email").await.token()
}

both!(sign_up_mails_a_link_that_verifies_the_address_once);
async fn sign_up_mails_a_link_that_verifies_the_address_once(backend: Backend, store: Store) {
    let (app, mailbox) = spawn(backend, store, "optional", &[]).await;
    let email = fresh_email("ada");
    let token = sign_up(&app, &mailbox, &email).await;
    let mail = mailbox.first(&email, "Confirm your email").await;
    assert!(
        mail.link().starts_with(&format!("{}/account/verify-email#token=", app.state.config.jwt_issuer)),
        "{}",
        mail.link()
    );
    assert!(mail.html.contains("verify-email#token="), "the HTML part has the link too");

    // Optional: an unverified user can log in; the token says so.
    let tokens = login_ok(&app, &email, PASSWORD).await;
    assert_eq!(claims(&tokens.access)["email_verified"], json!(false));
    assert_eq!(me(&app, &tokens.access).await["email_verified"], json!(false));

    // Only the hash is stored.
    let rows = one_time_token::Entity::find().all(&app.state.db).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_ne!(rows[0].token_hash, token);
    assert!(!rows[0].token_hash.contains(&token));

    let resp = post(&app, "/v1/auth/verify-email", json!({"token": token})).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(me(&app, &tokens.access).await["email_verified"], json!(true));
    let again = login_ok(&app, &email, PASSWORD).await;
    assert_eq!(claims(&again.access)["email_verified"], json!(true));
    // The refreshed token says so too.
    let refreshed = app.refresh(&tokens.refresh).await.json::<Value>().await.unwrap();
    assert_eq!(claims(refreshed["access_token"].as_str().unwrap())["email_verified"], json!(true));

    // Used once.
    let reused = post(&app, "/v1/auth/verify-email", json!({"token": token})).await;
    assert_problem(reused, StatusCode::BAD_REQUEST, "invalid_one_time_token").await;
    // Debug output never shows the password hash.
    let row = user::Entity::find()
        .filter(user::Column::Email.eq(email.as_str()))
        .one(&app.state.db)
        .await
        .unwrap()
        .unwrap();
    assert!(!format!("{row:?}").contains("argon2"), "{row:?}");
    // Once sent, the outbox keeps no live link.
    let outbox = email_outbox::Entity::find().all(&app.state.db).await.unwrap();
    assert!(
        outbox.iter().all(|m| m.status == "sent" && m.text_body.is_empty() && m.html_body.is_empty()),
        "{outbox:#?}"
    );
}

both!(required_verification_refuses_login_until_the_newest_link_is_used);
async fn required_verification_refuses_login_until_the_newest_link_is_used(backend: Backend, store: Store) {
    let (app, mailbox) = spawn(backend, store, "required", &[]).await;
    let email = fresh_email("grace");
    let first = sign_up(&app, &mailbox, &email).await;

    // A wrong password is still just a wrong password.
    assert_problem(
        app.login(&email, "not the password at all").await,
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
    )
    .await;
    // The right one: 403, and a fresh link that replaces the first.
    assert_problem(app.login(&email, PASSWORD).await, StatusCode::FORBIDDEN, "email_not_verified").await;
    let second = mailbox.nth(&email, "Confirm your email", 2).await.token();
    assert_ne!(first, second);
    let old = post(&app, "/v1/auth/verify-email", json!({"token": first})).await;
    assert_problem(old, StatusCode::BAD_REQUEST, "invalid_one_time_token").await;
    assert_eq!(
        post(&app, "/v1/auth/verify-email", json!({"token": second})).await.status(),
        StatusCode::NO_CONTENT
    );
    let tokens = login_ok(&app, &email, PASSWORD).await;
    assert_eq!(claims(&tokens.access)["email_verified"], json!(true));
}

both!(a_reset_link_sets_a_new_password_and_ends_every_session);
async fn a_reset_link_sets_a_new_password_and_ends_every_session(backend: Backend, store: Store) {
    let (app, mailbox) = spawn(backend, store, "optional", &[]).await;
    let email = fresh_email("reset");
    sign_up(&app, &mailbox, &email).await;
    let a = login_ok(&app, &email, PASSWORD).await;
    let b = login_ok(&app, &email, PASSWORD).await;

    let (status, body) = json_of(post(&app, "/v1/auth/password/forgot", json!({"email": email})).await).await;
    assert_eq!((status, body), (StatusCode::ACCEPTED, json!({"email": email})));
    let mail = mailbox.first(&email, "Reset").await;
    assert!(mail.link().contains("/account/reset-password#token="), "{}", mail.link());
    let token = mail.token();

    // A weak password is refused and leaves the link working.
    let weak =
        post(&app, "/v1/auth/password/reset", json!({"token": token, "new_password": "password1"})).await;
    assert_problem(weak, StatusCode::BAD_REQUEST, "weak_password").await;
    let resp =
        post(&app, "/v1/auth/password/reset", json!({"token": token, "new_password": NEW_PASSWORD})).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);

    for session in [&a, &b] {
        assert_problem(
            app.get("/v1/auth/session", Some(&session.access)).await,
            StatusCode::UNAUTHORIZED,
            "token_revoked",
        )
        .await;
        assert_eq!(app.refresh(&session.refresh).await.status(), StatusCode::UNAUTHORIZED);
    }
    assert_problem(app.login(&email, PASSWORD).await, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    let fresh = login_ok(&app, &email, NEW_PASSWORD).await;
    // The link proved the mailbox.
    assert_eq!(claims(&fresh.access)["email_verified"], json!(true));
    mailbox.first(&email, "password was changed").await;
    let reused = post(
        &app,
        "/v1/auth/password/reset",
        json!({"token": token, "new_password": "yet another fine passphrase"}),
    )
    .await;
    assert_problem(reused, StatusCode::BAD_REQUEST, "invalid_one_time_token").await;
}

both!(changing_the_password_needs_the_current_one_and_ends_the_other_sessions);
async fn changing_the_password_needs_the_current_one_and_ends_the_other_sessions(
    backend: Backend,
    store: Store,
) {
    let (app, mailbox) = spawn(backend, store, "optional", &[]).await;
    let email = fresh_email("change");
    sign_up(&app, &mailbox, &email).await;
    let here = login_ok(&app, &email, PASSWORD).await;
    let elsewhere = login_ok(&app, &email, PASSWORD).await;

    let wrong = json!({"current_password": "not my password", "new_password": NEW_PASSWORD});
    let resp = post_bearer(&app, "/v1/users/me/password", &here.access, wrong).await;
    assert_problem(resp, StatusCode::FORBIDDEN, "wrong_password").await;
    assert_eq!(
        session_status(&app, &elsewhere.access).await,
        StatusCode::OK,
        "a wrong password ends nothing"
    );

    let right = json!({"current_password": PASSWORD, "new_password": NEW_PASSWORD});
    let resp = post_bearer(&app, "/v1/users/me/password", &here.access, right).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(session_status(&app, &here.access).await, StatusCode::OK, "this session stays");
    assert_eq!(app.refresh(&here.refresh).await.status(), StatusCode::OK);
    assert_eq!(session_status(&app, &elsewhere.access).await, StatusCode::UNAUTHORIZED);
    assert_eq!(app.refresh(&elsewhere.refresh).await.status(), StatusCode::UNAUTHORIZED);
    assert_problem(app.login(&email, PASSWORD).await, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    login_ok(&app, &email, NEW_PASSWORD).await;
    mailbox.first(&email, "password was changed").await;
}

both!(an_email_change_applies_only_when_the_new_address_confirms_it);
async fn an_email_change_applies_only_when_the_new_address_confirms_it(backend: Backend, store: Store) {
    let (app, mailbox) = spawn(backend, store, "optional", &[]).await;
    let old = fresh_email("old");
    let new = fresh_email("new");
    sign_up(&app, &mailbox, &old).await;
    let here = login_ok(&app, &old, PASSWORD).await;
    let elsewhere = login_ok(&app, &old, PASSWORD).await;

    let wrong = json!({"new_email": new, "current_password": "not my password"});
    assert_problem(
        post_bearer(&app, "/v1/users/me/email", &here.access, wrong).await,
        StatusCode::FORBIDDEN,
        "wrong_password",
    )
    .await;
    let ask = json!({"new_email": new.to_uppercase(), "current_password": PASSWORD});
    let (status, body) = json_of(post_bearer(&app, "/v1/users/me/email", &here.access, ask).await).await;
    assert_eq!((status, body), (StatusCode::ACCEPTED, json!({"email": new, "verification": "sent"})));

    let confirm = mailbox.first(&new, "Confirm your new email").await;
    assert!(confirm.link().contains("/account/confirm-email#token="), "{}", confirm.link());
    let notice = mailbox.first(&old, "is changing").await;
    assert!(notice.text.contains(&new), "the old address is told where it goes: {}", notice.text);
    // Nothing changed yet.
    login_ok(&app, &old, PASSWORD).await;
    assert_eq!(me(&app, &here.access).await["email"], json!(old));

    let resp = post(&app, "/v1/auth/confirm-email", json!({"token": confirm.token()})).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let profile = me(&app, &here.access).await;
    assert_eq!((&profile["email"], &profile["email_verified"]), (&json!(new), &json!(true)));
    assert_problem(app.login(&old, PASSWORD).await, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    login_ok(&app, &new, PASSWORD).await;
    assert_eq!(session_status(&app, &here.access).await, StatusCode::OK, "the session that asked stays");
    assert_eq!(session_status(&app, &elsewhere.access).await, StatusCode::UNAUTHORIZED);
    let reused = post(&app, "/v1/auth/confirm-email", json!({"token": confirm.token()})).await;
    assert_problem(reused, StatusCode::BAD_REQUEST, "invalid_one_time_token").await;
}

both!(deleting_the_account_ends_it_and_leaves_audit_rows_without_a_user);
async fn deleting_the_account_ends_it_and_leaves_audit_rows_without_a_user(backend: Backend, store: Store) {
    let (app, mailbox) = spawn(backend, store, "optional", &[]).await;
    let email = fresh_email("leaving");
    sign_up(&app, &mailbox, &email).await;
    let here = login_ok(&app, &email, PASSWORD).await;
    let elsewhere = login_ok(&app, &email, PASSWORD).await;
    let id = me(&app, &here.access).await["id"].as_str().unwrap().to_owned();
    let id: uuid::Uuid = id.parse().unwrap();

    let wrong = app
        .client
        .delete(app.url("/v1/users/me"))
        .bearer_auth(&here.access)
        .json(&json!({"current_password": "nope nope nope"}))
        .send()
        .await
        .unwrap();
    assert_problem(wrong, StatusCode::FORBIDDEN, "wrong_password").await;
    let resp = app
        .client
        .delete(app.url("/v1/users/me"))
        .bearer_auth(&here.access)
        .json(&json!({"current_password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);

    for session in [&here, &elsewhere] {
        assert_eq!(session_status(&app, &session.access).await, StatusCode::UNAUTHORIZED);
        assert_eq!(app.refresh(&session.refresh).await.status(), StatusCode::UNAUTHORIZED);
    }
    assert_problem(app.login(&email, PASSWORD).await, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    mailbox.first(&email, "deleted").await;
    assert!(user::Entity::find_by_id(id).one(&app.state.db).await.unwrap().is_none());
    assert!(
        one_time_token::Entity::find()
            .filter(one_time_token::Column::UserId.eq(id))
            .all(&app.state.db)
            .await
            .unwrap()
            .is_empty()
    );
    // The audit trail stays, pointing to nobody and naming no address.
    let deleted = eventually(Duration::from_secs(5), || async {
        audit_log::Entity::find()
            .filter(audit_log::Column::Action.eq("account_deleted"))
            .filter(audit_log::Column::Outcome.eq("success"))
            .all(&app.state.db)
            .await
            .unwrap()
            .len()
            == 1
    })
    .await;
    assert!(deleted, "the deletion is audited");
    let rows = audit_log::Entity::find().all(&app.state.db).await.unwrap();
    let pointing: Vec<_> = rows.iter().filter(|r| r.user_id == Some(id)).collect();
    assert!(pointing.is_empty(), "audit rows point to the deleted user: {pointing:#?}");
    assert!(rows.iter().all(|r| !r.detail.as_ref().is_some_and(|d| d.to_string().contains(&email))));
    // The address is free again.
    assert_eq!(app.register(&email, PASSWORD).await.status(), StatusCode::ACCEPTED);
}

async fn admin(app: &TestApp) -> crate::helpers::Tokens {
    let email = fresh_email("admin");
    let _ = app.register(&email, PASSWORD).await;
    latchkey::service::users::grant_role(&app.state.db, &email, "admin", app.state.clock.now())
        .await
        .unwrap();
    login_ok(app, &email, PASSWORD).await
}

async fn admin_req(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    access: &str,
    body: Option<Value>,
) -> reqwest::Response {
    let mut req = app.client.request(method, app.url(path)).bearer_auth(access);
    if let Some(body) = body {
        req = req.json(&body);
    }
    req.send().await.unwrap()
}

both!(admins_list_disable_enable_set_roles_and_delete_users);
async fn admins_list_disable_enable_set_roles_and_delete_users(backend: Backend, store: Store) {
    let (app, _mailbox) = spawn(backend, store, "optional", &[]).await;
    let boss = admin(&app).await;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let emails: Vec<String> = (0..3).map(|i| format!("member{i}-{tag}@example.com")).collect();
    for email in &emails {
        assert_eq!(app.register(email, PASSWORD).await.status(), StatusCode::ACCEPTED);
    }
    use reqwest::Method;
    // Not for ordinary users.
    let someone = login_ok(&app, &emails[0], PASSWORD).await;
    assert_problem(
        admin_req(&app, Method::GET, "/v1/admin/users", &someone.access, None).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;

    // Search and pages.
    let (status, page) = json_of(
        admin_req(
            &app,
            Method::GET,
            &format!("/v1/admin/users?query={}&limit=2", tag.to_uppercase()),
            &boss.access,
            None,
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let first: Vec<&str> =
        page["users"].as_array().unwrap().iter().map(|u| u["email"].as_str().unwrap()).collect();
    assert_eq!(first, [emails[0].as_str(), emails[1].as_str()]);
    let cursor = page["next_cursor"].as_str().unwrap();
    let (_, page) = json_of(
        admin_req(
            &app,
            Method::GET,
            &format!("/v1/admin/users?query={tag}&limit=2&cursor={cursor}"),
            &boss.access,
            None,
        )
        .await,
    )
    .await;
    assert_eq!(page["users"].as_array().unwrap().len(), 1);
    assert_eq!(page["users"][0]["email"], json!(emails[2]));
    assert_eq!(page["next_cursor"], Value::Null);
    let user = &page["users"][0];
    assert_eq!(
        (&user["email_verified"], &user["disabled_at"], &user["roles"]),
        (&json!(false), &Value::Null, &json!([]))
    );
    // A LIKE wildcard in the query matches only itself.
    let (_, none) =
        json_of(admin_req(&app, Method::GET, "/v1/admin/users?query=%25", &boss.access, None).await).await;
    assert_eq!(none["users"], json!([]));
    assert_problem(
        admin_req(&app, Method::GET, "/v1/admin/users?cursor=nonsense", &boss.access, None).await,
        StatusCode::BAD_REQUEST,
        "validation_failed",
    )
    .await;

    // Disable: the session ends at once, login answers like a wrong password; enable undoes it.
    let id = page["users"][0]["id"].as_str().unwrap().to_owned();
    let target = login_ok(&app, &emails[2], PASSWORD).await;
    let resp =
        admin_req(&app, Method::POST, &format!("/v1/admin/users/{id}/disable"), &boss.access, None).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(session_status(&app, &target.access).await, StatusCode::UNAUTHORIZED);
    assert_eq!(app.refresh(&target.refresh).await.status(), StatusCode::UNAUTHORIZED);
    let (status, disabled_body) = json_of(app.login(&emails[2], PASSWORD).await).await;
    let (_, wrong_body) = json_of(app.login(&emails[1], "not the password at all").await).await;
    assert_eq!((status, &disabled_body), (StatusCode::UNAUTHORIZED, &wrong_body));
    let resp =
        admin_req(&app, Method::POST, &format!("/v1/admin/users/{id}/enable"), &boss.access, None).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    login_ok(&app, &emails[2], PASSWORD).await;
    let unknown = uuid::Uuid::new_v4();
    assert_problem(
        admin_req(&app, Method::POST, &format!("/v1/admin/users/{unknown}/disable"), &boss.access, None)
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;

    // Roles: exactly the set given; the next refresh carries them.
    let resp = admin_req(
        &app,
        Method::PUT,
        &format!("/v1/admin/users/{id}/roles"),
        &boss.access,
        Some(json!({"roles": ["viewer", "editor", "viewer"]})),
    )
    .await;
    let (status, body) = json_of(resp).await;
    assert_eq!((status, body), (StatusCode::OK, json!({"roles": ["editor", "viewer"]})));
    let resp = admin_req(
        &app,
        Method::PUT,
        &format!("/v1/admin/users/{id}/roles"),
        &boss.access,
        Some(json!({"roles": ["editor"]})),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let tokens = login_ok(&app, &emails[2], PASSWORD).await;
    assert_eq!(claims(&tokens.access)["roles"], json!(["editor"]));
    let bad = admin_req(
        &app,
        Method::PUT,
        &format!("/v1/admin/users/{id}/roles"),
        &boss.access,
        Some(json!({"roles": ["Not A Role!"]})),
    )
    .await;
    assert_problem(bad, StatusCode::BAD_REQUEST, "validation_failed").await;

    // Delete: as self-deletion.
    let resp = admin_req(&app, Method::DELETE, &format!("/v1/admin/users/{id}"), &boss.access, None).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(session_status(&app, &tokens.access).await, StatusCode::UNAUTHORIZED);
    assert_problem(app.login(&emails[2], PASSWORD).await, StatusCode::UNAUTHORIZED, "invalid_credentials")
        .await;
    assert_problem(
        admin_req(&app, Method::DELETE, &format!("/v1/admin/users/{id}"), &boss.access, None).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
}

/// Status, body with the address replaced, and time of one request.
async fn observed(app: &TestApp, path: &str, body: Value, email: &str) -> (StatusCode, String, Duration) {
    let started = Instant::now();
    let resp = post(app, path, body).await;
    let status = resp.status();
    let text = resp.text().await.unwrap().replace(email, "<email>");
    (status, text, started.elapsed())
}

both!(known_and_unknown_addresses_get_the_same_answer_in_the_same_time);
async fn known_and_unknown_addresses_get_the_same_answer_in_the_same_time(backend: Backend, store: Store) {
    let (app, mailbox) = spawn(
        backend,
        store,
        "optional",
        &[
            ("RATE_LIMIT_EMAIL_PER_ADDRESS", "100/1h"),
            ("RATE_LIMIT_EMAIL_PER_IP", "1000/1h"),
            ("RATE_LIMIT_REGISTER_PER_IP", "1000/1m"),
        ],
    )
    .await;
    let known = fresh_email("known");
    sign_up(&app, &mailbox, &known).await;
    for path in ["/v1/auth/password/forgot", "/v1/auth/verify-email/resend", "/v1/auth/register"] {
        let mut times = (Duration::ZERO, Duration::ZERO);
        for round in 0..3 {
            let unknown = fresh_email("unknown");
            let body = |email: &str| match path {
                "/v1/auth/register" => json!({"email": email, "password": PASSWORD}),
                _ => json!({"email": email}),
            };
            let a = observed(&app, path, body(&known), &known).await;
            let b = observed(&app, path, body(&unknown), &unknown).await;
            assert_eq!((a.0, &a.1), (b.0, &b.1), "{path}: known and unknown answered differently");
            assert_eq!(a.0, StatusCode::ACCEPTED, "{path}: {}", a.1);
            assert!(
                a.2 >= latchkey::service::accounts::ANSWER_FLOOR
                    && b.2 >= latchkey::service::accounts::ANSWER_FLOOR
            );
            if round > 0 {
                times.0 += a.2;
                times.1 += b.2;
            }
        }
        let (known_ms, unknown_ms) = (times.0.as_millis() as i64 / 2, times.1.as_millis() as i64 / 2);
        assert!((known_ms - unknown_ms).abs() < 150, "{path}: known {known_ms} ms, unknown {unknown_ms} ms");
    }
    // The owner of the taken address heard of the attempt.
    mailbox.first(&known, "sign up").await;
}

both!(the_mail_limits_count_unknown_addresses_like_known_ones_and_say_nothing);
async fn the_mail_limits_count_unknown_addresses_like_known_ones_and_say_nothing(
    backend: Backend,
    store: Store,
) {
    let (app, mailbox) = spawn(backend, store, "optional", &[("RATE_LIMIT_EMAIL_PER_ADDRESS", "2/1h")]).await;
    let known = fresh_email("limited");
    sign_up(&app, &mailbox, &known).await; // one mail for this address
    let unknown = fresh_email("nobody");
    for email in [&known, &unknown] {
        for _ in 0..3 {
            let (status, body) =
                json_of(post(&app, "/v1/auth/password/forgot", json!({"email": email})).await).await;
            assert_eq!(
                (status, body),
                (StatusCode::ACCEPTED, json!({"email": email})),
                "the limit is silent"
            );
        }
    }
    // The known address had one mail of its budget left: one reset mail, not three.
    mailbox.first(&known, "Reset").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(mailbox.to(&known, "Reset").len(), 1);
    // Both addresses hit the limit, each counted once in the audit log.
    let counted = eventually(Duration::from_secs(5), || async {
        audit_log::Entity::find()
            .filter(audit_log::Column::Outcome.eq("email_per_address"))
            .all(&app.state.db)
            .await
            .unwrap()
            .len()
            == 2
    })
    .await;
    assert!(counted, "the unknown address was limited like the known one");
}

both!(a_one_time_token_works_once_for_its_purpose_before_it_expires_or_is_replaced);
async fn a_one_time_token_works_once_for_its_purpose_before_it_expires_or_is_replaced(
    backend: Backend,
    store: Store,
) {
    let (app, mailbox) = spawn(backend, store, "optional", &[]).await;
    let email = fresh_email("tokens");
    let verify = sign_up(&app, &mailbox, &email).await;
    let forgot = || post(&app, "/v1/auth/password/forgot", json!({"email": email}));
    assert_eq!(forgot().await.status(), StatusCode::ACCEPTED);
    let first = mailbox.first(&email, "Reset").await.token();

    // The wrong purpose: a reset token cannot verify, a verification token cannot reset or
    // confirm an email change. Neither is used up by trying.
    let bad = post(&app, "/v1/auth/verify-email", json!({"token": first})).await;
    assert_problem(bad, StatusCode::BAD_REQUEST, "invalid_one_time_token").await;
    let bad =
        post(&app, "/v1/auth/password/reset", json!({"token": verify, "new_password": NEW_PASSWORD})).await;
    assert_problem(bad, StatusCode::BAD_REQUEST, "invalid_one_time_token").await;
    let bad = post(&app, "/v1/auth/confirm-email", json!({"token": verify})).await;
    assert_problem(bad, StatusCode::BAD_REQUEST, "invalid_one_time_token").await;
    for junk in ["", "x", &"a".repeat(129), "not-a-token-at-all-but-43-characters-long-x"] {
        let bad = post(&app, "/v1/auth/verify-email", json!({"token": junk})).await;
        assert_problem(bad, StatusCode::BAD_REQUEST, "invalid_one_time_token").await;
    }

    // Replaced by a newer one.
    assert_eq!(forgot().await.status(), StatusCode::ACCEPTED);
    let second = mailbox.nth(&email, "Reset", 2).await.token();
    let old =
        post(&app, "/v1/auth/password/reset", json!({"token": first, "new_password": NEW_PASSWORD})).await;
    assert_problem(old, StatusCode::BAD_REQUEST, "invalid_one_time_token").await;

    // Expired: PASSWORD_RESET_TTL is 30 minutes.
    app.clock.advance(Duration::from_secs(31 * 60));
    let late =
        post(&app, "/v1/auth/password/reset", json!({"token": second, "new_password": NEW_PASSWORD})).await;
    assert_problem(late, StatusCode::BAD_REQUEST, "invalid_one_time_token").await;
    // The verification link lives 24 hours: still good.
    assert_eq!(
        post(&app, "/v1/auth/verify-email", json!({"token": verify})).await.status(),
        StatusCode::NO_CONTENT
    );
}

#[tokio::test]
async fn with_verification_off_register_answers_as_before_and_mails_nothing() {
    let (app, mailbox) = spawn(Backend::Sqlite, Store::InProcess, "off", &[]).await;
    let email = fresh_email("quiet");
    assert_eq!(app.register(&email, PASSWORD).await.status(), StatusCode::CREATED);
    assert_problem(app.register(&email, PASSWORD).await, StatusCode::CONFLICT, "email_taken").await;
    let tokens = login_ok(&app, &email, PASSWORD).await;
    assert_eq!(claims(&tokens.access)["email_verified"], json!(false));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(mailbox.all().is_empty());
}

#[tokio::test]
async fn concurrent_uses_of_one_link_succeed_once() {
    let (app, mailbox) = spawn(Backend::Postgres, Store::Redis, "optional", &[]).await;
    let email = fresh_email("race");
    let token = sign_up(&app, &mailbox, &email).await;
    let attempts = (0..8).map(|_| post(&app, "/v1/auth/verify-email", json!({"token": token})));
    let statuses: Vec<StatusCode> =
        futures_util::future::join_all(attempts).await.iter().map(|r| r.status()).collect();
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::NO_CONTENT).count(), 1, "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == StatusCode::NO_CONTENT || *s == StatusCode::BAD_REQUEST),
        "{statuses:?}"
    );
}

#[tokio::test]
async fn a_login_racing_a_disable_never_leaves_a_live_session() {
    let (app, _mailbox) = spawn(
        Backend::Postgres,
        Store::Redis,
        "off",
        &[("RATE_LIMIT_LOGIN_PER_ACCOUNT", "1000/1m"), ("RATE_LIMIT_LOGIN_PER_IP", "1000/1m")],
    )
    .await;
    let boss = admin(&app).await;
    let email = fresh_email("racer");
    assert_eq!(app.register(&email, PASSWORD).await.status(), StatusCode::CREATED);
    let id = latchkey::store::entity::user::Entity::find()
        .filter(user::Column::Email.eq(email.as_str()))
        .one(&app.state.db)
        .await
        .unwrap()
        .unwrap()
        .id;
    let logins = (0..6).map(|_| app.login(&email, PASSWORD));
    let disable =
        app.client.post(app.url(&format!("/v1/admin/users/{id}/disable"))).bearer_auth(&boss.access).send();
    let (logins, disabled) = tokio::join!(futures_util::future::join_all(logins), disable);
    assert_eq!(disabled.unwrap().status(), StatusCode::NO_CONTENT);
    for resp in logins {
        if resp.status() == StatusCode::OK {
            let tokens = crate::helpers::Tokens::from(resp.json::<Value>().await.unwrap());
            assert_eq!(
                session_status(&app, &tokens.access).await,
                StatusCode::UNAUTHORIZED,
                "a session outlived the disable"
            );
        }
    }
}
