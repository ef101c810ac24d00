//! Second factors: enrolling TOTP, recovery codes, and the login's second step.

use std::sync::Arc;

use poem::Request;
use poem::web::Data;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};

use super::ApiTags;
use super::auth::{NoContent, SecretField, TokenResponse, cookie_response};
use super::client::client_info;
use super::security::BearerAuth;
use crate::domain::Password;
use crate::error::ApiError;
use crate::service::mfa::{self, Method, Proof};
use crate::state::AppState;

/// The second step of a login that answered 403 `mfa_required`.
#[derive(Object)]
#[oai(deny_unknown_fields)]
pub struct MfaRequest {
    /// The `mfa_token` of the `mfa_required` answer.
    pub mfa_token: SecretField,
    /// `totp`, `recovery_code` or `webauthn`.
    pub method: String,
    /// `totp`: the 6 digits; `recovery_code`: one of the codes (dashes optional).
    pub code: Option<SecretField>,
    /// `webauthn`: the assertion (`PublicKeyCredential` as JSON) for the options of
    /// `POST /v1/auth/mfa/webauthn/options`.
    pub credential: Option<serde_json::Value>,
}

/// The ticket whose user's passkeys to ask for.
#[derive(Object)]
#[oai(deny_unknown_fields)]
pub struct MfaTicket {
    pub mfa_token: SecretField,
}

/// The current password (and, once a factor is on, a code).
#[derive(Object)]
#[oai(deny_unknown_fields)]
pub struct StepUp {
    pub current_password: SecretField,
    /// A TOTP or recovery code: required when the account has TOTP on.
    pub code: Option<SecretField>,
}

/// The current password, to enrol.
#[derive(Object)]
#[oai(deny_unknown_fields)]
pub struct CurrentPassword {
    pub current_password: SecretField,
}

/// A TOTP code.
#[derive(Object)]
#[oai(deny_unknown_fields)]
pub struct TotpCode {
    pub code: SecretField,
}

/// A new TOTP secret, not active until confirmed.
#[derive(Object)]
pub struct TotpEnrolment {
    /// Base32: type it into an authenticator app, or use the URI.
    pub secret: String,
    /// `otpauth://totp/…`: show it as a QR code.
    pub otpauth_uri: String,
}

/// Recovery codes: each works once, in place of a TOTP code. Shown this once only.
#[derive(Object)]
pub struct RecoveryCodes {
    pub recovery_codes: Vec<String>,
}

#[derive(ApiResponse)]
pub enum Enrolled {
    /// Add the secret to an authenticator app, then confirm with a code.
    #[oai(status = 200, content_type = "application/json")]
    Ok(Json<TotpEnrolment>, #[oai(header = "Cache-Control")] String),
}

#[derive(ApiResponse)]
pub enum CodesIssued {
    /// The recovery codes, once.
    #[oai(status = 200)]
    Ok(Json<RecoveryCodes>, #[oai(header = "Cache-Control")] String),
}

fn secret(field: Option<SecretField>) -> Option<String> {
    field.map(|f| f.0)
}

pub struct MfaApi;

#[OpenApi(tag = "ApiTags::Auth")]
impl MfaApi {
    /// Complete a login with a second factor
    ///
    /// After `POST /v1/auth/login` answered 403 `mfa_required`: the `mfa_token` with a TOTP
    /// code, a recovery code or a passkey assertion gives the normal token response, whose
    /// access token's `amr` has `mfa`. A wrong code is 401 `invalid_mfa_code`; after five
    /// the ticket is dead (log in again). An unknown, used or expired ticket is 401
    /// `invalid_token`.
    #[oai(path = "/v1/auth/mfa", method = "post", operation_id = "completeMfa")]
    async fn complete(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
        body: Json<MfaRequest>,
    ) -> Result<TokenResponse, ApiError> {
        let client = client_info(req, &state);
        let body = body.0;
        let proof = match (body.method.as_str(), secret(body.code), body.credential) {
            ("totp", Some(code), None) => Proof::Code(Method::Totp, code),
            ("recovery_code", Some(code), None) => Proof::Code(Method::RecoveryCode, code),
            ("webauthn", None, Some(credential)) => Proof::Passkey(credential),
            ("totp" | "recovery_code", _, _) => {
                return Err(ApiError::validation("code: required (and no credential)"));
            }
            ("webauthn", _, _) => return Err(ApiError::validation("credential: required (and no code)")),
            _ => return Err(ApiError::validation("method: one of totp, recovery_code, webauthn")),
        };
        let tokens = mfa::complete(&state, &body.mfa_token.0, proof, &client).await?;
        Ok(cookie_response(&state.config, tokens, true))
    }

    /// Passkey options for a login's second step
    ///
    /// WebAuthn request options for the passkeys of the `mfa_token`'s user; answer them
    /// with `POST /v1/auth/mfa` (`method: webauthn`).
    #[oai(path = "/v1/auth/mfa/webauthn/options", method = "post", operation_id = "mfaWebauthnOptions")]
    async fn webauthn_options(
        &self,
        state: Data<&Arc<AppState>>,
        body: Json<MfaTicket>,
    ) -> Result<Json<serde_json::Value>, ApiError> {
        let (user_id, key) = mfa::ticket_user(&state, &body.0.mfa_token.0).await?;
        Ok(Json(crate::service::passkeys::second_factor_options(&state, user_id, &key).await?))
    }

    /// Start TOTP enrolment
    ///
    /// Needs the current password. Returns a new secret and its `otpauth://` URI; nothing
    /// changes until `POST /v1/users/me/mfa/totp/confirm` proves the app has it.
    #[oai(
        path = "/v1/users/me/mfa/totp",
        method = "post",
        operation_id = "enrolTotp",
        tag = "ApiTags::Users"
    )]
    async fn enrol(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
        auth: BearerAuth,
        body: Json<CurrentPassword>,
    ) -> Result<Enrolled, ApiError> {
        let client = client_info(req, &state);
        let current = Password::candidate(body.0.current_password.0)?;
        let enrolment = mfa::enrol_totp(&state, auth.0.claims.sub, current, &client).await?;
        Ok(Enrolled::Ok(
            Json(TotpEnrolment { secret: enrolment.secret, otpauth_uri: enrolment.otpauth_uri }),
            "no-store".into(),
        ))
    }

    /// Turn TOTP on
    ///
    /// With a code from the app. Returns ten recovery codes, shown this once; every other
    /// session of the user ends. From now on, login asks for a second factor and every
    /// operation that takes `current_password` also takes `code`.
    #[oai(
        path = "/v1/users/me/mfa/totp/confirm",
        method = "post",
        operation_id = "confirmTotp",
        tag = "ApiTags::Users"
    )]
    async fn confirm(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
        auth: BearerAuth,
        body: Json<TotpCode>,
    ) -> Result<CodesIssued, ApiError> {
        let client = client_info(req, &state);
        let claims = &auth.0.claims;
        let codes = mfa::confirm_totp(&state, claims.sub, claims.sid, &body.0.code.0, &client).await?;
        Ok(CodesIssued::Ok(Json(RecoveryCodes { recovery_codes: codes }), "no-store".into()))
    }

    /// Turn TOTP off
    ///
    /// Needs the current password and a code; the recovery codes go too, and every other
    /// session of the user ends.
    #[oai(
        path = "/v1/users/me/mfa/totp",
        method = "delete",
        operation_id = "removeTotp",
        tag = "ApiTags::Users"
    )]
    async fn remove(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
        auth: BearerAuth,
        body: Json<StepUp>,
    ) -> Result<NoContent, ApiError> {
        let client = client_info(req, &state);
        let current = Password::candidate(body.0.current_password.0)?;
        let code = secret(body.0.code);
        let claims = &auth.0.claims;
        mfa::remove_totp(&state, claims.sub, claims.sid, current, code.as_deref(), &client).await?;
        Ok(NoContent::Done)
    }

    /// New recovery codes
    ///
    /// Needs the current password and a code. The old set stops working; every other
    /// session of the user ends.
    #[oai(
        path = "/v1/users/me/mfa/recovery-codes",
        method = "post",
        operation_id = "regenerateRecoveryCodes",
        tag = "ApiTags::Users"
    )]
    async fn regenerate(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
        auth: BearerAuth,
        body: Json<StepUp>,
    ) -> Result<CodesIssued, ApiError> {
        let client = client_info(req, &state);
        let current = Password::candidate(body.0.current_password.0)?;
        let code = secret(body.0.code);
        let claims = &auth.0.claims;
        let codes =
            mfa::regenerate_recovery_codes(&state, claims.sub, claims.sid, current, code.as_deref(), &client)
                .await?;
        Ok(CodesIssued::Ok(Json(RecoveryCodes { recovery_codes: codes }), "no-store".into()))
    }
}
