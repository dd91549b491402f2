//! Upstream connection affinity: each caller HTTP/1.1 connection drives its own upstream HTTP/1.1 connection
//! from the same task. A request then costs no pool lookup, no key hashing, no hand-off to another task and no
//! cross-task wake-up: the caller's connection and its upstream connection are polled together by one
//! [`Paired`] future.
//!
//! The upstream connection is opened at the caller's first request and replaced when it closes. Anything that
//! does not fit stays on the shared pool: HTTP/2 callers (they multiplex), upstreams that negotiate HTTP/2 by
//! ALPN, replays after a 401, and a request whose affine connection closed before the request was written
//! (hyper hands such a request back, and it goes to the pool instead of failing).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::client::legacy::connect::Connection;
use tower_service::Service;

use crate::headers::{fit_to_upstream_version, unframed_body};
use crate::replay::ForwardBody;
use crate::upstream::Connector;

type ConnFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Why the affine path did not answer a request.
pub(crate) enum Miss {
    /// Not sent: send it on the pool (boxed: this path is rare, the enum stays small).
    Unsent(Box<Request<ForwardBody>>),
    /// Sent, and the exchange failed.
    Failed(hyper::Error),
    /// No affine connection could be opened (connect or TLS failure).
    Connect(Box<dyn std::error::Error + Send + Sync>),
}

/// The state one caller connection shares between its requests and its [`Paired`] driver.
#[derive(Default)]
pub(crate) struct Affinity {
    /// The upstream connection's sender while no request is using it. HTTP/1.1 serves one request at a time
    /// per connection, so this lock is never contended: it only moves the sender in and out.
    sender: Mutex<Option<http1::SendRequest<ForwardBody>>>,
    /// A newly opened upstream connection, waiting for the driver to adopt it.
    pending: Mutex<Option<ConnFuture>>,
    has_pending: AtomicBool,
}

impl Affinity {
    /// Sends `req` (absolute-form URI) on this caller's upstream connection, opening one if needed, with
    /// `host` (the upstream's) as its `Host`: the connection is HTTP/1.1.
    pub(crate) async fn send(
        &self,
        connector: &Connector,
        host: &HeaderValue,
        mut req: Request<ForwardBody>,
    ) -> Result<Response<Incoming>, Miss> {
        let cached = self.sender.lock().unwrap_or_else(|p| p.into_inner()).take();
        let mut sender = match cached.filter(|s| !s.is_closed()) {
            Some(s) => s,
            // Boxed: opening (connect and handshake) happens once per connection, and inline it would make
            // every request's future several KiB larger, all of it copied on each request.
            None => match Box::pin(self.open(connector, req.uri().clone())).await? {
                Some(s) => s,
                None => return Err(Miss::Unsent(Box::new(req))),
            },
        };
        if std::future::poll_fn(|cx| sender.poll_ready(cx)).await.is_err() {
            return Err(Miss::Unsent(Box::new(req)));
        }
        // This connection is HTTP/1.1: the upstream's Host, and chunked framing for a GET body of unknown length.
        // A request handed back unsent is fitted again for the pool's connection.
        let unframed = unframed_body(req.method(), req.body());
        fit_to_upstream_version(req.headers_mut(), Version::HTTP_11, Some(host), unframed);
        // hyper's connection-level client writes the target as given: send it in origin form, and keep the
        // absolute form for the pool in case the request comes back unsent.
        let absolute = req.uri().clone();
        if let Some(pq) = absolute.path_and_query() {
            *req.uri_mut() = Uri::from(pq.clone());
        }
        match sender.try_send_request(req).await {
            Ok(resp) => {
                *self.sender.lock().unwrap_or_else(|p| p.into_inner()) = Some(sender);
                Ok(resp)
            }
            Err(mut e) => match e.take_message() {
                Some(mut req) => {
                    *req.uri_mut() = absolute;
                    Err(Miss::Unsent(Box::new(req)))
                }
                None => Err(Miss::Failed(e.into_error())),
            },
        }
    }

    /// Opens an upstream connection; `None` when the upstream speaks HTTP/2 (the pool multiplexes that better;
    /// the connector has noted it, so later requests go to the pool at once).
    async fn open(&self, connector: &Connector, uri: Uri) -> Result<Option<http1::SendRequest<ForwardBody>>, Miss> {
        let io = connector.clone().call(uri).await.map_err(Miss::Connect)?;
        if io.connected().is_negotiated_h2() {
            return Ok(None);
        }
        let (sender, conn) = http1::handshake(io).await.map_err(Miss::Failed)?;
        *self.pending.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::pin(async move {
            let _ = conn.await;
        }));
        self.has_pending.store(true, Ordering::Release);
        Ok(Some(sender))
    }

    fn take_pending(&self) -> Option<ConnFuture> {
        if !self.has_pending.swap(false, Ordering::AcqRel) {
            return None;
        }
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

pin_project_lite::pin_project! {
    /// Drives a caller connection and its affine upstream connection in one task.
    pub(crate) struct Paired<S> {
        #[pin]
        server: S,
        client: Option<ConnFuture>,
        affinity: Arc<Affinity>,
    }
}

impl<S> Paired<S> {
    /// Pairs `server` (the caller's connection) with whatever upstream connection `affinity` opens.
    pub(crate) fn new(server: S, affinity: Arc<Affinity>) -> Self {
        Self {
            server,
            client: None,
            affinity,
        }
    }
}

impl<S: Future> Future for Paired<S> {
    type Output = S::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<S::Output> {
        let this = self.project();
        let done = this.server.poll(cx);
        if let Some(new) = this.affinity.take_pending() {
            // A newer upstream connection replaces a closed one.
            *this.client = Some(new);
        }
        if let Some(client) = this.client.as_mut() {
            if client.as_mut().poll(cx).is_ready() {
                *this.client = None;
            }
        }
        // When the caller's connection ends, dropping `self` closes its upstream connection.
        done
    }
}
