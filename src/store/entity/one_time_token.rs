use sea_orm::entity::prelude::*;

/// A mailed one-time link's token (see `crate::service::accounts`): only its SHA-256 is
/// here. `email` is the address it was mailed to; `used_at` is set once, by a
/// compare-and-swap, when it is used or when a newer token of its purpose replaces it.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "one_time_tokens")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub purpose: String,
    pub user_id: Uuid,
    pub email: String,
    #[sea_orm(unique)]
    pub token_hash: String,
    pub session_id: Option<Uuid>,
    pub created_at: DateTimeUtc,
    pub expires_at: DateTimeUtc,
    pub used_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
