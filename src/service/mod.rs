//! The rules: registration, login, refresh rotation, logout, sessions. No poem types here.

pub mod accounts;
pub mod auth;
pub mod clients;
pub mod devices;
pub mod limit;
pub mod mfa;
pub mod passkeys;
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
