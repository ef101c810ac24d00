//! The bearer check refuses every token it should, with the code SPEC gives it.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{Backend, Store, TestApp, assert_problem};

pub fn parts(token: &str) -> (Value, Value) {
    let mut it = token.split('.');
    let header = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(it.next().unwrap()).unwrap()).unwrap();
    let claims = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(it.next().unwrap()).unwrap()).unwrap();
    (header, claims)
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

#[tokio::test]
async fn access_token_has_the_rfc9068_shape() {
    let app = TestApp::spawn(Backend::Sqlite, Store::InProcess).await;
    let (_, tokens) = app.signed_in_user().await;
    let (header, claims) = parts(&tokens.access);
    assert_eq!(header["alg"], "EdDSA");
    assert_eq!(header["typ"], "at+jwt");
    let jwks: Value = app.get("/.well-known/jwks.json", None).await.json().await.unwrap();
    assert_eq!(header["kid"], jwks["keys"][0]["kid"]);
    for claim in ["iss", "aud", "sub", "client_id", "sid", "jti", "iat", "exp", "roles"] {
        assert!(!claims[claim].is_null(), "claim {claim} missing: {claims}");
    }
    assert_eq!(claims["iss"], "http://localhost:8080");
    assert_eq!(claims["aud"], "latchkey");
    assert_eq!(claims["client_id"], "latchkey");
    assert_eq!(claims["sid"], tokens.session_id.as_str());
    assert_eq!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(), 900);
}

#[tokio::test]
async fn an_expired_token_is_token_expired() {
    let app = TestApp::spawn(Backend::Sqlite, Store::InProcess).await;
    let (_, tokens) = app.signed_in_user().await;
    app.clock.advance(Duration::from_secs(14 * 60));
    assert_eq!(app.get("/v1/users/me", Some(&tokens.access)).await.status(), StatusCode::OK);
    app.clock.advance(Duration::from_secs(2 * 60));
    assert_problem(
        app.get("/v1/users/me", Some(&tokens.access)).await,
        StatusCode::UNAUTHORIZED,
        "token_expired",
    )
    .await;
    // ... and the refresh token still gets a fresh one.
    let resp = app.refresh(&tokens.refresh).await;
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn tampered_foreign_and_unsigned_tokens_are_invalid() {
    let app = TestApp::spawn(Backend::Sqlite, Store::InProcess).await;
    let (_, tokens) = app.signed_in_user().await;
    let (header, claims) = parts(&tokens.access);
    let signature = tokens.access.rsplit('.').next().unwrap();

    // A claim changed, the signature kept.
    let mut forged_claims = claims.clone();
    forged_claims["roles"] = serde_json::json!(["admin"]);
    let tampered = format!("{}.{}.{signature}", b64(&header), b64(&forged_claims));

    // Signed by another Ed25519 key under the server's kid.
    let other = latchkey::keys::generate_ed25519(chrono::Utc::now()).unwrap();
    let mut h = Header::new(Algorithm::EdDSA);
    h.typ = Some("at+jwt".into());
    h.kid = header["kid"].as_str().map(str::to_owned);
    let foreign = jsonwebtoken::encode(&h, &claims, &EncodingKey::from_ed_der(&other.private_key)).unwrap();

    // alg: none, no signature.
    let none_header = serde_json::json!({"alg": "none", "typ": "at+jwt", "kid": header["kid"]});
    let unsigned = format!("{}.{}.", b64(&none_header), b64(&claims));

    // HS256 "signed" with the published public key as the secret.
    let jwks: Value = app.get("/.well-known/jwks.json", None).await.json().await.unwrap();
    let x = jwks["keys"][0]["x"].as_str().unwrap();
    let mut hs = Header::new(Algorithm::HS256);
    hs.typ = Some("at+jwt".into());
    hs.kid = h.kid.clone();
    let confused = jsonwebtoken::encode(&hs, &claims, &EncodingKey::from_secret(x.as_bytes())).unwrap();

    // Not an access token: a valid signature over a different typ cannot be made here,
    // but a missing kid can.
    let mut no_kid = h.clone();
    no_kid.kid = None;
    let kidless =
        jsonwebtoken::encode(&no_kid, &claims, &EncodingKey::from_ed_der(&other.private_key)).unwrap();

    for (name, token) in [
        ("tampered", tampered.as_str()),
        ("foreign key", &foreign),
        ("alg none", &unsigned),
        ("HS256 with the public key", &confused),
        ("no kid", &kidless),
        ("garbage", "not-a-jwt"),
        ("three dots", "a.b.c"),
        ("the refresh token", &tokens.refresh),
    ] {
        let body = assert_problem(
            app.get("/v1/users/me", Some(token)).await,
            StatusCode::UNAUTHORIZED,
            "invalid_token",
        )
        .await;
        assert!(!body["detail"].as_str().unwrap().contains(token), "{name}: the token is echoed");
    }
    // The genuine one still works.
    assert_eq!(app.get("/v1/users/me", Some(&tokens.access)).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn tokens_for_another_issuer_or_audience_are_invalid() {
    let app = TestApp::spawn(Backend::Sqlite, Store::InProcess).await;
    // Instances on the same database (so the same signing key) but another iss / aud.
    let other_iss = TestApp::spawn_on(app.resources.clone(), &[("JWT_ISSUER", "https://evil.example")]).await;
    let other_aud = TestApp::spawn_on(app.resources.clone(), &[("JWT_AUDIENCE", "someone-else")]).await;
    for other in [&other_iss, &other_aud] {
        let (_, tokens) = other.signed_in_user().await;
        assert_eq!(other.get("/v1/users/me", Some(&tokens.access)).await.status(), StatusCode::OK);
        assert_problem(
            app.get("/v1/users/me", Some(&tokens.access)).await,
            StatusCode::UNAUTHORIZED,
            "invalid_token",
        )
        .await;
    }
}

#[tokio::test]
async fn missing_or_garbled_authorization_is_invalid_token() {
    let app = TestApp::spawn(Backend::Sqlite, Store::InProcess).await;
    for path in ["/v1/users/me", "/v1/auth/session"] {
        let body = assert_problem(app.get(path, None).await, StatusCode::UNAUTHORIZED, "invalid_token").await;
        assert!(body["detail"].as_str().unwrap().contains("Authorization"));
    }
    let resp = app.client.post(app.url("/v1/auth/logout")).send().await.unwrap();
    assert_eq!(resp.headers()["www-authenticate"], r#"Bearer realm="latchkey""#);
    assert_problem(resp, StatusCode::UNAUTHORIZED, "invalid_token").await;
    for value in ["Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "token abc", "Bearer a b"] {
        let resp =
            app.client.get(app.url("/v1/users/me")).header("authorization", value).send().await.unwrap();
        assert_problem(resp, StatusCode::UNAUTHORIZED, "invalid_token").await;
    }
}
