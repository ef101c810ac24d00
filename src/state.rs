//! What every request can reach: built once by `startup`, shared behind an `Arc`.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use sea_orm::DatabaseConnection;
use uuid::Uuid;

use crate::audit::Auditor;
use crate::clock::Clock;
use crate::config::Config;
use crate::keys::KeyCache;
use crate::metrics::Metrics;
use crate::password::PasswordHasher;
use crate::service::users::Profile;
use crate::store::batch::Batcher;
use crate::store::limits::LimitStore;
use crate::store::revocation::RevocationStore;

pub struct AppState {
    pub config: Config,
    pub db: DatabaseConnection,
    pub store: Arc<dyn RevocationStore>,
    pub limits: Arc<dyn LimitStore>,
    pub keys: KeyCache,
    pub hasher: PasswordHasher,
    pub clock: Clock,
    pub audit: Auditor,
    pub metrics: Arc<Metrics>,
    /// `/v1/users/me`'s reads, folded together under load.
    pub profiles: Batcher<Uuid, Profile>,
    /// Revocations SQL has and this instance could not yet write to the store.
    pub revocations: crate::service::sessions::Pending,
    /// Signs device tokens (see `service::devices`).
    pub devices: crate::service::devices::DeviceKey,
    /// Forwarding headers arrived with no proxy trusted: said once in the log.
    pub warned_untrusted_forwarding: AtomicBool,
    /// Queues mail, in the caller's transaction (see `mail`).
    pub outbox: crate::mail::Outbox,
    /// `GEOIP_DATABASE`, when set: where a login came from (see `geoip`).
    pub geoip: Option<crate::geoip::GeoIp>,
    /// The WebAuthn relying party (`WEBAUTHN_RP_ID`, `WEBAUTHN_ORIGINS`), built once at
    /// start; `None`: passkeys are off (see `config::WebauthnSettings`).
    pub webauthn: Option<webauthn_rs::Webauthn>,
}
