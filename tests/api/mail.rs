//! The mail pipeline against a real SMTP server (aiosmtpd, started by the test from
//! `tests/smtp_sink.py`): delivery, retries while the server is down, temporary and
//! permanent refusals, two instances draining one PostgreSQL outbox, `.eml` files without
//! `SMTP_URL`, and shutdown leaving mail queued.

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use latchkey::domain::Email;
use latchkey::mail::{LinkPage, Mail};
use latchkey::store::entity::email_outbox;
use sea_orm::{EntityTrait as _, TransactionTrait as _};

use crate::helpers::{Backend, Resources, Store, TestApp, eventually, free_port};

/// A real SMTP server on a free port, saving what it accepts into a directory; killed on drop.
pub struct SmtpSink {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl SmtpSink {
    fn reserve() -> Self {
        Self { port: free_port(), dir: tempfile::tempdir().expect("tempdir"), child: None }
    }

    pub async fn start(args: &[&str]) -> Self {
        let mut sink = Self::reserve();
        sink.run(args).await;
        sink
    }

    async fn run(&mut self, args: &[&str]) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/smtp_sink.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(self.port.to_string())
            .arg(self.dir.path())
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                self.child = Some(child);
                return;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                if let Some(mut stderr) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut stderr, &mut err);
                }
                panic!(
                    "the SMTP sink exited ({status}); is aiosmtpd installed (pip install aiosmtpd==1.4.6, see .ci/run)?\n{err}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the SMTP sink did not listen on port {}", self.port);
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Every message received so far.
    pub fn messages(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.path())
            .expect("sink dir")
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
            .map(|e| std::fs::read_to_string(e.path()).expect("message"))
            .collect()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Short polls and retries, so tests take well under a second per attempt.
const FAST: [(&str, &str); 3] =
    [("MAIL_POLL_INTERVAL", "50ms"), ("MAIL_RETRY_BASE", "100ms"), ("MAIL_RETRY_MAX", "300ms")];

fn env<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    FAST.iter().copied().chain(extra.iter().copied()).collect()
}

fn verify_mail(app: &TestApp, n: usize) -> Mail {
    Mail::VerifyEmail {
        to: Email::parse(&format!("user{n}@example.com")).expect("email"),
        link: app.state.outbox.link(LinkPage::VerifyEmail, &format!("token-{n}")),
        expires_in: "24h".into(),
    }
}

/// Queues `mail` in a transaction of its own, as a service would; returns the row id.
async fn enqueue(app: &TestApp, mail: &Mail) -> uuid::Uuid {
    let txn = app.state.db.begin().await.expect("begin");
    let id = app.state.outbox.enqueue(&txn, mail).await.expect("enqueue");
    txn.commit().await.expect("commit");
    id
}

async fn rows(app: &TestApp) -> Vec<email_outbox::Model> {
    email_outbox::Entity::find().all(&app.state.db).await.expect("outbox rows")
}

fn header<'a>(message: &'a str, name: &str) -> Option<&'a str> {
    message.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[tokio::test]
async fn a_queued_mail_reaches_a_real_smtp_server_and_a_rolled_back_one_does_not() {
    let sink = SmtpSink::start(&[]).await;
    let url = sink.url();
    let app = TestApp::spawn_with(Backend::Sqlite, Store::InProcess, &env(&[("SMTP_URL", &url)])).await;

    // A mail queued in a transaction that rolls back was never queued.
    let txn = app.state.db.begin().await.unwrap();
    app.state.outbox.enqueue(&txn, &verify_mail(&app, 0)).await.unwrap();
    txn.rollback().await.unwrap();

    let id = enqueue(&app, &verify_mail(&app, 1)).await;
    assert!(eventually(Duration::from_secs(10), || async { sink.messages().len() == 1 }).await, "delivered");
    let message = &sink.messages()[0];
    assert_eq!(header(message, "To"), Some("user1@example.com"), "{message}");
    assert_eq!(header(message, "Subject"), Some("Confirm your email address for Latchkey"), "{message}");
    assert_eq!(header(message, "Message-ID"), Some(format!("<{id}@localhost>").as_str()), "{message}");
    assert!(message.contains("text/plain") && message.contains("text/html"), "{message}");
    assert!(
        eventually(Duration::from_secs(5), || async {
            rows(&app).await.iter().any(|r| r.status == "sent" && r.sent_at.is_some())
        })
        .await
    );
    let rows = rows(&app).await;
    assert_eq!(rows.len(), 1, "the rolled-back mail left no row");
    assert_eq!((rows[0].id, rows[0].attempts, rows[0].lease_until), (id, 1, None));

    let metrics = format!("{}/metrics", app.metrics_address.as_ref().expect("metrics"));
    let scrape = app.client.get(metrics).send().await.unwrap().text().await.unwrap();
    assert!(scrape.contains(r#"latchkey_mails_total{template="verify_email",outcome="sent"} 1"#), "{scrape}");
    assert!(scrape.contains("latchkey_mail_queue_depth "), "{scrape}");
    assert!(scrape.contains("latchkey_mail_oldest_queued_age_seconds "), "{scrape}");
}

#[tokio::test]
async fn mail_queued_while_the_smtp_server_is_down_is_sent_when_it_comes_back() {
    let mut sink = SmtpSink::reserve();
    let url = sink.url();
    let app = TestApp::spawn_with(
        Backend::Postgres,
        Store::InProcess,
        &env(&[("SMTP_URL", &url), ("MAIL_MAX_ATTEMPTS", "100")]),
    )
    .await;
    for n in 0..3 {
        enqueue(&app, &verify_mail(&app, n)).await;
    }
    assert!(
        eventually(Duration::from_secs(10), || async {
            let rows = rows(&app).await;
            rows.iter().all(|r| r.attempts >= 2 && r.last_error.is_some() && r.status != "abandoned")
        })
        .await,
        "retried while the server is down: {:?}",
        rows(&app).await
    );
    sink.run(&[]).await;
    assert!(
        eventually(Duration::from_secs(10), || async { rows(&app).await.iter().all(|r| r.status == "sent") })
            .await,
        "{:?}",
        rows(&app).await
    );
    assert_eq!(sink.messages().len(), 3);
}

#[tokio::test]
async fn temporary_refusals_are_retried_until_accepted() {
    let sink = SmtpSink::start(&["--tempfail", "2"]).await;
    let url = sink.url();
    let app = TestApp::spawn_with(Backend::Sqlite, Store::InProcess, &env(&[("SMTP_URL", &url)])).await;
    enqueue(&app, &verify_mail(&app, 1)).await;
    assert!(
        eventually(Duration::from_secs(10), || async { rows(&app).await[0].status == "sent" }).await,
        "{:?}",
        rows(&app).await
    );
    let row = &rows(&app).await[0];
    assert_eq!(row.attempts, 3, "two 451s, then accepted");
    assert!(row.last_error.as_deref().is_some_and(|e| e.contains("451")), "{row:?}");
    assert_eq!(sink.messages().len(), 1);
}

#[tokio::test]
async fn temporary_refusals_give_up_after_the_bounded_attempts() {
    let sink = SmtpSink::start(&["--tempfail", "1000"]).await;
    let url = sink.url();
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        Store::InProcess,
        &env(&[("SMTP_URL", &url), ("MAIL_MAX_ATTEMPTS", "3")]),
    )
    .await;
    enqueue(&app, &verify_mail(&app, 1)).await;
    assert!(
        eventually(Duration::from_secs(10), || async { rows(&app).await[0].status == "abandoned" }).await,
        "{:?}",
        rows(&app).await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let row = &rows(&app).await[0];
    assert_eq!(row.attempts, 3, "{row:?}");
    assert!(row.last_error.as_deref().is_some_and(|e| e.contains("451")), "{row:?}");
    assert!(sink.messages().is_empty());
}

#[tokio::test]
async fn a_permanent_refusal_abandons_the_mail_at_once() {
    let sink = SmtpSink::start(&["--reply", "550 5.1.1 no such user"]).await;
    let url = sink.url();
    let app = TestApp::spawn_with(Backend::Postgres, Store::InProcess, &env(&[("SMTP_URL", &url)])).await;
    enqueue(&app, &verify_mail(&app, 1)).await;
    assert!(
        eventually(Duration::from_secs(10), || async { rows(&app).await[0].status == "abandoned" }).await,
        "{:?}",
        rows(&app).await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let row = &rows(&app).await[0];
    assert_eq!(row.attempts, 1, "a 5xx is not retried: {row:?}");
    assert!(row.last_error.as_deref().is_some_and(|e| e.contains("no such user")), "{row:?}");
    assert!(row.sent_at.is_none());
}

#[tokio::test]
async fn two_instances_on_one_postgres_drain_500_mails_and_send_none_twice() {
    two_instances_drain_mails_and_send_none_twice(Backend::Postgres, 500).await;
}

#[tokio::test]
async fn two_instances_on_one_mariadb_drain_200_mails_and_send_none_twice() {
    two_instances_drain_mails_and_send_none_twice(Backend::MariaDb, 200).await;
}

async fn two_instances_drain_mails_and_send_none_twice(backend: Backend, mails: usize) {
    let sink = SmtpSink::start(&[]).await;
    let url = sink.url();
    let resources = Resources::new(backend, &Store::InProcess).await;
    let settings = env(&[("SMTP_URL", &url), ("MAIL_WORKERS", "3")]);
    let first = TestApp::spawn_on(resources.clone(), &settings).await;
    let second = TestApp::spawn_on(resources, &settings).await;
    let mut ids = HashSet::new();
    for n in 0..mails {
        let app = if n % 2 == 0 { &first } else { &second };
        ids.insert(enqueue(app, &verify_mail(app, n)).await);
    }
    assert!(
        eventually(Duration::from_secs(120), || async {
            rows(&first).await.iter().filter(|r| r.status == "sent").count() == mails
        })
        .await,
        "all sent"
    );
    // Anything sent twice would have arrived by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let messages = sink.messages();
    let received: Vec<String> =
        messages.iter().map(|m| header(m, "Message-ID").expect("Message-ID").to_owned()).collect();
    let unique: HashSet<&String> = received.iter().collect();
    assert_eq!(received.len(), mails, "none sent twice");
    assert_eq!(unique.len(), mails);
    let expected: HashSet<String> = ids.iter().map(|id| format!("<{id}@localhost>")).collect();
    assert_eq!(unique.into_iter().cloned().collect::<HashSet<_>>(), expected);
    assert!(rows(&first).await.iter().all(|r| r.attempts == 1), "each leased once");
}

#[tokio::test]
async fn without_smtp_url_a_mail_becomes_an_eml_file_in_mail_dir() {
    let dir = tempfile::tempdir().unwrap();
    let mail_dir = dir.path().join("mail");
    let mail_dir_str = mail_dir.display().to_string();
    let app =
        TestApp::spawn_with(Backend::Sqlite, Store::InProcess, &env(&[("MAIL_DIR", &mail_dir_str)])).await;
    let id = enqueue(&app, &verify_mail(&app, 7)).await;
    let file = mail_dir.join(format!("{id}.eml"));
    assert!(eventually(Duration::from_secs(10), || async { file.exists() }).await, "{}", file.display());
    let message = std::fs::read_to_string(&file).unwrap();
    assert_eq!(header(&message, "To"), Some("user7@example.com"), "{message}");
    assert_eq!(header(&message, "From"), Some("Latchkey <no-reply@localhost>"), "{message}");
    let entries: Vec<_> = std::fs::read_dir(&mail_dir).unwrap().collect();
    assert_eq!(entries.len(), 1, "no temporary file left behind");
}

#[tokio::test]
async fn stopping_leaves_unsent_mail_queued_for_the_next_start() {
    let mut sink = SmtpSink::reserve();
    let url = sink.url();
    let resources = Resources::new(Backend::Postgres, &Store::InProcess).await;
    let settings = env(&[("SMTP_URL", &url), ("MAIL_MAX_ATTEMPTS", "100")]);
    let app = TestApp::spawn_on(resources.clone(), &settings).await;
    for n in 0..5 {
        enqueue(&app, &verify_mail(&app, n)).await;
    }
    app.stop().await;
    // The stopped app closed its pool: read on a connection of the test's own.
    let left = email_outbox::Entity::find().all(&own_db(&resources).await).await.unwrap();
    assert_eq!(left.len(), 5);
    assert!(left.iter().all(|r| r.status == "queued" || r.status == "sending"), "{left:?}");
    sink.run(&[]).await;
    let next = TestApp::spawn_on(resources, &settings).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            rows(&next).await.iter().all(|r| r.status == "sent")
        })
        .await,
        "{:?}",
        rows(&next).await
    );
    assert_eq!(sink.messages().len(), 5);
}

async fn own_db(resources: &Resources) -> sea_orm::DatabaseConnection {
    sea_orm::Database::connect(resources.database_url.as_str()).await.unwrap()
}

#[tokio::test]
async fn a_broken_template_override_stops_start_up_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reset_password.html");
    std::fs::write(&path, "{% block body %}never closed").unwrap();
    let templates = dir.path().display().to_string();
    let resources = Resources::new(Backend::Sqlite, &Store::InProcess).await;
    let err = TestApp::try_spawn_on(resources, &[("EMAIL_TEMPLATES_DIR", &templates)])
        .await
        .err()
        .expect("start-up refused");
    let err = format!("{err:#}");
    assert!(err.contains(&path.display().to_string()), "{err}");
}
