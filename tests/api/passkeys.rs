//! Passkeys (issue 16) with a software authenticator (webauthn-authenticator-rs's
//! `SoftPasskey`, which builds and signs real WebAuthn messages for an origin): register,
//! passwordless login, and everything an attacker tries with them — a replayed assertion, a
//! ceremony finished twice (also at once), another origin, a cloned authenticator's counter,
//! another user's passkey. The app is reached as `http://localhost:PORT`: WebAuthn refuses
//! an IP address as the relying party.
//!
//! The soft authenticator keeps no discoverable credentials, so where a browser would let
//! the user pick one of theirs for the (empty) allow list, the test names the credential.

use std::time::Duration;

use latchkey::store::entity::{audit_log, passkey, user};
use reqwest::StatusCode;
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait as _, EntityTrait as _, QueryFilter as _};
use serde_json::{Value, json};
use webauthn_authenticator_rs::WebauthnAuthenticator as _;
use webauthn_authenticator_rs::prelude::{CreationChallengeResponse, RequestChallengeResponse, Url};
use webauthn_authenticator_rs::softpasskey::SoftPasskey;

use crate::helpers::{
    Backend, PASSWORD, Resources, Store, TestApp, Tokens, assert_problem, eventually, free_port,
};

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

/// The app, served as `http://localhost:PORT` (its `JWT_ISSUER`, so its relying party).
struct Site {
    app: TestApp,
    origin: Url,
}

async fn site(backend: Backend, store: Store, env: &[(&str, &str)]) -> Site {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let origin = format!("http://localhost:{port}");
    let mut all = vec![("LISTEN_ADDR", listen.as_str()), ("JWT_ISSUER", origin.as_str())];
    all.extend_from_slice(env);
    let app = TestApp::spawn_with(backend, store, &all).await;
    Site { app, origin: Url::parse(&origin).unwrap() }
}

/// An authenticator that claims user verification (as a PIN or a fingerprint would give).
fn authenticator() -> SoftPasskey {
    SoftPasskey::new(true)
}

/// Another origin on the same host: the relying party id matches, the origin does not.
fn elsewhere() -> Url {
    Url::parse(&format!("http://localhost:{}", free_port())).unwrap()
}

impl Site {
    async fn post(&self, path: &str, token: Option<&str>, body: &Value) -> reqwest::Response {
        let mut req = self.app.client.post(self.app.url(path)).json(body);
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        req.send().await.unwrap()
    }

    /// Registration options: (challenge_id, options).
    async fn registration_options(&self, token: &str) -> (String, CreationChallengeResponse) {
        let resp = self
            .post("/v1/users/me/passkeys/options", Some(token), &json!({"current_password": PASSWORD}))
            .await;
        assert_eq!(resp.status(), StatusCode::OK);
        let body: Value = resp.json().await.unwrap();
        let options = &body["options"];
        assert_eq!(options["publicKey"]["authenticatorSelection"]["userVerification"], "required");
        assert_eq!(options["publicKey"]["authenticatorSelection"]["residentKey"], "preferred");
        (body["challenge_id"].as_str().unwrap().to_owned(), serde_json::from_value(options.clone()).unwrap())
    }

    /// The authenticator's answer to fresh registration options, made at `origin`.
    async fn registration(&self, token: &str, key: &mut SoftPasskey, origin: &Url) -> (String, Value) {
        let (challenge_id, options) = self.registration_options(token).await;
        let credential = key.do_registration(origin.clone(), options).unwrap();
        (challenge_id, serde_json::to_value(credential).unwrap())
    }

    /// Registers a passkey for the user of `token`: (passkey id, credential id).
    async fn add_passkey(&self, token: &str, key: &mut SoftPasskey, name: &str) -> (String, String) {
        let (challenge_id, credential) = self.registration(token, key, &self.origin).await;
        let resp = self
            .post(
                "/v1/users/me/passkeys",
                Some(token),
                &json!({"challenge_id": challenge_id, "credential": credential, "name": name}),
            )
            .await;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap();
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["name"], name);
        (body["id"].as_str().unwrap().to_owned(), credential["id"].as_str().unwrap().to_owned())
    }

    /// Passwordless login options: (challenge_id, options as JSON).
    async fn login_options(&self) -> (String, Value) {
        let resp = self.post("/v1/auth/passkey/options", None, &json!({})).await;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["options"]["publicKey"]["userVerification"], "required");
        (body["challenge_id"].as_str().unwrap().to_owned(), body["options"].clone())
    }

    /// The authenticator's assertion for `options`, made at `origin` with `credential_id`.
    fn assert_with(key: &mut SoftPasskey, origin: &Url, options: &Value, credential_id: &str) -> Value {
        let mut options = options.clone();
        // What the browser does when the user picks this passkey (see the module doc).
        options["publicKey"]["allowCredentials"] = json!([{"type": "public-key", "id": credential_id}]);
        let options: RequestChallengeResponse = serde_json::from_value(options).unwrap();
        serde_json::to_value(key.do_authentication(origin.clone(), options).unwrap()).unwrap()
    }

    async fn finish_login(&self, challenge_id: &str, credential: &Value) -> reqwest::Response {
        self.post("/v1/auth/passkey", None, &json!({"challenge_id": challenge_id, "credential": credential}))
            .await
    }

    /// A whole passwordless login at the right origin.
    async fn passkey_login(&self, key: &mut SoftPasskey, credential_id: &str) -> reqwest::Response {
        let (challenge_id, options) = self.login_options().await;
        let credential = Self::assert_with(key, &self.origin, &options, credential_id);
        self.finish_login(&challenge_id, &credential).await
    }

    async fn list(&self, token: &str) -> Vec<Value> {
        let resp = self.app.get("/v1/users/me/passkeys", Some(token)).await;
        assert_eq!(resp.status(), StatusCode::OK);
        resp.json::<Value>().await.unwrap()["passkeys"].as_array().unwrap().clone()
    }

    async fn remove(&self, token: &str, id: &str, password: &str) -> reqwest::Response {
        self.app
            .client
            .delete(self.app.url(&format!("/v1/users/me/passkeys/{id}")))
            .bearer_auth(token)
            .json(&json!({"current_password": password}))
            .send()
            .await
            .unwrap()
    }

    /// Waits for an audit row `action`/`outcome` (the audit log is written in batches).
    async fn audited(&self, action: &str, outcome: &str) -> audit_log::Model {
        let db = &self.app.state.db;
        let found = eventually(Duration::from_secs(10), || async {
            audit_log::Entity::find()
                .filter(audit_log::Column::Action.eq(action))
                .filter(audit_log::Column::Outcome.eq(outcome))
                .one(db)
                .await
                .unwrap()
                .is_some()
        })
        .await;
        assert!(found, "no audit row {action}/{outcome}");
        audit_log::Entity::find()
            .filter(audit_log::Column::Action.eq(action))
            .filter(audit_log::Column::Outcome.eq(outcome))
            .one(db)
            .await
            .unwrap()
            .unwrap()
    }
}

async fn me_status(app: &TestApp, token: &str) -> StatusCode {
    app.get("/v1/users/me", Some(token)).await.status()
}

async fn a_passkey_registers_and_signs_in_without_a_password(backend: Backend, store: Store) {
    let site = site(backend, store, &[]).await;
    let (email, tokens) = site.app.signed_in_user().await;
    let mut key = authenticator();
    assert!(site.list(&tokens.access).await.is_empty());
    let (id, credential_id) = site.add_passkey(&tokens.access, &mut key, "Soft key").await;

    let listed = site.list(&tokens.access).await;
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0]["id"].as_str(), listed[0]["name"].as_str()), (Some(id.as_str()), Some("Soft key")));
    assert!(listed[0]["created_at"].is_string() && listed[0]["last_used_at"].is_null(), "{listed:?}");

    let resp = site.passkey_login(&mut key, &credential_id).await;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    let signed_in = Tokens::from(body);
    let (_, claims) = crate::tokens::parts(&signed_in.access);
    assert_eq!(claims["amr"], json!(["hwk", "user", "mfa"]));
    assert!(claims["auth_time"].as_i64().is_some_and(|t| t > 0));
    let me = site.app.get("/v1/users/me", Some(&signed_in.access)).await;
    assert_eq!(me.status(), StatusCode::OK);
    assert_eq!(me.json::<Value>().await.unwrap()["email"], email);
    // A refresh keeps how the session was authenticated.
    let refreshed = site.app.refresh(&signed_in.refresh).await;
    assert_eq!(refreshed.status(), StatusCode::OK);
    let refreshed = Tokens::from(refreshed.json::<Value>().await.unwrap());
    assert_eq!(crate::tokens::parts(&refreshed.access).1["amr"], json!(["hwk", "user", "mfa"]));

    assert!(site.list(&tokens.access).await[0]["last_used_at"].is_string());
    let stored = passkey::Entity::find().one(&site.app.state.db).await.unwrap().unwrap();
    assert_eq!(stored.credential_id, credential_id);
    assert_eq!(stored.sign_count, 1, "the soft authenticator counts its signatures");
    site.audited("passkey_added", "success").await;
    let used = site.audited("passkey_used", "success").await;
    assert_eq!(used.detail.unwrap()["purpose"], "login");

    // A second passkey for the same account; the first is excluded from its options.
    let (_, options) = site.registration_options(&tokens.access).await;
    let excluded = options.public_key.exclude_credentials.unwrap_or_default();
    assert_eq!(excluded.len(), 1);
    let mut second = authenticator();
    site.add_passkey(&tokens.access, &mut second, "Backup key").await;
    assert_eq!(site.list(&tokens.access).await.len(), 2);
}
both!(a_passkey_registers_and_signs_in_without_a_password);

async fn a_ceremony_finishes_once_and_an_assertion_works_once(backend: Backend, store: Store) {
    let site = site(backend, store, &[]).await;
    let (_, tokens) = site.app.signed_in_user().await;
    let mut key = authenticator();

    // Registration: the same answer twice.
    let (challenge_id, credential) = site.registration(&tokens.access, &mut key, &site.origin).await;
    let body = json!({"challenge_id": challenge_id, "credential": credential, "name": "Key"});
    assert_eq!(
        site.post("/v1/users/me/passkeys", Some(&tokens.access), &body).await.status(),
        StatusCode::CREATED
    );
    let again = site.post("/v1/users/me/passkeys", Some(&tokens.access), &body).await;
    assert_problem(again, StatusCode::BAD_REQUEST, "validation_failed").await;
    let credential_id = credential["id"].as_str().unwrap().to_owned();

    // Login: the same challenge finished twice.
    let (challenge_id, options) = site.login_options().await;
    let assertion = Site::assert_with(&mut key, &site.origin, &options, &credential_id);
    assert_eq!(site.finish_login(&challenge_id, &assertion).await.status(), StatusCode::OK);
    let replayed = site.finish_login(&challenge_id, &assertion).await;
    assert_problem(replayed, StatusCode::UNAUTHORIZED, "invalid_credentials").await;

    // The same assertion under a fresh challenge: it signed another one.
    let (fresh, _) = site.login_options().await;
    let replayed = site.finish_login(&fresh, &assertion).await;
    assert_problem(replayed, StatusCode::UNAUTHORIZED, "invalid_credentials").await;

    // Two finishes of one ceremony at once: one wins.
    let (challenge_id, options) = site.login_options().await;
    let assertion = Site::assert_with(&mut key, &site.origin, &options, &credential_id);
    let (a, b) = tokio::join!(
        site.finish_login(&challenge_id, &assertion),
        site.finish_login(&challenge_id, &assertion)
    );
    let mut statuses = [a.status(), b.status()];
    statuses.sort();
    assert_eq!(statuses, [StatusCode::OK, StatusCode::UNAUTHORIZED]);

    // Made-up and stale challenge ids.
    let made_up = site.finish_login(&"A".repeat(43), &assertion).await;
    assert_problem(made_up, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    let (fresh, _) = site.login_options().await;
    let garbage = site.finish_login(&fresh, &json!({"id": "x"})).await;
    assert_problem(garbage, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
}
both!(a_ceremony_finishes_once_and_an_assertion_works_once);

async fn a_credential_from_another_origin_is_refused(backend: Backend, store: Store) {
    let site = site(backend, store, &[]).await;
    let (_, tokens) = site.app.signed_in_user().await;
    let mut key = authenticator();

    let (challenge_id, credential) = site.registration(&tokens.access, &mut key, &elsewhere()).await;
    let body = json!({"challenge_id": challenge_id, "credential": credential, "name": "Phished"});
    let resp = site.post("/v1/users/me/passkeys", Some(&tokens.access), &body).await;
    assert_problem(resp, StatusCode::BAD_REQUEST, "validation_failed").await;
    assert!(site.list(&tokens.access).await.is_empty());
    site.audited("passkey_refused", "wrong_origin").await;

    let (_, credential_id) = site.add_passkey(&tokens.access, &mut key, "Key").await;
    let (challenge_id, options) = site.login_options().await;
    let assertion = Site::assert_with(&mut key, &elsewhere(), &options, &credential_id);
    let resp = site.finish_login(&challenge_id, &assertion).await;
    assert_problem(resp, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    let row = site.audited("passkey_refused", "wrong_origin").await;
    assert!(row.user_id.is_some());
    // The right origin still works.
    assert_eq!(site.passkey_login(&mut key, &credential_id).await.status(), StatusCode::OK);
}
both!(a_credential_from_another_origin_is_refused);

async fn a_signature_counter_that_goes_backwards_is_refused_and_audited(backend: Backend, store: Store) {
    let site = site(backend, store, &[]).await;
    let (_, tokens) = site.app.signed_in_user().await;
    let mut key = authenticator();
    let (_, credential_id) = site.add_passkey(&tokens.access, &mut key, "Key").await;
    assert_eq!(site.passkey_login(&mut key, &credential_id).await.status(), StatusCode::OK);
    let db = &site.app.state.db;

    // A clone that signed more often than this authenticator: the counter SQL keeps.
    passkey::Entity::update_many()
        .col_expr(passkey::Column::SignCount, Expr::value(1000_i64))
        .exec(db)
        .await
        .unwrap();
    let resp = site.passkey_login(&mut key, &credential_id).await;
    assert_problem(resp, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    let row = site.audited("passkey_refused", "counter_regression").await;
    assert_eq!(row.detail.unwrap()["stored_counter"], 1000);

    // The counter inside the stored credential (webauthn-rs's own check).
    let stored = passkey::Entity::find().one(db).await.unwrap().unwrap();
    let mut credential: Value = serde_json::from_str(&stored.passkey).unwrap();
    credential["cred"]["counter"] = json!(1000);
    passkey::Entity::update_many()
        .col_expr(passkey::Column::SignCount, Expr::value(2_i64))
        .col_expr(passkey::Column::Passkey, Expr::value(credential.to_string()))
        .exec(db)
        .await
        .unwrap();
    let resp = site.passkey_login(&mut key, &credential_id).await;
    assert_problem(resp, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    let refused = eventually(Duration::from_secs(10), || async {
        audit_log::Entity::find()
            .filter(audit_log::Column::Action.eq("passkey_refused"))
            .filter(audit_log::Column::Outcome.eq("counter_regression"))
            .all(db)
            .await
            .unwrap()
            .len()
            == 2
    })
    .await;
    assert!(refused, "both refusals audited");
    assert_eq!(passkey::Entity::find().one(db).await.unwrap().unwrap().sign_count, 2, "nothing was written");
}
both!(a_signature_counter_that_goes_backwards_is_refused_and_audited);

async fn adding_and_removing_a_passkey_end_the_other_sessions(backend: Backend, store: Store) {
    let site = site(backend, store, &[]).await;
    let (email, here) = site.app.signed_in_user().await;
    let other = site.app.login_with(&email, &[]).await;
    let mut key = authenticator();
    let (id, credential_id) = site.add_passkey(&here.access, &mut key, "Key").await;
    assert_eq!(
        me_status(&site.app, &other.access).await,
        StatusCode::UNAUTHORIZED,
        "the other session ended"
    );
    assert_eq!(site.app.refresh(&other.refresh).await.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(me_status(&site.app, &here.access).await, StatusCode::OK, "this one stays");

    let resp = site.passkey_login(&mut key, &credential_id).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let by_passkey = Tokens::from(resp.json::<Value>().await.unwrap());

    let wrong = site.remove(&here.access, &id, "not the password at all").await;
    assert_problem(wrong, StatusCode::FORBIDDEN, "wrong_password").await;
    assert_eq!(site.list(&here.access).await.len(), 1);
    assert_eq!(site.remove(&here.access, &id, PASSWORD).await.status(), StatusCode::NO_CONTENT);
    assert!(site.list(&here.access).await.is_empty());
    assert_eq!(me_status(&site.app, &by_passkey.access).await, StatusCode::UNAUTHORIZED);
    assert_eq!(me_status(&site.app, &here.access).await, StatusCode::OK);
    site.audited("passkey_removed", "success").await;

    let resp = site.passkey_login(&mut key, &credential_id).await;
    assert_problem(resp, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    let gone = site.remove(&here.access, &id, PASSWORD).await;
    assert_problem(gone, StatusCode::NOT_FOUND, "not_found").await;
}
both!(adding_and_removing_a_passkey_end_the_other_sessions);

async fn another_users_passkey_is_not_found(backend: Backend, store: Store) {
    let site = site(backend, store, &[]).await;
    let (_, alice) = site.app.signed_in_user().await;
    let (_, bob) = site.app.signed_in_user().await;
    let mut key = authenticator();
    let (id, credential_id) = site.add_passkey(&alice.access, &mut key, "Alice's key").await;

    assert!(site.list(&bob.access).await.is_empty());
    let resp = site.remove(&bob.access, &id, PASSWORD).await;
    assert_problem(resp, StatusCode::NOT_FOUND, "not_found").await;
    let resp = site.remove(&bob.access, &uuid::Uuid::new_v4().to_string(), PASSWORD).await;
    assert_problem(resp, StatusCode::NOT_FOUND, "not_found").await;
    assert_eq!(site.list(&alice.access).await.len(), 1);

    // Bob cannot finish a registration Alice started.
    let (challenge_id, credential) =
        site.registration(&alice.access, &mut authenticator(), &site.origin).await;
    let body = json!({"challenge_id": challenge_id, "credential": credential, "name": "Bob's now"});
    let resp = site.post("/v1/users/me/passkeys", Some(&bob.access), &body).await;
    assert_problem(resp, StatusCode::BAD_REQUEST, "validation_failed").await;
    assert!(site.list(&bob.access).await.is_empty());

    // Alice's passkey signs in Alice, and a disabled Alice not at all.
    let resp = site.passkey_login(&mut key, &credential_id).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let (_, claims) = crate::tokens::parts(&Tokens::from(resp.json::<Value>().await.unwrap()).access);
    assert_eq!(claims["sub"], crate::tokens::parts(&alice.access).1["sub"]);
    user::Entity::update_many()
        .col_expr(user::Column::DisabledAt, Expr::value(chrono::Utc::now()))
        .filter(user::Column::Id.eq(claims["sub"].as_str().unwrap().parse::<uuid::Uuid>().unwrap()))
        .exec(&site.app.state.db)
        .await
        .unwrap();
    let resp = site.passkey_login(&mut key, &credential_id).await;
    assert_problem(resp, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
}
both!(another_users_passkey_is_not_found);

/// The second-factor entry points the MFA login calls: options restricted to the user's
/// passkeys, kept under the ticket, finished once.
async fn a_passkey_serves_as_a_second_factor_once_per_ticket(backend: Backend, store: Store) {
    use latchkey::service::passkeys;
    let site = site(backend, store, &[]).await;
    let (_, tokens) = site.app.signed_in_user().await;
    let (_, other) = site.app.signed_in_user().await;
    let user_id = crate::tokens::parts(&tokens.access).1["sub"].as_str().unwrap().parse().unwrap();
    let other_id = crate::tokens::parts(&other.access).1["sub"].as_str().unwrap().parse().unwrap();
    let state = &site.app.state;
    let client = latchkey::service::ClientInfo::default();
    assert!(!passkeys::has_passkeys(&state.db, user_id).await.unwrap());
    let mut key = authenticator();
    let (_, credential_id) = site.add_passkey(&tokens.access, &mut key, "Key").await;
    assert!(passkeys::has_passkeys(&state.db, user_id).await.unwrap());
    assert!(!passkeys::has_passkeys(&state.db, other_id).await.unwrap());

    let options = passkeys::second_factor_options(state, user_id, "ticket-1").await.unwrap();
    let allowed = options["publicKey"]["allowCredentials"].as_array().unwrap();
    assert_eq!(allowed.len(), 1);
    assert_eq!(allowed[0]["id"], credential_id.as_str());
    let assertion = Site::assert_with(&mut key, &site.origin, &options, &credential_id);
    passkeys::second_factor_finish(state, user_id, "ticket-1", assertion.clone(), &client).await.unwrap();
    let again = passkeys::second_factor_finish(state, user_id, "ticket-1", assertion, &client).await;
    assert_eq!(again.unwrap_err().code.as_str(), "invalid_mfa_code");

    // Another ticket's ceremony, or another user's, is not this one.
    let options = passkeys::second_factor_options(state, user_id, "ticket-2").await.unwrap();
    let assertion = Site::assert_with(&mut key, &site.origin, &options, &credential_id);
    let wrong_ticket =
        passkeys::second_factor_finish(state, user_id, "ticket-3", assertion.clone(), &client).await;
    assert_eq!(wrong_ticket.unwrap_err().code.as_str(), "invalid_mfa_code");
    let wrong_user = passkeys::second_factor_finish(state, other_id, "ticket-2", assertion, &client).await;
    assert_eq!(wrong_user.unwrap_err().code.as_str(), "invalid_mfa_code");
    let none = passkeys::second_factor_options(state, other_id, "ticket-4").await;
    assert_eq!(none.unwrap_err().code.as_str(), "invalid_mfa_code");
}
both!(a_passkey_serves_as_a_second_factor_once_per_ticket);

/// After a password, a passkey completes the login through `/v1/auth/mfa`; removing the
/// last passkey makes the password alone enough again.
async fn a_password_login_then_asks_for_the_passkey(backend: Backend, store: Store) {
    let site = site(backend, store, &[]).await;
    let (email, tokens) = site.app.signed_in_user().await;
    let mut key = authenticator();
    let (id, credential_id) = site.add_passkey(&tokens.access, &mut key, "Key").await;

    let resp = site.app.login(&email, PASSWORD).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let ticket: Value = resp.json().await.unwrap();
    assert_eq!((&ticket["code"], &ticket["methods"]), (&json!("mfa_required"), &json!(["webauthn"])));
    let mfa_token = &ticket["mfa_token"];
    let resp = site.post("/v1/auth/mfa/webauthn/options", None, &json!({"mfa_token": mfa_token})).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let options: Value = resp.json().await.unwrap();
    assert_eq!(options["publicKey"]["allowCredentials"][0]["id"], credential_id.as_str());
    assert_eq!(options["publicKey"]["userVerification"], "required");

    // An assertion from another origin is a wrong second factor; the ticket lives on.
    let phished = Site::assert_with(&mut key, &elsewhere(), &options, &credential_id);
    let body = json!({"mfa_token": mfa_token, "method": "webauthn", "credential": phished});
    assert_problem(
        site.post("/v1/auth/mfa", None, &body).await,
        StatusCode::UNAUTHORIZED,
        "invalid_mfa_code",
    )
    .await;

    let resp = site.post("/v1/auth/mfa/webauthn/options", None, &json!({"mfa_token": mfa_token})).await;
    let options: Value = resp.json().await.unwrap();
    let assertion = Site::assert_with(&mut key, &site.origin, &options, &credential_id);
    let body = json!({"mfa_token": mfa_token, "method": "webauthn", "credential": assertion});
    let resp = site.post("/v1/auth/mfa", None, &body).await;
    let status = resp.status();
    let signed: Value = resp.json().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{signed}");
    let signed = Tokens::from(signed);
    assert_eq!(crate::tokens::parts(&signed.access).1["amr"], json!(["pwd", "hwk", "mfa"]));
    assert_eq!(me_status(&site.app, &signed.access).await, StatusCode::OK);
    // The same answer again: the ticket is spent.
    assert_eq!(site.post("/v1/auth/mfa", None, &body).await.status(), StatusCode::UNAUTHORIZED);
    let used = site.audited("passkey_used", "success").await;
    assert_eq!(used.detail.unwrap()["purpose"], "second_factor");

    assert_eq!(site.remove(&signed.access, &id, PASSWORD).await.status(), StatusCode::NO_CONTENT);
    assert_eq!(site.app.login(&email, PASSWORD).await.status(), StatusCode::OK, "the password alone again");
}
both!(a_password_login_then_asks_for_the_passkey);

#[tokio::test]
async fn passwordless_options_are_rate_limited_per_client() {
    let site = site(Backend::Sqlite, Store::InProcess, &[("RATE_LIMIT_LOGIN_PER_IP", "3/1m")]).await;
    for _ in 0..3 {
        site.login_options().await;
    }
    let resp = site.post("/v1/auth/passkey/options", None, &json!({})).await;
    assert_problem(resp, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
}

#[tokio::test]
async fn a_misconfigured_relying_party_stops_start_up() {
    let resources = Resources::new(Backend::Sqlite, &Store::InProcess).await;
    for (env, variable) in [
        (vec![("WEBAUTHN_ORIGINS", "https://evil.example")], "WEBAUTHN_ORIGINS"),
        (vec![("WEBAUTHN_ORIGINS", "not a url")], "WEBAUTHN_ORIGINS"),
        (vec![("WEBAUTHN_ORIGINS", "https://auth.example.com/login")], "WEBAUTHN_ORIGINS"),
        (vec![("WEBAUTHN_RP_ID", "127.0.0.1")], "WEBAUTHN_RP_ID"),
        (
            vec![("WEBAUTHN_RP_ID", "example.com"), ("WEBAUTHN_ORIGINS", "http://app.example.com")],
            "WEBAUTHN_ORIGINS",
        ),
        (
            vec![("JWT_ISSUER", "http://127.0.0.1:8080"), ("WEBAUTHN_ORIGINS", "http://localhost:8080")],
            "WEBAUTHN_RP_ID",
        ),
    ] {
        let err = TestApp::try_spawn_on(resources.clone(), &env).await.err().expect("start-up refused");
        assert!(format!("{err:#}").contains(variable), "{env:?}: {err:#}");
    }

    // An IP address as the issuer, with neither variable set: the server starts, passkeys off.
    let app =
        TestApp::try_spawn_on(resources.clone(), &[("JWT_ISSUER", "http://127.0.0.1:8080")]).await.unwrap();
    let resp = app.post_json("/v1/auth/passkey/options", &json!({})).await;
    assert_problem(resp, StatusCode::NOT_FOUND, "not_found").await;
    drop(app);
    // Set explicitly, several origins under one relying party.
    let env = [
        ("JWT_ISSUER", "https://auth.example.com"),
        ("WEBAUTHN_RP_ID", "example.com"),
        ("WEBAUTHN_ORIGINS", "https://auth.example.com, https://app.example.com"),
    ];
    let app = TestApp::try_spawn_on(resources, &env).await.unwrap();
    assert_eq!(app.post_json("/v1/auth/passkey/options", &json!({})).await.status(), StatusCode::OK);
}
