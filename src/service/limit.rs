//! Charging the rate limits of SPEC and the login cool-down. Every limit answers the
//! same 429 body, so a 429 never tells whether an account exists.

use std::net::{IpAddr, Ipv6Addr};

use crate::audit::{AuditEvent, Flood};
use crate::config::{Rate, canonical};
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
    /// Mail triggered for one address (register, resend, forgot, email change).
    EmailPerAddress,
    /// Mail triggered from one client network.
    EmailPerIp,
    /// Passwordless passkey ceremonies started from one client network (each one is state
    /// a stranger makes the server keep).
    PasskeyPerIp,
    /// Second-factor guesses for one account, across login tickets and step-ups.
    MfaPerAccount,
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
            Limit::EmailPerAddress => "email_per_address",
            Limit::EmailPerIp => "email_per_ip",
            Limit::PasskeyPerIp => "passkey_per_ip",
            Limit::MfaPerAccount => "mfa_per_account",
        }
    }
}

/// The bucket key for the client's address: IPv6 clients by their network of
/// `RATE_LIMIT_IPV6_PREFIX` bits (a /64 is what one subscriber gets: counting single
/// addresses would give them 2^64 budgets).
pub fn ip_key(state: &AppState, client: &ClientInfo) -> String {
    address_key(client.ip, state.config.rate_limit_ipv6_prefix)
}

fn address_key(ip: Option<IpAddr>, ipv6_prefix: u8) -> String {
    match ip.map(canonical) {
        None => "unknown".to_owned(),
        Some(IpAddr::V4(v4)) => v4.to_string(),
        Some(IpAddr::V6(v6)) => {
            let prefix = u32::from(ipv6_prefix.clamp(1, 128));
            let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
            format!("{}/{prefix}", Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
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
    answer(state, limit, key, decision, client)
}

/// Answers 429 if `limit`'s bucket for `key` has no token left, taking none: for budgets
/// of failures, which must refuse before the work whose failure they count.
pub async fn check(
    state: &AppState,
    limit: Limit,
    key: &str,
    rate: Rate,
    client: &ClientInfo,
) -> Result<(), ApiError> {
    let decision = state.limits.peek(&bucket(limit, key), rate, state.clock.now().timestamp_millis()).await?;
    answer(state, limit, key, decision, client)
}

fn answer(
    state: &AppState,
    limit: Limit,
    key: &str,
    decision: Decision,
    client: &ClientInfo,
) -> Result<(), ApiError> {
    match decision.retry_after_secs() {
        None => Ok(()),
        Some(secs) => Err(limited(state, limit, key, secs, client)),
    }
}

/// Whether a mail may be triggered for `address` from this client: charges the client's
/// network, then the address (canonical form, whether or not an account has it). A refusal
/// is counted and audited like any other, but the caller answers exactly as if the mail
/// had been queued: a 429 for one address and not another would tell which are registered.
pub async fn mail_allowed(state: &AppState, address: &str, client: &ClientInfo) -> Result<bool, ApiError> {
    let ip = ip_key(state, client);
    for (limit, key, rate) in [
        (Limit::EmailPerIp, ip.as_str(), state.config.rate_limit_email_per_ip),
        (Limit::EmailPerAddress, address, state.config.rate_limit_email_per_address),
    ] {
        match charge(state, limit, key, rate, client).await {
            Ok(()) => {}
            Err(e) if e.code == ErrorCode::RateLimited => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
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
    let ip = ip_key(state, client);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ip: &str, prefix: u8) -> String {
        address_key(Some(ip.parse().expect("ip")), prefix)
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_network() {
        assert_eq!(key("2001:db8:1:2::1", 64), "2001:db8:1:2::/64");
        assert_eq!(key("2001:db8:1:2:ffff:ffff:ffff:ffff", 64), "2001:db8:1:2::/64");
        assert_ne!(key("2001:db8:1:3::1", 64), key("2001:db8:1:2::1", 64));
        assert_eq!(key("2001:db8:1:2::1", 48), key("2001:db8:1:3::1", 48));
        assert_eq!(key("2001:db8::1", 128), "2001:db8::1/128");
        assert_ne!(key("2001:db8::1", 128), key("2001:db8::2", 128));
        assert_eq!(key("ffff::1", 1), "8000::/1");
    }

    #[test]
    fn ipv4_and_ipv4_mapped_addresses_are_whole_addresses() {
        assert_eq!(key("198.51.100.7", 64), "198.51.100.7");
        assert_eq!(key("::ffff:198.51.100.7", 64), "198.51.100.7");
        assert_eq!(address_key(None, 64), "unknown");
    }
}
