//! The ZapSign auth calls (`POST /api/v1/auth/token/{organization_id}/` and `/api/v1/auth/token-refresh/`) over
//! reqwest with the proxy's rustls trust, each outcome a typed [`AuthError`].
//!
//! How long one call may take (`auth.timeout`) is bounded by the renewer, which holds the single flight while the
//! call runs; this client bounds only the connect (`upstream.connect_timeout`).

use std::future::Future;
use std::time::Duration;

use reqwest::StatusCode;
use serde::Deserialize;

use crate::config::{JwtAuth, UpstreamConfig};
use crate::secret::Secret;

/// Tokens ZapSign handed out.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The access token.
    pub access: Secret,
    /// A refresh token: always from login; from refresh only when ZapSign sends a new one.
    pub refresh: Option<Secret>,
}

/// Why a login or refresh failed. Messages name what to check and never carry a secret.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    /// 401 on login.
    #[error("ZapSign rejected the login for organization {organization_id}, user {username}: check auth.organization_id, auth.username and the password (auth.password_file or ZAPSIGN_PASSWORD), and that the account is active in this environment ({url})")]
    BadCredentials {
        /// The organization id used.
        organization_id: String,
        /// The username used.
        username: String,
        /// The auth base URL (production and sandbox accounts differ).
        url: String,
    },
    /// 400 "Rate limit exceeded" (or 429) on login.
    #[error("ZapSign rate-limited the login; backing off")]
    RateLimited,
    /// 401 on refresh: the refresh token is dead; log in again.
    #[error("ZapSign rejected the refresh token (expired or revoked)")]
    RefreshRejected,
    /// Any other status, 5xx included.
    #[error("the ZapSign auth endpoint answered HTTP {status}")]
    Status {
        /// The status.
        status: u16,
    },
    /// A 200 whose body is not the documented JSON.
    #[error("the ZapSign auth endpoint answered a body without the expected tokens: {0}")]
    Malformed(String),
    /// No answer within a timeout.
    #[error("the ZapSign auth endpoint did not answer within {which} ({timeout:?}); raise {which} if the endpoint is reachable but this slow")]
    Timeout {
        /// The config key of the timeout.
        which: &'static str,
        /// Its value.
        timeout: Duration,
    },
    /// Connect, TLS or protocol failure.
    #[error("cannot reach the ZapSign auth endpoint: {0}")]
    Network(String),
}

#[derive(Deserialize)]
struct TokenBody {
    access: Option<String>,
    refresh: Option<String>,
}

/// The login credentials.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// Digits.
    pub organization_id: String,
    /// Username.
    pub username: String,
    /// Password.
    pub password: Secret,
}

impl From<&JwtAuth> for Credentials {
    /// The login credentials `auth.*` gives in JWT mode.
    fn from(jwt: &JwtAuth) -> Self {
        Self {
            organization_id: jwt.organization_id.clone(),
            username: jwt.username.clone(),
            password: jwt.password.clone(),
        }
    }
}

/// The two auth calls the renewer makes. [`AuthClient`] makes them over HTTP; the renewer's tests script them, so
/// its timing rules (backoff, `auth.timeout`) run on tokio's paused clock.
pub trait AuthCalls: std::fmt::Debug + Send + Sync + 'static {
    /// Logs in with username and password.
    fn login(&self, creds: &Credentials) -> impl Future<Output = Result<Issued, AuthError>> + Send;
    /// Exchanges a refresh token for a new access token.
    fn refresh(&self, refresh: &Secret) -> impl Future<Output = Result<Issued, AuthError>> + Send;
}

/// Calls ZapSign's auth endpoints.
#[derive(Debug, Clone)]
pub struct AuthClient {
    http: reqwest::Client,
    base: String,
    connect_timeout: Duration,
}

impl AuthCalls for AuthClient {
    fn login(&self, creds: &Credentials) -> impl Future<Output = Result<Issued, AuthError>> + Send {
        AuthClient::login(self, creds)
    }

    fn refresh(&self, refresh: &Secret) -> impl Future<Output = Result<Issued, AuthError>> + Send {
        AuthClient::refresh(self, refresh)
    }
}

impl AuthClient {
    /// A client for `auth.url`, trusting what `tls` trusts, with `upstream.connect_timeout` for the connect.
    /// Never follows redirects. No overall timeout here: the renewer bounds each call by `auth.timeout`.
    pub fn new(auth: &JwtAuth, upstream: &UpstreamConfig, tls: rustls::ClientConfig) -> Result<Self, AuthError> {
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(upstream.connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .tcp_nodelay(true)
            // Auth calls come minutes apart: an idle connection kept between them only outlives `run` (its
            // task is not ours to close) and meets servers that closed it meanwhile.
            .pool_max_idle_per_host(0)
            .user_agent(concat!("zapsign-proxy/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| AuthError::Network(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            http,
            base: auth.url.text.clone(),
            connect_timeout: upstream.connect_timeout,
        })
    }

    /// Logs in with username and password.
    pub async fn login(&self, creds: &Credentials) -> Result<Issued, AuthError> {
        let url = format!("{}/api/v1/auth/token/{}/", self.base, creds.organization_id);
        let body = serde_json::json!({ "username": creds.username, "password": creds.password.expose() });
        let (status, text) = self.post(&url, &body).await?;
        match status {
            StatusCode::OK => {
                let tokens = parse_tokens(&text)?;
                let refresh = tokens
                    .refresh
                    .ok_or_else(|| AuthError::Malformed("login answer has no `refresh`".into()))?;
                Ok(Issued {
                    access: tokens.access,
                    refresh: Some(refresh),
                })
            }
            StatusCode::UNAUTHORIZED => Err(AuthError::BadCredentials {
                organization_id: creds.organization_id.clone(),
                username: creds.username.clone(),
                url: self.base.clone(),
            }),
            StatusCode::TOO_MANY_REQUESTS => Err(AuthError::RateLimited),
            StatusCode::BAD_REQUEST if text.to_ascii_lowercase().contains("rate limit") => Err(AuthError::RateLimited),
            other => Err(AuthError::Status { status: other.as_u16() }),
        }
    }

    /// Exchanges a refresh token for a new access token (and a new refresh token when ZapSign sends one).
    pub async fn refresh(&self, refresh: &Secret) -> Result<Issued, AuthError> {
        let url = format!("{}/api/v1/auth/token-refresh/", self.base);
        let body = serde_json::json!({ "refresh": refresh.expose() });
        let (status, text) = self.post(&url, &body).await?;
        match status {
            StatusCode::OK => {
                let tokens = parse_tokens(&text)?;
                Ok(Issued {
                    access: tokens.access,
                    refresh: tokens.refresh,
                })
            }
            StatusCode::UNAUTHORIZED => Err(AuthError::RefreshRejected),
            StatusCode::TOO_MANY_REQUESTS => Err(AuthError::RateLimited),
            other => Err(AuthError::Status { status: other.as_u16() }),
        }
    }

    /// POSTs `body` as JSON and reads the whole answer (auth answers are small).
    async fn post(&self, url: &str, body: &serde_json::Value) -> Result<(StatusCode, String), AuthError> {
        let resp = self
            .http
            .post(url)
            .json(body)
            .send()
            .await
            .map_err(|e| self.transport(e))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| self.transport(e))?;
        Ok((status, text))
    }

    fn transport(&self, e: reqwest::Error) -> AuthError {
        // The only timeout reqwest runs here is the connect's; `auth.timeout` is the renewer's.
        if e.is_timeout() && e.is_connect() {
            AuthError::Timeout {
                which: "upstream.connect_timeout",
                timeout: self.connect_timeout,
            }
        } else {
            // reqwest's message names the URL (organization id, no secret) and the cause.
            let detail = crate::error::error_chain(&e);
            AuthError::Network(detail)
        }
    }
}

struct Tokens {
    access: Secret,
    refresh: Option<Secret>,
}

fn parse_tokens(text: &str) -> Result<Tokens, AuthError> {
    let body: TokenBody = serde_json::from_str(text)
        .map_err(|e| AuthError::Malformed(format!("not the documented JSON ({} bytes): {e}", text.len())))?;
    let access = body
        .access
        .filter(|a| !a.is_empty())
        .ok_or_else(|| AuthError::Malformed("no `access` token".into()))?;
    if crate::headers::bearer_value(&access).is_none() {
        return Err(AuthError::Malformed(
            "the access token holds characters a header cannot carry".into(),
        ));
    }
    Ok(Tokens {
        access: Secret::new(access),
        refresh: body.refresh.filter(|r| !r.is_empty()).map(Secret::new),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bodies() {
        let t = parse_tokens(r#"{"access":"a.b.c","refresh":"r.s.t"}"#).unwrap();
        assert_eq!(t.access.expose(), "a.b.c");
        assert_eq!(t.refresh.unwrap().expose(), "r.s.t");
        assert!(parse_tokens(r#"{"access":"a.b.c"}"#).unwrap().refresh.is_none());
        assert!(matches!(parse_tokens(""), Err(AuthError::Malformed(_))));
        assert!(matches!(parse_tokens("<html>"), Err(AuthError::Malformed(_))));
        assert!(matches!(
            parse_tokens(r#"{"refresh":"x"}"#),
            Err(AuthError::Malformed(_))
        ));
        assert!(matches!(parse_tokens(r#"{"access":""}"#), Err(AuthError::Malformed(_))));
        assert!(matches!(
            parse_tokens("{\"access\":\"a\\nb\"}"),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn malformed_message_does_not_echo_the_body() {
        let err = parse_tokens(r#"{"access": 12, "secret": "hunter2"}"#)
            .err()
            .unwrap()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }
}
