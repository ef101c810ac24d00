//! The in-process limiter's table: a map of bounded size whose every operation does a
//! bounded amount of work, however full it is.
//!
//! Keys are split over shards by a keyed hash (std's `RandomState`: keys are chosen by
//! clients, so they must not be able to aim at one shard or one hash chain). Each shard is
//! a small `Mutex` around a `hashlink::LinkedHashMap` kept in least-recently-used order, and
//! the lock is held for a lookup and, at most, a look at `PROBES` entries.
//!
//! When a shard is full, a new key takes the place of one of the `PROBES` least recently
//! used entries: one that is idle (forgetting it changes nothing) before one that is
//! merely in use; never one in an active cool-down. If all of those are cooling down, the new
//! key is refused (its caller answers as rate limited) and they move to the recently used
//! end, so the next new key looks at others. Idle entries that eviction did not reach are
//! dropped by `sweep`, which runs off the request path, one shard at a time.

use std::hash::{BuildHasher as _, RandomState};
use std::sync::Mutex;

use hashlink::LinkedHashMap;
use hashlink::linked_hash_map::RawEntryMut;

/// What forgetting an entry would cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Nothing: it is as good as absent (a full bucket, failures no longer remembered).
    Idle,
    /// A little: it may be forgotten to make room (a bucket with tokens left).
    InUse,
    /// It is refusing its key for this long yet: never forgotten before then.
    Cooling { remaining_ms: u64 },
}

pub trait Expiring {
    fn standing(&self, now_ms: i64) -> Standing;
}

/// A new key found its shard full of cool-downs; the first ends in this long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Full {
    pub retry_after_ms: u64,
}

/// A shard's lock was poisoned (a panic while it was held).
#[derive(Debug)]
pub struct Poisoned;

/// How many least recently used entries a new key in a full shard looks at.
pub const PROBES: usize = 8;
/// About this many entries per shard; at most 64 shards.
const SHARD_SIZE: usize = 1024;
const MAX_SHARDS: usize = 64;

type Shard<V> = LinkedHashMap<Box<str>, V, RandomState>;

pub struct Table<V> {
    shards: Box<[Mutex<Shard<V>>]>,
    hasher: RandomState,
    per_shard: usize,
}

impl<V: Expiring> Table<V> {
    /// A table of at most `max_entries` entries (rounded down to a multiple of the shards).
    pub fn new(max_entries: usize) -> Self {
        let count = (max_entries / SHARD_SIZE).clamp(1, MAX_SHARDS);
        let hasher = RandomState::new();
        let shards = (0..count).map(|_| Mutex::new(LinkedHashMap::with_hasher(hasher.clone()))).collect();
        Self { shards, hasher, per_shard: (max_entries / count).max(1) }
    }

    pub fn capacity(&self) -> usize {
        self.per_shard * self.shards.len()
    }

    fn shard(&self, hash: u64) -> &Mutex<Shard<V>> {
        // Bits the shard's own table does not use for its buckets or tags.
        &self.shards[(hash >> 32) as usize % self.shards.len()]
    }

    /// Runs `f` on `key`'s entry (created by `new` if absent and room can be made), which
    /// becomes the most recently used.
    pub fn update<R>(
        &self,
        key: &str,
        now_ms: i64,
        new: impl FnOnce() -> V,
        f: impl FnOnce(&mut V) -> R,
    ) -> Result<Result<R, Full>, Poisoned> {
        let hash = self.hasher.hash_one(key);
        let mut shard = self.shard(hash).lock().map_err(|_| Poisoned)?;
        if let RawEntryMut::Occupied(mut entry) = shard.raw_entry_mut().from_key_hashed_nocheck(hash, key) {
            entry.to_back();
            return Ok(Ok(f(entry.into_mut())));
        }
        if let Err(full) = make_room(&mut shard, self.per_shard, now_ms, true) {
            return Ok(Err(full));
        }
        let mut value = new();
        let answer = f(&mut value);
        if let RawEntryMut::Vacant(slot) = shard.raw_entry_mut().from_key_hashed_nocheck(hash, key) {
            slot.insert_hashed_nocheck(hash, key.into(), value);
        }
        Ok(Ok(answer))
    }

    /// Reads `key`'s entry, if there is one; it becomes the most recently used.
    pub fn read<R>(&self, key: &str, f: impl FnOnce(&V) -> R) -> Result<Option<R>, Poisoned> {
        let hash = self.hasher.hash_one(key);
        let mut shard = self.shard(hash).lock().map_err(|_| Poisoned)?;
        match shard.raw_entry_mut().from_key_hashed_nocheck(hash, key) {
            RawEntryMut::Occupied(mut entry) => {
                entry.to_back();
                Ok(Some(f(entry.get())))
            }
            RawEntryMut::Vacant(_) => Ok(None),
        }
    }

    /// Whether `key` has, or could be given, an entry now (evicting nothing yet).
    pub fn room_for(&self, key: &str, now_ms: i64) -> Result<Result<(), Full>, Poisoned> {
        let hash = self.hasher.hash_one(key);
        let mut shard = self.shard(hash).lock().map_err(|_| Poisoned)?;
        if shard.raw_entry().from_key_hashed_nocheck(hash, key).is_some() {
            return Ok(Ok(()));
        }
        Ok(make_room(&mut shard, self.per_shard, now_ms, false))
    }

    pub fn remove(&self, key: &str) -> Result<(), Poisoned> {
        let hash = self.hasher.hash_one(key);
        let mut shard = self.shard(hash).lock().map_err(|_| Poisoned)?;
        if let RawEntryMut::Occupied(entry) = shard.raw_entry_mut().from_key_hashed_nocheck(hash, key) {
            entry.remove();
        }
        Ok(())
    }

    /// Drops every idle entry, one shard at a time (each lock held for one shard's scan).
    pub fn sweep(&self, now_ms: i64) {
        for shard in &self.shards {
            if let Ok(mut shard) = shard.lock() {
                shard.retain(|_, v| v.standing(now_ms) != Standing::Idle);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().map_or(0, |s| s.len())).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Makes room for one more entry in a full shard, looking at no more than `PROBES` of its
/// least recently used entries: the first idle one goes, else the least recently used one
/// in use; cooling ones stay, and move to the recently used end so the next look sees
/// others. With `evict` false, only answers whether room could be made.
fn make_room<V: Expiring>(shard: &mut Shard<V>, max: usize, now_ms: i64, evict: bool) -> Result<(), Full> {
    if shard.len() < max {
        return Ok(());
    }
    let mut idle = None;
    let mut in_use = None;
    let mut cooling = Vec::new();
    let mut retry_after_ms = u64::MAX;
    for (key, value) in shard.iter().take(PROBES) {
        match value.standing(now_ms) {
            Standing::Idle => {
                idle = Some(key);
                break;
            }
            Standing::InUse => {
                in_use = in_use.or(Some(key));
            }
            Standing::Cooling { remaining_ms } => {
                cooling.push(key.clone());
                retry_after_ms = retry_after_ms.min(remaining_ms);
            }
        }
    }
    let victim = idle.or(in_use).cloned();
    for key in &cooling {
        shard.to_back(key);
    }
    match victim {
        Some(key) => {
            if evict {
                shard.remove(&key);
            }
            Ok(())
        }
        None => Err(Full { retry_after_ms: retry_after_ms.max(1) }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test entry: cooling until `until`, idle from `idle_at`, in use between.
    #[derive(Clone, Copy, Debug, PartialEq)]
    struct Probe {
        until: i64,
        idle_at: i64,
    }

    impl Expiring for Probe {
        fn standing(&self, now_ms: i64) -> Standing {
            if now_ms < self.until {
                Standing::Cooling { remaining_ms: (self.until - now_ms).unsigned_abs() }
            } else if now_ms >= self.idle_at {
                Standing::Idle
            } else {
                Standing::InUse
            }
        }
    }

    fn put(table: &Table<Probe>, key: &str, probe: Probe, now: i64) -> Result<(), Full> {
        table.update(key, now, || probe, |_| ()).expect("lock")
    }

    fn has(table: &Table<Probe>, key: &str) -> bool {
        table.read(key, |_| ()).expect("lock").is_some()
    }

    const IN_USE: Probe = Probe { until: 0, idle_at: i64::MAX };

    #[test]
    fn small_tables_are_one_shard_of_their_size() {
        let table = Table::<Probe>::new(16);
        assert_eq!(table.capacity(), 16);
        let big = Table::<Probe>::new(100_000);
        assert_eq!(big.shards.len(), 64);
        assert!(big.capacity() <= 100_000 && big.capacity() > 99_000);
    }

    #[test]
    fn a_full_table_forgets_an_idle_entry_before_one_in_use() {
        let table = Table::new(4);
        put(&table, "busy-1", IN_USE, 0).expect("room");
        put(&table, "idle", Probe { until: 0, idle_at: 10 }, 0).expect("room");
        put(&table, "busy-2", IN_USE, 0).expect("room");
        put(&table, "busy-3", IN_USE, 0).expect("room");
        put(&table, "new", IN_USE, 20).expect("room");
        assert!(!has(&table, "idle"), "the idle entry went");
        for key in ["busy-1", "busy-2", "busy-3", "new"] {
            assert!(has(&table, key), "{key}");
        }
        assert_eq!(table.len(), 4);
    }

    #[test]
    fn without_idle_entries_the_least_recently_used_goes() {
        let table = Table::new(4);
        for key in ["a", "b", "c", "d"] {
            put(&table, key, IN_USE, 0).expect("room");
        }
        // Using `a` makes `b` the least recently used.
        assert!(has(&table, "a"));
        put(&table, "e", IN_USE, 1).expect("room");
        assert!(!has(&table, "b"));
        for key in ["a", "c", "d", "e"] {
            assert!(has(&table, key), "{key}");
        }
    }

    #[test]
    fn a_table_full_of_cool_downs_refuses_new_keys_and_forgets_none() {
        let table = Table::new(16);
        for i in 0..16 {
            put(&table, &format!("cooling-{i}"), Probe { until: 60_000, idle_at: 120_000 }, 0).expect("room");
        }
        assert_eq!(put(&table, "new", IN_USE, 1_000), Err(Full { retry_after_ms: 59_000 }));
        assert_eq!(table.room_for("new", 1_000).expect("lock"), Err(Full { retry_after_ms: 59_000 }));
        assert!(table.room_for("cooling-3", 1_000).expect("lock").is_ok(), "known keys always have room");
        for i in 0..16 {
            assert!(has(&table, &format!("cooling-{i}")), "cooling-{i} was forgotten");
        }
        // Once the cool-downs have ended, their entries may make room.
        put(&table, "new", IN_USE, 60_000).expect("room after the cool-downs");
        assert_eq!(table.len(), 16);
        assert!(has(&table, "new"));
    }

    #[test]
    fn cool_downs_at_the_old_end_do_not_hide_room_behind_them() {
        let table = Table::new(16);
        for i in 0..15 {
            put(&table, &format!("cooling-{i}"), Probe { until: 60_000, idle_at: 120_000 }, 0).expect("room");
        }
        put(&table, "in-use", IN_USE, 0).expect("room");
        // The first look sees only cool-downs and refuses; they move aside, so the next
        // new key finds the entry in use behind them.
        assert!(put(&table, "new-1", IN_USE, 1).is_err());
        put(&table, "new-2", IN_USE, 2).expect("room behind the cool-downs");
        assert!(!has(&table, "in-use"));
        for i in 0..15 {
            assert!(has(&table, &format!("cooling-{i}")), "cooling-{i} was forgotten");
        }
    }

    #[test]
    fn room_for_evicts_nothing_and_sweep_drops_only_idle_entries() {
        let table = Table::new(4);
        for key in ["a", "b", "c"] {
            put(&table, key, Probe { until: 0, idle_at: 100 }, 0).expect("room");
        }
        put(&table, "d", Probe { until: 500, idle_at: 1_000 }, 0).expect("room");
        assert!(table.room_for("e", 200).expect("lock").is_ok());
        assert_eq!(table.len(), 4, "room_for only looked");
        table.sweep(200);
        assert_eq!(table.len(), 1);
        assert!(has(&table, "d"));
        table.remove("d").expect("lock");
        assert!(table.is_empty());
    }
}
