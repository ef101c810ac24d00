//! Revocation that nothing can undo (issue 13): every end of sessions writes a
//! `revocation_jobs` row in the same transaction; it is deleted once the revocation store
//! has the tombstones, so a store write that failed (or a process that died between the
//! commit and the store) is finished by the reconciler. And the session list pages by
//! (user, last use, id) with an index.

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
                    .table(RevocationJobs::Table)
                    .col(pk_uuid(RevocationJobs::Id))
                    // One of the two: every session of this user ended at or after
                    // `created_at`, or this one session.
                    .col(uuid_null(RevocationJobs::UserId))
                    .col(uuid_null(RevocationJobs::SessionId))
                    .col(dialect.timestamp(RevocationJobs::CreatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_sessions_user_last_used")
                    .table(Sessions::Table)
                    .col(Sessions::UserId)
                    .col(Sessions::LastUsedAt)
                    .col(Sessions::Id)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(Index::drop().name("idx_sessions_user_last_used").table(Sessions::Table).to_owned())
            .await?;
        manager.drop_table(Table::drop().table(RevocationJobs::Table).if_exists().to_owned()).await
    }
}

#[derive(DeriveIden)]
enum RevocationJobs {
    Table,
    Id,
    UserId,
    SessionId,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Sessions {
    Table,
    UserId,
    Id,
    LastUsedAt,
}
