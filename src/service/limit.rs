//! Charging the rate limits of SPEC and the login cool-down. Every limit answers the
//! same 429 body, so a 429 never tells whether an account exists.

use crate::audit::{AuditEvent, Flood};
use crate::config::Rate;
use crate::error::{ApiError, ErrorCode};
use crate::rate_limit::Decision;
use crate::service::ClientInfo;
use crate::state::AppState;
use crate::store::limits::{Admission, LoginBudgets, Refusal};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    LoginPerIp,
    LoginPerAccount,
    LoginCooldown,
    RegisterPerIp,
    RefreshPerIp,
    ClientAuthFailuresPerIp,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::LoginPerIp => "login_per_ip",
            Limit::LoginPerAccount => "login_per_account",
            Limit::LoginCooldown => "login_cooldown",
            Limit::RegisterPerIp => "register_per_ip",
            Limit::RefreshPerIp => "refresh_per_ip",
            Limit::ClientAuthFailuresPerIp => "client_auth_failures_per_ip",
        }
    }
}

/// The bucket key for the client's address.
pub fn ip_key(client: &ClientInfo) -> String {
    client.ip.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string())
}

/// The store's name for `limit`'s bucket of `key`.
fn bucket(limit: Limit, key: &str) -> String {
    format!("{}:{key}", limit.as_str())
}

/// Counts the refusal and audits it under the flood rule (`audit::Auditor::record_refusal`):
/// one row per limit and bucket key a minute, the others counted.
fn limited(
    state: &AppState,
    limit: Limit,
    key: &str,
    retry_after_secs: u64,
    client: &ClientInfo,
) -> ApiError {
    state.metrics.rate_limited(limit.as_str());
    if matches!(limit, Limit::LoginPerIp | Limit::LoginPerAccount | Limit::LoginCooldown) {
        state.metrics.login("rate_limited");
    }
    let event = AuditEvent::new("rate_limited", limit.as_str(), state.clock.now()).client(client);
    let action = event.action;
    if state.audit.record_refusal(&bucket(limit, key), event) == Flood::Suppressed {
        state.metrics.audit_suppressed(action);
    }
    ApiError::new(ErrorCode::RateLimited, "Too many attempts; try again later.")
        .with_retry_after(retry_after_secs)
}

/// Takes one token from `limit`'s bucket for `key`, or answers 429.
pub async fn charge(
    state: &AppState,
    limit: Limit,
    key: &str,
    rate: Rate,
    client: &ClientInfo,
) -> Result<(), ApiError> {
    let decision = state.limits.take(&bucket(limit, key), rate, state.clock.now().timestamp_millis()).await?;
    match decision.retry_after_secs() {
        None => Ok(()),
        Some(secs) => Err(limited(state, limit, key, secs, client)),
    }
}

/// Whose failures a login attempt is judged by, and counts towards.
pub struct LoginJudge {
    /// The key of the failure record and cool-down.
    pub failures_key: String,
    /// That record has failures a successful login must forget.
    pub failures: bool,
}

/// Charges a login attempt and checks its cool-down, in one call to the store. From a
/// device with a valid device token for this account, it is judged only by that device's
/// own budget and failures, so no stranger can lock it out; from anywhere else, by the
/// account's budget and the failures of this (account, client network) pair. The
/// address's budget applies to both.
pub async fn admit_login(
    state: &AppState,
    account: &str,
    device: Option<uuid::Uuid>,
    client: &ClientInfo,
) -> Result<LoginJudge, ApiError> {
    let ip = ip_key(client);
    let ip_bucket = bucket(Limit::LoginPerIp, &ip);
    let (account_key, failures_key) = match device {
        Some(device) => (format!("dev:{device}"), format!("dev:{device}")),
        None => (account.to_owned(), format!("{account}|{ip}")),
    };
    let account_bucket = bucket(Limit::LoginPerAccount, &account_key);
    let budgets = LoginBudgets {
        ip_bucket: &ip_bucket,
        ip_rate: state.config.rate_limit_login_per_ip,
        account_bucket: &account_bucket,
        account_rate: state.config.rate_limit_login_per_account,
        account: &failures_key,
    };
    match state.limits.admit_login(&budgets, state.clock.now().timestamp_millis()).await? {
        Admission::Admitted { failures } => Ok(LoginJudge { failures_key, failures }),
        Admission::Refused { by, retry_after_ms } => {
            let (limit, key) = match by {
                Refusal::IpBudget => (Limit::LoginPerIp, ip.as_str()),
                Refusal::AccountBudget => (Limit::LoginPerAccount, account_key.as_str()),
                Refusal::Cooldown => (Limit::LoginCooldown, failures_key.as_str()),
            };
            let secs = Decision::Denied { retry_after_ms }.retry_after_secs().unwrap_or(1);
            Err(limited(state, limit, key, secs, client))
        }
    }
}
