//! The binary's command line: subcommands, refusals, configuration errors.

use std::process::Command;

fn latchkey(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_latchkey"));
    cmd.args(args).current_dir(dir.path()).env_clear();
    if let Ok(path) = std::env::var("PATH") {
        cmd.env("PATH", path);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn migrate_fresh_refuses_without_yes() {
    let out = latchkey(&["migrate", "fresh"], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--yes"));
}

#[test]
fn migrate_up_and_status_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("m.db").display());
    let up = latchkey(&["migrate", "up"], &[("DATABASE_URL", &url)]);
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    let status = latchkey(&["migrate", "status"], &[("DATABASE_URL", &url)]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("applied") && text.contains("m20261124_000001_initial"), "{text}");
    let fresh = latchkey(&["migrate", "fresh", "--yes"], &[("DATABASE_URL", &url)]);
    assert!(fresh.status.success(), "{}", String::from_utf8_lossy(&fresh.stderr));
}

#[test]
fn a_bad_variable_stops_start_up_naming_it() {
    let out = latchkey(&["serve"], &[("ACCESS_TOKEN_TTL", "fifteen minutes-ish")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ACCESS_TOKEN_TTL"), "{err}");
    let out = latchkey(&[], &[("REDIS_URL", "http://not-redis")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("REDIS_URL"));
}

#[tokio::test]
async fn user_create_reads_the_password_from_stdin_or_the_environment() {
    use crate::helpers::{Backend, Resources, Store, TestApp};
    use std::io::Write as _;

    let resources = Resources::new(Backend::Sqlite, &Store::InProcess).await;
    let url = resources.database_url.clone();

    // From one line on stdin (not a terminal: no prompt, no confirmation).
    let mut child = Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .args(["user", "create", "--email", "Root@Example.com", "--role", "admin"])
        .env("DATABASE_URL", &url)
        .env_remove("LATCHKEY_PASSWORD")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"correct horse battery staple\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["email"], "root@example.com");
    assert_eq!(printed["roles"], serde_json::json!(["admin"]));

    // From LATCHKEY_PASSWORD.
    let out = Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .args(["user", "create", "--email", "second@example.com"])
        .env("DATABASE_URL", &url)
        .env("LATCHKEY_PASSWORD", "another long password")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A short password is refused, naming the rule; a taken email too.
    let out = Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .args(["user", "create", "--email", "third@example.com"])
        .env("DATABASE_URL", &url)
        .env("LATCHKEY_PASSWORD", "short")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("password"));

    let app = TestApp::spawn_on(resources, &[]).await;
    let resp = app.login("root@example.com", "correct horse battery staple").await;
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    let tokens: serde_json::Value = resp.json().await.unwrap();
    let (_, claims) = crate::tokens::parts(tokens["access_token"].as_str().unwrap());
    assert_eq!(claims["roles"], serde_json::json!(["admin"]));
    let resp = app.login("second@example.com", "another long password").await;
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
}

#[tokio::test]
async fn user_create_refuses_a_weak_password_unless_the_rule_is_off() {
    use crate::helpers::{Backend, Resources, Store};

    let resources = Resources::new(Backend::Sqlite, &Store::InProcess).await;
    let create = |email: &str, password: &str, strength: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_latchkey"));
        cmd.args(["user", "create", "--email", email])
            .env("DATABASE_URL", &resources.database_url)
            .env("LATCHKEY_PASSWORD", password)
            .env_remove("PASSWORD_MIN_STRENGTH")
            .stdin(std::process::Stdio::null());
        if let Some(strength) = strength {
            cmd.env("PASSWORD_MIN_STRENGTH", strength);
        }
        cmd.output().unwrap()
    };
    let out = create("weak@example.com", "password123", None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("guess"), "says why: {err}");
    assert!(!err.contains("password123"), "{err}");
    let out = create("weak@example.com", "password123", Some("0"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
