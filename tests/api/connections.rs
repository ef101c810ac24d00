//! The connection layer: how long a client may take to send its headers, how long an idle
//! connection lives, HTTP/1.1 keep-alive and HTTP/2 side by side, and stopping.

use std::time::{Duration, Instant};

use hyper::{Request, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::task::JoinHandle;

use crate::helpers::{Backend, Store, TestApp};

/// Reads until the server closes the connection: (when, what it sent).
fn watch_close(mut read: OwnedReadHalf) -> JoinHandle<(Duration, Vec<u8>)> {
    let started = Instant::now();
    tokio::spawn(async move {
        let (mut buf, mut got) = (vec![0; 4096], Vec::new());
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => return (started.elapsed(), got),
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
}

/// Slowloris: a request's head sent one header line a second, each arriving well within
/// any idle limit, the whole never finishing.
#[tokio::test]
async fn a_client_sending_one_header_line_a_second_is_disconnected() {
    let app = TestApp::spawn_with(Backend::Sqlite, Store::InProcess, &[("HTTP_HEADER_TIMEOUT", "2s")]).await;
    let (read, mut write) = TcpStream::connect(app.host_port()).await.unwrap().into_split();
    let closed = watch_close(read);
    write.write_all(b"GET /health HTTP/1.1\r\nhost: latchkey\r\n").await.unwrap();
    for i in 0..10 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if closed.is_finished() || write.write_all(format!("x-slow-{i}: 1\r\n").as_bytes()).await.is_err() {
            break;
        }
    }
    let (after, got) = tokio::time::timeout(Duration::from_secs(10), closed)
        .await
        .expect("the connection was still open 10 s after the last header line")
        .unwrap();
    assert!(after < Duration::from_secs(3), "closed after {after:?}");
    assert!(got.is_empty(), "no answer: {}", String::from_utf8_lossy(&got));
    drop(write);
}

/// A connection that never completes a first request, whatever it is waiting for: silent
/// from the start, or trickling the HTTP/2 preface (before the server knows which
/// protocol it speaks).
#[tokio::test]
async fn a_connection_that_never_sends_a_whole_request_is_closed_in_time() {
    let app = TestApp::spawn_with(Backend::Sqlite, Store::InProcess, &[("HTTP_HEADER_TIMEOUT", "1s")]).await;
    let (read, silent) = TcpStream::connect(app.host_port()).await.unwrap().into_split();
    let silent_closed = watch_close(read);
    let (read, mut write) = TcpStream::connect(app.host_port()).await.unwrap().into_split();
    let slow_closed = watch_close(read);
    for byte in b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" {
        if slow_closed.is_finished() || write.write_all(&[*byte]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (name, closed) in [("silent", silent_closed), ("slow preface", slow_closed)] {
        let (after, _) = tokio::time::timeout(Duration::from_secs(5), closed)
            .await
            .unwrap_or_else(|_| panic!("{name}: still open after 5 s"))
            .unwrap();
        assert!(after < Duration::from_secs(2), "{name}: closed after {after:?}");
    }
    drop((silent, write));
}

/// One `GET` on an already open connection, HTTP/1.1 or HTTP/2.
trait SendHealth {
    async fn get(&mut self, path: &str) -> StatusCode;
}

impl SendHealth for hyper::client::conn::http1::SendRequest<String> {
    async fn get(&mut self, path: &str) -> StatusCode {
        let req = Request::get(path).header("host", "latchkey").body(String::new()).unwrap();
        let resp = self.send_request(req).await.expect("the connection is still open");
        assert_eq!(resp.version(), Version::HTTP_11);
        resp.status()
    }
}

impl SendHealth for hyper::client::conn::http2::SendRequest<String> {
    async fn get(&mut self, path: &str) -> StatusCode {
        let req = Request::get(format!("http://latchkey{path}")).body(String::new()).unwrap();
        let resp = self.send_request(req).await.expect("the connection is still open");
        assert_eq!(resp.version(), Version::HTTP_2);
        resp.status()
    }
}

const KEEP_ALIVE: &[(&str, &str)] = &[("HTTP_HEADER_TIMEOUT", "1s"), ("HTTP_IDLE_TIMEOUT", "4s")];

/// A keep-alive client pausing between requests for longer than the header timeout (but
/// less than the idle timeout) keeps its connection: waiting for the next request is
/// idleness, governed by `HTTP_IDLE_TIMEOUT`. Once silent for that long, it is closed.
#[tokio::test]
async fn a_keep_alive_connection_pausing_between_requests_is_kept_until_idle() {
    let app = TestApp::spawn_with(Backend::Sqlite, Store::InProcess, KEEP_ALIVE).await;
    let stream = TcpStream::connect(app.host_port()).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    let conn = tokio::spawn(conn);
    for _ in 0..3 {
        assert_eq!(sender.get("/health").await, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
    assert_eq!(sender.get("/health").await, StatusCode::OK);
    let silent = Instant::now();
    tokio::time::timeout(Duration::from_secs(8), conn).await.expect("closed when idle").unwrap().unwrap();
    let after = silent.elapsed();
    assert!(after > Duration::from_millis(3500) && after < Duration::from_secs(6), "closed after {after:?}");
}

/// The same over HTTP/2 with prior knowledge (h2c, no upgrade): the client's own frames
/// between requests (window updates, settings) do not start the header clock.
#[tokio::test]
async fn an_http2_connection_pausing_between_requests_is_kept_until_idle() {
    let app = TestApp::spawn_with(Backend::Sqlite, Store::InProcess, KEEP_ALIVE).await;
    let stream = TcpStream::connect(app.host_port()).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    let conn = tokio::spawn(conn);
    for _ in 0..3 {
        assert_eq!(sender.get("/health").await, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
    // Several streams at once on the one connection.
    let (mut one, mut two) = (sender.clone(), sender.clone());
    let (a, b) = tokio::join!(one.get("/health"), two.get("/ready"));
    assert_eq!((a, b), (StatusCode::OK, StatusCode::OK));
    let silent = Instant::now();
    tokio::time::timeout(Duration::from_secs(8), conn).await.expect("closed when idle").unwrap().unwrap();
    let after = silent.elapsed();
    assert!(after > Duration::from_millis(3500) && after < Duration::from_secs(6), "closed after {after:?}");
}

/// Stopping: a request in flight (its body still arriving) finishes, an idle keep-alive
/// connection does not hold the server up, a new connection is refused, and the server
/// returns well before `SHUTDOWN_TIMEOUT`.
#[tokio::test]
async fn stopping_finishes_requests_in_flight_and_refuses_new_connections() {
    let mut app =
        TestApp::spawn_with(Backend::Sqlite, Store::InProcess, &[("SHUTDOWN_TIMEOUT", "20s")]).await;
    let stream = TcpStream::connect(app.host_port()).await.unwrap();
    let (mut idle, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    let idle_conn = tokio::spawn(conn);
    assert_eq!(idle.get("/health").await, StatusCode::OK);

    // A login whose body takes about 1.5 s to arrive.
    let body = r#"{"email":"nobody@example.com","password":"not the password"}"#;
    let chunks: Vec<String> =
        body.chars().collect::<Vec<_>>().chunks(8).map(|c| c.iter().collect()).collect();
    let trickle = futures_util::stream::unfold(chunks.into_iter(), |mut rest| async move {
        let chunk = rest.next()?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        Some((Ok::<_, std::io::Error>(chunk), rest))
    });
    let in_flight = app
        .client
        .post(app.url("/v1/auth/login"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(trickle))
        .send();
    let in_flight = tokio::spawn(in_flight);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = Instant::now();
    let address = app.host_port().to_owned();
    app.signal_stop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(TcpStream::connect(&address).await.is_err(), "a new connection was accepted while stopping");
    let resp = in_flight.await.unwrap().expect("the request in flight was cut off");
    assert_eq!(resp.status(), reqwest::StatusCode::UNAUTHORIZED);
    tokio::time::timeout(Duration::from_secs(5), app.stop()).await.expect("stopped within 5 s");
    assert!(started.elapsed() < Duration::from_secs(5));
    tokio::time::timeout(Duration::from_secs(1), idle_conn)
        .await
        .expect("the idle connection was closed")
        .ok();
}

/// …and a request that outlasts `SHUTDOWN_TIMEOUT` (a body trickled for longer) does not
/// hold the stop up: it is cut off when that time is up.
#[tokio::test]
async fn stopping_cuts_off_what_is_still_running_after_the_shutdown_timeout() {
    let env = [("SHUTDOWN_TIMEOUT", "1s"), ("HTTP_BODY_TIMEOUT", "30s")];
    let mut app = TestApp::spawn_with(Backend::Sqlite, Store::InProcess, &env).await;
    let trickle = futures_util::stream::unfold(0u32, |i| async move {
        (i < 100).then_some(())?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        Some((Ok::<_, std::io::Error>(if i == 0 { "{" } else { " " }), i + 1))
    });
    let in_flight = app
        .client
        .post(app.url("/v1/auth/login"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(trickle))
        .send();
    let in_flight = tokio::spawn(in_flight);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    app.signal_stop();
    tokio::time::timeout(Duration::from_secs(4), app.stop()).await.expect("stopped within 4 s");
    assert!(started.elapsed() >= Duration::from_millis(900), "stopped after {:?}", started.elapsed());
    assert!(in_flight.await.unwrap().is_err(), "the request was cut off");
}

/// A request already on its way in an idle keep-alive connection when stopping begins is
/// answered, not cut off: the client cannot tell whether a request that meets a closed
/// connection was processed (a refresh must not be sent twice). The answer says
/// `Connection: close`, and the connection then closes; a new connection is refused.
#[tokio::test]
async fn stopping_answers_a_request_arriving_on_an_idle_keep_alive_connection() {
    let mut app =
        TestApp::spawn_with(Backend::Sqlite, Store::InProcess, &[("SHUTDOWN_TIMEOUT", "20s")]).await;
    let stream = TcpStream::connect(app.host_port()).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    let conn = tokio::spawn(conn);
    assert_eq!(sender.get("/health").await, StatusCode::OK);

    let address = app.host_port().to_owned();
    app.signal_stop();
    // The request "on its way": sent a moment after the stop began.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(TcpStream::connect(&address).await.is_err(), "a new connection was accepted while stopping");
    let req = Request::get("/health").header("host", "latchkey").body(String::new()).unwrap();
    let resp = sender.send_request(req).await.expect("the request on the idle connection was answered");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers().get("connection").map(|v| v.to_str().unwrap()), Some("close"));
    tokio::time::timeout(Duration::from_secs(2), conn)
        .await
        .expect("the connection closed after the answer")
        .unwrap()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), app.stop()).await.expect("stopped within 5 s");
}
