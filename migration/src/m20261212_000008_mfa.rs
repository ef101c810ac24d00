//! Second factors (issue 16): a session remembers how its login was authenticated (`amr`,
//! RFC 8176) and when (`auth_time`), so refreshes keep both; a user's TOTP factor (its
//! secret sealed when a key-encryption key is set, and the last time step accepted, so no
//! code works twice); and recovery codes, stored as hashes, each used once.

use sea_orm_migration::{prelude::*, schema::*};

use crate::portable::{Dialect, ForBackend as _};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let dialect = Dialect::of(manager).await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Sessions::Table)
                    .add_column(string(Sessions::Amr).default("pwd"))
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Sessions::Table)
                    .add_column(dialect.timestamp_null(Sessions::AuthTime))
                    .to_owned(),
            )
            .await?;
        manager.get_connection().execute_unprepared("UPDATE sessions SET auth_time = created_at").await?;
        // Whether login asks for a second factor: kept by the code that adds and removes
        // factors, so a login reads it with the account it already reads.
        manager
            .alter_table(
                Table::alter()
                    .table(Users::Table)
                    .add_column(boolean(Users::MfaEnabled).default(false))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .for_backend(&dialect)
                    .table(TotpFactors::Table)
                    .col(uuid(TotpFactors::UserId).primary_key())
                    .col(dialect.bytes(TotpFactors::Secret))
                    // NULL: in the clear (no key-encryption key); else the sealing format.
                    .col(string_null(TotpFactors::SecretEncryption))
                    .col(dialect.timestamp_null(TotpFactors::ConfirmedAt))
                    .col(big_integer_null(TotpFactors::LastStep))
                    .col(dialect.timestamp(TotpFactors::CreatedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_totp_factors_user")
                            .from(TotpFactors::Table, TotpFactors::UserId)
                            .to(Users::Table, Users::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .for_backend(&dialect)
                    .table(RecoveryCodes::Table)
                    .col(pk_uuid(RecoveryCodes::Id))
                    .col(uuid(RecoveryCodes::UserId))
                    .col(string_len(RecoveryCodes::CodeHash, 64))
                    .col(dialect.timestamp_null(RecoveryCodes::UsedAt))
                    .col(dialect.timestamp(RecoveryCodes::CreatedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_recovery_codes_user")
                            .from(RecoveryCodes::Table, RecoveryCodes::UserId)
                            .to(Users::Table, Users::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_recovery_codes_user")
                    .table(RecoveryCodes::Table)
                    .col(RecoveryCodes::UserId)
                    .col(RecoveryCodes::CodeHash)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(RecoveryCodes::Table).if_exists().to_owned()).await?;
        manager.drop_table(Table::drop().table(TotpFactors::Table).if_exists().to_owned()).await?;
        manager
            .alter_table(Table::alter().table(Users::Table).drop_column(Users::MfaEnabled).to_owned())
            .await?;
        manager
            .alter_table(Table::alter().table(Sessions::Table).drop_column(Sessions::AuthTime).to_owned())
            .await?;
        manager.alter_table(Table::alter().table(Sessions::Table).drop_column(Sessions::Amr).to_owned()).await
    }
}

#[derive(DeriveIden)]
enum Users {
    Table,
    Id,
    MfaEnabled,
}

#[derive(DeriveIden)]
enum Sessions {
    Table,
    Amr,
    AuthTime,
}

#[derive(DeriveIden)]
enum TotpFactors {
    Table,
    UserId,
    Secret,
    SecretEncryption,
    ConfirmedAt,
    LastStep,
    CreatedAt,
}

#[derive(DeriveIden)]
enum RecoveryCodes {
    Table,
    Id,
    UserId,
    CodeHash,
    UsedAt,
    CreatedAt,
}
