//! Concurrent point reads folded into one query.
//!
//! Used for `/v1/users/me` profiles (one `WHERE id IN (…)` for many requests) and for the
//! bearer check's session lookups in Redis (one `MGET` for many requests).
//!
//! Every statement sea-orm runs checks a connection out of the pool, and sqlx pings it on
//! the way back in: for a one-row read such as `/v1/users/me` that checkout costs as
//! much as the query (two PostgreSQL wake-ups and their syscalls on both sides). A
//! [`Batcher`] lets concurrent requests for such rows share one `WHERE id IN (…)` query.
//! At most `in_flight` queries run at once; requests that arrive meanwhile queue and go
//! together in the next one. A lone request is sent at once, so light load waits for
//! nothing, and every query starts after each request in it was queued, so no answer is
//! older than its request.
//!
//! Hand-written rather than the `dataloader` crate: that one runs one batch at a time
//! behind a mutex, gathers a batch by yielding a fixed number of times, and has no way
//! to hand a failed query's error to the requests that were waiting on it.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::error::ApiError;
use crate::store::revocation::StoreError;

type Reply<V, E> = oneshot::Sender<Result<Option<V>, E>>;

/// The error a request gets when the dispatcher is gone (shut down) or the query's task
/// died before answering.
pub trait Stopped {
    fn stopped() -> Self;
}

impl Stopped for ApiError {
    fn stopped() -> Self {
        ApiError::unavailable("The request could not be completed; try again shortly.")
    }
}

impl Stopped for StoreError {
    fn stopped() -> Self {
        StoreError::new("the batched read stopped before answering")
    }
}

/// Reads rows by key, many requests to a query. Dropping it stops its dispatcher once the
/// queued requests are answered.
pub struct Batcher<K, V, E = ApiError> {
    queue: mpsc::Sender<(K, Reply<V, E>)>,
}

impl<K, V, E> Batcher<K, V, E>
where
    K: Ord + Hash + Clone + Send + Sync + 'static,
    V: Clone + Send + 'static,
    E: Stopped + Clone + Send + 'static,
{
    /// Starts the dispatcher on the current runtime. `load` is given at most `max_batch`
    /// distinct keys, sorted, and answers the rows it found; a key it leaves out reads
    /// as `None`.
    pub fn spawn<F, Fut>(max_batch: usize, in_flight: usize, load: F) -> Self
    where
        F: Fn(Vec<K>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<HashMap<K, V>, E>> + Send + 'static,
    {
        let max_batch = max_batch.max(1);
        let in_flight = in_flight.max(1);
        // Bounded: when the database falls behind, requests wait here instead of piling up.
        let (queue, requests) = mpsc::channel(max_batch * in_flight * 4);
        tokio::spawn(dispatch(requests, max_batch, in_flight, Arc::new(load)));
        Self { queue }
    }

    /// The row for `key`, read by a query that started after this call.
    pub async fn get(&self, key: K) -> Result<Option<V>, E> {
        let (reply, answer) = oneshot::channel();
        self.queue.send((key, reply)).await.map_err(|_| E::stopped())?;
        answer.await.map_err(|_| E::stopped())?
    }
}

async fn dispatch<K, V, E, F, Fut>(
    mut requests: mpsc::Receiver<(K, Reply<V, E>)>,
    max_batch: usize,
    in_flight: usize,
    load: Arc<F>,
) where
    K: Ord + Hash + Clone + Send + Sync + 'static,
    V: Clone + Send + 'static,
    E: Clone + Send + 'static,
    F: Fn(Vec<K>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<HashMap<K, V>, E>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(in_flight));
    loop {
        // A free slot first, then whatever has queued by then: while every slot is busy,
        // arriving requests gather into the next batch.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else { return };
        let mut batch = Vec::with_capacity(max_batch);
        if requests.recv_many(&mut batch, max_batch).await == 0 {
            return; // every sender is gone and the queue is empty
        }
        let load = Arc::clone(&load);
        tokio::spawn(async move {
            let _slot = slot;
            let mut keys: Vec<K> = batch.iter().map(|(key, _)| key.clone()).collect();
            keys.sort_unstable();
            keys.dedup();
            match load(keys).await {
                Ok(rows) => {
                    for (key, reply) in batch {
                        // The requester may have gone (client disconnected): nothing to do.
                        let _ = reply.send(Ok(rows.get(&key).cloned()));
                    }
                }
                Err(err) => {
                    for (_, reply) in batch {
                        let _ = reply.send(Err(err.clone()));
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::error::ErrorCode;

    type Seen = Arc<Mutex<Vec<Vec<u32>>>>;

    /// A loader that records each batch and answers `key * 10` for even keys, after `delay`.
    fn recording(delay: Duration) -> (Seen, Batcher<u32, u32>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let batcher = Batcher::spawn(8, 1, move |keys: Vec<u32>| {
            let log = Arc::clone(&log);
            async move {
                log.lock().map_err(|_| ApiError::unavailable("poisoned"))?.push(keys.clone());
                tokio::time::sleep(delay).await;
                Ok(keys.into_iter().filter(|k| k % 2 == 0).map(|k| (k, k * 10)).collect())
            }
        });
        (seen, batcher)
    }

    #[tokio::test]
    async fn a_lone_request_is_answered_by_a_query_of_its_own() {
        let (seen, batcher) = recording(Duration::ZERO);
        assert_eq!(batcher.get(4).await.unwrap(), Some(40));
        assert_eq!(batcher.get(3).await.unwrap(), None);
        assert_eq!(*seen.lock().unwrap(), vec![vec![4], vec![3]]);
    }

    #[tokio::test]
    async fn requests_queued_behind_a_running_query_share_the_next_one() {
        let (seen, batcher) = recording(Duration::from_millis(50));
        let batcher = Arc::new(batcher);
        let first = tokio::spawn({
            let b = Arc::clone(&batcher);
            async move { b.get(2).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await; // the first query is running
        let rest: Vec<_> = [6, 5, 6, 8]
            .into_iter()
            .map(|k| {
                let b = Arc::clone(&batcher);
                tokio::spawn(async move { b.get(k).await })
            })
            .collect();
        assert_eq!(first.await.unwrap().unwrap(), Some(20));
        let mut answers = Vec::new();
        for r in rest {
            answers.push(r.await.unwrap().unwrap());
        }
        // Each caller gets the row for its own key, duplicates included.
        assert_eq!(answers, vec![Some(60), None, Some(60), Some(80)]);
        assert_eq!(*seen.lock().unwrap(), vec![vec![2], vec![5, 6, 8]]);
    }

    #[tokio::test]
    async fn a_failed_query_fails_every_request_in_it() {
        let batcher = Batcher::spawn(8, 2, |_keys: Vec<u32>| async {
            Err::<HashMap<u32, u32>, _>(ApiError::unavailable("The database is unavailable."))
        });
        let batcher = Arc::new(batcher);
        let calls: Vec<_> = (0..5)
            .map(|k| {
                let b = Arc::clone(&batcher);
                tokio::spawn(async move { b.get(k).await })
            })
            .collect();
        for call in calls {
            let err = call.await.unwrap().unwrap_err();
            assert_eq!(err.code, ErrorCode::ServiceUnavailable);
        }
    }

    #[tokio::test]
    async fn a_panicking_loader_answers_unavailable_and_the_next_query_still_runs() {
        let batcher: Batcher<u32, u32> = Batcher::spawn(8, 1, |keys: Vec<u32>| async move {
            assert!(keys != [1], "loader bug");
            Ok(keys.into_iter().map(|k| (k, k)).collect())
        });
        assert_eq!(batcher.get(1).await.unwrap_err().code, ErrorCode::ServiceUnavailable);
        assert_eq!(batcher.get(2).await.unwrap(), Some(2));
    }
}
