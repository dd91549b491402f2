//! The per-request rewrite on a realistic caller request, as the proxy runs it: the request id, then the
//! production [`rewrite_head`] (target check and `api_token` rule, hop-by-hop removal with a `Connection` list,
//! the injected token, Host, forwarding headers). This is the proxy's own logic on the hot path; everything
//! else is hyper and the kernel. The `query/*` benches isolate the `api_token` rule.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use http::request::Parts;
use http::{HeaderValue, Method, Request, Version};
use zapsign_proxy::config::BaseUrl;
use zapsign_proxy::headers::{bearer_value, client_value, ensure_request_id, strip_api_token};
use zapsign_proxy::rewrite::{rewrite_head, upstream_target, RewriteContext};

fn caller_head(with_hop: bool) -> Parts {
    let mut req = Request::builder()
        .method(Method::POST)
        .uri("/api/v1/docs/?page=2")
        .version(Version::HTTP_11)
        .header("host", "zapsign-proxy.internal:8080")
        .header("user-agent", "zapsign-python/1.4.2")
        .header("accept", "application/json")
        .header("content-type", "application/json")
        .header("content-length", "312")
        .header("authorization", "Bearer stale-caller-token");
    if with_hop {
        req = req
            .header("connection", "keep-alive, x-trace-hop")
            .header("x-trace-hop", "1")
            .header("keep-alive", "timeout=5");
    }
    req.body(()).unwrap().into_parts().0
}

fn header_rewrite(c: &mut Criterion) {
    let bearer = bearer_value(&"t".repeat(200)).unwrap();
    let upstream = BaseUrl::parse("upstream.url", "https://api.zapsign.com.br").unwrap();
    // Built once per caller connection in the proxy.
    let client: HeaderValue = client_value("10.1.2.3".parse().unwrap());
    for (name, with_hop) in [("plain", false), ("with_connection_list", true)] {
        c.bench_function(&format!("header_rewrite/{name}"), |b| {
            b.iter_batched(
                || caller_head(with_hop),
                |mut parts| {
                    let id = ensure_request_id(&mut parts.headers);
                    let target = upstream_target(&parts, &upstream).unwrap();
                    let ctx = RewriteContext {
                        authorization: &bearer,
                        client: &client,
                        proto: "http",
                        request_id: &id,
                    };
                    rewrite_head(&mut parts, target, &ctx);
                    black_box((parts, id))
                },
                criterion::BatchSize::SmallInput,
            )
        });
    }
    c.bench_function("query/no_api_token", |b| {
        b.iter(|| black_box(strip_api_token(black_box("page=2&sort=created_at"))))
    });
    c.bench_function("query/with_api_token", |b| {
        b.iter(|| black_box(strip_api_token(black_box("page=2&api_token=0123456789abcdef&sort=x"))))
    });
}

criterion_group!(benches, header_rewrite);
criterion_main!(benches);
