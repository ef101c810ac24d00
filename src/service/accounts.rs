//! Accounts over email (issue 15): verification, password reset and change, email change,
//! deletion, and what admins do to accounts.
//!
//! Mailed links carry one-time tokens: 256 bits from the CSPRNG, of which SQL keeps only
//! the SHA-256, bound to a purpose, a user and the address the link was mailed to. A token
//! is used by a compare-and-swap (`used_at IS NULL`), and issuing or using one retires
//! every other unused token of its purpose for that user. A mail is queued in the same
//! transaction as the token it carries.
//!
//! Register (with verification on), resend and forgot answer the same for known and
//! unknown addresses: the same status and body, the same work (the per-address and per-IP
//! mail limits are charged for every well-formed address, silently), and no answer before
//! [`ANSWER_FLOOR`] has passed since the request arrived.
//!
//! Sessions end in the same transaction as the change that ends them (through
//! `sessions::end_in`), and the revocation store is told after the commit.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait as _};
use sea_orm::{
    ActiveModelTrait as _, ColumnTrait as _, ConnectionTrait, EntityTrait as _, QueryFilter as _,
    QueryOrder as _, QuerySelect as _, Set, SqlErr, TransactionTrait as _,
};
use uuid::Uuid;

use super::limit::{self, Limit};
use super::sessions::{self, Scope};
use super::{ClientInfo, users};
use crate::audit::AuditEvent;
use crate::config::EmailVerification;
use crate::domain::{Email, Password};
use crate::error::{ApiError, ErrorCode};
use crate::mail::{LinkPage, Mail};
use crate::state::AppState;
use crate::store::entity::{audit_log, one_time_token, revocation_job, role, session, user, user_role};
use crate::token;

/// No answer to register (with verification), resend or forgot comes sooner than this
/// after the request arrived: the work for a known address (a token, a mail) and for an
/// unknown one (none) then take the same time from outside.
pub const ANSWER_FLOOR: Duration = Duration::from_millis(300);

/// A mailed token is 43 base64url characters; anything much longer cannot match.
const MAX_TOKEN_LEN: usize = 128;

/// What a one-time token is for; a token of one purpose is refused by every other flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    VerifyEmail,
    ResetPassword,
    ConfirmEmail,
}

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::VerifyEmail => "verify_email",
            Purpose::ResetPassword => "reset_password",
            Purpose::ConfirmEmail => "confirm_email",
        }
    }
}

pub fn invalid_token() -> ApiError {
    ApiError::new(
        ErrorCode::InvalidOneTimeToken,
        "This link is unknown, already used, replaced by a newer one or expired: ask for a new one.",
    )
}

pub fn wrong_password() -> ApiError {
    ApiError::new(ErrorCode::WrongPassword, "The current password is wrong.")
}

fn ttl(d: Duration) -> Result<chrono::Duration, ApiError> {
    chrono::Duration::from_std(d).map_err(ApiError::internal)
}

/// How a lifetime reads in a mail: `30m`, `1h`, `1day`.
fn readable(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// A stored (canonical) address as the typed `Email` a mail needs.
fn address(stored: &str) -> Result<Email, ApiError> {
    Email::parse(stored).map_err(|_| ApiError::internal("a stored email does not parse"))
}

/// Answers no sooner than [`ANSWER_FLOOR`] after `started`.
async fn after_floor<T>(started: tokio::time::Instant, result: T) -> T {
    tokio::time::sleep_until(started + ANSWER_FLOOR).await;
    result
}

/// Retires every unused token of `purposes` for `user_id`.
async fn retire_tokens(
    conn: &impl ConnectionTrait,
    user_id: Uuid,
    purposes: &[Purpose],
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    one_time_token::Entity::update_many()
        .col_expr(one_time_token::Column::UsedAt, Expr::value(now))
        .filter(one_time_token::Column::UserId.eq(user_id))
        .filter(one_time_token::Column::Purpose.is_in(purposes.iter().map(|p| p.as_str())))
        .filter(one_time_token::Column::UsedAt.is_null())
        .exec(conn)
        .await?;
    Ok(())
}

/// A new token of `purpose` for `user_id`, mailed to `email`; earlier unused tokens of the
/// purpose die. Returns the token (only its hash is stored).
async fn issue_token(
    conn: &impl ConnectionTrait,
    purpose: Purpose,
    user_id: Uuid,
    email: &str,
    session_id: Option<Uuid>,
    lifetime: Duration,
    now: DateTime<Utc>,
) -> Result<String, ApiError> {
    retire_tokens(conn, user_id, &[purpose], now).await?;
    let secret = token::new_refresh_token()?;
    one_time_token::ActiveModel {
        id: Set(Uuid::now_v7()),
        purpose: Set(purpose.as_str().to_owned()),
        user_id: Set(user_id),
        email: Set(email.to_owned()),
        token_hash: Set(token::refresh_token_hash(&secret)),
        session_id: Set(session_id),
        created_at: Set(now),
        expires_at: Set(now + ttl(lifetime)?),
        used_at: Set(None),
    }
    .insert(conn)
    .await?;
    Ok(secret)
}

/// The unused, unexpired token of `purpose` that `presented` is, without using it.
async fn find_token(
    conn: &impl ConnectionTrait,
    purpose: Purpose,
    presented: &str,
    now: DateTime<Utc>,
) -> Result<one_time_token::Model, ApiError> {
    if presented.is_empty() || presented.len() > MAX_TOKEN_LEN {
        return Err(invalid_token());
    }
    let row = one_time_token::Entity::find()
        .filter(one_time_token::Column::TokenHash.eq(token::refresh_token_hash(presented)))
        .one(conn)
        .await?
        .ok_or_else(invalid_token)?;
    if row.purpose != purpose.as_str() || row.used_at.is_some() || now >= row.expires_at {
        return Err(invalid_token());
    }
    Ok(row)
}

/// Uses the token: exactly one caller wins the compare-and-swap; the user's other unused
/// tokens of the purpose die with it.
async fn use_token(
    conn: &impl ConnectionTrait,
    purpose: Purpose,
    presented: &str,
    now: DateTime<Utc>,
) -> Result<one_time_token::Model, ApiError> {
    let row = find_token(conn, purpose, presented, now).await?;
    let used = one_time_token::Entity::update_many()
        .col_expr(one_time_token::Column::UsedAt, Expr::value(now))
        .filter(one_time_token::Column::Id.eq(row.id))
        .filter(one_time_token::Column::UsedAt.is_null())
        .exec(conn)
        .await?;
    if used.rows_affected != 1 {
        return Err(invalid_token());
    }
    retire_tokens(conn, row.user_id, &[purpose], now).await?;
    Ok(row)
}

async fn account(conn: &impl ConnectionTrait, user_id: Uuid) -> Result<Option<user::Model>, ApiError> {
    Ok(user::Entity::find_by_id(user_id).one(conn).await?)
}

async fn account_by_email(
    conn: &impl ConnectionTrait,
    email: &Email,
) -> Result<Option<user::Model>, ApiError> {
    Ok(user::Entity::find().filter(user::Column::Email.eq(email.as_str())).one(conn).await?)
}

/// Mails `account` a fresh verification link (a login refused as unverified).
pub async fn mail_verification(
    state: &AppState,
    account: &user::Model,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    let txn = state.db.begin().await?;
    queue_verification(state, &txn, account, now).await?;
    txn.commit().await?;
    Ok(())
}

/// Queues a verification link for `account` in `conn`'s transaction.
async fn queue_verification(
    state: &AppState,
    conn: &impl ConnectionTrait,
    account: &user::Model,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    let lifetime = state.config.verify_email_ttl;
    let secret =
        issue_token(conn, Purpose::VerifyEmail, account.id, &account.email, None, lifetime, now).await?;
    let mail = Mail::VerifyEmail {
        to: address(&account.email)?,
        link: state.outbox.link(LinkPage::VerifyEmail, &secret),
        expires_in: readable(lifetime),
    };
    state.outbox.enqueue(conn, &mail).await?;
    Ok(())
}

/// Queues a password-reset link for `account`; `attempt` makes it the "someone tried to
/// sign up with your address" mail, whose link is a reset link too.
async fn queue_reset(
    state: &AppState,
    conn: &impl ConnectionTrait,
    account: &user::Model,
    attempt: bool,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    let lifetime = state.config.password_reset_ttl;
    let secret =
        issue_token(conn, Purpose::ResetPassword, account.id, &account.email, None, lifetime, now).await?;
    let to = address(&account.email)?;
    let link = state.outbox.link(LinkPage::ResetPassword, &secret);
    let mail = if attempt {
        Mail::SignupAttempt { to, link }
    } else {
        Mail::ResetPassword { to, link, expires_in: readable(lifetime) }
    };
    state.outbox.enqueue(conn, &mail).await?;
    Ok(())
}

/// Sign-up with verification on (`optional` or `required`): the same answer, work and
/// time for a new and a taken address. A new one gets an account and a verification
/// link; the owner of a taken one gets a "someone tried to sign up" mail.
pub async fn sign_up(
    state: &AppState,
    email: Email,
    password: Password,
    client: &ClientInfo,
) -> Result<(), ApiError> {
    let started = tokio::time::Instant::now();
    let rate = state.config.rate_limit_register_per_ip;
    limit::charge(state, Limit::RegisterPerIp, &limit::ip_key(state, client), rate, client).await?;
    // Judged and hashed for both: a weak password is refused alike, and the work is equal.
    let password = state.hasher.judge(password, &email, state.config.password_min_strength).await??;
    let password_hash = state.hasher.hash(password).await?;
    let result = sign_up_mail(state, &email, password_hash, client).await;
    after_floor(started, result).await
}

async fn sign_up_mail(
    state: &AppState,
    email: &Email,
    hash: String,
    client: &ClientInfo,
) -> Result<(), ApiError> {
    let mail = limit::mail_allowed(state, email.as_str(), client).await?;
    let now = state.clock.now();
    if account_by_email(&state.db, email).await?.is_none() {
        let txn = state.db.begin().await?;
        match users::insert_user(&txn, email, hash, now).await {
            Ok(created) => {
                if mail {
                    queue_verification(state, &txn, &created, now).await?;
                }
                txn.commit().await?;
                state
                    .audit
                    .record(AuditEvent::new("register", "success", now).user(created.id).client(client));
                return Ok(());
            }
            // Registered by a concurrent request: answered as taken, below.
            Err(e) if e.code == ErrorCode::EmailTaken => txn.rollback().await?,
            Err(e) => return Err(e),
        }
    }
    let Some(owner) = account_by_email(&state.db, email).await? else {
        return Err(ApiError::unavailable("The account changed while signing up; try again."));
    };
    if mail && owner.disabled_at.is_none() {
        let txn = state.db.begin().await?;
        queue_reset(state, &txn, &owner, true, now).await?;
        txn.commit().await?;
    }
    state.audit.record(AuditEvent::new("register", "email_taken", now).client(client));
    Ok(())
}

/// `POST /v1/auth/verify-email`.
pub async fn verify_email(state: &AppState, presented: &str, client: &ClientInfo) -> Result<(), ApiError> {
    let now = state.clock.now();
    let txn = state.db.begin().await?;
    let row = use_token(&txn, Purpose::VerifyEmail, presented, now).await?;
    // Bound to the address it was mailed to: after an email change it verifies nothing.
    let verified = user::Entity::update_many()
        .col_expr(user::Column::EmailVerifiedAt, Expr::value(now))
        .col_expr(user::Column::IsVerified, Expr::value(true))
        .col_expr(user::Column::UpdatedAt, Expr::value(now))
        .filter(user::Column::Id.eq(row.user_id))
        .filter(user::Column::Email.eq(row.email.as_str()))
        .exec(&txn)
        .await?;
    if verified.rows_affected != 1 {
        return Err(invalid_token());
    }
    txn.commit().await?;
    state.audit.record(AuditEvent::new("email_verified", "success", now).user(row.user_id).client(client));
    Ok(())
}

/// `POST /v1/auth/verify-email/resend`: a new link if the address has an unverified
/// account (and verification is on); the same answer whatever the case.
pub async fn resend_verification(
    state: &AppState,
    email: &Email,
    client: &ClientInfo,
) -> Result<(), ApiError> {
    let started = tokio::time::Instant::now();
    let result = async {
        let mail = limit::mail_allowed(state, email.as_str(), client).await?;
        let found = account_by_email(&state.db, email).await?;
        let wanted = state.config.email_verification != EmailVerification::Off;
        if let Some(account) =
            found.filter(|a| mail && wanted && a.email_verified_at.is_none() && a.disabled_at.is_none())
        {
            let now = state.clock.now();
            let txn = state.db.begin().await?;
            queue_verification(state, &txn, &account, now).await?;
            txn.commit().await?;
        }
        Ok(())
    }
    .await;
    after_floor(started, result).await
}

/// `POST /v1/auth/password/forgot`: a reset link if the address has an account that is
/// not disabled; the same answer whatever the case.
pub async fn forgot_password(state: &AppState, email: &Email, client: &ClientInfo) -> Result<(), ApiError> {
    let started = tokio::time::Instant::now();
    let result = async {
        let mail = limit::mail_allowed(state, email.as_str(), client).await?;
        let found = account_by_email(&state.db, email).await?;
        if let Some(account) = found.filter(|a| mail && a.disabled_at.is_none()) {
            let now = state.clock.now();
            let txn = state.db.begin().await?;
            queue_reset(state, &txn, &account, false, now).await?;
            txn.commit().await?;
            state.audit.record(
                AuditEvent::new("password_reset_requested", "success", now).user(account.id).client(client),
            );
        }
        Ok(())
    }
    .await;
    after_floor(started, result).await
}

/// `POST /v1/auth/password/reset`: a new password for the link's account; every session
/// of it ends. The link also proves the mailbox, so the address counts as verified.
pub async fn reset_password(
    state: &AppState,
    presented: &str,
    new_password: Password,
    code: Option<&str>,
    client: &ClientInfo,
) -> Result<(), ApiError> {
    let now = state.clock.now();
    // Judged before the token is used: a weak password leaves the link working.
    let row = find_token(&state.db, Purpose::ResetPassword, presented, now).await?;
    let owner = account(&state.db, row.user_id).await?.ok_or_else(invalid_token)?;
    // A reset must not get around the second factor.
    super::mfa::step_up(state, &owner, code, client).await?;
    let password = state
        .hasher
        .judge(new_password, &address(&owner.email)?, state.config.password_min_strength)
        .await??;
    let hash = state.hasher.hash(password).await?;

    let now = state.clock.now();
    let txn = state.db.begin().await?;
    let row = use_token(&txn, Purpose::ResetPassword, presented, now).await?;
    let changed = user::Entity::update_many()
        .col_expr(user::Column::PasswordHash, Expr::value(hash))
        .col_expr(user::Column::UpdatedAt, Expr::value(now))
        .col_expr(user::Column::EmailVerifiedAt, Expr::col(user::Column::EmailVerifiedAt).if_null(now))
        .col_expr(user::Column::IsVerified, Expr::value(true))
        .filter(user::Column::Id.eq(row.user_id))
        .filter(user::Column::Email.eq(row.email.as_str()))
        .filter(user::Column::DisabledAt.is_null())
        .exec(&txn)
        .await?;
    if changed.rows_affected != 1 {
        return Err(invalid_token());
    }
    let ended = sessions::end_in(&txn, &Scope::AllOfUser(row.user_id), now).await?;
    state.outbox.enqueue(&txn, &Mail::PasswordChanged { to: address(&row.email)? }).await?;
    txn.commit().await?;
    sessions::finish_or_defer(state, ended).await;
    state.audit.record(AuditEvent::new("password_reset", "success", now).user(row.user_id).client(client));
    Ok(())
}

/// The signed-in user's account, with the current password checked. Charged to the
/// account's login budget first, so a stolen access token cannot guess the password.
/// With a second factor (TOTP), `code` must be right too (the step-up, see `mfa`).
pub(crate) async fn confirm_identity(
    state: &AppState,
    user_id: Uuid,
    current: Password,
    code: Option<&str>,
    action: &'static str,
    client: &ClientInfo,
) -> Result<user::Model, ApiError> {
    let owner = account(&state.db, user_id)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::TokenRevoked, "The account no longer exists."))?;
    let rate = state.config.rate_limit_login_per_account;
    limit::charge(state, Limit::LoginPerAccount, &owner.email, rate, client).await?;
    if !state.hasher.verify(current, Some(&owner.password_hash)).await? {
        state.audit.record(
            AuditEvent::new(action, "wrong_password", state.clock.now()).user(user_id).client(client),
        );
        return Err(wrong_password());
    }
    super::mfa::step_up(state, &owner, code, client).await?;
    Ok(owner)
}

/// `POST /v1/users/me/password`: every other session of the user ends; this one stays.
pub async fn change_password(
    state: &AppState,
    user_id: Uuid,
    session_id: Uuid,
    current: Password,
    code: Option<&str>,
    new_password: Password,
    client: &ClientInfo,
) -> Result<(), ApiError> {
    let owner = confirm_identity(state, user_id, current, code, "password_change", client).await?;
    let password = state
        .hasher
        .judge(new_password, &address(&owner.email)?, state.config.password_min_strength)
        .await??;
    let hash = state.hasher.hash(password).await?;
    let now = state.clock.now();
    let txn = state.db.begin().await?;
    user::Entity::update_many()
        .col_expr(user::Column::PasswordHash, Expr::value(hash))
        .col_expr(user::Column::UpdatedAt, Expr::value(now))
        .filter(user::Column::Id.eq(user_id))
        .exec(&txn)
        .await?;
    // A reset link mailed before the change would undo it.
    retire_tokens(&txn, user_id, &[Purpose::ResetPassword], now).await?;
    let ended =
        sessions::end_in(&txn, &Scope::AllOfUserExcept { user: user_id, keep: session_id }, now).await?;
    state.outbox.enqueue(&txn, &Mail::PasswordChanged { to: address(&owner.email)? }).await?;
    txn.commit().await?;
    sessions::finish_or_defer(state, ended).await;
    state.audit.record(AuditEvent::new("password_changed", "success", now).user(user_id).client(client));
    Ok(())
}

/// `POST /v1/users/me/email`: a confirmation link to the new address, a notice to the old
/// one; nothing changes until the link is used. A new address that already has an account
/// is answered the same and gets no link (nor does anyone learn it is taken).
pub async fn change_email(
    state: &AppState,
    user_id: Uuid,
    session_id: Uuid,
    new_email: &Email,
    current: Password,
    code: Option<&str>,
    client: &ClientInfo,
) -> Result<(), ApiError> {
    let owner = confirm_identity(state, user_id, current, code, "email_change", client).await?;
    if owner.email == new_email.as_str() {
        return Err(ApiError::validation("new_email: this is already the account's email"));
    }
    let mail = limit::mail_allowed(state, new_email.as_str(), client).await?;
    let taken = account_by_email(&state.db, new_email).await?.is_some();
    let now = state.clock.now();
    if mail {
        let lifetime = state.config.email_change_ttl;
        let txn = state.db.begin().await?;
        if !taken {
            let secret = issue_token(
                &txn,
                Purpose::ConfirmEmail,
                user_id,
                new_email.as_str(),
                Some(session_id),
                lifetime,
                now,
            )
            .await?;
            let confirm = Mail::ConfirmNewEmail {
                to: new_email.clone(),
                new_email: new_email.clone(),
                link: state.outbox.link(LinkPage::ConfirmEmail, &secret),
                expires_in: readable(lifetime),
            };
            state.outbox.enqueue(&txn, &confirm).await?;
        }
        let notice = Mail::EmailChanging { to: address(&owner.email)?, new_email: new_email.clone() };
        state.outbox.enqueue(&txn, &notice).await?;
        txn.commit().await?;
    }
    state
        .audit
        .record(AuditEvent::new("email_change_requested", "success", now).user(user_id).client(client));
    Ok(())
}

/// `POST /v1/auth/confirm-email`: the new address applies and counts as verified; every
/// session but the one that asked for the change ends.
pub async fn confirm_email(state: &AppState, presented: &str, client: &ClientInfo) -> Result<(), ApiError> {
    let now = state.clock.now();
    let txn = state.db.begin().await?;
    let row = use_token(&txn, Purpose::ConfirmEmail, presented, now).await?;
    let changed = user::Entity::update_many()
        .col_expr(user::Column::Email, Expr::value(row.email.as_str()))
        .col_expr(user::Column::EmailVerifiedAt, Expr::value(now))
        .col_expr(user::Column::IsVerified, Expr::value(true))
        .col_expr(user::Column::UpdatedAt, Expr::value(now))
        .filter(user::Column::Id.eq(row.user_id))
        .filter(user::Column::DisabledAt.is_null())
        .exec(&txn)
        .await;
    match changed {
        Ok(done) if done.rows_affected == 1 => {}
        Ok(_) => return Err(invalid_token()),
        Err(e) if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
            return Err(ApiError::new(ErrorCode::EmailTaken, "Another account has this email now."));
        }
        Err(e) => return Err(e.into()),
    }
    // Links mailed to the old address are for an address the account no longer has.
    retire_tokens(&txn, row.user_id, &[Purpose::VerifyEmail, Purpose::ResetPassword], now).await?;
    let scope = match row.session_id {
        Some(keep) => Scope::AllOfUserExcept { user: row.user_id, keep },
        None => Scope::AllOfUser(row.user_id),
    };
    let ended = sessions::end_in(&txn, &scope, now).await?;
    txn.commit().await?;
    sessions::finish_or_defer(state, ended).await;
    state.audit.record(AuditEvent::new("email_changed", "success", now).user(row.user_id).client(client));
    Ok(())
}

/// `DELETE /v1/users/me`.
pub async fn delete_own(
    state: &AppState,
    user_id: Uuid,
    current: Password,
    code: Option<&str>,
    client: &ClientInfo,
) -> Result<(), ApiError> {
    confirm_identity(state, user_id, current, code, "account_delete", client).await?;
    delete_account(state, user_id, None, client).await
}

/// Deletes the account: it is disabled first (so no login can start a session from then
/// on, see `auth::write_login`), its sessions end and the revocation store learns it, and
/// only then do the account, its sessions, roles and tokens go. Its audit rows stay, with
/// no user. `admin` is the admin who deleted it, if one did.
pub async fn delete_account(
    state: &AppState,
    user_id: Uuid,
    admin: Option<Uuid>,
    client: &ClientInfo,
) -> Result<(), ApiError> {
    disable(state, user_id).await?;
    // Revocations of this user's sessions that the store has not seen yet must reach it
    // before the rows that name the sessions go.
    if state.revocations.is_dirty() || has_jobs(state, user_id).await? {
        sessions::reconcile(state).await?;
    }
    // Events of this user still queued for the audit log are written without it.
    state.audit.forget_user(user_id);
    let now = state.clock.now();
    let txn = state.db.begin().await?;
    let owner = account(&txn, user_id).await?.ok_or_else(no_such_user)?;
    state.outbox.enqueue(&txn, &Mail::AccountDeleted { to: address(&owner.email)? }).await?;
    audit_log::Entity::update_many()
        .col_expr(audit_log::Column::UserId, Expr::value(Option::<Uuid>::None))
        .filter(audit_log::Column::UserId.eq(user_id))
        .exec(&txn)
        .await?;
    revocation_job::Entity::delete_many()
        .filter(revocation_job::Column::UserId.eq(user_id))
        .exec(&txn)
        .await?;
    // Cascades to sessions, refresh tokens, roles and one-time tokens.
    user::Entity::delete_by_id(user_id).exec(&txn).await?;
    txn.commit().await?;
    // The deletion's own row names nobody either.
    let detail = match admin {
        Some(admin) => serde_json::json!({"by": "admin", "admin_id": admin}),
        None => serde_json::json!({"by": "owner"}),
    };
    state.audit.record(AuditEvent::new("account_deleted", "success", now).client(client).detail(detail));
    Ok(())
}

async fn has_jobs(state: &AppState, user_id: Uuid) -> Result<bool, ApiError> {
    let own_sessions = session::Entity::find()
        .select_only()
        .column(session::Column::Id)
        .filter(session::Column::UserId.eq(user_id));
    let found =
        revocation_job::Entity::find()
            .filter(revocation_job::Column::UserId.eq(user_id).or(
                revocation_job::Column::SessionId.in_subquery(sea_orm::QueryTrait::into_query(own_sessions)),
            ))
            .limit(1)
            .all(&state.db)
            .await?;
    Ok(!found.is_empty())
}

fn no_such_user() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "No such user.")
}

/// Disables the account and ends every session of it. A disabled account's login is
/// answered like a wrong password. Idempotent.
pub async fn disable(state: &AppState, user_id: Uuid) -> Result<(), ApiError> {
    let now = state.clock.now();
    let txn = state.db.begin().await?;
    let found = user::Entity::update_many()
        .col_expr(user::Column::DisabledAt, Expr::col(user::Column::DisabledAt).if_null(now))
        .col_expr(user::Column::UpdatedAt, Expr::value(now))
        .filter(user::Column::Id.eq(user_id))
        .exec(&txn)
        .await?;
    if found.rows_affected != 1 {
        return Err(no_such_user());
    }
    retire_tokens(&txn, user_id, &[Purpose::VerifyEmail, Purpose::ResetPassword, Purpose::ConfirmEmail], now)
        .await?;
    let ended = sessions::end_in(&txn, &Scope::AllOfUser(user_id), now).await?;
    txn.commit().await?;
    // Unlike a password change, a disable is not done until the store refuses the sessions.
    sessions::finish(state, ended).await?;
    Ok(())
}

/// Lets a disabled account log in again.
pub async fn enable(state: &AppState, user_id: Uuid) -> Result<(), ApiError> {
    let now = state.clock.now();
    let found = user::Entity::update_many()
        .col_expr(user::Column::DisabledAt, Expr::value(Option::<DateTime<Utc>>::None))
        .col_expr(user::Column::UpdatedAt, Expr::value(now))
        .filter(user::Column::Id.eq(user_id))
        .exec(&state.db)
        .await?;
    if found.rows_affected != 1 {
        return Err(no_such_user());
    }
    Ok(())
}

/// The largest page of the admin's user list.
pub const MAX_USERS_PAGE: u64 = 100;

/// One page of accounts, oldest first (ids are time-ordered UUIDv7s).
pub struct UserPage {
    pub users: Vec<users::Profile>,
    pub next_cursor: Option<String>,
}

/// `GET /v1/admin/users`: accounts whose email contains `query` (case-insensitive), a
/// page of `limit` after `cursor` (the last id of the previous page).
pub async fn list_users(
    state: &AppState,
    query: Option<&str>,
    cursor: Option<&str>,
    limit: u64,
) -> Result<UserPage, ApiError> {
    let limit = limit.clamp(1, MAX_USERS_PAGE);
    let mut select = user::Entity::find().select_only().column(user::Column::Id);
    if let Some(q) = query.map(str::trim).filter(|q| !q.is_empty()) {
        if q.chars().count() > 254 {
            return Err(ApiError::validation("query: at most 254 characters"));
        }
        // Emails are stored lower-cased; LIKE's wildcards in the query match themselves.
        let escaped = q.to_lowercase().replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
        select = select.filter(
            Expr::col(user::Column::Email)
                .like(sea_orm::sea_query::LikeExpr::new(format!("%{escaped}%")).escape('\\')),
        );
    }
    if let Some(cursor) = cursor {
        let after: Uuid =
            cursor.parse().map_err(|_| ApiError::validation("cursor: not a cursor from this list"))?;
        select = select.filter(user::Column::Id.gt(after));
    }
    let ids: Vec<Uuid> =
        select.order_by_asc(user::Column::Id).limit(limit + 1).into_tuple().all(&state.db).await?;
    let more = ids.len() as u64 > limit;
    let ids: Vec<Uuid> = ids.into_iter().take(limit as usize).collect();
    let mut found = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(users::PROFILE_BATCH) {
        let mut profiles = users::profiles(&state.db, chunk.to_vec()).await?;
        found.extend(chunk.iter().filter_map(|id| profiles.remove(id)));
    }
    let next_cursor = if more { ids.last().map(Uuid::to_string) } else { None };
    Ok(UserPage { users: found, next_cursor })
}

/// The most roles one user can have, and the longest role name.
pub const MAX_ROLES: usize = 32;
pub const MAX_ROLE_NAME: usize = 64;

/// `PUT /v1/admin/users/{id}/roles`: the user's roles become exactly `roles`. Names are
/// 1 to 64 of `a-z 0-9 _ - : .`. Returns them sorted.
pub async fn set_roles(state: &AppState, user_id: Uuid, roles: Vec<String>) -> Result<Vec<String>, ApiError> {
    let mut roles = roles;
    roles.sort();
    roles.dedup();
    if roles.len() > MAX_ROLES {
        return Err(ApiError::validation(format!("roles: at most {MAX_ROLES}")));
    }
    let valid = |r: &str| {
        (1..=MAX_ROLE_NAME).contains(&r.len())
            && r.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-:.".contains(&b))
    };
    if let Some(bad) = roles.iter().find(|r| !valid(r)) {
        let shown: String = bad.chars().take(MAX_ROLE_NAME).collect();
        return Err(ApiError::validation(format!(
            "roles: {shown:?} is not a role name (1 to {MAX_ROLE_NAME} of a-z, 0-9, _ - : .)"
        )));
    }
    let now = state.clock.now();
    let txn = state.db.begin().await?;
    account(&txn, user_id).await?.ok_or_else(no_such_user)?;
    for name in &roles {
        role::Entity::insert(role::ActiveModel {
            id: Set(Uuid::now_v7()),
            name: Set(name.clone()),
            created_at: Set(now),
        })
        .on_conflict_do_nothing_on([role::Column::Name])
        .exec_without_returning(&txn)
        .await?;
    }
    let ids: Vec<Uuid> = role::Entity::find()
        .select_only()
        .column(role::Column::Id)
        .filter(role::Column::Name.is_in(roles.iter().map(String::as_str)))
        .into_tuple()
        .all(&txn)
        .await?;
    let mut stale = user_role::Entity::delete_many().filter(user_role::Column::UserId.eq(user_id));
    if !ids.is_empty() {
        stale = stale.filter(user_role::Column::RoleId.is_not_in(ids.clone()));
    }
    stale.exec(&txn).await?;
    for role_id in ids {
        user_role::Entity::insert(user_role::ActiveModel {
            user_id: Set(user_id),
            role_id: Set(role_id),
            created_at: Set(now),
        })
        .on_conflict_do_nothing_on([user_role::Column::UserId, user_role::Column::RoleId])
        .exec_without_returning(&txn)
        .await?;
    }
    txn.commit().await?;
    Ok(roles)
}
