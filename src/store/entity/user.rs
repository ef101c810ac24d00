use sea_orm::entity::prelude::*;

/// `Debug` shows no password hash.
#[derive(Clone, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "users")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    #[sea_orm(unique)]
    pub email: String,
    pub password_hash: String,
    pub is_verified: bool,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
    pub last_login_at: Option<DateTimeUtc>,
    /// When the current `email` was proven to be the user's (a verification or
    /// email-change link used); an email change sets it anew.
    pub email_verified_at: Option<DateTimeUtc>,
    /// A disabled user cannot log in and has no sessions.
    pub disabled_at: Option<DateTimeUtc>,
    /// The user has a second factor (a confirmed TOTP or a passkey): login asks for it.
    pub mfa_enabled: bool,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(has_many = "super::user_role::Entity")]
    UserRoles,
}

impl Related<super::user_role::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::UserRoles.def()
    }
}

/// Users and their roles, through `user_roles`: one query with joins.
impl Related<super::role::Entity> for Entity {
    fn to() -> RelationDef {
        super::user_role::Relation::Role.def()
    }

    fn via() -> Option<RelationDef> {
        Some(super::user_role::Relation::User.def().rev())
    }
}

impl ActiveModelBehavior for ActiveModel {}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("user::Model")
            .field("id", &self.id)
            .field("email", &self.email)
            .field("password_hash", &"***")
            .field("created_at", &self.created_at)
            .field("last_login_at", &self.last_login_at)
            .field("email_verified_at", &self.email_verified_at)
            .field("disabled_at", &self.disabled_at)
            .field("mfa_enabled", &self.mfa_enabled)
            .finish_non_exhaustive()
    }
}
