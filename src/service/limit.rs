//! Charging the rate limits of SPEC and the login cool-down. Every limit answers the
//! same 429 body, so a 429 never tells whether an account exists.

use crate::audit::AuditEvent;
use crate::config::Rate;
use crate::error::{ApiError, ErrorCode};
use crate::rate_limit::Decision;
use crate::service::ClientInfo;
use crate::state::AppState;

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

fn limited(state: &AppState, limit: Limit, retry_after_secs: u64, client: &ClientInfo) -> ApiError {
    state.metrics.rate_limited(limit.as_str());
    if matches!(limit, Limit::LoginPerIp | Limit::LoginPerAccount | Limit::LoginCooldown) {
        state.metrics.login("rate_limited");
    }
    state.audit.record(AuditEvent::new("rate_limited", limit.as_str(), state.clock.now()).client(client));
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
    let bucket = format!("{}:{key}", limit.as_str());
    let decision = state.limits.take(&bucket, rate, state.clock.now().timestamp_millis()).await?;
    match decision.retry_after_secs() {
        None => Ok(()),
        Some(secs) => Err(limited(state, limit, secs, client)),
    }
}

/// Refuses a login to an account that is cooling down after repeated failures.
pub async fn check_cooldown(state: &AppState, account: &str, client: &ClientInfo) -> Result<(), ApiError> {
    match state.limits.cooldown(account, state.clock.now().timestamp_millis()).await? {
        None => Ok(()),
        Some(ms) => {
            let secs = Decision::Denied { retry_after_ms: ms }.retry_after_secs().unwrap_or(1);
            Err(limited(state, Limit::LoginCooldown, secs, client))
        }
    }
}
