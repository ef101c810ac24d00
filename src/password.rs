//! Argon2id password hashing on a bounded pool of dedicated threads.
//!
//! Hashing never runs on the async reactor. The pool has `workers` threads and a queue of
//! `queue` jobs; when the queue is full the caller gets `HashError::Busy` at once (503 with
//! `Retry-After`) instead of waiting without end. Unknown emails verify against a dummy
//! hash with the same parameters, so a login costs the same whether the account exists.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};

use argon2::password_hash::{PasswordHasher as _, PasswordVerifier as _};
use argon2::{Algorithm, Argon2, Params, Version};
use tokio::sync::oneshot;

use crate::domain::Password;

/// OWASP's argon2id recommendation: 19 MiB, 2 iterations, 1 lane.
pub const MEMORY_KIB: u32 = 19_456;
pub const ITERATIONS: u32 = 2;
pub const PARALLELISM: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("the password hashing queue is full")]
    Busy,
    #[error("password hashing failed: {0}")]
    Failed(String),
}

enum Job {
    Hash { password: Password, reply: oneshot::Sender<Result<String, HashError>> },
    Verify { password: Password, hash: Arc<str>, reply: oneshot::Sender<bool> },
}

#[derive(Clone)]
pub struct PasswordHasher {
    jobs: SyncSender<Job>,
    dummy_hash: Arc<str>,
}

impl std::fmt::Debug for PasswordHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordHasher").finish_non_exhaustive()
    }
}

pub fn argon2() -> Result<Argon2<'static>, HashError> {
    let params = Params::new(MEMORY_KIB, ITERATIONS, PARALLELISM, None)
        .map_err(|e| HashError::Failed(e.to_string()))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

fn hash_now(argon: &Argon2<'_>, password: &str) -> Result<String, HashError> {
    argon
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| HashError::Failed(e.to_string()))
}

impl PasswordHasher {
    /// Starts `workers` threads.
    pub fn start(workers: usize, queue: usize) -> Result<Self, HashError> {
        let argon = argon2()?;
        let dummy_hash = dummy_hash()?;

        let (jobs, rx) = sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        for n in 0..workers {
            let rx = Arc::clone(&rx);
            let argon = argon.clone();
            std::thread::Builder::new()
                .name(format!("argon2-{n}"))
                .spawn(move || {
                    // Below the reactor: a login storm must not starve token checks.
                    if let Err(e) =
                        thread_priority::set_current_thread_priority(thread_priority::ThreadPriority::Min)
                    {
                        tracing::debug!(error = ?e, "could not lower the argon2 thread's priority");
                    }
                    worker(&rx, &argon)
                })
                .map_err(|e| HashError::Failed(e.to_string()))?;
        }
        Ok(Self { jobs, dummy_hash })
    }

    pub async fn hash(&self, password: Password) -> Result<String, HashError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Job::Hash { password, reply })?;
        rx.await.map_err(|_| HashError::Failed("hashing worker stopped".into()))?
    }

    /// Verifies against `hash`, or against the dummy hash when there is no account, so the
    /// work (and the time) is the same either way. Returns false for the dummy.
    pub async fn verify(&self, password: Password, hash: Option<&str>) -> Result<bool, HashError> {
        let (target, real) = match hash {
            Some(h) => (Arc::from(h), true),
            None => (Arc::clone(&self.dummy_hash), false),
        };
        let (reply, rx) = oneshot::channel();
        self.submit(Job::Verify { password, hash: target, reply })?;
        let ok = rx.await.map_err(|_| HashError::Failed("hashing worker stopped".into()))?;
        Ok(ok && real)
    }

    fn submit(&self, job: Job) -> Result<(), HashError> {
        self.jobs.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => HashError::Busy,
            TrySendError::Disconnected(_) => HashError::Failed("hashing pool stopped".into()),
        })
    }
}

/// A PHC string with the server's parameters, a random salt and a random output: verifying
/// against it costs exactly what verifying a real hash costs (argon2 runs in full, then
/// the comparison fails), without spending a hash at start-up to make it.
fn dummy_hash() -> Result<Arc<str>, HashError> {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD_NO_PAD;
    let mut bytes = [0u8; 48];
    getrandom::fill(&mut bytes).map_err(|e| HashError::Failed(e.to_string()))?;
    let (salt, output) = bytes.split_at(16);
    Ok(format!(
        "$argon2id$v=19$m={MEMORY_KIB},t={ITERATIONS},p={PARALLELISM}${}${}",
        STANDARD_NO_PAD.encode(salt),
        STANDARD_NO_PAD.encode(output)
    )
    .into())
}

fn worker(rx: &Mutex<Receiver<Job>>, argon: &Argon2<'_>) {
    loop {
        // Hold the lock only while waiting for the next job, not while hashing.
        let job = match rx.lock() {
            Ok(guard) => guard.recv(),
            Err(_) => return,
        };
        match job {
            Ok(Job::Hash { password, reply }) => {
                let _ = reply.send(hash_now(argon, password.expose()));
            }
            Ok(Job::Verify { password, hash, reply }) => {
                let ok = argon.verify_password(password.expose().as_bytes(), &*hash).is_ok();
                let _ = reply.send(ok);
            }
            Err(_) => return, // every sender dropped: the server is shutting down
        }
    }
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pw(s: &str) -> Password {
        Password::candidate(s.to_owned()).expect("password")
    }

    #[tokio::test]
    async fn hashes_with_owasp_parameters_and_verifies() {
        let hasher = PasswordHasher::start(1, 4).expect("pool");
        let hash = hasher.hash(pw("correct horse battery")).await.expect("hash");
        assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{hash}");
        assert!(hasher.verify(pw("correct horse battery"), Some(&hash)).await.expect("verify"));
        assert!(!hasher.verify(pw("wrong horse battery"), Some(&hash)).await.expect("verify"));
        assert!(!hasher.verify(pw("anything at all"), None).await.expect("dummy"));
        // The dummy is a well-formed hash with the same parameters, so it costs the same.
        assert!(argon2::password_hash::phc::PasswordHash::new(&hasher.dummy_hash).is_ok());
        assert!(hasher.dummy_hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
    }

    #[tokio::test]
    async fn a_full_queue_answers_busy_at_once() {
        let hasher = PasswordHasher::start(1, 1).expect("pool");
        let mut pending = Vec::new();
        let mut busy = 0;
        for _ in 0..8 {
            match hasher.submit(Job::Verify {
                password: pw("x"),
                hash: Arc::clone(&hasher.dummy_hash),
                reply: oneshot::channel().0,
            }) {
                Ok(()) => pending.push(()),
                Err(HashError::Busy) => busy += 1,
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert!(busy >= 6, "only {busy} of 8 refused with a queue of 1");
    }
}
