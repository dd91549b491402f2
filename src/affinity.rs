//! Upstream connection affinity over a pool of warm upstream connections.
//!
//! Each caller HTTP/1.1 connection drives an upstream HTTP/1.1 connection from the same task while it lives. A
//! request then costs no pool lookup, no key hashing, no hand-off to another task and no cross-task wake-up: the
//! caller's connection and its upstream connection are polled together by one [`crate::paired::Paired`] future.
//!
//! The upstream connection is borrowed from [`AffinePool`]: at its first request a caller connection takes an idle
//! one (connected and TLS-handshaken already), or opens one when none is idle, and gives it back when it closes,
//! if the connection can carry another request (HTTP/1.1 keep-alive, its last exchange finished, no error). So a
//! caller that opens a connection per request (PHP, shell scripts, many SDK setups) does not cost a TCP + TLS
//! handshake to ZapSign per request: over the internet that is two round trips. While idle, a connection is
//! driven by a small task of its own, which notices when the upstream closes it and closes it after
//! `upstream.idle_timeout`; at most `upstream.max_idle_connections` are idle, one more is closed.
//!
//! At most [`MAX_PINNED`] caller connections hold an upstream connection at once. Callers beyond that (thousands
//! of idle keep-alive connections) send each request on the shared pool instead, so idle callers cannot pin an
//! unbounded number of upstream connections (each costs a socket on both ends and TLS buffers).
//!
//! Anything else that does not fit stays on the shared pool: HTTP/2 callers (they multiplex), upstreams that
//! negotiate HTTP/2 by ALPN, replays after a 401, and a request whose affine connection closed before the request
//! was written (hyper hands such a request back, and it goes to the pool instead of failing).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Poll, Waker};
use std::time::Duration;

use http::{HeaderValue, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::client::legacy::connect::Connection;
use tower_service::Service;

use crate::config::UpstreamConfig;
use crate::headers::{fit_to_upstream_version, unframed_body};
use crate::replay::ForwardBody;
use crate::tasks::Tasks;
use crate::upstream::Connector;

/// The future that drives an upstream connection: whoever polls it moves its bytes.
pub(crate) type ConnFuture = Pin<Box<dyn Future<Output = ()> + Send>>;
type Sender = http1::SendRequest<ForwardBody>;

/// Caller connections that may hold an upstream connection at once. Enough for every connection of a busy
/// keep-alive client pool (the nginx comparison runs 256) to keep its own; beyond it, 2,000 idle keep-alive
/// callers would otherwise hold as many upstream connections (measured: 1,605, and 82 MiB more RSS).
pub(crate) const MAX_PINNED: usize = 512;

/// Why the affine path did not answer a request.
pub(crate) enum Miss {
    /// Not sent: send it on the pool (boxed: this path is rare, the enum stays small).
    Unsent(Box<Request<ForwardBody>>),
    /// Sent, and the exchange failed.
    Failed(hyper::Error),
    /// No affine connection could be opened (connect or TLS failure).
    Connect(Box<dyn std::error::Error + Send + Sync>),
}

/// An upstream HTTP/1.1 connection apart from any caller: the handle requests go through, and the future that
/// drives the connection (whoever polls it moves its bytes).
struct Upstream {
    sender: Sender,
    driver: ConnFuture,
}

/// Upstream HTTP/1.1 connections for caller connections: the idle ones, kept warm for the next caller, and a
/// count of those caller connections hold. One per proxy.
pub(crate) struct AffinePool {
    /// Opens new connections (TCP, TLS) and notes the upstream's ALPN choice.
    connector: Connector,
    /// Idle connections, the most recently returned last. Taken from the end: the warmest, and the oldest are
    /// left to expire when fewer are needed. Locked only to take or return a connection (once per caller
    /// connection) and by keepers listing or forgetting theirs; never across an await.
    idle: Mutex<Vec<Arc<IdleSlot>>>,
    /// `upstream.max_idle_connections`.
    max_idle: usize,
    /// `upstream.idle_timeout`.
    idle_timeout: Duration,
    /// Caller connections holding an upstream connection now (at most [`MAX_PINNED`]).
    pinned: AtomicUsize,
    /// Where keepers run, so they end (and their connections close) when `run` ends.
    tasks: Tasks,
}

/// One returned connection, shared by the task that keeps it and the idle list, until a caller takes it or it
/// ends.
#[derive(Default)]
struct IdleSlot {
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    /// The connection; `None` once taken or ended.
    conn: Option<Upstream>,
    /// The keeper's waker, so a caller that takes the connection lets the keeper end at once.
    keeper: Option<Waker>,
}

impl IdleSlot {
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One caller connection's claim on an upstream connection; counted in [`AffinePool::pinned`] while it lives.
struct Lease(Arc<AffinePool>);

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.pinned.fetch_sub(1, Ordering::AcqRel);
    }
}

impl AffinePool {
    /// An empty pool opening connections with `connector`, keeping idle ones as `cfg` says; keepers run on
    /// `tasks`.
    pub(crate) fn new(connector: Connector, cfg: &UpstreamConfig, tasks: Tasks) -> Self {
        Self {
            connector,
            idle: Mutex::new(Vec::new()),
            max_idle: cfg.max_idle_connections,
            idle_timeout: cfg.idle_timeout,
            pinned: AtomicUsize::new(0),
            tasks,
        }
    }

    fn idle_list(&self) -> MutexGuard<'_, Vec<Arc<IdleSlot>>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A claim for one more caller connection to hold an upstream connection; `None` at [`MAX_PINNED`].
    fn lease(self: &Arc<Self>) -> Option<Lease> {
        self.pinned
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_PINNED).then_some(n + 1)
            })
            .ok()?;
        Some(Lease(self.clone()))
    }

    /// The warmest idle connection that can take a request now, if any.
    fn take_idle(&self) -> Option<Upstream> {
        loop {
            // The list's lock is released before the slot's: keepers take them in the other order.
            let slot = self.idle_list().pop()?;
            let mut state = slot.lock();
            let conn = state.conn.take();
            let keeper = state.keeper.take();
            drop(state);
            if let Some(keeper) = keeper {
                keeper.wake();
            }
            // Ready means the connection asked for its next request: the last exchange ended and keep-alive holds.
            if let Some(conn) = conn.filter(|c| c.sender.is_ready()) {
                return Some(conn);
            }
        }
    }

    /// Takes `conn` back from a caller connection that closed. Kept when it can carry another request and the
    /// idle list has room; else dropped, which closes it. A connection whose last exchange is still settling
    /// (the final bytes of a response being read, or drained after the caller left mid-response) is listed by
    /// its keeper once it is ready, or closed if it never is.
    fn give_back(self: &Arc<Self>, conn: Upstream) {
        if conn.sender.is_closed() || self.max_idle == 0 || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let ready = conn.sender.is_ready();
        let slot = Arc::new(IdleSlot::default());
        slot.lock().conn = Some(conn);
        // Listed at once when it can be, so a caller arriving before the keeper first runs finds it.
        if ready && !self.list(&slot) {
            return;
        }
        let closer = Closer {
            pool: self.clone(),
            slot,
        };
        self.tasks.spawn(keep(closer, ready));
    }

    /// Puts `slot` on the idle list; false when the list is full. Takes the list's lock only: a keeper calls
    /// this holding its slot's lock. (A slot whose connection just ended stays listed until its keeper's
    /// [`Closer`] runs, moments later; it may count against the bound meanwhile.)
    fn list(&self, slot: &Arc<IdleSlot>) -> bool {
        let mut idle = self.idle_list();
        if idle.len() >= self.max_idle {
            return false;
        }
        idle.push(slot.clone());
        true
    }

    fn forget(&self, slot: &Arc<IdleSlot>) {
        self.idle_list().retain(|s| !Arc::ptr_eq(s, slot));
    }
}

/// Drives the idle connection in `closer`'s slot until a caller takes it, the upstream closes it, or
/// `idle_timeout` passes (then dropping it closes it); lists it once it is ready for a request unless `listed`
/// already. `closer` is an argument, so it runs even when the task is dropped before it first runs (`run`
/// closing every task): no connection is left open in the list.
async fn keep(closer: Closer, mut listed: bool) {
    let Closer { pool, slot } = &closer;
    let expiry = tokio::time::sleep(pool.idle_timeout);
    tokio::pin!(expiry);
    std::future::poll_fn(|cx| {
        let mut state = slot.lock();
        let Some(conn) = state.conn.as_mut() else {
            // Taken by a caller.
            return Poll::Ready(());
        };
        // Ready here means the connection ended: the upstream closed it, or sent what no request asked for.
        if conn.driver.as_mut().poll(cx).is_ready() || expiry.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        if !listed && conn.sender.is_ready() {
            if !pool.list(slot) {
                return Poll::Ready(());
            }
            listed = true;
        }
        if !state.keeper.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            state.keeper = Some(cx.waker().clone());
        }
        Poll::Pending
    })
    .await;
}

/// Whatever ends a keeper (its own decision, or `run` closing every task), closes its connection (if no caller
/// took it) and takes its slot off the idle list.
struct Closer {
    pool: Arc<AffinePool>,
    slot: Arc<IdleSlot>,
}

impl Drop for Closer {
    fn drop(&mut self) {
        let conn = self.slot.lock().conn.take();
        drop(conn);
        self.pool.forget(&self.slot);
    }
}

/// The state one caller connection shares between its requests and its [`crate::paired::Paired`] driver.
#[derive(Default)]
pub(crate) struct Affinity {
    /// The upstream connection's sender while no request is using it. HTTP/1.1 serves one request at a time
    /// per connection, so this lock is never contended: it only moves the sender in and out.
    sender: Mutex<Option<Sender>>,
    /// A newly attached upstream connection's driver, waiting for the [`crate::paired::Paired`] driver to adopt it.
    pending: Mutex<Option<ConnFuture>>,
    has_pending: AtomicBool,
    /// Set once this caller connection holds an upstream connection; says which pool it goes back to.
    lease: OnceLock<Lease>,
}

impl Affinity {
    /// Sends `req` (absolute-form URI) on this caller's upstream connection, attaching one from `pool` if
    /// needed, with `host` (the upstream's) as its `Host`: the connection is HTTP/1.1.
    pub(crate) async fn send(
        &self,
        pool: &Arc<AffinePool>,
        host: &HeaderValue,
        mut req: Request<ForwardBody>,
    ) -> Result<Response<Incoming>, Miss> {
        let cached = self.sender.lock().unwrap_or_else(PoisonError::into_inner).take();
        let mut sender = match cached.filter(|s| !s.is_closed()) {
            Some(s) => s,
            // Boxed: attaching happens once per caller connection (or after an upstream close), and inline it
            // would make every request's future several KiB larger, all of it copied on each request.
            None => match Box::pin(self.attach(pool, req.uri())).await? {
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
                *self.sender.lock().unwrap_or_else(PoisonError::into_inner) = Some(sender);
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

    /// Gives this caller connection an upstream connection: an idle one from `pool`, else a new one to `uri`.
    /// `None` when it gets none: [`MAX_PINNED`] caller connections hold one already, or the upstream speaks
    /// HTTP/2 (the pool multiplexes that better; the connector has noted it, so later requests go to the pool
    /// at once).
    async fn attach(&self, pool: &Arc<AffinePool>, uri: &Uri) -> Result<Option<Sender>, Miss> {
        let lease = match self.lease.get() {
            Some(_) => None,
            None => match pool.lease() {
                Some(lease) => Some(lease),
                None => return Ok(None),
            },
        };
        let sender = match self.reuse(pool).await {
            Some(sender) => sender,
            None => match self.open(&pool.connector, uri.clone()).await? {
                Some(sender) => sender,
                // Dropping `lease` frees the claim.
                None => return Ok(None),
            },
        };
        if let Some(lease) = lease {
            let _ = self.lease.set(lease);
        }
        Ok(Some(sender))
    }

    /// An idle connection from `pool` that is still open, adopted by this caller connection.
    async fn reuse(&self, pool: &AffinePool) -> Option<Sender> {
        while let Some(mut conn) = pool.take_idle() {
            // One poll, from the task that drives it from now on: a close the upstream sent while the connection
            // sat idle, not yet seen by its keeper, ends it here rather than failing the request.
            let open = std::future::poll_fn(|cx| Poll::Ready(conn.driver.as_mut().poll(cx).is_pending())).await;
            if open && conn.sender.is_ready() {
                self.adopt(conn.driver);
                return Some(conn.sender);
            }
        }
        None
    }

    /// Opens an upstream connection; `None` when the upstream speaks HTTP/2.
    async fn open(&self, connector: &Connector, uri: Uri) -> Result<Option<Sender>, Miss> {
        let io = connector.clone().call(uri).await.map_err(Miss::Connect)?;
        if io.connected().is_negotiated_h2() {
            return Ok(None);
        }
        // One contiguous write per request (head and a small body copied together) rather than a writev of
        // several slices: measured leaner with small API bodies (PERFORMANCE.md, "lean, writev(false)").
        let (sender, conn) = http1::Builder::new()
            .writev(false)
            .handshake(io)
            .await
            .map_err(Miss::Failed)?;
        self.adopt(Box::pin(async move {
            let _ = conn.await;
        }));
        Ok(Some(sender))
    }

    /// Hands `driver` to the [`crate::paired::Paired`] driver, which polls it from its next wake-up on.
    fn adopt(&self, driver: ConnFuture) {
        *self.pending.lock().unwrap_or_else(PoisonError::into_inner) = Some(driver);
        self.has_pending.store(true, Ordering::Release);
    }

    /// A newly attached upstream connection's driver, for the caller connection's driver to poll from now on.
    pub(crate) fn take_pending(&self) -> Option<ConnFuture> {
        if !self.has_pending.swap(false, Ordering::AcqRel) {
            return None;
        }
        self.pending.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    /// The caller connection ended: its upstream connection (driven by `driver` when the [`crate::paired::Paired`] driver had
    /// adopted it) goes back to the pool. A request still in flight holds the sender, so the slot is empty and
    /// the connection closes: it is mid-exchange.
    pub(crate) fn release(&self, driver: Option<ConnFuture>) {
        let Some(lease) = self.lease.get() else {
            return;
        };
        // A driver not yet adopted belongs to the newest connection, the one the sender is for.
        let Some(driver) = self.take_pending().or(driver) else {
            return;
        };
        let Some(sender) = self.sender.lock().unwrap_or_else(PoisonError::into_inner).take() else {
            return;
        };
        lease.0.give_back(Upstream { sender, driver });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(max_idle: usize) -> Arc<AffinePool> {
        let cfg = UpstreamConfig {
            url: crate::config::BaseUrl::zapsign(),
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(120),
            idle_timeout: Duration::from_secs(50),
            max_idle_connections: max_idle,
            ca_file: None,
        };
        let tls = crate::tls::client_config(None).expect("webpki roots");
        let connector = crate::upstream::build_connector(&cfg, tls);
        Arc::new(AffinePool::new(connector, &cfg, Tasks::new()))
    }

    #[test]
    fn at_most_max_pinned_caller_connections_hold_an_upstream_connection() {
        let pool = pool(32);
        let mut leases: Vec<Lease> = (0..MAX_PINNED)
            .map(|_| pool.lease().expect("under the bound"))
            .collect();
        assert!(
            pool.lease().is_none(),
            "one caller connection beyond MAX_PINNED got a lease"
        );
        leases.pop();
        let again = pool.lease();
        assert!(
            again.is_some(),
            "a lease freed by a closed caller connection is not given again"
        );
        assert!(pool.lease().is_none());
        drop((leases, again));
        assert_eq!(pool.pinned.load(Ordering::Acquire), 0);
    }

    #[test]
    fn the_idle_list_holds_at_most_max_idle_connections() {
        let pool = pool(2);
        let slots: Vec<Arc<IdleSlot>> = (0..3).map(|_| Arc::new(IdleSlot::default())).collect();
        assert!(pool.list(&slots[0]) && pool.list(&slots[1]));
        assert!(!pool.list(&slots[2]), "a third idle connection was kept");
        pool.forget(&slots[0]);
        assert!(pool.list(&slots[2]));
        // Slots whose connection is gone are skipped, never handed out.
        assert!(pool.take_idle().is_none());
        assert!(pool.idle_list().is_empty());
    }
}
