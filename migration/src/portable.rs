//! Column types and table options that differ on MySQL/MariaDB.
//!
//! On PostgreSQL and SQLite every helper here makes exactly what sea-orm's schema helpers
//! make: deployments have already run these migrations, and their schema must not change.
//! On MySQL those helpers would lose behaviour the server relies on, so they are replaced:
//!
//! - `timestamp with time zone` becomes MySQL's `timestamp`: whole seconds, nothing after
//!   2038 (a later value is stored as NULL, or as the current time in a NOT NULL column).
//!   `datetime(6)` keeps microseconds and any year; sqlx writes and reads it in UTC.
//! - `binary` becomes `binary(1)`: secrets would be cut to one byte. `blob` holds any length.
//! - The default collation is case-insensitive and pads with spaces, so `'Alice@x.com'` and
//!   `'alice@x.com '` would collide in a unique index and match each other in a lookup.
//!   Every table takes a binary, no-pad collation, so text compares byte for byte as it does
//!   on PostgreSQL: `utf8mb4_0900_bin` on MySQL 8, `utf8mb4_nopad_bin` on MariaDB (neither
//!   server knows the other's name, so the one the server has is used).

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend, Statement};

/// What one migration needs to know about the backend it runs on.
pub(crate) struct Dialect {
    /// The no-pad binary collation, on MySQL/MariaDB only.
    mysql_collation: Option<String>,
}

impl Dialect {
    pub(crate) async fn of(manager: &SchemaManager<'_>) -> Result<Self, DbErr> {
        if manager.get_database_backend() != DbBackend::MySql {
            return Ok(Self { mysql_collation: None });
        }
        let found = manager
            .get_connection()
            .query_one_raw(Statement::from_string(
                DbBackend::MySql,
                "SELECT COLLATION_NAME AS name FROM information_schema.COLLATIONS \
                 WHERE COLLATION_NAME IN ('utf8mb4_0900_bin', 'utf8mb4_nopad_bin') \
                 ORDER BY COLLATION_NAME LIMIT 1",
            ))
            .await?
            .ok_or_else(|| {
                DbErr::Migration(
                    "this MySQL server has neither utf8mb4_0900_bin nor utf8mb4_nopad_bin \
                     (MySQL 8 or MariaDB 10.11+ is needed)"
                        .into(),
                )
            })?;
        Ok(Self { mysql_collation: Some(found.try_get::<String>("", "name")?) })
    }

    fn is_mysql(&self) -> bool {
        self.mysql_collation.is_some()
    }

    /// `timestamp with time zone NOT NULL`; `datetime(6)` on MySQL.
    pub(crate) fn timestamp<T: IntoIden>(&self, col: T) -> ColumnDef {
        if self.is_mysql() {
            ColumnDef::new(col).custom(Alias::new("datetime(6)")).not_null().take()
        } else {
            schema::timestamp_with_time_zone(col)
        }
    }

    /// `timestamp with time zone NULL`; `datetime(6)` on MySQL.
    pub(crate) fn timestamp_null<T: IntoIden>(&self, col: T) -> ColumnDef {
        if self.is_mysql() {
            ColumnDef::new(col).custom(Alias::new("datetime(6)")).null().take()
        } else {
            schema::timestamp_with_time_zone_null(col)
        }
    }

    /// Bytes of any length, NOT NULL (`binary` elsewhere, which is `bytea` on PostgreSQL).
    pub(crate) fn bytes<T: IntoIden>(&self, col: T) -> ColumnDef {
        if self.is_mysql() { schema::blob(col) } else { schema::binary(col) }
    }

    /// A unique ASCII string of up to `len` characters. utf8mb4 counts four bytes a
    /// character against MySQL's 3072-byte index limit; ASCII (base64url here) one.
    /// `ascii_bin` pads with spaces, which base64url never holds.
    pub(crate) fn ascii_uniq<T: IntoIden>(&self, col: T, len: u32) -> ColumnDef {
        if self.is_mysql() {
            ColumnDef::new(col)
                .custom(Alias::new(format!("varchar({len}) CHARACTER SET ascii COLLATE ascii_bin")))
                .not_null()
                .unique_key()
                .take()
        } else {
            schema::string_len_uniq(col, len)
        }
    }
}

/// Table options per backend: on MySQL, a collation under which text columns compare byte
/// for byte (see the module docs); nothing elsewhere.
pub(crate) trait ForBackend {
    fn for_backend(&mut self, dialect: &Dialect) -> &mut Self;
}

impl ForBackend for TableCreateStatement {
    fn for_backend(&mut self, dialect: &Dialect) -> &mut Self {
        if let Some(collation) = &dialect.mysql_collation {
            self.character_set("utf8mb4").collate(collation);
        }
        self
    }
}
