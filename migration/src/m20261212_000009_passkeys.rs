//! Passkeys (issue 16): WebAuthn credentials, many per user. `credential_id` is the
//! credential's id in base64url (unique: one authenticator credential belongs to one
//! account); `passkey` is webauthn-rs's serialised `Passkey` (public key, counter, flags);
//! `sign_count` repeats its counter so a use can advance it by compare-and-swap.

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
                    .table(Passkeys::Table)
                    .col(pk_uuid(Passkeys::Id))
                    .col(uuid(Passkeys::UserId))
                    .col(string_len(Passkeys::Name, 64))
                    .col(dialect.ascii_uniq(Passkeys::CredentialId, 1400))
                    .col(text(Passkeys::Passkey))
                    .col(big_integer(Passkeys::SignCount).default(0))
                    .col(boolean(Passkeys::BackupEligible).default(false))
                    .col(boolean(Passkeys::BackupState).default(false))
                    .col(dialect.timestamp(Passkeys::CreatedAt))
                    .col(dialect.timestamp_null(Passkeys::LastUsedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_passkeys_user")
                            .from(Passkeys::Table, Passkeys::UserId)
                            .to(Users::Table, Users::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_passkeys_user")
                    .table(Passkeys::Table)
                    .col(Passkeys::UserId)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(Passkeys::Table).if_exists().to_owned()).await
    }
}

#[derive(DeriveIden)]
enum Users {
    Table,
    Id,
}

#[derive(DeriveIden)]
enum Passkeys {
    Table,
    Id,
    UserId,
    Name,
    CredentialId,
    Passkey,
    SignCount,
    BackupEligible,
    BackupState,
    CreatedAt,
    LastUsedAt,
}
