//! Graceful shutdown of the caller connections, in place of hyper-util's `GracefulShutdown`: same shape
//! (`watcher()` per accepted connection, `Watcher::watch` around the hyper connection, `shutdown()` to ask every
//! connection to finish and wait until all have), built on [`super::StopGroup`].
//!
//! Why not hyper-util's: its `watch` polls a `watch::Receiver::changed()` future on every poll of the
//! connection, which registers with a `Notify` each time; here a poll costs one Acquire load until the
//! shutdown starts (see [`super::group`]).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::server::graceful::GracefulConnection;

use super::{Member, StopGroup};

/// The server's side: hands out a [`Watcher`] per connection and, at the end, shuts them all down.
#[derive(Default)]
pub(crate) struct GracefulShutdown {
    connections: StopGroup,
}

impl GracefulShutdown {
    /// No connection yet.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// A watcher for one more connection. It counts from now, so a connection still in its TLS handshake when
    /// the shutdown starts is waited for too.
    pub(crate) fn watcher(&self) -> Watcher {
        Watcher(self.connections.member())
    }

    /// Asks every watched connection to finish (now, not at the first poll of the returned future) and
    /// completes once every watcher is dropped: their connections ended, or never started.
    pub(crate) fn shutdown(self) -> impl Future<Output = ()> {
        self.connections.stop();
        async move { self.connections.ended().await }
    }
}

/// One connection's part in a [`GracefulShutdown`].
pub(crate) struct Watcher(Member);

impl Watcher {
    /// Drives `conn` as it is until the shutdown starts, then calls its `graceful_shutdown` once (an idle
    /// keep-alive connection closes, one with a request open finishes it first) and goes on driving it.
    pub(crate) fn watch<C: GracefulConnection>(self, conn: C) -> Watched<C> {
        Watched {
            conn,
            member: self.0,
            asked: false,
        }
    }
}

pin_project_lite::pin_project! {
    /// A connection under a [`GracefulShutdown`]; completes with the connection.
    pub(crate) struct Watched<C> {
        // Declared first, so dropped first: the connection is closed before its member leaves the count.
        #[pin]
        conn: C,
        member: Member,
        // `graceful_shutdown` was called: the member is not polled again.
        asked: bool,
    }
}

impl<C: GracefulConnection> Future for Watched<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let mut this = self.project();
        if !*this.asked && this.member.poll_stopped(cx).is_ready() {
            *this.asked = true;
            this.conn.as_mut().graceful_shutdown();
        }
        this.conn.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::time::Duration;

    use http_body_util::Full;
    use hyper::body::{Bytes, Incoming};
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper::{Request, Response};
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::sync::{mpsc, oneshot};

    /// Serves HTTP/1.1 on one end of an in-memory pipe under `graceful`; each request waits for a `()` on the
    /// returned channel before it is answered. Returns the caller's end.
    fn serve(graceful: &GracefulShutdown) -> (DuplexStream, mpsc::UnboundedSender<()>, oneshot::Receiver<()>) {
        let (caller, server) = tokio::io::duplex(4096);
        let (go, rx) = mpsc::unbounded_channel::<()>();
        let rx = std::sync::Arc::new(tokio::sync::Mutex::new(rx));
        let service = service_fn(move |_: Request<Incoming>| {
            let rx = rx.clone();
            async move {
                rx.lock().await.recv().await;
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"done"))))
            }
        });
        let conn = http1::Builder::new().serve_connection(TokioIo::new(server), service);
        let watched = graceful.watcher().watch(conn);
        let (ended_tx, ended) = oneshot::channel();
        tokio::spawn(async move {
            let _ = watched.await;
            let _ = ended_tx.send(());
        });
        (caller, go, ended)
    }

    /// Reads one whole response (its body is the 4 bytes `done`).
    async fn response(caller: &mut DuplexStream) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        while !got.ends_with(b"done") {
            let n = caller.read(&mut buf).await.unwrap();
            assert_ne!(n, 0, "closed before the response: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(got).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_close_and_open_requests_finish_before_the_shutdown_ends() {
        let graceful = GracefulShutdown::new();
        let (mut idle, go_idle, idle_ended) = serve(&graceful);
        let (mut busy, go_busy, busy_ended) = serve(&graceful);
        // The idle one served a request and now waits, kept alive, for the next.
        idle.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await.unwrap();
        go_idle.send(()).unwrap();
        assert!(response(&mut idle).await.starts_with("HTTP/1.1 200"));
        busy.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await.unwrap();
        tokio::task::yield_now().await;
        // A watcher whose connection never started (a failed TLS handshake) counts until dropped.
        let handshaking = graceful.watcher();

        let drained = graceful.shutdown();
        tokio::pin!(drained);
        tokio::time::timeout(Duration::from_secs(5), idle_ended)
            .await
            .expect("the idle connection closes at once")
            .unwrap();
        let mut rest = Vec::new();
        idle.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        assert!(
            tokio::time::timeout(Duration::from_secs(1), &mut drained)
                .await
                .is_err(),
            "a request is still open"
        );
        go_busy.send(()).unwrap();
        let answer = response(&mut busy).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
        tokio::time::timeout(Duration::from_secs(5), busy_ended)
            .await
            .unwrap()
            .unwrap();
        assert!(tokio::time::timeout(Duration::from_secs(1), &mut drained)
            .await
            .is_err());
        drop(handshaking);
        tokio::time::timeout(Duration::from_secs(5), drained).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_watched_after_the_shutdown_is_asked_to_finish_at_once() {
        let graceful = GracefulShutdown::new();
        let watcher = graceful.watcher();
        let drained = graceful.shutdown();
        let (caller, server) = tokio::io::duplex(4096);
        let service = service_fn(|_: Request<Incoming>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"done"))))
        });
        let conn = http1::Builder::new().serve_connection(TokioIo::new(server), service);
        // Never a request: without `graceful_shutdown` it would wait for one forever.
        tokio::time::timeout(Duration::from_secs(5), watcher.watch(conn))
            .await
            .unwrap()
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), drained).await.unwrap();
        drop(caller);
    }
}
