//! The per-request token read: one `arc-swap` load of the ready-made `Authorization` value plus its expiry
//! check. Every proxied request pays it, so it must stay in the tens of nanoseconds (target: under 20 ns), and
//! it must not slow down while a renewal swaps a new token in.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use http::HeaderValue;
use zapsign_proxy::auth::TokenHolder;

fn token_read(c: &mut Criterion) {
    let holder = Arc::new(TokenHolder::new());
    let bearer = zapsign_proxy::headers::bearer_value(&"x".repeat(200)).unwrap();
    holder.store(bearer.clone(), Some(Instant::now() + Duration::from_secs(3600)));
    let now = Instant::now();
    c.bench_function("token_read/bearer", |b| {
        b.iter(|| black_box(holder.bearer(black_box(now))))
    });
    c.bench_function("token_read/bearer_with_clock", |b| {
        b.iter(|| black_box(holder.bearer(Instant::now())))
    });

    // The same read while another thread keeps swapping tokens in (a renewal storm, far beyond real life).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (holder, stop) = (holder.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                holder.store(
                    HeaderValue::from_static("Bearer swapped"),
                    Some(Instant::now() + Duration::from_secs(60)),
                );
                std::thread::sleep(Duration::from_micros(100));
            }
        })
    };
    c.bench_function("token_read/bearer_during_renewals", |b| {
        b.iter(|| black_box(holder.bearer(black_box(now))))
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = writer.join();
}

criterion_group!(benches, token_read);
criterion_main!(benches);
