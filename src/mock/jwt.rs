//! ZapSign's two auth endpoints as the mock plays them, and the JWTs they issue: login
//! (`POST /api/v1/auth/token/{org}/`) and refresh (`POST /api/v1/auth/token-refresh/`).
//!
//! The tokens are JWT-shaped (ZapSign's header, a JSON payload, a dummy signature) so the proxy reads their
//! `exp` as it reads ZapSign's; the mock recognises its own by the payload, and revokes them by epoch.

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use super::reply::{json_response, read_json, MockBody};
use super::state::MockState;

impl MockState {
    /// Issues a token of `kind` (`access` or `refresh`) that lives `ttl`, with an `exp` claim when `with_exp`.
    fn issue(&self, kind: &str, ttl: Duration, with_exp: bool) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"HS256"}"#);
        let exp = unix_now() + ttl.as_secs_f64();
        let mut payload = json!({
            "token_type": kind,
            "jti": format!("{:x}", self.serial.fetch_add(1, Ordering::Relaxed)),
            "user_id": 1,
            "epoch": self.epoch.load(Ordering::SeqCst),
            "access_epoch": self.access_epoch.load(Ordering::SeqCst),
            // The mock checks expiry with sub-second precision; `exp` itself stays an integer as ZapSign's.
            "mock_exp": exp,
        });
        if with_exp {
            payload["exp"] = json!(exp.floor() as u64);
        }
        let payload = URL_SAFE_NO_PAD.encode(payload.to_string());
        let token = format!("{header}.{payload}.bW9jaw");
        self.issued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(token.clone());
        token
    }

    /// Whether `token` is a live token of `kind` issued by this mock.
    pub(super) fn valid(&self, token: &str, kind: &str) -> bool {
        let Some(payload) = token.split('.').nth(1) else {
            return false;
        };
        let Ok(bytes) = URL_SAFE_NO_PAD.decode(payload) else {
            return false;
        };
        let Ok(claims) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            return false;
        };
        claims["token_type"] == kind
            && claims["epoch"].as_u64() == Some(self.epoch.load(Ordering::SeqCst))
            && (kind != "access" || claims["access_epoch"].as_u64() == Some(self.access_epoch.load(Ordering::SeqCst)))
            && claims["mock_exp"].as_f64().is_some_and(|exp| exp > unix_now())
    }
}

/// Seconds since the Unix epoch, as JWT `exp` counts them.
fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `POST /api/v1/auth/token/{org}/`: a refresh and an access token for the right organization, username and
/// password; 401 for wrong ones; 400 "Rate limit exceeded" while [`MockState::rate_limited_logins`] lasts.
pub(super) async fn login(req: Request<Incoming>, org: &str, state: &MockState) -> Response<MockBody> {
    state.login_attempts.fetch_add(1, Ordering::SeqCst);
    state
        .login_times
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(std::time::Instant::now());
    let delay = state.login_delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let body = read_json(req).await.unwrap_or_default();
    *state.last_login_password.lock().unwrap_or_else(|p| p.into_inner()) = body["password"].as_str().map(str::to_owned);
    let limited = state
        .rate_limited_logins
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if limited {
        return json_response(StatusCode::BAD_REQUEST, json!({ "message": "Rate limit exceeded" }));
    }
    let cfg = state.config();
    if org != cfg.organization_id
        || body["username"] != cfg.username.as_str()
        || body["password"] != cfg.password.as_str()
    {
        return json_response(
            StatusCode::UNAUTHORIZED,
            json!({ "detail": "No active account found with the given credentials" }),
        );
    }
    state.logins.fetch_add(1, Ordering::SeqCst);
    json_response(
        StatusCode::OK,
        json!({
            "refresh": state.issue("refresh", cfg.refresh_ttl, cfg.tokens_carry_exp),
            "access": state.issue("access", cfg.access_ttl, cfg.tokens_carry_exp),
        }),
    )
}

/// `POST /api/v1/auth/token-refresh/`: a new access token for a live refresh token, else 401 `token_not_valid`.
pub(super) async fn refresh(req: Request<Incoming>, state: &MockState) -> Response<MockBody> {
    state.refresh_attempts.fetch_add(1, Ordering::SeqCst);
    let body = read_json(req).await.unwrap_or_default();
    let cfg = state.config();
    match body["refresh"].as_str() {
        Some(t) if state.valid(t, "refresh") => {
            state.refreshes.fetch_add(1, Ordering::SeqCst);
            json_response(
                StatusCode::OK,
                json!({ "access": state.issue("access", cfg.access_ttl, cfg.tokens_carry_exp) }),
            )
        }
        _ => json_response(
            StatusCode::UNAUTHORIZED,
            json!({ "detail": "Token is invalid or expired", "code": "token_not_valid" }),
        ),
    }
}
