//! What JWT mode costs over static mode when no 401 comes (issue 12: at most 5 % more CPU per request). JWT mode
//! keeps what a replay after a 401 needs (the request head, the body's chunks); static mode keeps nothing. This
//! bench measures the price of that keeping on the path where no replay ever happens.
//!
//! Each proxy (`run`, pacing off, no logging subscriber) runs alone on its own thread (a current-thread tokio
//! runtime), in front of the bundled mock ZapSign; the clients and the mock run on another runtime. What is
//! reported as "time" is the **CPU time of the proxy's thread** (`/proc/self/task/<tid>/schedstat`) per
//! request, not wall time: on a shared 2-core machine wall time mostly measures the neighbours, while the
//! proxy's own CPU is what the 5 % target is about. Both tokens have the same length (the static one is made as
//! long as the JWT the mock issued), so both modes write and echo the same bytes.
//!
//! Benches, each for `static` and `jwt`: `get` (no body) and `post_200b` (a 200-byte JSON body), 16 keep-alive
//! connections. `replay_head/*` prices the head's keeping alone (a clone of the rewritten head's parts, the
//! proxy's form before issue 12, against the packed [`ReplayHead`]). After criterion, an interleaved A/B run (static, JWT, static, ... in short rounds) prints the
//! median JWT / static ratio for each, which drifts less with the machine's load than two separate benches.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, Criterion, Throughput};
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use zapsign_proxy::config::Config;
use zapsign_proxy::mock::{MockZapSign, DEMO_ORGANIZATION_ID, DEMO_PASSWORD, DEMO_USERNAME};
use zapsign_proxy::replay::ReplayHead;
use zapsign_proxy::Listeners;

/// Concurrent keep-alive connections per proxy.
const CONNS: usize = 16;
/// The POST body: a small JSON document, as most ZapSign calls send.
const POST_BODY: &[u8; 200] = &[b'x'; 200];

/// One proxy on its own thread.
struct Proxied {
    addr: SocketAddr,
    /// The thread's id, whose CPU time is what is measured.
    tid: libc::pid_t,
}

impl Proxied {
    /// Starts the proxy with `auth` (a `[auth]` table) in front of `upstream`.
    fn start(upstream: &str, auth: &str) -> Self {
        // The connections idle while the other mode is measured: keep them open.
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nheader_read_timeout = \"1h\"\n[admin]\nlisten = \"\"\n[upstream]\nurl = \"{upstream}\"\n\
             {auth}[pacing]\nlimit = 0\n"
        );
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("proxy-under-test".into())
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() };
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let config = Config::from_toml(&text, &|_| None).unwrap();
                    let listeners = Listeners::bind(&config).await.unwrap();
                    tx.send((listeners.proxy.local_addr().unwrap(), tid)).unwrap();
                    zapsign_proxy::run(config, listeners, std::future::pending())
                        .await
                        .unwrap();
                });
            })
            .unwrap();
        let (addr, tid) = rx.recv().unwrap();
        Self { addr, tid }
    }

    /// CPU time the proxy's thread has used so far.
    fn cpu(&self) -> Duration {
        let text = std::fs::read_to_string(format!("/proc/self/task/{}/schedstat", self.tid)).unwrap();
        let ns = text.split_whitespace().next().unwrap().parse().unwrap();
        Duration::from_nanos(ns)
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Sender {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

#[derive(Clone, Copy)]
enum Kind {
    Get,
    Post,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Get => "get",
            Self::Post => "post_200b",
        }
    }

    fn request(self) -> Request<Full<Bytes>> {
        match self {
            Self::Get => Request::get("/api/v1/docs/").body(Full::new(Bytes::new())),
            Self::Post => Request::post("/api/v1/docs/")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(POST_BODY))),
        }
        .unwrap()
    }
}

/// A proxy and its clients' connections.
struct Target {
    proxy: Proxied,
    senders: Vec<Sender>,
}

impl Target {
    fn new(rt: &Runtime, proxy: Proxied) -> Self {
        let senders = rt.block_on(async {
            let mut v = Vec::new();
            for _ in 0..CONNS {
                v.push(connect(proxy.addr).await);
            }
            v
        });
        Self { proxy, senders }
    }

    /// Sends about `n` requests of `kind` over every connection at once; the proxy's CPU time per request.
    fn run(&mut self, rt: &Runtime, kind: Kind, n: u64) -> Duration {
        let per_conn = n.div_ceil(CONNS as u64).max(1);
        let before = self.proxy.cpu();
        let senders = std::mem::take(&mut self.senders);
        self.senders = rt.block_on(async move {
            let tasks: Vec<_> = senders
                .into_iter()
                .map(|mut s| {
                    tokio::spawn(async move {
                        for _ in 0..per_conn {
                            let resp = s.send_request(kind.request()).await.unwrap();
                            assert_eq!(
                                resp.status(),
                                200,
                                "no 401, no 429: the path measured is the common one"
                            );
                            let _ = resp.into_body().collect().await.unwrap();
                        }
                        s
                    })
                })
                .collect();
            let mut back = Vec::new();
            for t in tasks {
                back.push(t.await.unwrap());
            }
            back
        });
        (self.proxy.cpu() - before) / (per_conn * CONNS as u64) as u32
    }
}

/// The mock, a JWT-mode proxy and a static-mode proxy whose token is as long as the JWT.
fn setup(rt: &Runtime) -> (MockZapSign, Target, Target) {
    let mock = rt.block_on(MockZapSign::start(Default::default())).unwrap();
    let jwt_auth = format!(
        "[auth]\norganization_id = \"{DEMO_ORGANIZATION_ID}\"\nusername = \"{DEMO_USERNAME}\"\n\
         password = \"{DEMO_PASSWORD}\"\nurl = \"{}\"\n",
        mock.url()
    );
    let mut jwt = Target::new(rt, Proxied::start(&mock.url(), &jwt_auth));
    jwt.run(rt, Kind::Get, 1);
    let issued = mock.state.issued_tokens();
    let jwt_len = issued.first().map_or(200, String::len);
    let token = "s".repeat(jwt_len);
    mock.state.update_config(|c| c.api_token = Some(token.clone()));
    let stat = Target::new(
        rt,
        Proxied::start(
            &mock.url(),
            &format!("[auth]\nmode = \"static\"\napi_token = \"{token}\"\n"),
        ),
    );
    (mock, stat, jwt)
}

fn jwt_vs_static(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (_mock, mut stat, mut jwt) = setup(&rt);
    let mut group = c.benchmark_group("jwt_vs_static");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(5));
    for kind in [Kind::Get, Kind::Post] {
        for (mode, target) in [("static", &mut stat), ("jwt", &mut jwt)] {
            group.bench_function(format!("{}/{mode}", kind.name()), |b| {
                b.iter_custom(|iters| target.run(&rt, kind, iters) * iters as u32)
            });
        }
    }
    group.finish();
    // `cargo bench -- --test` only checks that the benches run.
    if !std::env::args().any(|a| a == "--test") {
        interleaved(&rt, &mut stat, &mut jwt);
    }
}

/// Short alternating rounds of each mode; prints the median of the per-round JWT / static ratios.
fn interleaved(rt: &Runtime, stat: &mut Target, jwt: &mut Target) {
    const ROUNDS: usize = 15;
    const PER_ROUND: u64 = 4_000;
    for kind in [Kind::Get, Kind::Post] {
        let (mut s, mut j, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let a = stat.run(rt, kind, PER_ROUND);
            let b = jwt.run(rt, kind, PER_ROUND);
            ratios.push(b.as_secs_f64() / a.as_secs_f64());
            s.push(a);
            j.push(b);
        }
        s.sort();
        j.sort();
        ratios.sort_by(f64::total_cmp);
        println!(
            "jwt_vs_static/{} interleaved ({ROUNDS} rounds of {PER_ROUND}): proxy CPU per request, median static {:.2} µs, jwt {:.2} µs; median jwt/static ratio {:.3} (min {:.3}, max {:.3})",
            kind.name(),
            s[ROUNDS / 2].as_secs_f64() * 1e6,
            j[ROUNDS / 2].as_secs_f64() * 1e6,
            ratios[ROUNDS / 2],
            ratios[0],
            ratios[ROUNDS - 1],
        );
    }
}

/// A rewritten head as the proxy keeps it: values are slices of one shared buffer, as hyper parses them.
fn rewritten_head() -> http::request::Parts {
    use http::HeaderValue;
    let raw = bytes::Bytes::from(
        "zapsign-proxy.internal:8080zapsign-python/1.4.2application/jsonapplication/json312".to_owned(),
    );
    let at = |a: usize, b: usize| HeaderValue::from_maybe_shared(raw.slice(a..b)).unwrap();
    let mut req = Request::post("/api/v1/docs/?page=2")
        .header("user-agent", at(27, 47))
        .header("accept", at(47, 63))
        .header("content-type", at(63, 79))
        .header("content-length", at(79, 82))
        .header("authorization", "Bearer stale-caller-token")
        .header("host", at(0, 27))
        .body(())
        .unwrap();
    let id = zapsign_proxy::headers::ensure_request_id(req.headers_mut());
    let mut parts = req.into_parts().0;
    let upstream = zapsign_proxy::config::BaseUrl::parse("upstream.url", "https://api.zapsign.com.br").unwrap();
    let target = zapsign_proxy::rewrite::upstream_target(&parts, &upstream).unwrap();
    let bearer = zapsign_proxy::headers::bearer_value(&"t".repeat(200)).unwrap();
    let client = zapsign_proxy::headers::client_value("10.1.2.3".parse().unwrap());
    let ctx = zapsign_proxy::rewrite::RewriteContext {
        authorization: &bearer,
        client: &client,
        proto: "http",
        request_id: &id,
    };
    zapsign_proxy::rewrite::rewrite_head(&mut parts, target, &ctx);
    parts
}

/// What keeping the head for a replay costs per request, in the two forms compared: a clone of the rewritten
/// head's parts (what the proxy did before) and the packed [`ReplayHead`] (what it does). Both are dropped
/// inside the iteration, as a request that never replays drops them.
fn replay_head(c: &mut Criterion) {
    let parts = rewritten_head();
    let mut group = c.benchmark_group("replay_head");
    group.bench_function("headermap_clone", |b| {
        b.iter(|| {
            black_box((
                parts.method.clone(),
                parts.uri.clone(),
                black_box(&parts.headers).clone(),
            ))
        })
    });
    group.bench_function("packed", |b| b.iter(|| black_box(ReplayHead::keep(black_box(&parts)))));
    group.finish();
}

criterion_group!(benches, replay_head, jwt_vs_static);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
