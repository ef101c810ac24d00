//! What MySQL/MariaDB would do differently from PostgreSQL if the schema let it: the shared
//! flows run on MariaDB through the `both!` macros of the other modules; these check the
//! column types and comparisons under them.

use chrono::{DateTime, TimeZone as _, Utc};
use reqwest::StatusCode;
use sea_orm::{ConnectionTrait, DbBackend, Statement, Value};

use crate::helpers::{Backend, PASSWORD, Store, TestApp};

async fn count(app: &TestApp, sql: &str, values: Vec<Value>) -> i64 {
    let row = app
        .state
        .db
        .query_one_raw(Statement::from_sql_and_values(DbBackend::MySql, sql, values))
        .await
        .unwrap()
        .unwrap();
    row.try_get_by_index::<i64>(0).unwrap()
}

#[tokio::test]
async fn mariadb_timestamps_keep_microseconds_and_dates_after_2038() {
    let app = TestApp::spawn(Backend::MariaDb, Store::InProcess).await;
    let timestamps = count(
        &app,
        "SELECT COUNT(*) FROM information_schema.COLUMNS \
         WHERE TABLE_SCHEMA = DATABASE() AND DATA_TYPE = 'timestamp'",
        vec![],
    )
    .await;
    assert_eq!(timestamps, 0, "MySQL's timestamp stops at 2038 and drops the microseconds");

    let db = &app.state.db;
    // What the server binds: microseconds survive. (sqlx binds a `DateTime<Utc>` as a
    // TIMESTAMP parameter, which MariaDB turns into NULL after 2038-01-19 whatever the
    // column; the server writes times near now, so only the column's own range is
    // checked past that, below.)
    let at: DateTime<Utc> =
        Utc.with_ymd_and_hms(2037, 12, 31, 23, 59, 59).unwrap() + chrono::Duration::microseconds(123_456);
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::MySql,
        "INSERT INTO oauth_clients (client_id, name, secret_hash, created_at) VALUES ('bound', 'b', 'x', ?)",
        [at.into()],
    ))
    .await
    .unwrap();
    db.execute_unprepared(
        "INSERT INTO oauth_clients (client_id, name, secret_hash, created_at) \
         VALUES ('late', 'l', 'x', '2040-02-29 12:00:00.123456')",
    )
    .await
    .unwrap();
    let read = |client: &'static str| async move {
        let row = db
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                "SELECT created_at AS t FROM oauth_clients WHERE client_id = ?",
                [client.into()],
            ))
            .await
            .unwrap()
            .unwrap();
        row.try_get::<Option<DateTime<Utc>>>("", "t").unwrap()
    };
    assert_eq!(read("bound").await, Some(at));
    let late = Utc.with_ymd_and_hms(2040, 2, 29, 12, 0, 0).unwrap() + chrono::Duration::microseconds(123_456);
    assert_eq!(read("late").await, Some(late));
}

#[tokio::test]
async fn mariadb_text_compares_byte_for_byte_like_postgres() {
    let app = TestApp::spawn(Backend::MariaDb, Store::InProcess).await;
    assert_eq!(app.register("alice@example.com", PASSWORD).await.status(), StatusCode::CREATED);
    let same = |email: &str| {
        let email = email.to_owned();
        let app = &app;
        async move { count(app, "SELECT COUNT(*) FROM users WHERE email = ?", vec![email.into()]).await }
    };
    assert_eq!(same("alice@example.com").await, 1);
    for other in ["alice@example.com ", "Alice@example.com", "ALICE@EXAMPLE.COM"] {
        assert_eq!(same(other).await, 0, "{other:?} is another address, as on PostgreSQL");
    }
    // Nor do they collide in the unique index.
    let db = &app.state.db;
    for other in ["alice@example.com ", "Alice@example.com"] {
        db.execute_raw(Statement::from_sql_and_values(
            DbBackend::MySql,
            "INSERT INTO users (id, email, password_hash, is_verified, created_at, updated_at) \
             VALUES (?, ?, 'x', FALSE, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))",
            [uuid::Uuid::now_v7().into(), other.into()],
        ))
        .await
        .unwrap_or_else(|e| panic!("{other:?}: {e}"));
    }
    assert_eq!(count(&app, "SELECT COUNT(*) FROM users", vec![]).await, 3);
}

#[tokio::test]
async fn mariadb_secrets_keep_every_byte() {
    // `binary` would be binary(1) on MySQL: a sealed secret cut to one byte. The device
    // secret is written at start; a second start must read the same one back intact.
    let app = TestApp::spawn(Backend::MariaDb, Store::InProcess).await;
    let shortest = count(&app, "SELECT MIN(LENGTH(secret)) FROM server_secrets", vec![]).await;
    assert!(shortest >= 32, "secret stored with {shortest} bytes");
    let resources = app.resources.clone();
    app.stop().await;
    let again = TestApp::spawn_on(resources, &[]).await;
    assert_eq!(again.get("/ready", None).await.status(), StatusCode::OK);
}
