//! The caller-facing listener: accept loop with a connection limit, optional TLS (HTTP/2 by ALPN), HTTP/1.1
//! served directly and HTTP/2 detected from the connection preface (h2c, or h2 after ALPN), `server.header_read_timeout`, and graceful
//! shutdown within `server.shutdown_grace`.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::Request;
use hyper::body::{Body, Incoming};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::affinity::Affinity;
use crate::busy::{Busy, Tracked};
use crate::config::ServerConfig;
use crate::memory::Trimmer;
use crate::paired::{HeadTimeout, Pair, Paired};
use crate::proxy::{CallerConn, Proxy};
use crate::shutdown::graceful::{GracefulShutdown, Watcher};
use crate::shutdown::ShutdownSignal;
use crate::tasks::Tasks;

/// The HTTP/2 connection preface (RFC 9113 §3.4): a client speaking h2c with prior knowledge starts with it.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Per-connection protocol settings, built once.
struct ConnSettings {
    http1: http1::Builder,
    /// HTTP/2 streams are spawned on the run's [`Tasks`], so they end with it.
    http2: http2::Builder<Tasks>,
    header_read_timeout: Duration,
    /// `upstream.response_timeout`, kept by each HTTP/1.1 connection's deadline.
    response_timeout: Duration,
}

impl ConnSettings {
    fn new(cfg: &ServerConfig, response_timeout: Duration, tasks: &Tasks) -> Self {
        let mut h1 = http1::Builder::new();
        // No timer for hyper: `server.header_read_timeout` is kept by each connection's one deadline
        // (`paired::Pair`), not by a timer hyper would allocate and register for every request.
        // One contiguous write per response for the small JSON answers ZapSign gives (see `affinity::open`).
        h1.header_read_timeout(None).keep_alive(true).writev(false);
        let mut h2 = http2::Builder::new(tasks.clone());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(256)
            .keep_alive_interval(Some(Duration::from_secs(30)));
        Self {
            http1: h1,
            http2: h2,
            header_read_timeout: cfg.header_read_timeout,
            response_timeout,
        }
    }
}

/// The caller-facing TLS identity, swapped on reload; `None` for plain HTTP.
pub type TlsCell = Option<Arc<ArcSwap<TlsAcceptor>>>;

/// Accepts and serves callers until `shutdown` starts, then closes the listener (new connections are
/// refused, not left waiting) and lets open requests finish within `server.shutdown_grace`. Connections are
/// spawned on `tasks`: those still open after the grace end when the caller closes `tasks`.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    cfg: &ServerConfig,
    tls: TlsCell,
    mut shutdown: ShutdownSignal,
    tasks: &Tasks,
) {
    let settings = Arc::new(ConnSettings::new(cfg, proxy.response_timeout(), tasks));
    let limit = Arc::new(Semaphore::new(cfg.max_connections));
    let graceful = GracefulShutdown::new();
    let trimmer = Arc::new(Trimmer::default());
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tasks.spawn(trimmer.clone().run(shutdown.clone()));
    loop {
        let permit = tokio::select! {
            permit = limit.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            () = shutdown.stopped() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: pause instead of spinning; the backlog keeps callers waiting.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.stopped() => break,
        };
        // Requests and responses are small and interactive: Nagle's delay would cost up to 40 ms each.
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let settings = settings.clone();
        let watcher = graceful.watcher();
        let acceptor = tls.as_ref().map(|cell| cell.load_full());
        let (active, trimmer) = (active.clone(), trimmer.clone());
        active.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        tasks.spawn(async move {
            match acceptor {
                None => serve_connection(stream, peer, "http", proxy, &settings, watcher).await,
                // Boxed: a TLS connection's state (handshake, rustls session, its own instance of the
                // connection's future) would otherwise size every plain connection's task too, and that whole
                // future is copied when the task is spawned.
                Some(acceptor) => Box::pin(serve_tls(acceptor, stream, peer, proxy, &settings, watcher)).await,
            }
            drop(permit);
            if active.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
                trimmer.idle();
            }
        });
    }
    drop(listener);
    info!(grace = ?cfg.shutdown_grace, "stopped accepting; letting open requests finish");
    let drained = graceful.shutdown();
    tokio::pin!(drained);
    tokio::select! {
        _ = &mut drained => info!("all connections closed"),
        _ = tokio::time::sleep(cfg.shutdown_grace) => {
            warn!(grace = ?cfg.shutdown_grace, "server.shutdown_grace passed with requests still open; closing them");
            // Requests still queued for a pacing slot get their 503 now; a moment lets those answers out.
            proxy.refuse_waiting();
            let _ = tokio::time::timeout(REFUSALS_OUT, &mut drained).await;
        }
    }
}

/// Serves one caller connection over TLS; the handshake counts against the header read timeout, so a silent
/// TLS client is cut off too.
async fn serve_tls(
    acceptor: Arc<TlsAcceptor>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    proxy: Arc<Proxy>,
    settings: &ConnSettings,
    watcher: Watcher,
) {
    match tokio::time::timeout(settings.header_read_timeout, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => serve_connection(stream, peer, "https", proxy, settings, watcher).await,
        Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => debug!(%peer, "no TLS handshake within server.header_read_timeout"),
    }
}

/// How long after the grace the answers to refused queued requests get to reach their callers.
const REFUSALS_OUT: std::time::Duration = std::time::Duration::from_millis(500);

/// Serves one caller connection, HTTP/1.1 or HTTP/2 by its first bytes.
async fn serve_connection<T>(
    mut io: T,
    peer: SocketAddr,
    proto: &'static str,
    proxy: Arc<Proxy>,
    settings: &ConnSettings,
    watcher: Watcher,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let accepted = tokio::time::Instant::now();
    let mut prefix = [0u8; 24];
    let (len, is_h2) = match tokio::time::timeout(settings.header_read_timeout, sniff(&mut io, &mut prefix)).await {
        Ok(Ok((0, _))) => return,
        Ok(Ok(found)) => found,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "connection failed before its first request");
            return;
        }
        Err(_) => {
            debug!(%peer, "no request within server.header_read_timeout; closing");
            return;
        }
    };
    let io = TokioIo::new(Prefixed {
        prefix,
        start: 0,
        end: len as u8,
        inner: io,
    });
    let result = if is_h2 {
        // HTTP/2 callers multiplex: their requests share the pool.
        let conn = Arc::new(CallerConn::new(peer, proto, None, None));
        let service = service_fn(move |req: Request<Incoming>| {
            let req = req.map(|body| Tracked::new(body, Busy::none()));
            let (proxy, conn) = (proxy.clone(), conn.clone());
            async move { Ok::<_, Infallible>(proxy.handle(req, &conn).await) }
        });
        // Boxed: rare next to HTTP/1.1 callers, and inline it would size every connection's task.
        Box::pin(watcher.watch(settings.http2.serve_connection(io, service))).await
    } else {
        let affinity = Arc::new(Affinity::default());
        // The head deadline runs from the connection's start: the sniffed bytes count against it too.
        let pair = Pair::new(accepted, settings.header_read_timeout, settings.response_timeout);
        let conn = Arc::new(CallerConn::new(peer, proto, Some(affinity.clone()), Some(pair.clone())));
        let service = service_fn(move |req: Request<Incoming>| {
            // In progress (no head owed by the caller) until the response has been sent whole and the request's
            // own body read whole: an early answer to a slow upload does not make the connection idle.
            let started = || {
                conn.pair
                    .as_ref()
                    .map_or_else(Busy::none, |pair| pair.request_started())
            };
            // A body over before it starts (a GET) holds nothing: no guard made and dropped per request.
            let req = req.map(|body| {
                let busy = if body.is_end_stream() { Busy::none() } else { started() };
                Tracked::new(body, busy)
            });
            let busy = started();
            let (proxy, conn) = (proxy.clone(), conn.clone());
            async move {
                let resp = proxy.handle(req, &conn).await;
                Ok::<_, Infallible>(resp.map(|body| Tracked::new(body, busy)))
            }
        });
        match Paired::new(
            watcher.watch(settings.http1.serve_connection(io, service)),
            affinity,
            pair,
        )
        .await
        {
            Ok(result) => result,
            Err(HeadTimeout) => {
                debug!(%peer, "no complete request head within server.header_read_timeout; closing");
                return;
            }
        }
    };
    if let Err(e) = result {
        debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Reads until the bytes so far differ from the HTTP/2 preface (HTTP/1.1) or match all of it (HTTP/2).
/// Returns how many bytes were read and whether the connection is HTTP/2; 0 bytes means the caller left.
async fn sniff<T: AsyncRead + Unpin>(io: &mut T, buf: &mut [u8; 24]) -> io::Result<(usize, bool)> {
    let mut n = 0;
    loop {
        let read = io.read(&mut buf[n..]).await?;
        if read == 0 {
            return Ok((n, false));
        }
        n += read;
        if buf[..n] != H2_PREFACE[..n] {
            return Ok((n, false));
        }
        if n == H2_PREFACE.len() {
            return Ok((n, true));
        }
    }
}

pin_project_lite::pin_project! {
    /// An I/O stream that first replays the bytes already read while sniffing the protocol.
    struct Prefixed<T> {
        prefix: [u8; 24],
        start: u8,
        end: u8,
        #[pin]
        inner: T,
    }
}

impl<T: AsyncRead> AsyncRead for Prefixed<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        if *this.start < *this.end {
            let available = &this.prefix[*this.start as usize..*this.end as usize];
            let n = available.len().min(buf.remaining());
            buf.put_slice(&available[..n]);
            *this.start += n as u8;
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for Prefixed<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sniff_tells_http1_from_h2_preface() {
        let mut buf = [0u8; 24];
        let mut h1: &[u8] = b"GET / HTTP/1.1\r\n\r\n";
        assert_eq!(sniff(&mut h1, &mut buf).await.unwrap(), (18, false));
        let mut post: &[u8] = b"POST /api/ HTTP/1.1\r\n";
        assert!(!sniff(&mut post, &mut buf).await.unwrap().1);
        let mut h2: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nrest";
        assert_eq!(sniff(&mut h2, &mut buf).await.unwrap(), (24, true));
        let mut empty: &[u8] = b"";
        assert_eq!(sniff(&mut empty, &mut buf).await.unwrap().0, 0);
    }

    #[tokio::test]
    async fn prefixed_replays_sniffed_bytes_first() {
        let mut p = Prefixed {
            prefix: *b"GET / HTTP/1.1\r\n\r\n......",
            start: 0,
            end: 4,
            inner: &b"rest"[..],
        };
        let mut out = Vec::new();
        p.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"GET rest");
    }
}
