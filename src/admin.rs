//! The admin listener: `/healthz` (the process serves), `/readyz` (a valid token is held) and `/metrics`
//! (Prometheus text). Kept apart from the caller listener so probes never pass the access checks
//! or count as proxied requests.

use std::convert::Infallible;
use std::sync::Arc;
use tokio::time::Instant;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::warn;

use crate::auth::holder::Readiness;
use crate::auth::TokenHolder;
use crate::metrics::{Metrics, TokenExpiry};
use crate::shutdown::ShutdownSignal;
use crate::tasks::Tasks;

/// Serves admin requests until `shutdown` starts. Connections are spawned on `tasks`: a scraper's
/// keep-alive connection still answers while callers drain, and is closed when `run` closes its tasks.
pub async fn serve(
    listener: TcpListener,
    holder: Arc<TokenHolder>,
    metrics: Arc<Metrics>,
    mut shutdown: ShutdownSignal,
    tasks: Tasks,
) {
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new());
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.stopped() => return,
        };
        let (holder, metrics) = (holder.clone(), metrics.clone());
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            service_fn(move |req| {
                let (holder, metrics) = (holder.clone(), metrics.clone());
                async move { Ok::<_, Infallible>(route(&req, &holder, &metrics)) }
            }),
        );
        tasks.spawn(async move {
            let _ = conn.await;
        });
    }
}

fn route<B>(req: &Request<B>, holder: &TokenHolder, metrics: &Metrics) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/healthz" => json(StatusCode::OK, serde_json::json!({ "status": "ok" })),
        "/readyz" => readyz(holder),
        "/metrics" => {
            let mut resp = Response::new(Full::new(Bytes::from(metrics.render(token_expiry(holder)))));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({ "error": "not_found", "message": "admin paths: /healthz, /readyz, /metrics" }),
        ),
    }
}

/// The token's time left, for `zapsign_proxy_token_expires_in_seconds`.
fn token_expiry(holder: &TokenHolder) -> TokenExpiry {
    match holder.readiness(Instant::now()) {
        Readiness::Ready { expires_in: Some(left) } => TokenExpiry::In(left),
        Readiness::Ready { expires_in: None } => TokenExpiry::Never,
        Readiness::NotReady(_) => TokenExpiry::NoToken,
    }
}

fn readyz(holder: &TokenHolder) -> Response<Full<Bytes>> {
    let now = Instant::now();
    match holder.readiness(now) {
        Readiness::Ready { expires_in } => json(
            StatusCode::OK,
            serde_json::json!({ "status": "ready", "token_expires_in_seconds": expires_in.map(|d| d.as_secs()) }),
        ),
        Readiness::NotReady(u) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({
                "status": "not_ready",
                "reason": u.reason,
                "retry_in_seconds": u.retry_at.saturating_duration_since(now).as_secs(),
            }),
        ),
    }
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}
