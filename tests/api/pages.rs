//! The built-in account pages (`/account/…`, issue 15): their headers and markup over
//! HTTP, and the pages themselves in a real headless browser (Debian's `chromium`, driven
//! by the node scripts in `tests/browser/` through npm's `playwright-core`).
//!
//! `/account/passkeys` (issue 16) is tested the same ways: its markup and headers, and a
//! passkey added and used on it in chromium with a CDP virtual authenticator.
//!
//! The browser tests need `/usr/bin/chromium` (`apt-get install -y chromium`) and
//! `npm ci --prefix tests/browser`; `.ci/run` does both. Without them they fail, saying so.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use latchkey::store::entity::one_time_token;
use reqwest::StatusCode;
use sea_orm::{ColumnTrait as _, EntityTrait as _, QueryFilter as _};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

use crate::accounts::Mailbox;
use crate::helpers::{Backend, PASSWORD, Store, TestApp, assert_problem, claims, free_port};

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const PAGES: [&str; 3] = ["/account/verify-email", "/account/reset-password", "/account/confirm-email"];

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> &'a str {
    resp.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// The headers every response of the pages carries.
fn assert_page_headers(resp: &reqwest::Response, path: &str) {
    assert_eq!(header(resp, "content-security-policy"), CSP, "{path}");
    assert_eq!(header(resp, "referrer-policy"), "no-referrer", "{path}");
    assert_eq!(header(resp, "x-content-type-options"), "nosniff", "{path}");
    assert_eq!(header(resp, "cache-control"), "no-store", "{path}");
    assert_eq!(header(resp, "x-frame-options"), "DENY", "{path}");
}

/// Every `<script` tag loads a file and holds nothing; no inline style or event handler.
fn assert_no_inline_code(html: &str, path: &str) {
    let lower = html.to_ascii_lowercase();
    for (at, _) in lower.match_indices("<script") {
        let tag_end = at + lower[at..].find('>').expect("script tag closed");
        let tag = &lower[at..=tag_end];
        assert!(tag.contains(" src=\""), "{path}: a script without src: {tag}");
        assert!(lower[tag_end + 1..].starts_with("</script>"), "{path}: a script with a body");
    }
    assert!(!lower.contains("<style"), "{path}: a <style> element");
    assert!(!lower.contains("style="), "{path}: a style attribute");
    for handler in [" onclick", " onload", " onsubmit", " onerror", " oninput", "javascript:"] {
        assert!(!lower.contains(handler), "{path}: inline code {handler:?}");
    }
    assert!(!lower.contains("src=\"http") && !lower.contains("href=\"http"), "{path}: a third-party asset");
}

#[tokio::test]
async fn the_account_pages_are_small_strict_html_with_the_product_name_escaped() {
    let app =
        TestApp::spawn_with(Backend::Sqlite, Store::InProcess, &[("PRODUCT_NAME", "<b>Acme</b> & Co")]).await;
    for path in PAGES {
        let resp = app.get(path, None).await;
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        assert_eq!(header(&resp, "content-type"), "text/html; charset=utf-8", "{path}");
        assert_page_headers(&resp, path);
        let html = resp.text().await.unwrap();
        assert!(html.starts_with("<!doctype html>"), "{path}: {html}");
        for needle in [r#"<html lang="en">"#, "<main", r#"aria-live="polite""#, r#"<meta charset="utf-8">"#] {
            assert!(html.contains(needle), "{path}: no {needle}: {html}");
        }
        assert_no_inline_code(&html, path);
        // The product name, escaped, in the title and the page; never as markup.
        assert!(!html.contains("<b>Acme"), "{path}: the product name unescaped: {html}");
        let escaped = "&lt;b&gt;Acme&lt;";
        let title = html.split("<title>").nth(1).and_then(|t| t.split("</title>").next()).unwrap();
        assert!(title.contains(escaped) && title.contains("&amp; Co"), "{path}: {title}");
        assert!(html.matches(escaped).count() >= 2, "{path}: {html}");
    }

    // The reset page's form: labelled fields a password manager understands.
    let html = app.get("/account/reset-password", None).await.text().await.unwrap();
    for needle in [
        r#"<label for="new-password">"#,
        r#"<label for="confirm-password">"#,
        r#"autocomplete="new-password""#,
        r#"minlength="8""#,
        r#"type="password""#,
    ] {
        assert!(html.contains(needle), "reset page: no {needle}: {html}");
    }
    assert!(
        app.get("/account/verify-email", None).await.text().await.unwrap().contains("Verify my email"),
        "the verify button"
    );
    assert!(
        app.get("/account/confirm-email", None).await.text().await.unwrap().contains("Confirm new email"),
        "the confirm button"
    );

    // The script and the style sheet, from Latchkey itself.
    for (path, content_type) in [
        ("/account/account.js", "text/javascript; charset=utf-8"),
        ("/account/account.css", "text/css; charset=utf-8"),
    ] {
        let resp = app.get(path, None).await;
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        assert_eq!(header(&resp, "content-type"), content_type, "{path}");
        assert_page_headers(&resp, path);
        assert!(!resp.text().await.unwrap().is_empty(), "{path}");
    }

    // HEAD and GET only; other paths under /account are the JSON 404 of every other route.
    let head = app.client.head(app.url("/account/reset-password")).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_page_headers(&head, "HEAD /account/reset-password");
    let post = app.client.post(app.url("/account/reset-password")).send().await.unwrap();
    assert_problem(post, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
    for path in ["/account/nope", "/account/", "/account", "/account/verify-email/x"] {
        assert_problem(app.get(path, None).await, StatusCode::NOT_FOUND, "not_found").await;
    }
}

// --- the browser tests ---------------------------------------------------------------

const CHROMIUM: &str = "/usr/bin/chromium";

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// Fails (never skips) when the browser tools are missing.
fn require_browser_tools() {
    assert!(
        Path::new(CHROMIUM).exists(),
        "the browser tests need Debian's chromium at {CHROMIUM}: apt-get install -y chromium (.ci/run does it)"
    );
    assert!(
        browser_dir().join("node_modules/playwright-core/package.json").exists(),
        "the browser tests need playwright-core: npm ci --prefix tests/browser (.ci/run does it)"
    );
    let node = std::process::Command::new("node").arg("--version").output();
    assert!(
        node.as_ref().is_ok_and(|o| o.status.success()),
        "the browser tests need node on the PATH: {node:?}"
    );
}

/// An app that mails (`.eml` files, verification optional) under the name `Acme`.
async fn spawn_mailing() -> (TestApp, Mailbox) {
    crate::accounts::spawn(Backend::Sqlite, Store::InProcess, "optional", &[("PRODUCT_NAME", "Acme")]).await
}

/// The one-time tokens mailed to `email`, and whether each is used: what opening a page
/// must leave as it was.
async fn one_time_tokens(app: &TestApp, email: &str) -> Vec<(uuid::Uuid, bool)> {
    let rows = one_time_token::Entity::find()
        .filter(one_time_token::Column::Email.eq(email))
        .all(&app.state.db)
        .await
        .unwrap();
    let mut rows: Vec<_> = rows.into_iter().map(|r| (r.id, r.used_at.is_some())).collect();
    rows.sort();
    rows
}

/// The link, pointed at the test server: mails link to `JWT_ISSUER`, the default
/// `http://localhost:8080`, while the server listens on a port of its own.
fn on_test_server(app: &TestApp, link: &str) -> String {
    let rest =
        link.strip_prefix("http://localhost:8080").unwrap_or_else(|| panic!("link under JWT_ISSUER: {link}"));
    assert!(rest.starts_with("/account/"), "{link}");
    app.url(rest)
}

/// One node script driving chromium. It opens the page, reports what it saw as one JSON
/// line, waits for `continue` on its stdin, acts, and reports again.
struct Driver {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    /// chromium's fresh profile, removed on drop even when the script had to be killed.
    _profile: tempfile::TempDir,
}

impl Driver {
    fn start(script: &str, env: &[(&str, &str)]) -> Self {
        require_browser_tools();
        let profile = tempfile::Builder::new().prefix("latchkey-chromium-").tempdir().expect("tempdir");
        let mut cmd = tokio::process::Command::new("node");
        cmd.arg(browser_dir().join(script))
            .envs(env.iter().copied())
            .env("CHROMIUM", CHROMIUM)
            .env("PROFILE_DIR", profile.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("start node");
        let stdout = child.stdout.take().expect("stdout");
        Self { child, lines: BufReader::new(stdout).lines(), _profile: profile }
    }

    /// The next report, as JSON; panics if the script ended or said nothing for 60 s.
    async fn report(&mut self) -> Value {
        let line = tokio::time::timeout(Duration::from_secs(60), self.lines.next_line())
            .await
            .expect("the browser script answered within 60 s")
            .expect("read the browser script's output")
            .expect("the browser script ended early (see its stderr above)");
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON from the browser script: {line}"))
    }

    async fn say(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin.write_all(format!("{line}\n").as_bytes()).await.expect("write to the browser script");
        stdin.flush().await.expect("flush");
    }

    /// On to the script's next step.
    async fn resume(&mut self) {
        self.say("continue").await;
    }

    /// Ends a script that waits for `continue`, without its next step.
    async fn stop(mut self) {
        self.say("stop").await;
        self.finish().await;
    }

    async fn finish(mut self) {
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the browser script exited")
            .expect("wait for node");
        assert!(status.success(), "the browser script failed: {status}");
    }
}

/// What a page showed before anyone pressed anything: no request to the API, the token
/// gone from the address bar, no CSP violation.
fn assert_opened_quietly(report: &Value) {
    assert_eq!(report["step"], "opened", "{report}");
    assert_eq!(report["api_requests"], json!([]), "opening the page called the API: {report}");
    assert_eq!(report["violations"], json!([]), "{report}");
    let url = report["url"].as_str().unwrap();
    assert!(!url.contains('#') && !url.contains("token"), "the token stayed in the address bar: {url}");
    assert_eq!(report["button_enabled"], true, "{report}");
}

async fn email_verified(app: &TestApp, access: &str) -> bool {
    let resp = app.get("/v1/users/me", Some(access)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    resp.json::<Value>().await.unwrap()["email_verified"].as_bool().expect("email_verified")
}

#[tokio::test]
async fn a_reset_link_opened_in_a_real_browser_changes_nothing_until_the_new_password_is_sent() {
    require_browser_tools();
    let (app, mailbox) = spawn_mailing().await;
    let email = format!("reset-{}@example.com", uuid::Uuid::new_v4().simple());
    let new = "quartz lantern orbits seventy marmots";
    assert_eq!(app.register(&email, PASSWORD).await.status(), StatusCode::ACCEPTED);
    let before = app.login_with(&email, &[]).await;
    let resp = app.post_json("/v1/auth/password/forgot", &json!({"email": email})).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED, "forgot: {}", resp.text().await.unwrap());
    let link = on_test_server(&app, &mailbox.first(&email, "Reset").await.link());
    assert!(link.contains("/account/reset-password#token="), "{link}");
    let tokens = one_time_tokens(&app, &email).await;

    let mut browser = Driver::start("reset_password.mjs", &[("PAGE_URL", &link), ("NEW_PASSWORD", new)]);
    let opened = browser.report().await;
    assert_opened_quietly(&opened);
    assert!(opened["title"].as_str().unwrap().contains("Acme"), "{opened}");
    // Opening (and running) the page consumed nothing: no token used, the old password
    // still works, the session still lives.
    assert_eq!(one_time_tokens(&app, &email).await, tokens, "opening the page used a token");
    assert_eq!(app.login(&email, PASSWORD).await.status(), StatusCode::OK, "the password changed on opening");
    assert_eq!(app.get("/v1/auth/session", Some(&before.access)).await.status(), StatusCode::OK);

    browser.resume().await;
    let done = browser.report().await;
    assert_eq!(done["step"], "submitted", "{done}");
    assert_eq!(
        (&done["state"], &done["status"]),
        (
            &json!("success"),
            &json!("Your password was changed; every session was signed out. You can now sign in.")
        ),
        "{done}"
    );
    assert_eq!(done["api_requests"], json!(["POST /v1/auth/password/reset"]), "{done}");
    assert_eq!(done["disabled_while_posting"], true, "{done}");
    assert_eq!(done["form_visible"], false, "{done}");
    assert_eq!(done["violations"], json!([]), "{done}");
    browser.finish().await;

    assert_eq!(app.login(&email, new).await.status(), StatusCode::OK, "the new password");
    assert_problem(app.login(&email, PASSWORD).await, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    assert_problem(
        app.get("/v1/auth/session", Some(&before.access)).await,
        StatusCode::UNAUTHORIZED,
        "token_revoked",
    )
    .await;

    // The link worked once: opened again, the page says so and changes nothing.
    let mut again = Driver::start(
        "reset_password.mjs",
        &[("PAGE_URL", &link), ("NEW_PASSWORD", "another fine passphrase 42")],
    );
    assert_opened_quietly(&again.report().await);
    again.resume().await;
    let done = again.report().await;
    assert_eq!(
        done["status"], "This link is invalid, expired or already used — ask for a new one.",
        "{done}"
    );
    again.finish().await;
    assert_eq!(app.login(&email, new).await.status(), StatusCode::OK, "the used link changed nothing");
}

#[tokio::test]
async fn a_verification_link_opened_in_a_real_browser_verifies_only_when_the_button_is_pressed() {
    require_browser_tools();
    let (app, mailbox) = spawn_mailing().await;
    let email = format!("verify-{}@example.com", uuid::Uuid::new_v4().simple());
    assert_eq!(app.register(&email, PASSWORD).await.status(), StatusCode::ACCEPTED);
    let link = on_test_server(&app, &mailbox.first(&email, "Confirm your email").await.link());
    assert!(link.contains("/account/verify-email#token="), "{link}");
    let tokens = app.login_with(&email, &[]).await;
    assert!(!email_verified(&app, &tokens.access).await);

    let mut browser = Driver::start("press_button.mjs", &[("PAGE_URL", &link)]);
    assert_opened_quietly(&browser.report().await);
    // A mail scanner that opens and runs the page verifies nothing.
    assert!(!email_verified(&app, &tokens.access).await, "opening the page verified the email");
    assert!(one_time_tokens(&app, &email).await.iter().all(|(_, used)| !used), "opening used the token");

    browser.resume().await;
    let done = browser.report().await;
    assert_eq!(
        (&done["state"], &done["status"]),
        (&json!("success"), &json!("Your email address is verified. You can close this page.")),
        "{done}"
    );
    assert_eq!(done["api_requests"], json!(["POST /v1/auth/verify-email"]), "{done}");
    assert_eq!(done["disabled_while_posting"], true, "{done}");
    assert_eq!(done["violations"], json!([]), "{done}");
    browser.finish().await;
    assert!(email_verified(&app, &tokens.access).await, "pressing the button verified it");
}

#[tokio::test]
async fn an_email_change_link_opened_in_a_real_browser_applies_only_when_the_button_is_pressed() {
    require_browser_tools();
    let (app, mailbox) = spawn_mailing().await;
    let old = format!("old-{}@example.com", uuid::Uuid::new_v4().simple());
    let new = format!("new-{}@example.com", uuid::Uuid::new_v4().simple());
    assert_eq!(app.register(&old, PASSWORD).await.status(), StatusCode::ACCEPTED);
    let tokens = app.login_with(&old, &[]).await;
    let ask = app
        .client
        .post(app.url("/v1/users/me/email"))
        .bearer_auth(&tokens.access)
        .json(&json!({"new_email": new, "current_password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(ask.status(), StatusCode::ACCEPTED, "{}", ask.text().await.unwrap());
    let link = on_test_server(&app, &mailbox.first(&new, "Confirm your new email").await.link());
    assert!(link.contains("/account/confirm-email#token="), "{link}");
    let email_now = || async {
        let resp = app.get("/v1/users/me", Some(&tokens.access)).await;
        resp.json::<Value>().await.unwrap()["email"].as_str().unwrap().to_owned()
    };

    let mut browser = Driver::start("press_button.mjs", &[("PAGE_URL", &link)]);
    assert_opened_quietly(&browser.report().await);
    assert_eq!(email_now().await, old, "opening the page changed the email");

    browser.resume().await;
    let done = browser.report().await;
    assert_eq!(
        (&done["state"], &done["status"]),
        (&json!("success"), &json!("Your new email address is confirmed. Use it to sign in from now on.")),
        "{done}"
    );
    assert_eq!(done["api_requests"], json!(["POST /v1/auth/confirm-email"]), "{done}");
    browser.finish().await;
    assert_eq!(email_now().await, new, "pressing the button applied the change");
}

#[tokio::test]
async fn a_link_without_its_token_says_it_is_incomplete() {
    let app = TestApp::spawn(Backend::Sqlite, Store::InProcess).await;
    let mut browser = Driver::start("press_button.mjs", &[("PAGE_URL", &app.url("/account/verify-email"))]);
    let opened = browser.report().await;
    assert_eq!(opened["api_requests"], json!([]), "{opened}");
    assert_eq!(opened["button_visible"], false, "{opened}");
    assert!(opened["status"].as_str().unwrap().contains("incomplete"), "{opened}");
    assert_eq!(opened["violations"], json!([]), "{opened}");
    browser.stop().await;
}

#[tokio::test]
async fn the_reset_page_tells_the_user_what_each_answer_of_the_api_means() {
    // The page in a real browser, the API stubbed inside it (answers.mjs): each answer
    // the page can get, in turn, on one form.
    let app = TestApp::spawn(Backend::Sqlite, Store::InProcess).await;
    let url = app.url("/account/reset-password#token=never-checked");
    let mut browser = Driver::start("answers.mjs", &[("PAGE_URL", &url)]);
    let report = browser.report().await;
    browser.finish().await;
    assert_eq!(report["violations"], json!([]), "{report}");
    let results = &report["results"];
    let shown = |name: &str| (results[name]["status"].as_str().unwrap().to_owned(), results[name].clone());

    // Two different passwords: said on the page, nothing sent.
    assert_eq!(results["mismatch"]["status"], "The two passwords are not the same.", "{report}");
    assert_eq!(results["mismatch"]["requests"], 0, "{report}");
    // The server's own advice, and the form stays to try again.
    let (text, r) = shown("weak_password");
    assert_eq!(text, "Add another word or two. Uncommon words are better.", "{r}");
    assert_eq!((&r["form_visible"], &r["button_enabled"]), (&json!(true), &json!(true)), "{r}");
    let (text, r) = shown("validation_failed");
    assert_eq!(text, "new_password: at most 1024 characters.", "{r}");
    assert_eq!(r["form_visible"], true, "{r}");
    let (text, r) = shown("rate_limited");
    assert_eq!(text, "Too many attempts. Try again in 2 minutes.", "{r}");
    assert_eq!(r["button_enabled"], true, "{r}");
    let (text, _) = shown("internal");
    assert_eq!(text, "Something went wrong. Please try again in a moment.", "{report}");
    let (text, r) = shown("offline");
    assert_eq!(text, "The server could not be reached. Check your connection and try again.", "{r}");
    assert_eq!(r["button_enabled"], true, "{r}");
    // An account with two-step sign-in: the code is asked for, the form stays.
    let (text, r) = shown("invalid_mfa_code");
    assert!(text.contains("authenticator app") && text.contains("recovery code"), "{r}");
    assert_eq!((&r["form_visible"], &r["button_enabled"]), (&json!(true), &json!(true)), "{r}");
    // A dead link: said, and the form goes away.
    let (text, r) = shown("invalid_one_time_token");
    assert_eq!(text, "This link is invalid, expired or already used — ask for a new one.", "{r}");
    assert_eq!(r["form_visible"], false, "{r}");
    // Every POST carried the fragment's token and the typed password, nothing else.
    let sent = report["sent"].as_array().unwrap();
    assert_eq!(sent.len(), 7, "{report}");
    assert!(
        sent.iter()
            .all(|b| *b == json!({"token": "never-checked", "new_password": "a password long enough"})),
        "{report}"
    );
}

// --- the passkeys page ------------------------------------------------------------------

/// The app as `http://localhost:PORT`, named `Acme`: WebAuthn wants a secure context and a
/// domain as the relying party (never `127.0.0.1`), and `WEBAUTHN_RP_ID` and
/// `WEBAUTHN_ORIGINS` default to `JWT_ISSUER`'s host and origin, so the issuer names
/// localhost and the port the server listens on. Returns the page's URL too.
async fn spawn_on_localhost() -> (TestApp, String) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let origin = format!("http://localhost:{port}");
    let env = [("LISTEN_ADDR", listen.as_str()), ("JWT_ISSUER", origin.as_str()), ("PRODUCT_NAME", "Acme")];
    let app = TestApp::spawn_with(Backend::Sqlite, Store::InProcess, &env).await;
    (app, format!("{origin}/account/passkeys"))
}

#[tokio::test]
async fn the_passkeys_page_is_small_strict_html_like_the_other_account_pages() {
    let app =
        TestApp::spawn_with(Backend::Sqlite, Store::InProcess, &[("PRODUCT_NAME", "<b>Acme</b> & Co")]).await;
    let path = "/account/passkeys";
    let resp = app.get(path, None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "content-type"), "text/html; charset=utf-8");
    assert_page_headers(&resp, path);
    let html = resp.text().await.unwrap();
    assert!(html.starts_with("<!doctype html>"), "{html}");
    assert_no_inline_code(&html, path);
    assert!(!html.contains("<b>Acme"), "the product name unescaped: {html}");
    let title = html.split("<title>").nth(1).and_then(|t| t.split("</title>").next()).unwrap();
    assert_eq!(title, "Passkeys · &lt;b&gt;Acme&lt;&#x2f;b&gt; &amp; Co", "{html}");
    assert!(html.matches("&lt;b&gt;Acme&lt;").count() >= 3, "{html}");
    for needle in [
        r#"<script src="passkeys.js" defer></script>"#,
        r#"<link rel="stylesheet" href="account.css">"#,
        r#"aria-live="polite""#,
        ">Sign in with a passkey</button>",
        r#"<label for="email">"#,
        r#"autocomplete="username""#,
        r#"<label for="password">"#,
        r#"autocomplete="current-password""#,
        r#"<label for="mfa-code">"#,
        r#"autocomplete="one-time-code""#,
        r#"<label for="passkey-name">"#,
        r#"maxlength="64""#,
        ">Add a passkey</button>",
    ] {
        assert!(html.contains(needle), "no {needle}: {html}");
    }

    // Its script, from Latchkey like the others; it keeps tokens in memory only.
    let resp = app.get("/account/passkeys.js", None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "content-type"), "text/javascript; charset=utf-8");
    assert_page_headers(&resp, "/account/passkeys.js");
    let script = resp.text().await.unwrap();
    for call in [".create(creationOptions(", ".get(requestOptions(", "credentials: \"omit\""] {
        assert!(script.contains(call), "passkeys.js: no {call}");
    }
    for place in ["localStorage", "sessionStorage", "document.cookie", "history.", "location.hash"] {
        assert!(!script.contains(place), "passkeys.js touches {place}");
    }

    let head = app.client.head(app.url(path)).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_page_headers(&head, "HEAD /account/passkeys");
    let post = app.client.post(app.url(path)).send().await.unwrap();
    assert_problem(post, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
    assert_problem(app.get("/account/passkeys/x", None).await, StatusCode::NOT_FOUND, "not_found").await;
}

/// What the page showed at a step: its status line, and every step's common checks (no
/// CSP violation or script error, no token in the address bar, storage or cookies).
fn shown<'a>(report: &'a Value, step: &str, page_url: &str) -> (&'a str, &'a str) {
    assert_eq!(report["step"], step, "{report}");
    assert_eq!(report["violations"], json!([]), "{step}: {report}");
    assert_eq!(report["url"], page_url, "{step}: the address changed: {report}");
    assert_eq!(report["stored"], json!({"local": [], "session": [], "cookies": ""}), "{step}: {report}");
    (report["state"].as_str().unwrap_or(""), report["status"].as_str().unwrap_or(""))
}

#[tokio::test]
async fn a_passkey_added_on_the_passkeys_page_signs_in_without_a_password_in_a_real_browser() {
    require_browser_tools();
    let (app, page_url) = spawn_on_localhost().await;
    let email = format!("passkey-{}@example.com", uuid::Uuid::new_v4().simple());
    assert_eq!(app.register(&email, PASSWORD).await.status(), StatusCode::CREATED);
    let mut browser = Driver::start(
        "passkeys.mjs",
        &[("PAGE_URL", &page_url), ("EMAIL", &email), ("PASSWORD", PASSWORD), ("PASSKEY_NAME", "Test key")],
    );

    // Opened: both ways in, and nothing sent.
    let opened = browser.report().await;
    shown(&opened, "opened", &page_url);
    assert_eq!(opened["title"], "Passkeys · Acme", "{opened}");
    assert_eq!(opened["api_requests"], json!([]), "opening the page called the API: {opened}");
    assert_eq!((&opened["signed_out"], &opened["signed_in"]), (&json!(true), &json!(false)), "{opened}");
    assert_eq!(opened["passkey_button"], true, "{opened}");

    // Signed in with the password: the account, with no passkey yet.
    let password = browser.report().await;
    assert_eq!(
        shown(&password, "password", &page_url),
        ("success", "You are signed in. Add a passkey below."),
        "{password}"
    );
    assert_eq!(password["user_email"], email.as_str(), "{password}");
    assert_eq!(password["passkeys"], json!([]), "{password}");
    assert_eq!(
        password["api_requests"],
        json!(["POST /v1/auth/login", "GET /v1/users/me", "GET /v1/users/me/passkeys"]),
        "{password}"
    );

    // A passkey added: created by the authenticator as a discoverable credential for
    // localhost, registered, and listed.
    let added = browser.report().await;
    let (state, status) = shown(&added, "added", &page_url);
    assert_eq!(state, "success", "{added}");
    assert!(status.starts_with("Your passkey \u{201c}Test key\u{201d} was added"), "{added}");
    assert_eq!(
        added["api_requests"],
        json!([
            "POST /v1/users/me/passkeys/options",
            "POST /v1/users/me/passkeys",
            "GET /v1/users/me/passkeys"
        ]),
        "{added}"
    );
    let listed = added["passkeys"].as_array().unwrap();
    assert!(listed.len() == 1 && listed[0].as_str().unwrap().starts_with("Test key"), "{added}");
    let credentials = added["credentials"].as_array().unwrap();
    assert_eq!(credentials.len(), 1, "{added}");
    assert_eq!((&credentials[0]["resident"], &credentials[0]["rp_id"]), (&json!(true), &json!("localhost")));

    // Reloaded: the page remembers nothing and calls nothing.
    let reloaded = browser.report().await;
    shown(&reloaded, "reloaded", &page_url);
    assert_eq!(
        (&reloaded["signed_out"], &reloaded["signed_in"]),
        (&json!(true), &json!(false)),
        "{reloaded}"
    );
    assert_eq!(reloaded["api_requests"], json!([]), "{reloaded}");

    // Signed in with the passkey alone (the authenticator offers it: no email typed).
    let passkey = browser.report().await;
    assert_eq!(
        shown(&passkey, "passkey", &page_url),
        ("success", "You are signed in with your passkey."),
        "{passkey}"
    );
    assert_eq!(
        passkey["api_requests"],
        json!([
            "POST /v1/auth/passkey/options",
            "POST /v1/auth/passkey",
            "GET /v1/users/me",
            "GET /v1/users/me/passkeys"
        ]),
        "{passkey}"
    );
    assert_eq!(passkey["user_email"], email.as_str(), "{passkey}");
    let listed = passkey["passkeys"][0].as_str().unwrap();
    assert!(listed.starts_with("Test key") && listed.contains("last used"), "{passkey}");
    // The token it got is the user's, and says how they signed in.
    let access = passkey["access_token"].as_str().expect("the passkey login's access token").to_owned();
    let me = app.get("/v1/users/me", Some(&access)).await;
    assert_eq!(me.status(), StatusCode::OK);
    assert_eq!(me.json::<Value>().await.unwrap()["email"], email.as_str());
    assert_eq!(claims(&access)["amr"], json!(["hwk", "user", "mfa"]), "{}", claims(&access));
    let mine = app.get("/v1/users/me/passkeys", Some(&access)).await.json::<Value>().await.unwrap();
    assert_eq!(mine["passkeys"].as_array().map(Vec::len), Some(1), "{mine}");
    assert_eq!(mine["passkeys"][0]["name"], "Test key", "{mine}");

    // Signing out ends that session on the server too.
    browser.resume().await;
    let out = browser.report().await;
    assert_eq!(shown(&out, "signed_out", &page_url), ("success", "You are signed out."), "{out}");
    assert_eq!(out["api_requests"], json!(["POST /v1/auth/logout"]), "{out}");
    assert_problem(app.get("/v1/users/me", Some(&access)).await, StatusCode::UNAUTHORIZED, "token_revoked")
        .await;

    // The password alone now gets a second-factor step, which the passkey completes.
    let second = browser.report().await;
    let asked = &second["asked"];
    assert_eq!(
        shown(asked, "second_factor_asked", &page_url),
        ("info", "Use your passkey to finish signing in."),
        "{second}"
    );
    assert_eq!(asked["mfa_form"], true, "{second}");
    assert_eq!(asked["api_requests"], json!(["POST /v1/auth/login"]), "{second}");
    assert_eq!(
        shown(&second, "second_factor", &page_url),
        ("success", "You are signed in with two steps."),
        "{second}"
    );
    assert_eq!(
        second["api_requests"],
        json!([
            "POST /v1/auth/mfa/webauthn/options",
            "POST /v1/auth/mfa",
            "GET /v1/users/me",
            "GET /v1/users/me/passkeys"
        ]),
        "{second}"
    );
    let access = second["access_token"].as_str().expect("the second factor's access token");
    assert_eq!(app.get("/v1/users/me", Some(access)).await.status(), StatusCode::OK);
    assert_eq!(claims(access)["amr"], json!(["pwd", "hwk", "mfa"]), "{}", claims(access));
    browser.finish().await;
}

#[tokio::test]
async fn the_passkeys_page_tells_the_user_what_each_answer_of_the_api_means() {
    // The page in a real browser on localhost, the API stubbed inside it
    // (passkeys_answers.mjs): each answer in turn.
    let (_app, page_url) = spawn_on_localhost().await;
    let mut browser = Driver::start("passkeys_answers.mjs", &[("PAGE_URL", &page_url)]);
    let report = browser.report().await;
    browser.finish().await;
    assert_eq!(report["violations"], json!([]), "{report}");
    let results = &report["results"];
    let shown = |name: &str| {
        let r = &results[name];
        (
            r["state"].as_str().unwrap_or("").to_owned(),
            r["status"].as_str().unwrap_or("").to_owned(),
            r.clone(),
        )
    };
    let login = json!(["POST /v1/auth/login"]);

    // A wrong password, a rate limit, no network: said, and the form stays.
    let (state, text, r) = shown("invalid_credentials");
    assert_eq!((state.as_str(), text.as_str()), ("error", "The email address or the password is not right."));
    assert_eq!((&r["password_form"], &r["requests"]), (&json!(true), &login), "{r}");
    let (_, text, r) = shown("rate_limited");
    assert_eq!(text, "Too many attempts. Try again in a minute.", "{r}");
    let (_, text, r) = shown("offline");
    assert_eq!(text, "The server could not be reached. Check your connection and try again.", "{r}");
    assert_eq!(r["password_form"], true, "{r}");

    // A second factor with codes only: the code field, no passkey button.
    let (state, text, r) = shown("mfa_required");
    assert_eq!(
        (state.as_str(), text.as_str()),
        ("info", "Enter the code from your authenticator app, or one of your recovery codes."),
        "{r}"
    );
    assert_eq!(
        (&r["password_form"], &r["mfa_form"], &r["mfa_code"], &r["mfa_passkey"]),
        (&json!(false), &json!(true), &json!(true), &json!(false)),
        "{r}"
    );
    for name in ["invalid_mfa_code", "invalid_recovery_code"] {
        let (state, text, r) = shown(name);
        assert_eq!(state, "error", "{r}");
        assert_eq!(
            text,
            "That was not accepted. Try again with the current code, or use another second factor."
        );
        assert_eq!((&r["mfa_form"], &r["requests"]), (&json!(true), &json!(["POST /v1/auth/mfa"])), "{r}");
    }
    // Six digits are a TOTP code (spaces dropped), anything else a recovery code; always
    // with the ticket of the mfa_required answer.
    let ticket = "ticket-never-checked";
    assert_eq!(
        report["mfa_bodies"],
        json!([
            {"mfa_token": ticket, "method": "totp", "code": "123456"},
            {"mfa_token": ticket, "method": "recovery_code", "code": "abcd-efgh-jkmn"},
            {"mfa_token": ticket, "method": "totp", "code": "654321"},
        ]),
        "{report}"
    );
    // A dead ticket: back to the password.
    let (_, text, r) = shown("ticket_gone");
    assert_eq!(text, "The sign-in took too long or was tried too often. Please sign in again.", "{r}");
    assert_eq!((&r["password_form"], &r["mfa_form"]), (&json!(true), &json!(false)), "{r}");

    // Passkeys off on the server; a prompt that ends with no passkey: nothing else sent.
    let options = json!(["POST /v1/auth/passkey/options"]);
    let (_, text, r) = shown("passkeys_off");
    assert_eq!(
        (text.as_str(), &r["requests"]),
        ("Passkeys are not enabled on this server.", &options),
        "{r}"
    );
    let (state, text, r) = shown("no_passkey");
    assert_eq!(
        (state.as_str(), text.as_str()),
        ("error", "The passkey request was cancelled or timed out. Nothing was changed."),
        "{r}"
    );
    assert_eq!(r["requests"], options, "{r}");
}
