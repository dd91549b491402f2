//! Issue 6: upstream connection affinity. Each caller HTTP/1.1 connection drives its own upstream connection:
//! its requests share one upstream connection, other callers get theirs, and a closed upstream connection is
//! replaced without the caller noticing.

mod common;

use common::*;
use zapsign_proxy::mock::MockConfig;

#[tokio::test]
async fn a_caller_connection_keeps_one_upstream_connection_and_callers_do_not_share() {
    let h = Harness::start_static("", MockConfig::default()).await;
    let mut a = Caller::connect(h.addr).await;
    let mut b = Caller::connect(h.addr).await;
    for _ in 0..3 {
        assert_eq!(a.send(get(h.addr, "/api/v1/docs/?caller=a")).await.status, 200);
        assert_eq!(b.send(get(h.addr, "/api/v1/docs/?caller=b")).await.status, 200);
    }
    let records = h.mock.state.records();
    let peers = |tag: &str| -> std::collections::BTreeSet<std::net::SocketAddr> {
        records
            .iter()
            .filter(|r| r.target.ends_with(tag))
            .map(|r| r.peer)
            .collect()
    };
    let (pa, pb) = (peers("caller=a"), peers("caller=b"));
    assert_eq!(pa.len(), 1, "caller a's requests used {pa:?}");
    assert_eq!(pb.len(), 1, "caller b's requests used {pb:?}");
    assert!(pa.is_disjoint(&pb), "two callers shared an upstream connection");
    h.shutdown().await;
}

#[tokio::test]
async fn a_closed_upstream_connection_is_replaced_without_an_error() {
    let h = Harness::start_static("", MockConfig::default()).await;
    let mut caller = Caller::connect(h.addr).await;
    assert_eq!(caller.send(get(h.addr, "/api/v1/docs/?n=1")).await.status, 200);
    // The mock answers the next one with `Connection: close` (hop-by-hop: the caller never sees it) and hangs up.
    h.mock.state.close_connections_after_next();
    assert_eq!(caller.send(get(h.addr, "/api/v1/docs/?n=2")).await.status, 200);
    for n in 3..6 {
        let a = caller.send(get(h.addr, &format!("/api/v1/docs/?n={n}"))).await;
        assert_eq!(a.status, 200, "request {n} after the upstream closed: {:?}", a.body);
    }
    let records = h.mock.state.records();
    assert_eq!(records.len(), 5);
    assert_ne!(records[1].peer, records[2].peer, "a closed connection was reused");
    h.shutdown().await;
}
