//! Where a session's login came from (issue 15): `sessions.location`, a label such as
//! "Berlin, DE" looked up in `GEOIP_DATABASE` at login; null without a database or for an
//! address it does not know.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter().table(Sessions::Table).add_column(string_null(Sessions::Location)).to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(Table::alter().table(Sessions::Table).drop_column(Sessions::Location).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Sessions {
    Table,
    Location,
}
