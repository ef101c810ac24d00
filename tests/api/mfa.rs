//! Second factors (issue 16): TOTP codes computed by an independent implementation
//! (PyPI's `pyotp`, pinned in .ci/run), recovery codes, the login's second step, the
//! step-up of sensitive changes, and `amr`/`auth_time` in the tokens.

use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use latchkey::store::entity::totp_factor;
use reqwest::StatusCode;
use sea_orm::EntityTrait as _;
use serde_json::{Value, json};

use crate::accounts::spawn;
use crate::helpers::{Backend, PASSWORD, Store, TestApp, Tokens, claims};

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

/// The TOTP code of `secret` at Unix time `at`, by pyotp.
fn pyotp(secret: &str, at: i64) -> String {
    let out = Command::new("python3")
        .args([
            "-c",
            "import pyotp, sys; print(pyotp.TOTP(sys.argv[1]).at(int(sys.argv[2])))",
            secret,
            &at.to_string(),
        ])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "pyotp (pip install pyotp==2.9.0, see .ci/run): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// The server's clock, in Unix seconds (tests move it).
fn now(app: &TestApp) -> i64 {
    app.state.clock.now().timestamp()
}

/// Moves the server's clock to one second into a 30-second step, so that a test's codes
/// and the server's checks fall in the steps the test means (real time would otherwise
/// cross a step boundary now and then between computing a code and sending it).
fn align(app: &TestApp) {
    let into = now(app).rem_euclid(30);
    app.clock.advance(Duration::from_secs(u64::try_from((31 - into) % 30).unwrap()));
}

async fn send(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    access: Option<&str>,
    body: Value,
) -> (StatusCode, Value) {
    let mut req = app.client.request(method, app.url(path)).json(&body);
    if let Some(access) = access {
        req = req.bearer_auth(access);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn post(app: &TestApp, path: &str, access: Option<&str>, body: Value) -> (StatusCode, Value) {
    send(app, reqwest::Method::POST, path, access, body).await
}

/// A signed-in user with TOTP on: (email, secret, recovery codes, the session that enrolled).
async fn enrolled(app: &TestApp) -> (String, String, Vec<String>, Tokens) {
    let (email, tokens) = app.signed_in_user().await;
    let (status, body) =
        post(app, "/v1/users/me/mfa/totp", Some(&tokens.access), json!({"current_password": PASSWORD})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let secret = body["secret"].as_str().unwrap().to_owned();
    let uri = body["otpauth_uri"].as_str().unwrap();
    assert!(uri.starts_with("otpauth://totp/") && uri.contains(&format!("secret={secret}")), "{uri}");
    align(app);
    let code = pyotp(&secret, now(app));
    let (status, body) =
        post(app, "/v1/users/me/mfa/totp/confirm", Some(&tokens.access), json!({"code": code})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let codes: Vec<String> = serde_json::from_value(body["recovery_codes"].clone()).unwrap();
    (email, secret, codes, tokens)
}

/// Logs in with the password: the 403 `mfa_required` body.
async fn ticket(app: &TestApp, email: &str) -> Value {
    let (status, body) =
        post(app, "/v1/auth/login", None, json!({"email": email, "password": PASSWORD})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["code"], json!("mfa_required"));
    assert!(body.get("access_token").is_none() && body.get("refresh_token").is_none(), "no tokens: {body}");
    body
}

async fn finish(app: &TestApp, mfa_token: &Value, method: &str, code: &str) -> (StatusCode, Value) {
    post(app, "/v1/auth/mfa", None, json!({"mfa_token": mfa_token, "method": method, "code": code})).await
}

both!(totp_turns_a_password_into_half_a_login);
async fn totp_turns_a_password_into_half_a_login(backend: Backend, store: Store) {
    let app = TestApp::spawn(backend, store).await;
    let (email, tokens) = app.signed_in_user().await;
    let other = app.login_with(&email, &[]).await;

    let (status, body) = post(
        &app,
        "/v1/users/me/mfa/totp",
        Some(&tokens.access),
        json!({"current_password": "wrong password here"}),
    )
    .await;
    assert_eq!((status, &body["code"]), (StatusCode::FORBIDDEN, &json!("wrong_password")));
    let (_, body) =
        post(&app, "/v1/users/me/mfa/totp", Some(&tokens.access), json!({"current_password": PASSWORD}))
            .await;
    let secret = body["secret"].as_str().unwrap().to_owned();
    assert!(base32_len(&secret) * 8 >= 160, "at least 160 bits: {secret}");
    // Not active until confirmed: the password still logs in alone.
    let resp = app.login(&email, PASSWORD).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let (status, body) =
        post(&app, "/v1/users/me/mfa/totp/confirm", Some(&tokens.access), json!({"code": "000000"})).await;
    assert_eq!((status, &body["code"]), (StatusCode::UNAUTHORIZED, &json!("invalid_mfa_code")));
    align(&app);
    let first = pyotp(&secret, now(&app));
    let (status, body) =
        post(&app, "/v1/users/me/mfa/totp/confirm", Some(&tokens.access), json!({"code": first})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["recovery_codes"].as_array().unwrap().len(), 10);
    // Enrolling ended the other sessions, not this one.
    assert_eq!(app.get("/v1/auth/session", Some(&other.access)).await.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(app.get("/v1/auth/session", Some(&tokens.access)).await.status(), StatusCode::OK);

    let body = ticket(&app, &email).await;
    assert_eq!(body["methods"], json!(["totp", "recovery_code"]));
    // The code of the confirmation was used: the next step's code is needed (accepted, as
    // one step of drift is).
    let (status, _) = finish(&app, &body["mfa_token"], "totp", &first).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a code is accepted once");
    let (status, signed) = finish(&app, &body["mfa_token"], "totp", &pyotp(&secret, now(&app) + 30)).await;
    assert_eq!(status, StatusCode::OK, "{signed}");
    let access = signed["access_token"].as_str().unwrap();
    let c = claims(access);
    assert_eq!(c["amr"], json!(["pwd", "otp", "mfa"]));
    let auth_time = c["auth_time"].as_i64().unwrap();
    assert!((auth_time - now(&app)).abs() < 5);
    let (status, session) =
        send(&app, reqwest::Method::GET, "/v1/auth/session", Some(access), Value::Null).await;
    assert_eq!((status, &session["amr"]), (StatusCode::OK, &json!(["pwd", "otp", "mfa"])));
    // The ticket was used.
    let (status, body) = finish(&app, &body["mfa_token"], "totp", &pyotp(&secret, now(&app) + 30)).await;
    assert_eq!((status, &body["code"]), (StatusCode::UNAUTHORIZED, &json!("invalid_token")));

    // A refresh keeps how and when the session was authenticated.
    app.clock.advance(Duration::from_secs(120));
    let refreshed =
        app.refresh(signed["refresh_token"].as_str().unwrap()).await.json::<Value>().await.unwrap();
    let c = claims(refreshed["access_token"].as_str().unwrap());
    assert_eq!((c["amr"].clone(), c["auth_time"].as_i64()), (json!(["pwd", "otp", "mfa"]), Some(auth_time)));
}

fn base32_len(s: &str) -> usize {
    s.trim_end_matches('=').len() * 5 / 8
}

both!(codes_one_step_away_pass_two_steps_away_do_not_and_five_wrong_kill_the_ticket);
async fn codes_one_step_away_pass_two_steps_away_do_not_and_five_wrong_kill_the_ticket(
    backend: Backend,
    store: Store,
) {
    let app = TestApp::spawn(backend, store).await;
    let (email, secret, _, _) = enrolled(&app).await;

    app.clock.advance(Duration::from_secs(90));
    align(&app);
    let body = ticket(&app, &email).await;
    let (status, _) = finish(&app, &body["mfa_token"], "totp", &pyotp(&secret, now(&app) - 60)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "two steps ago");
    let (status, _) = finish(&app, &body["mfa_token"], "totp", &pyotp(&secret, now(&app) + 60)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "two steps ahead");
    let (status, _) = finish(&app, &body["mfa_token"], "totp", &pyotp(&secret, now(&app) - 30)).await;
    assert_eq!(status, StatusCode::OK, "the previous step");

    app.clock.advance(Duration::from_secs(90));
    align(&app);
    let body = ticket(&app, &email).await;
    let (status, _) = finish(&app, &body["mfa_token"], "totp", &pyotp(&secret, now(&app) + 30)).await;
    assert_eq!(status, StatusCode::OK, "the next step");

    // Five wrong codes: the ticket is dead, even for the right code.
    app.clock.advance(Duration::from_secs(90));
    let body = ticket(&app, &email).await;
    for n in 1..=5 {
        let (status, problem) = finish(&app, &body["mfa_token"], "totp", "123456").await;
        assert_eq!(
            (status, &problem["code"]),
            (StatusCode::UNAUTHORIZED, &json!("invalid_mfa_code")),
            "wrong code {n}"
        );
    }
    let (status, problem) = finish(&app, &body["mfa_token"], "totp", &pyotp(&secret, now(&app))).await;
    assert_eq!((status, &problem["code"]), (StatusCode::UNAUTHORIZED, &json!("invalid_token")));
}

both!(a_recovery_code_works_once);
async fn a_recovery_code_works_once(backend: Backend, store: Store) {
    let app = TestApp::spawn(backend, store).await;
    let (email, _, codes, _) = enrolled(&app).await;
    let body = ticket(&app, &email).await;
    let (status, signed) = finish(&app, &body["mfa_token"], "recovery_code", &codes[3].to_uppercase()).await;
    assert_eq!(status, StatusCode::OK, "{signed}");
    assert_eq!(claims(signed["access_token"].as_str().unwrap())["amr"], json!(["pwd", "otp", "mfa"]));
    let body = ticket(&app, &email).await;
    let (status, _) = finish(&app, &body["mfa_token"], "recovery_code", &codes[3]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "used once");
    let (status, _) = finish(&app, &body["mfa_token"], "recovery_code", &codes[4]).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn an_unused_ticket_expires() {
    let app = TestApp::spawn_with(Backend::Postgres, Store::Redis, &[("MFA_TICKET_TTL", "1s")]).await;
    let (email, secret, _, _) = enrolled(&app).await;
    let body = ticket(&app, &email).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, problem) = finish(&app, &body["mfa_token"], "totp", &pyotp(&secret, now(&app) + 30)).await;
    assert_eq!((status, &problem["code"]), (StatusCode::UNAUTHORIZED, &json!("invalid_token")));
}

both!(sensitive_changes_and_resets_ask_for_the_second_factor);
async fn sensitive_changes_and_resets_ask_for_the_second_factor(backend: Backend, store: Store) {
    let (app, mailbox) = spawn(backend, store, "off", &[]).await;
    let (email, secret, codes, tokens) = enrolled(&app).await;
    let change = |code: Option<String>| {
        let mut body =
            json!({"current_password": PASSWORD, "new_password": "a new passphrase for this test"});
        if let Some(code) = code {
            body["code"] = json!(code);
        }
        body
    };
    let (status, body) = post(&app, "/v1/users/me/password", Some(&tokens.access), change(None)).await;
    assert_eq!((status, &body["code"]), (StatusCode::UNAUTHORIZED, &json!("invalid_mfa_code")));
    let (status, _) =
        post(&app, "/v1/users/me/password", Some(&tokens.access), change(Some("999999".into()))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = post(
        &app,
        "/v1/users/me/password",
        Some(&tokens.access),
        change(Some(pyotp(&secret, now(&app) + 30))),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");

    // A reset by email needs it too: the link alone does not get around the factor.
    assert_eq!(
        app.post_json("/v1/auth/password/forgot", &json!({"email": email})).await.status(),
        StatusCode::ACCEPTED
    );
    let token = mailbox.first(&email, "Reset").await.token();
    let reset = |code: Option<&str>| {
        let mut body = json!({"token": token, "new_password": "the third passphrase today"});
        if let Some(code) = code {
            body["code"] = json!(code);
        }
        body
    };
    let (status, body) = post(&app, "/v1/auth/password/reset", None, reset(None)).await;
    assert_eq!((status, &body["code"]), (StatusCode::UNAUTHORIZED, &json!("invalid_mfa_code")));
    let (status, body) = post(&app, "/v1/auth/password/reset", None, reset(Some(&codes[0]))).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let body = ticket_with(&app, &email, "the third passphrase today").await;
    let (status, _) = finish(&app, &body["mfa_token"], "recovery_code", &codes[1]).await;
    assert_eq!(status, StatusCode::OK);
}

async fn ticket_with(app: &TestApp, email: &str, password: &str) -> Value {
    let (status, body) =
        post(app, "/v1/auth/login", None, json!({"email": email, "password": password})).await;
    assert_eq!((status, &body["code"]), (StatusCode::FORBIDDEN, &json!("mfa_required")), "{body}");
    body
}

both!(removing_totp_needs_a_code_and_then_the_password_suffices_again);
async fn removing_totp_needs_a_code_and_then_the_password_suffices_again(backend: Backend, store: Store) {
    let app = TestApp::spawn(backend, store).await;
    let (email, _, codes, tokens) = enrolled(&app).await;
    let (status, _) = send(
        &app,
        reqwest::Method::DELETE,
        "/v1/users/me/mfa/totp",
        Some(&tokens.access),
        json!({"current_password": PASSWORD}),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // New recovery codes: the old ones die.
    let (status, body) = post(
        &app,
        "/v1/users/me/mfa/recovery-codes",
        Some(&tokens.access),
        json!({"current_password": PASSWORD, "code": codes[0]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let fresh: Vec<String> = serde_json::from_value(body["recovery_codes"].clone()).unwrap();
    let (status, _) = send(
        &app,
        reqwest::Method::DELETE,
        "/v1/users/me/mfa/totp",
        Some(&tokens.access),
        json!({"current_password": PASSWORD, "code": codes[1]}),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "the old set is dead");
    let (status, _) = send(
        &app,
        reqwest::Method::DELETE,
        "/v1/users/me/mfa/totp",
        Some(&tokens.access),
        json!({"current_password": PASSWORD, "code": fresh[0]}),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let resp = app.login(&email, PASSWORD).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(claims(body["access_token"].as_str().unwrap())["amr"], json!(["pwd"]));
}

#[tokio::test]
async fn with_a_key_encryption_key_the_totp_secret_is_sealed_at_rest() {
    let kek = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    let app = TestApp::spawn_with(Backend::Sqlite, Store::InProcess, &[("KEY_ENCRYPTION_KEY", &kek)]).await;
    let (email, secret, _, _) = enrolled(&app).await;
    let row = totp_factor::Entity::find().one(&app.state.db).await.unwrap().unwrap();
    assert!(row.secret_encryption.is_some());
    let raw = base32_decode(&secret);
    assert!(
        !row.secret.windows(raw.len()).any(|w| w == raw.as_slice()),
        "the secret is not stored in the clear"
    );
    assert!(!format!("{row:?}").contains(&secret));
    let body = ticket(&app, &email).await;
    let (status, _) = finish(&app, &body["mfa_token"], "totp", &pyotp(&secret, now(&app) + 30)).await;
    assert_eq!(status, StatusCode::OK);
}

fn base32_decode(s: &str) -> Vec<u8> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import base64, sys; s = sys.argv[1]; print(base64.b32decode(s + '=' * (-len(s) % 8)).hex())",
            s,
        ])
        .output()
        .unwrap();
    let hex = String::from_utf8(out.stdout).unwrap();
    (0..hex.trim().len()).step_by(2).map(|i| u8::from_str_radix(&hex.trim()[i..i + 2], 16).unwrap()).collect()
}

#[tokio::test]
async fn the_mfa_required_answer_is_documented_with_its_ticket() {
    let spec: Value = serde_json::from_str(&latchkey::api::spec_json()).unwrap();
    let problem = &spec["components"]["schemas"]["Problem"]["properties"];
    assert!(problem.get("mfa_token").is_some() && problem.get("methods").is_some(), "{problem}");
    let login = spec["paths"]["/v1/auth/login"]["post"]["responses"]["403"]["description"].as_str().unwrap();
    assert!(login.contains("mfa_required"), "{login}");
    assert!(spec["paths"]["/v1/auth/mfa"]["post"].is_object());
}

#[tokio::test]
async fn adding_a_passkey_asks_for_the_password_and_the_second_factor() {
    // A stolen access token alone must not plant a way in.
    let app = TestApp::spawn(Backend::Sqlite, Store::InProcess).await;
    let (_, secret, _, tokens) = enrolled(&app).await;
    let options = "/v1/users/me/passkeys/options";
    let (status, body) = post(&app, options, Some(&tokens.access), json!({})).await;
    assert_eq!((status, &body["code"]), (StatusCode::BAD_REQUEST, &json!("validation_failed")));
    let (status, body) =
        post(&app, options, Some(&tokens.access), json!({"current_password": "not it at all"})).await;
    assert_eq!((status, &body["code"]), (StatusCode::FORBIDDEN, &json!("wrong_password")));
    let (status, body) =
        post(&app, options, Some(&tokens.access), json!({"current_password": PASSWORD})).await;
    assert_eq!((status, &body["code"]), (StatusCode::UNAUTHORIZED, &json!("invalid_mfa_code")));
    let code = pyotp(&secret, now(&app) + 30);
    let (status, body) =
        post(&app, options, Some(&tokens.access), json!({"current_password": PASSWORD, "code": code})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["challenge_id"].is_string());
}
