//! The errors the proxy itself answers with: one enum for the request path, mapped to a status, a stable code,
//! and the contract's JSON body with the `x-zapsign-proxy-error` header, so callers can tell them apart from
//! ZapSign's own errors.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};
use http_body_util::Full;

/// `x-zapsign-proxy-error`: present on every response the proxy makes up itself.
pub static X_ZAPSIGN_PROXY_ERROR: HeaderName = HeaderName::from_static("x-zapsign-proxy-error");

/// An error and its causes as one line. Used for upstream and auth failures: hyper, rustls and reqwest errors
/// never carry request headers or bodies, so no secret reaches the line.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// What went wrong towards the upstream (a response timeout is [`ProxyError::UpstreamTimeout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// TCP connect refused, unreachable or timed out, or the TLS handshake failed.
    Connect,
    /// The connection broke or the upstream spoke invalid HTTP.
    Protocol,
}

impl From<UpstreamFailure> for crate::metrics::UpstreamErrorKind {
    fn from(kind: UpstreamFailure) -> Self {
        match kind {
            UpstreamFailure::Connect => Self::Connect,
            UpstreamFailure::Protocol => Self::Protocol,
        }
    }
}

impl UpstreamFailure {
    /// The word for the error message.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Protocol => "protocol",
        }
    }
}

/// An error the proxy answers itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request cannot be forwarded as sent.
    #[error("{0}")]
    BadRequest(&'static str),
    /// The caller's address or path is not allowed.
    #[error("{0}")]
    Forbidden(&'static str),
    /// Client keys are configured and the caller sent none or a wrong one.
    #[error("this proxy requires a client key: send `Proxy-Authorization: Bearer <key>` with a key from access.client_keys_file")]
    ProxyAuthRequired,
    /// The upstream could not be reached or broke the exchange.
    #[error("the ZapSign upstream could not be reached ({kind}): {detail}", kind = .kind.as_str())]
    UpstreamUnreachable {
        /// Connect or protocol.
        kind: UpstreamFailure,
        /// The underlying error, already free of secrets.
        detail: String,
    },
    /// No valid token is held.
    #[error("no valid ZapSign token is available yet ({reason}); retry after {retry_after:?}")]
    TokenUnavailable {
        /// Why, e.g. "login rate-limited".
        reason: String,
        /// When a token may be there.
        retry_after: Duration,
    },
    /// Pacing: no slot within `pacing.max_wait`, or `pacing.queue_limit` requests already wait (429
    /// `rate_limited`), or shutdown's grace ended the wait (503 `shutting_down`). Nothing was sent upstream.
    #[error("{0}")]
    RateLimited(crate::pacing::Refused),
    /// The upstream did not send response headers within `upstream.response_timeout`.
    #[error("the ZapSign upstream sent no response headers within upstream.response_timeout ({timeout:?})")]
    UpstreamTimeout {
        /// The timeout that fired.
        timeout: Duration,
    },
}

impl ProxyError {
    /// The HTTP status the caller gets.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::ProxyAuthRequired => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            Self::UpstreamUnreachable { .. } => StatusCode::BAD_GATEWAY,
            Self::RateLimited(crate::pacing::Refused::ShuttingDown) => StatusCode::SERVICE_UNAVAILABLE,
            Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::TokenUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The stable code in the body and the `x-zapsign-proxy-error` header.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::Forbidden(_) => "forbidden",
            Self::ProxyAuthRequired => "proxy_auth_required",
            Self::UpstreamUnreachable { .. } => "upstream_unreachable",
            Self::RateLimited(crate::pacing::Refused::ShuttingDown) => "shutting_down",
            Self::RateLimited(_) => "rate_limited",
            Self::TokenUnavailable { .. } => "token_unavailable",
            Self::UpstreamTimeout { .. } => "upstream_timeout",
        }
    }

    /// The contract's response: JSON body `{"error", "message"}`, `x-zapsign-proxy-error`, and `Retry-After`
    /// for 503 and 429 (whole seconds, rounded up, at least 1).
    pub fn to_response(&self) -> Response<Full<Bytes>> {
        let body = serde_json::json!({ "error": self.code(), "message": self.to_string() });
        let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(X_ZAPSIGN_PROXY_ERROR.clone(), HeaderValue::from_static(self.code()));
        if let Self::TokenUnavailable { retry_after, .. } = self {
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            h.insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        if let Self::RateLimited(refused) = self {
            h.insert(RETRY_AFTER, HeaderValue::from(refused.retry_after_secs()));
        }
        if let Self::BadRequest(_) = self {
            // After a request we refused to parse or route, nothing later on this connection is trusted.
            h.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Self::ProxyAuthRequired = self {
            h.insert(http::header::PROXY_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// The config error for a static API token that cannot be an HTTP header value.
pub fn unusable_api_token() -> crate::config::ConfigError {
    crate::config::ConfigError::Invalid {
        key: "auth.api_token".into(),
        problem: "the token holds characters an HTTP header cannot carry".into(),
        fix: "copy the token again from Settings > Integrations > ZapSign API".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_json(resp: Response<Full<Bytes>>) -> serde_json::Value {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn each_error_maps_to_contract_status_code_and_body() {
        let cases = [
            (ProxyError::BadRequest("x"), 400, "bad_request"),
            (ProxyError::Forbidden("x"), 403, "forbidden"),
            (ProxyError::ProxyAuthRequired, 407, "proxy_auth_required"),
            (
                ProxyError::UpstreamUnreachable {
                    kind: UpstreamFailure::Connect,
                    detail: "refused".into(),
                },
                502,
                "upstream_unreachable",
            ),
            (
                ProxyError::TokenUnavailable {
                    reason: "login failing".into(),
                    retry_after: Duration::from_millis(1500),
                },
                503,
                "token_unavailable",
            ),
            (
                ProxyError::RateLimited(crate::pacing::Refused::TimedOut {
                    max_wait: Duration::from_secs(30),
                    retry_after: Duration::from_millis(1500),
                }),
                429,
                "rate_limited",
            ),
            (
                ProxyError::RateLimited(crate::pacing::Refused::ShuttingDown),
                503,
                "shutting_down",
            ),
            (
                ProxyError::UpstreamTimeout {
                    timeout: Duration::from_secs(2),
                },
                504,
                "upstream_timeout",
            ),
        ];
        for (err, status, code) in cases {
            let resp = err.to_response();
            assert_eq!(resp.status().as_u16(), status);
            assert_eq!(resp.headers()[&X_ZAPSIGN_PROXY_ERROR], code);
            if code == "shutting_down" {
                assert_eq!(resp.headers()[RETRY_AFTER], "1");
            } else if status == 503 || status == 429 {
                assert_eq!(resp.headers()[RETRY_AFTER], "2");
            }
            let json = body_json(resp).await;
            assert_eq!(json["error"], code);
            assert!(json["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
    }

    #[test]
    fn timeout_message_names_the_timeout_and_duration() {
        let msg = ProxyError::UpstreamTimeout {
            timeout: Duration::from_secs(2),
        }
        .to_string();
        assert!(msg.contains("upstream.response_timeout") && msg.contains("2s"), "{msg}");
    }
}
