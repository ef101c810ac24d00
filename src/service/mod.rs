//! The rules: registration, login, refresh rotation, logout, sessions. No poem types here.

pub mod accounts;
pub mod auth;
pub mod clients;
pub mod devices;
pub mod limit;
pub mod mfa;
pub mod sessions;
pub mod users;

use std::net::IpAddr;

/// Who is asking, as far as the transport can tell.
#[derive(Clone, Debug, Default)]
pub struct ClientInfo {
    /// The socket peer, or the forwarded client when the peer is a trusted proxy.
    pub ip: Option<IpAddr>,
    pub user_agent: Option<String>,
}

/// Whether the user has a passkey (a second factor, see `mfa`). Passkeys are not built
/// yet on this branch: none.
pub(crate) async fn passkeys_present(
    _conn: &impl sea_orm::ConnectionTrait,
    _user_id: uuid::Uuid,
) -> Result<bool, crate::error::ApiError> {
    Ok(false)
}

/// A passkey assertion as the second factor of the MFA ticket stashed at `ticket_key`.
pub(crate) async fn passkey_second_factor(
    _state: &crate::state::AppState,
    _user_id: uuid::Uuid,
    _ticket_key: &str,
    _credential: serde_json::Value,
    _client: &ClientInfo,
) -> Result<(), crate::error::ApiError> {
    Err(mfa::invalid_code("This account has no passkey."))
}

/// WebAuthn request options for the passkeys of the MFA ticket's user.
pub(crate) async fn passkey_options_for_ticket(
    _state: &crate::state::AppState,
    _user_id: uuid::Uuid,
    _ticket_key: &str,
) -> Result<serde_json::Value, crate::error::ApiError> {
    Err(crate::error::ApiError::new(crate::error::ErrorCode::NotFound, "This account has no passkey."))
}
