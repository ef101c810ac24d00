//! The command line: `latchkey [serve]`, `latchkey migrate …`, `latchkey openapi`.

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use migration::{Migrator, MigratorTrait as _};

use std::io::{BufRead as _, IsTerminal as _};

use crate::config::Config;
use crate::domain::{Email, Password};
use crate::password::PasswordHasher;
use crate::service::users;
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
    /// Manage accounts.
    User {
        #[command(subcommand)]
        action: UserAction,
    },
    /// Manage signing keys.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Manage OAuth clients (for introspection).
    Client {
        #[command(subcommand)]
        action: ClientAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysAction {
    /// List keys: kid, algorithm, state, activation and retirement.
    List,
    /// Make sure a signing key of JWT_ALGORITHM exists (first start does this too).
    Generate,
    /// Publish a new key now; it signs after KEY_PREPUBLISH, and the current one retires
    /// once its last token has expired.
    Rotate,
}

#[derive(Debug, Subcommand)]
pub enum ClientAction {
    /// Register a confidential client; prints its id and secret once, as JSON.
    Create {
        #[arg(long)]
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum UserAction {
    /// Create an account. The password is read from LATCHKEY_PASSWORD when set, else
    /// from one line on standard input (a prompt, asked twice, when it is a terminal);
    /// never from the command line.
    Create {
        #[arg(long)]
        email: String,
        /// A role to grant, e.g. admin; repeat for several.
        #[arg(long = "role")]
        roles: Vec<String>,
    },
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

pub async fn user(config: &Config, action: UserAction) -> anyhow::Result<()> {
    let UserAction::Create { email, roles } = action;
    let email = Email::parse(&email)?;
    let password = Password::new(read_password()?)?;
    password.judge(&email, config.password_min_strength)?;
    let conn = db::connect_with(config, 1).await.context("connecting to the database (DATABASE_URL)")?;
    let now = chrono::Utc::now();
    db::migrate_and_prepare(config, &conn, now).await?;
    let hasher = PasswordHasher::start(1, 1)?;
    let hash = hasher.hash(password).await?;
    let created =
        users::insert_user(&conn, &email, hash, now).await.map_err(|e| anyhow::anyhow!("{}", e.detail))?;
    for role in &roles {
        users::grant_role(&conn, email.as_str(), role, now)
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.detail))?;
    }
    conn.close().await?;
    let printed = serde_json::json!({"id": created.id, "email": created.email, "roles": roles});
    println!("{printed}");
    Ok(())
}

fn read_password() -> anyhow::Result<String> {
    if let Ok(password) = std::env::var("LATCHKEY_PASSWORD") {
        return Ok(password);
    }
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        let first = rpassword::prompt_password("Password: ")?;
        let second = rpassword::prompt_password("Repeat the password: ")?;
        if first != second {
            bail!("the passwords differ");
        }
        return Ok(first);
    }
    let mut line = String::new();
    stdin.lock().read_line(&mut line).context("reading the password from standard input")?;
    let password = line.strip_suffix('\n').unwrap_or(&line);
    Ok(password.strip_suffix('\r').unwrap_or(password).to_owned())
}

pub async fn keys(config: &Config, action: KeysAction) -> anyhow::Result<()> {
    let conn = db::connect_with(config, 1).await.context("connecting to the database (DATABASE_URL)")?;
    let now = chrono::Utc::now();
    db::migrate_and_prepare(config, &conn, now).await?;
    match action {
        KeysAction::List => {
            use sea_orm::{EntityTrait as _, QueryOrder as _};
            let rows = crate::store::entity::signing_key::Entity::find()
                .order_by_asc(crate::store::entity::signing_key::Column::CreatedAt)
                .all(&conn)
                .await?;
            println!(
                "{:<44} {:<6} {:<9} {:<25} {:<25} sealed",
                "kid", "alg", "state", "activates_at", "retires_at"
            );
            for k in rows {
                let state = match (k.activates_at <= now, k.retires_at) {
                    (_, Some(r)) if r <= now => "retired",
                    (false, _) => "pending",
                    (true, Some(_)) => "retiring",
                    (true, None) => "active",
                };
                let retires = k.retires_at.map_or_else(|| "-".to_owned(), |r| r.to_rfc3339());
                let sealed = if k.private_key_encryption.is_some() { "yes" } else { "no" };
                println!(
                    "{:<44} {:<6} {:<9} {:<25} {:<25} {sealed}",
                    k.kid,
                    k.algorithm,
                    state,
                    k.activates_at.to_rfc3339(),
                    retires
                );
            }
        }
        KeysAction::Generate => {
            println!("a signing key of {} exists", crate::keys::algorithm_name(config.jwt_algorithm))
        }
        KeysAction::Rotate => {
            db::rotate_if_due(config, &conn, now, std::time::Duration::ZERO).await?;
            use sea_orm::{EntityTrait as _, QueryOrder as _};
            let newest = crate::store::entity::signing_key::Entity::find()
                .order_by_desc(crate::store::entity::signing_key::Column::CreatedAt)
                .one(&conn)
                .await?
                .context("no key after rotation")?;
            let printed = serde_json::json!({
                "kid": newest.kid,
                "algorithm": newest.algorithm,
                "activates_at": newest.activates_at.to_rfc3339(),
            });
            println!("{printed}");
        }
    }
    conn.close().await?;
    Ok(())
}

pub async fn client(config: &Config, action: ClientAction) -> anyhow::Result<()> {
    let ClientAction::Create { name } = action;
    let conn = db::connect_with(config, 1).await.context("connecting to the database (DATABASE_URL)")?;
    let now = chrono::Utc::now();
    db::migrate_and_prepare(config, &conn, now).await?;
    let (client_id, client_secret) = crate::service::clients::create(&conn, &name, now)
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.detail))?;
    conn.close().await?;
    println!("{}", serde_json::json!({"client_id": client_id, "client_secret": client_secret}));
    Ok(())
}
