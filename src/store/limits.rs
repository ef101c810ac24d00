//! Where rate-limit buckets and login cool-downs live: Redis (atomic Lua scripts, shared
//! by every instance) or an in-process table whose memory stays bounded and whose every
//! operation does bounded work (`store::bounded`).

use async_trait::async_trait;

use crate::config::Rate;
use crate::rate_limit::{Bucket, CooldownPolicy, Decision, period_ms};
use crate::store::bounded::{Expiring, Full, Poisoned, Standing, Table};
use crate::store::redis_conn::{Mode, RedisConn};
use crate::store::revocation::StoreError;

#[async_trait]
pub trait LimitStore: Send + Sync + 'static {
    /// Takes one token from the bucket `key`.
    async fn take(&self, key: &str, rate: Rate, now_ms: i64) -> Result<Decision, StoreError>;
    /// What `take` would decide, taking nothing.
    async fn peek(&self, key: &str, rate: Rate, now_ms: i64) -> Result<Decision, StoreError>;
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

// The cool-down check of `ADMIT_LOGIN` alone (a cluster's third step). KEYS: the account's
// failure record. ARGV: now. Returns {check, retry_ms, failures} as `ADMIT_LOGIN` does.
const COOLING: &str = r"
local now = tonumber(ARGV[1])
local f = redis.call('HMGET', KEYS[1], 'until', 'n')
local cool_until = tonumber(f[1])
if cool_until ~= nil and cool_until > now then return {3, cool_until - now, 0} end
return {0, 0, tonumber(f[2]) or 0}
";

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

/// Rate limits in Redis. Every script works on one key, except the login admission: its
/// three keys (the address's bucket, the account's bucket, the account's failures) belong
/// to different clients and accounts, so on a Redis Cluster they live in different hash
/// slots (STACK trap 19). There the admission runs as three single-key steps in the same
/// order, each only if the one before admitted, which keeps its rule: the first refusal
/// ends it and a refused attempt spends nothing further. What the cluster gives up is the
/// single round trip and the atomicity across the three: two concurrent attempts may
/// interleave between steps, each still charged to both buckets exactly once.
///
/// Limiter writes do not wait for a replica: a failover may forget a few spent tokens or a
/// failure count, which loosens a limit for one period and never locks anyone out.
pub struct RedisLimits {
    conn: RedisConn,
    prefix: String,
    take: redis::Script,
    admit_login: redis::Script,
    cooling: redis::Script,
    fail: redis::Script,
}

impl RedisLimits {
    pub fn new(conn: RedisConn, prefix: &str) -> Self {
        Self {
            conn,
            prefix: prefix.to_owned(),
            take: redis::Script::new(TAKE),
            admit_login: redis::Script::new(ADMIT_LOGIN),
            cooling: redis::Script::new(COOLING),
            fail: redis::Script::new(FAIL),
        }
    }

    /// `admit_login` on a cluster: the three checks one key at a time.
    async fn admit_login_by_slot(
        &self,
        login: &LoginBudgets<'_>,
        now_ms: i64,
    ) -> Result<Admission, StoreError> {
        for (bucket, rate, by) in [
            (login.ip_bucket, login.ip_rate, Refusal::IpBudget),
            (login.account_bucket, login.account_rate, Refusal::AccountBudget),
        ] {
            if let Decision::Denied { retry_after_ms } = self.take(bucket, rate, now_ms).await? {
                return Ok(Admission::Refused { by, retry_after_ms: retry_after_ms.max(1) });
            }
        }
        let mut conn = self.conn.clone();
        let answer: (i64, i64, i64) = self
            .cooling
            .key(self.cool_key(login.account))
            .arg(now_ms)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        admission(answer)
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

/// The admission scripts' answer: {check, retry_ms, failures}.
fn admission((check, retry, failures): (i64, i64, i64)) -> Result<Admission, StoreError> {
    let by = match check {
        0 => return Ok(Admission::Admitted { failures: failures > 0 }),
        1 => Refusal::IpBudget,
        2 => Refusal::AccountBudget,
        3 => Refusal::Cooldown,
        other => return Err(StoreError::new(format!("login admission script answered {other}"))),
    };
    Ok(Admission::Refused { by, retry_after_ms: retry.unsigned_abs().max(1) })
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

    async fn peek(&self, key: &str, rate: Rate, now_ms: i64) -> Result<Decision, StoreError> {
        let mut conn = self.conn.clone();
        let (tokens, updated): (Option<f64>, Option<i64>) = redis::cmd("HMGET")
            .arg(self.bucket_key(key))
            .arg("t")
            .arg("u")
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        // The script's arithmetic, in `rate_limit::Bucket`: an absent bucket is full.
        Ok(match (tokens, updated) {
            (Some(tokens), Some(updated_ms)) => Bucket { tokens, updated_ms }.peek(rate, now_ms),
            _ => Decision::Allowed,
        })
    }

    async fn admit_login(&self, login: &LoginBudgets<'_>, now_ms: i64) -> Result<Admission, StoreError> {
        if self.conn.mode() == Mode::Cluster {
            return self.admit_login_by_slot(login, now_ms).await;
        }
        let mut conn = self.conn.clone();
        let answer: (i64, i64, i64) = self
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
        admission(answer)
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

/// At most this many buckets (and as many failure records) live in memory. A flood of
/// spoofed addresses fills it with buckets that go idle; when a new key finds its part of
/// the table full, an idle entry (a full bucket, forgotten failures) makes room first, then
/// the least recently used one in use. A bucket that is refusing its key and a running
/// cool-down are never forgotten before their time: a new key that finds only those is
/// refused as rate limited (see `store::bounded`).
pub const MAX_ENTRIES: usize = 100_000;

impl Expiring for (Bucket, Rate) {
    fn standing(&self, now_ms: i64) -> Standing {
        let (bucket, rate) = self;
        let tokens = bucket.tokens_at(*rate, now_ms);
        if tokens >= f64::from(rate.capacity) {
            Standing::Idle
        } else if tokens < 1.0 {
            match bucket.peek(*rate, now_ms) {
                Decision::Denied { retry_after_ms } => Standing::Cooling { remaining_ms: retry_after_ms },
                Decision::Allowed => Standing::InUse,
            }
        } else {
            Standing::InUse
        }
    }
}

/// An account's consecutive failed logins.
#[derive(Clone, Copy, Debug)]
struct Failures {
    count: u32,
    until_ms: i64,
    last_ms: i64,
    /// How long they are remembered without a new one (`CooldownPolicy::memory_ms`).
    memory_ms: i64,
}

impl Expiring for Failures {
    fn standing(&self, now_ms: i64) -> Standing {
        if self.until_ms > now_ms {
            Standing::Cooling { remaining_ms: (self.until_ms - now_ms).unsigned_abs() }
        } else if now_ms - self.last_ms >= self.memory_ms {
            Standing::Idle
        } else {
            Standing::InUse
        }
    }
}

pub struct MemoryLimits {
    buckets: Table<(Bucket, Rate)>,
    failures: Table<Failures>,
}

impl Default for MemoryLimits {
    fn default() -> Self {
        Self::with_capacity(MAX_ENTRIES)
    }
}

impl From<Poisoned> for StoreError {
    fn from(_: Poisoned) -> Self {
        StoreError::new("in-process limiter lock poisoned")
    }
}

impl MemoryLimits {
    pub fn with_capacity(max_entries: usize) -> Self {
        let max_entries = max_entries.max(16);
        Self { buckets: Table::new(max_entries), failures: Table::new(max_entries) }
    }

    pub fn len(&self) -> usize {
        self.buckets.len() + self.failures.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops what no longer matters: full-again buckets and forgotten failures.
    pub fn sweep(&self, now_ms: i64) {
        self.buckets.sweep(now_ms);
        self.failures.sweep(now_ms);
    }
}

#[async_trait]
impl LimitStore for MemoryLimits {
    async fn take(&self, key: &str, rate: Rate, now_ms: i64) -> Result<Decision, StoreError> {
        let taken = self.buckets.update(
            key,
            now_ms,
            || (Bucket::full(rate, now_ms), rate),
            |(bucket, stored_rate)| {
                *stored_rate = rate;
                bucket.take(rate, now_ms)
            },
        )?;
        // A new key with no room: refused until a cool-down ends and makes some.
        Ok(taken.unwrap_or_else(|Full { retry_after_ms }| Decision::Denied { retry_after_ms }))
    }

    async fn peek(&self, key: &str, rate: Rate, now_ms: i64) -> Result<Decision, StoreError> {
        let seen = self.buckets.read(key, |(bucket, _)| bucket.peek(rate, now_ms))?;
        Ok(seen.unwrap_or(Decision::Allowed))
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
        let seen = self.failures.read(login.account, |f| (f.count, f.standing(now_ms)))?;
        Ok(match seen {
            Some((_, Standing::Cooling { remaining_ms })) => {
                Admission::Refused { by: Refusal::Cooldown, retry_after_ms: remaining_ms }
            }
            Some((count, _)) => Admission::Admitted { failures: count > 0 },
            // An account with no record is admitted only if its failure could be counted:
            // with the table full of cool-downs, it waits as if cooling down itself.
            None => match self.failures.room_for(login.account, now_ms)? {
                Ok(()) => Admission::Admitted { failures: false },
                Err(Full { retry_after_ms }) => Admission::Refused { by: Refusal::Cooldown, retry_after_ms },
            },
        })
    }

    async fn record_failure(
        &self,
        account: &str,
        policy: CooldownPolicy,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let memory_ms = i64::try_from(policy.memory_ms()).unwrap_or(i64::MAX);
        let fresh = Failures { count: 0, until_ms: 0, last_ms: now_ms, memory_ms };
        let counted = self.failures.update(
            account,
            now_ms,
            || fresh,
            |entry| {
                if entry.standing(now_ms) == Standing::Idle {
                    *entry = fresh;
                }
                entry.count = entry.count.saturating_add(1);
                entry.last_ms = entry.last_ms.max(now_ms);
                entry.memory_ms = memory_ms;
                let cool = policy.cooldown_ms(entry.count);
                if cool > 0 {
                    entry.until_ms = now_ms.saturating_add(i64::try_from(cool).unwrap_or(i64::MAX));
                }
            },
        )?;
        if counted.is_err() {
            // Admission found room, but other accounts' cool-downs filled it since: this one
            // failure goes uncounted rather than forgetting a running cool-down.
            tracing::debug!("in-process limiter full of cool-downs: a failed login was not counted");
        }
        Ok(())
    }

    async fn clear_failures(&self, account: &str) -> Result<(), StoreError> {
        self.failures.remove(account)?;
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
        store.sweep(500);
        assert_eq!(store.len(), 1);
        store.sweep(1_000);
        assert!(store.is_empty());
    }

    fn secs(capacity: u32, secs: u64) -> Rate {
        Rate { capacity, period: Duration::from_secs(secs) }
    }

    #[tokio::test]
    async fn a_new_key_takes_the_place_of_an_idle_bucket_before_a_spent_one() {
        let store = MemoryLimits::with_capacity(16);
        let (fast, slow) = (secs(2, 1), secs(2, 60));
        // Interleaved, so each new key finds an idle one among the least recently used it
        // looks at (`bounded::PROBES`).
        for i in 0..8 {
            store.take(&format!("fast-{i}"), fast, 0).await.unwrap();
            store.take(&format!("slow-{i}"), slow, 0).await.unwrap();
        }
        // A second on, the fast buckets are full again; the slow ones still miss a token.
        for i in 0..8 {
            assert_eq!(store.take(&format!("new-{i}"), slow, 1_000).await.unwrap(), Decision::Allowed);
        }
        assert_eq!(store.len(), 16);
        for i in 0..8 {
            let key = format!("slow-{i}");
            assert_eq!(store.take(&key, slow, 1_000).await.unwrap(), Decision::Allowed);
            assert!(
                matches!(store.take(&key, slow, 1_000).await.unwrap(), Decision::Denied { .. }),
                "{key} was forgotten: its spent token came back"
            );
        }
    }

    #[tokio::test]
    async fn a_flood_of_new_keys_never_frees_a_refusing_bucket() {
        let store = MemoryLimits::with_capacity(16);
        let one = secs(1, 60);
        for i in 0..16 {
            assert_eq!(store.take(&format!("ip-{i}"), one, 0).await.unwrap(), Decision::Allowed);
        }
        for i in 0..1_000 {
            assert_eq!(
                store.take(&format!("flood-{i}"), one, 1_000).await.unwrap(),
                Decision::Denied { retry_after_ms: 59_000 },
                "a new key in a table full of refusing buckets is refused"
            );
        }
        for i in 0..16 {
            assert!(
                matches!(store.take(&format!("ip-{i}"), one, 1_000).await.unwrap(), Decision::Denied { .. }),
                "ip-{i} got a fresh budget"
            );
        }
        assert_eq!(
            store.take("flood-0", one, 60_000).await.unwrap(),
            Decision::Allowed,
            "room once they refill"
        );
    }

    #[tokio::test]
    async fn a_table_full_of_cool_downs_refuses_new_accounts_and_forgets_none() {
        let store = MemoryLimits::with_capacity(16);
        let wide = secs(1_000_000, 1);
        let policy = CooldownPolicy { threshold: 1, base_ms: 60_000, max_ms: 60_000 };
        let admit = |account: &'static str, now| {
            let store = &store;
            async move {
                let budgets = LoginBudgets {
                    ip_bucket: "ip",
                    ip_rate: wide,
                    account_bucket: "account",
                    account_rate: wide,
                    account,
                };
                store.admit_login(&budgets, now).await.unwrap()
            }
        };
        const ACCOUNTS: [&str; 16] =
            ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p"];
        for account in ACCOUNTS {
            store.record_failure(account, policy, 0).await.unwrap();
        }
        assert_eq!(
            admit("newcomer", 1_000).await,
            Admission::Refused { by: Refusal::Cooldown, retry_after_ms: 59_000 }
        );
        // Even a failure counted for it (admitted just before the table filled) evicts no one.
        store.record_failure("newcomer", policy, 1_000).await.unwrap();
        for account in ACCOUNTS {
            assert_eq!(
                admit(account, 1_000).await,
                Admission::Refused { by: Refusal::Cooldown, retry_after_ms: 59_000 },
                "{account}'s cool-down was forgotten"
            );
        }
        assert_eq!(admit("newcomer", 60_000).await, Admission::Admitted { failures: false });
    }

    #[tokio::test]
    async fn peek_takes_nothing() {
        let store = MemoryLimits::default();
        let two = secs(2, 60);
        assert_eq!(store.peek("k", two, 0).await.unwrap(), Decision::Allowed);
        assert!(store.is_empty(), "peeking at an unknown key creates nothing");
        store.take("k", two, 0).await.unwrap();
        assert_eq!(store.peek("k", two, 0).await.unwrap(), Decision::Allowed);
        store.take("k", two, 0).await.unwrap();
        assert_eq!(store.peek("k", two, 0).await.unwrap(), Decision::Denied { retry_after_ms: 30_000 });
        assert_eq!(store.peek("k", two, 30_000).await.unwrap(), Decision::Allowed);
    }
}
