//! `/v1/auth/*`: register, login, refresh, logout, the current session.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use poem::Request;
use poem::web::Data;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};
use uuid::Uuid;

use super::ApiTags;
use super::client::client_info;
use super::security::BearerAuth;
use crate::config::{Config, EmailVerification};
use crate::domain::{Email, Password};
use crate::error::{ApiError, ErrorCode};
use crate::service::accounts;
use crate::service::auth::{self, Tokens};
use crate::service::devices::DEVICE_TOKEN_TTL;
use crate::state::AppState;

/// Credentials. Unknown fields are refused.
#[derive(Object)]
#[oai(deny_unknown_fields)]
pub struct Credentials {
    /// Trimmed and lower-cased before use.
    #[oai(validator(max_length = 254))]
    pub email: String,
    /// 8 to 1024 characters.
    pub password: SecretField,
}

/// A string that never appears in `Debug` output (poem-openapi's own `Password` derives it).
#[derive(Clone)]
pub struct SecretField(pub String);

impl std::fmt::Debug for SecretField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

mod secret_field_impls {
    use std::borrow::Cow;

    use poem_openapi::registry::{MetaSchema, MetaSchemaRef};
    use poem_openapi::types::{ParseError, ParseFromJSON, ParseResult, ToJSON, Type};
    use serde_json::Value;

    use super::SecretField;

    impl Type for SecretField {
        const IS_REQUIRED: bool = true;
        type RawValueType = String;
        type RawElementValueType = String;

        fn name() -> Cow<'static, str> {
            "string(password)".into()
        }

        fn schema_ref() -> MetaSchemaRef {
            MetaSchemaRef::Inline(Box::new(MetaSchema::new_with_format("string", "password")))
        }

        fn as_raw_value(&self) -> Option<&Self::RawValueType> {
            Some(&self.0)
        }

        fn raw_element_iter<'a>(&'a self) -> Box<dyn Iterator<Item = &'a Self::RawElementValueType> + 'a> {
            Box::new(std::iter::once(&self.0))
        }
    }

    impl ParseFromJSON for SecretField {
        fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
            match value {
                Some(Value::String(s)) => Ok(SecretField(s)),
                Some(_) => Err(ParseError::custom("expected a string")),
                None => Err(ParseError::expected_input()),
            }
        }
    }

    impl ToJSON for SecretField {
        fn to_json(&self) -> Option<Value> {
            None
        }
    }
}

/// A login. Unknown fields are refused.
#[derive(Object)]
#[oai(deny_unknown_fields)]
pub struct LoginRequest {
    /// Trimmed and lower-cased before use.
    #[oai(validator(max_length = 254))]
    pub email: String,
    pub password: SecretField,
    /// The `device_token` of an earlier login of this account from this device. With it, the
    /// login is judged only by this device's own failed attempts, so other people's failures
    /// cannot lock you out. In cookie mode the `__Host-latchkey_device` cookie carries it.
    pub device_token: Option<SecretField>,
}

/// A new account.
#[derive(Object)]
pub struct RegisteredUser {
    pub id: Uuid,
    pub email: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Object)]
#[oai(deny_unknown_fields)]
pub struct RefreshRequest {
    /// The refresh token from the last token response. Each one works once. In cookie
    /// mode (`REFRESH_TOKEN_COOKIE=true`) leave it out: the cookie carries it.
    pub refresh_token: Option<SecretField>,
}

/// The refresh token's cookie in cookie mode. The `__Host-` prefix makes browsers accept it
/// only with `Secure`, `Path=/` and no `Domain`, so a sibling subdomain cannot plant one
/// that shadows it.
pub const REFRESH_COOKIE: &str = "__Host-latchkey_refresh";
/// The header a cookie-carrying refresh must send (any value): a cross-site page cannot
/// add it without a CORS preflight that only allowed origins pass.
pub const CSRF_HEADER: &str = "x-requested-with";

/// RFC 6749 §5.1 token response.
#[derive(Object)]
pub struct TokenResponseBody {
    /// The access JWT: send it as `Authorization: Bearer …`.
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds until the access token expires.
    pub expires_in: u64,
    /// Opaque; exchange it at `/v1/auth/refresh` for new tokens. Single use. Absent in
    /// cookie mode, where it travels as an HttpOnly cookie instead.
    #[oai(skip_serializing_if_is_none)]
    pub refresh_token: Option<String>,
    /// Seconds until the session (and so every refresh token of it) ends.
    pub refresh_expires_in: u64,
    pub session_id: Uuid,
    /// Login only: keep it and send it with this account's next logins from this device
    /// (opaque, valid for a year). Absent in cookie mode, where it travels as the
    /// `__Host-latchkey_device` cookie.
    #[oai(skip_serializing_if_is_none)]
    pub device_token: Option<String>,
}

/// The current session, as the token and the revocation store see it.
#[derive(Object)]
pub struct SessionInfo {
    pub session_id: Uuid,
    pub user_id: Uuid,
    pub roles: Vec<String>,
    /// The session's end: login time + `REFRESH_TOKEN_TTL`.
    pub expires_at: DateTime<Utc>,
    /// How the session's login was authenticated (RFC 8176): `pwd`; with `mfa` when a
    /// second factor was used.
    pub amr: Vec<String>,
    /// When that login happened; refreshes keep it.
    pub auth_time: DateTime<Utc>,
}

#[derive(ApiResponse)]
pub enum RegisterResponse {
    /// `EMAIL_VERIFICATION=off`: the account was created.
    #[oai(status = 201)]
    Created(Json<RegisteredUser>),
    /// `EMAIL_VERIFICATION=optional` or `required`: a verification link is on its way if
    /// the address is new; its owner is told of the attempt if it is taken. The same
    /// answer either way.
    #[oai(status = 202)]
    Accepted(Json<SignUpAccepted>),
}

/// Sign-up with email verification on: the same body for new and taken addresses.
#[derive(Object)]
pub struct SignUpAccepted {
    /// The address, in its canonical form.
    pub email: String,
    /// Always `sent`.
    pub verification: String,
}

/// A mailed link's token, from the link's `#token=` fragment.
#[derive(Object)]
#[oai(deny_unknown_fields)]
pub struct OneTimeTokenRequest {
    pub token: SecretField,
}

/// An address to mail a link to.
#[derive(Object)]
#[oai(deny_unknown_fields)]
pub struct EmailRequest {
    #[oai(validator(max_length = 254))]
    pub email: String,
}

/// A new password, with the reset link's token.
#[derive(Object)]
#[oai(deny_unknown_fields)]
pub struct ResetPasswordRequest {
    pub token: SecretField,
    /// 8 to 1024 characters, at least `PASSWORD_MIN_STRENGTH`.
    pub new_password: SecretField,
    /// A TOTP or recovery code: required when the account has TOTP on (a reset does not
    /// get around the second factor).
    pub code: Option<SecretField>,
}

/// The same answer whether or not the address has an account.
#[derive(ApiResponse)]
pub enum MailAccepted {
    /// If the address has an account that needs this mail, it is on its way.
    #[oai(status = 202)]
    Accepted(Json<MailQueued>),
}

#[derive(Object)]
pub struct MailQueued {
    /// The address, in its canonical form.
    pub email: String,
}

#[derive(ApiResponse)]
pub enum TokenResponse {
    /// Tokens issued.
    #[oai(status = 200)]
    Ok(
        Json<TokenResponseBody>,
        #[oai(header = "Cache-Control")] String,
        #[oai(header = "Pragma")] String,
        /// Cookie mode only: the refresh token.
        #[oai(header = "Set-Cookie")]
        Option<String>,
        /// Cookie mode, login only: the device cookie, sent as a second `Set-Cookie`.
        #[oai(header = "X-Latchkey-Set-Cookie")]
        Option<String>,
    ),
}

/// The token response; in cookie mode (and when `cookie_allowed`) the refresh token goes
/// into an `HttpOnly; Secure; SameSite=Strict` host-only cookie instead of the body.
pub fn cookie_response(config: &Config, t: Tokens, cookie_allowed: bool) -> TokenResponse {
    let in_cookie = config.refresh_token_cookie && cookie_allowed;
    let cookie = in_cookie.then(|| refresh_cookie(&t.refresh_token, t.refresh_expires_in));
    let device_cookie = match (&t.device_token, in_cookie) {
        (Some(device), true) => Some(host_cookie(DEVICE_COOKIE, device, DEVICE_TOKEN_TTL.as_secs())),
        _ => None,
    };
    TokenResponse::Ok(
        Json(TokenResponseBody {
            access_token: t.access_token,
            token_type: "Bearer".into(),
            expires_in: t.expires_in,
            refresh_token: (!in_cookie).then_some(t.refresh_token),
            refresh_expires_in: t.refresh_expires_in,
            session_id: t.session_id,
            device_token: if in_cookie { None } else { t.device_token },
        }),
        "no-store".into(),
        "no-cache".into(),
        cookie,
        device_cookie,
    )
}

fn refresh_cookie(value: &str, max_age: u64) -> String {
    host_cookie(REFRESH_COOKIE, value, max_age)
}

fn host_cookie(name: &str, value: &str, max_age: u64) -> String {
    format!("{name}={value}; HttpOnly; Secure; SameSite=Strict; Path=/; Max-Age={max_age}")
}

/// The device token's cookie in cookie mode.
pub const DEVICE_COOKIE: &str = "__Host-latchkey_device";
/// poem-openapi writes each response header once; a second `Set-Cookie` goes out under this
/// name and `startup::second_set_cookie` turns it into one.
pub const SECOND_SET_COOKIE: &str = "x-latchkey-set-cookie";

/// The value of the cookie `name`, if the request has one. Two cookies of that name mean
/// one was planted (a browser sends every matching cookie, in an order the server cannot
/// trust): refused rather than guessed.
fn cookie_token(req: &Request, name: &str) -> Result<Option<String>, ApiError> {
    let mut found = req
        .headers()
        .get_all(poem::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(cookie, _)| *cookie == name)
        .map(|(_, value)| value.to_owned());
    let first = found.next();
    if found.next().is_some() {
        return Err(ApiError::validation(format!("The request carries more than one {name} cookie.")));
    }
    Ok(first)
}

/// 204, clearing the refresh cookie in cookie mode.
fn ended(config: &Config) -> NoContent {
    if config.refresh_token_cookie { NoContent::ClearCookie(refresh_cookie("", 0)) } else { NoContent::Done }
}

#[derive(ApiResponse)]
pub enum NoContent {
    /// Done.
    #[oai(status = 204)]
    Done,
    /// Done; in cookie mode the refresh-token cookie is cleared.
    #[oai(status = 204)]
    ClearCookie(#[oai(header = "Set-Cookie")] String),
}

pub struct AuthApi;

#[OpenApi(prefix_path = "/v1/auth", tag = "ApiTags::Auth")]
impl AuthApi {
    /// Create an account
    ///
    /// Emails are stored in one canonical form: the local part lower-cased and in Unicode
    /// NFC, the domain IDNA-encoded to lower-case ASCII; an address with a control or
    /// invisible character is refused. Passwords are 8 to 1024 characters and must reach
    /// `PASSWORD_MIN_STRENGTH` (a zxcvbn score, judged with the email as context), else 400
    /// `weak_password`.
    ///
    /// With `EMAIL_VERIFICATION=off`, the account is created (201) and a taken email is
    /// answered with 409 `email_taken`. With `optional` or `required` (the default is
    /// `optional`), new and taken addresses get the same 202, in the same time: a new one
    /// gets its account and a verification link, the owner of a taken one a mail saying
    /// someone tried to sign up (with a password-reset link).
    #[oai(path = "/register", method = "post", operation_id = "register")]
    async fn register(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
        body: Json<Credentials>,
    ) -> Result<RegisterResponse, ApiError> {
        let email = Email::parse(&body.0.email)?;
        let password = Password::new(body.0.password.0)?;
        let client = client_info(req, &state);
        if state.config.email_verification != EmailVerification::Off {
            accounts::sign_up(&state, email.clone(), password, &client).await?;
            return Ok(RegisterResponse::Accepted(Json(SignUpAccepted {
                email: email.as_str().to_owned(),
                verification: "sent".into(),
            })));
        }
        let user = auth::register(&state, email, password, &client).await?;
        Ok(RegisterResponse::Created(Json(RegisteredUser {
            id: user.id,
            email: user.email,
            created_at: user.created_at,
        })))
    }

    /// Log in
    ///
    /// Returns an access token and a refresh token. A wrong password and an unknown email
    /// get the same 401 `invalid_credentials`.
    #[oai(path = "/login", method = "post", operation_id = "login")]
    async fn login(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
        body: Json<LoginRequest>,
    ) -> Result<TokenResponse, ApiError> {
        let client = client_info(req, &state);
        let password = Password::candidate(body.0.password.0)?;
        let device = match body.0.device_token {
            Some(token) => Some(token.0),
            None if state.config.refresh_token_cookie => cookie_token(req, DEVICE_COOKIE)?,
            None => None,
        };
        let tokens = auth::login(&state, &body.0.email, password, device.as_deref(), &client).await?;
        Ok(cookie_response(&state.config, tokens, true))
    }

    /// Exchange a refresh token for new tokens
    ///
    /// The refresh token is rotated: the response carries a new one and the old one is
    /// retired. Any 401 here means: log in again.
    #[oai(path = "/refresh", method = "post", operation_id = "refresh")]
    async fn refresh(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
        body: Json<RefreshRequest>,
    ) -> Result<TokenResponse, ApiError> {
        let client = client_info(req, &state);
        let presented = match (body.0.refresh_token, state.config.refresh_token_cookie) {
            (Some(token), _) => token.0,
            (None, true) => {
                let token = cookie_token(req, REFRESH_COOKIE)?
                    .ok_or_else(|| ApiError::invalid_token("No refresh token cookie."))?;
                if req.headers().get(CSRF_HEADER).is_none_or(|v| v.is_empty()) {
                    return Err(ApiError::new(
                        ErrorCode::Forbidden,
                        "A refresh with the cookie must send the X-Requested-With header.",
                    ));
                }
                token
            }
            (None, false) => return Err(ApiError::validation("refresh_token: required")),
        };
        let tokens = auth::refresh(&state, &presented, &client).await?;
        Ok(cookie_response(&state.config, tokens, true))
    }

    /// End this session
    ///
    /// Every access token of the session is refused from the next request on, and its
    /// refresh token no longer works.
    #[oai(path = "/logout", method = "post", operation_id = "logout")]
    async fn logout(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
        auth: BearerAuth,
    ) -> Result<NoContent, ApiError> {
        let client = client_info(req, &state);
        auth::logout(&state, auth.0.claims.sub, auth.0.claims.sid, &client).await?;
        Ok(ended(&state.config))
    }

    /// End every session of this user
    ///
    /// Every access token of every session of the user is refused from the next request
    /// on, on every instance; every refresh token stops working.
    #[oai(path = "/logout-all", method = "post", operation_id = "logoutAll")]
    async fn logout_all(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
        auth: BearerAuth,
    ) -> Result<NoContent, ApiError> {
        let client = client_info(req, &state);
        auth::logout_all(&state, auth.0.claims.sub, &client).await?;
        Ok(ended(&state.config))
    }

    /// Verify an email address
    ///
    /// With the token from the verification link (`…/verify-email#token=…`). Opening the
    /// link changes nothing; this POST does. 400 `invalid_one_time_token` for an unknown,
    /// used, replaced or expired link, or one for an address the account no longer has.
    #[oai(path = "/verify-email", method = "post", operation_id = "verifyEmail")]
    async fn verify_email(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
        body: Json<OneTimeTokenRequest>,
    ) -> Result<NoContent, ApiError> {
        let client = client_info(req, &state);
        accounts::verify_email(&state, &body.0.token.0, &client).await?;
        Ok(NoContent::Done)
    }

    /// Mail a new verification link
    ///
    /// Always 202, in the same time, whether or not the address has an account (or needs
    /// verifying); a link goes out only to an unverified account, within
    /// `RATE_LIMIT_EMAIL_PER_ADDRESS` and `RATE_LIMIT_EMAIL_PER_IP` (silently: beyond them
    /// the answer is the same and no mail is sent). The newest link replaces older ones.
    #[oai(path = "/verify-email/resend", method = "post", operation_id = "resendVerification")]
    async fn resend_verification(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
        body: Json<EmailRequest>,
    ) -> Result<MailAccepted, ApiError> {
        let email = Email::parse(&body.0.email)?;
        let client = client_info(req, &state);
        accounts::resend_verification(&state, &email, &client).await?;
        Ok(MailAccepted::Accepted(Json(MailQueued { email: email.as_str().to_owned() })))
    }

    /// Mail a password-reset link
    ///
    /// Always 202, in the same time, whether or not the address has an account; a link
    /// (valid `PASSWORD_RESET_TTL`, replacing older ones) goes out only to an account that
    /// is not disabled, within the mail limits (silently, as for resend).
    #[oai(path = "/password/forgot", method = "post", operation_id = "forgotPassword")]
    async fn forgot_password(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
        body: Json<EmailRequest>,
    ) -> Result<MailAccepted, ApiError> {
        let email = Email::parse(&body.0.email)?;
        let client = client_info(req, &state);
        accounts::forgot_password(&state, &email, &client).await?;
        Ok(MailAccepted::Accepted(Json(MailQueued { email: email.as_str().to_owned() })))
    }

    /// Set a new password with a reset link
    ///
    /// Every session of the user ends, on every instance; a "password changed" mail goes
    /// out, and the address counts as verified (the link proved it). A weak password is
    /// 400 `weak_password` and leaves the link working; a bad link is 400
    /// `invalid_one_time_token`.
    #[oai(path = "/password/reset", method = "post", operation_id = "resetPassword")]
    async fn reset_password(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
        body: Json<ResetPasswordRequest>,
    ) -> Result<NoContent, ApiError> {
        let password = Password::new(body.0.new_password.0)?;
        let client = client_info(req, &state);
        let code = body.0.code.map(|c| c.0);
        accounts::reset_password(&state, &body.0.token.0, password, code.as_deref(), &client).await?;
        Ok(NoContent::Done)
    }

    /// Apply an email change
    ///
    /// With the token from the link mailed to the new address. The new address applies
    /// and counts as verified; every session but the one that asked for the change ends.
    /// 409 `email_taken` if another account took the address meanwhile.
    #[oai(path = "/confirm-email", method = "post", operation_id = "confirmEmail")]
    async fn confirm_email(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
        body: Json<OneTimeTokenRequest>,
    ) -> Result<NoContent, ApiError> {
        let client = client_info(req, &state);
        accounts::confirm_email(&state, &body.0.token.0, &client).await?;
        Ok(NoContent::Done)
    }

    /// The current session
    ///
    /// Answered from the token and the revocation store alone, without SQL.
    #[oai(path = "/session", method = "get", operation_id = "currentSession")]
    async fn session(&self, auth: BearerAuth) -> Result<Json<SessionInfo>, ApiError> {
        let a = auth.0;
        Ok(Json(SessionInfo {
            session_id: a.claims.sid,
            user_id: a.claims.sub,
            roles: a.claims.roles.clone(),
            expires_at: a.session.expires_at,
            amr: a.claims.amr.clone(),
            auth_time: DateTime::from_timestamp(a.claims.auth_time, 0).unwrap_or_default(),
        }))
    }
}
