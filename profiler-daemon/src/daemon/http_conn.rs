//! Accepting and serving the API's HTTP/1 connections within bounds that a
//! slow or hostile client cannot push: at most [`Limits::max_connections`]
//! at once (one more gets a one-line 503 and is closed, so file descriptors
//! stay for reading targets), request headers within
//! [`Limits::header_timeout`] and [`MAX_BUF_BYTES`], and no connection
//! older than [`Limits::max_connection_age`] (a client that never reads
//! its answer cannot pin the answer's memory).
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// hyper's read buffer per connection (its minimum is 8 KiB): bounds a
/// request's head, so a longer query string or header gets a 431.
pub const MAX_BUF_BYTES: usize = 64 * 1024;

/// How long in-flight requests may finish after a shutdown is asked.
const DRAIN: Duration = Duration::from_secs(5);

const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: text/plain; charset=utf-8\r\nconnection: close\r\ncontent-length: 56\r\n\r\n\
too many connections to the pyebpf API; try again later\n";

/// Per-listener bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub max_connection_age: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 128,
            header_timeout: Duration::from_secs(10),
            max_connection_age: Duration::from_secs(300),
        }
    }
}

/// Serves `app` on `listener` within `limits` until `shutdown` resolves,
/// then lets in-flight requests finish for a few seconds.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let refused = AtomicU64::new(0);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, or a connection reset before it
                    // was taken: wait a little instead of spinning.
                    tracing::warn!("HTTP API: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            let n = refused.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() || n == 0 {
                tracing::warn!(
                    "HTTP API: {} connections refused so far: {} are open (the limit)",
                    n + 1,
                    limits.max_connections
                );
            }
            // Best effort, never waits: the socket's buffer is empty.
            let _ = stream.try_write(BUSY);
            continue;
        };
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_buf_size(MAX_BUF_BYTES)
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        let age = limits.max_connection_age;
        tokio::spawn(async move {
            // Errors are the client's (reset, timeout, bad request): hyper
            // has answered what could be answered.
            let _ = tokio::time::timeout(age, conn).await;
            drop(permit);
        });
    }
    let _ = tokio::time::timeout(DRAIN, graceful.shutdown()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};
    use std::net::{SocketAddr, TcpStream};
    use std::time::Instant;

    /// Serves a one-route app with `limits` on a runtime of its own.
    fn server(limits: Limits) -> (tokio::runtime::Runtime, SocketAddr) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/x", axum::routing::get(|| async { "ok" }));
        rt.spawn(serve(listener, app, limits, std::future::pending()));
        (rt, addr)
    }

    fn connect(addr: SocketAddr) -> TcpStream {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    }

    fn answer(s: &mut TcpStream) -> String {
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Waits until the server closes `s` (EOF or reset), for at most 20 s.
    fn closed_by_server(s: &mut TcpStream) -> Duration {
        let start = Instant::now();
        let mut b = [0u8; 512];
        loop {
            match s.read(&mut b) {
                Ok(0) | Err(_) => return start.elapsed(),
                Ok(_) => assert!(start.elapsed() < Duration::from_secs(20), "never closed"),
            }
        }
    }

    #[test]
    fn slow_clients_are_bounded_and_timed_out() {
        let limits = Limits {
            max_connections: 3,
            header_timeout: Duration::from_secs(1),
            max_connection_age: Duration::from_secs(600),
        };
        let (_rt, addr) = server(limits);
        // Three clients that never finish their headers hold every slot.
        let mut slow: Vec<TcpStream> = (0..3)
            .map(|_| {
                let mut s = connect(addr);
                s.write_all(b"GET /x HTTP/1.1\r\nHo").unwrap();
                s
            })
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        let mut fourth = connect(addr);
        let busy = answer(&mut fourth);
        assert!(busy.starts_with("HTTP/1.1 503"), "{busy}");
        assert!(busy.ends_with("too many connections to the pyebpf API; try again later\n"));
        // Their headers time out; the slots come back.
        for s in &mut slow {
            closed_by_server(s);
        }
        let mut ok = connect(addr);
        ok.write_all(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let text = answer(&mut ok);
        assert!(
            text.starts_with("HTTP/1.1 200") && text.ends_with("ok"),
            "{text}"
        );
    }

    #[test]
    fn oversized_heads_get_431() {
        let (_rt, addr) = server(Limits::default());
        let mut s = connect(addr);
        let q = "a".repeat(2 * MAX_BUF_BYTES);
        // The server may answer and close before it has read everything.
        let _ = write!(s, "GET /x?{q} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        let text = answer(&mut s);
        assert!(text.starts_with("HTTP/1.1 431"), "{text:.200}");
    }

    #[test]
    fn connections_end_at_their_age_limit() {
        let limits = Limits {
            max_connections: 8,
            header_timeout: Duration::from_secs(600),
            max_connection_age: Duration::from_secs(1),
        };
        let (_rt, addr) = server(limits);
        // A kept-alive connection, idle after its answer.
        let mut s = connect(addr);
        s.write_all(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .unwrap();
        let mut b = [0u8; 256];
        let n = s.read(&mut b).unwrap();
        assert!(b[..n].starts_with(b"HTTP/1.1 200"));
        closed_by_server(&mut s);
    }
}
