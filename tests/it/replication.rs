//! Replication between real nodes: three nodes with a restart mid-stream,
//! offers answered across nodes, restore safety, subscribe-to-all.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use civex_proto::v1::{self as pb, subscribe_response::Event};
use tonic::Code;

use crate::support::{
    civex_async, eventually, key, large_publish, make_key, publish, publish_row, publish_stream,
    row, stdout, whole_feed, Pair, Proxy, Spec, TestNode, NOWHERE,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_converge_through_a_relay_restarted_mid_stream() {
    let dir = tempfile::tempdir().unwrap();
    // Each node admits the one subscribed to it, whose key it pins.
    let (b_key, c_key) = (
        make_key(&dir.path().join("b")),
        make_key(&dir.path().join("c")),
    );
    let a = TestNode::start(
        &dir.path().join("a"),
        Spec::new("city-a").trust("city-b", &b_key),
    )
    .await;
    let b_spec = Spec::new("city-b")
        .peer("city-a", &a.address)
        .trust("city-a", &a.public_key)
        .trust("city-c", &c_key);
    let mut b = TestNode::start(&dir.path().join("b"), b_spec).await;
    let proxy = Proxy::start(&b.address).await;
    // C reaches A's feed only through B, and verifies it with A's key.
    let c_spec = Spec::new("city-c")
        .peer("city-b", &proxy.address)
        .trust("city-a", &a.public_key)
        .trust("city-b", &b.public_key);
    let c = TestNode::start(&dir.path().join("c"), c_spec).await;
    b.wait_ready().await;

    let publishing = Arc::new(AtomicBool::new(true));
    let publisher = {
        let (address, publishing) = (a.address.clone(), publishing.clone());
        tokio::spawn(async move {
            let mut client =
                pb::publish_client::PublishClient::new(crate::support::connect(&address).await);
            for i in 0..150 {
                client
                    .publish_indicators(pb::PublishIndicatorsRequest {
                        idempotency_key: key(),
                        rows: vec![crate::support::row(
                            &format!("i{}", i % 10),
                            "city-a",
                            "2025",
                            i as f64,
                            10,
                        )],
                    })
                    .await
                    .unwrap();
            }
            publishing.store(false, Ordering::SeqCst);
        })
    };
    for i in 0..20 {
        publish_row(&b, &format!("b{i}"), 1.0).await;
    }
    eventually("C to hold part of A's feed through B", || async {
        c.head("city-a").await.0 >= 30
    })
    .await;

    b.restart().await;
    proxy.set_target(&b.address);
    publisher.await.unwrap();
    assert!(!publishing.load(Ordering::SeqCst));

    let a_head = a.head("city-a").await;
    let b_head = b.head("city-b").await;
    assert_eq!(a_head.0, 150);
    eventually("B and C to converge on A's head", || async {
        b.head("city-a").await == a_head && c.head("city-a").await == a_head
    })
    .await;
    eventually("C to hold B's head", || async {
        c.head("city-b").await == b_head
    })
    .await;

    // Subscribe-to-all on C sees both origins, every entry exactly once.
    let mut stream = c.subscribe_all().await;
    let mut seqs: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    let mut drained = 0;
    while drained < 2 {
        match stream.message().await.unwrap().unwrap().event.unwrap() {
            Event::Entries(batch) => {
                for entry in batch.entries {
                    let entry = civex_node::core::feed::Entry::decode(entry).unwrap();
                    seqs.entry(entry.body.origin.clone())
                        .or_default()
                        .push(entry.body.seq);
                }
            }
            Event::Drained(_) => drained += 1,
            Event::Mismatch(m) => panic!("{m:?}"),
            Event::NotServed(n) => panic!("{n:?}"),
        }
    }
    assert_eq!(seqs["city-a"], (1..=150).collect::<Vec<_>>());
    assert_eq!(seqs["city-b"], (1..=20).collect::<Vec<_>>());
}

/// A fresh node catching up takes whole messages of 1,024 entries: bulk
/// commits, whose entry bytes go to the store's entry log. After a
/// restart it still serves them byte for byte, and `civex verify` passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_kept_in_the_entry_log_is_served_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let b_key = make_key(&dir.path().join("b"));
    let a = TestNode::start(
        &dir.path().join("a"),
        Spec::new("city-a").trust("city-b", &b_key),
    )
    .await;
    let requests = (0..2500)
        .map(|n| pb::PublishIndicatorsRequest {
            idempotency_key: key(),
            rows: vec![row(
                &format!("i{}", n % 50),
                "city-a",
                "2025",
                f64::from(n),
                10,
            )],
        })
        .collect();
    let (receipts, failure) = publish_stream(&a, requests).await;
    assert!(failure.is_none(), "{failure:?}");
    assert_eq!(receipts.len(), 2500);
    let a_head = a.head("city-a").await;

    let b_dir = dir.path().join("b");
    let b_spec = Spec::new("city-b")
        .peer("city-a", &a.address)
        .trust("city-a", &a.public_key);
    let mut b = TestNode::start(&b_dir, b_spec).await;
    eventually("B to catch up with A", || async {
        b.head("city-a").await == a_head
    })
    .await;
    b.stop().await;
    let log = std::fs::metadata(b_dir.join("data/entries.log")).unwrap();
    assert!(
        log.len() > 0,
        "the catch-up wrote no bulk commit: nothing was tested"
    );

    let config = b_dir.join("node.toml");
    let out = civex_async(&["verify", "--config", config.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", stdout(&out));
    b.restart().await;
    assert_eq!(b.head("city-a").await, a_head);
    let served = whole_feed(&b.address, "city-a").await;
    assert_eq!(served.len(), 2500);
    assert!(served == whole_feed(&a.address, "city-a").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_city_answers_another_citys_offer() {
    let dir = tempfile::tempdir().unwrap();
    let Pair {
        a,
        b,
        proxy_a: _pa,
        proxy_b: _pb,
    } = Pair::start(dir.path()).await;
    a.wait_ready().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let offer = a
        .publisher()
        .await
        .publish_offer(pb::PublishOfferRequest {
            idempotency_key: key(),
            offer: Some(pb::ServiceOffer {
                offer_id: "school-bus".into(),
                title: "School transport".into(),
                area: pb::FunctionalArea::PublicServices as i32,
                category: "school-transport".into(),
                valid_from_unix: now - 10,
                valid_until_unix: now + 3600,
                contact_role: "transport office".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    // B's node has not seen the offer yet only until replication catches up.
    eventually("B to hold A's offer", || async {
        b.head("city-a").await.0 >= offer.seq
    })
    .await;
    b.wait_ready().await;
    b.publisher()
        .await
        .respond_offer(pb::RespondOfferRequest {
            idempotency_key: key(),
            offer_origin: "city-a".into(),
            offer_id: "school-bus".into(),
            offer_version_hash: Vec::new(),
            kind: pb::ResponseKind::Accept as i32,
            message: "two routes please".into(),
        })
        .await
        .unwrap();
    eventually("A to hold B's response", || async {
        a.head("city-b").await.0 >= 1
    })
    .await;
    let offers = a
        .query()
        .await
        .offers(pb::OffersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .offers;
    assert_eq!(offers.len(), 1);
    let response = &offers[0].responses[0];
    assert_eq!(response.origin, "city-b");
    let answer = response.response.as_ref().unwrap();
    assert_eq!(
        answer.offer_version_hash, offer.entry_hash,
        "the response names the version it answers"
    );
    assert_eq!(answer.kind, pb::ResponseKind::Accept as i32);

    let unknown = b
        .publisher()
        .await
        .respond_offer(pb::RespondOfferRequest {
            idempotency_key: key(),
            offer_origin: "city-a".into(),
            offer_id: "no-such-offer".into(),
            kind: pb::ResponseKind::Interest as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_waits_for_a_peer_and_a_restored_node_does_not_fork() {
    let dir = tempfile::tempdir().unwrap();
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    let a_key = make_key(&a_dir);
    // B is not up: A has a peer configured, so publishing stays closed.
    let (proxy_a, proxy_b) = (Proxy::start(NOWHERE).await, Proxy::start(NOWHERE).await);
    let a_spec = Spec::new("city-a").peer("city-b", &proxy_b.address);
    let mut a = TestNode::start(&a_dir, a_spec.clone()).await;
    proxy_a.set_target(&a.address);
    let refused = a
        .publisher()
        .await
        .publish_indicators(pb::PublishIndicatorsRequest {
            idempotency_key: key(),
            rows: vec![crate::support::row("x", "city-a", "2025", 1.0, 10)],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    assert!(
        refused.message().contains("own feed"),
        "{}",
        refused.message()
    );
    assert!(!a.status().await.publish_ready);

    // B comes up, pinning A's key, and serves A's feed back to A.
    let b = TestNode::start(
        &b_dir,
        Spec::new("city-b")
            .peer("city-a", &proxy_a.address)
            .trust("city-a", &a_key),
    )
    .await;
    proxy_b.set_target(&b.address);
    a.wait_ready().await;
    publish_row(&a, "x", 1.0).await;

    // Back up A after seq 1, publish two more, then restore the backup.
    a.stop().await;
    let backup = dir.path().join("a-backup");
    copy_dir(&a_dir.join("data"), &backup);
    a = TestNode::start(&a_dir, a_spec.clone()).await;
    proxy_a.set_target(&a.address);
    a.wait_ready().await;
    publish_row(&a, "y", 2.0).await;
    let third_request = pb::PublishIndicatorsRequest {
        idempotency_key: key(),
        rows: vec![crate::support::row("z", "city-a", "2025", 3.0, 10)],
    };
    let third = a
        .publisher()
        .await
        .publish_indicators(third_request.clone())
        .await
        .unwrap()
        .into_inner();
    eventually("B to hold A's seq 3", || async {
        b.head("city-a").await.0 == 3
    })
    .await;
    a.stop().await;
    std::fs::remove_dir_all(a_dir.join("data")).unwrap();
    copy_dir(&backup, &a_dir.join("data"));
    a = TestNode::start(&a_dir, a_spec).await;
    proxy_a.set_target(&a.address);
    a.wait_ready().await;
    assert_eq!(
        a.head("city-a").await,
        (3, third.entry_hash.clone()),
        "A did not learn its head from B"
    );
    // A retry of a publish the backup never saw gets the original receipt.
    let retried = a
        .publisher()
        .await
        .publish_indicators(third_request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retried, third);
    let fourth = publish_row(&a, "w", 4.0).await;
    assert_eq!(fourth.seq, 4, "the restored node forked its own feed");
    eventually("B to take seq 4", || async {
        b.head("city-a").await == (4, fourth.entry_hash.clone())
    })
    .await;
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_group_learned_back_across_messages_keeps_its_receipt() {
    let dir = tempfile::tempdir().unwrap();
    let mut pair = Pair::start(dir.path()).await;
    pair.a.wait_ready().await;
    // A group of parts served in more than one message (at most 1 MiB of
    // entries each).
    let request = large_publish("city-a", "2025");
    let receipt = publish(&pair.a, request.clone()).await;
    assert!(receipt.seq - receipt.first_seq >= 18, "{receipt:?}");
    assert_eq!(receipt.published, 1200);
    eventually("B to hold A's group", || async {
        pair.b.head("city-a").await.0 == receipt.seq
    })
    .await;

    // A loses its store and learns its feed back from B.
    pair.a.stop().await;
    std::fs::remove_dir_all(pair.a.dir.join("data")).unwrap();
    pair.start_a().await;
    pair.a.wait_ready().await;
    let retried = publish(&pair.a, request).await;
    assert_eq!(retried, receipt);
}
