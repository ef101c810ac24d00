//! The README's walk-through runs verbatim (but for the address) against a live server.

use std::process::Command;

use crate::helpers::{Backend, Store, TestApp};

/// The `sh` block between `<!-- {name}:start -->` and `<!-- {name}:end -->`.
fn block(name: &str) -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme.find(&format!("<!-- {name}:start -->")).expect("start marker");
    let end = readme.find(&format!("<!-- {name}:end -->")).expect("end marker");
    let block = &readme[start..end];
    let code = block.split("```sh\n").nth(1).expect("sh block");
    code.split("```").next().unwrap().to_owned()
}

async fn run(script: String) -> (bool, String, String) {
    let output = tokio::task::spawn_blocking(move || {
        Command::new("bash").arg("-euo").arg("pipefail").arg("-c").arg(script).output().expect("run bash")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.success(), stdout, stderr)
}

/// The README describes `cargo run --release`: email verification `optional`, the default.
const DEFAULTS: [(&str, &str); 1] = [("EMAIL_VERIFICATION", "optional")];

#[tokio::test]
async fn readme_accounts_walkthrough_works_verbatim() {
    let app = TestApp::spawn_with(Backend::Sqlite, Store::InProcess, &DEFAULTS).await;
    let script = block("accounts");
    assert!(script.contains("BASE=http://127.0.0.1:8080") && script.contains("MAIL=./mail"));
    let script = script
        .replace("BASE=http://127.0.0.1:8080", &format!("BASE={}", app.address))
        .replace("MAIL=./mail", &format!("MAIL={}", app.resources.mail_dir().display()));
    let (ok, stdout, stderr) = run(script).await;
    assert!(ok, "walk-through failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains(r#""verification": "sent""#), "{stdout}");
    assert_eq!(stdout.matches("204\n").count(), 3, "verify, reset and delete answered 204: {stdout}");
    assert!(stdout.contains(r#""email_verified": true"#), "{stdout}");
}

#[tokio::test]
async fn readme_walkthrough_works_verbatim() {
    let app = TestApp::spawn_with(Backend::Sqlite, Store::InProcess, &DEFAULTS).await;
    let script = block("walkthrough");
    assert!(script.contains("BASE=http://127.0.0.1:8080"));
    let script = script.replace("BASE=http://127.0.0.1:8080", &format!("BASE={}", app.address));
    let (ok, stdout, stderr) = run(script).await;
    assert!(ok, "walk-through failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains(r#""email": "ada@example.com""#), "{stdout}");
    assert!(stdout.contains(r#""session_id""#), "{stdout}");
    assert!(stdout.contains("\n204\n"), "logout answered 204: {stdout}");
    // The README shows the last command's output: keep them in step.
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let last = stdout.rsplit("204\n").next().unwrap().trim();
    assert!(readme.contains(last), "README's printed error differs from the real one:\n{last}");
    assert!(last.contains(r#""code": "token_revoked""#));
}

#[tokio::test]
async fn readme_totp_walkthrough_works_verbatim() {
    let app = TestApp::spawn_with(Backend::Sqlite, Store::InProcess, &DEFAULTS).await;
    let script = block("totp");
    assert!(script.contains("BASE=http://127.0.0.1:8080"));
    let script = script.replace("BASE=http://127.0.0.1:8080", &format!("BASE={}", app.address));
    let (ok, stdout, stderr) = run(script).await;
    assert!(ok, "walk-through failed:\n{stdout}\n{stderr}");
    assert_eq!(stdout.trim(), "10\n[\"pwd\",\"otp\",\"mfa\"]", "{stdout}\n{stderr}");
}
