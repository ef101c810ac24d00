use sea_orm::entity::prelude::*;

/// A user's TOTP factor (see `crate::service::mfa`). `secret` is sealed under the KEK when
/// `secret_encryption` names a format; active once `confirmed_at` is set; `last_step` is
/// the last time step accepted, so no code is accepted twice. `Debug` hides the secret.
#[derive(Clone, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "totp_factors")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub user_id: Uuid,
    pub secret: Vec<u8>,
    pub secret_encryption: Option<String>,
    pub confirmed_at: Option<DateTimeUtc>,
    pub last_step: Option<i64>,
    pub created_at: DateTimeUtc,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("totp_factor::Model")
            .field("user_id", &self.user_id)
            .field("secret", &"***")
            .field("secret_encryption", &self.secret_encryption)
            .field("confirmed_at", &self.confirmed_at)
            .field("last_step", &self.last_step)
            .finish_non_exhaustive()
    }
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
