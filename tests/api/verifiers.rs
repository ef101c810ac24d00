//! What offline verifiers and browsers see: algorithms, JWKS, metadata, rotation, the
//! OAuth endpoints, CORS and cookie mode.

use std::process::Command;
use std::time::Duration;

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{Backend, PASSWORD, Store, TestApp, assert_problem, eventually};
use crate::tokens::parts;

/// Verifies `token` with only what a stranger has: the metadata document, its
/// `jwks_uri`, the key whose `kid` the token names — decoded with jsonwebtoken's own JWK
/// support, independent of Latchkey's signing code.
async fn verify_as_a_stranger(app: &TestApp, token: &str) -> Result<Value, String> {
    let meta: Value = app.get("/.well-known/oauth-authorization-server", None).await.json().await.unwrap();
    let jwks_uri = meta["jwks_uri"].as_str().unwrap();
    let path = &jwks_uri[jwks_uri.find("/.well-known").unwrap()..];
    let jwks: jsonwebtoken::jwk::JwkSet = app.get(path, None).await.json().await.unwrap();
    let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
    let kid = header.kid.ok_or("no kid")?;
    let jwk: &Jwk = jwks.find(&kid).ok_or("unknown kid")?;
    let alg: Algorithm = jwk.common.key_algorithm.ok_or("no alg")?.to_string().parse().map_err(|_| "alg")?;
    let mut validation = Validation::new(alg);
    validation.set_issuer(&[meta["issuer"].as_str().unwrap()]);
    validation.set_audience(&["latchkey"]);
    let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
    jsonwebtoken::decode::<Value>(token, &key, &validation).map(|d| d.claims).map_err(|e| e.to_string())
}

async fn each_algorithm(alg: &str) {
    let app = TestApp::spawn_with(Backend::Sqlite, Store::InProcess, &[("JWT_ALGORITHM", alg)]).await;
    let (_, tokens) = app.signed_in_user().await;
    let (header, claims) = parts(&tokens.access);
    assert_eq!(header["alg"], alg);
    let verified = verify_as_a_stranger(&app, &tokens.access).await.expect("a stranger verifies it");
    assert_eq!(verified["sid"], claims["sid"]);
    let jwks: Value = app.get("/.well-known/jwks.json", None).await.json().await.unwrap();
    for key in jwks["keys"].as_array().unwrap() {
        assert_eq!(key["use"], "sig");
        assert_eq!(key["alg"], alg);
        assert!(key["kid"].is_string());
        assert!(key.get("d").is_none() && key.get("p").is_none(), "no private parts: {key}");
    }

    // Swapped alg header (same kid, same payload, same signature): refused.
    let sig = tokens.access.rsplit('.').next().unwrap();
    let b64 =
        |v: &Value| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, v.to_string());
    let other_alg = if alg == "ES256" { "EdDSA" } else { "ES256" };
    let mut swapped = header.clone();
    swapped["alg"] = json!(other_alg);
    let swapped = format!("{}.{}.{sig}", b64(&swapped), b64(&claims));
    // A foreign kid.
    let mut foreign = header.clone();
    foreign["kid"] = json!("not-a-key-of-ours");
    let foreign = format!("{}.{}.{sig}", b64(&foreign), b64(&claims));
    // HS256 "signed" with the public key material as the secret.
    let jwk = &jwks["keys"][0];
    let public = jwk["x"].as_str().or(jwk["n"].as_str()).unwrap();
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = header["kid"].as_str().map(str::to_owned);
    hs.typ = Some("at+jwt".into());
    let confused = jsonwebtoken::encode(&hs, &claims, &EncodingKey::from_secret(public.as_bytes())).unwrap();
    for forged in [swapped, foreign, confused] {
        assert_problem(
            app.get("/v1/users/me", Some(&forged)).await,
            StatusCode::UNAUTHORIZED,
            "invalid_token",
        )
        .await;
        assert!(verify_as_a_stranger(&app, &forged).await.is_err());
    }
    assert_eq!(app.get("/v1/users/me", Some(&tokens.access)).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn eddsa_tokens_verify_offline() {
    each_algorithm("EdDSA").await;
}

#[tokio::test]
async fn es256_tokens_verify_offline() {
    each_algorithm("ES256").await;
}

#[tokio::test]
async fn rs256_tokens_verify_offline() {
    each_algorithm("RS256").await;
}

#[tokio::test]
async fn hs256_needs_the_secret_and_publishes_nothing() {
    let secret = "a shared secret of at least thirty-two bytes";
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        Store::InProcess,
        &[("JWT_ALGORITHM", "HS256"), ("JWT_SECRET", secret)],
    )
    .await;
    let (_, tokens) = app.signed_in_user().await;
    let jwks: Value = app.get("/.well-known/jwks.json", None).await.json().await.unwrap();
    assert_eq!(jwks["keys"], json!([]), "the secret is never published");
    let mut v = Validation::new(Algorithm::HS256);
    v.set_audience(&["latchkey"]);
    jsonwebtoken::decode::<Value>(&tokens.access, &DecodingKey::from_secret(secret.as_bytes()), &v)
        .expect("verifies");
    assert!(
        TestApp::try_spawn_on(app.resources.clone(), &[("JWT_ALGORITHM", "HS256"), ("JWT_SECRET", "short")])
            .await
            .is_err()
    );
}

fn latchkey(args: &[&str], database_url: &str) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .args(args)
        .env("DATABASE_URL", database_url)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

#[tokio::test]
async fn rotation_through_the_cli_breaks_nobody_on_two_instances() {
    let env = [("KEYS_REFRESH_INTERVAL", "1s")];
    let a = TestApp::spawn_with(Backend::Postgres, Store::Redis, &env).await;
    let b = TestApp::spawn_on(a.resources.clone(), &env).await;
    let (_, before) = a.signed_in_user().await;
    let old_kid = parts(&before.access).0["kid"].as_str().unwrap().to_owned();

    let url = a.resources.database_url.clone();
    let rotated = tokio::task::spawn_blocking(move || latchkey(&["keys", "rotate"], &url)).await.unwrap();
    let new_kid = rotated["kid"].as_str().unwrap().to_owned();
    assert_ne!(new_kid, old_kid);

    // Both instances publish the new key within the refresh interval, before it signs.
    for app in [&a, &b] {
        let published = eventually(Duration::from_secs(5), || async {
            let jwks: Value = app.get("/.well-known/jwks.json", None).await.json().await.unwrap();
            let kids: Vec<&str> =
                jwks["keys"].as_array().unwrap().iter().filter_map(|k| k["kid"].as_str()).collect();
            kids.contains(&new_kid.as_str()) && kids.contains(&old_kid.as_str())
        })
        .await;
        assert!(published, "the new key is published on every instance");
        let (_, t) = app.signed_in_user().await;
        assert_eq!(parts(&t.access).0["kid"], old_kid.as_str(), "not signing with the new key yet");
    }
    let resp = a.get("/.well-known/jwks.json", None).await;
    assert_eq!(resp.headers()["cache-control"], "public, max-age=300");

    // After KEY_PREPUBLISH (the CLI's default: JWKS_MAX_AGE 5m + KEYS_REFRESH_INTERVAL 30s)
    // the new key signs everywhere.
    let activates: chrono::DateTime<chrono::Utc> = rotated["activates_at"].as_str().unwrap().parse().unwrap();
    let wait = (activates - a.clock.now()).to_std().unwrap();
    assert!(wait > Duration::from_secs(320), "pre-published for KEY_PREPUBLISH: {wait:?}");
    for app in [&a, &b] {
        app.clock.advance(wait + Duration::from_secs(1));
    }
    for app in [&a, &b] {
        let (_, t) = app.signed_in_user().await;
        assert_eq!(parts(&t.access).0["kid"], new_kid.as_str());
        verify_as_a_stranger(app, &t.access).await.expect("new tokens verify");
    }
    // The token from before the rotation keeps working, against the JWKS and on bearer routes.
    verify_as_a_stranger(&a, &before.access).await.expect("old tokens verify after the rotation");
    assert_eq!(b.get("/v1/users/me", Some(&before.access)).await.status(), StatusCode::OK);

    // The old key leaves the JWKS only after its last token expired (15 min + leeway).
    a.clock.advance(Duration::from_secs(14 * 60));
    let jwks: Value = a.get("/.well-known/jwks.json", None).await.json().await.unwrap();
    assert!(jwks.to_string().contains(&old_kid), "still published while its tokens live");
    a.clock.advance(Duration::from_secs(60 + 6));
    let jwks: Value = a.get("/.well-known/jwks.json", None).await.json().await.unwrap();
    assert!(!jwks.to_string().contains(&old_kid), "retired after its last token's expiry: {jwks}");
    assert!(jwks.to_string().contains(&new_kid));
}

#[tokio::test]
async fn metadata_documents_only_what_is_true() {
    let app = TestApp::spawn(Backend::Sqlite, Store::InProcess).await;
    let oauth: Value = app.get("/.well-known/oauth-authorization-server", None).await.json().await.unwrap();
    let oidc: Value = app.get("/.well-known/openid-configuration", None).await.json().await.unwrap();
    assert_eq!(oauth, oidc);
    assert_eq!(oauth["issuer"], "http://localhost:8080");
    assert_eq!(oauth["jwks_uri"], "http://localhost:8080/.well-known/jwks.json");
    assert_eq!(oauth["token_endpoint"], "http://localhost:8080/oauth/token");
    assert_eq!(oauth["grant_types_supported"], json!(["refresh_token"]));
    assert_eq!(oauth["introspection_endpoint_auth_methods_supported"], json!(["client_secret_basic"]));
    assert!(oauth.get("authorization_endpoint").is_none() && oauth.get("userinfo_endpoint").is_none());
}

#[tokio::test]
async fn oauth_token_endpoint_refreshes_with_form_encoding_and_oauth_errors() {
    let app = TestApp::spawn(Backend::Sqlite, Store::InProcess).await;
    let (_, tokens) = app.signed_in_user().await;
    let post =
        |form: Vec<(&'static str, String)>| app.client.post(app.url("/oauth/token")).form(&form).send();
    let resp = post(vec![("grant_type", "refresh_token".into()), ("refresh_token", tokens.refresh.clone())])
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    let next = body["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(next, tokens.refresh);

    for (form, error) in [
        (vec![("grant_type", "password".to_owned())], "unsupported_grant_type"),
        (vec![("refresh_token", next.clone())], "invalid_request"),
        (vec![("grant_type", "refresh_token".into())], "invalid_request"),
        (vec![("grant_type", "refresh_token".into()), ("refresh_token", "nonsense".into())], "invalid_grant"),
    ] {
        let resp = post(form).await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"], error, "{body}");
        assert!(body["error_description"].is_string());
    }
    // Reuse after the grace window is theft here too.
    app.clock.advance(Duration::from_secs(11));
    let resp = post(vec![("grant_type", "refresh_token".into()), ("refresh_token", tokens.refresh.clone())])
        .await
        .unwrap();
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "invalid_grant");
    assert_eq!(app.refresh(&next).await.status(), StatusCode::UNAUTHORIZED, "the session was revoked");
}

#[tokio::test]
async fn introspection_and_revocation_agree_with_the_bearer_check() {
    let app = TestApp::spawn(Backend::Postgres, Store::Redis).await;
    let url = app.resources.database_url.clone();
    let client =
        tokio::task::spawn_blocking(move || latchkey(&["client", "create", "--name", "billing"], &url))
            .await
            .unwrap();
    let (id, secret) = (
        client["client_id"].as_str().unwrap().to_owned(),
        client["client_secret"].as_str().unwrap().to_owned(),
    );
    let introspect = |token: String, user: String, pass: String| {
        let req = app
            .client
            .post(app.url("/oauth/introspect"))
            .basic_auth(user, Some(pass))
            .form(&[("token", token)]);
        async move { req.send().await.unwrap() }
    };
    let active = |token: String| {
        let f = introspect(token, id.clone(), secret.clone());
        async move {
            let resp = f.await;
            assert_eq!(resp.status(), StatusCode::OK);
            resp.json::<Value>().await.unwrap()
        }
    };

    let (_, tokens) = app.signed_in_user().await;
    let a = active(tokens.access.clone()).await;
    assert_eq!(a["active"], true);
    assert_eq!(a["token_type"], "access_token");
    assert_eq!(a["sid"], tokens.session_id.as_str());
    let r = active(tokens.refresh.clone()).await;
    assert_eq!(r["active"], true);
    assert_eq!(r["token_type"], "refresh_token");
    for junk in ["", "garbage", "a.b.c", &"x".repeat(5000)] {
        assert_eq!(active(junk.to_owned()).await, json!({"active": false}));
    }

    // Bad client credentials: 401 with a Basic challenge; never the answer.
    let resp = introspect(tokens.access.clone(), id.clone(), "wrong".into()).await;
    assert_eq!(resp.headers()["www-authenticate"], r#"Basic realm="latchkey""#);
    assert_problem(resp, StatusCode::UNAUTHORIZED, "invalid_client").await;
    let resp = introspect(tokens.access.clone(), "nobody".into(), secret.clone()).await;
    assert_problem(resp, StatusCode::UNAUTHORIZED, "invalid_client").await;
    let resp = app.client.post(app.url("/oauth/introspect")).form(&[("token", "x")]).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    // Revoking the refresh token ends the session: introspection and the bearer check agree.
    let resp = app
        .client
        .post(app.url("/oauth/revoke"))
        .form(&[("token", tokens.refresh.clone())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(active(tokens.access.clone()).await, json!({"active": false}));
    assert_eq!(active(tokens.refresh.clone()).await, json!({"active": false}));
    assert_problem(
        app.get("/v1/users/me", Some(&tokens.access)).await,
        StatusCode::UNAUTHORIZED,
        "token_revoked",
    )
    .await;

    // Revoking an access token does the same; unknown tokens are 200 too.
    let (_, other) = app.signed_in_user().await;
    let resp = app
        .client
        .post(app.url("/oauth/revoke"))
        .form(&[("token", other.access.clone())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(active(other.refresh.clone()).await, json!({"active": false}));
    assert_eq!(app.refresh(&other.refresh).await.status(), StatusCode::UNAUTHORIZED);
    let resp =
        app.client.post(app.url("/oauth/revoke")).form(&[("token", "never-issued")]).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    // Expired access tokens are inactive.
    let (_, late) = app.signed_in_user().await;
    app.clock.advance(Duration::from_secs(16 * 60));
    assert_eq!(active(late.access.clone()).await, json!({"active": false}));
}

#[tokio::test]
async fn failed_client_authentication_is_rate_limited() {
    let app = TestApp::spawn(Backend::Sqlite, Store::InProcess).await;
    let mut last = StatusCode::OK;
    for _ in 0..11 {
        let resp = app
            .client
            .post(app.url("/oauth/introspect"))
            .basic_auth("x", Some("y"))
            .form(&[("token", "t")])
            .send()
            .await
            .unwrap();
        last = resp.status();
    }
    assert_eq!(last, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn cors_preflight_allows_only_configured_origins() {
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        Store::InProcess,
        &[("CORS_ALLOWED_ORIGINS", "https://app.example.com")],
    )
    .await;
    let preflight = |origin: &'static str| {
        app.client
            .request(reqwest::Method::OPTIONS, app.url("/v1/auth/login"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
            .send()
    };
    let ok = preflight("https://app.example.com").await.unwrap();
    assert!(ok.status().is_success(), "{}", ok.status());
    assert_eq!(ok.headers()["access-control-allow-origin"], "https://app.example.com");
    let bad = preflight("https://evil.example").await.unwrap();
    assert!(bad.headers().get("access-control-allow-origin").is_none());
    assert!(!bad.status().is_success());
    // No CORS configured: no CORS headers at all.
    let plain = TestApp::spawn(Backend::Sqlite, Store::InProcess).await;
    let resp = plain
        .client
        .get(plain.url("/health"))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert!(resp.headers().get("access-control-allow-origin").is_none());
    // `*` with credentials is refused at start.
    assert!(
        TestApp::try_spawn_on(
            plain.resources.clone(),
            &[("CORS_ALLOWED_ORIGINS", "*"), ("REFRESH_TOKEN_COOKIE", "true")]
        )
        .await
        .is_err()
    );
}

#[tokio::test]
async fn cookie_mode_end_to_end_with_csrf_protection() {
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        Store::InProcess,
        &[("REFRESH_TOKEN_COOKIE", "true"), ("CORS_ALLOWED_ORIGINS", "https://app.example.com")],
    )
    .await;
    assert_eq!(app.register("c@example.com", PASSWORD).await.status(), StatusCode::CREATED);
    let resp = app.login("c@example.com", PASSWORD).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let cookie = resp.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.starts_with("__Host-latchkey_refresh="), "{cookie}");
    for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/;"] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    let body: Value = resp.json().await.unwrap();
    assert!(body.get("refresh_token").is_none(), "not in the body: {body}");
    let pair = cookie.split(';').next().unwrap().to_owned();

    let refresh = |pair: String, csrf: bool| {
        let mut req = app.client.post(app.url("/v1/auth/refresh")).header("cookie", pair).json(&json!({}));
        if csrf {
            req = req.header("x-requested-with", "XMLHttpRequest");
        }
        req.send()
    };
    // A cross-site form post carries the cookie but cannot add the header.
    assert_problem(refresh(pair.clone(), false).await.unwrap(), StatusCode::FORBIDDEN, "forbidden").await;
    let resp = refresh(pair.clone(), true).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let next_cookie = resp.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned();
    assert_ne!(next_cookie, pair, "rotated");
    let access = resp.json::<Value>().await.unwrap()["access_token"].as_str().unwrap().to_owned();

    let resp = app.post_bearer("/v1/auth/logout", &access).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert!(resp.headers()["set-cookie"].to_str().unwrap().contains("Max-Age=0"), "the cookie is cleared");
    assert_eq!(refresh(next_cookie, true).await.unwrap().status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn private_keys_are_sealed_and_the_kek_can_be_rotated() {
    use latchkey::store::entity::signing_key;
    use sea_orm::EntityTrait as _;
    let kek1 = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="; // 32 bytes
    let kek2 = "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=";
    let a = TestApp::spawn_with(Backend::Sqlite, Store::InProcess, &[("KEY_ENCRYPTION_KEY", kek1)]).await;
    let (_, tokens) = a.signed_in_user().await;
    let rows = signing_key::Entity::find().all(&a.state.db).await.unwrap();
    assert!(
        rows.iter().all(|r| r.private_key_encryption.is_some() && r.private_key.len() > 48),
        "sealed at rest"
    );
    let before = rows[0].private_key.clone();
    let resources = a.resources.clone();
    a.stop().await;

    // Without the KEK the server refuses to start rather than sign with nothing.
    let err = TestApp::try_spawn_on(resources.clone(), &[]).await.err().expect("refused");
    assert!(format!("{err:#}").contains("KEY_ENCRYPTION_KEY"), "{err:#}");
    // A new KEK with the old one beside it: keys are re-sealed at start, tokens keep verifying.
    let b = TestApp::spawn_on(
        resources.clone(),
        &[("KEY_ENCRYPTION_KEY", kek2), ("KEY_ENCRYPTION_KEY_OLD", kek1)],
    )
    .await;
    let jwks: Value = b.get("/.well-known/jwks.json", None).await.json().await.unwrap();
    assert!(jwks.to_string().contains(parts(&tokens.access).0["kid"].as_str().unwrap()));
    let rows = signing_key::Entity::find().all(&b.state.db).await.unwrap();
    assert_ne!(rows[0].private_key, before, "re-sealed under the new KEK");
    b.stop().await;
    // The old KEK is no longer needed.
    let c = TestApp::spawn_on(resources, &[("KEY_ENCRYPTION_KEY", kek2)]).await;
    c.signed_in_user().await;
}

#[tokio::test]
async fn automatic_rotation_follows_key_rotation_interval() {
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        Store::InProcess,
        &[("KEY_ROTATION_INTERVAL", "1h"), ("KEYS_REFRESH_INTERVAL", "1s")],
    )
    .await;
    let count = || async {
        let jwks: Value = app.get("/.well-known/jwks.json", None).await.json().await.unwrap();
        jwks["keys"].as_array().unwrap().len()
    };
    assert_eq!(count().await, 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(count().await, 1, "not due yet");
    app.clock.advance(Duration::from_secs(3601));
    assert!(eventually(Duration::from_secs(5), || async { count().await == 2 }).await, "rotated when due");
}
