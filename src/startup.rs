//! `Application`: builds every part of the server and binds its listener, so `main` and
//! the test harness start exactly the same thing (tests bind port 0).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use poem::endpoint::BoxEndpoint;
use poem::http::{HeaderValue, header};
use poem::listener::{Acceptor as _, Listener as _, TcpAcceptor, TcpListener};
use poem::middleware::{CatchPanic, Tracing};
use poem::{Endpoint, EndpointExt as _, IntoResponse as _, Request, Response, Route, Server};
use secrecy::ExposeSecret as _;

use crate::api;
use crate::audit::{AuditWorker, Auditor};
use crate::clock::Clock;
use crate::config::Config;
use crate::error::{ApiError, ErrorCode, into_problem};
use crate::password::PasswordHasher;
use crate::service::sessions;
use crate::state::AppState;
use crate::store::db;
use crate::store::revocation::{MemoryStore, RedisStore, RevocationStore};
use crate::token::KeyRing;

pub struct Application {
    acceptor: TcpAcceptor,
    port: u16,
    state: Arc<AppState>,
    audit_worker: AuditWorker,
}

impl Application {
    /// Connects to SQL (required), applies migrations, makes sure a signing key exists,
    /// prepares the revocation store (Redis may be down: it connects on first use) and
    /// binds the listener.
    pub async fn build(config: Config, clock: Clock) -> anyhow::Result<Self> {
        let db = db::connect(&config).await.context("connecting to the database (DATABASE_URL)")?;
        db::migrate_and_prepare(&config, &db, clock.now())
            .await
            .context("applying migrations and preparing signing keys")?;
        let keys = KeyRing::load(&db, clock.now()).await.context("loading signing keys")?;

        let store: Arc<dyn RevocationStore> = match &config.redis_url {
            Some(url) => {
                tracing::info!("revocation store: Redis");
                Arc::new(RedisStore::new(
                    url.expose_secret(),
                    &config.redis_key_prefix,
                    config.redis_connect_timeout,
                    config.redis_response_timeout,
                )?)
            }
            None => {
                tracing::warn!(
                    "REDIS_URL is not set: using the in-process revocation store. Run a single \
                     instance only; a restart ends every session."
                );
                let memory = Arc::new(MemoryStore::new());
                spawn_sweeper(Arc::downgrade(&memory));
                memory
            }
        };
        let hasher = PasswordHasher::start(config.password_hash_workers, config.password_hash_queue)?;

        let acceptor = TcpListener::bind(config.listen_addr)
            .into_acceptor()
            .await
            .with_context(|| format!("binding LISTEN_ADDR {}", config.listen_addr))?;
        let port = acceptor
            .local_addr()
            .first()
            .and_then(|a| a.as_socket_addr().map(|s| s.port()))
            .context("reading the bound port")?;

        let (audit, audit_worker) = Auditor::start(db.clone(), config.audit_queue_capacity);
        let state = Arc::new(AppState { config, db, store, keys, hasher, clock, audit });
        sessions::spawn_pruner(Arc::downgrade(&state));
        Ok(Self { acceptor, port, state, audit_worker })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn state(&self) -> Arc<AppState> {
        Arc::clone(&self.state)
    }

    /// Serves until `shutdown` completes, then lets in-flight requests finish (bounded by
    /// `SHUTDOWN_TIMEOUT`), drains the audit queue into SQL and closes the SQL pool.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let timeout = self.state.config.shutdown_timeout;
        let app = routes(Arc::clone(&self.state));
        tracing::info!(port = self.port, "listening");
        Server::new_with_acceptor(self.acceptor)
            .run_with_graceful_shutdown(app, shutdown, Some(timeout))
            .await?;
        self.audit_worker.shutdown().await;
        let db = self.state.db.clone();
        db.close().await.context("closing the database pool")?;
        tracing::info!("stopped");
        Ok(())
    }
}

fn spawn_sweeper(store: std::sync::Weak<MemoryStore>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            tick.tick().await;
            match store.upgrade() {
                Some(store) => store.sweep(),
                None => return,
            }
        }
    });
}

/// Every route, behind the middleware that gives every failure the same JSON body.
pub fn routes(state: Arc<AppState>) -> BoxEndpoint<'static, Response> {
    let api = api::service();
    let docs = api.swagger_ui();
    let spec = api.spec_endpoint();
    let max_body = state.config.max_body_bytes;
    Route::new()
        .at("/openapi.json", spec)
        .nest("/docs", docs)
        .nest("/", api)
        .around(move |ep, req| limit_body(ep, req, max_body))
        .data(state)
        .catch_all_error(|err| async move { into_problem(err) })
        .with(
            CatchPanic::new()
                .with_handler(|_| ApiError::internal("a request handler panicked").into_response()),
        )
        .around(request_id)
        .with(Tracing)
        .boxed()
}

/// Refuses bodies over `max` with 413, whether announced by `Content-Length` or streamed.
async fn limit_body<E: Endpoint>(ep: Arc<E>, mut req: Request, max: usize) -> poem::Result<Response> {
    let too_large =
        || poem::Error::from(ApiError::new(ErrorCode::PayloadTooLarge, "The request body is too large."));
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(len) if len > max as u64 => return Err(too_large()),
        Some(_) => {}
        None if req.headers().contains_key(header::TRANSFER_ENCODING) => {
            let body = req.take_body().into_bytes_limit(max).await.map_err(|_| too_large())?;
            req.set_body(body);
        }
        None => {}
    }
    Ok(ep.call(req).await?.into_response())
}

/// Every response carries an `X-Request-Id` (the caller's, when it sent a sane one);
/// error bodies never do, so equal failures have equal bodies.
async fn request_id<E: Endpoint>(ep: Arc<E>, req: Request) -> poem::Result<Response> {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let span = tracing::info_span!("request", request_id = %id);
    let _guard = span.enter();
    let mut resp = ep.call(req).await?.into_response();
    if let Ok(value) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", value);
    }
    Ok(resp)
}
