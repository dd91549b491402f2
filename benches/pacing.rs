//! The pacing decision on the path every request takes when the account's budget has room: one atomic
//! compare-and-swap on the GCRA state, no lock, no allocation. The shared-account issue asks for under 5 µs
//! of CPU per request; this shows how far under it is, alone and with both cores deciding at once.
//!
//! With a shared budget, the pacer's own part of the shared path (the store's state, the trait object's boxed
//! future, the mode bookkeeping) against an in-memory store that always grants: what the pacer adds on top of
//! the round trip to Redis, which this bench does not measure.

use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use zapsign_proxy::pacing::{CallerId, Pacer, Settings, SharedPacing};
use zapsign_proxy::sharing::{BoxFuture, SharedBudget, SharedDown};

/// A shared budget that grants every slot at once, in memory: the pacer's overhead alone.
#[derive(Debug)]
struct AlwaysGrants;

impl SharedBudget for AlwaysGrants {
    fn is_up(&self) -> bool {
        true
    }

    fn acquire(&self) -> BoxFuture<'_, Result<Option<Duration>, SharedDown>> {
        Box::pin(std::future::ready(Ok(None)))
    }

    fn pause(&self, _pause: Duration) -> BoxFuture<'_, Result<(), SharedDown>> {
        Box::pin(std::future::ready(Ok(())))
    }
}

fn pacing(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // A budget that never runs out during the bench: every call takes the path under budget.
    let settings = Settings {
        limit: u32::MAX,
        period: Duration::from_secs(1),
        max_wait: Duration::from_secs(30),
        queue_limit: 1000,
    };
    let pacer = rt.block_on(async { Pacer::start(settings, None) });
    let caller = CallerId::Ip(IpAddr::from([10, 0, 0, 1]));
    c.bench_function("pacing/acquire_under_budget", |b| {
        b.iter(|| rt.block_on(async { black_box(pacer.acquire(black_box(&caller)).await) }))
    });

    // The same while another thread takes slots from the same budget (CAS contention across cores).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let other = {
        let (pacer, stop) = (pacer.clone(), stop.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let caller = CallerId::Ip(IpAddr::from([10, 0, 0, 2]));
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = rt.block_on(pacer.acquire(&caller));
            }
        })
    };
    c.bench_function("pacing/acquire_under_budget_contended", |b| {
        b.iter(|| rt.block_on(async { black_box(pacer.acquire(black_box(&caller)).await) }))
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = other.join();

    let shared = rt.block_on(async {
        Pacer::start(
            settings,
            Some(SharedPacing {
                budget: Arc::new(AlwaysGrants),
                replicas: 3,
            }),
        )
    });
    c.bench_function("pacing/acquire_shared_budget_always_grants", |b| {
        b.iter(|| rt.block_on(async { black_box(shared.acquire(black_box(&caller)).await) }))
    });
}

criterion_group!(benches, pacing);
criterion_main!(benches);
