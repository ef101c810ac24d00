//! The command line: `latchkey [serve]`, `latchkey migrate …`, `latchkey openapi`.

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use migration::{Migrator, MigratorTrait as _};

use crate::config::Config;
use crate::store::db;

#[derive(Debug, Parser)]
#[command(name = "latchkey", version, about = "A single-binary JWT auth server")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (the default).
    Serve,
    /// Manage the database schema.
    Migrate {
        #[command(subcommand)]
        action: MigrateAction,
    },
    /// Print the OpenAPI document the server generates.
    Openapi,
}

#[derive(Debug, Subcommand)]
pub enum MigrateAction {
    /// Apply every pending migration.
    Up,
    /// Roll back the last applied migration.
    Down,
    /// List migrations and whether each is applied.
    Status,
    /// Drop every table and apply all migrations again. Destroys all data.
    Fresh {
        /// Confirm that all data may be destroyed.
        #[arg(long)]
        yes: bool,
    },
}

pub async fn migrate(config: &Config, action: MigrateAction) -> anyhow::Result<()> {
    if let MigrateAction::Fresh { yes: false } = action {
        bail!("`migrate fresh` drops every table and all data; run it again with --yes to confirm");
    }
    let conn = db::connect_with(config, 1).await.context("connecting to the database (DATABASE_URL)")?;
    match action {
        MigrateAction::Up => {
            db::migrate_and_prepare(config, &conn, chrono::Utc::now()).await?;
            println!("migrations applied");
        }
        MigrateAction::Down => {
            Migrator::down(&conn, Some(1)).await?;
            println!("rolled back the last migration");
        }
        MigrateAction::Status => {
            for m in Migrator::get_migration_with_status(&conn).await? {
                println!("{:<8} {}", format!("{:?}", m.status()).to_lowercase(), m.name());
            }
        }
        MigrateAction::Fresh { .. } => {
            Migrator::fresh(&conn).await?;
            println!("database recreated");
        }
    }
    conn.close().await?;
    Ok(())
}
