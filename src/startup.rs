//! `Application`: builds every part of the server and binds its listener, so `main` and
//! the test harness start exactly the same thing (tests bind port 0).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context as _;
use poem::endpoint::BoxEndpoint;
use poem::http::Method;
use poem::http::{HeaderValue, header};
use poem::listener::{Acceptor as _, Listener as _, TcpAcceptor, TcpListener};
use poem::middleware::{CatchPanic, Cors, Tracing};
use poem::{Endpoint, EndpointExt as _, IntoResponse as _, Request, Response, Route, Server};
use sea_orm::{DatabaseConnection, DbBackend, DbErr, RuntimeErr};
use secrecy::ExposeSecret as _;
use uuid::Uuid;

use poem_openapi::OperationId;
use tracing::Instrument as _;

use crate::api;
use crate::audit::{AuditWorker, Auditor};
use crate::clock::Clock;
use crate::config::Config;
use crate::error::{ApiError, ErrorCode, into_problem};
use crate::keys::{KeyCache, KeyRing};
use crate::mail::{MailWorker, Outbox, Templates};
use crate::metrics::{Metrics, Timed};
use crate::pages::Pages;
use crate::password::PasswordHasher;
use crate::service::users::Profile;
use crate::service::{sessions, users};
use crate::state::AppState;
use crate::store::batch::Batcher;
use crate::store::db;
use crate::store::held::Held;
use crate::store::limits::{LimitStore, MemoryLimits, RedisLimits};
use crate::store::redis_conn::{RedisConn, Timeouts};
use crate::store::revocation::{MemoryStore, RedisStore, RevocationStore};

pub struct Application {
    listener: tokio::net::TcpListener,
    port: u16,
    metrics_listener: Option<(TcpAcceptor, u16)>,
    state: Arc<AppState>,
    audit_worker: AuditWorker,
    mail_worker: MailWorker,
    pages: Pages,
}

/// `/v1/users/me`'s reads, folded together under load. Two queries at a time: one in the
/// database while the next batch gathers; more only splits the same requests into smaller
/// batches (64 users, wrk -c32: 21.5k, 20.6k and 19.3k req/s with 1, 2 and 5). On
/// PostgreSQL, when that leaves more than half the pool to everything else, the batcher
/// keeps its connections between queries (see `store::held`).
fn profile_reads(config: &Config, db: &DatabaseConnection, metrics: &Arc<Metrics>) -> Batcher<Uuid, Profile> {
    let in_flight = 2.min(config.database_max_connections as usize);
    let held = (db.get_database_backend() == DbBackend::Postgres
        && config.database_max_connections as usize > 2 * in_flight)
        .then(|| Held::start(db.get_postgres_connection_pool().clone(), in_flight));
    let (db, metrics) = (db.clone(), Arc::clone(metrics));
    Batcher::spawn(users::PROFILE_BATCH, in_flight, move |ids: Vec<Uuid>| {
        let (db, held, metrics) = (db.clone(), held.clone(), Arc::clone(&metrics));
        async move {
            let Some(held) = held else { return users::profiles(&db, ids).await };
            let started = std::time::Instant::now();
            let answer = held.run(async |conn| users::profiles_on(conn, &ids).await).await;
            metrics.dependency("database", started.elapsed(), answer.is_ok());
            answer.map_err(|e| ApiError::from(DbErr::Query(RuntimeErr::SqlxError(Arc::new(e)))))
        }
    })
}

/// The Redis connections the configuration names (`REDIS_URL`, `REDIS_CLUSTER_NODES`, or
/// `REDIS_SENTINEL_NODES` + `REDIS_SENTINEL_MASTER`; config allows one), not connected yet:
/// one for reads and plain writes, and with Cluster or Sentinel a second one for the writes
/// that wait for a replica (`WAIT` blocks its connection; reads must not queue behind it).
/// `None`: the in-process store.
fn redis_connection(config: &Config) -> anyhow::Result<Option<(RedisConn, RedisConn, Timeouts)>> {
    let timeouts =
        Timeouts { connect: config.redis_connect_timeout, response: config.redis_response_timeout };
    let (conn, durable) = if let Some(url) = &config.redis_url {
        tracing::info!("revocation store and rate limits: Redis");
        let conn = RedisConn::single(url.expose_secret(), timeouts).context("REDIS_URL")?;
        (conn.clone(), conn)
    } else if let Some(nodes) = &config.redis_cluster_nodes {
        tracing::info!(seed_nodes = nodes.len(), "revocation store and rate limits: Redis Cluster");
        let connect = || RedisConn::cluster(&nodes.urls(), timeouts).context("REDIS_CLUSTER_NODES");
        (connect()?, connect()?)
    } else if let Some((sentinels, master)) = &config.redis_sentinel {
        tracing::info!(sentinels = sentinels.len(), %master, "revocation store and rate limits: Redis behind Sentinel");
        let connect =
            || RedisConn::sentinel(&sentinels.urls(), master, timeouts).context("REDIS_SENTINEL_NODES");
        (connect()?, connect()?)
    } else {
        return Ok(None);
    };
    Ok(Some((conn, durable, timeouts)))
}

impl Application {
    /// Connects to SQL (required), applies migrations, makes sure a signing key exists,
    /// prepares the revocation store (Redis may be down: it connects on first use) and
    /// binds the listeners.
    pub async fn build(config: Config, clock: Clock) -> anyhow::Result<Self> {
        let metrics = Arc::new(Metrics::new());
        // Templates first: a broken override stops start-up before anything connects.
        let templates = Templates::load(config.email_templates_dir.as_deref(), &config.product_name)
            .context("loading the mail templates (EMAIL_TEMPLATES_DIR)")?;
        let pages = Pages::render(&config.product_name).context("rendering the account pages")?;
        let mail_transport = crate::mail::transport::Transport::from_config(&config)?;
        // Read once, into memory; a file that cannot be used stops start-up (its error names
        // GEOIP_DATABASE).
        let geoip = config.geoip_database.as_deref().map(crate::geoip::GeoIp::open).transpose()?;
        let webauthn = relying_party(&config)?;
        let mut db = db::connect(&config).await.context("connecting to the database (DATABASE_URL)")?;
        // The mail workers' handle on the pool, without the per-statement metrics: their
        // polling would blur the statement counts of requests (they have metrics of their own).
        let mail_db = db.clone();
        let db_metrics = Arc::clone(&metrics);
        db.set_metric_callback(move |info| db_metrics.dependency("database", info.elapsed, !info.failed));
        db::migrate_and_prepare(&config, &db, clock.now())
            .await
            .context("applying migrations and preparing signing keys")?;
        let key_settings = config.key_settings();
        if key_settings.kek.is_none() && config.jwt_algorithm != jsonwebtoken::Algorithm::HS256 {
            tracing::warn!(
                "KEY_ENCRYPTION_KEY is not set: signing keys are stored in the database unencrypted"
            );
        }
        let ring = KeyRing::load(&db, clock.now(), &key_settings).await.context("loading signing keys")?;
        let device_secret = crate::keys::server_secret(&db, crate::keys::DEVICE_SECRET, &key_settings)
            .await
            .context("loading the device-token secret")?;
        let keys = KeyCache::new(ring, key_settings);

        let (store, limits): (Arc<dyn RevocationStore>, Arc<dyn LimitStore>) =
            match redis_connection(&config)? {
                Some((conn, durable, timeouts)) => {
                    let redis = RedisStore::on(conn, durable, &config.redis_key_prefix, timeouts);
                    let limits: Arc<dyn LimitStore> =
                        Arc::new(RedisLimits::new(redis.connection(), &config.redis_key_prefix));
                    let store: Arc<dyn RevocationStore> = Arc::new(redis);
                    let timed = |dependency| (Arc::clone(&metrics), dependency);
                    let (m, d) = timed("redis");
                    (
                        Arc::new(Timed { inner: store, metrics: m.clone(), dependency: d }),
                        Arc::new(Timed { inner: limits, metrics: m, dependency: d }),
                    )
                }
                None => {
                    tracing::warn!(
                        "REDIS_URL is not set: using the in-process revocation store and rate limits. \
                     Run a single instance only; a restart ends every session."
                    );
                    let memory = Arc::new(MemoryStore::new());
                    let limits = Arc::new(MemoryLimits::default());
                    spawn_sweeper(Arc::downgrade(&memory), Arc::downgrade(&limits), clock.clone());
                    (memory, limits)
                }
            };
        let hasher = PasswordHasher::start(config.password_hash_workers, config.password_hash_queue)?;

        let listener = tokio::net::TcpListener::bind(config.listen_addr)
            .await
            .with_context(|| format!("binding LISTEN_ADDR {}", config.listen_addr))?;
        let port = listener.local_addr().context("reading the bound port")?.port();
        let metrics_listener = match config.metrics_addr {
            Some(addr) => Some(bind(addr, "METRICS_ADDR").await?),
            None => None,
        };

        let (audit, audit_worker) = Auditor::start(db.clone(), config.audit_queue_capacity, clock.clone());
        let profiles = profile_reads(&config, &db, &metrics);
        let outbox = Outbox::new(Arc::new(templates), &config, clock.clone());
        let mail_worker = MailWorker::start(
            mail_db,
            mail_transport,
            crate::mail::worker::WorkerSettings::from_config(&config),
            Arc::clone(&metrics),
            clock.clone(),
        );
        let state = Arc::new(AppState {
            config,
            db,
            store,
            limits,
            keys,
            hasher,
            clock,
            audit,
            metrics,
            profiles,
            revocations: sessions::Pending::default(),
            devices: crate::service::devices::DeviceKey::new(&device_secret),
            warned_untrusted_forwarding: AtomicBool::new(false),
            outbox,
            geoip,
            webauthn,
        });
        sessions::spawn_pruner(Arc::downgrade(&state));
        sessions::spawn_reconciler(Arc::downgrade(&state));
        crate::audit::spawn_pruner(Arc::downgrade(&state));
        spawn_key_refresher(Arc::downgrade(&state));
        Ok(Self { listener, port, metrics_listener, state, audit_worker, mail_worker, pages })
    }

    /// The metrics listener's port, when it is enabled.
    pub fn metrics_port(&self) -> Option<u16> {
        self.metrics_listener.as_ref().map(|(_, port)| *port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn state(&self) -> Arc<AppState> {
        Arc::clone(&self.state)
    }

    /// Serves until `shutdown` completes, then lets in-flight requests finish (bounded by
    /// `SHUTDOWN_TIMEOUT`), stops the mail workers (unsent mail stays queued), drains the
    /// audit queue into SQL and closes the SQL pool. The
    /// public listener is served by `serve` (hyper directly, for the header timeout); the
    /// metrics listener by poem's `Server`.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let timeout = self.state.config.shutdown_timeout;
        let app = routes(Arc::clone(&self.state), &self.pages);
        tracing::info!(port = self.port, "listening");
        // One shutdown signal for both servers.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let metrics_server = self.metrics_listener.map(|(acceptor, port)| {
            tracing::info!(port, "metrics listening");
            let state = Arc::clone(&self.state);
            let endpoint = Route::new().at(
                "/metrics",
                poem::get(poem::endpoint::make(move |_| {
                    let state = Arc::clone(&state);
                    async move { state.metrics.encode(&state.audit) }
                })),
            );
            tokio::spawn(Server::new_with_acceptor(acceptor).run_with_graceful_shutdown(
                endpoint,
                stopped(stop_rx.clone()),
                Some(Duration::from_secs(1)),
            ))
        });
        let limits = crate::serve::Limits {
            header_timeout: self.state.config.http_header_timeout,
            idle_timeout: self.state.config.http_idle_timeout,
            shutdown_timeout: timeout,
        };
        crate::serve::serve(self.listener, app, limits, stopped(stop_rx)).await;
        if let Some(server) = metrics_server {
            let _ = server.await;
        }
        // Mail still queued stays in the outbox for the next start.
        self.mail_worker.shutdown().await;
        self.audit_worker.shutdown().await;
        let db = self.state.db.clone();
        db.close().await.context("closing the database pool")?;
        tracing::info!("stopped");
        Ok(())
    }
}

/// The WebAuthn relying party, or `None` (said in the log) when passkeys are off.
fn relying_party(config: &Config) -> anyhow::Result<Option<webauthn_rs::Webauthn>> {
    let Some(settings) = &config.webauthn else {
        tracing::warn!(
            issuer = %config.jwt_issuer,
            "passkeys are off: JWT_ISSUER cannot be a WebAuthn relying party (an IP address, or plain \
             http beyond localhost); set WEBAUTHN_RP_ID and WEBAUTHN_ORIGINS to turn them on"
        );
        return Ok(None);
    };
    let webauthn = settings
        .build(&config.product_name)
        .map_err(|e| anyhow::anyhow!("invalid configuration: WEBAUTHN_ORIGINS / WEBAUTHN_RP_ID: {e}"))?;
    let origins: Vec<&str> = settings.origins.iter().map(url::Url::as_str).collect();
    tracing::info!(rp_id = %settings.rp_id, origins = ?origins, "passkeys: relying party");
    Ok(Some(webauthn))
}

/// Re-reads the signing keys every `KEYS_REFRESH_INTERVAL`, so a rotation made by any
/// instance or by the CLI reaches this one within that bound; and, when
/// `KEY_ROTATION_INTERVAL` is set, rotates when the newest key is that old.
fn spawn_key_refresher(state: std::sync::Weak<AppState>) {
    tokio::spawn(async move {
        let Some(interval) = state.upgrade().map(|s| s.config.keys_refresh_interval) else { return };
        let mut tick = tokio::time::interval(interval);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(state) = state.upgrade() else { return };
            let now = state.clock.now();
            if let Some(every) = state.config.key_rotation_interval
                && let Err(e) = db::rotate_if_due(&state.config, &state.db, now, every).await
            {
                tracing::warn!(error = %e, "automatic key rotation failed; will retry");
            }
            if let Err(e) = state.keys.reload(&state.db, now).await {
                tracing::warn!(error = %e, "reloading signing keys failed; keeping the current set");
            }
        }
    });
}

async fn bind(addr: std::net::SocketAddr, variable: &str) -> anyhow::Result<(TcpAcceptor, u16)> {
    let acceptor = TcpListener::bind(addr)
        .into_acceptor()
        .await
        .with_context(|| format!("binding {variable} {addr}"))?;
    let port = acceptor
        .local_addr()
        .first()
        .and_then(|a| a.as_socket_addr().map(|s| s.port()))
        .context("reading the bound port")?;
    Ok((acceptor, port))
}

/// Frees the in-process stores' expired entries, so memory follows live use.
fn spawn_sweeper(store: std::sync::Weak<MemoryStore>, limits: std::sync::Weak<MemoryLimits>, clock: Clock) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            tick.tick().await;
            let (Some(store), Some(limits)) = (store.upgrade(), limits.upgrade()) else { return };
            store.sweep();
            // A scan of every shard: off the reactor's threads.
            let now = clock.now().timestamp_millis();
            let _ = tokio::task::spawn_blocking(move || limits.sweep(now)).await;
        }
    });
}

/// Every route, behind the middleware that gives every failure the same JSON body.
pub fn routes(state: Arc<AppState>, pages: &Pages) -> BoxEndpoint<'static, Response> {
    let api = api::service();
    let docs = api.swagger_ui();
    let spec = api.spec_endpoint();
    let max_body = state.config.max_body_bytes;
    let cors_origins = state.config.cors_allowed_origins.clone();
    let cookie_mode = state.config.refresh_token_cookie;
    let body_timeout = state.config.http_body_timeout;
    Route::new()
        .at("/openapi.json", spec)
        .nest("/docs", docs)
        .nest("/account", pages.routes())
        .nest("/", api)
        .around(move |ep, req| limit_body(ep, req, max_body, body_timeout))
        .around(observe)
        .data(state)
        .catch_all_error(|err| async move { into_problem(err) })
        .with(
            CatchPanic::new()
                .with_handler(|_| ApiError::internal("a request handler panicked").into_response()),
        )
        .around(request_id)
        .after(second_set_cookie)
        .with(Tracing)
        .with_if(!cors_origins.is_empty(), cors(&cors_origins, cookie_mode))
        .boxed()
}

/// CORS for browser clients on the configured origins; credentials (the refresh cookie)
/// only in cookie mode, and never with `*`.
fn cors(origins: &[String], credentials: bool) -> Cors {
    let mut cors = Cors::new()
        .allow_methods([Method::GET, Method::POST, Method::DELETE])
        .allow_headers(["authorization", "content-type", "x-requested-with"])
        .expose_headers(["retry-after", "x-request-id", "www-authenticate"])
        .allow_credentials(credentials)
        .max_age(600);
    if !origins.iter().any(|o| o == "*") {
        cors = cors.allow_origins(origins.iter().map(String::as_str));
    }
    cors
}

/// Reads the whole body up front (bodies here are small JSON): over `max` is 413, and a
/// client that does not finish sending within `timeout` gets 408 instead of holding the
/// connection. Every body goes through both, whatever the headers say: an HTTP/2 request
/// needs neither Content-Length nor Transfer-Encoding to carry one. Only a body known to
/// be empty (no bytes may follow) skips the read and its timer.
async fn limit_body<E: Endpoint>(
    ep: Arc<E>,
    mut req: Request,
    max: usize,
    timeout: Duration,
) -> poem::Result<Response> {
    let too_large =
        || poem::Error::from(ApiError::new(ErrorCode::PayloadTooLarge, "The request body is too large."));
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max as u64) {
        return Err(too_large());
    }
    let body = req.take_body();
    if !body.is_empty() {
        let body = match tokio::time::timeout(timeout, body.into_bytes_limit(max)).await {
            Ok(Ok(body)) => body,
            Ok(Err(poem::error::ReadBodyError::PayloadTooLarge)) => return Err(too_large()),
            Ok(Err(_)) => return Err(ApiError::validation("The request body could not be read.").into()),
            Err(_) => {
                return Err(ApiError::new(
                    ErrorCode::RequestTimeout,
                    "The request body was not sent in time.",
                )
                .into());
            }
        };
        req.set_body(body);
    }
    Ok(ep.call(req).await?.into_response())
}

/// Counts and times every request by operation. Every label comes from a fixed set, so no
/// client can add series: the OpenAPI operation id (paths with ids do not explode the set),
/// `docs`, `pages` (the account pages and their files) or `unmatched`; a method of the
/// fixed list or `other`; the status code.
async fn observe<E: Endpoint>(ep: Arc<E>, req: Request) -> poem::Result<Response> {
    let started = std::time::Instant::now();
    let method = crate::metrics::method_label(req.method());
    let state = req.data::<Arc<AppState>>().cloned();
    let path = req.uri().path();
    let fixed = if path.starts_with("/docs") || path == "/openapi.json" {
        "docs"
    } else if path.starts_with("/account/") {
        "pages"
    } else {
        "unmatched"
    };
    let result = ep.call(req).await.map(poem::IntoResponse::into_response);
    if let Some(state) = state {
        let (op, status) = match &result {
            Ok(resp) => (resp.data::<OperationId>().map(|o| o.0), resp.status()),
            Err(err) => (err.data::<OperationId>().map(|o| o.0), err.status()),
        };
        let route = op.unwrap_or(fixed);
        state.metrics.http(route, method, status.as_u16(), started.elapsed());
    }
    result
}

/// A response that sets two cookies (login in cookie mode: refresh and device) names the
/// second under `api::auth::SECOND_SET_COOKIE`, since an OpenAPI response writes each header
/// once; here it becomes a second `Set-Cookie`.
async fn second_set_cookie(resp: poem::Result<Response>) -> poem::Result<Response> {
    let mut resp = resp?;
    if let Some(cookie) = resp.headers_mut().remove(crate::api::auth::SECOND_SET_COOKIE) {
        resp.headers_mut().append(header::SET_COOKIE, cookie);
    }
    Ok(resp)
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
    let mut resp = ep.call(req).instrument(span).await?.into_response();
    if let Ok(value) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", value);
    }
    Ok(resp)
}
