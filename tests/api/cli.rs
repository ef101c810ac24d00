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
