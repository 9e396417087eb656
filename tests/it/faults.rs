//! Faults between nodes: a proxy that delays, stalls and cuts streams, and
//! a node killed with SIGKILL mid-replication. After every fault the nodes
//! converge to identical feeds: every entry verified, none missing or twice.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use civex_proto::v1 as pb;

use crate::support::{
    connect, eventually, key, publish_row, row, whole_feed, write_node_dir, ChildNode, Faults,
    Pair, Spec, TestNode,
};

/// Both nodes hold the same feed of `origin`, byte for byte, up to `seq`.
async fn converged(a: &str, b: &str, origin: &str, seq: u64) {
    let (mine, theirs) = (whole_feed(a, origin).await, whole_feed(b, origin).await);
    assert_eq!(mine.len() as u64, seq, "{origin}: {a} holds {}", mine.len());
    assert_eq!(mine, theirs, "{origin}: the two nodes hold different feeds");
}

/// Whether `node` holds at least 3 entries of every origin in `origins`.
async fn holds_everything(node: &TestNode, origins: Vec<&'static str>) -> bool {
    for origin in origins {
        if node.head(origin).await.0 < 3 {
            return false;
        }
    }
    true
}

/// Publishes `count` rows on `node`, one entry each.
async fn publish_many(node: &TestNode, prefix: &str, count: usize) {
    for i in 0..count {
        publish_row(node, &format!("{prefix}{i}"), i as f64).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delays_stalls_and_cuts_lose_and_duplicate_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let Pair {
        a,
        b,
        proxy_a,
        proxy_b,
    } = Pair::start(dir.path()).await;
    a.wait_ready().await;
    b.wait_ready().await;
    let caught_up = |seq: u64| {
        let b = &b;
        async move { b.head("city-a").await.0 >= seq }
    };

    // Delayed: every chunk both ways waits 5 ms.
    proxy_a.set_faults(Faults {
        delay: Duration::from_millis(5),
        ..Faults::default()
    });
    publish_many(&a, "delayed-", 20).await;
    eventually("B to follow A through a slow link", || caught_up(20)).await;

    // Stalled: nothing moves while A publishes; then it flows again.
    proxy_a.set_faults(Faults {
        stalled: true,
        ..Faults::default()
    });
    publish_many(&a, "stalled-", 20).await;
    proxy_a.set_faults(Faults::default());
    eventually("B to catch up after the stall", || caught_up(40)).await;

    // Cut, both ways, while both publish; the streams reconnect and resume.
    publish_many(&a, "before-cut-", 10).await;
    proxy_a.cut();
    proxy_b.cut();
    publish_many(&a, "after-cut-", 10).await;
    publish_many(&b, "b-", 10).await;
    eventually("both to converge after the cuts", || async {
        b.head("city-a").await.0 >= 60 && a.head("city-b").await.0 >= 10
    })
    .await;
    converged(&a.address, &b.address, "city-a", 60).await;
    converged(&b.address, &a.address, "city-b", 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_replication_resumes_without_loss_or_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let b_dir = dir.path().join("b");
    // A admits B, whose key it pins.
    let b_key = crate::support::make_key(&b_dir);
    let a = TestNode::start(
        &dir.path().join("a"),
        Spec::new("city-a")
            .trust("city-b", &b_key)
            .allow_without_peers(),
    )
    .await;
    a.wait_ready().await;
    write_node_dir(
        &b_dir,
        &Spec::new("city-b")
            .peer("city-a", &a.address)
            .trust("city-a", &a.public_key)
            .allow_without_peers(),
        "127.0.0.1:0",
    );
    let mut b = ChildNode::start_async(&b_dir).await;

    // A publishes without pause while B replicates; B is killed and restarted.
    let publishing = Arc::new(AtomicBool::new(true));
    let published = Arc::new(AtomicU64::new(0));
    let publisher = {
        let (address, publishing, published) =
            (a.address.clone(), publishing.clone(), published.clone());
        tokio::spawn(async move {
            let mut client = pb::publish_client::PublishClient::new(connect(&address).await);
            let mut i = 0u64;
            while publishing.load(Ordering::SeqCst) {
                client
                    .publish_indicators(pb::PublishIndicatorsRequest {
                        idempotency_key: key(),
                        rows: vec![row(&format!("k{}", i % 50), "city-a", "2025", i as f64, 10)],
                    })
                    .await
                    .unwrap();
                i += 1;
                published.store(i, Ordering::SeqCst);
            }
        })
    };
    let held_by_b = |address: String| async move {
        let mut status = pb::status_client::StatusClient::new(connect(&address).await);
        status
            .node_status(pb::NodeStatusRequest {})
            .await
            .map(|s| {
                s.into_inner()
                    .heads
                    .into_iter()
                    .find(|h| h.origin == "city-a")
                    .map_or(0, |h| h.seq)
            })
            .unwrap_or(0)
    };
    for round in 0..3 {
        let before = held_by_b(b.address.clone()).await;
        eventually(&format!("B to replicate live (round {round})"), || async {
            held_by_b(b.address.clone()).await > before
        })
        .await;
        b.sigkill();
        b = ChildNode::start_async(&b_dir).await;
    }
    assert!(published.load(Ordering::SeqCst) > 0);
    publishing.store(false, Ordering::SeqCst);
    publisher.await.unwrap();
    let total = a.head("city-a").await.0;
    eventually("B to hold all of A's feed", || async {
        held_by_b(b.address.clone()).await >= total
    })
    .await;
    converged(&a.address, &b.address, "city-a", total).await;

    // B's store verifies entry by entry.
    assert!(matches!(b.sigterm().code(), Some(0)));
    let config = b_dir.join("node.toml");
    let out = crate::support::civex_async(&["verify", "--config", config.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", crate::support::stdout(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_relays_between_cities_that_never_meet_and_a_new_city_joins() {
    let dir = tempfile::tempdir().unwrap();
    let cities = ["city-1", "city-2", "city-3", "city-4"];
    let keys: Vec<(String, String)> = cities
        .iter()
        .chain(["hub", "city-5"].iter())
        .map(|origin| {
            (
                origin.to_string(),
                crate::support::make_key(&dir.path().join(origin)),
            )
        })
        .collect();
    let trusting = |origin: &str, spec: Spec, upto: usize| {
        keys[..upto]
            .iter()
            .filter(|(o, _)| o != origin)
            .fold(spec, |spec, (o, k)| spec.trust(o, k))
    };
    // Cities dial the hub through a proxy (the hub starts last); each
    // verifies every other city's feed with that city's key, relayed.
    let hub_proxy = crate::support::Proxy::start(crate::support::NOWHERE).await;
    let mut nodes = Vec::new();
    for origin in cities {
        let spec = trusting(origin, Spec::new(origin).peer("hub", &hub_proxy.address), 5);
        nodes.push(TestNode::start(&dir.path().join(origin), spec).await);
    }
    let hub_spec = nodes
        .iter()
        .fold(trusting("hub", Spec::new("hub"), 4), |spec, node| {
            spec.peer(&node.spec.origin, &node.address)
        });
    let mut hub = TestNode::start(&dir.path().join("hub"), hub_spec).await;
    hub_proxy.set_target(&hub.address);
    for (i, node) in nodes.iter().enumerate() {
        node.wait_ready().await;
        publish_many(node, &format!("c{i}-"), 3).await;
    }
    for node in &nodes {
        eventually(&format!("{} to hold every city", node.spec.origin), || {
            holds_everything(node, cities.to_vec())
        })
        .await;
    }

    // A new city joins: it dials the hub, and the hub learns its key.
    let city5 = TestNode::start(
        &dir.path().join("city-5"),
        trusting(
            "city-5",
            Spec::new("city-5").peer("hub", &hub_proxy.address),
            5,
        ),
    )
    .await;
    hub.stop().await;
    hub.spec = hub
        .spec
        .clone()
        .trust("city-5", &keys[5].1)
        .peer("city-5", &city5.address);
    hub.restart().await;
    hub_proxy.set_target(&hub.address);
    city5.wait_ready().await;
    publish_many(&city5, "c5-", 3).await;
    // The new city gets every city's feed through the hub, verified with
    // the keys it pins; the hub gets the new city's feed.
    eventually("city-5 to hold every city", || {
        holds_everything(&city5, cities.to_vec())
    })
    .await;
    eventually("the hub to hold city-5", || {
        holds_everything(&hub, vec!["city-5"])
    })
    .await;
    for origin in cities {
        converged(&hub.address, &city5.address, origin, 3).await;
    }
    // A city that pins the new city's key (until the federation roster
    // distributes it) gets its feed through the hub as well.
    let mut city1 = nodes.remove(0);
    city1.stop().await;
    city1.spec = city1.spec.clone().trust("city-5", &keys[5].1);
    city1.restart().await;
    eventually("city-1 to hold city-5", || {
        holds_everything(&city1, vec!["city-5"])
    })
    .await;
    converged(&hub.address, &city1.address, "city-5", 3).await;
}
