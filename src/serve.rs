//! The public listener's connections: our own accept loop, each connection served by
//! hyper-util's auto builder (HTTP/1.1 with keep-alive, and HTTP/2 with prior knowledge,
//! on one port) and watched for `HTTP_HEADER_TIMEOUT` and `HTTP_IDLE_TIMEOUT`.
//!
//! poem's `Server` gives hyper no timer, so no header-read timeout is possible through it:
//! a client could hold a connection open for ever by sending one header line at a time.
//! Requests still reach the same poem endpoint, with the listener's local and remote
//! addresses (the client IP comes from `req.remote_addr()`).
//!
//! Why not hyper's own `http1().header_read_timeout`: hyper (1.12) starts that clock as
//! soon as it waits for a request head, including the wait for the next request on a
//! keep-alive connection, so it would close every idle keep-alive connection after
//! `HTTP_HEADER_TIMEOUT` instead of `HTTP_IDLE_TIMEOUT`; and it covers neither the bytes
//! read to tell HTTP/1 from HTTP/2 nor HTTP/2 itself. The watchdog here starts the clock
//! at the connect and, later, at the first byte of each next request instead.
//!
//! Stopping is ours too, and written for an instance behind a load balancer that other
//! instances keep serving for: a client that moves on to the next instance when its
//! connection is refused must see no failure. On the stop signal (SIGTERM):
//!
//! 1. From now on every HTTP/1 answer says `Connection: close`, and its connection closes
//!    once it is written: the client learns from the answer itself not to reuse it.
//! 2. Connections the kernel has already completed but the loop has not yet accepted are
//!    accepted (non-blocking, until the backlog is empty): closing the listener would reset
//!    them, after the client may have sent its request.
//! 3. The listener closes: from here new connections are refused, which a client can always
//!    retry elsewhere (the request never left it).
//! 4. Requests in flight finish (and close their connection, 1.). An HTTP/2 connection gets
//!    a GOAWAY at once: its client retries elsewhere what the server did not start.
//! 5. An idle HTTP/1 keep-alive connection is *not* closed at once: a request may already be
//!    on its way in it, and a client whose request meets a closed connection cannot tell
//!    whether it was processed (hyper retries only requests it had not yet written; a POST
//!    such as a refresh must not be retried blindly). It stays open and answers its next
//!    request with `Connection: close`; only once it has been silent for `DRAIN_IDLE` (or
//!    `HTTP_IDLE_TIMEOUT`, if shorter) is it closed — a client still holding it after that
//!    long has, in practice, no request under way in it.
//! 6. The instance returns when every connection has closed, or cuts off what is left at
//!    `SHUTDOWN_TIMEOUT`.
//!
//! Behind a load balancer, a pause before SIGTERM (Kubernetes' `preStop`) lets the balancer
//! stop sending new connections first; what still arrives is handled as above.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use poem::endpoint::BoxEndpoint;
use poem::http::uri::Scheme;
use poem::http::{self, HeaderValue, Version, header};
use poem::web::{LocalAddr, RemoteAddr};
use poem::{Endpoint as _, Response};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// The connection-level limits (from `Config`).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// A request's head must arrive within this, counted from the connect (the first
    /// request) or from the request's first byte (the next ones on a keep-alive connection).
    pub header_timeout: Duration,
    /// A connection with no request in flight and no traffic for this long is closed.
    pub idle_timeout: Duration,
    /// How long requests in flight may take to finish once stopping has begun.
    pub shutdown_timeout: Duration,
}

/// How long an idle HTTP/1 connection is kept open once stopping has begun, for a request
/// already on its way in it (step 5 of the module comment).
const DRAIN_IDLE: Duration = Duration::from_secs(1);

/// Serves `endpoint` on `listener` until `stop` completes, then stops gracefully (see the
/// module comment for the order of things).
pub async fn serve(
    listener: TcpListener,
    endpoint: BoxEndpoint<'static, Response>,
    limits: Limits,
    stop: impl Future<Output = ()>,
) {
    let local = LocalAddr(match listener.local_addr() {
        Ok(addr) => addr.into(),
        Err(_) => poem::Addr::Custom("tcp", "".into()),
    });
    let server = Server {
        local,
        endpoint: Arc::new(endpoint),
        builder: Arc::new(builder()),
        limits,
        stopping: watch::channel(false),
    };
    let mut connections = JoinSet::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((io, remote)) => {
                    connections.spawn(server.connection(io, remote));
                }
                Err(e) => {
                    // Out of file descriptors, most likely: don't spin on it.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(ended) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = ended
                    && e.is_panic()
                {
                    tracing::error!(error = %e, "a connection's task panicked");
                }
            }
        }
    }
    // 1. Every answer from here on closes its connection.
    let _ = server.stopping.0.send(true);
    // 2. and 3. Take what the kernel has already accepted for us, then close the listener.
    match listener.into_std() {
        Ok(listener) => {
            loop {
                match listener.accept().and_then(|(io, remote)| {
                    io.set_nonblocking(true)?;
                    Ok((TcpStream::from_std(io)?, remote))
                }) {
                    Ok((io, remote)) => {
                        connections.spawn(server.connection(io, remote));
                    }
                    Err(e) => {
                        if e.kind() != io::ErrorKind::WouldBlock {
                            tracing::warn!(error = %e, "accepting a pending connection failed while stopping");
                        }
                        break;
                    }
                }
            }
            drop(listener);
        }
        Err(e) => tracing::warn!(error = %e, "taking the pending connections failed; closing the listener"),
    }
    // 4. to 6.
    let drained = tokio::time::timeout(limits.shutdown_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = connections.len(),
            "connections still busy after SHUTDOWN_TIMEOUT; closing them"
        );
        connections.shutdown().await;
    }
}

/// What every connection shares.
struct Server {
    local: LocalAddr,
    endpoint: Arc<BoxEndpoint<'static, Response>>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    limits: Limits,
    stopping: (watch::Sender<bool>, watch::Receiver<bool>),
}

impl Server {
    fn connection(&self, io: TcpStream, remote: std::net::SocketAddr) -> impl Future<Output = ()> + use<> {
        let peer =
            Peer { local: self.local.clone(), remote: RemoteAddr(remote.into()), scheme: Scheme::HTTP };
        connection(
            io,
            peer,
            Arc::clone(&self.endpoint),
            Arc::clone(&self.builder),
            self.limits,
            self.stopping.1.clone(),
        )
    }
}

fn builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // No hyper header-read timer (see the module comment): explicitly none, so that giving
    // hyper a timer later does not bring its 30 s default with it.
    builder.http1().keep_alive(true).header_read_timeout(None);
    // poem's settings for HTTP/2, kept.
    builder.http2().max_pending_accept_reset_streams(20).max_header_list_size(16 * 1024);
    builder
}

#[derive(Clone)]
struct Peer {
    local: LocalAddr,
    remote: RemoteAddr,
    scheme: Scheme,
}

/// Why a connection was ended by us.
#[derive(Debug)]
enum End {
    /// A request's head did not arrive in time: dropped without an answer.
    HeaderTimeout,
    /// No request and no traffic for `HTTP_IDLE_TIMEOUT`.
    Idle,
    Stopping,
}

async fn connection(
    io: TcpStream,
    peer: Peer,
    endpoint: Arc<BoxEndpoint<'static, Response>>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    limits: Limits,
    mut stopping: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity::new());
    let remote = peer.remote.clone();
    let service = hyper::service::service_fn({
        let activity = Arc::clone(&activity);
        let stopping = stopping.clone();
        move |req: http::Request<Incoming>| {
            let (endpoint, peer, stopping) = (Arc::clone(&endpoint), peer.clone(), stopping.clone());
            let http1 = matches!(req.version(), Version::HTTP_09 | Version::HTTP_10 | Version::HTTP_11);
            let in_flight = activity.request(req.version());
            async move {
                let _in_flight = in_flight;
                let req = poem::Request::from((req, peer.local, peer.remote, peer.scheme));
                let mut resp = http::Response::from(endpoint.get_response(req).await);
                // Stopping: hyper closes the connection once this answer is written, and the
                // client knows from the answer not to send another request on it.
                if http1 && *stopping.borrow() {
                    resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(resp)
            }
        }
    });
    let io = Watched { inner: io, activity: Arc::clone(&activity) };
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let end = tokio::select! {
        _ = conn.as_mut() => return,
        end = activity.expired(limits) => end,
        _ = stopping.wait_for(|stop| *stop) => End::Stopping,
    };
    tracing::debug!(remote_addr = %remote, reason = ?end, "closing the connection");
    match end {
        End::HeaderTimeout => return,
        End::Idle => {}
        End::Stopping if activity.http2.load(SeqCst) => {}
        End::Stopping => {
            // HTTP/1: answers now say `Connection: close`; wait for this connection to close
            // after one, or to be silent for `DRAIN_IDLE` (module comment, step 5).
            let drain = Limits { idle_timeout: limits.idle_timeout.min(DRAIN_IDLE), ..limits };
            tokio::select! {
                _ = conn.as_mut() => return,
                end = activity.expired(drain) => if let End::HeaderTimeout = end {
                    return;
                },
            }
        }
    }
    // An idle HTTP/1 connection closes at once, a request in flight finishes first (and
    // its answer says `Connection: close`); HTTP/2 gets a GOAWAY.
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// What a connection's watchdog needs to know: times are milliseconds since the connect.
struct Activity {
    opened: Instant,
    /// The last read or write, or the end of the last request.
    last_io: AtomicU64,
    /// When the head of a request not yet dispatched began to arrive; `NONE` when none is.
    head_since: AtomicU64,
    in_flight: AtomicUsize,
    /// HTTP/2: after its first request, bytes between requests are the protocol's own
    /// frames (window updates, pings, settings), not the start of a request head.
    http2: AtomicBool,
    head_started: Notify,
}

const NONE: u64 = u64::MAX;

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            last_io: AtomicU64::new(0),
            // The first request's clock starts at the connect.
            head_since: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            http2: AtomicBool::new(false),
            head_started: Notify::new(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(NONE - 1)
    }

    fn read(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let now = self.now();
        self.last_io.store(now, SeqCst);
        if self.in_flight.load(SeqCst) == 0
            && !self.http2.load(SeqCst)
            && self.head_since.compare_exchange(NONE, now, SeqCst, SeqCst).is_ok()
        {
            self.head_started.notify_one();
        }
    }

    fn wrote(&self) {
        self.last_io.store(self.now(), SeqCst);
    }

    /// A request's head has arrived and is being served.
    fn request(self: &Arc<Self>, version: Version) -> InFlight {
        self.in_flight.fetch_add(1, SeqCst);
        self.head_since.store(NONE, SeqCst);
        if version == Version::HTTP_2 {
            self.http2.store(true, SeqCst);
        }
        InFlight(Arc::clone(self))
    }

    /// Completes when a head has taken longer than `header_timeout` or the connection has
    /// been idle for `idle_timeout`.
    async fn expired(&self, limits: Limits) -> End {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(NONE - 1);
        let (header, idle) = (ms(limits.header_timeout), ms(limits.idle_timeout));
        loop {
            let now = self.now();
            let head_deadline = match self.head_since.load(SeqCst) {
                NONE => NONE,
                since => since.saturating_add(header),
            };
            if now >= head_deadline {
                return End::HeaderTimeout;
            }
            if self.in_flight.load(SeqCst) > 0 {
                // A request being served is not idleness, however quiet it is.
                self.last_io.store(now, SeqCst);
            }
            let idle_deadline = self.last_io.load(SeqCst).saturating_add(idle);
            if now >= idle_deadline {
                return End::Idle;
            }
            let wake = self.opened + Duration::from_millis(head_deadline.min(idle_deadline));
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {}
                () = self.head_started.notified() => {}
            }
        }
    }
}

/// A request being served; its end is activity too.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, SeqCst);
        self.0.wrote();
    }
}

/// The socket, telling the watchdog about every read and write.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            self.activity.read(buf.filled().len() - before);
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = polled
            && n > 0
        {
            self.activity.wrote();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled
            && n > 0
        {
            self.activity.wrote();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
