//! The per-request service: checks the caller, rewrites the request (target, hop-by-hop headers, Host,
//! forwarding headers, the injected token), streams it to the upstream and streams the answer back; in JWT
//! mode, renews the token and replays the request once when the upstream answers 401.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;
use http::header::HOST;
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tokio::sync::oneshot;
use tracing::{info, info_span, warn, Instrument};

use arc_swap::ArcSwap;

use crate::access::AccessPolicy;
use crate::affinity::{Affinity, Miss};
use crate::auth::renewer::{Renewer, Trigger};
use crate::auth::{Token, TokenHolder};
use crate::config::BaseUrl;
use crate::error::UpstreamFailure;
use crate::error::{error_chain, ProxyError};
use crate::headers::{
    ensure_request_id, fit_to_upstream_version, remove_hop_by_hop, set_authorization, set_forwarding_for,
    strip_api_token, unframed_body, X_REQUEST_ID,
};
use crate::metrics::Metrics;
use crate::replay::{ForwardBody, ReplayBudget, Returned};
use crate::tasks::Tasks;
use crate::upstream::{classify, Connector, UpstreamClient};

mod setup;

pub(crate) use setup::credentials;

/// The body of every response the proxy sends: the upstream's, streamed, or the proxy's own JSON error.
pub type ResponseBody = Either<Incoming, Full<Bytes>>;

/// State shared by every request; built once at start by [`Proxy::new`], changed only by [`Proxy::reload`].
pub struct Proxy {
    /// Where requests go.
    upstream: BaseUrl,
    /// `upstream.response_timeout`.
    response_timeout: Duration,
    /// The pooled upstream client.
    client: UpstreamClient<ForwardBody>,
    /// Opens affine upstream connections; knows whether the upstream negotiated HTTP/2 (then affinity is
    /// pointless: the pool multiplexes).
    connector: Connector,
    /// The current token.
    holder: Arc<TokenHolder>,
    /// JWT mode: renews tokens; `None` in static mode, where a 401 passes through.
    renewer: Option<Arc<Renewer>>,
    /// `auth.replay_buffer`.
    replay_limit: u64,
    /// Bytes kept for replays across all requests.
    replay_budget: Arc<ReplayBudget>,
    /// Caller checks; swapped whole on reload.
    access: ArcSwap<AccessPolicy>,
    /// Counters.
    metrics: Arc<Metrics>,
    /// Where the proxy starts background work (a renewal after an unreplayable 401), so it ends with `run`.
    tasks: Tasks,
}

/// What a caller connection gives each of its requests; built once per connection.
pub(crate) struct CallerConn {
    /// The caller's address.
    pub(crate) peer: SocketAddr,
    /// `"http"` or `"https"`: how the caller reached us.
    pub(crate) proto: &'static str,
    /// The caller's IP as a header value, for `X-Forwarded-For`.
    pub(crate) client_value: HeaderValue,
    /// The connection's own upstream connection (HTTP/1.1 callers); `None` uses the pool.
    pub(crate) affinity: Option<Arc<Affinity>>,
}

impl CallerConn {
    /// The per-connection state for `peer`.
    pub(crate) fn new(peer: SocketAddr, proto: &'static str, affinity: Option<Arc<Affinity>>) -> Self {
        Self {
            peer,
            proto,
            client_value: crate::headers::client_value(peer.ip().to_canonical()),
            affinity,
        }
    }
}

/// Per-request state beyond the head: the caller connection's affine upstream, and what the access log says.
#[derive(Default)]
struct Outcome<'a> {
    /// The caller connection's own upstream connection (HTTP/1.1 callers).
    affinity: Option<&'a Affinity>,
    /// The id of the client key the caller presented.
    key_id: Option<Arc<str>>,
    /// Time from sending upstream until the response head arrived (the last attempt, when replayed).
    upstream: Option<Duration>,
    /// Whether the access log is on, so the upstream latency is worth a clock read.
    timed: bool,
}

/// What a replay needs of the request head.
struct Head {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

impl Head {
    fn of(parts: &Parts) -> Self {
        Self {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            headers: parts.headers.clone(),
        }
    }

    fn into_request(self, body: ForwardBody) -> Request<ForwardBody> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.headers_mut() = self.headers;
        *req.version_mut() = Version::HTTP_11;
        req
    }
}

impl Proxy {
    /// Serves one request from the caller on `conn`. Never fails: every error becomes the contract's JSON
    /// answer.
    pub(crate) async fn handle(&self, req: Request<Incoming>, conn: &CallerConn) -> Response<ResponseBody> {
        let peer = conn.peer;
        let start = Instant::now();
        let (mut parts, body) = req.into_parts();
        let request_id = ensure_request_id(&mut parts.headers);
        // The path only: the query may hold a legacy `api_token`.
        let span = info_span!(
            "request",
            id = request_id.to_str().unwrap_or("-"),
            method = %parts.method,
            path = parts.uri.path(),
        );
        let mut outcome = Outcome {
            affinity: conn.affinity.as_deref(),
            timed: tracing::enabled!(tracing::Level::INFO),
            ..Outcome::default()
        };
        let forwarded = self
            .forward(parts, body, conn, start, &request_id, &mut outcome)
            .instrument(span.clone())
            .await;
        let (mut resp, refused) = match forwarded {
            Ok(resp) => (resp.map(Either::Left), None),
            Err(err) => {
                // A failure of the proxy or the upstream (5xx) is what operators alert on: `warn`. A caller's
                // error (4xx) is the caller's business, told in its access line at `info`, so a hostile caller
                // cannot flood the level operators watch.
                if err.status().is_server_error() {
                    span.in_scope(|| warn!(error = err.code(), "{err}"));
                }
                (err.to_response().map(Either::Right), Some(err))
            }
        };
        resp.headers_mut().insert(X_REQUEST_ID.clone(), request_id);
        let elapsed = start.elapsed();
        self.metrics.request(resp.status().as_u16(), elapsed);
        span.in_scope(|| {
            info!(
                status = resp.status().as_u16(),
                duration_us = elapsed.as_micros() as u64,
                upstream_us = outcome.upstream.map(|d| d.as_micros() as u64),
                client = %peer.ip(),
                key_id = outcome.key_id.as_deref(),
                error = refused.as_ref().map(ProxyError::code),
                reason = refused.as_ref().map(tracing::field::display),
                "served"
            )
        });
        resp
    }

    async fn forward(
        &self,
        mut parts: Parts,
        body: Incoming,
        conn: &CallerConn,
        now: Instant,
        request_id: &HeaderValue,
        outcome: &mut Outcome<'_>,
    ) -> Result<Response<Incoming>, ProxyError> {
        outcome.key_id = self.access.load().check(&parts, conn.peer)?;
        let path_and_query = self.target(&parts)?;
        let token = self.token(now).await?;
        let caller_host = caller_host(&parts);
        remove_hop_by_hop(&mut parts.headers);
        // Written again after the hop-by-hop removal: `Connection: x-request-id` must not strip our id.
        parts.headers.insert(X_REQUEST_ID.clone(), request_id.clone());
        set_authorization(&mut parts.headers, &token.header);
        // The caller's Host never chooses or reaches anything upstream. The upstream's goes on in `exchange`,
        // once the connection's HTTP version is known: as `Host` over HTTP/1.1, only as `:authority` over HTTP/2.
        parts.headers.remove(HOST);
        set_forwarding_for(&mut parts.headers, &conn.client_value, conn.proto, caller_host);
        parts.uri = self.upstream_uri(path_and_query)?;
        parts.version = Version::HTTP_11;
        let Some(renewer) = &self.renewer else {
            return self
                .send(Request::from_parts(parts, ForwardBody::Plain(body)), outcome)
                .await;
        };
        let (body, returned) = ForwardBody::tee(body, self.replay_limit, &self.replay_budget);
        let head = Head::of(&parts);
        let resp = self.send(Request::from_parts(parts, body), outcome).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        // Boxed: the replay path is rare and large; inline it would grow every request's future.
        Box::pin(self.replay_after_401(resp, head, returned, token.generation, renewer, outcome)).await
    }

    /// The token to inject; in JWT mode a missing one is renewed (or waited for) first.
    async fn token(&self, now: Instant) -> Result<Arc<Token>, ProxyError> {
        match self.holder.bearer(now) {
            Ok(token) => Ok(token),
            Err(err) => match &self.renewer {
                // Boxed: rare (no valid token), and it keeps the common path's future small.
                Some(renewer) => Box::pin(renewer.renew(Trigger::Missing)).await,
                None => Err(err),
            },
        }
    }

    /// The upstream refused the token: renew it once and send the request again, when every byte of the body
    /// is still at hand; otherwise pass the 401 on (and renew in the background for the next requests).
    ///
    /// The replay carries a token newer than the refused one or does not happen: the renewer answers a refusal
    /// with a newer token or a 503 (and drops the refused token), and the check here holds even if it did not.
    async fn replay_after_401(
        &self,
        first: Response<Incoming>,
        head: Head,
        returned: Option<oneshot::Receiver<Returned>>,
        generation: u64,
        renewer: &Arc<Renewer>,
        outcome: &mut Outcome<'_>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let body = match returned {
            None => Ok(ForwardBody::Empty),
            // hyper hands the body back by dropping it once it is done with it; an upstream that answered early
            // and keeps reading slowly must not hold the caller longer than `auth.timeout`.
            Some(rx) => match tokio::time::timeout(renewer.auth_timeout(), rx).await {
                Ok(Ok(kept)) if kept.replayable() => Ok(ForwardBody::replay(kept)),
                Ok(_) => Err("the body exceeded auth.replay_buffer"),
                Err(_) => Err("the body did not come back from the refused exchange within auth.timeout"),
            },
        };
        let body = match body {
            Ok(body) => body,
            Err(why) => {
                info!("upstream answered 401 and {why}; passing the 401 on");
                let renewer = renewer.clone();
                self.tasks.spawn(async move {
                    let _ = renewer.renew(Trigger::Rejected(generation)).await;
                });
                return Ok(first);
            }
        };
        let token = renewer.renew(Trigger::Rejected(generation)).await?;
        if token.generation <= generation {
            // Never send ZapSign the token it just refused.
            return Err(ProxyError::TokenUnavailable {
                reason: "ZapSign refused the token and no newer one is available yet".to_owned(),
                retry_after: Duration::from_secs(1),
            });
        }
        drop(first);
        let mut req = head.into_request(body);
        set_authorization(req.headers_mut(), &token.header);
        self.metrics.replay();
        info!(
            generation = token.generation,
            "replaying after an upstream 401 with a renewed token"
        );
        // A replay goes over the pool: the affine connection may still be finishing the refused exchange.
        outcome.affinity = None;
        self.send(req, outcome).await
    }

    async fn send(
        &self,
        req: Request<ForwardBody>,
        outcome: &mut Outcome<'_>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let sent = outcome.timed.then(Instant::now);
        let result = tokio::time::timeout(self.response_timeout, self.exchange(req, outcome.affinity)).await;
        outcome.upstream = sent.map(|s| s.elapsed());
        match result {
            Err(_) => {
                self.metrics.upstream_error(None);
                Err(ProxyError::UpstreamTimeout {
                    timeout: self.response_timeout,
                })
            }
            Ok(Err(err)) => {
                if let ProxyError::UpstreamUnreachable { kind, .. } = &err {
                    self.metrics.upstream_error(Some(*kind));
                }
                Err(err)
            }
            Ok(Ok(resp)) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                // The proxy never asks for an upgrade (it strips `Upgrade`): a 101 is the upstream breaking HTTP.
                self.metrics.upstream_error(Some(UpstreamFailure::Protocol));
                Err(ProxyError::UpstreamUnreachable {
                    kind: UpstreamFailure::Protocol,
                    detail: "the upstream switched protocols without being asked".into(),
                })
            }
            Ok(Ok(mut resp)) => {
                remove_hop_by_hop(resp.headers_mut());
                Ok(resp)
            }
        }
    }

    /// One exchange with the upstream: on the caller connection's own upstream connection when it has one,
    /// else (or when that connection closed before the request went out) on the pool.
    async fn exchange(
        &self,
        req: Request<ForwardBody>,
        affinity: Option<&Affinity>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let mut req = match affinity {
            Some(affinity) if !self.connector.negotiated_h2() => {
                match affinity.send(&self.connector, &self.upstream.host_header, req).await {
                    Ok(resp) => return Ok(resp),
                    Err(Miss::Unsent(req)) => *req,
                    Err(Miss::Failed(e)) if caller_body_failed(&e) => return Err(CALLER_BODY_FAILED),
                    Err(Miss::Failed(e)) => {
                        return Err(ProxyError::UpstreamUnreachable {
                            kind: UpstreamFailure::Protocol,
                            detail: error_chain(&e),
                        })
                    }
                    Err(Miss::Connect(e)) => {
                        return Err(ProxyError::UpstreamUnreachable {
                            kind: UpstreamFailure::Connect,
                            detail: error_chain(&*e),
                        })
                    }
                }
            }
            _ => req,
        };
        // The pool picks the connection (and so the HTTP version) inside `request`: it writes the upstream's
        // Host itself on HTTP/1.1, so none goes in here; the chunked marker follows the upstream's ALPN choice.
        let unframed = unframed_body(req.method(), req.body());
        fit_to_upstream_version(req.headers_mut(), self.connector.pool_version(), None, unframed);
        self.client.request(req).await.map_err(|e| {
            if caller_body_failed(&e) {
                CALLER_BODY_FAILED
            } else {
                classify(e)
            }
        })
    }

    /// The path and query to send upstream. Refuses `CONNECT` and absolute-form targets naming any other
    /// authority, so the token never goes anywhere but the upstream (RFC 9112 §3.2.2: a server must accept
    /// absolute-form; we accept it only for the upstream itself and forward it in origin form).
    fn target(&self, parts: &Parts) -> Result<PathAndQuery, ProxyError> {
        if parts.method == Method::CONNECT {
            return Err(ProxyError::BadRequest(
                "CONNECT is not supported: this proxy only forwards requests to the ZapSign API",
            ));
        }
        // In HTTP/2 the authority is the `:authority` pseudo-header, the equivalent of Host: it never chooses
        // the destination. In HTTP/1.1 an authority in the URI means an absolute-form target.
        if parts.version != Version::HTTP_2 {
            if let Some(authority) = parts.uri.authority() {
                if !self.names_upstream(parts.uri.scheme(), authority) {
                    return Err(ProxyError::BadRequest(
                        "the request target names another host: send origin-form targets (/api/v1/...) to this proxy",
                    ));
                }
            }
        }
        let pq = parts
            .uri
            .path_and_query()
            .ok_or(ProxyError::BadRequest("the request has no path"))?;
        if !pq.path().starts_with('/') {
            return Err(ProxyError::BadRequest("the request path must start with /"));
        }
        match pq.query() {
            None => Ok(pq.clone()),
            Some(q) => match strip_api_token(q) {
                Some(kept) if kept.len() == q.len() => Ok(pq.clone()),
                Some(kept) => PathAndQuery::from_maybe_shared(Bytes::from(format!("{}?{kept}", pq.path())))
                    .map_err(|_| ProxyError::BadRequest("the request target is malformed")),
                None => PathAndQuery::from_maybe_shared(Bytes::copy_from_slice(pq.path().as_bytes()))
                    .map_err(|_| ProxyError::BadRequest("the request target is malformed")),
            },
        }
    }

    /// Whether an absolute-form authority is the upstream's: same host (case-insensitive), same port, no user info.
    fn names_upstream(&self, scheme: Option<&Scheme>, authority: &Authority) -> bool {
        if authority.as_str().contains('@') {
            return false;
        }
        let port = authority
            .port_u16()
            .unwrap_or(if scheme == Some(&Scheme::HTTPS) { 443 } else { 80 });
        authority.host().eq_ignore_ascii_case(self.upstream.authority.host()) && port == self.upstream.port()
    }

    fn upstream_uri(&self, path_and_query: PathAndQuery) -> Result<Uri, ProxyError> {
        // Built from parts, never from a string, so a path such as `//evil.example/x` stays a path.
        Uri::builder()
            .scheme(self.upstream.scheme.clone())
            .authority(self.upstream.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|_| ProxyError::BadRequest("the request target is malformed"))
    }
}

/// What the caller used to reach us: `Host`, or the HTTP/2 `:authority`.
fn caller_host(parts: &Parts) -> Option<HeaderValue> {
    parts.headers.get(HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    })
}

/// The caller's request body broke (malformed chunked framing, or the caller stopped sending): the caller's
/// fault, answered 400 and never counted as an upstream failure.
const CALLER_BODY_FAILED: ProxyError =
    ProxyError::BadRequest("the request body is malformed or the caller stopped sending it");

/// Whether hyper failed because reading the body we were forwarding failed: a "user body" error carrying the
/// caller's body error as its cause.
fn caller_body_failed(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(e);
    while let Some(err) = current {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            if h.is_user() && std::error::Error::source(h).is_some() {
                return true;
            }
        }
        current = err.source();
    }
    false
}
