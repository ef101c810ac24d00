//! Where a login came from, and the new-device mail (issue 15). Each test builds a small
//! MaxMind-format city database (`tests/geoip_db.py`, mmdb-writer) and logs in through a
//! trusted proxy, so each login can claim its own client address.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use latchkey::store::entity::{audit_log, email_outbox};
use reqwest::StatusCode;
use sea_orm::{ColumnTrait as _, EntityTrait as _, QueryFilter as _, QueryOrder as _};
use serde_json::{Value, json};

use crate::helpers::{Backend, PASSWORD, Resources, Store, TestApp, Tokens, eventually};

const FIREFOX: &str = "Mozilla/5.0 (X11; Linux x86_64; rv:132.0) Gecko/20100101 Firefox/132.0";

/// Runs one scenario on PostgreSQL + Redis and on SQLite + the in-process store.
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

/// The test database (see `tests/geoip_db.py`): 203.0.113.0/24 is Berlin, DE;
/// 198.51.100.0/24 only DE; 2001:db8::/32 Paris, FR; nothing else is in it.
struct GeoDb {
    dir: tempfile::TempDir,
}

impl GeoDb {
    fn build() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/geoip_db.py");
        let out =
            Command::new("python3").arg(script).arg(dir.path().join("city.mmdb")).output().expect("python3");
        assert!(
            out.status.success(),
            "building the test database failed; is mmdb-writer installed (pip install mmdb-writer==0.2.7, see .ci/run)?\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir }
    }

    fn path(&self) -> String {
        self.dir.path().join("city.mmdb").display().to_string()
    }
}

/// A directory the `.eml` files land in (no `SMTP_URL`), polled often.
struct MailDir {
    dir: tempfile::TempDir,
}

impl MailDir {
    fn new() -> Self {
        Self { dir: tempfile::tempdir().unwrap() }
    }

    fn path(&self) -> String {
        self.dir.path().display().to_string()
    }

    fn messages(&self) -> Vec<String> {
        read_emls(self.dir.path())
    }
}

fn read_emls(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "eml"))
        .map(|p: PathBuf| std::fs::read_to_string(p).unwrap())
        .collect()
}

async fn login(
    app: &TestApp,
    email: &str,
    password: &str,
    ip: &str,
    user_agent: &str,
    device: Option<&str>,
) -> reqwest::Response {
    let mut body = json!({"email": email, "password": password});
    if let Some(d) = device {
        body["device_token"] = json!(d);
    }
    app.client
        .post(app.url("/v1/auth/login"))
        .header("x-forwarded-for", ip)
        .header("user-agent", user_agent)
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn logged_in(app: &TestApp, email: &str, ip: &str, user_agent: &str, device: Option<&str>) -> Tokens {
    let resp = login(app, email, PASSWORD, ip, user_agent, device).await;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, StatusCode::OK, "login from {ip}: {body}");
    Tokens::from(body)
}

/// The `location` of each session in a session list, by session id.
fn location_of(list: &Value, session_id: &str) -> Value {
    let sessions = list["sessions"].as_array().unwrap_or_else(|| panic!("a session list: {list}"));
    let session = sessions
        .iter()
        .find(|s| s["id"] == session_id)
        .unwrap_or_else(|| panic!("session {session_id} in {list}"));
    session["location"].clone()
}

async fn sessions(app: &TestApp, path: &str, access: &str) -> Value {
    let resp = app.get(path, Some(access)).await;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// The text and HTML parts of a delivered message, decoded.
fn parts(raw: &str) -> (String, String) {
    let mail = crate::accounts::parse(raw.as_bytes());
    (mail.text, mail.html)
}

async fn new_sign_in_mails(app: &TestApp) -> Vec<email_outbox::Model> {
    email_outbox::Entity::find()
        .filter(email_outbox::Column::Template.eq("new_sign_in"))
        .order_by_asc(email_outbox::Column::Id)
        .all(&app.state.db)
        .await
        .unwrap()
}

both!(a_login_through_a_trusted_proxy_shows_where_it_came_from);
async fn a_login_through_a_trusted_proxy_shows_where_it_came_from(backend: Backend, store: Store) {
    let geo = GeoDb::build();
    let path = geo.path();
    let app =
        TestApp::spawn_with(backend, store, &[("TRUSTED_PROXIES", "127.0.0.1"), ("GEOIP_DATABASE", &path)])
            .await;
    let email = "traveller@example.com";
    assert_eq!(app.register(email, PASSWORD).await.status(), StatusCode::CREATED);
    let berlin = logged_in(&app, email, "203.0.113.7", FIREFOX, None).await;
    let country = logged_in(&app, email, "198.51.100.20", FIREFOX, None).await;
    let nowhere = logged_in(&app, email, "192.0.2.1", FIREFOX, None).await;
    let paris = logged_in(&app, email, "2001:db8::7", FIREFOX, None).await;

    let list = sessions(&app, "/v1/users/me/sessions", &berlin.access).await;
    assert_eq!(location_of(&list, &berlin.session_id), json!("Berlin, DE"), "{list}");
    assert_eq!(location_of(&list, &country.session_id), json!("DE"), "only a country: {list}");
    assert_eq!(location_of(&list, &nowhere.session_id), Value::Null, "not in the database: {list}");
    assert_eq!(location_of(&list, &paris.session_id), json!("Paris, FR"), "IPv6: {list}");

    // A refresh from elsewhere moves the session's address, not the login's location.
    let resp = app
        .client
        .post(app.url("/v1/auth/refresh"))
        .header("x-forwarded-for", "192.0.2.9")
        .json(&json!({"refresh_token": berlin.refresh}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let list = sessions(&app, "/v1/users/me/sessions", &berlin.access).await;
    let row = list["sessions"].as_array().unwrap().iter().find(|s| s["id"] == berlin.session_id.as_str());
    assert_eq!(row.map(|s| s["ip_address"].clone()), Some(json!("192.0.2.9")), "{list}");
    assert_eq!(location_of(&list, &berlin.session_id), json!("Berlin, DE"), "{list}");

    // The admin's list shows it too.
    let user_id = app.get("/v1/users/me", Some(&berlin.access)).await.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let _ = app.register("warden@example.com", PASSWORD).await;
    latchkey::service::users::grant_role(&app.state.db, "warden@example.com", "admin", app.clock.now())
        .await
        .unwrap();
    let admin = logged_in(&app, "warden@example.com", "192.0.2.2", FIREFOX, None).await;
    let list = sessions(&app, &format!("/v1/admin/users/{user_id}/sessions"), &admin.access).await;
    assert_eq!(location_of(&list, &berlin.session_id), json!("Berlin, DE"), "{list}");
    assert_eq!(location_of(&list, &nowhere.session_id), Value::Null, "{list}");

    // The audit rows of the logins carry the location when it is known.
    let user_uuid: uuid::Uuid = user_id.parse().unwrap();
    let logins = || async {
        audit_log::Entity::find()
            .filter(audit_log::Column::Action.eq("login_success"))
            .filter(audit_log::Column::UserId.eq(user_uuid))
            .all(&app.state.db)
            .await
            .unwrap()
    };
    assert!(eventually(Duration::from_secs(5), || async { logins().await.len() == 4 }).await, "4 audit rows");
    let detail_of = |rows: &[audit_log::Model], session_id: &str| {
        rows.iter()
            .filter_map(|r| r.detail.clone())
            .find(|d| d["session_id"] == session_id)
            .unwrap_or_else(|| panic!("an audit row for {session_id}"))
    };
    let rows = logins().await;
    assert_eq!(detail_of(&rows, &berlin.session_id)["location"], "Berlin, DE");
    assert_eq!(detail_of(&rows, &country.session_id)["location"], "DE");
    assert!(detail_of(&rows, &nowhere.session_id).get("location").is_none(), "unknown: left out");

    // Dual-stack sockets write IPv4 peers as ::ffff:a.b.c.d: those are found too.
    let geoip = app.state.geoip.as_ref().expect("a database is loaded");
    assert_eq!(geoip.locate("::ffff:203.0.113.7".parse().unwrap()).as_deref(), Some("Berlin, DE"));
    assert_eq!(geoip.locate("10.0.0.1".parse().unwrap()), None, "a private address");
}

both!(a_new_device_is_mailed_once_and_a_known_device_never);
async fn a_new_device_is_mailed_once_and_a_known_device_never(backend: Backend, store: Store) {
    let geo = GeoDb::build();
    let mail = MailDir::new();
    let (geo_path, mail_path) = (geo.path(), mail.path());
    let app = TestApp::spawn_with(
        backend,
        store,
        &[
            ("TRUSTED_PROXIES", "127.0.0.1"),
            ("GEOIP_DATABASE", &geo_path),
            ("NOTIFY_NEW_DEVICE", "true"),
            ("MAIL_DIR", &mail_path),
            ("MAIL_POLL_INTERVAL", "50ms"),
        ],
    )
    .await;
    let email = "roamer@example.com";
    assert_eq!(app.register(email, PASSWORD).await.status(), StatusCode::CREATED);

    // A failed login from a new device signs nobody in: no mail.
    let resp = login(&app, email, "not the password", "203.0.113.7", FIREFOX, None).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    // The first login from this browser: one mail, with the device, address, location, link.
    let firefox = logged_in(&app, email, "203.0.113.7", FIREFOX, None).await;
    let device = firefox.body["device_token"].as_str().expect("a device token").to_owned();
    assert!(eventually(Duration::from_secs(10), || async { mail.messages().len() == 1 }).await, "mailed");
    let rows = new_sign_in_mails(&app).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].recipient, email);
    // A sent mail's row keeps no body (it may hold links): read what was delivered.
    let (text, html) = parts(&mail.messages()[0]);
    let text = &text;
    for part in [
        "Firefox 132 on Linux",
        "203.0.113.7",
        "Location: Berlin, DE",
        " UTC",
        "http://localhost:8080/docs#/Users/mySessions",
    ] {
        assert!(text.contains(part), "{part:?} in\n{text}");
    }
    assert!(html.contains("Berlin, DE"), "{html}");
    let message = &mail.messages()[0];
    assert!(message.lines().any(|l| l == format!("To: {email}")), "{message}");

    // The same browser again, with its device token, from another address: nothing more.
    let again = logged_in(&app, email, "192.0.2.1", FIREFOX, Some(&device)).await;
    let renewed = again.body["device_token"].as_str().expect("a device token").to_owned();
    let _ = logged_in(&app, email, "192.0.2.1", FIREFOX, Some(&renewed)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(new_sign_in_mails(&app).await.len(), 1, "a known device is not news");
    assert_eq!(mail.messages().len(), 1);

    // Another fresh device, from an address the database does not know: mailed again,
    // without a location line.
    let _ = logged_in(&app, email, "192.0.2.50", "curl/8.5.0", None).await;
    assert!(eventually(Duration::from_secs(10), || async { mail.messages().len() == 2 }).await, "mailed");
    let rows = new_sign_in_mails(&app).await;
    assert_eq!(rows.len(), 2);
    let texts: Vec<String> = mail.messages().iter().map(|m| parts(m).0).collect();
    let text = texts.iter().find(|t| t.contains("curl")).expect("the second mail");
    assert!(text.contains("curl 8.5.0") && text.contains("192.0.2.50"), "{text}");
    assert!(!text.contains("Location:"), "no location known: {text}");
}

#[tokio::test]
async fn without_notify_new_device_a_login_queues_no_mail() {
    let geo = GeoDb::build();
    let path = geo.path();
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        Store::InProcess,
        &[("TRUSTED_PROXIES", "127.0.0.1"), ("GEOIP_DATABASE", &path)],
    )
    .await;
    assert_eq!(app.register("quiet@example.com", PASSWORD).await.status(), StatusCode::CREATED);
    let tokens = logged_in(&app, "quiet@example.com", "203.0.113.7", FIREFOX, None).await;
    let list = sessions(&app, "/v1/users/me/sessions", &tokens.access).await;
    assert_eq!(location_of(&list, &tokens.session_id), json!("Berlin, DE"));
    assert!(new_sign_in_mails(&app).await.is_empty());
}

#[tokio::test]
async fn with_app_url_the_mail_links_to_the_apps_session_list() {
    let mail = MailDir::new();
    let mail_path = mail.path();
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        Store::InProcess,
        &[("NOTIFY_NEW_DEVICE", "true"), ("MAIL_DIR", &mail_path), ("APP_URL", "https://app.example.com/")],
    )
    .await;
    assert_eq!(app.register("linked@example.com", PASSWORD).await.status(), StatusCode::CREATED);
    let _ = app.login_with("linked@example.com", &[]).await;
    let rows = new_sign_in_mails(&app).await;
    assert_eq!(rows.len(), 1, "queued in the login's own transaction");
    assert!(eventually(Duration::from_secs(10), || async { mail.messages().len() == 1 }).await, "mailed");
    let (text, _) = parts(&mail.messages()[0]);
    assert!(text.lines().any(|l| l.trim_end() == "https://app.example.com/sessions"), "{text}");
    assert!(!text.contains("Location:"), "no GEOIP_DATABASE: {text}");
}

#[tokio::test]
async fn a_bad_geoip_database_stops_start_up_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.mmdb").display().to_string();
    let garbage = dir.path().join("garbage.mmdb");
    std::fs::write(&garbage, b"this is not a MaxMind database").unwrap();
    let garbage = garbage.display().to_string();
    for path in [&missing, &garbage] {
        let resources = Resources::new(Backend::Sqlite, &Store::InProcess).await;
        let err = TestApp::try_spawn_on(resources, &[("GEOIP_DATABASE", path)])
            .await
            .err()
            .expect("start-up refused");
        let err = format!("{err:#}");
        assert!(err.contains("GEOIP_DATABASE") && err.contains(path.as_str()), "{err}");
    }

    // The binary says so on stderr and exits non-zero.
    let out = Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .arg("serve")
        .current_dir(dir.path())
        .env_clear()
        .env("GEOIP_DATABASE", &missing)
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("METRICS_ADDR", "off")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("GEOIP_DATABASE"), "{stderr}");
}
