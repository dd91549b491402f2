//! The per-request header work on a realistic caller request: request id, hop-by-hop removal (with a
//! `Connection` list), the injected token, Host, forwarding headers, and the `api_token` query rule. This is
//! the proxy's own logic on the hot path; everything else is hyper and the kernel.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use http::header::{HeaderMap, HeaderName, HeaderValue, HOST};
use zapsign_proxy::headers::{
    bearer_value, ensure_request_id, remove_hop_by_hop, set_authorization, set_forwarding, strip_api_token,
};

fn caller_headers(with_hop: bool) -> HeaderMap {
    let mut h = HeaderMap::new();
    let mut add = |k: &'static str, v: &'static str| {
        h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
    };
    add("host", "zapsign-proxy.internal:8080");
    add("user-agent", "zapsign-python/1.4.2");
    add("accept", "application/json");
    add("content-type", "application/json");
    add("content-length", "312");
    add("authorization", "Bearer stale-caller-token");
    if with_hop {
        add("connection", "keep-alive, x-trace-hop");
        add("x-trace-hop", "1");
        add("keep-alive", "timeout=5");
    }
    h
}

fn header_rewrite(c: &mut Criterion) {
    let bearer = bearer_value(&"t".repeat(200)).unwrap();
    let upstream_host = HeaderValue::from_static("api.zapsign.com.br");
    let client = "10.1.2.3".parse().unwrap();
    for (name, with_hop) in [("plain", false), ("with_connection_list", true)] {
        let template = caller_headers(with_hop);
        c.bench_function(&format!("header_rewrite/{name}"), |b| {
            b.iter_batched(
                || template.clone(),
                |mut h| {
                    let id = ensure_request_id(&mut h);
                    let caller_host = h.get(HOST).cloned();
                    remove_hop_by_hop(&mut h);
                    set_authorization(&mut h, &bearer);
                    h.insert(HOST, upstream_host.clone());
                    set_forwarding(&mut h, client, "http", caller_host);
                    black_box((h, id))
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
