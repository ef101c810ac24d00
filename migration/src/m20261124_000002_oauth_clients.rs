//! Confidential clients that may call the introspection endpoint.

use sea_orm_migration::{prelude::*, schema::*};

use crate::portable::{Dialect, ForBackend as _};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let dialect = Dialect::of(manager).await?;
        manager
            .create_table(
                Table::create()
                    .for_backend(&dialect)
                    .table(OauthClients::Table)
                    .col(string(OauthClients::ClientId).primary_key())
                    .col(string(OauthClients::Name))
                    // SHA-256 of the secret (the secret is 256 random bits, so a fast hash
                    // is enough; argon2 would only slow every introspection down).
                    .col(string(OauthClients::SecretHash))
                    .col(dialect.timestamp(OauthClients::CreatedAt))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(OauthClients::Table).if_exists().to_owned()).await
    }
}

#[derive(DeriveIden)]
enum OauthClients {
    Table,
    ClientId,
    Name,
    SecretHash,
    CreatedAt,
}
