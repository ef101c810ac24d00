//! Where rate-limit buckets and login cool-downs live: Redis (atomic Lua scripts, shared
//! by every instance) or an in-process map whose memory stays bounded.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use redis::aio::ConnectionManager;

use crate::config::Rate;
use crate::rate_limit::{Bucket, CooldownPolicy, Decision, period_ms};
use crate::store::revocation::StoreError;

#[async_trait]
pub trait LimitStore: Send + Sync + 'static {
    /// Takes one token from the bucket `key`.
    async fn take(&self, key: &str, rate: Rate, now_ms: i64) -> Result<Decision, StoreError>;
    /// A login attempt's three checks in one call (one round trip to Redis): a token from
    /// the address's bucket, then one from the account's, then the account's cool-down.
    /// The first refusal ends it: a refused attempt spends nothing further.
    async fn admit_login(&self, login: &LoginBudgets<'_>, now_ms: i64) -> Result<Admission, StoreError>;
    /// Counts a failed login; starts or extends the cool-down past the threshold.
    async fn record_failure(
        &self,
        account: &str,
        policy: CooldownPolicy,
        now_ms: i64,
    ) -> Result<(), StoreError>;
    /// A successful login forgets the failures.
    async fn clear_failures(&self, account: &str) -> Result<(), StoreError>;
}

/// The buckets and the account a login attempt is charged to.
#[derive(Clone, Copy, Debug)]
pub struct LoginBudgets<'a> {
    pub ip_bucket: &'a str,
    pub ip_rate: Rate,
    pub account_bucket: &'a str,
    pub account_rate: Rate,
    /// Whose failures and cool-down count (the normalised email).
    pub account: &'a str,
}

/// Which check refused a login attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    IpBudget,
    AccountBudget,
    Cooldown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead. `failures`: the account has failed attempts that a success must forget.
    Admitted {
        failures: bool,
    },
    Refused {
        by: Refusal,
        retry_after_ms: u64,
    },
}

// The token bucket of `rate_limit::Bucket`, atomically in Redis, as a Lua function that
// returns the milliseconds until a token is due (0: taken). Tokens are fractional. An
// untouched bucket is full after one period, so it may expire then.
macro_rules! lua_take {
    () => {
        r"
local function take(key, capacity, period, now)
  local b = redis.call('HMGET', key, 't', 'u')
  local tokens = tonumber(b[1])
  local updated = tonumber(b[2])
  if tokens == nil or updated == nil then tokens = capacity; updated = now end
  local elapsed = now - updated
  if elapsed < 0 then elapsed = 0 end
  tokens = math.min(capacity, tokens + elapsed * capacity / period)
  if now > updated then updated = now end
  local retry = 0
  if tokens >= 1 then tokens = tokens - 1 else retry = math.ceil((1 - tokens) * period / capacity) end
  redis.call('HSET', key, 't', string.format('%.17g', tokens), 'u', string.format('%d', updated))
  redis.call('PEXPIRE', key, period)
  return retry
end
"
    };
}

const TAKE: &str =
    concat!(lua_take!(), "return take(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]))");

// KEYS: the address's bucket, the account's bucket, the account's failure record.
// Returns {check, retry_ms, failures}: check 0 admits, 1 to 3 name the refusing check.
const ADMIT_LOGIN: &str = concat!(
    lua_take!(),
    r"
local now = tonumber(ARGV[5])
local retry = take(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), now)
if retry > 0 then return {1, retry, 0} end
retry = take(KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4]), now)
if retry > 0 then return {2, retry, 0} end
local f = redis.call('HMGET', KEYS[3], 'until', 'n')
local cool_until = tonumber(f[1])
if cool_until ~= nil and cool_until > now then return {3, cool_until - now, 0} end
return {0, 0, tonumber(f[2]) or 0}
"
);

// One more consecutive failure; past the threshold, cool down for base * 2^(n - threshold),
// at most max.
const FAIL: &str = r"
local threshold = tonumber(ARGV[1])
local base = tonumber(ARGV[2])
local max = tonumber(ARGV[3])
local now = tonumber(ARGV[4])
local memory = tonumber(ARGV[5])
local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
if n >= threshold then
  local d = math.min(n - threshold, 40)
  local cool = math.min(base * (2 ^ d), max)
  redis.call('HSET', KEYS[1], 'until', string.format('%d', now + cool))
end
redis.call('PEXPIRE', KEYS[1], memory)
return n
";

pub struct RedisLimits {
    conn: ConnectionManager,
    prefix: String,
    take: redis::Script,
    admit_login: redis::Script,
    fail: redis::Script,
}

impl RedisLimits {
    pub fn new(conn: ConnectionManager, prefix: &str) -> Self {
        Self {
            conn,
            prefix: prefix.to_owned(),
            take: redis::Script::new(TAKE),
            admit_login: redis::Script::new(ADMIT_LOGIN),
            fail: redis::Script::new(FAIL),
        }
    }

    fn bucket_key(&self, bucket: &str) -> String {
        format!("{}rl:{bucket}", self.prefix)
    }

    fn cool_key(&self, account: &str) -> String {
        format!("{}cool:{account}", self.prefix)
    }
}

fn redis_err(e: redis::RedisError) -> StoreError {
    StoreError::new(e.to_string())
}

#[async_trait]
impl LimitStore for RedisLimits {
    async fn take(&self, key: &str, rate: Rate, now_ms: i64) -> Result<Decision, StoreError> {
        let mut conn = self.conn.clone();
        let retry: i64 = self
            .take
            .key(self.bucket_key(key))
            .arg(rate.capacity)
            .arg(period_ms(rate))
            .arg(now_ms)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        Ok(if retry <= 0 {
            Decision::Allowed
        } else {
            Decision::Denied { retry_after_ms: retry.unsigned_abs() }
        })
    }

    async fn admit_login(&self, login: &LoginBudgets<'_>, now_ms: i64) -> Result<Admission, StoreError> {
        let mut conn = self.conn.clone();
        let (check, retry, failures): (i64, i64, i64) = self
            .admit_login
            .key(self.bucket_key(login.ip_bucket))
            .key(self.bucket_key(login.account_bucket))
            .key(self.cool_key(login.account))
            .arg(login.ip_rate.capacity)
            .arg(period_ms(login.ip_rate))
            .arg(login.account_rate.capacity)
            .arg(period_ms(login.account_rate))
            .arg(now_ms)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        let by = match check {
            0 => return Ok(Admission::Admitted { failures: failures > 0 }),
            1 => Refusal::IpBudget,
            2 => Refusal::AccountBudget,
            3 => Refusal::Cooldown,
            other => return Err(StoreError::new(format!("login admission script answered {other}"))),
        };
        Ok(Admission::Refused { by, retry_after_ms: retry.unsigned_abs().max(1) })
    }

    async fn record_failure(
        &self,
        account: &str,
        policy: CooldownPolicy,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = self
            .fail
            .key(self.cool_key(account))
            .arg(policy.threshold)
            .arg(policy.base_ms)
            .arg(policy.max_ms)
            .arg(now_ms)
            .arg(policy.memory_ms())
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        Ok(())
    }

    async fn clear_failures(&self, account: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("DEL").arg(self.cool_key(account)).query_async::<()>(&mut conn).await.map_err(redis_err)
    }
}

/// At most this many buckets (and as many cool-down records) live in memory. A flood of
/// spoofed addresses fills it with buckets that go idle; when full, idle ones are
/// dropped (an idle bucket is full anyway), then the least recently used.
pub const MAX_ENTRIES: usize = 100_000;

#[derive(Clone, Copy)]
struct Failures {
    count: u32,
    until_ms: i64,
    last_ms: i64,
}

pub struct MemoryLimits {
    buckets: Mutex<HashMap<String, (Bucket, Rate)>>,
    failures: Mutex<HashMap<String, Failures>>,
    max_entries: usize,
}

impl Default for MemoryLimits {
    fn default() -> Self {
        Self::with_capacity(MAX_ENTRIES)
    }
}

fn poisoned<T>(_: T) -> StoreError {
    StoreError::new("in-process limiter lock poisoned")
}

/// Drops failure counts no longer remembered and not cooling down.
fn forget_stale_failures(failures: &mut HashMap<String, Failures>, now_ms: i64, memory_ms: u64) {
    let memory = i64::try_from(memory_ms).unwrap_or(i64::MAX);
    failures.retain(|_, f| now_ms - f.last_ms < memory || f.until_ms > now_ms);
}

impl MemoryLimits {
    pub fn with_capacity(max_entries: usize) -> Self {
        Self { buckets: Mutex::default(), failures: Mutex::default(), max_entries: max_entries.max(16) }
    }

    pub fn len(&self) -> usize {
        self.buckets.lock().map_or(0, |b| b.len()) + self.failures.lock().map_or(0, |f| f.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops what no longer matters: full-again buckets and forgotten failures.
    pub fn sweep(&self, now_ms: i64, cooldown_memory_ms: u64) {
        if let Ok(mut buckets) = self.buckets.lock() {
            buckets.retain(|_, (b, rate)| !b.is_idle(*rate, now_ms));
        }
        if let Ok(mut failures) = self.failures.lock() {
            forget_stale_failures(&mut failures, now_ms, cooldown_memory_ms);
        }
    }

    /// Makes room for one more bucket: idle ones first, then the least recently used tenth.
    fn make_room(buckets: &mut HashMap<String, (Bucket, Rate)>, max: usize, now_ms: i64) {
        if buckets.len() < max {
            return;
        }
        buckets.retain(|_, (b, rate)| !b.is_idle(*rate, now_ms));
        if buckets.len() < max {
            return;
        }
        let mut ages: Vec<i64> = buckets.values().map(|(b, _)| b.updated_ms).collect();
        let cut = ages.len() / 10;
        ages.select_nth_unstable(cut);
        let threshold = ages[cut];
        buckets.retain(|_, (b, _)| b.updated_ms > threshold);
    }
}

#[async_trait]
impl LimitStore for MemoryLimits {
    async fn take(&self, key: &str, rate: Rate, now_ms: i64) -> Result<Decision, StoreError> {
        let mut buckets = self.buckets.lock().map_err(poisoned)?;
        if !buckets.contains_key(key) {
            Self::make_room(&mut buckets, self.max_entries, now_ms);
        }
        let (bucket, stored_rate) =
            buckets.entry(key.to_owned()).or_insert((Bucket::full(rate, now_ms), rate));
        *stored_rate = rate;
        Ok(bucket.take(rate, now_ms))
    }

    async fn admit_login(&self, login: &LoginBudgets<'_>, now_ms: i64) -> Result<Admission, StoreError> {
        for (bucket, rate, by) in [
            (login.ip_bucket, login.ip_rate, Refusal::IpBudget),
            (login.account_bucket, login.account_rate, Refusal::AccountBudget),
        ] {
            if let Decision::Denied { retry_after_ms } = self.take(bucket, rate, now_ms).await? {
                return Ok(Admission::Refused { by, retry_after_ms });
            }
        }
        let failures = self.failures.lock().map_err(poisoned)?;
        Ok(match failures.get(login.account) {
            Some(f) if f.until_ms > now_ms => Admission::Refused {
                by: Refusal::Cooldown,
                retry_after_ms: (f.until_ms - now_ms).unsigned_abs(),
            },
            Some(f) => Admission::Admitted { failures: f.count > 0 },
            None => Admission::Admitted { failures: false },
        })
    }

    async fn record_failure(
        &self,
        account: &str,
        policy: CooldownPolicy,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut failures = self.failures.lock().map_err(poisoned)?;
        if failures.len() >= self.max_entries && !failures.contains_key(account) {
            forget_stale_failures(&mut failures, now_ms, policy.memory_ms());
            if failures.len() >= self.max_entries {
                // Still full of fresh failures: forget the oldest before counting a new one.
                if let Some(oldest) = failures.iter().min_by_key(|(_, f)| f.last_ms).map(|(k, _)| k.clone()) {
                    failures.remove(&oldest);
                }
            }
        }
        let memory = i64::try_from(policy.memory_ms()).unwrap_or(i64::MAX);
        let entry =
            failures.entry(account.to_owned()).or_insert(Failures { count: 0, until_ms: 0, last_ms: now_ms });
        if now_ms - entry.last_ms >= memory {
            *entry = Failures { count: 0, until_ms: 0, last_ms: now_ms };
        }
        entry.count = entry.count.saturating_add(1);
        entry.last_ms = entry.last_ms.max(now_ms);
        let cool = policy.cooldown_ms(entry.count);
        if cool > 0 {
            entry.until_ms = now_ms.saturating_add(i64::try_from(cool).unwrap_or(i64::MAX));
        }
        Ok(())
    }

    async fn clear_failures(&self, account: &str) -> Result<(), StoreError> {
        self.failures.lock().map_err(poisoned)?.remove(account);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn memory_stays_bounded_under_a_flood_of_addresses() {
        let store = MemoryLimits::with_capacity(1_000);
        let rate = Rate { capacity: 30, period: Duration::from_secs(60) };
        for i in 0..200_000i64 {
            store
                .take(&format!("login:ip:10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255), rate, i)
                .await
                .unwrap();
        }
        assert!(store.len() <= 1_000, "{} buckets", store.len());
        // The newest still count against their budget.
        let key = "login:ip:10.3.13.63";
        for _ in 0..29 {
            assert_eq!(store.take(key, rate, 200_000).await.unwrap(), Decision::Allowed);
        }
        assert!(matches!(store.take(key, rate, 200_000).await.unwrap(), Decision::Denied { .. }));
    }

    #[tokio::test]
    async fn sweep_forgets_idle_buckets() {
        let store = MemoryLimits::default();
        let rate = Rate { capacity: 1, period: Duration::from_secs(1) };
        store.take("a", rate, 0).await.unwrap();
        store.sweep(500, 60_000);
        assert_eq!(store.len(), 1);
        store.sweep(1_000, 60_000);
        assert!(store.is_empty());
    }
}
