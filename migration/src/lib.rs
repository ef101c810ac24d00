//! Latchkey's schema, as sea-orm migrations that run the same on PostgreSQL, SQLite and
//! MySQL/MariaDB (the few column types MySQL needs differently are in `portable`).
//!
//! The server applies pending migrations at start (under a start-up lock, see
//! `latchkey::store::db`); `latchkey migrate up|down|status|fresh` drives them by hand.

pub use sea_orm_migration::prelude::*;

mod portable;

mod m20261124_000001_initial;
mod m20261124_000002_oauth_clients;
mod m20261201_000003_revocation;
mod m20261201_000004_server_secrets;
mod m20261210_000005_email_outbox;
mod m20261211_000006_accounts;
mod m20261211_000007_session_location;
mod m20261212_000008_mfa;
mod m20261212_000009_passkeys;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261124_000001_initial::Migration),
            Box::new(m20261124_000002_oauth_clients::Migration),
            Box::new(m20261201_000003_revocation::Migration),
            Box::new(m20261201_000004_server_secrets::Migration),
            Box::new(m20261210_000005_email_outbox::Migration),
            Box::new(m20261211_000006_accounts::Migration),
            Box::new(m20261211_000007_session_location::Migration),
            Box::new(m20261212_000008_mfa::Migration),
            Box::new(m20261212_000009_passkeys::Migration),
        ]
    }
}
