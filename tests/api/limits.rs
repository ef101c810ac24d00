//! Rate limits and the brute-force cool-down, against the real server.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{Backend, PASSWORD, Store, TestApp, assert_problem};

async fn login_from(app: &TestApp, email: &str, password: &str, ip: &str) -> reqwest::Response {
    app.client
        .post(app.url("/v1/auth/login"))
        .header("x-forwarded-for", ip)
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .unwrap()
}

async fn assert_limited(resp: reqwest::Response) -> (u64, Value) {
    let retry: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1);
    (retry, assert_problem(resp, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await)
}

macro_rules! both {
    ($name:ident, $env:expr) => {
        mod $name {
            use super::*;
            #[tokio::test]
            async fn postgres_redis() {
                super::$name(TestApp::spawn_with(Backend::Postgres, Store::Redis, $env).await).await;
            }
            #[tokio::test]
            async fn mariadb_redis() {
                super::$name(TestApp::spawn_with(Backend::MariaDb, Store::Redis, $env).await).await;
            }
            #[tokio::test]
            async fn sqlite_in_process() {
                super::$name(TestApp::spawn_with(Backend::Sqlite, Store::InProcess, $env).await).await;
            }
        }
    };
}

both!(
    one_ip_trying_many_accounts_is_limited,
    &[("RATE_LIMIT_LOGIN_PER_IP", "3/1m"), ("TRUSTED_PROXIES", "127.0.0.1")]
);
async fn one_ip_trying_many_accounts_is_limited(app: TestApp) {
    assert_eq!(app.register("known@example.com", PASSWORD).await.status(), StatusCode::CREATED);
    for email in ["known@example.com", "a@example.com", "b@example.com"] {
        assert_eq!(
            login_from(&app, email, "wrong password", "198.51.100.1").await.status(),
            StatusCode::UNAUTHORIZED
        );
    }
    let (retry, known) =
        assert_limited(login_from(&app, "known@example.com", PASSWORD, "198.51.100.1").await).await;
    assert!(retry <= 20, "3/1m refills a token every 20 s: {retry}");
    let (_, unknown) =
        assert_limited(login_from(&app, "c@example.com", PASSWORD, "198.51.100.1").await).await;
    assert_eq!(known, unknown, "a 429 says nothing about the account");
    // Another address has its own budget; time refills this one.
    assert_eq!(
        login_from(&app, "known@example.com", PASSWORD, "198.51.100.2").await.status(),
        StatusCode::OK
    );
    app.clock.advance(Duration::from_secs(20));
    assert_eq!(
        login_from(&app, "known@example.com", PASSWORD, "198.51.100.1").await.status(),
        StatusCode::OK
    );
}

both!(
    many_ips_trying_one_account_are_limited,
    &[
        ("RATE_LIMIT_LOGIN_PER_ACCOUNT", "3/1m"),
        ("TRUSTED_PROXIES", "127.0.0.1"),
        ("LOGIN_COOLDOWN_THRESHOLD", "100")
    ]
);
async fn many_ips_trying_one_account_are_limited(app: TestApp) {
    assert_eq!(app.register("target@example.com", PASSWORD).await.status(), StatusCode::CREATED);
    for (email, body_of_known) in [("target@example.com", None::<Value>), ("ghost@example.com", None)] {
        let _ = body_of_known;
        for i in 0..3 {
            let ip = format!("203.0.113.{i}");
            assert_eq!(
                login_from(&app, email, "wrong password", &ip).await.status(),
                StatusCode::UNAUTHORIZED
            );
        }
        // Even the right password, from a fresh address, waits: the account's budget is spent.
        assert_limited(login_from(&app, email, PASSWORD, "203.0.113.99").await).await;
    }
    // Normalised: case and spaces do not buy a new budget.
    assert_limited(login_from(&app, "  TARGET@example.com ", PASSWORD, "203.0.113.100").await).await;
}

both!(
    an_attempt_refused_by_its_address_spends_nothing_of_the_account,
    &[
        ("RATE_LIMIT_LOGIN_PER_IP", "2/1m"),
        ("RATE_LIMIT_LOGIN_PER_ACCOUNT", "3/1m"),
        ("TRUSTED_PROXIES", "127.0.0.1"),
        ("LOGIN_COOLDOWN_THRESHOLD", "100")
    ]
);
async fn an_attempt_refused_by_its_address_spends_nothing_of_the_account(app: TestApp) {
    assert_eq!(app.register("victim@example.com", PASSWORD).await.status(), StatusCode::CREATED);
    for _ in 0..2 {
        assert_eq!(
            login_from(&app, "victim@example.com", "wrong password", "198.51.100.7").await.status(),
            StatusCode::UNAUTHORIZED
        );
    }
    // The address is spent; its further attempts must not drain the account's last token.
    for _ in 0..3 {
        assert_limited(login_from(&app, "victim@example.com", "wrong password", "198.51.100.7").await).await;
    }
    assert_eq!(
        login_from(&app, "victim@example.com", PASSWORD, "198.51.100.8").await.status(),
        StatusCode::OK,
        "the account's third token is still there"
    );
}

both!(
    register_and_refresh_are_limited_per_ip,
    &[("RATE_LIMIT_REGISTER_PER_IP", "2/1m"), ("RATE_LIMIT_REFRESH_PER_IP", "2/1m")]
);
async fn register_and_refresh_are_limited_per_ip(app: TestApp) {
    assert_eq!(app.register("one@example.com", PASSWORD).await.status(), StatusCode::CREATED);
    let tokens = app.login_with("one@example.com", &[]).await;
    assert_eq!(app.register("two@example.com", PASSWORD).await.status(), StatusCode::CREATED);
    assert_limited(app.register("three@example.com", PASSWORD).await).await;
    let resp = app.refresh(&tokens.refresh).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let next: Value = resp.json().await.unwrap();
    assert_eq!(app.refresh(next["refresh_token"].as_str().unwrap()).await.status(), StatusCode::OK);
    assert_limited(app.refresh("anything").await).await;
}

both!(
    cooldown_grows_and_resets,
    &[("LOGIN_COOLDOWN_THRESHOLD", "3"), ("LOGIN_COOLDOWN_BASE", "10s"), ("LOGIN_COOLDOWN_MAX", "25s")]
);
async fn cooldown_grows_and_resets(app: TestApp) {
    assert_eq!(app.register("slow@example.com", PASSWORD).await.status(), StatusCode::CREATED);
    let fail = || app.login("slow@example.com", "wrong password");
    for _ in 0..2 {
        assert_eq!(fail().await.status(), StatusCode::UNAUTHORIZED);
    }
    assert_eq!(
        fail().await.status(),
        StatusCode::UNAUTHORIZED,
        "the third failure is answered, then cools down"
    );
    let (retry, _) = assert_limited(app.login("slow@example.com", PASSWORD).await).await;
    // Real time passes between the failure and this check, so allow a second less.
    assert!((9..=10).contains(&retry), "{retry}");
    app.clock.advance(Duration::from_secs(10));
    assert_eq!(fail().await.status(), StatusCode::UNAUTHORIZED);
    let (retry, _) = assert_limited(fail().await).await;
    assert!((19..=20).contains(&retry), "doubles: {retry}");
    app.clock.advance(Duration::from_secs(20));
    assert_eq!(fail().await.status(), StatusCode::UNAUTHORIZED);
    let (retry, _) = assert_limited(fail().await).await;
    assert!((24..=25).contains(&retry), "capped at LOGIN_COOLDOWN_MAX: {retry}");
    app.clock.advance(Duration::from_secs(25));
    // A success resets the count.
    assert_eq!(app.login("slow@example.com", PASSWORD).await.status(), StatusCode::OK);
    assert_eq!(fail().await.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(app.login("slow@example.com", PASSWORD).await.status(), StatusCode::OK);
    // Unknown accounts cool down exactly the same way.
    for _ in 0..3 {
        assert_eq!(app.login("nobody@example.com", "x").await.status(), StatusCode::UNAUTHORIZED);
    }
    let (retry, _) = assert_limited(app.login("nobody@example.com", "x").await).await;
    assert!((9..=10).contains(&retry), "{retry}");
}

#[tokio::test]
async fn two_instances_on_one_redis_share_one_budget() {
    let env = [("RATE_LIMIT_LOGIN_PER_IP", "4/1m")];
    let a = TestApp::spawn_with(Backend::Postgres, Store::Redis, &env).await;
    let b = TestApp::spawn_on(a.resources.clone(), &env).await;
    for app in [&a, &b, &a, &b] {
        assert_eq!(app.login("x@example.com", "wrong password").await.status(), StatusCode::UNAUTHORIZED);
    }
    assert_limited(a.login("x@example.com", "wrong password").await).await;
    assert_limited(b.login("y@example.com", "wrong password").await).await;
}

#[tokio::test]
async fn rate_limited_requests_are_audited() {
    let app =
        TestApp::spawn_with(Backend::Sqlite, Store::InProcess, &[("RATE_LIMIT_REGISTER_PER_IP", "1/1m")])
            .await;
    assert_eq!(app.register("a@example.com", PASSWORD).await.status(), StatusCode::CREATED);
    assert_limited(app.register("b@example.com", PASSWORD).await).await;
    assert!(
        crate::helpers::eventually(Duration::from_secs(5), || async {
            crate::sessions::audit_actions(&app)
                .await
                .contains(&("rate_limited".to_owned(), "register_per_ip".to_owned()))
        })
        .await
    );
}

/// Issue 14: one client wrote 43,000 `rate_limited` rows in 10 s, and security events were
/// dropped beside them. Now the first refusal per limit and key in a window is written, the
/// rest are counted (a metric, then one summary row when the window closes), and a login
/// that succeeds during the flood is in SQL.
#[tokio::test]
async fn a_client_hammering_login_leaves_a_handful_of_audit_rows_and_a_success_still_lands() {
    use futures_util::StreamExt as _;
    use latchkey::store::entity::audit_log;
    use sea_orm::EntityTrait as _;

    let app = TestApp::spawn_with(
        Backend::Postgres,
        Store::Redis,
        &[("RATE_LIMIT_LOGIN_PER_IP", "5/1m"), ("TRUSTED_PROXIES", "127.0.0.1")],
    )
    .await;
    assert_eq!(app.register("good@example.com", PASSWORD).await.status(), StatusCode::CREATED);
    let attacker = "198.51.100.66";
    let flood = futures_util::stream::iter(0..600)
        .map(|i| {
            let app = &app;
            async move { login_from(app, &format!("flood{i}@example.com"), "wrong password", attacker).await }
        })
        .buffer_unordered(16)
        .map(|resp| resp.status())
        .collect::<Vec<_>>();
    let honest = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        login_from(&app, "good@example.com", PASSWORD, "198.51.100.77").await.status()
    };
    let (statuses, honest) = tokio::join!(flood, honest);
    assert_eq!(honest, StatusCode::OK);
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::UNAUTHORIZED).count(), 5);
    let refused = statuses.iter().filter(|s| **s == StatusCode::TOO_MANY_REQUESTS).count();
    assert_eq!(refused, 595);

    let rows = || async { audit_log::Entity::find().all(&app.state.db).await.unwrap() };
    assert!(
        crate::helpers::eventually(Duration::from_secs(5), || async {
            rows()
                .await
                .iter()
                .any(|r| r.action == "login_success" && r.ip_address.as_deref() == Some("198.51.100.77"))
        })
        .await,
        "the success during the flood is in SQL"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await; // one more flush
    let limited: Vec<_> = rows().await.into_iter().filter(|r| r.action == "rate_limited").collect();
    assert!((1..=3).contains(&limited.len()), "{} rate_limited rows", limited.len());
    assert!(limited.iter().all(|r| r.ip_address.as_deref() == Some(attacker)));

    // What was not written is counted: in the metric at once, in SQL when the window closes.
    let suppressed = crate::ops::value(
        &crate::ops::scrape(&app).await,
        r#"latchkey_audit_suppressed_total{action="rate_limited"}"#,
    );
    let written = |rows: &[audit_log::Model]| {
        let refusals = rows.iter().filter(|r| r.detail.is_none()).count() as u64;
        let counted: u64 = rows.iter().filter_map(|r| r.detail.as_ref()?.get("suppressed")?.as_u64()).sum();
        (refusals, counted)
    };
    let (refusals, _) = written(&limited);
    assert_eq!(refusals + suppressed as u64, 595, "every refusal is either a row or counted");
    app.clock.advance(Duration::from_secs(61));
    assert!(
        crate::helpers::eventually(Duration::from_secs(10), || async {
            let limited: Vec<_> = rows().await.into_iter().filter(|r| r.action == "rate_limited").collect();
            let (refusals, counted) = written(&limited);
            refusals + counted == 595
        })
        .await,
        "a summary row carries the suppressed count once the window closes"
    );
}

// --- Issue 14: abuse resistance. Each test is the attack. ---

async fn scrape_metrics(app: &TestApp) -> String {
    let url = format!("{}/metrics", app.metrics_address.as_ref().expect("metrics enabled"));
    app.client.get(url).send().await.unwrap().text().await.unwrap()
}

fn request_series(scrape: &str) -> Vec<&str> {
    scrape.lines().filter(|l| l.starts_with("latchkey_http_request")).collect()
}

#[tokio::test]
async fn invented_methods_and_paths_add_no_metric_series() {
    let app = TestApp::spawn(Backend::Sqlite, Store::InProcess).await;
    // One request of each shape the flood will use, so the series they need exist.
    for (method, path) in [("FOO", "/v1/auth/login"), ("FOO", "/nowhere"), ("GET", "/nowhere")] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        app.client.request(method, app.url(path)).send().await.unwrap();
    }
    let before = scrape_metrics(&app).await;
    for i in 0..200 {
        let method = reqwest::Method::from_bytes(format!("FOO{i}BAR").as_bytes()).unwrap();
        let path = if i % 2 == 0 { "/v1/auth/login".to_owned() } else { format!("/nowhere/{i}") };
        let resp = app.client.request(method, app.url(&path)).send().await.unwrap();
        assert!(resp.status().is_client_error(), "{}", resp.status());
    }
    let after = scrape_metrics(&app).await;
    assert!(!after.contains("FOO") && !after.contains("nowhere"), "{after}");
    assert_eq!(request_series(&before).len(), request_series(&after).len(), "{after}");
    let allowed = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other"];
    for line in request_series(&after).into_iter().filter(|l| l.contains("method=\"")) {
        let method = line.split("method=\"").nth(1).and_then(|m| m.split('"').next()).unwrap();
        assert!(allowed.contains(&method), "{line}");
    }
}

async fn register_from(app: &TestApp, email: &str, forwarded_for: &str) -> reqwest::Response {
    app.client
        .post(app.url("/v1/auth/register"))
        .header("x-forwarded-for", forwarded_for)
        .json(&json!({"email": email, "password": PASSWORD}))
        .send()
        .await
        .unwrap()
}

both!(
    thirty_addresses_of_one_ipv6_64_share_one_budget,
    &[("RATE_LIMIT_REGISTER_PER_IP", "3/1m"), ("TRUSTED_PROXIES", "127.0.0.1")]
);
async fn thirty_addresses_of_one_ipv6_64_share_one_budget(app: TestApp) {
    for n in 1..=30u32 {
        let resp = register_from(&app, &format!("v6-{n}@example.com"), &format!("2001:db8:1:2::{n:x}")).await;
        if n <= 3 {
            assert_eq!(resp.status(), StatusCode::CREATED, "address {n}");
        } else {
            assert_limited(resp).await;
        }
    }
    // Another /64 is another client; an IPv4-mapped address is the IPv4 client it names.
    let resp = register_from(&app, "other-64@example.com", "2001:db8:1:3::1").await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let resp = register_from(&app, "mapped@example.com", "::ffff:198.51.100.4").await;
    assert_eq!(resp.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn ipv6_prefix_128_counts_each_address() {
    let env = [
        ("RATE_LIMIT_REGISTER_PER_IP", "1/1m"),
        ("TRUSTED_PROXIES", "127.0.0.1"),
        ("RATE_LIMIT_IPV6_PREFIX", "128"),
    ];
    let app = TestApp::spawn_with(Backend::Sqlite, Store::InProcess, &env).await;
    for n in 1..=3u32 {
        let resp = register_from(&app, &format!("own-{n}@example.com"), &format!("2001:db8::{n}")).await;
        assert_eq!(resp.status(), StatusCode::CREATED, "address {n}");
    }
}

both!(
    fake_entries_left_of_the_real_client_buy_no_budget,
    &[("RATE_LIMIT_LOGIN_PER_IP", "2/1m"), ("TRUSTED_PROXIES", "127.0.0.1")]
);
async fn fake_entries_left_of_the_real_client_buy_no_budget(app: TestApp) {
    // What the proxy forwards: whatever the attacker wrote, then the address it saw.
    let chain = |i: u32| format!("10.9.{i}.1, unknown, 203.0.113.{i}, 198.51.100.66");
    for i in 0..2 {
        let resp = login_from(&app, "x@example.com", "wrong password", &chain(i)).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    }
    for i in 2..6 {
        assert_limited(login_from(&app, "x@example.com", "wrong password", &chain(i)).await).await;
    }
    // A Forwarded header is ignored while X-Forwarded-For is the configured one.
    let resp = app
        .client
        .post(app.url("/v1/auth/login"))
        .header("forwarded", "for=198.51.100.67")
        .header("x-forwarded-for", "198.51.100.66")
        .json(&json!({"email": "x@example.com", "password": "wrong password"}))
        .send()
        .await
        .unwrap();
    assert_limited(resp).await;
}

async fn session_ip(app: &TestApp, headers: &[(&str, &str)]) -> String {
    let email = format!("ip-{}@example.com", uuid::Uuid::new_v4().simple());
    assert_eq!(app.register(&email, PASSWORD).await.status(), StatusCode::CREATED);
    let tokens = app.login_with(&email, headers).await;
    let body: Value = app.get("/v1/users/me/sessions", Some(&tokens.access)).await.json().await.unwrap();
    body["sessions"][0]["ip_address"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn only_the_configured_forwarding_header_is_believed() {
    let both_headers =
        [("x-forwarded-for", "198.51.100.1"), ("forwarded", r#"for="[2001:db8::7]:4711";proto=https"#)];
    let xff =
        TestApp::spawn_with(Backend::Sqlite, Store::InProcess, &[("TRUSTED_PROXIES", "127.0.0.1")]).await;
    assert_eq!(session_ip(&xff, &both_headers).await, "198.51.100.1");
    assert_eq!(session_ip(&xff, &both_headers[1..]).await, "127.0.0.1", "Forwarded is not the one");

    let env = [("TRUSTED_PROXIES", "127.0.0.1"), ("FORWARDED_HEADER", "forwarded")];
    let fwd = TestApp::spawn_with(Backend::Sqlite, Store::InProcess, &env).await;
    assert_eq!(session_ip(&fwd, &both_headers).await, "2001:db8::7");
    assert_eq!(session_ip(&fwd, &both_headers[..1]).await, "127.0.0.1", "X-Forwarded-For is not the one");
    // An obfuscated or unknown hop ends the walk at the last trusted hop: this proxy.
    let hidden = [("forwarded", "for=198.51.100.9, for=_hidden")];
    assert_eq!(session_ip(&fwd, &hidden).await, "127.0.0.1");
}

both!(malformed_emails_leave_no_failure_record, &[("LOGIN_COOLDOWN_THRESHOLD", "2")]);
async fn malformed_emails_leave_no_failure_record(app: TestApp) {
    for _ in 0..4 {
        // Answered like a wrong password, but a string that cannot be an account never cools down.
        assert_eq!(app.login("not an email", "whatever").await.status(), StatusCode::UNAUTHORIZED);
    }
    if let Some(url) = &app.resources.redis_url {
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}cool:*", app.resources.redis_prefix))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(keys.is_empty(), "{keys:?}");
    }
}

both!(a_spent_client_auth_budget_refuses_even_the_right_secret, &[]);
async fn a_spent_client_auth_budget_refuses_even_the_right_secret(app: TestApp) {
    let (id, secret) =
        latchkey::service::clients::create(&app.state.db, "billing", app.clock.now()).await.unwrap();
    let introspect = |secret: String| {
        let req = app
            .client
            .post(app.url("/oauth/introspect"))
            .basic_auth(id.clone(), Some(secret))
            .form(&[("token", "t")]);
        async move { req.send().await.unwrap() }
    };
    assert_eq!(introspect(secret.clone()).await.status(), StatusCode::OK);
    // Guessing: ten wrong secrets spend the address's budget of failures.
    for _ in 0..10 {
        assert_problem(introspect("guess".into()).await, StatusCode::UNAUTHORIZED, "invalid_client").await;
    }
    assert_limited(introspect("guess".into()).await).await;
    // A guess that happens to be right is refused too while the budget is spent: the refusal
    // comes before the comparison, so it tells nothing about the secret.
    assert_limited(introspect(secret.clone()).await).await;
    app.clock.advance(Duration::from_secs(6));
    assert_eq!(introspect(secret).await.status(), StatusCode::OK);
}
