//! The telemetry endpoint: `/metrics`, `/healthz`, `/readyz` on one port (`telemetry.listen`,
//! served by axum with a connection limit), what `/readyz` reports, and the GPU gauges sampled
//! every 5 s off the request path.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::sync::atomic::{AtomicBool, Ordering};

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, Result};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use super::{ALIVE, READY, gpu, liveness, prometheus};

/// What `/readyz` reports: ready when every part is.
#[derive(Debug, Default)]
pub struct Readiness {
    pub models_warm: AtomicBool,
    pub partitions_assigned: AtomicBool,
    pub store_reachable: AtomicBool,
    /// Set while the edge store's writes wait for free disk (`qdrant.edge_min_free_bytes`).
    pub store_disk_low: AtomicBool,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        self.problems().is_empty()
    }

    pub fn problems(&self) -> Vec<&'static str> {
        let mut out = vec![];
        if !self.models_warm.load(Ordering::Relaxed) {
            out.push("models not loaded and warm yet");
        }
        if !self.partitions_assigned.load(Ordering::Relaxed) {
            out.push("no input partition assigned");
        }
        if self.store_disk_low.load(Ordering::Relaxed) {
            out.push("free disk below qdrant.edge_min_free_bytes under the vector store (writes wait for space)");
        } else if !self.store_reachable.load(Ordering::Relaxed) {
            out.push("vector store not reachable");
        }
        if liveness::registry_waiting() {
            out.push("schema registry not answering (input waits for a writer schema)");
        }
        out
    }
}

/// At most this many telemetry connections at once: a scraper storm or clients that never
/// close cannot take the worker's file descriptors and tasks; further ones wait to be accepted.
pub const MAX_CONNECTIONS: usize = 32;
/// A telemetry connection is closed this long after it was accepted (probes and scrapes take
/// milliseconds; a client that holds one open cannot keep its slot).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// A telemetry connection that has sent nothing for this long is closed: idle keep-alive
/// clients holding every slot delay a liveness probe by this much at most, not by a lifetime.
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the GPU and allocator gauges are sampled (off the request path).
const GPU_SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct Probes {
    readiness: Arc<Readiness>,
    liveness: Arc<liveness::Liveness>,
}

/// Serves `/metrics`, `/healthz` and `/readyz` (axum, HTTP/1.1) until the process ends, at most
/// `MAX_CONNECTIONS` connections at once; samples the GPU gauges every `GPU_SAMPLE_INTERVAL`.
/// Returns the bound address (port 0 in `listen` picks a free one).
pub async fn serve(listen: &str, readiness: Arc<Readiness>, liveness: Arc<liveness::Liveness>) -> Result<SocketAddr> {
    prometheus();
    let listener = TcpListener::bind(listen).await.with_context(|| format!("binding telemetry.listen {listen}"))?;
    let addr = listener.local_addr()?;
    info!(%addr, "serving /metrics, /healthz, /readyz");
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(metrics_page))
        .route("/healthz", axum::routing::get(|State(p): State<Probes>| async move { probe_answer(&p.liveness.problems(), "ok", "not alive") }))
        .route("/readyz", axum::routing::get(|State(p): State<Probes>| async move { probe_answer(&p.readiness.problems(), "ready", "not ready") }))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found: try /metrics, /healthz or /readyz\n") })
        .with_state(Probes { readiness, liveness });
    let listener = LimitedListener { inner: listener, slots: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)) };
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!(error = %e, "the telemetry server stopped");
        }
    });
    sample_gpu_periodically();
    Ok(addr)
}

async fn metrics_page(State(p): State<Probes>) -> impl IntoResponse {
    metrics::gauge!(READY).set(if p.readiness.ready() { 1.0 } else { 0.0 });
    metrics::gauge!(ALIVE).set(if p.liveness.problems().is_empty() { 1.0 } else { 0.0 });
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], prometheus().render())
}

/// Starts (once per process) the task that refreshes the GPU gauges.
fn sample_gpu_periodically() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        tokio::spawn(async {
            let mut every = tokio::time::interval(GPU_SAMPLE_INTERVAL);
            loop {
                every.tick().await;
                let _ = tokio::task::spawn_blocking(gpu::sample).await;
            }
        });
    });
}

/// The TCP listener, with one of `slots` held by every open connection.
struct LimitedListener {
    inner: TcpListener,
    slots: Arc<tokio::sync::Semaphore>,
}

impl axum::serve::Listener for LimitedListener {
    type Io = LimitedConnection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let slot = self.slots.clone().acquire_owned().await.expect("the semaphore is never closed");
        loop {
            match self.inner.accept().await {
                Ok((io, addr)) => {
                    let closes = Box::pin(tokio::time::sleep(CONNECTION_LIFETIME));
                    let idle = Box::pin(tokio::time::sleep(IDLE_TIMEOUT));
                    return (LimitedConnection { io, _slot: slot, closes, idle }, addr);
                }
                Err(e) => {
                    // out of file descriptors and the like: wait instead of spinning
                    debug!(error = %e, "telemetry accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A telemetry connection: holds its slot until dropped, and fails its reads once
/// `CONNECTION_LIFETIME` has passed or after `IDLE_TIMEOUT` without a byte received (the server
/// then closes it).
struct LimitedConnection {
    io: tokio::net::TcpStream,
    _slot: tokio::sync::OwnedSemaphorePermit,
    closes: std::pin::Pin<Box<tokio::time::Sleep>>,
    idle: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl AsyncRead for LimitedConnection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.closes.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "telemetry connection lifetime over")));
        }
        if self.idle.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "telemetry connection idle")));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.idle.as_mut().reset(tokio::time::Instant::now() + IDLE_TIMEOUT);
        }
        read
    }
}

impl AsyncWrite for LimitedConnection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A probe's answer: 200 with `ok`, or 503 with `not_ok` and the problems.
fn probe_answer(problems: &[impl AsRef<str>], ok: &str, not_ok: &str) -> (StatusCode, String) {
    if problems.is_empty() {
        (StatusCode::OK, format!("{ok}\n"))
    } else {
        let problems: Vec<&str> = problems.iter().map(AsRef::as_ref).collect();
        (StatusCode::SERVICE_UNAVAILABLE, format!("{not_ok}: {}\n", problems.join("; ")))
    }
}
