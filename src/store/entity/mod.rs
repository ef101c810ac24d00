//! sea-orm entities, one per table of the data model (see `migration/`).

pub mod audit_log;
pub mod email_outbox;
pub mod oauth_client;
pub mod one_time_token;
pub mod passkey;
pub mod recovery_code;
pub mod refresh_token;
pub mod revocation_job;
pub mod role;
pub mod server_secret;
pub mod session;
pub mod signing_key;
pub mod totp_factor;
pub mod user;
pub mod user_role;
