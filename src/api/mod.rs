//! The HTTP API: one poem-openapi struct per tag, combined as a tuple, documented by the
//! spec poem-openapi generates (served at `/openapi.json`, Swagger UI at `/docs`).

pub mod admin;
pub mod auth;
pub mod client;
pub mod health;
pub mod keys;
pub mod mfa;
pub mod oauth;
pub mod passkeys;
pub mod security;
pub mod users;

use poem_openapi::{OpenApiService, Tags};

#[derive(Tags)]
pub enum ApiTags {
    /// Register, log in, refresh, log out.
    Auth,
    /// The signed-in user.
    Users,
    /// Passkeys (WebAuthn): register, list and remove them; log in without a password.
    Passkeys,
    /// Public keys for verifying access tokens offline.
    Keys,
    /// Liveness and readiness.
    Health,
    /// For users with the admin role.
    Admin,
    /// Standard OAuth 2.0 endpoints: metadata, refresh grant, revocation, introspection.
    #[oai(rename = "OAuth")]
    OAuth,
}

pub type Apis = (
    auth::AuthApi,
    mfa::MfaApi,
    users::UsersApi,
    passkeys::PasskeysApi,
    admin::AdminApi,
    keys::KeysApi,
    oauth::OAuthApi,
    health::HealthApi,
);

/// The API with its OpenAPI document. Needs no state: handlers read it from request data,
/// so `latchkey openapi` can print the spec without a database.
pub fn service() -> OpenApiService<Apis, ()> {
    OpenApiService::new(
        (
            auth::AuthApi,
            mfa::MfaApi,
            users::UsersApi,
            passkeys::PasskeysApi,
            admin::AdminApi,
            keys::KeysApi,
            oauth::OAuthApi,
            health::HealthApi,
        ),
        "Latchkey",
        env!("CARGO_PKG_VERSION"),
    )
    .description(
        "A JWT auth server: log in, get a short-lived access JWT and a rotating refresh token, \
         revoke either at once. Every error is a JSON body `{status, code, title, detail}`; \
         clients branch on `code`.",
    )
}

/// The spec exactly as `latchkey openapi` prints it and `openapi/openapi.json` holds it.
pub fn spec_json() -> String {
    let mut spec = service().spec();
    if !spec.ends_with('\n') {
        spec.push('\n');
    }
    spec
}
