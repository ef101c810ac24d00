//! Revocation that nothing can undo (issue 13): a session ended in SQL carries
//! `revocation_pending` until the revocation store has its tombstone, so a store write that
//! failed (or a process that died between the commit and the store) is finished by the
//! reconciler; and the session list pages by (user, last use) with an index.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Sessions::Table)
                    .add_column(boolean(Sessions::RevocationPending).default(false))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_sessions_revocation_pending")
                    .table(Sessions::Table)
                    .col(Sessions::RevocationPending)
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
        manager
            .drop_index(
                Index::drop().name("idx_sessions_revocation_pending").table(Sessions::Table).to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter().table(Sessions::Table).drop_column(Sessions::RevocationPending).to_owned(),
            )
            .await
    }
}

#[derive(DeriveIden)]
enum Sessions {
    Table,
    UserId,
    Id,
    LastUsedAt,
    RevocationPending,
}
