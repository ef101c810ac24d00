//! Confidential OAuth clients (resource servers calling introspection).

use chrono::{DateTime, Utc};
use sea_orm::{ActiveModelTrait as _, ConnectionTrait, EntityTrait as _, Set};
use subtle::ConstantTimeEq as _;

use crate::error::ApiError;
use crate::store::entity::oauth_client;
use crate::token;

/// A new client: returns `(client_id, client_secret)`. Only the secret's SHA-256 is kept
/// (the secret is 256 random bits, so a slow hash would add nothing).
pub async fn create(
    db: &impl ConnectionTrait,
    name: &str,
    now: DateTime<Utc>,
) -> Result<(String, String), ApiError> {
    let client_id = format!("lk_{}", uuid::Uuid::new_v4().simple());
    let secret = token::new_refresh_token()?;
    oauth_client::ActiveModel {
        client_id: Set(client_id.clone()),
        name: Set(name.to_owned()),
        secret_hash: Set(token::refresh_token_hash(&secret)),
        created_at: Set(now),
    }
    .insert(db)
    .await?;
    Ok((client_id, secret))
}

/// True when the credentials belong to a registered client. The comparison is constant
/// time, and an unknown client costs the same hash and comparison as a known one.
pub async fn authenticate(
    db: &impl ConnectionTrait,
    client_id: &str,
    secret: &str,
) -> Result<bool, ApiError> {
    let presented = token::refresh_token_hash(secret);
    let client =
        if client_id.len() <= 64 { oauth_client::Entity::find_by_id(client_id).one(db).await? } else { None };
    let stored = client.as_ref().map_or_else(|| "0".repeat(64), |c| c.secret_hash.clone());
    let equal: bool = presented.as_bytes().ct_eq(stored.as_bytes()).into();
    Ok(equal && client.is_some())
}
