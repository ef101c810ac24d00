//! Register, login, refresh (rotation), logout and the profile.
//!
//! SQL is the truth and the serialisation point; the revocation store is written after
//! each commit, idempotently. What a retired refresh token gets when presented again is
//! decided in exactly one place: `on_reuse`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{CommonTableExpression, Expr, WithClause};
use sea_orm::{
    ActiveModelTrait as _, ColumnTrait as _, ConnectionTrait, DatabaseConnection, DbBackend,
    EntityTrait as _, QueryFilter as _, QuerySelect as _, QueryTrait as _, Set, TransactionTrait as _,
};
use uuid::Uuid;

use super::limit::{self, Limit};
use super::{ClientInfo, accounts, sessions, users};
use crate::audit::AuditEvent;
use crate::config::EmailVerification;
use crate::domain::{Email, Password};
use crate::error::{ApiError, ErrorCode};
use crate::mail::{LinkPage, Mail};
use crate::state::AppState;
use crate::store::entity::{email_outbox, refresh_token, role, session, user, user_role};
use crate::store::revocation::{Activated, Activation, SessionRecord, TokenInfo, TokenState};
use crate::token::{self, AccessClaims};

/// What login and refresh hand back. `Debug` shows neither token.
pub struct Tokens {
    pub access_token: String,
    pub expires_in: u64,
    pub refresh_token: String,
    pub refresh_expires_in: u64,
    pub session_id: Uuid,
    /// Login only: names this device for this account (see `devices`).
    pub device_token: Option<String>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("access_token", &"***")
            .field("expires_in", &self.expires_in)
            .field("refresh_token", &"***")
            .field("refresh_expires_in", &self.refresh_expires_in)
            .field("session_id", &self.session_id)
            .field("device_token", &self.device_token.as_ref().map(|_| "***"))
            .finish()
    }
}

/// A user agent longer than this is cut: it is a label, not evidence.
const MAX_USER_AGENT: usize = 512;

fn user_agent(client: &ClientInfo) -> Option<String> {
    client.user_agent.as_ref().map(|ua| ua.chars().take(MAX_USER_AGENT).collect())
}

fn seconds_until(now: DateTime<Utc>, then: DateTime<Utc>) -> u64 {
    u64::try_from((then - now).num_seconds()).unwrap_or(0)
}

pub async fn register(
    state: &AppState,
    email: Email,
    password: Password,
    client: &ClientInfo,
) -> Result<user::Model, ApiError> {
    let rate = state.config.rate_limit_register_per_ip;
    limit::charge(state, Limit::RegisterPerIp, &limit::ip_key(state, client), rate, client).await?;
    let password = state.hasher.judge(password, &email, state.config.password_min_strength).await??;
    let password_hash = state.hasher.hash(password).await?;
    let now = state.clock.now();
    let created = match users::insert_user(&state.db, &email, password_hash, now).await {
        Ok(created) => created,
        Err(e) => {
            if e.code == ErrorCode::EmailTaken {
                state.audit.record(AuditEvent::new("register", "email_taken", now).client(client));
            }
            return Err(e);
        }
    };
    state.audit.record(AuditEvent::new("register", "success", now).user(created.id).client(client));
    Ok(created)
}

pub fn invalid_credentials() -> ApiError {
    ApiError::new(ErrorCode::InvalidCredentials, "The email or password is incorrect.")
}

/// Logs in. Limits are charged first, before any hashing: the client's address, then the
/// account (the canonical email, whether or not it exists) or the presented device, then
/// the cool-down of that device or of this (account, network) pair.
pub async fn login(
    state: &AppState,
    raw_email: &str,
    password: Password,
    device_token: Option<&str>,
    client: &ClientInfo,
) -> Result<Tokens, ApiError> {
    let Ok(email) = Email::parse(raw_email) else {
        return login_malformed(state, client).await;
    };
    let now = state.clock.now();
    // Keyed by the canonical form: another spelling of the address buys no new budget.
    let account_key = email.as_str();
    let device = device_token.and_then(|t| state.devices.verify(account_key, t, now));
    let judge = limit::admit_login(state, account_key, device, client).await?;

    let failures_key = judge.failures_key.as_str();
    let fail = |user_id: Option<Uuid>| async move {
        state
            .limits
            .record_failure(failures_key, state.config.login_cooldown, now.timestamp_millis())
            .await?;
        Err::<Tokens, ApiError>(login_failed(state, user_id, client, now))
    };
    let found = users::profile_by_email(&state.db, &email).await?;
    // Unknown emails verify against the dummy hash: the same work, the same answer.
    let ok = state.hasher.verify(password, found.as_ref().map(|(u, _)| u.password_hash.as_str())).await?;
    let (account, roles) = match found {
        // A disabled account is answered like a wrong password.
        Some(profile) if ok && profile.0.disabled_at.is_none() => profile,
        other => return fail(other.map(|(a, _)| a.id)).await,
    };
    if judge.failures {
        state.limits.clear_failures(failures_key).await?;
    }
    if state.config.email_verification == EmailVerification::Required && account.email_verified_at.is_none() {
        return Err(unverified(state, &account, client, now).await);
    }
    if account.mfa_enabled {
        // The password alone opens nothing: a ticket for the second factor.
        return Err(super::mfa::challenge(state, &account, device, client).await?);
    }
    state.metrics.login("success");
    open_session(state, &account, roles, Amr::PASSWORD, device, client, now).await
}

/// How the user proved who they are (RFC 8176 `amr` values), as a session keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Amr(&'static str);

impl Amr {
    pub const PASSWORD: Amr = Amr("pwd");
    pub const PASSWORD_OTP: Amr = Amr("pwd otp mfa");
    pub const PASSWORD_PASSKEY: Amr = Amr("pwd hwk mfa");
    /// A passkey with user verification: possession and a PIN or biometric.
    pub const PASSKEY: Amr = Amr("hwk user mfa");

    pub fn as_str(self) -> &'static str {
        self.0
    }
}

/// A stored `amr` as the claim's list.
pub fn amr_list(stored: &str) -> Vec<String> {
    stored.split_whitespace().map(str::to_owned).collect()
}

/// Starts a session for `account`, authenticated by `amr` now: writes it with its first
/// refresh token, makes it live, signs the tokens and names the device. Every way of
/// logging in ends here.
pub async fn open_session(
    state: &AppState,
    account: &user::Model,
    roles: Vec<String>,
    amr: Amr,
    device: Option<Uuid>,
    client: &ClientInfo,
    now: DateTime<Utc>,
) -> Result<Tokens, ApiError> {
    let email = crate::domain::Email::parse(&account.email)
        .map_err(|_| ApiError::internal("a stored email does not parse"))?;
    let account_key = email.as_str();
    let ttl = chrono::Duration::from_std(state.config.refresh_token_ttl).map_err(ApiError::internal)?;
    let session_id = Uuid::new_v4();
    let expires_at = now + ttl;
    let refresh = token::new_refresh_token()?;
    let jti = Uuid::now_v7();
    let ip = client.ip.map(|ip| ip.to_string());
    let ua = user_agent(client);
    // Looked up once, here: refreshes keep the login's location.
    let location = client.ip.and_then(|ip| state.geoip.as_ref()?.locate(ip));
    // A login without a valid device token comes from a device this account has not used
    // (or has forgotten): with NOTIFY_NEW_DEVICE, its owner hears of it.
    let notice = match device {
        None if state.config.notify_new_device => Some(state.outbox.row(&Mail::NewSignIn {
            to: email.clone(),
            device: sessions::device_label(ua.as_deref()),
            ip: ip.clone().unwrap_or_else(|| "unknown".to_owned()),
            location: location.clone(),
            time: now.format("%Y-%m-%d %H:%M UTC").to_string(),
            link: state.outbox.page(LinkPage::Sessions),
        })?),
        _ => None,
    };

    let new_session = session::ActiveModel {
        id: Set(session_id),
        user_id: Set(account.id),
        user_agent: Set(ua),
        ip_address: Set(ip.clone()),
        last_used_ip: Set(ip),
        created_at: Set(now),
        last_used_at: Set(now),
        expires_at: Set(expires_at),
        revoked_at: Set(None),
        location: Set(location.clone()),
        amr: Set(amr.as_str().to_owned()),
        auth_time: Set(now),
    };
    let first_token = refresh_token_row(jti, session_id, account.id, &refresh, None, now, expires_at, client);
    if !write_login(&state.db, new_session, first_token, notice, account.id, now).await? {
        // Disabled (or being deleted) since the password was checked: the session it
        // wrote never goes live (and no mail was queued).
        sessions::end(state, sessions::Scope::One(session_id)).await?;
        return Err(login_failed(state, Some(account.id), client, now));
    }
    let mut detail = serde_json::json!({"session_id": session_id, "amr": amr.as_str()});
    if let Some(location) = location {
        detail["location"] = location.into();
    }
    state.audit.record(
        AuditEvent::new("login_success", "success", now).user(account.id).client(client).detail(detail),
    );

    let info = TokenInfo { jti, session_id, user_id: account.id, issued_at: now, expires_at };
    let claims = Claims {
        roles,
        email_verified: account.email_verified_at.is_some(),
        amr: amr_list(amr.as_str()),
        auth_time: now,
    };
    let mut tokens = issue(state, info, claims, refresh, None, now).await?;
    // The same device keeps its id; a new one gets one.
    tokens.device_token = Some(state.devices.issue(account_key, device.unwrap_or_else(Uuid::new_v4), now));
    // Beyond MAX_SESSIONS_PER_USER, the least recently used sessions end. Committed in SQL
    // with their revocation pending, so a store failure here is finished by the reconciler.
    match sessions::enforce_limit(state, account.id).await {
        Ok(0) => {}
        Ok(n) => state.audit.record(
            AuditEvent::new("session_revoked", "session_limit", now)
                .user(account.id)
                .client(client)
                .detail(serde_json::json!({"sessions": n})),
        ),
        Err(e) => tracing::warn!(error = %e.detail, "ending sessions beyond MAX_SESSIONS_PER_USER failed"),
    }
    Ok(tokens)
}

/// `EMAIL_VERIFICATION=required` and the password was right, but the address is not
/// verified: 403 `email_not_verified`, and a fresh link is mailed (within the mail limits).
pub(crate) async fn unverified(
    state: &AppState,
    account: &user::Model,
    client: &ClientInfo,
    now: DateTime<Utc>,
) -> ApiError {
    let mailed = async {
        if limit::mail_allowed(state, &account.email, client).await? {
            accounts::mail_verification(state, account, now).await?;
        }
        Ok::<(), ApiError>(())
    };
    if let Err(e) = mailed.await {
        tracing::warn!(error = %e.detail, "could not queue a verification mail for an unverified login");
    }
    state.metrics.login("email_not_verified");
    state
        .audit
        .record(AuditEvent::new("login_failure", "email_not_verified", now).user(account.id).client(client));
    ApiError::new(
        ErrorCode::EmailNotVerified,
        "Verify your email address first: a new link is on its way to your inbox.",
    )
}

/// A login whose email is no address cannot belong to an account, so it has no account
/// budget and leaves no failure record (nothing for a flood of made-up strings to fill);
/// it is charged to the client's address and gets the same answer as a wrong password.
/// No dummy hash: the sender knows the string is no address, so timing tells them nothing,
/// and hashing for it would hand anyone argon2's CPU time for free.
async fn login_malformed(state: &AppState, client: &ClientInfo) -> Result<Tokens, ApiError> {
    let rate = state.config.rate_limit_login_per_ip;
    limit::charge(state, Limit::LoginPerIp, &limit::ip_key(state, client), rate, client).await?;
    Err(login_failed(state, None, client, state.clock.now()))
}

/// Counts and audits a failed login; the answer is the same whatever failed.
fn login_failed(
    state: &AppState,
    user_id: Option<Uuid>,
    client: &ClientInfo,
    now: DateTime<Utc>,
) -> ApiError {
    state.metrics.login("invalid_credentials");
    let mut event = AuditEvent::new("login_failure", "invalid_credentials", now).client(client);
    if let Some(id) = user_id {
        event = event.user(id);
    }
    state.audit.record(event);
    invalid_credentials()
}

/// Writes a new session, its first refresh token and the account's last login, all or
/// nothing. On PostgreSQL that is one statement, the inserts being data-modifying CTEs of the
/// update (the token's foreign key to the session is checked at the end of the statement):
/// one round trip instead of five (BEGIN, three statements, COMMIT). SQLite has no
/// data-modifying CTEs, so there they run in a transaction.
///
/// A new-device mail (`notice`) is written in the same transaction, so a login that fails
/// queues none and one that commits cannot lose it. That takes the transaction on
/// PostgreSQL too: the CTEs would insert it even when the touch matches nothing (below).
///
/// Returns false when the account was disabled (or is being deleted) meanwhile: its row
/// is locked by the disabling transaction, and the touch waits for it and then matches
/// nothing. Then the session must not go live (in a transaction: nothing was written).
async fn write_login(
    db: &DatabaseConnection,
    session: session::ActiveModel,
    token: refresh_token::ActiveModel,
    notice: Option<email_outbox::ActiveModel>,
    user_id: Uuid,
    now: DateTime<Utc>,
) -> Result<bool, ApiError> {
    let touch = user::Entity::update_many()
        .col_expr(user::Column::LastLoginAt, Expr::value(now))
        .filter(user::Column::Id.eq(user_id))
        .filter(user::Column::DisabledAt.is_null());
    if db.get_database_backend() == DbBackend::Postgres && notice.is_none() {
        let writes = WithClause::new()
            .cte(
                CommonTableExpression::new()
                    .query(session::Entity::insert(session).into_query())
                    .table_name("new_session")
                    .to_owned(),
            )
            .cte(
                CommonTableExpression::new()
                    .query(refresh_token::Entity::insert(token).into_query())
                    .table_name("first_token")
                    .to_owned(),
            )
            .to_owned();
        let touched = db.execute(&touch.into_query().with(writes)).await?;
        return Ok(touched.rows_affected() == 1);
    }
    let txn = db.begin().await?;
    if touch.exec(&txn).await?.rows_affected != 1 {
        txn.rollback().await?;
        return Ok(false);
    }
    session.insert(&txn).await?;
    token.insert(&txn).await?;
    if let Some(mail) = notice {
        mail.insert(&txn).await?;
    }
    txn.commit().await?;
    Ok(true)
}

#[allow(clippy::too_many_arguments)]
fn refresh_token_row(
    jti: Uuid,
    session_id: Uuid,
    user_id: Uuid,
    token: &str,
    parent: Option<Uuid>,
    now: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    client: &ClientInfo,
) -> refresh_token::ActiveModel {
    refresh_token::ActiveModel {
        id: Set(jti),
        session_id: Set(session_id),
        user_id: Set(user_id),
        token_hash: Set(token::refresh_token_hash(token)),
        parent_id: Set(parent),
        created_at: Set(now),
        expires_at: Set(expires_at),
        retired_at: Set(None),
        revoked_at: Set(None),
        user_agent: Set(user_agent(client)),
        ip_address: Set(client.ip.map(|ip| ip.to_string())),
        successor_sealed: Set(None),
    }
}

/// What an access token says of its user and session besides who they are.
pub struct Claims {
    pub roles: Vec<String>,
    pub email_verified: bool,
    /// How the session's login was authenticated; a refresh keeps it.
    pub amr: Vec<String>,
    pub auth_time: DateTime<Utc>,
}

/// The user's roles and whether their email is verified (from SQL in one query), with the
/// session's authentication; `None` if the account is gone.
async fn claims_of(
    db: &impl ConnectionTrait,
    user_id: Uuid,
    session: &session::Model,
) -> Result<Option<Claims>, ApiError> {
    let rows = user::Entity::find_by_id(user_id).find_with_related(role::Entity).all(db).await?;
    Ok(rows.into_iter().next().map(|(account, roles)| {
        let mut roles: Vec<String> = roles.into_iter().map(|r| r.name).collect();
        roles.sort();
        Claims {
            roles,
            email_verified: account.email_verified_at.is_some(),
            amr: amr_list(&session.amr),
            auth_time: session.auth_time,
        }
    }))
}

/// The role names of a user, from SQL.
pub async fn roles_of(db: &impl ConnectionTrait, user_id: Uuid) -> Result<Vec<String>, ApiError> {
    let mut names: Vec<String> = user_role::Entity::find()
        .inner_join(role::Entity)
        .filter(user_role::Column::UserId.eq(user_id))
        .select_only()
        .column(role::Column::Name)
        .into_tuple()
        .all(db)
        .await?;
    names.sort();
    Ok(names)
}

/// After the commit: make the session live in the revocation store (unless it ended
/// meanwhile), then sign.
async fn issue(
    state: &AppState,
    token: TokenInfo,
    claims: Claims,
    refresh_token: String,
    retired_hash: Option<String>,
    now: DateTime<Utc>,
) -> Result<Tokens, ApiError> {
    let activated = state
        .store
        .activate(&Activation {
            session_id: token.session_id,
            record: SessionRecord { user_id: token.user_id, expires_at: token.expires_at },
            token_hash: token::refresh_token_hash(&refresh_token),
            token,
            retired_hash,
            ttl: crate::clock::until(now, token.expires_at),
        })
        .await?;
    if activated == Activated::Ended {
        // A logout (or any other end) committed after this request read the session.
        return Err(session_ended());
    }

    let access_ttl = chrono::Duration::from_std(state.config.access_token_ttl).map_err(ApiError::internal)?;
    // An access token never outlives its session.
    let exp = (now + access_ttl).min(token.expires_at);
    let claims = AccessClaims {
        iss: state.config.jwt_issuer.clone(),
        aud: state.config.jwt_audience.clone(),
        sub: token.user_id,
        client_id: state.config.jwt_client_id.clone(),
        sid: token.session_id,
        jti: Uuid::new_v4(),
        iat: now.timestamp(),
        exp: exp.timestamp(),
        roles: claims.roles,
        email_verified: claims.email_verified,
        amr: claims.amr,
        auth_time: claims.auth_time.timestamp(),
    };
    Ok(Tokens {
        access_token: state.keys.current().sign(&claims, now)?,
        expires_in: seconds_until(now, exp),
        refresh_token,
        refresh_expires_in: seconds_until(now, token.expires_at),
        session_id: token.session_id,
        device_token: None,
    })
}

fn session_ended() -> ApiError {
    refresh_refused("The session of this refresh token has ended.")
}

fn refresh_refused(detail: &'static str) -> ApiError {
    ApiError::invalid_token(detail)
}

fn reused() -> ApiError {
    ApiError::new(ErrorCode::RefreshTokenReused, "This refresh token was already used; log in again.")
}

/// What a retired refresh token gets when it is presented again: the one rule (SPEC,
/// "Tokens"), kept in one place. `Debug` never shows the successor token.
#[derive(PartialEq, Eq)]
pub enum Reuse {
    /// Within the grace window, successor still live: hand back that same successor.
    SameSuccessor(String),
    /// Within the window, but the successor has itself been rotated (or cannot be
    /// recovered): refuse, and leave the session alone.
    Refuse,
    /// Outside the window: theft. End the whole session.
    Theft,
}

impl std::fmt::Debug for Reuse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reuse::SameSuccessor(_) => "SameSuccessor(***)",
            Reuse::Refuse => "Refuse",
            Reuse::Theft => "Theft",
        })
    }
}

pub fn judge_reuse(
    presented: &str,
    retired: &refresh_token::Model,
    successor: Option<&refresh_token::Model>,
    now: DateTime<Utc>,
    grace: Duration,
) -> Reuse {
    let Some(retired_at) = retired.retired_at else { return Reuse::Refuse };
    let within = chrono::Duration::from_std(grace).is_ok_and(|g| now - retired_at <= g);
    if !within {
        return Reuse::Theft;
    }
    let live = |s: &&refresh_token::Model| s.retired_at.is_none() && s.revoked_at.is_none();
    let recovered = successor.filter(live).and_then(|s| {
        let token = token::open_successor(presented, retired.successor_sealed.as_deref()?)?;
        // The sealed token must be exactly the successor SQL knows.
        (token::refresh_token_hash(&token) == s.token_hash).then_some(token)
    });
    match recovered {
        Some(token) => Reuse::SameSuccessor(token),
        None => Reuse::Refuse,
    }
}

/// Rotates a refresh token. The store answers first (one round trip): a revoked token is
/// refused there, and a live one is rotated by the compare-and-swap without the two SQL
/// reads that find it. Anything else (no entry, retired, a lost race) is judged from SQL.
pub async fn refresh(state: &AppState, presented: &str, client: &ClientInfo) -> Result<Tokens, ApiError> {
    let rate = state.config.rate_limit_refresh_per_ip;
    limit::charge(state, Limit::RefreshPerIp, &limit::ip_key(state, client), rate, client).await?;
    // A refresh token is 43 base64url characters; anything much longer cannot match.
    if presented.len() > 128 {
        return Err(refresh_refused("The refresh token is not valid."));
    }
    let hash = token::refresh_token_hash(presented);
    let now = state.clock.now();
    match state.store.refresh_token(&hash).await? {
        Some(TokenState::Revoked) => return Err(session_ended()),
        Some(TokenState::Live(info)) if now < info.expires_at => {
            if let Some(tokens) = rotate(state, presented, &hash, info, client, now).await? {
                return Ok(tokens);
            }
        }
        _ => {}
    }
    refresh_from_sql(state, presented, &hash, client, now).await
}

async fn refresh_from_sql(
    state: &AppState,
    presented: &str,
    hash: &str,
    client: &ClientInfo,
    now: DateTime<Utc>,
) -> Result<Tokens, ApiError> {
    let row = find_refresh_token(&state.db, hash)
        .await?
        .ok_or_else(|| refresh_refused("The refresh token is not valid."))?;
    if row.revoked_at.is_some() {
        return Err(session_ended());
    }
    let session =
        session::Entity::find_by_id(row.session_id).one(&state.db).await?.ok_or_else(session_ended)?;
    if session.revoked_at.is_some() || now >= session.expires_at {
        return Err(session_ended());
    }
    if row.retired_at.is_some() {
        return reuse(state, presented, row, &session, client, now).await;
    }
    let info = TokenInfo {
        jti: row.id,
        session_id: session.id,
        user_id: row.user_id,
        issued_at: row.created_at,
        expires_at: session.expires_at,
    };
    if let Some(tokens) = rotate(state, presented, hash, info, client, now).await? {
        return Ok(tokens);
    }
    // Another request won the race; its commit is visible now. Judge as a reuse.
    let row = refresh_token::Entity::find_by_id(row.id).one(&state.db).await?.ok_or_else(session_ended)?;
    if row.revoked_at.is_some() {
        return Err(session_ended());
    }
    reuse(state, presented, row, &session, client, now).await
}

/// Retires `parent` and issues its successor, if this request wins the compare-and-swap
/// (`None` if it does not: the token was retired or revoked meanwhile).
async fn rotate(
    state: &AppState,
    presented: &str,
    parent_hash: &str,
    parent: TokenInfo,
    client: &ClientInfo,
    now: DateTime<Utc>,
) -> Result<Option<Tokens>, ApiError> {
    let new_token = token::new_refresh_token()?;
    let sealed = token::seal_successor(presented, &new_token)?;
    let jti = Uuid::now_v7();
    let txn = state.db.begin().await?;
    if txn.get_database_backend() == DbBackend::MySql {
        // Session before token, the order in which ending sessions locks them: otherwise a
        // logout and a refresh of one session each hold what the other waits for, and
        // InnoDB ends one of them with a deadlock error (the child token's foreign key
        // check also waits on the session row there).
        session::Entity::find_by_id(parent.session_id).lock_exclusive().one(&txn).await?;
    }
    // The compare-and-swap: exactly one caller retires this token and names its successor.
    // An ended session's tokens are revoked in the same transaction that ends it.
    let retired = refresh_token::Entity::update_many()
        .col_expr(refresh_token::Column::RetiredAt, Expr::value(now))
        .col_expr(refresh_token::Column::SuccessorSealed, Expr::value(sealed))
        .filter(refresh_token::Column::Id.eq(parent.jti))
        .filter(refresh_token::Column::RetiredAt.is_null())
        .filter(refresh_token::Column::RevokedAt.is_null())
        .exec(&txn)
        .await?;
    if retired.rows_affected != 1 {
        txn.rollback().await?;
        return Ok(None);
    }
    refresh_token_row(
        jti,
        parent.session_id,
        parent.user_id,
        &new_token,
        Some(parent.jti),
        now,
        parent.expires_at,
        client,
    )
    .insert(&txn)
    .await?;
    // The session row comes back with the update: its authentication is the refreshed
    // token's (a refresh is not a new login).
    let touch = session::Entity::update_many()
        .col_expr(session::Column::LastUsedAt, Expr::value(now))
        .col_expr(session::Column::LastUsedIp, Expr::value(client.ip.map(|ip| ip.to_string())))
        .filter(session::Column::Id.eq(parent.session_id));
    let session = if txn.get_database_backend() == DbBackend::MySql {
        // No UPDATE … RETURNING on MySQL: the UPDATE locks the row until the commit, so
        // reading it back in this transaction sees exactly what the UPDATE left.
        match touch.exec(&txn).await?.rows_affected {
            1 => session::Entity::find_by_id(parent.session_id).one(&txn).await?,
            _ => None,
        }
    } else {
        touch.exec_with_returning(&txn).await?.into_iter().next()
    };
    let session = session.ok_or_else(session_ended)?;
    let claims = claims_of(&txn, parent.user_id, &session).await?.ok_or_else(session_ended)?;
    txn.commit().await?;

    state.audit.record(
        AuditEvent::new("refresh", "success", now)
            .user(parent.user_id)
            .client(client)
            .detail(serde_json::json!({"session_id": parent.session_id})),
    );
    let info = TokenInfo { jti, issued_at: now, ..parent };
    issue(state, info, claims, new_token, Some(parent_hash.to_owned()), now).await.map(Some)
}

async fn reuse(
    state: &AppState,
    presented: &str,
    row: refresh_token::Model,
    session: &session::Model,
    client: &ClientInfo,
    now: DateTime<Utc>,
) -> Result<Tokens, ApiError> {
    let successor = refresh_token::Entity::find()
        .filter(refresh_token::Column::ParentId.eq(row.id))
        .one(&state.db)
        .await?;
    match judge_reuse(presented, &row, successor.as_ref(), now, state.config.refresh_reuse_grace) {
        Reuse::SameSuccessor(token) => {
            let successor = successor.ok_or_else(|| ApiError::internal("successor vanished"))?;
            state.audit.record(
                AuditEvent::new("refresh_grace_replay", "same_successor", now)
                    .user(row.user_id)
                    .client(client)
                    .detail(serde_json::json!({"session_id": session.id, "token_id": row.id})),
            );
            let claims = claims_of(&state.db, row.user_id, session).await?.ok_or_else(session_ended)?;
            let info = TokenInfo {
                jti: successor.id,
                session_id: session.id,
                user_id: row.user_id,
                issued_at: successor.created_at,
                expires_at: session.expires_at,
            };
            issue(state, info, claims, token, Some(row.token_hash), now).await
        }
        Reuse::Refuse => Err(reused()),
        Reuse::Theft => {
            // Recorded before anything that can fail: the attempt is evidence either way.
            tracing::warn!(session_id = %session.id, user_id = %row.user_id, "refresh token reused after rotation; revoking the session");
            state.audit.record(
                AuditEvent::new("refresh_token_reused", "session_revoked", now)
                    .user(row.user_id)
                    .client(client)
                    .detail(serde_json::json!({"session_id": session.id, "token_id": row.id})),
            );
            sessions::end(state, sessions::Scope::One(session.id)).await?;
            Err(reused())
        }
    }
}

/// Ends the session of this access token.
pub async fn logout(
    state: &AppState,
    user_id: Uuid,
    session_id: Uuid,
    client: &ClientInfo,
) -> Result<(), ApiError> {
    sessions::end(state, sessions::Scope::One(session_id)).await?;
    state.audit.record(
        AuditEvent::new("logout", "success", state.clock.now())
            .user(user_id)
            .client(client)
            .detail(serde_json::json!({"session_id": session_id})),
    );
    Ok(())
}

/// Ends every session of the user.
pub async fn logout_all(state: &AppState, user_id: Uuid, client: &ClientInfo) -> Result<(), ApiError> {
    let ended = sessions::end(state, sessions::Scope::AllOfUser(user_id)).await?;
    state.audit.record(
        AuditEvent::new("logout_all", "success", state.clock.now())
            .user(user_id)
            .client(client)
            .detail(serde_json::json!({"sessions": ended.len()})),
    );
    Ok(())
}

/// The refresh-token row whose token has this SHA-256 (`token::refresh_token_hash`).
pub async fn find_refresh_token(
    db: &impl ConnectionTrait,
    hash: &str,
) -> Result<Option<refresh_token::Model>, ApiError> {
    Ok(refresh_token::Entity::find().filter(refresh_token::Column::TokenHash.eq(hash)).one(db).await?)
}

/// The signed-in account and its roles, read from SQL (by a query that may serve other
/// requests arriving at the same moment: see [`crate::store::batch`]).
pub async fn profile(state: &AppState, user_id: Uuid) -> Result<users::Profile, ApiError> {
    state
        .profiles
        .get(user_id)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::TokenRevoked, "The account no longer exists."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_never_print_their_secrets() {
        let tokens = Tokens {
            access_token: "eyJhbGciOiJFZERTQSJ9.secret-claims.signature".into(),
            expires_in: 900,
            refresh_token: "qzZbRefreshSecretValue".into(),
            refresh_expires_in: 60,
            session_id: Uuid::nil(),
            device_token: Some("qzZbDeviceSecretValue".into()),
        };
        let printed = format!("{tokens:?} {:?}", Reuse::SameSuccessor("qzZbSuccessorSecret".into()));
        for secret in
            ["secret-claims", "qzZbRefreshSecretValue", "qzZbSuccessorSecret", "qzZbDeviceSecretValue"]
        {
            assert!(!printed.contains(secret), "{printed}");
        }
        assert!(printed.contains("expires_in: 900"), "the rest still prints: {printed}");
    }
}
