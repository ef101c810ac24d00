//! The mail outbox (issue 15): a mail is a row, written in the same transaction as what
//! caused it, and sent by background workers that lease due rows. `next_attempt_at` is
//! also the lease's end while a row is `sending`, so one index finds every row a worker
//! may take: queued and due, or sending with an expired lease.

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
                    .table(EmailOutbox::Table)
                    .col(pk_uuid(EmailOutbox::Id))
                    .col(string(EmailOutbox::Recipient))
                    .col(string(EmailOutbox::Template))
                    .col(text(EmailOutbox::Subject))
                    .col(text(EmailOutbox::TextBody))
                    .col(text(EmailOutbox::HtmlBody))
                    // queued | sending | sent | abandoned
                    .col(string(EmailOutbox::Status))
                    .col(integer(EmailOutbox::Attempts).default(0))
                    .col(dialect.timestamp(EmailOutbox::NextAttemptAt))
                    .col(dialect.timestamp_null(EmailOutbox::LeaseUntil))
                    .col(text_null(EmailOutbox::LastError))
                    .col(dialect.timestamp(EmailOutbox::CreatedAt))
                    .col(dialect.timestamp_null(EmailOutbox::SentAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_email_outbox_status_next_attempt")
                    .table(EmailOutbox::Table)
                    .col(EmailOutbox::Status)
                    .col(EmailOutbox::NextAttemptAt)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(EmailOutbox::Table).if_exists().to_owned()).await
    }
}

#[derive(DeriveIden)]
enum EmailOutbox {
    Table,
    Id,
    Recipient,
    Template,
    Subject,
    TextBody,
    HtmlBody,
    Status,
    Attempts,
    NextAttemptAt,
    LeaseUntil,
    LastError,
    CreatedAt,
    SentAt,
}
