//! The two ways a request is sent again: after an upstream 401 with a newer token (when every byte of its body is
//! still at hand), and after an upstream 429 once the pacer's pause ends (ZapSign refused it unprocessed). The
//! first attempt's path (`proxy.rs`) calls these only when such an answer comes.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Response, StatusCode};
use hyper::body::Incoming;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::info;

use super::{retry_after_secs, token_unavailable, Proxy, RequestContext};
use crate::auth::renewer::{Renewer, Trigger};
use crate::error::ProxyError;
use crate::metrics::RateLimitedBy;
use crate::pacing::{CallerId, Pacer};
use crate::replay::{ForwardBody, ReplayHead, SentBody};

impl Proxy {
    /// The upstream answered 429 (the account's budget was spent by someone else too): ZapSign refused the
    /// request unprocessed, so it is sent once more after the pause when its body is still at hand and the
    /// pause ends within `pacing.max_wait` of when the request started waiting; else the 429 passes on. `kept` is
    /// what the first attempt kept, and the token it carried (ZapSign did not refuse it: it goes again).
    pub(super) async fn resend_after_429(
        &self,
        first: Response<Incoming>,
        kept: (ReplayHead, Option<oneshot::Receiver<SentBody>>, &HeaderValue),
        pacer: &Pacer,
        caller: Option<&CallerId>,
        paced_from: Instant,
        ctx: &mut RequestContext<'_>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let (head, sent_body, authorization) = kept;
        let deadline = paced_from + pacer.settings().max_wait;
        if pacer.paused_until().is_some_and(|until| until > deadline) {
            info!("upstream answered 429 and its pause outlasts pacing.max_wait; passing the 429 on");
            return Ok(first);
        }
        let body = match sent_body {
            None => Some(ForwardBody::Empty),
            Some(rx) => match tokio::time::timeout(self.body_return_timeout, rx).await {
                Ok(Ok(kept)) if kept.replayable() => Some(ForwardBody::replay(kept)),
                _ => None,
            },
        };
        let Some(body) = body else {
            info!("upstream answered 429 and the request body is no longer at hand; passing the 429 on");
            return Ok(first);
        };
        let (Some(caller), true) = (caller, Instant::now() < deadline) else {
            return Ok(first);
        };
        let granted = match tokio::time::timeout_at(deadline, pacer.acquire(caller)).await {
            Ok(Ok(granted)) => granted,
            _ => {
                info!("no pacing slot after the upstream's 429 within pacing.max_wait; passing the 429 on");
                return Ok(first);
            }
        };
        self.metrics.pacing_wait(granted.waited);
        let Some(req) = head.into_request(body, authorization) else {
            info!("upstream answered 429 and the request head could not be kept; passing the 429 on");
            return Ok(first);
        };
        drop(first);
        info!("sending again after the upstream's 429 pause");
        // Over the pool: the affine connection may still be finishing the refused exchange.
        ctx.affinity = None;
        let resp = self.send(req, ctx).await?;
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            self.metrics.rate_limited(RateLimitedBy::Upstream);
            pacer.pause_after_upstream_429(retry_after_secs(resp.headers()));
        }
        Ok(resp)
    }

    /// The upstream refused the token: renew it once and send the request again, when every byte of the body
    /// is still at hand; otherwise pass the 401 on (and renew in the background for the next requests).
    ///
    /// The replay carries a token newer than the refused one or does not happen: the renewer answers a refusal
    /// with a newer token or a 503 (and drops the refused token), and the check here holds even if it did not.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn replay_after_401(
        &self,
        first: Response<Incoming>,
        head: ReplayHead,
        sent_body: Option<oneshot::Receiver<SentBody>>,
        generation: u64,
        renewer: &Arc<Renewer>,
        caller: Option<&CallerId>,
        ctx: &mut RequestContext<'_>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let body = match sent_body {
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
        let token = renewer
            .renew(Trigger::Rejected(generation))
            .await
            .map_err(token_unavailable)?;
        if token.generation <= generation {
            // Never send ZapSign the token it just refused.
            return Err(ProxyError::TokenUnavailable {
                reason: "ZapSign refused the token and no newer one is available yet".to_owned(),
                retry_after: Duration::from_secs(1),
            });
        }
        let Some(req) = head.into_request(body, &token.header) else {
            info!("upstream answered 401 and the request head could not be kept; passing the 401 on");
            return Ok(first);
        };
        drop(first);
        self.metrics.replay();
        info!(
            generation = token.generation,
            "replaying after an upstream 401 with a renewed token"
        );
        // A replay goes over the pool: the affine connection may still be finishing the refused exchange.
        ctx.affinity = None;
        self.paced_send(req, caller, ctx).await
    }
}
