//! The one error type at the HTTP edge.
//!
//! Every failure, on every route, leaves the server as the same JSON body
//! `{status, code, title, detail}` (RFC 9457 field names) with a stable snake_case `code`:
//! our own errors render themselves, and `into_problem` maps everything poem and
//! poem-openapi answer before our code runs (missing `Authorization`, unparsable bodies,
//! unknown routes, wrong methods, oversized bodies, panics). Internal causes are logged,
//! never sent.

use std::borrow::Cow;

use poem::http::{HeaderValue, StatusCode, header};
use poem::{IntoResponse, Response};
use poem_openapi::registry::{MetaHeader, MetaMediaType, MetaResponse, MetaResponses, Registry};
use poem_openapi::types::{ToJSON, Type};
use poem_openapi::{ApiResponse, Object};

pub const PROBLEM_JSON: &str = "application/problem+json";

/// What a client branches on. The string forms are part of the API: never rename one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    ValidationFailed,
    InvalidCredentials,
    InvalidToken,
    InvalidClient,
    TokenExpired,
    TokenRevoked,
    RefreshTokenReused,
    RateLimited,
    EmailTaken,
    WeakPassword,
    EmailNotVerified,
    InvalidOneTimeToken,
    WrongPassword,
    MfaRequired,
    InvalidMfaCode,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    PayloadTooLarge,
    RequestTimeout,
    ServiceUnavailable,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ValidationFailed => "validation_failed",
            Self::InvalidCredentials => "invalid_credentials",
            Self::InvalidToken => "invalid_token",
            Self::InvalidClient => "invalid_client",
            Self::TokenExpired => "token_expired",
            Self::TokenRevoked => "token_revoked",
            Self::RefreshTokenReused => "refresh_token_reused",
            Self::RateLimited => "rate_limited",
            Self::EmailTaken => "email_taken",
            Self::WeakPassword => "weak_password",
            Self::EmailNotVerified => "email_not_verified",
            Self::InvalidOneTimeToken => "invalid_one_time_token",
            Self::WrongPassword => "wrong_password",
            Self::MfaRequired => "mfa_required",
            Self::InvalidMfaCode => "invalid_mfa_code",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::PayloadTooLarge => "payload_too_large",
            Self::RequestTimeout => "request_timeout",
            Self::ServiceUnavailable => "service_unavailable",
            Self::Internal => "internal_error",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Self::ValidationFailed | Self::WeakPassword | Self::InvalidOneTimeToken => {
                StatusCode::BAD_REQUEST
            }
            Self::InvalidCredentials
            | Self::InvalidToken
            | Self::InvalidClient
            | Self::TokenExpired
            | Self::TokenRevoked
            | Self::RefreshTokenReused
            | Self::InvalidMfaCode => StatusCode::UNAUTHORIZED,
            Self::Forbidden | Self::EmailNotVerified | Self::WrongPassword | Self::MfaRequired => {
                StatusCode::FORBIDDEN
            }
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::EmailTaken => StatusCode::CONFLICT,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::ServiceUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Self::ValidationFailed => "The request is not valid",
            Self::InvalidCredentials => "Invalid email or password",
            Self::InvalidToken => "The token is not valid",
            Self::InvalidClient => "Client authentication failed",
            Self::TokenExpired => "The token has expired",
            Self::TokenRevoked => "The session has ended",
            Self::RefreshTokenReused => "The refresh token was already used",
            Self::RateLimited => "Too many requests",
            Self::EmailTaken => "The email is already registered",
            Self::WeakPassword => "The password is too easy to guess",
            Self::EmailNotVerified => "The email address is not verified yet",
            Self::InvalidOneTimeToken => "The link is invalid, used or expired",
            Self::WrongPassword => "The current password is wrong",
            Self::MfaRequired => "A second factor is required",
            Self::InvalidMfaCode => "The second factor is not valid",
            Self::Forbidden => "Not allowed",
            Self::NotFound => "Not found",
            Self::MethodNotAllowed => "Method not allowed",
            Self::PayloadTooLarge => "The request body is too large",
            Self::RequestTimeout => "The request took too long to arrive",
            Self::ServiceUnavailable => "Service temporarily unavailable",
            Self::Internal => "Internal server error",
        }
    }
}

/// The JSON error body (RFC 9457 field names).
#[derive(Debug, Clone, Object, serde::Deserialize)]
#[oai(rename = "Problem")]
pub struct Problem {
    /// The HTTP status code, repeated for clients that only see the body.
    pub status: u16,
    /// Stable machine-readable code: branch on this, never on the text.
    pub code: String,
    /// Short human-readable summary of the code.
    pub title: String,
    /// Human-readable explanation of this occurrence.
    pub detail: String,
    /// `mfa_required` only: completes the login at `POST /v1/auth/mfa` (opaque, single
    /// use, valid `MFA_TICKET_TTL`).
    #[oai(skip_serializing_if_is_none)]
    #[serde(default)]
    pub mfa_token: Option<String>,
    /// `mfa_required` only: the second factors this user can use (`totp`,
    /// `recovery_code`, `webauthn`).
    #[oai(skip_serializing_if_is_none)]
    #[serde(default)]
    pub methods: Option<Vec<String>>,
}

/// What a `mfa_required` answer carries besides the code. `Debug` hides the ticket.
#[derive(Clone)]
pub struct MfaChallenge {
    pub mfa_token: String,
    pub methods: Vec<String>,
}

impl std::fmt::Debug for MfaChallenge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MfaChallenge").field("mfa_token", &"***").field("methods", &self.methods).finish()
    }
}

#[derive(Clone, Debug, thiserror::Error)]
#[error("{}: {detail}", code.as_str())]
pub struct ApiError {
    pub code: ErrorCode,
    pub detail: Cow<'static, str>,
    /// Seconds, for 429 and 503.
    pub retry_after: Option<u64>,
    /// `mfa_required` only.
    pub mfa: Option<Box<MfaChallenge>>,
}

impl ApiError {
    pub fn new(code: ErrorCode, detail: impl Into<Cow<'static, str>>) -> Self {
        let retry_after = match code {
            ErrorCode::ServiceUnavailable => Some(1),
            _ => None,
        };
        Self { code, detail: detail.into(), retry_after, mfa: None }
    }

    pub fn validation(detail: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorCode::ValidationFailed, detail)
    }

    pub fn invalid_token(detail: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorCode::InvalidToken, detail)
    }

    pub fn unavailable(detail: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorCode::ServiceUnavailable, detail)
    }

    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds.max(1));
        self
    }

    /// An unexpected failure: the cause is logged with its chain, the client gets an
    /// opaque 500.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(ErrorCode::Internal, "An unexpected error occurred.")
    }

    pub fn problem(&self) -> Problem {
        Problem {
            status: self.code.status().as_u16(),
            code: self.code.as_str().to_owned(),
            title: self.code.title().to_owned(),
            detail: self.detail.to_string(),
            mfa_token: self.mfa.as_ref().map(|m| m.mfa_token.clone()),
            methods: self.mfa.as_ref().map(|m| m.methods.clone()),
        }
    }

    /// 403 `mfa_required`: the password was right; the login continues at `/v1/auth/mfa`.
    pub fn mfa_required(challenge: MfaChallenge) -> Self {
        let mut err = Self::new(
            ErrorCode::MfaRequired,
            "The password is right; complete the login with a second factor at POST /v1/auth/mfa.",
        );
        err.mfa = Some(Box::new(challenge));
        err
    }

    fn www_authenticate(&self) -> Option<String> {
        if self.code.status() != StatusCode::UNAUTHORIZED {
            return None;
        }
        if self.code == ErrorCode::InvalidClient {
            return Some(r#"Basic realm="latchkey""#.to_owned());
        }
        // RFC 6750 §3: a request without credentials gets no error attribute.
        if self.code == ErrorCode::InvalidToken && self.detail == MISSING_TOKEN {
            return Some(r#"Bearer realm="latchkey""#.to_owned());
        }
        let error = match self.code {
            ErrorCode::InvalidCredentials | ErrorCode::InvalidMfaCode => "invalid_request",
            _ => "invalid_token",
        };
        let description = self.code.title().replace('"', "'");
        Some(format!(r#"Bearer realm="latchkey", error="{error}", error_description="{description}""#))
    }
}

pub const MISSING_TOKEN: &str = "An Authorization header with a Bearer token is required.";

impl poem::error::ResponseError for ApiError {
    fn status(&self) -> StatusCode {
        self.code.status()
    }

    fn as_response(&self) -> Response {
        let body = self.problem().to_json_string();
        let mut resp = Response::builder()
            .status(self.code.status())
            .content_type(PROBLEM_JSON)
            .header(header::CACHE_CONTROL, "no-store")
            .body(body);
        if let Some(value) = self.www_authenticate().and_then(|v| HeaderValue::from_str(&v).ok()) {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, value);
        }
        if let Some(seconds) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        resp
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        poem::error::ResponseError::as_response(&self)
    }
}

/// Documents every error status our operations can answer, each with the `Problem` body.
impl ApiResponse for ApiError {
    fn meta() -> MetaResponses {
        let with_header = |name: &str, description: &str| MetaHeader {
            name: name.to_owned(),
            description: Some(description.to_owned()),
            required: true,
            deprecated: false,
            schema: String::schema_ref(),
        };
        let response = |status: u16, description: &'static str, headers: Vec<MetaHeader>| MetaResponse {
            description,
            status: Some(status),
            status_range: None,
            content: vec![MetaMediaType { content_type: PROBLEM_JSON, schema: Problem::schema_ref() }],
            headers,
        };
        MetaResponses {
            responses: vec![
                response(
                    400,
                    "`validation_failed`: malformed JSON, unknown or missing fields, wrong types, invalid values. `weak_password`: a new password below `PASSWORD_MIN_STRENGTH` (`detail` says why). `invalid_one_time_token`: a mailed link's token that is unknown, used, replaced by a newer one, expired, or of another purpose: ask for a new link.",
                    vec![],
                ),
                response(
                    401,
                    "`invalid_credentials` (also a passwordless passkey login that is refused), `invalid_token`, `token_expired`, `token_revoked`, `refresh_token_reused`, `invalid_client`. `invalid_mfa_code`: a wrong, replayed or missing TOTP or recovery code, or a passkey assertion that does not verify.",
                    vec![with_header("WWW-Authenticate", "RFC 6750 challenge")],
                ),
                response(
                    403,
                    "`forbidden`. `wrong_password`: the signed-in user's `current_password` is wrong. `email_not_verified`: the password is right but `EMAIL_VERIFICATION=required` and the address is not verified yet (a new link is mailed). `mfa_required`: the password is right and the user has a second factor: the body adds `mfa_token` and `methods`; complete the login at `POST /v1/auth/mfa`.",
                    vec![],
                ),
                response(404, "`not_found`.", vec![]),
                response(408, "`request_timeout`: the body was not sent within `HTTP_BODY_TIMEOUT`.", vec![]),
                response(409, "`email_taken`.", vec![]),
                response(413, "`payload_too_large`.", vec![]),
                response(429, "`rate_limited`.", vec![with_header("Retry-After", "seconds to wait")]),
                response(
                    503,
                    "`service_unavailable`: a dependency is down or the password hashing queue is full.",
                    vec![with_header("Retry-After", "seconds to wait")],
                ),
            ],
        }
    }

    fn register(registry: &mut Registry) {
        Problem::register(registry);
    }
}

/// Turns any error that reached the edge into the one body shape.
pub fn into_problem(err: poem::Error) -> Response {
    if let Some(api) = err.downcast_ref::<ApiError>() {
        return api.as_response_ref();
    }
    let status = err.status();
    let api = match status {
        StatusCode::UNAUTHORIZED => ApiError::invalid_token(MISSING_TOKEN),
        StatusCode::FORBIDDEN => {
            ApiError::new(ErrorCode::Forbidden, "This origin or request is not allowed.")
        }
        StatusCode::NOT_FOUND => ApiError::new(ErrorCode::NotFound, "No such route."),
        StatusCode::METHOD_NOT_ALLOWED => {
            ApiError::new(ErrorCode::MethodNotAllowed, "This route does not accept that method.")
        }
        StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::new(ErrorCode::PayloadTooLarge, "The request body is too large.")
        }
        s if s.is_client_error() => ApiError::validation(client_error_detail(&err)),
        StatusCode::SERVICE_UNAVAILABLE => ApiError::unavailable("Service temporarily unavailable."),
        _ => ApiError::internal(&err),
    };
    api.as_response_ref()
}

/// poem-openapi's parse errors describe the request (field names, expected types), never
/// server state, so they are safe and useful to return.
fn client_error_detail(err: &poem::Error) -> String {
    let text = err.to_string();
    let text = text.strip_prefix("parse request payload error: ").unwrap_or(&text);
    let mut text = text.to_owned();
    if text.len() > 300 {
        let mut cut = 300;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

impl ApiError {
    fn as_response_ref(&self) -> Response {
        poem::error::ResponseError::as_response(self)
    }
}

impl From<sea_orm::DbErr> for ApiError {
    fn from(err: sea_orm::DbErr) -> Self {
        use sea_orm::sqlx::Error as Sqlx;
        use sea_orm::{DbErr, RuntimeErr};
        // A connection lost mid-query is as unavailable as one that cannot be had; so is one
        // the server ended (SQLSTATE class 57, operator intervention: an administrator, a
        // shutdown or a failover) or that broke (class 08). sqlx drops such a connection
        // when it comes back to the pool, and the next query gets a new one.
        let lost = |e: &RuntimeErr| {
            matches!(e, RuntimeErr::SqlxError(e) if match &**e {
                Sqlx::Io(_) | Sqlx::PoolTimedOut | Sqlx::PoolClosed | Sqlx::Tls(_) | Sqlx::Protocol(_) | Sqlx::WorkerCrashed => true,
                Sqlx::Database(e) => e.code().is_some_and(|code| code.starts_with("57") || code.starts_with("08")),
                _ => false,
            })
        };
        match &err {
            DbErr::Exec(e) | DbErr::Query(e) if lost(e) => {
                crate::store::db::connection_ended();
                tracing::warn!(error = %err, "database unavailable");
                ApiError::unavailable("The database is unavailable; try again shortly.")
            }
            DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => {
                tracing::warn!(error = %err, "database unavailable");
                ApiError::unavailable("The database is unavailable; try again shortly.")
            }
            _ => ApiError::internal(err),
        }
    }
}

impl From<crate::store::revocation::StoreError> for ApiError {
    fn from(err: crate::store::revocation::StoreError) -> Self {
        tracing::warn!(error = %err, "revocation store unavailable");
        ApiError::unavailable("The session store is unavailable; try again shortly.")
    }
}

impl From<crate::domain::InvalidEmail> for ApiError {
    fn from(err: crate::domain::InvalidEmail) -> Self {
        ApiError::validation(err.to_string())
    }
}

impl From<crate::domain::InvalidPassword> for ApiError {
    fn from(err: crate::domain::InvalidPassword) -> Self {
        ApiError::validation(err.to_string())
    }
}

impl From<crate::domain::WeakPassword> for ApiError {
    fn from(err: crate::domain::WeakPassword) -> Self {
        ApiError::new(ErrorCode::WeakPassword, err.detail)
    }
}

impl From<crate::mail::outbox::MailError> for ApiError {
    fn from(err: crate::mail::outbox::MailError) -> Self {
        match err {
            crate::mail::outbox::MailError::Database(e) => e.into(),
            template => ApiError::internal(template),
        }
    }
}

impl From<crate::password::HashError> for ApiError {
    fn from(err: crate::password::HashError) -> Self {
        match err {
            crate::password::HashError::Busy => {
                ApiError::unavailable("Too many password checks in progress; try again shortly.")
            }
            crate::password::HashError::Failed(cause) => ApiError::internal(cause),
        }
    }
}
