//! Passkeys (WebAuthn, through webauthn-rs): registering them while signed in, listing and
//! removing them, passwordless login with a discoverable passkey, and a passkey as the
//! second factor after a password (called by `mfa`).
//!
//! Every ceremony is two requests. The first creates webauthn-rs's state for it, which is
//! kept in the revocation store under a random `challenge_id` (or, for a second factor,
//! under the login ticket) for `PASSKEY_CEREMONY_TTL`, shared by every instance; the second
//! takes it in the same step it reads it, so a ceremony finishes at most once, whatever
//! arrives twice or at once.
//!
//! An accepted assertion advances the stored signature counter by compare-and-swap: a
//! counter that does not move forward (a cloned authenticator, or an assertion raced with
//! a newer one) is refused and audited (`passkey_refused`).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait as _, ColumnTrait as _, ConnectionTrait, EntityTrait as _, PaginatorTrait as _,
    QueryFilter as _, QueryOrder as _, Set, SqlErr, TransactionTrait as _,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use uuid::Uuid;
use webauthn_rs::Webauthn;
use webauthn_rs::prelude::{
    AuthenticationResult, DiscoverableAuthentication, DiscoverableKey, Passkey, PasskeyAuthentication,
    PasskeyRegistration, PublicKeyCredential, RegisterPublicKeyCredential, WebauthnError,
};

use super::auth::{self, Amr, Tokens};
use super::limit::{self, Limit};
use super::sessions::{self, Scope};
use super::{ClientInfo, accounts, mfa, users};
use crate::audit::AuditEvent;
use crate::config::{EmailVerification, PASSKEY_CEREMONY_TTL};
use crate::domain::Password;
use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;
use crate::store::entity::passkey;

/// The most passkeys one account keeps: each is listed in every registration's exclusion
/// list and every second-factor request.
pub const MAX_PASSKEYS: u64 = 50;
/// The longest passkey name, in characters.
pub const MAX_NAME: usize = 64;

/// The options of a ceremony's first step, and the id that names its state in the second.
#[derive(Debug)]
pub struct Ceremony {
    pub challenge_id: String,
    /// `PublicKeyCredentialCreationOptions` / `…RequestOptions` as `{publicKey: …}` (and
    /// `mediation`), for `navigator.credentials.create` / `.get` after base64url decoding.
    pub options: serde_json::Value,
}

/// What the listing shows of a passkey.
#[derive(Debug)]
pub struct Summary {
    pub id: Uuid,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
}

impl From<passkey::Model> for Summary {
    fn from(row: passkey::Model) -> Self {
        Self { id: row.id, name: row.name, created_at: row.created_at, last_used_at: row.last_used_at }
    }
}

/// A registration in progress: whose it is, and webauthn-rs's state.
#[derive(Serialize, Deserialize)]
struct Registering {
    user_id: Uuid,
    state: PasskeyRegistration,
}

/// A second-factor ceremony in progress.
#[derive(Serialize, Deserialize)]
struct SecondFactor {
    user_id: Uuid,
    state: PasskeyAuthentication,
}

fn relying_party(state: &AppState) -> Result<&Webauthn, ApiError> {
    state.webauthn.as_ref().ok_or_else(|| {
        ApiError::new(
            ErrorCode::NotFound,
            "Passkeys are not enabled on this server (set WEBAUTHN_RP_ID and WEBAUTHN_ORIGINS).",
        )
    })
}

/// 256 random bits, base64url: names a ceremony's state.
fn new_challenge_id() -> Result<String, ApiError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(ApiError::internal)?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

fn registration_key(challenge_id: &str) -> String {
    format!("pk:reg:{challenge_id}")
}

fn login_key(challenge_id: &str) -> String {
    format!("pk:login:{challenge_id}")
}

/// The ticket itself is a bearer secret: the store's key is its hash.
fn second_factor_key(ticket_id: &str) -> String {
    format!("pk:mfa:{}", crate::password::hex(&Sha256::digest(ticket_id.as_bytes())))
}

/// A challenge id is 43 base64url characters; anything else cannot name a ceremony.
fn plausible_challenge(challenge_id: &str) -> bool {
    challenge_id.len() == 43
        && challenge_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

async fn stash(state: &AppState, key: &str, value: &impl Serialize) -> Result<(), ApiError> {
    let json = serde_json::to_string(value).map_err(ApiError::internal)?;
    state.store.stash(key, &json, PASSKEY_CEREMONY_TTL).await?;
    Ok(())
}

/// The ceremony's state, taken out of the store (so no one else gets it), if it is there.
async fn take<T: for<'de> Deserialize<'de>>(state: &AppState, key: &str) -> Result<Option<T>, ApiError> {
    match state.store.take(key).await? {
        Some(json) => serde_json::from_str(&json).map(Some).map_err(ApiError::internal),
        None => Ok(None),
    }
}

fn credential_id_text(raw: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(raw)
}

fn stored_passkey(row: &passkey::Model) -> Result<Passkey, ApiError> {
    serde_json::from_str(&row.passkey).map_err(ApiError::internal)
}

async fn rows_of(db: &impl ConnectionTrait, user_id: Uuid) -> Result<Vec<passkey::Model>, ApiError> {
    Ok(passkey::Entity::find()
        .filter(passkey::Column::UserId.eq(user_id))
        .order_by_asc(passkey::Column::CreatedAt)
        .order_by_asc(passkey::Column::Id)
        .all(db)
        .await?)
}

/// Whether the user has a passkey (which can then serve as a second factor).
pub async fn has_passkeys(db: &impl ConnectionTrait, user_id: Uuid) -> Result<bool, ApiError> {
    Ok(passkey::Entity::find().filter(passkey::Column::UserId.eq(user_id)).count(db).await? > 0)
}

/// The user's passkeys, oldest first.
pub async fn list(state: &AppState, user_id: Uuid) -> Result<Vec<Summary>, ApiError> {
    Ok(rows_of(&state.db, user_id).await?.into_iter().map(Summary::from).collect())
}

/// `POST /v1/users/me/passkeys/options`: creation options for a new passkey of the
/// signed-in user, excluding the credentials the account already has. Charged to the
/// client's network like the passwordless options.
pub async fn registration_options(
    state: &AppState,
    user_id: Uuid,
    current: crate::domain::Password,
    code: Option<&str>,
    client: &ClientInfo,
) -> Result<Ceremony, ApiError> {
    let rp = relying_party(state)?;
    // Adding a way in is a sensitive change: the password (and the second factor) again.
    super::accounts::confirm_identity(state, user_id, current, code, "passkey_add", client).await?;
    // Each one is state kept for a while: a token is no licence to fill the store.
    let rate = state.config.rate_limit_login_per_ip;
    limit::charge(state, Limit::PasskeyPerIp, &limit::ip_key(state, client), rate, client).await?;
    let (account, _) = users::profile_by_id(&state.db, user_id)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::TokenRevoked, "The account no longer exists."))?;
    let rows = rows_of(&state.db, user_id).await?;
    if rows.len() as u64 >= MAX_PASSKEYS {
        return Err(too_many());
    }
    let exclude =
        rows.iter().map(stored_passkey).map(|p| p.map(|p| p.cred_id().clone())).collect::<Result<_, _>>()?;
    let (options, registration) = rp
        .start_passkey_registration(user_id, &account.email, &account.email, Some(exclude))
        .map_err(ApiError::internal)?;
    let mut options = serde_json::to_value(options).map_err(ApiError::internal)?;
    // webauthn-rs asks for no discoverable credential (`discouraged`); passwordless login
    // needs one, so authenticators that can keep one are asked to. One that cannot still
    // registers, and serves as a second factor.
    if let Some(selection) = options.pointer_mut("/publicKey/authenticatorSelection")
        && let Some(selection) = selection.as_object_mut()
    {
        selection.insert("residentKey".into(), "preferred".into());
    }
    let challenge_id = new_challenge_id()?;
    stash(state, &registration_key(&challenge_id), &Registering { user_id, state: registration }).await?;
    Ok(Ceremony { challenge_id, options })
}

/// `POST /v1/users/me/passkeys`: verifies the authenticator's answer to the ceremony named
/// `challenge_id` (once: the state is taken) and stores the passkey. The user's other
/// sessions end, in the same transaction, and from then on a password login asks for a
/// second factor (`users.mfa_enabled`, see `mfa::sync_flag`).
pub async fn register(
    state: &AppState,
    user_id: Uuid,
    session_id: Uuid,
    challenge_id: &str,
    credential: serde_json::Value,
    name: &str,
    client: &ClientInfo,
) -> Result<Summary, ApiError> {
    let rp = relying_party(state)?;
    let name = valid_name(name)?;
    let unknown =
        || ApiError::validation("challenge_id: unknown, used or expired; ask for new options and try again.");
    if !plausible_challenge(challenge_id) {
        return Err(unknown());
    }
    let Some(pending) = take::<Registering>(state, &registration_key(challenge_id)).await? else {
        return Err(unknown());
    };
    if pending.user_id != user_id {
        return Err(unknown());
    }
    let now = state.clock.now();
    let credential: RegisterPublicKeyCredential = serde_json::from_value(credential).map_err(|_| {
        ApiError::validation("credential: not a WebAuthn registration (PublicKeyCredential).")
    })?;
    let passkey = match rp.finish_passkey_registration(&credential, &pending.state) {
        Ok(passkey) => passkey,
        Err(e) => {
            refused(state, Some(user_id), None, &e, "registration", client, now);
            return Err(ApiError::validation(
                "credential: the passkey could not be verified against this ceremony and origin.",
            ));
        }
    };
    let json = serde_json::to_string(&passkey).map_err(ApiError::internal)?;
    let (counter, backup_eligible, backup_state) = initial_flags(&json);
    let row = passkey::ActiveModel {
        id: Set(Uuid::now_v7()),
        user_id: Set(user_id),
        name: Set(name),
        credential_id: Set(credential_id_text(passkey.cred_id())),
        passkey: Set(json),
        sign_count: Set(counter),
        backup_eligible: Set(backup_eligible),
        backup_state: Set(backup_state),
        created_at: Set(now),
        last_used_at: Set(None),
    };
    let txn = state.db.begin().await?;
    // Counted again at the write: options asked for earlier could otherwise add up past it
    // (a bound on the lists above, so racing registrations may overshoot it by one or two).
    let count = passkey::Entity::find().filter(passkey::Column::UserId.eq(user_id)).count(&txn).await?;
    if count >= MAX_PASSKEYS {
        return Err(too_many());
    }
    let row = match row.insert(&txn).await {
        Ok(row) => row,
        Err(e) if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
            return Err(ApiError::validation("credential: this passkey is already registered."));
        }
        Err(e) => return Err(e.into()),
    };
    // From now on a password login asks for a second factor (this passkey, or TOTP).
    mfa::sync_flag(&txn, user_id).await?;
    let ended =
        sessions::end_in(&txn, &Scope::AllOfUserExcept { user: user_id, keep: session_id }, now).await?;
    txn.commit().await?;
    sessions::finish_or_defer(state, ended).await;
    state.audit.record(
        AuditEvent::new("passkey_added", "success", now)
            .user(user_id)
            .client(client)
            .detail(serde_json::json!({"passkey_id": row.id, "name": row.name})),
    );
    Ok(row.into())
}

/// `DELETE /v1/users/me/passkeys/{id}`: needs the current password (and, with TOTP on,
/// a `code`: the step-up); another user's passkey is answered like one that does not
/// exist. The user's other sessions end.
pub async fn remove(
    state: &AppState,
    user_id: Uuid,
    session_id: Uuid,
    passkey_id: Uuid,
    current: Password,
    code: Option<&str>,
    client: &ClientInfo,
) -> Result<(), ApiError> {
    accounts::confirm_identity(state, user_id, current, code, "passkey_removed", client).await?;
    let now = state.clock.now();
    let txn = state.db.begin().await?;
    let deleted = passkey::Entity::delete_many()
        .filter(passkey::Column::Id.eq(passkey_id))
        .filter(passkey::Column::UserId.eq(user_id))
        .exec(&txn)
        .await?;
    if deleted.rows_affected != 1 {
        txn.rollback().await?;
        return Err(ApiError::new(ErrorCode::NotFound, "No such passkey."));
    }
    // Its last passkey (and no TOTP): password logins no longer ask for a second factor.
    mfa::sync_flag(&txn, user_id).await?;
    let ended =
        sessions::end_in(&txn, &Scope::AllOfUserExcept { user: user_id, keep: session_id }, now).await?;
    txn.commit().await?;
    sessions::finish_or_defer(state, ended).await;
    state.audit.record(
        AuditEvent::new("passkey_removed", "success", now)
            .user(user_id)
            .client(client)
            .detail(serde_json::json!({"passkey_id": passkey_id})),
    );
    Ok(())
}

/// `POST /v1/auth/passkey/options`: request options for a discoverable passkey (no
/// account named: the authenticator offers the user's; conditional UI ready). Charged to
/// the client's network, since each one is state the server keeps for a stranger.
pub async fn login_options(state: &AppState, client: &ClientInfo) -> Result<Ceremony, ApiError> {
    let rp = relying_party(state)?;
    let rate = state.config.rate_limit_login_per_ip;
    limit::charge(state, Limit::PasskeyPerIp, &limit::ip_key(state, client), rate, client).await?;
    let (options, authentication) = rp.start_discoverable_authentication().map_err(ApiError::internal)?;
    let options = serde_json::to_value(options).map_err(ApiError::internal)?;
    let challenge_id = new_challenge_id()?;
    stash(state, &login_key(&challenge_id), &authentication).await?;
    Ok(Ceremony { challenge_id, options })
}

/// `POST /v1/auth/passkey`: the assertion for the ceremony `challenge_id` (taken: once).
/// Whatever is wrong — the ceremony, the passkey, the signature, the origin, the counter,
/// a disabled account — the answer is the same 401 `invalid_credentials`.
pub async fn login(
    state: &AppState,
    challenge_id: &str,
    credential: serde_json::Value,
    client: &ClientInfo,
) -> Result<Tokens, ApiError> {
    let rp = relying_party(state)?;
    let now = state.clock.now();
    let fail =
        |user_id: Option<Uuid>, reason: &'static str| login_failed(state, user_id, reason, client, now);
    if !plausible_challenge(challenge_id) {
        return Err(fail(None, "unknown_challenge"));
    }
    let Some(ceremony) = take::<DiscoverableAuthentication>(state, &login_key(challenge_id)).await? else {
        return Err(fail(None, "unknown_challenge"));
    };
    let Ok(credential) = serde_json::from_value::<PublicKeyCredential>(credential) else {
        return Err(fail(None, "malformed_assertion"));
    };
    let Some(row) = passkey::Entity::find()
        .filter(passkey::Column::CredentialId.eq(credential_id_text(credential.get_credential_id())))
        .one(&state.db)
        .await?
    else {
        return Err(fail(None, "unknown_passkey"));
    };
    // A discoverable credential names its user (the id it was registered with); it must be
    // the passkey's owner. One that names none is found by its credential id alone.
    if let Some(handle) = credential.get_user_unique_id()
        && handle != row.user_id.as_bytes()
    {
        return Err(fail(Some(row.user_id), "wrong_user_handle"));
    }
    let mut stored = stored_passkey(&row)?;
    // Its successor (`_v2`) takes a `Credential`, which only `danger-credential-internals`
    // can make of a `Passkey`; this one checks the same against a one-key list.
    #[allow(deprecated)]
    let result =
        match rp.finish_discoverable_authentication(&credential, ceremony, &[DiscoverableKey::from(&stored)])
        {
            Ok(result) => result,
            Err(e) => {
                refused(state, Some(row.user_id), Some(row.id), &e, "login", client, now);
                return Err(fail(Some(row.user_id), "passkey_refused"));
            }
        };
    if !result.user_verified() {
        return Err(fail(Some(row.user_id), "user_not_verified"));
    }
    let Some((account, roles)) = users::profile_by_id(&state.db, row.user_id).await? else {
        return Err(fail(None, "unknown_passkey"));
    };
    // A disabled account is answered like any other failure.
    if account.disabled_at.is_some() {
        return Err(fail(Some(account.id), "disabled"));
    }
    if !record_use(state, &row, &mut stored, &result, "login", client, now).await? {
        return Err(fail(Some(row.user_id), "passkey_refused"));
    }
    if state.config.email_verification == EmailVerification::Required && account.email_verified_at.is_none() {
        return Err(auth::unverified(state, &account, client, now).await);
    }
    state.metrics.login("success");
    auth::open_session(state, &account, roles, Amr::PASSKEY, None, client, now).await
}

/// Request options for a login ticket's second factor: restricted to the passkeys of
/// `user_id`, whose password the ticket has checked. The ceremony's state is kept under the
/// ticket (hashed) until [`second_factor_finish`] takes it, or `PASSKEY_CEREMONY_TTL`.
pub async fn second_factor_options(
    state: &AppState,
    user_id: Uuid,
    ticket_id: &str,
) -> Result<serde_json::Value, ApiError> {
    let rp = relying_party(state)?;
    let passkeys =
        rows_of(&state.db, user_id).await?.iter().map(stored_passkey).collect::<Result<Vec<_>, _>>()?;
    if passkeys.is_empty() {
        return Err(ApiError::new(ErrorCode::InvalidMfaCode, "This account has no passkey."));
    }
    let (options, authentication) = rp.start_passkey_authentication(&passkeys).map_err(ApiError::internal)?;
    stash(state, &second_factor_key(ticket_id), &SecondFactor { user_id, state: authentication }).await?;
    serde_json::to_value(options).map_err(ApiError::internal)
}

/// Checks a passkey assertion as the second factor of `user_id`'s login ticket (the state
/// [`second_factor_options`] kept, taken: once). Any failure is 401 `invalid_mfa_code`.
pub async fn second_factor_finish(
    state: &AppState,
    user_id: Uuid,
    ticket_id: &str,
    credential: serde_json::Value,
    client: &ClientInfo,
) -> Result<(), ApiError> {
    let rp = relying_party(state)?;
    let now = state.clock.now();
    let invalid = || ApiError::new(ErrorCode::InvalidMfaCode, "The passkey was not accepted.");
    let Some(pending) = take::<SecondFactor>(state, &second_factor_key(ticket_id)).await? else {
        return Err(invalid());
    };
    if pending.user_id != user_id {
        return Err(invalid());
    }
    let Ok(credential) = serde_json::from_value::<PublicKeyCredential>(credential) else {
        return Err(invalid());
    };
    let Some(row) = passkey::Entity::find()
        .filter(passkey::Column::CredentialId.eq(credential_id_text(credential.get_credential_id())))
        .filter(passkey::Column::UserId.eq(user_id))
        .one(&state.db)
        .await?
    else {
        return Err(invalid());
    };
    let mut stored = stored_passkey(&row)?;
    let result = match rp.finish_passkey_authentication(&credential, &pending.state) {
        Ok(result) => result,
        Err(e) => {
            refused(state, Some(user_id), Some(row.id), &e, "second_factor", client, now);
            return Err(invalid());
        }
    };
    if !record_use(state, &row, &mut stored, &result, "second_factor", client, now).await? {
        return Err(invalid());
    }
    Ok(())
}

/// Writes an accepted assertion's counter and flags back, if the counter moved forward
/// from what SQL has (compare-and-swap: of two assertions racing, or one replayed from a
/// clone, only a newer counter wins). False (audited) when it did not: the assertion is
/// refused. Authenticators that keep no counter (0, as most synced passkeys) always pass.
async fn record_use(
    state: &AppState,
    row: &passkey::Model,
    stored: &mut Passkey,
    result: &AuthenticationResult,
    purpose: &'static str,
    client: &ClientInfo,
    now: DateTime<Utc>,
) -> Result<bool, ApiError> {
    let counter = i64::from(result.counter());
    stored.update_credential(result);
    let json = serde_json::to_string(stored).map_err(ApiError::internal)?;
    let moved_on =
        if counter == 0 { passkey::Column::SignCount.eq(0) } else { passkey::Column::SignCount.lt(counter) };
    let updated = passkey::Entity::update_many()
        .col_expr(passkey::Column::Passkey, Expr::value(json))
        .col_expr(passkey::Column::SignCount, Expr::value(counter))
        .col_expr(passkey::Column::BackupEligible, Expr::value(result.backup_eligible()))
        .col_expr(passkey::Column::BackupState, Expr::value(result.backup_state()))
        .col_expr(passkey::Column::LastUsedAt, Expr::value(now))
        .filter(passkey::Column::Id.eq(row.id))
        .filter(moved_on)
        .exec(&state.db)
        .await?;
    if updated.rows_affected != 1 {
        state.audit.record(
            AuditEvent::new("passkey_refused", "counter_regression", now)
                .user(row.user_id)
                .client(client)
                .detail(serde_json::json!({
                    "passkey_id": row.id,
                    "purpose": purpose,
                    "counter": counter,
                    "stored_counter": row.sign_count,
                })),
        );
        return Ok(false);
    }
    state.audit.record(
        AuditEvent::new("passkey_used", "success", now)
            .user(row.user_id)
            .client(client)
            .detail(serde_json::json!({"passkey_id": row.id, "purpose": purpose})),
    );
    Ok(true)
}

/// Audits an assertion or registration webauthn-rs refused, by why.
fn refused(
    state: &AppState,
    user_id: Option<Uuid>,
    passkey_id: Option<Uuid>,
    error: &WebauthnError,
    purpose: &'static str,
    client: &ClientInfo,
    now: DateTime<Utc>,
) {
    let outcome = match error {
        WebauthnError::CredentialPossibleCompromise => "counter_regression",
        WebauthnError::InvalidRPOrigin | WebauthnError::CredentialCrossOrigin => "wrong_origin",
        WebauthnError::InvalidRPIDHash => "wrong_rp_id",
        WebauthnError::MismatchedChallenge | WebauthnError::ChallengeNotFound => "wrong_challenge",
        WebauthnError::UserNotVerified => "user_not_verified",
        _ => "invalid",
    };
    tracing::info!(error = %error, purpose, "a passkey ceremony was refused");
    let mut event = AuditEvent::new("passkey_refused", outcome, now)
        .client(client)
        .detail(serde_json::json!({"purpose": purpose, "passkey_id": passkey_id}));
    if let Some(id) = user_id {
        event = event.user(id);
    }
    state.audit.record(event);
}

/// Counts and audits a refused passwordless login; the answer is always the same.
fn login_failed(
    state: &AppState,
    user_id: Option<Uuid>,
    reason: &'static str,
    client: &ClientInfo,
    now: DateTime<Utc>,
) -> ApiError {
    state.metrics.login("invalid_credentials");
    let mut event = AuditEvent::new("login_failure", "invalid_passkey", now)
        .client(client)
        .detail(serde_json::json!({"method": "passkey", "reason": reason}));
    if let Some(id) = user_id {
        event = event.user(id);
    }
    state.audit.record(event);
    ApiError::new(ErrorCode::InvalidCredentials, "The passkey was not accepted.")
}

/// The counter a new passkey starts from and its backup flags (what its registration's
/// authenticator data said), read from its serialised form: webauthn-rs keeps them private.
fn initial_flags(json: &str) -> (i64, bool, bool) {
    let value = serde_json::from_str::<serde_json::Value>(json).unwrap_or_default();
    let flag = |name: &str| value.pointer(&format!("/cred/{name}")).and_then(serde_json::Value::as_bool);
    (
        value.pointer("/cred/counter").and_then(serde_json::Value::as_i64).unwrap_or(0),
        flag("backup_eligible").unwrap_or(false),
        flag("backup_state").unwrap_or(false),
    )
}

fn valid_name(name: &str) -> Result<String, ApiError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME || name.chars().any(char::is_control) {
        return Err(ApiError::validation(format!("name: 1 to {MAX_NAME} characters, no control characters")));
    }
    Ok(name.to_owned())
}

fn too_many() -> ApiError {
    ApiError::validation(format!("This account already has {MAX_PASSKEYS} passkeys: remove one first."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_ids_are_256_random_bits() {
        let a = new_challenge_id().expect("random");
        let b = new_challenge_id().expect("random");
        assert!(plausible_challenge(&a) && plausible_challenge(&b));
        assert_ne!(a, b);
        assert!(!plausible_challenge("short"));
        assert!(!plausible_challenge(&format!("{}=", &a[..42])));
    }

    #[test]
    fn the_ticket_never_appears_in_its_key() {
        let key = second_factor_key("secret-ticket-value");
        assert!(!key.contains("secret-ticket-value"));
        assert_eq!(key, second_factor_key("secret-ticket-value"));
        assert_ne!(key, second_factor_key("another-ticket"));
    }

    #[test]
    fn names_are_short_printable_text() {
        assert_eq!(valid_name("  YubiKey 5  ").expect("valid"), "YubiKey 5");
        assert!(valid_name("").is_err());
        assert!(valid_name("   ").is_err());
        assert!(valid_name("a\u{7}b").is_err());
        assert!(valid_name(&"x".repeat(MAX_NAME + 1)).is_err());
        assert!(valid_name(&"é".repeat(MAX_NAME)).is_ok());
    }
}
