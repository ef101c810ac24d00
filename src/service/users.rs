//! Accounts and roles: reading profiles (for `/v1/users/me`), the CLI's `user create`, and role changes.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::IntoCondition;
use sea_orm::{
    ActiveModelTrait as _, ColumnTrait as _, ConnectionTrait, EntityTrait as _, QueryFilter as _, Set, SqlErr,
};
use uuid::Uuid;

use crate::domain::Email;
use crate::error::{ApiError, ErrorCode};
use crate::store::entity::{role, user, user_role};

/// An account and its role names, sorted.
pub type Profile = (user::Model, Vec<String>);

/// The most ids one profile query asks for.
pub const PROFILE_BATCH: usize = 32;

/// The accounts among `ids` (at most [`PROFILE_BATCH`]) with their roles, in one query: the
/// users joined with their roles. The id list is padded to a power of two by repeating an
/// id, so the statement cache of each pooled PostgreSQL connection holds at most six
/// shapes of this query instead of one per batch size.
pub async fn profiles(
    db: &impl ConnectionTrait,
    mut ids: Vec<Uuid>,
) -> Result<HashMap<Uuid, Profile>, ApiError> {
    if let Some(&last) = ids.last() {
        ids.resize(ids.len().next_power_of_two(), last);
    }
    let profiles = with_roles(db, user::Column::Id.is_in(ids)).await?;
    Ok(profiles.into_iter().map(|profile| (profile.0.id, profile)).collect())
}

/// PostgreSQL: the accounts among `ids` with their roles, as [`profiles`] reads them, on
/// one given connection (a kept one, see `store::held`) and with one statement shape
/// whatever the number of ids (`= ANY($1)`). The rows are decoded by the entity.
pub async fn profiles_on(
    conn: &mut sea_orm::sqlx::PgConnection,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, Profile>, sea_orm::sqlx::Error> {
    use sea_orm::sqlx::Row as _;
    use sea_orm::{FromQueryResult as _, QueryResult};
    const SQL: &str = "SELECT u.*, r.name AS role_name FROM users u \
        LEFT JOIN user_roles ur ON ur.user_id = u.id LEFT JOIN roles r ON r.id = ur.role_id \
        WHERE u.id = ANY($1)";
    let rows = sea_orm::sqlx::query(SQL).bind(ids).fetch_all(conn).await?;
    let mut profiles: HashMap<Uuid, Profile> = HashMap::with_capacity(ids.len());
    for row in rows {
        let role: Option<String> = row.try_get("role_name")?;
        let id: Uuid = row.try_get("id")?;
        let profile = match profiles.entry(id) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => {
                let account = user::Model::from_query_result(&QueryResult::from(row), "")
                    .map_err(|e| sea_orm::sqlx::Error::Decode(e.to_string().into()))?;
                entry.insert((account, Vec::new()))
            }
        };
        profile.1.extend(role);
    }
    for (_, roles) in profiles.values_mut() {
        roles.sort();
    }
    Ok(profiles)
}

/// The account with this (normalised) email and its roles, in one query: what a login
/// verifies the password against and puts in the access token.
pub async fn profile_by_email(db: &impl ConnectionTrait, email: &Email) -> Result<Option<Profile>, ApiError> {
    Ok(with_roles(db, user::Column::Email.eq(email.as_str())).await?.into_iter().next())
}

/// The account with this id and its roles, in one query.
pub async fn profile_by_id(db: &impl ConnectionTrait, id: Uuid) -> Result<Option<Profile>, ApiError> {
    Ok(with_roles(db, user::Column::Id.eq(id)).await?.into_iter().next())
}

/// The accounts matching `filter`, each joined with its roles, in one query.
async fn with_roles(db: &impl ConnectionTrait, filter: impl IntoCondition) -> Result<Vec<Profile>, ApiError> {
    let rows = user::Entity::find().filter(filter).find_with_related(role::Entity).all(db).await?;
    Ok(rows
        .into_iter()
        .map(|(account, roles)| {
            let mut roles: Vec<String> = roles.into_iter().map(|r| r.name).collect();
            roles.sort();
            (account, roles)
        })
        .collect())
}

/// Inserts an account; a taken email is `email_taken`.
pub async fn insert_user(
    db: &impl ConnectionTrait,
    email: &Email,
    password_hash: String,
    now: DateTime<Utc>,
) -> Result<user::Model, ApiError> {
    let row = user::ActiveModel {
        id: Set(Uuid::now_v7()),
        email: Set(email.as_str().to_owned()),
        password_hash: Set(password_hash),
        is_verified: Set(false),
        created_at: Set(now),
        updated_at: Set(now),
        last_login_at: Set(None),
        email_verified_at: Set(None),
        disabled_at: Set(None),
        mfa_enabled: Set(false),
    };
    row.insert(db).await.map_err(|e| match e.sql_err() {
        Some(SqlErr::UniqueConstraintViolation(_)) => {
            ApiError::new(ErrorCode::EmailTaken, "An account with this email already exists.")
        }
        _ => ApiError::from(e),
    })
}

async fn user_id_by_email(db: &impl ConnectionTrait, email: &str) -> Result<Uuid, ApiError> {
    let email = Email::parse(email)?;
    user::Entity::find()
        .filter(user::Column::Email.eq(email.as_str()))
        .one(db)
        .await?
        .map(|u| u.id)
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "No account with this email."))
}

/// Creates the role if needed and gives it to the user. Idempotent.
pub async fn grant_role(
    db: &impl ConnectionTrait,
    email: &str,
    role_name: &str,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    let user_id = user_id_by_email(db, email).await?;
    role::Entity::insert(role::ActiveModel {
        id: Set(Uuid::now_v7()),
        name: Set(role_name.to_owned()),
        created_at: Set(now),
    })
    .on_conflict_do_nothing_on([role::Column::Name])
    .exec(db)
    .await?;
    let role_id = role::Entity::find()
        .filter(role::Column::Name.eq(role_name))
        .one(db)
        .await?
        .map(|r| r.id)
        .ok_or_else(|| ApiError::internal("role vanished after insert"))?;
    user_role::Entity::insert(user_role::ActiveModel {
        user_id: Set(user_id),
        role_id: Set(role_id),
        created_at: Set(now),
    })
    .on_conflict_do_nothing_on([user_role::Column::UserId, user_role::Column::RoleId])
    .exec(db)
    .await?;
    Ok(())
}

/// Takes a role away. Takes effect on the user's next admin request (roles are re-read
/// from SQL there) and next refresh (the token's `roles` claim).
pub async fn revoke_role(db: &impl ConnectionTrait, email: &str, role_name: &str) -> Result<(), ApiError> {
    let user_id = user_id_by_email(db, email).await?;
    let Some(role) = role::Entity::find().filter(role::Column::Name.eq(role_name)).one(db).await? else {
        return Ok(());
    };
    user_role::Entity::delete_many()
        .filter(user_role::Column::UserId.eq(user_id))
        .filter(user_role::Column::RoleId.eq(role.id))
        .exec(db)
        .await?;
    Ok(())
}
