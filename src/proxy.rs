//! The per-request service: checks the caller, rewrites the request (target, hop-by-hop headers, Host,
//! forwarding headers, the injected token), streams it to the upstream and streams the answer back; in JWT
//! mode, renews the token and replays the request once when the upstream answers 401.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tracing::{warn, Instrument};

use arc_swap::ArcSwap;

use crate::access::AccessPolicy;
use crate::affinity::{AffinePool, Affinity, Miss};
use crate::auth::holder::TokenUnavailable;
use crate::auth::renewer::{Renewer, Trigger};
use crate::auth::{Token, TokenHolder};
use crate::busy::CallerBody;
use crate::config::BaseUrl;
use crate::error::UpstreamFailure;
use crate::error::{error_chain, ProxyError};
use crate::headers::{ensure_request_id, fit_to_upstream_version, remove_hop_by_hop, unframed_body, X_REQUEST_ID};
use crate::logging;
use crate::metrics::{Metrics, RateLimitedBy, UpstreamErrorKind};
use crate::pacing::{CallerId, Pacer, Refused};
use crate::paired::Pair;
use crate::replay::{ForwardBody, ReplayBudget, ReplayHead};
use crate::rewrite::{rewrite_head, upstream_target, RewriteContext};
use crate::tasks::Tasks;
use crate::upstream::{classify, Connector, UpstreamClient};

mod retry;
pub(crate) mod setup;

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
    /// Knows whether the upstream negotiated HTTP/2 (then affinity is pointless: the pool multiplexes).
    connector: Connector,
    /// Upstream HTTP/1.1 connections lent to caller connections, and the idle ones kept warm between callers.
    affine: Arc<AffinePool>,
    /// The current token.
    holder: Arc<TokenHolder>,
    /// JWT mode: renews tokens; `None` in static mode, where a 401 passes through.
    renewer: Option<Arc<Renewer>>,
    /// The account's budget (`pacing.*`); `None` when `pacing.limit = 0`.
    pacer: Option<Arc<Pacer>>,
    /// The state shared with other replicas (`shared.*`), kept here so a reload can swap its Redis client.
    shared: Option<Arc<crate::shared::state::SharedState>>,
    /// `auth.timeout`: how long a body may take to come back from a refused exchange (401 or 429) to be sent
    /// again.
    body_return_timeout: Duration,
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
    /// The connection's deadline (HTTP/1.1 callers), which keeps `upstream.response_timeout` for its requests;
    /// `None`: a timer per request (HTTP/2 streams).
    pub(crate) pair: Option<Arc<Pair>>,
}

impl CallerConn {
    /// The per-connection state for `peer`.
    pub(crate) fn new(
        peer: SocketAddr,
        proto: &'static str,
        affinity: Option<Arc<Affinity>>,
        pair: Option<Arc<Pair>>,
    ) -> Self {
        Self {
            peer,
            proto,
            client_value: crate::headers::client_value(peer.ip().to_canonical()),
            affinity,
            pair,
        }
    }
}

/// One request's context beyond its head: the caller connection's affine upstream connection, and what the
/// access log line says about the request once it is answered.
#[derive(Default)]
struct RequestContext<'a> {
    /// The caller connection's own upstream connection (HTTP/1.1 callers).
    affinity: Option<&'a Affinity>,
    /// The caller connection's deadline (HTTP/1.1 callers).
    pair: Option<&'a Pair>,
    /// The id of the client key the caller presented.
    key_id: Option<Arc<str>>,
    /// Time from sending upstream until the response head arrived (the last attempt, when replayed).
    upstream: Option<Duration>,
    /// Whether the access log is on, so the upstream latency is worth a clock read.
    timed: bool,
}

impl Proxy {
    /// Shutdown's grace is over: requests still waiting for a pacing slot are answered 503 `shutting_down` now,
    /// rather than cut off with their connection (the contract: queued requests keep their place until
    /// `server.shutdown_grace`, then get 503).
    pub(crate) fn refuse_waiting(&self) {
        if let Some(pacer) = &self.pacer {
            pacer.close();
        }
    }

    /// `upstream.response_timeout`, for the deadline of each caller connection.
    pub(crate) fn response_timeout(&self) -> Duration {
        self.response_timeout
    }

    /// Serves one request from the caller on `conn`. Never fails: every error becomes the contract's JSON
    /// answer.
    pub(crate) async fn handle(&self, req: Request<CallerBody>, conn: &CallerConn) -> Response<ResponseBody> {
        let peer = conn.peer;
        let start = Instant::now();
        let (mut parts, body) = req.into_parts();
        let request_id = ensure_request_id(&mut parts.headers);
        let span = logging::request_span(&request_id, &parts.method, parts.uri.path());
        let mut ctx = RequestContext {
            affinity: conn.affinity.as_deref(),
            pair: conn.pair.as_deref(),
            timed: tracing::enabled!(tracing::Level::INFO),
            ..RequestContext::default()
        };
        let forwarded = self
            .forward(parts, body, conn, start, &request_id, &mut ctx)
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
        logging::served(
            &span,
            logging::Served {
                status: resp.status().as_u16(),
                elapsed,
                upstream: ctx.upstream,
                client: peer.ip(),
                key_id: ctx.key_id.as_deref(),
                refused: refused.as_ref(),
            },
        );
        resp
    }

    async fn forward(
        &self,
        mut parts: Parts,
        body: CallerBody,
        conn: &CallerConn,
        now: Instant,
        request_id: &HeaderValue,
        ctx: &mut RequestContext<'_>,
    ) -> Result<Response<Incoming>, ProxyError> {
        ctx.key_id = self.access.load().check(&parts, conn.peer)?;
        // The target is checked before the token is fetched: a request refused with 400 never waits for a login.
        let target = upstream_target(&parts, &self.upstream)?;
        let token = self.token(now).await?;
        let rewrite = RewriteContext {
            authorization: &token.header,
            client: &conn.client_value,
            proto: conn.proto,
            request_id,
        };
        rewrite_head(&mut parts, target, &rewrite);
        let pacer = self.pacer.as_deref();
        if self.renewer.is_none() && pacer.is_none() {
            // Static mode without pacing: nothing is ever sent twice, so nothing of the body is kept.
            return self
                .send(Request::from_parts(parts, ForwardBody::Plain(body)), ctx)
                .await;
        }
        let caller = pacer.map(|_| match &ctx.key_id {
            Some(key) => CallerId::Key(key.clone()),
            None => CallerId::Ip(conn.peer.ip().to_canonical()),
        });
        // What a replay needs, kept at the lowest cost measured (`benches/jwt_vs_static.rs`): the head packed in
        // one buffer without the token, the body's chunks by reference as they stream (nothing for no body).
        let (body, sent_body) = ForwardBody::tee(body, self.replay_limit, &self.replay_budget);
        let head = ReplayHead::keep(&parts);
        let paced_from = Instant::now();
        let resp = self
            .paced_send(Request::from_parts(parts, body), caller.as_ref(), ctx)
            .await?;
        match (resp.status(), &self.renewer, pacer) {
            // Boxed: the replay path is rare and large; inline it would grow every request's future.
            (StatusCode::UNAUTHORIZED, Some(renewer), _) => {
                Box::pin(self.replay_after_401(resp, head, sent_body, token.generation, renewer, caller.as_ref(), ctx))
                    .await
            }
            (StatusCode::TOO_MANY_REQUESTS, _, Some(pacer)) => {
                let kept = (head, sent_body, &token.header);
                Box::pin(self.resend_after_429(resp, kept, pacer, caller.as_ref(), paced_from, ctx)).await
            }
            _ => Ok(resp),
        }
    }

    /// Sends `req` once pacing grants it a slot (at once without pacing). A refusal sends nothing and answers
    /// 429 `rate_limited`; an upstream 429 pauses the pacer until the upstream's `Retry-After` (or the next
    /// period boundary), so nothing more is sent before it ends.
    async fn paced_send(
        &self,
        req: Request<ForwardBody>,
        caller: Option<&CallerId>,
        ctx: &mut RequestContext<'_>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let (Some(pacer), Some(caller)) = (self.pacer.as_deref(), caller) else {
            return self.send(req, ctx).await;
        };
        match pacer.acquire(caller).await {
            Ok(granted) => self.metrics.pacing_wait(granted.waited),
            Err(refused) => {
                if refused != Refused::ShuttingDown {
                    self.metrics.rate_limited(RateLimitedBy::Proxy);
                }
                return Err(ProxyError::RateLimited(refused));
            }
        }
        let resp = self.send(req, ctx).await?;
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            self.metrics.rate_limited(RateLimitedBy::Upstream);
            let retry_after = retry_after_secs(resp.headers());
            pacer.pause_after_upstream_429(retry_after);
            warn!(
                retry_after_s = retry_after.map(|d| d.as_secs()),
                "ZapSign answered 429: pausing every request until its rate limit window ends"
            );
        }
        Ok(resp)
    }

    /// The token to inject; in JWT mode a missing one is renewed (or waited for) first.
    async fn token(&self, now: Instant) -> Result<Arc<Token>, ProxyError> {
        match self.holder.bearer(now) {
            Ok(token) => Ok(token),
            Err(err) => match &self.renewer {
                // Boxed: rare (no valid token), and it keeps the common path's future small.
                Some(renewer) => Box::pin(renewer.renew(Trigger::Missing))
                    .await
                    .map_err(token_unavailable),
                None => Err(token_unavailable(err)),
            },
        }
    }

    async fn send(
        &self,
        req: Request<ForwardBody>,
        ctx: &mut RequestContext<'_>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let sent = Instant::now();
        // HTTP/1.1 callers: the connection's one deadline keeps the response timeout (no timer per request).
        let result = match ctx.pair {
            Some(pair) => pair.until_overdue(sent, self.exchange(req, ctx.affinity)).await,
            None => tokio::time::timeout(self.response_timeout, self.exchange(req, ctx.affinity))
                .await
                .ok(),
        };
        ctx.upstream = ctx.timed.then(|| sent.elapsed());
        match result {
            None => {
                self.metrics.upstream_error(UpstreamErrorKind::Timeout);
                Err(ProxyError::UpstreamTimeout {
                    timeout: self.response_timeout,
                })
            }
            Some(Err(err)) => {
                if let ProxyError::UpstreamUnreachable { kind, .. } = &err {
                    self.metrics.upstream_error((*kind).into());
                }
                Err(err)
            }
            Some(Ok(resp)) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                // The proxy never asks for an upgrade (it strips `Upgrade`): a 101 is the upstream breaking HTTP.
                self.metrics.upstream_error(UpstreamErrorKind::Protocol);
                Err(ProxyError::UpstreamUnreachable {
                    kind: UpstreamFailure::Protocol,
                    detail: "the upstream switched protocols without being asked".into(),
                })
            }
            Some(Ok(mut resp)) => {
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
                match affinity.send(&self.affine, &self.upstream.host_header, req).await {
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
}

/// The upstream's `Retry-After`: whole seconds (ZapSign's form) or an HTTP date (RFC 9110 allows both; a date
/// in the past means now). Anything else is ignored, and the pause then runs to the next period boundary.
fn retry_after_secs(headers: &HeaderMap) -> Option<Duration> {
    retry_after_at(headers, std::time::SystemTime::now())
}

/// [`retry_after_secs`] with the wall clock's `now` given, for the tests.
fn retry_after_at(headers: &HeaderMap, now: std::time::SystemTime) -> Option<Duration> {
    let text = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The holder's (or renewer's) "no token" as the contract's 503 `token_unavailable`, with its `Retry-After`.
fn token_unavailable(e: TokenUnavailable) -> ProxyError {
    ProxyError::TokenUnavailable {
        reason: e.reason,
        retry_after: e.retry_after,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upstreams_retry_after_counts_as_seconds_or_an_http_date() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(http::header::RETRY_AFTER, HeaderValue::from_str(v).unwrap());
            retry_after_at(&h, now)
        };
        assert_eq!(with("7"), Some(Duration::from_secs(7)));
        assert_eq!(with(" 0 "), Some(Duration::ZERO));
        assert_eq!(with("Wed, 21 Oct 2015 07:28:42 GMT"), Some(Duration::from_secs(42)));
        assert_eq!(
            with("Wed, 21 Oct 2015 07:27:00 GMT"),
            Some(Duration::ZERO),
            "a date past is now"
        );
        assert_eq!(with("soon"), None);
        assert_eq!(with("-1"), None);
        assert_eq!(retry_after_secs(&HeaderMap::new()), None);
    }
}
