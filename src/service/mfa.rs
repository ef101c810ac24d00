//! Second factors (issue 16): TOTP with recovery codes, the login's second step, and the
//! step-up that sensitive changes ask for.
//!
//! TOTP is RFC 6238 as every authenticator app computes it: SHA-1, 6 digits, 30-second
//! steps, one step of drift either way. The secret (160 bits) is sealed under the KEK when
//! one is set. A factor is active once a correct code confirms it, which hands out ten
//! recovery codes, once (SQL keeps their SHA-256). No code is accepted twice: the last
//! accepted time step is kept and only a later one passes, by compare-and-swap.
//!
//! A correct password for a user with a factor gets no tokens: 403 `mfa_required` with an
//! opaque ticket (`mfa_token`), kept in the revocation store for `MFA_TICKET_TTL` under
//! its SHA-256. `POST /v1/auth/mfa` completes it; five wrong codes kill the ticket, and a
//! per-account budget limits guesses across tickets.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait as _};
use sea_orm::{
    ActiveModelTrait as _, ColumnTrait as _, ConnectionTrait, EntityTrait as _, PaginatorTrait as _,
    QueryFilter as _, Set, TransactionTrait as _,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::auth::{self, Amr, Tokens};
use super::limit::{self, Limit};
use super::sessions::{self, Scope};
use super::{ClientInfo, users};
use crate::audit::AuditEvent;
use crate::error::{ApiError, ErrorCode, MfaChallenge};
use crate::state::AppState;
use crate::store::entity::{recovery_code, totp_factor, user};
use crate::token;

pub const TOTP_DIGITS: usize = 6;
pub const TOTP_STEP: u64 = 30;
/// Steps of drift accepted either way.
pub const TOTP_SKEW: u8 = 1;
/// 160 bits, RFC 4226's recommendation.
pub const TOTP_SECRET_BYTES: usize = 20;
pub const RECOVERY_CODES: usize = 10;
/// Wrong second factors one ticket survives.
pub const MAX_TICKET_FAILURES: u64 = 5;

/// The second factors a user can complete a login with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Totp,
    RecoveryCode,
    Webauthn,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Totp => "totp",
            Method::RecoveryCode => "recovery_code",
            Method::Webauthn => "webauthn",
        }
    }
}

pub fn invalid_code(detail: &'static str) -> ApiError {
    ApiError::new(ErrorCode::InvalidMfaCode, detail)
}

fn totp_context(user_id: Uuid) -> String {
    format!("totp\n{user_id}")
}

/// The `Totp` of a secret. `account` and `issuer` only shape the `otpauth://` URI (the
/// crate refuses `:` in them).
fn totp(secret: Vec<u8>, account: &str, issuer: &str) -> Result<totp_rs::Totp, ApiError> {
    totp_rs::Builder::new()
        .with_algorithm(totp_rs::Algorithm::SHA1)
        .with_digits(TOTP_DIGITS as u8)
        .with_skew(u16::from(TOTP_SKEW))
        .with_step_duration(TOTP_STEP)
        .with_secret(secret)
        .with_account_name(account.replace(':', "_"))
        .with_issuer(Some(issuer.replace(':', "_")))
        .build()
        .map_err(|e| ApiError::internal(format!("building a TOTP: {e}")))
}

fn unix(now: DateTime<Utc>) -> u64 {
    u64::try_from(now.timestamp()).unwrap_or(0)
}

/// The user's TOTP factor, if any (confirmed or not), with its secret opened.
async fn factor(
    state: &AppState,
    conn: &impl ConnectionTrait,
    user_id: Uuid,
) -> Result<Option<(totp_factor::Model, Vec<u8>)>, ApiError> {
    let Some(row) = totp_factor::Entity::find_by_id(user_id).one(conn).await? else {
        return Ok(None);
    };
    let secret = crate::keys::open_user_secret(
        &state.keys.settings,
        &totp_context(user_id),
        &row.secret,
        row.secret_encryption.as_deref(),
    )
    .ok_or_else(|| ApiError::internal("a TOTP secret does not open with KEY_ENCRYPTION_KEY"))?;
    Ok(Some((row, secret)))
}

/// Checks `code` against the factor and moves its last accepted step forward, by
/// compare-and-swap: of two requests with the same code, one passes.
async fn accept_totp(
    state: &AppState,
    conn: &impl ConnectionTrait,
    row: &totp_factor::Model,
    secret: Vec<u8>,
    code: &str,
) -> Result<bool, ApiError> {
    let code = code.trim();
    if code.len() != TOTP_DIGITS || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(false);
    }
    let now = unix(state.clock.now());
    let totp = totp(secret.clone(), "-", "-")?;
    let Some(step) = totp.check(code, now) else { return Ok(false) };
    let step = i64::try_from(step).map_err(ApiError::internal)?;
    let mut update = totp_factor::Entity::update_many()
        .col_expr(totp_factor::Column::LastStep, Expr::value(step))
        .filter(totp_factor::Column::UserId.eq(row.user_id))
        .filter(totp_factor::Column::LastStep.is_null().or(totp_factor::Column::LastStep.lt(step)));
    // A secret stored in the clear before the KEK was set is sealed now.
    if row.secret_encryption.is_none() && state.keys.settings.kek.is_some() {
        let (sealed, format) =
            crate::keys::seal_user_secret(&state.keys.settings, &totp_context(row.user_id), &secret)
                .map_err(ApiError::internal)?;
        update = update
            .col_expr(totp_factor::Column::Secret, Expr::value(sealed))
            .col_expr(totp_factor::Column::SecretEncryption, Expr::value(format));
    }
    Ok(update.exec(conn).await?.rows_affected == 1)
}

fn normalize_recovery(code: &str) -> String {
    code.chars().filter(|c| c.is_ascii_alphanumeric()).map(|c| c.to_ascii_lowercase()).collect()
}

/// Uses one of the user's recovery codes; returns how many are left, or `None` if the
/// code is not an unused one.
async fn accept_recovery(
    conn: &impl ConnectionTrait,
    user_id: Uuid,
    code: &str,
    now: DateTime<Utc>,
) -> Result<Option<u64>, ApiError> {
    let code = normalize_recovery(code);
    if code.is_empty() || code.len() > 64 {
        return Ok(None);
    }
    let used = recovery_code::Entity::update_many()
        .col_expr(recovery_code::Column::UsedAt, Expr::value(now))
        .filter(recovery_code::Column::UserId.eq(user_id))
        .filter(recovery_code::Column::CodeHash.eq(token::refresh_token_hash(&code)))
        .filter(recovery_code::Column::UsedAt.is_null())
        .exec(conn)
        .await?;
    if used.rows_affected != 1 {
        return Ok(None);
    }
    let left = recovery_code::Entity::find()
        .filter(recovery_code::Column::UserId.eq(user_id))
        .filter(recovery_code::Column::UsedAt.is_null())
        .count(conn)
        .await?;
    Ok(Some(left))
}

/// Ten fresh recovery codes (`xxxx-xxxx-xxxx`, 60 bits each from the CSPRNG) replace the
/// user's old set; returns them, the only time they are seen.
async fn new_recovery_codes(
    conn: &impl ConnectionTrait,
    user_id: Uuid,
    now: DateTime<Utc>,
) -> Result<Vec<String>, ApiError> {
    const ALPHABET: &[u8; 32] = b"abcdefghijkmnpqrstuvwxyz23456789";
    recovery_code::Entity::delete_many().filter(recovery_code::Column::UserId.eq(user_id)).exec(conn).await?;
    let mut codes = Vec::with_capacity(RECOVERY_CODES);
    for _ in 0..RECOVERY_CODES {
        let mut bytes = [0u8; 12];
        getrandom::fill(&mut bytes).map_err(ApiError::internal)?;
        let chars: String = bytes.iter().map(|b| ALPHABET[usize::from(b % 32)] as char).collect();
        let code = format!("{}-{}-{}", &chars[0..4], &chars[4..8], &chars[8..12]);
        recovery_code::ActiveModel {
            id: Set(Uuid::now_v7()),
            user_id: Set(user_id),
            code_hash: Set(token::refresh_token_hash(&normalize_recovery(&code))),
            used_at: Set(None),
            created_at: Set(now),
        }
        .insert(conn)
        .await?;
        codes.push(code);
    }
    Ok(codes)
}

/// Sets `users.mfa_enabled` from the factors the user has now (a confirmed TOTP or a
/// passkey), in the caller's transaction.
pub async fn sync_flag(conn: &impl ConnectionTrait, user_id: Uuid) -> Result<bool, ApiError> {
    let enabled = has_totp(conn, user_id).await? || super::passkeys::has_passkeys(conn, user_id).await?;
    user::Entity::update_many()
        .col_expr(user::Column::MfaEnabled, Expr::value(enabled))
        .filter(user::Column::Id.eq(user_id))
        .exec(conn)
        .await?;
    Ok(enabled)
}

/// Whether the user has a confirmed TOTP factor (and so recovery codes): then every
/// sensitive change asks for a code.
pub async fn has_totp(conn: &impl ConnectionTrait, user_id: Uuid) -> Result<bool, ApiError> {
    Ok(totp_factor::Entity::find()
        .filter(totp_factor::Column::UserId.eq(user_id))
        .filter(totp_factor::Column::ConfirmedAt.is_not_null())
        .count(conn)
        .await?
        > 0)
}

/// The step-up of a sensitive change: when the user has a TOTP factor, `code` (a TOTP or
/// recovery code) must be right. Guesses count against the account's MFA budget.
pub async fn step_up(
    state: &AppState,
    account: &user::Model,
    code: Option<&str>,
    client: &ClientInfo,
) -> Result<(), ApiError> {
    if !has_totp(&state.db, account.id).await? {
        return Ok(());
    }
    let Some(code) = code.map(str::trim).filter(|c| !c.is_empty()) else {
        return Err(invalid_code(
            "This account has a second factor: send `code` (a TOTP or recovery code) too.",
        ));
    };
    charge_guess(state, account.id, client).await?;
    if !verify_code(state, account.id, code, client).await? {
        audit_failure(state, account.id, "step_up", client);
        return Err(invalid_code("The code is wrong, already used, or from another time."));
    }
    Ok(())
}

/// One guess at a second factor of `user_id`: the account's budget (across tickets) and
/// the client's login budget.
async fn charge_guess(state: &AppState, user_id: Uuid, client: &ClientInfo) -> Result<(), ApiError> {
    let rate = state.config.rate_limit_login_per_ip;
    limit::charge(state, Limit::LoginPerIp, &limit::ip_key(state, client), rate, client).await?;
    let rate = state.config.rate_limit_login_per_account;
    limit::charge(state, Limit::MfaPerAccount, &user_id.to_string(), rate, client).await
}

fn audit_failure(state: &AppState, user_id: Uuid, step: &'static str, client: &ClientInfo) {
    state.metrics.login("invalid_mfa_code");
    state.audit.record(AuditEvent::new("mfa_failure", step, state.clock.now()).user(user_id).client(client));
}

/// A TOTP code, else a recovery code: which one passed, or `None`.
/// A code from the user's confirmed TOTP factor (by compare-and-swap, see [`accept_totp`]).
async fn try_totp(state: &AppState, user_id: Uuid, code: &str) -> Result<bool, ApiError> {
    match factor(state, &state.db, user_id).await? {
        Some((row, secret)) if row.confirmed_at.is_some() => {
            accept_totp(state, &state.db, &row, secret, code).await
        }
        _ => Ok(false),
    }
}

/// One of the user's unused recovery codes; its use is audited with how many are left.
async fn try_recovery(
    state: &AppState,
    user_id: Uuid,
    code: &str,
    client: &ClientInfo,
) -> Result<bool, ApiError> {
    let now = state.clock.now();
    let Some(left) = accept_recovery(&state.db, user_id, code, now).await? else { return Ok(false) };
    state.audit.record(
        AuditEvent::new("recovery_code_used", "success", now)
            .user(user_id)
            .client(client)
            .detail(serde_json::json!({"remaining": left})),
    );
    Ok(true)
}

/// A TOTP code, else a recovery code: whether either passed.
async fn verify_code(
    state: &AppState,
    user_id: Uuid,
    code: &str,
    client: &ClientInfo,
) -> Result<bool, ApiError> {
    Ok(try_totp(state, user_id, code).await? || try_recovery(state, user_id, code, client).await?)
}

/// What a ticket remembers: whose password was right, and from which device.
#[derive(Serialize, Deserialize)]
struct Ticket {
    user_id: Uuid,
    device: Option<Uuid>,
}

fn ticket_key(mfa_token: &str) -> String {
    format!("mfa:{}", token::refresh_token_hash(mfa_token))
}

fn failures_key(mfa_token: &str) -> String {
    format!("mfa-failures:{}", token::refresh_token_hash(mfa_token))
}

/// The methods a user with a factor can finish a login with.
pub async fn methods(state: &AppState, user_id: Uuid) -> Result<Vec<String>, ApiError> {
    let mut methods = Vec::new();
    if has_totp(&state.db, user_id).await? {
        methods.push(Method::Totp.as_str().to_owned());
        methods.push(Method::RecoveryCode.as_str().to_owned());
    }
    if super::passkeys::has_passkeys(&state.db, user_id).await? {
        methods.push(Method::Webauthn.as_str().to_owned());
    }
    Ok(methods)
}

/// After a correct password for a user with a factor: a ticket instead of tokens.
pub async fn challenge(
    state: &AppState,
    account: &user::Model,
    device: Option<Uuid>,
    client: &ClientInfo,
) -> Result<ApiError, ApiError> {
    let mfa_token = token::new_refresh_token()?;
    let ticket =
        serde_json::to_string(&Ticket { user_id: account.id, device }).map_err(ApiError::internal)?;
    state.store.stash(&ticket_key(&mfa_token), &ticket, state.config.mfa_ticket_ttl).await?;
    let methods = methods(state, account.id).await?;
    state.metrics.login("mfa_required");
    state.audit.record(
        AuditEvent::new("login_mfa_required", "success", state.clock.now()).user(account.id).client(client),
    );
    Ok(ApiError::mfa_required(MfaChallenge { mfa_token, methods }))
}

fn ticket_gone() -> ApiError {
    ApiError::invalid_token("The MFA ticket is unknown, used or expired: log in again.")
}

/// The ticket's user, without using the ticket (for the passkey options of a ticket).
pub async fn ticket_user(state: &AppState, mfa_token: &str) -> Result<(Uuid, String), ApiError> {
    if mfa_token.len() > 128 {
        return Err(ticket_gone());
    }
    let key = ticket_key(mfa_token);
    let raw = state.store.peek(&key).await?.ok_or_else(ticket_gone)?;
    let ticket: Ticket = serde_json::from_str(&raw).map_err(|_| ticket_gone())?;
    Ok((ticket.user_id, key))
}

/// What completes a login's second step.
pub enum Proof {
    Code(Method, String),
    Passkey(serde_json::Value),
}

/// `POST /v1/auth/mfa`: the second factor for a ticket; the normal tokens when it is right.
pub async fn complete(
    state: &AppState,
    mfa_token: &str,
    proof: Proof,
    client: &ClientInfo,
) -> Result<Tokens, ApiError> {
    let (user_id, key) = ticket_user(state, mfa_token).await?;
    charge_guess(state, user_id, client).await?;
    let passed = match &proof {
        Proof::Code(Method::Totp, code) => try_totp(state, user_id, code).await?,
        Proof::Code(_, code) => try_recovery(state, user_id, code, client).await?,
        Proof::Passkey(credential) => {
            match super::passkeys::second_factor_finish(state, user_id, &key, credential.clone(), client)
                .await
            {
                Ok(()) => true,
                Err(e) if e.code == ErrorCode::InvalidMfaCode => false,
                Err(e) => return Err(e),
            }
        }
    };
    if !passed {
        audit_failure(state, user_id, "login", client);
        let failures = state.store.count(&failures_key(mfa_token), state.config.mfa_ticket_ttl).await?;
        if failures >= MAX_TICKET_FAILURES {
            state.store.take(&key).await?;
            return Err(invalid_code("Too many wrong codes: this login ended; log in again."));
        }
        return Err(invalid_code("The code is wrong, already used, or from another time."));
    }
    // Used once: of two requests that both passed, one gets the tokens.
    let raw = state.store.take(&key).await?.ok_or_else(ticket_gone)?;
    let ticket: Ticket = serde_json::from_str(&raw).map_err(|_| ticket_gone())?;
    let (account, roles) = users::profile_by_id(&state.db, ticket.user_id)
        .await?
        .filter(|(a, _)| a.disabled_at.is_none())
        .ok_or_else(auth::invalid_credentials)?;
    let amr = match proof {
        Proof::Passkey(_) => Amr::PASSWORD_PASSKEY,
        Proof::Code(..) => Amr::PASSWORD_OTP,
    };
    state.metrics.login("success");
    auth::open_session(state, &account, roles, amr, ticket.device, client, state.clock.now()).await
}

/// A TOTP secret to add to an authenticator app.
pub struct Enrolment {
    /// Base32, unpadded: what apps accept when typed.
    pub secret: String,
    pub otpauth_uri: String,
}

impl std::fmt::Debug for Enrolment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Enrolment(***)")
    }
}

/// `POST /v1/users/me/mfa/totp`: a new, unconfirmed secret (replacing an unconfirmed one).
/// A user with a confirmed factor removes it first.
pub async fn enrol_totp(
    state: &AppState,
    user_id: Uuid,
    current: crate::domain::Password,
    client: &ClientInfo,
) -> Result<Enrolment, ApiError> {
    let account =
        super::accounts::confirm_identity(state, user_id, current, None, "totp_enrol", client).await?;
    if has_totp(&state.db, user_id).await? {
        return Err(ApiError::validation("TOTP is already on: remove it first to enrol a new secret."));
    }
    let mut secret = vec![0u8; TOTP_SECRET_BYTES];
    getrandom::fill(&mut secret).map_err(ApiError::internal)?;
    let (sealed, format) =
        crate::keys::seal_user_secret(&state.keys.settings, &totp_context(user_id), &secret)
            .map_err(ApiError::internal)?;
    let totp = totp(secret, &account.email, &state.config.product_name)?;
    let now = state.clock.now();
    totp_factor::Entity::delete_by_id(user_id).exec(&state.db).await?;
    totp_factor::ActiveModel {
        user_id: Set(user_id),
        secret: Set(sealed),
        secret_encryption: Set(format),
        confirmed_at: Set(None),
        last_step: Set(None),
        created_at: Set(now),
    }
    .insert(&state.db)
    .await?;
    let otpauth_uri = totp.to_url().map_err(|e| ApiError::internal(format!("the otpauth URI: {e}")))?;
    Ok(Enrolment { secret: totp.secret().to_base32(), otpauth_uri })
}

/// Ends the user's other sessions in `txn` (a factor changed), to be finished after commit.
async fn end_others(
    txn: &impl ConnectionTrait,
    user_id: Uuid,
    session_id: Uuid,
    now: DateTime<Utc>,
) -> Result<sessions::Ended, ApiError> {
    sessions::end_in(txn, &Scope::AllOfUserExcept { user: user_id, keep: session_id }, now).await
}

/// `POST /v1/users/me/mfa/totp/confirm`: a correct code turns the factor on; the ten
/// recovery codes come back, once. The user's other sessions end.
pub async fn confirm_totp(
    state: &AppState,
    user_id: Uuid,
    session_id: Uuid,
    code: &str,
    client: &ClientInfo,
) -> Result<Vec<String>, ApiError> {
    charge_guess(state, user_id, client).await?;
    let now = state.clock.now();
    let txn = state.db.begin().await?;
    let Some((row, secret)) = factor(state, &txn, user_id).await? else {
        return Err(ApiError::validation("No TOTP secret to confirm: enrol first."));
    };
    if row.confirmed_at.is_some() {
        return Err(ApiError::validation("TOTP is already on."));
    }
    if !accept_totp(state, &txn, &row, secret, code).await? {
        drop(txn);
        audit_failure(state, user_id, "totp_confirm", client);
        return Err(invalid_code("The code is wrong: check the device's clock and try the next one."));
    }
    totp_factor::Entity::update_many()
        .col_expr(totp_factor::Column::ConfirmedAt, Expr::value(now))
        .filter(totp_factor::Column::UserId.eq(user_id))
        .exec(&txn)
        .await?;
    let codes = new_recovery_codes(&txn, user_id, now).await?;
    sync_flag(&txn, user_id).await?;
    let ended = end_others(&txn, user_id, session_id, now).await?;
    txn.commit().await?;
    sessions::finish_or_defer(state, ended).await;
    state.audit.record(
        AuditEvent::new("mfa_enrolled", "success", now)
            .user(user_id)
            .client(client)
            .detail(serde_json::json!({"factor": "totp"})),
    );
    Ok(codes)
}

/// `DELETE /v1/users/me/mfa/totp`: with the password and a code; other sessions end.
pub async fn remove_totp(
    state: &AppState,
    user_id: Uuid,
    session_id: Uuid,
    current: crate::domain::Password,
    code: Option<&str>,
    client: &ClientInfo,
) -> Result<(), ApiError> {
    super::accounts::confirm_identity(state, user_id, current, code, "totp_remove", client).await?;
    let now = state.clock.now();
    let txn = state.db.begin().await?;
    let gone = totp_factor::Entity::delete_by_id(user_id).exec(&txn).await?;
    if gone.rows_affected == 0 {
        return Err(ApiError::new(ErrorCode::NotFound, "This account has no TOTP factor."));
    }
    recovery_code::Entity::delete_many().filter(recovery_code::Column::UserId.eq(user_id)).exec(&txn).await?;
    sync_flag(&txn, user_id).await?;
    let ended = end_others(&txn, user_id, session_id, now).await?;
    txn.commit().await?;
    sessions::finish_or_defer(state, ended).await;
    state.audit.record(
        AuditEvent::new("mfa_removed", "success", now)
            .user(user_id)
            .client(client)
            .detail(serde_json::json!({"factor": "totp"})),
    );
    Ok(())
}

/// `POST /v1/users/me/mfa/recovery-codes`: a new set; the old one dies; other sessions end.
pub async fn regenerate_recovery_codes(
    state: &AppState,
    user_id: Uuid,
    session_id: Uuid,
    current: crate::domain::Password,
    code: Option<&str>,
    client: &ClientInfo,
) -> Result<Vec<String>, ApiError> {
    super::accounts::confirm_identity(state, user_id, current, code, "recovery_codes", client).await?;
    if !has_totp(&state.db, user_id).await? {
        return Err(ApiError::new(ErrorCode::NotFound, "Recovery codes come with TOTP: enrol it first."));
    }
    let now = state.clock.now();
    let txn = state.db.begin().await?;
    let codes = new_recovery_codes(&txn, user_id, now).await?;
    let ended = end_others(&txn, user_id, session_id, now).await?;
    txn.commit().await?;
    sessions::finish_or_defer(state, ended).await;
    state
        .audit
        .record(AuditEvent::new("recovery_codes_regenerated", "success", now).user(user_id).client(client));
    Ok(codes)
}
