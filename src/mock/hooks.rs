//! Test hooks under `/api/v1/__mock/`: answers no real ZapSign gives, so tests can make the upstream stream a
//! large download, hang, redirect, fail with any status, or send hop-by-hop headers.

use std::time::Duration;

use http::header::{CONTENT_TYPE, LOCATION};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Either;
use hyper::body::Incoming;
use serde_json::json;

use super::reply::{echo, hash_body, json_response, MockBody, PatternBody};

/// Answers hook `hook` (the path after `/api/v1/__mock/`):
/// - `download/{bytes}/` streams that many bytes of the pattern ([`super::pattern_byte`]);
/// - `slow/{ms}/` waits that long (default 1 s), then echoes;
/// - `redirect/?to=URL` answers 302 with `Location: URL`;
/// - `status/{code}/` answers that status, after reading the body;
/// - `hop-headers/` answers with hop-by-hop headers (and one header `Connection` names).
pub(super) async fn test_hook(hook: &str, req: Request<Incoming>) -> Response<MockBody> {
    let mut parts = hook.trim_end_matches('/').splitn(2, '/');
    let (name, arg) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    match name {
        "download" => match arg.parse::<u64>() {
            Ok(n) => {
                let mut resp = Response::new(Either::Right(PatternBody::new(n)));
                resp.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
                resp
            }
            Err(_) => json_response(StatusCode::BAD_REQUEST, json!({ "detail": "download/{bytes}/" })),
        },
        "slow" => {
            let ms = arg.parse::<u64>().unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            echo(req).await
        }
        "redirect" => {
            let to = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("to=")))
                .unwrap_or("/")
                .to_owned();
            let mut resp = json_response(StatusCode::FOUND, json!({ "location": to }));
            if let Ok(v) = HeaderValue::from_str(&to) {
                resp.headers_mut().insert(LOCATION, v);
            }
            resp
        }
        "hop-headers" => {
            let mut resp = json_response(StatusCode::OK, json!({ "hop": true }));
            let h = resp.headers_mut();
            for (name, value) in [
                ("connection", "x-resp-hop"),
                ("x-resp-hop", "1"),
                ("keep-alive", "timeout=5"),
                ("proxy-authenticate", "Basic"),
                ("x-resp-kept", "1"),
            ] {
                h.insert(http::HeaderName::from_static(name), HeaderValue::from_static(value));
            }
            resp
        }
        "status" => {
            let status = arg
                .parse::<u16>()
                .ok()
                .and_then(|s| StatusCode::from_u16(s).ok())
                .unwrap_or(StatusCode::OK);
            let _ = hash_body(req.into_body()).await;
            json_response(status, json!({ "status": status.as_u16() }))
        }
        _ => json_response(StatusCode::NOT_FOUND, json!({ "detail": "Not found." })),
    }
}
