//! `examples/verify_offline.rs` works against a live server, across a key rotation.

use std::time::Duration;

use crate::helpers::{Backend, Store, TestApp, free_port};

#[allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
#[path = "../../examples/verify_offline.rs"]
mod verify_offline;

#[tokio::test]
async fn the_offline_verifier_example_survives_a_key_rotation() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let issuer = format!("http://{addr}");
    let env =
        [("LISTEN_ADDR", addr.as_str()), ("JWT_ISSUER", issuer.as_str()), ("KEYS_REFRESH_INTERVAL", "1s")];
    let app = TestApp::spawn_with(Backend::Sqlite, Store::InProcess, &env).await;
    let (_, before) = app.signed_in_user().await;

    let verifier = verify_offline::Verifier::discover(&issuer, "latchkey").await.expect("discovery");
    let claims = verifier.verify(&before.access).await.expect("verifies");
    assert_eq!(claims.sid, before.session_id);

    // Rotate, let the new key sign, and verify a token the verifier has no key for yet.
    let now = app.clock.now();
    let config = &app.state.config;
    latchkey::store::db::rotate_if_due(config, &app.state.db, now, Duration::ZERO).await.expect("rotate");
    app.clock.advance(config.key_prepublish + Duration::from_secs(1));
    app.state.keys.reload(&app.state.db, app.clock.now()).await.expect("reload");
    let (_, after) = app.signed_in_user().await;
    assert_ne!(crate::tokens::parts(&after.access).0["kid"], crate::tokens::parts(&before.access).0["kid"]);

    // The first fetch was at discovery: within the cooldown, an unknown kid is not refetched.
    assert!(verifier.fetched_recently().await);
    assert_eq!(verifier.verify(&after.access).await.err().as_deref(), Some("unknown kid"));
    // A fresh verifier (or the same one after the cooldown) fetches and verifies both.
    let fresh = verify_offline::Verifier::discover(&issuer, "latchkey").await.expect("discovery");
    assert!(fresh.verify(&after.access).await.is_ok());
    assert!(fresh.verify(&before.access).await.is_ok(), "old tokens still verify after the rotation");
    // Forged kids never trigger a refetch inside the cooldown.
    let mut forged = after.access.clone();
    forged.replace_range(..1, "X");
    assert!(fresh.verify(&forged).await.is_err());
}
