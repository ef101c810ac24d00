//! Secrets every instance shares and no one configures: the key that signs device tokens
//! (issue 14). Sealed under KEY_ENCRYPTION_KEY like the signing keys.

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
                    .table(ServerSecrets::Table)
                    .col(string(ServerSecrets::Name).primary_key())
                    .col(dialect.bytes(ServerSecrets::Secret))
                    .col(string_null(ServerSecrets::SecretEncryption))
                    .col(dialect.timestamp(ServerSecrets::CreatedAt))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(ServerSecrets::Table).if_exists().to_owned()).await
    }
}

#[derive(DeriveIden)]
enum ServerSecrets {
    Table,
    Name,
    Secret,
    SecretEncryption,
    CreatedAt,
}
