//! Accounts over email (issue 15): one-time tokens (verification, password reset, email
//! change), each stored as a hash, bound to its purpose, its user and the address it was
//! mailed to; and `users` gains when its email was verified and when it was disabled.

use sea_orm_migration::{prelude::*, schema::*};

use crate::portable::{Dialect, ForBackend as _};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let dialect = Dialect::of(manager).await?;
        // One column per statement: SQLite alters one column at a time.
        manager
            .alter_table(
                Table::alter()
                    .table(Users::Table)
                    .add_column(dialect.timestamp_null(Users::EmailVerifiedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Users::Table)
                    .add_column(dialect.timestamp_null(Users::DisabledAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .for_backend(&dialect)
                    .table(OneTimeTokens::Table)
                    .col(pk_uuid(OneTimeTokens::Id))
                    // verify_email | reset_password | confirm_email
                    .col(string_len(OneTimeTokens::Purpose, 32))
                    .col(uuid(OneTimeTokens::UserId))
                    // The address the link was mailed to (for confirm_email: the new one).
                    .col(string(OneTimeTokens::Email))
                    // SHA-256 of the token, hex: the token itself is only in the mail.
                    .col(string_len_uniq(OneTimeTokens::TokenHash, 64))
                    // confirm_email: the session that asked, which the change leaves signed in.
                    .col(uuid_null(OneTimeTokens::SessionId))
                    .col(dialect.timestamp(OneTimeTokens::CreatedAt))
                    .col(dialect.timestamp(OneTimeTokens::ExpiresAt))
                    .col(dialect.timestamp_null(OneTimeTokens::UsedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_one_time_tokens_user")
                            .from(OneTimeTokens::Table, OneTimeTokens::UserId)
                            .to(Users::Table, Users::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_one_time_tokens_user_purpose")
                    .table(OneTimeTokens::Table)
                    .col(OneTimeTokens::UserId)
                    .col(OneTimeTokens::Purpose)
                    .to_owned(),
            )
            .await?;
        // Accounts that were verified before this column existed keep their state.
        let db = manager.get_connection();
        db.execute_unprepared("UPDATE users SET email_verified_at = updated_at WHERE is_verified = TRUE")
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(OneTimeTokens::Table).if_exists().to_owned()).await?;
        manager
            .alter_table(Table::alter().table(Users::Table).drop_column(Users::DisabledAt).to_owned())
            .await?;
        manager
            .alter_table(Table::alter().table(Users::Table).drop_column(Users::EmailVerifiedAt).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Users {
    Table,
    Id,
    EmailVerifiedAt,
    DisabledAt,
}

#[derive(DeriveIden)]
enum OneTimeTokens {
    Table,
    Id,
    Purpose,
    UserId,
    Email,
    TokenHash,
    SessionId,
    CreatedAt,
    ExpiresAt,
    UsedAt,
}
