//! Peers managed at runtime with `civex peer` and `civex audit`: replication
//! starts and stops without a restart, changes persist and are audited,
//! and a peer policy limits what a peer may read.

use crate::support::{
    civex_async, eventually, make_key, publish_row, stderr, stdout, Spec, TestNode,
};

/// Waits until city-b's node shows city-a's refusal of it as a peer error.
async fn refused(b: &TestNode, what: &str) {
    eventually(what, || async {
        b.status().await.peers.iter().any(|p| {
            p.last_error
                .contains("node city-a does not know origin city-b")
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_added_and_removed_at_runtime_persist_and_are_audited() {
    let dir = tempfile::tempdir().unwrap();
    let a = TestNode::start(
        &dir.path().join("a"),
        Spec::new("city-a").allow_without_peers(),
    )
    .await;
    a.wait_ready().await;
    publish_row(&a, "before", 1.0).await;
    let mut b = TestNode::start(
        &dir.path().join("b"),
        Spec::new("city-b")
            .trust("city-a", &a.public_key)
            .allow_without_peers(),
    )
    .await;

    b.add_peer("city-a", &a.address).await;
    // A does not know B yet: B's subscription is refused, and says why.
    refused(&b, "A to refuse B, a member it does not know").await;
    assert_eq!(
        b.head("city-a").await.0,
        0,
        "B read from a node that does not know it"
    );
    // A adds B as its peer in turn: B is admitted.
    a.add_peer("city-b", &b.address).await;
    eventually("B to replicate A once added", || async {
        b.head("city-a").await.0 == 1
    })
    .await;
    // A pins no key of B's: it takes nothing of B's own feed, and says so
    // rather than look connected and idle. Found by review.
    eventually("A's status to say why it takes nothing from B", || async {
        let status = a.status().await;
        let peer = status.peers.iter().find(|p| p.name == "city-b");
        peer.is_some_and(|p| {
            p.connected
                && p.last_error
                    .contains("its own origin city-b has no feed key here")
        })
    })
    .await;

    // Bad input changes nothing and says which field is wrong.
    let out = b
        .cli(&[
            "peer",
            "add",
            "bad",
            "--address",
            "nowhere",
            "--origin",
            "x",
        ])
        .await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("peer.address"), "{}", stderr(&out));
    let long = format!("{}.example:7400", "h".repeat(300));
    let out = b
        .cli(&[
            "peer",
            "add",
            "long",
            "--address",
            &long,
            "--origin",
            "city-l",
        ])
        .await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("peer.address: 313 bytes, longer than 260"),
        "{}",
        stderr(&out)
    );
    // A node is not its own peer, and an origin has one peer: both refused
    // as what they are, not as a file or availability fault.
    let own = [
        "peer",
        "add",
        "me",
        "--address",
        &b.address,
        "--origin",
        "city-b",
    ];
    let out = b.cli(&own).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("peer.origin: city-b is this node's own origin"),
        "{}",
        stderr(&out)
    );
    let twice = [
        "peer",
        "add",
        "again",
        "--address",
        &a.address,
        "--origin",
        "city-a",
    ];
    let out = b.cli(&twice).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("FailedPrecondition")
            && stderr(&out).contains("is the origin of peers"),
        "{}",
        stderr(&out)
    );
    let out = b.cli(&["--output", "json", "peer", "list"]).await;
    let peers: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(peers.as_array().unwrap().len(), 1, "{peers}");

    // Persisted: after a restart B still replicates A.
    b.restart().await;
    publish_row(&a, "after-restart", 2.0).await;
    eventually("B to replicate A after its restart", || async {
        b.head("city-a").await.0 == 2
    })
    .await;
    let out = b.cli(&["--output", "json", "peer", "list"]).await;
    let peers: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(peers[0]["name"], "city-a");
    assert_eq!(peers[0]["source"], "runtime");

    // A removes B: B's open stream is cut at once (nothing else wakes it),
    // B is refused from then on, and A's next entry does not reach it.
    let out = a.cli(&["peer", "remove", "city-b"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    refused(&b, "B's stream from A to be cut").await;
    publish_row(&a, "after-cut-0", 3.0).await;
    assert_eq!(b.head("city-a").await.0, 2, "B read after A removed it");

    let out = b.cli(&["peer", "remove", "city-a"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = b.cli(&["peer", "remove", "city-a"]).await;
    assert!(stderr(&out).contains("no peer named"), "{}", stderr(&out));
    eventually("B's status to drop the removed peer", || async {
        b.status().await.peers.is_empty()
    })
    .await;

    let out = b.cli(&["audit"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let log = stdout(&out);
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("operator test"))
        .collect();
    assert_eq!(lines.len(), 2, "{log}");
    assert!(
        lines[0].contains("peer add") && lines[1].contains("peer remove"),
        "{log}"
    );
    // Through the API, one entry a page: the same two, then no token.
    let mut admin = b.admin().await;
    let mut request = civex_proto::v1::AuditLogRequest {
        page_size: 1,
        ..Default::default()
    };
    let mut actions = Vec::new();
    loop {
        let page = admin.audit_log(request.clone()).await.unwrap().into_inner();
        assert_eq!(page.entries.len(), 1);
        actions.push(page.entries[0].action.clone());
        if page.next_page_token.is_empty() {
            break;
        }
        assert!(actions.len() < 10, "paging does not end: {actions:?}");
        request.page_token = page.next_page_token;
    }
    assert_eq!(actions, ["peer add", "peer remove"]);
    request.page_token = "audit-x".into();
    let err = admin.audit_log(request).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().starts_with("page_token:"),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_policy_limits_what_the_peer_may_read() {
    use civex_proto::v1::{self as pb, subscribe_response::Event};
    let dir = tempfile::tempdir().unwrap();
    let a = TestNode::start(
        &dir.path().join("a"),
        Spec::new("city-a").allow_without_peers(),
    )
    .await;
    a.wait_ready().await;
    publish_row(&a, "x", 1.0).await;
    // A lets city-b read only city-z (and, always, its own feed).
    a.add_peer_reading("city-b", "127.0.0.1:9", &["city-z"])
        .await;
    // B subscribes to A for its own origin and city-a. It is served its
    // own feed, so it opens publishing without any override (restore
    // safety), and is told city-a is not served, instead of being refused
    // everything.
    let b = TestNode::start(
        &dir.path().join("b"),
        Spec::new("city-b")
            .peer("city-a", &a.address)
            .trust("city-a", &a.public_key),
    )
    .await;
    b.wait_ready().await;
    assert_eq!(b.head("city-a").await.0, 0, "B read what it may not");
    let as_b = || async {
        civex_proto::v1::feed_client::FeedClient::new(
            crate::support::connect_as(&a.address, &b.dir.join("tls")).await,
        )
    };
    let cursor = |origin: &str| pb::Cursor {
        origin: origin.into(),
        ..Default::default()
    };
    let mut stream = as_b()
        .await
        .subscribe(pb::SubscribeRequest {
            cursors: vec![cursor("city-a"), cursor("city-b")],
            all_origins: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while events.len() < 2 {
        events.push(stream.message().await.unwrap().unwrap().event.unwrap());
    }
    match &events[..] {
        [Event::NotServed(n), Event::Drained(d)] => {
            assert_eq!(n.origin, "city-a");
            assert!(
                n.reason.contains("peer city-b may read: city-z"),
                "{}",
                n.reason
            );
            assert_eq!((d.origin.as_str(), d.head_seq), ("city-b", 0));
        }
        other => panic!("expected city-a not served, then city-b drained: {other:?}"),
    }
    // A subscription to nothing B may read is refused, naming the policy.
    let refused = as_b()
        .await
        .subscribe(pb::SubscribeRequest {
            cursors: vec![cursor("city-a")],
            all_origins: false,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(
        refused.message().contains("may not read origin \"city-a\"")
            && refused
                .message()
                .contains("may read: city-z, and its own origin city-b"),
        "{}",
        refused.message()
    );
    // A malformed cursor is named as such, even from a peer that may read
    // none of what it names.
    let malformed = as_b()
        .await
        .subscribe(pb::SubscribeRequest {
            cursors: vec![cursor("Not An Origin!")],
            all_origins: false,
        })
        .await
        .unwrap_err();
    assert_eq!(malformed.code(), tonic::Code::InvalidArgument);
    assert!(
        malformed.message().starts_with("cursors[0].origin:"),
        "{}",
        malformed.message()
    );
    // Nor does A's Heads tell B what A holds of city-a.
    let heads_for_b = || async {
        let heads = as_b()
            .await
            .heads(civex_proto::v1::HeadsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .heads;
        heads.into_iter().map(|h| h.origin).collect::<Vec<_>>()
    };
    assert!(
        heads_for_b().await.is_empty(),
        "Heads named an origin B may not read"
    );
    // `civex feed tail` as B names the origin it is not served and stops,
    // instead of waiting on it.
    let b_identity = b.dir.join("tls");
    let a_key = format!("city-a={}", a.public_key);
    let b_key = format!("city-b={}", b.public_key);
    let args = [
        "--node",
        &a.address,
        "--identity",
        b_identity.to_str().unwrap(),
        "feed",
        "tail",
        "--key",
        &a_key,
        "--key",
        &b_key,
    ];
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), civex_async(&args))
        .await
        .expect("feed tail kept waiting on an origin it is not served");
    assert!(!out.status.success(), "feed tail went on without city-a");
    assert!(
        stderr(&out).contains("the node does not serve origin city-a to this identity")
            && stderr(&out).contains("peer city-b may read: city-z"),
        "{}",
        stderr(&out)
    );

    // Allowed city-a (only): B catches up with it.
    a.add_peer_reading("city-b", "127.0.0.1:9", &["city-a"])
        .await;
    eventually("B to read city-a once allowed", || async {
        b.head("city-a").await.0 == 1
    })
    .await;
    assert_eq!(heads_for_b().await, ["city-a"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_added_without_relay_gives_only_its_own_feed() {
    let dir = tempfile::tempdir().unwrap();
    // A admits the hub, whose key it pins.
    let h_key = make_key(&dir.path().join("hub"));
    let a = TestNode::start(
        &dir.path().join("a"),
        Spec::new("city-a")
            .trust("hub", &h_key)
            .allow_without_peers(),
    )
    .await;
    a.wait_ready().await;
    publish_row(&a, "a", 1.0).await;
    // The hub admits C, whose key it pins.
    let c_key = make_key(&dir.path().join("c"));
    let hub = TestNode::start(
        &dir.path().join("hub"),
        Spec::new("hub")
            .peer("city-a", &a.address)
            .trust("city-a", &a.public_key)
            .trust("city-c", &c_key),
    )
    .await;
    hub.wait_ready().await;
    publish_row(&hub, "h", 1.0).await;
    eventually("the hub to hold city-a", || async {
        hub.head("city-a").await.0 == 1
    })
    .await;
    let c = TestNode::start(
        &dir.path().join("c"),
        Spec::new("city-c")
            .trust("city-a", &a.public_key)
            .trust("hub", &hub.public_key)
            .allow_without_peers(),
    )
    .await;
    let out = c
        .cli(&[
            "peer",
            "add",
            "hub",
            "--address",
            &hub.address,
            "--origin",
            "hub",
            "--no-relay",
        ])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    eventually("C to hold the hub's own feed", || async {
        c.head("hub").await.0 == 1
    })
    .await;
    // The hub serves origins in order, city-a first: had C asked for it,
    // it would be here by now.
    assert_eq!(c.head("city-a").await.0, 0, "C took a relayed feed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_peer_gets_none_of_the_messages_queued_for_it() {
    use civex_proto::v1::{self as pb, subscribe_response::Event};
    let dir = tempfile::tempdir().unwrap();
    let a = TestNode::start(
        &dir.path().join("a"),
        Spec::new("city-a").allow_without_peers(),
    )
    .await;
    a.wait_ready().await;
    a.add_peer("city-b", crate::support::NOWHERE).await;
    // B subscribes and then reads nothing: A queues what it can for it.
    let b_identity = dir.path().join("b-identity");
    crate::support::issue_identity(
        &b_identity,
        &civex_node::pki::Identity::Origin("city-b".into()),
    );
    let mut stream = crate::support::subscribe_all_over(
        crate::support::connect_as(&a.address, &b_identity).await,
    )
    .await;
    // About 10 MB of entries of about 60 KB: far more than the subscriber's
    // and the connection's buffers (a few MiB) and A's queue for it (4
    // messages of up to 1 MiB) hold.
    for year in 2016..2024 {
        let request = crate::support::large_publish("city-a", &year.to_string());
        crate::support::publish(&a, request).await;
    }
    let out = a.cli(&["peer", "remove", "city-b"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let mut received = 0;
    let refusal = loop {
        match stream.message().await {
            Ok(Some(pb::SubscribeResponse {
                event: Some(Event::Entries(batch)),
            })) => {
                received += batch
                    .entries
                    .iter()
                    .map(|e| e.body.len() + e.signature.len())
                    .sum::<usize>();
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream ended without saying why"),
            Err(status) => break status,
        }
    };
    assert_eq!(refusal.code(), tonic::Code::PermissionDenied, "{refusal:?}");
    // What had left A's queue before the removal: the subscriber's window
    // (2 MiB), the message being sent and the one HTTP/2 holds next (each
    // up to 1 MiB and one entry). Without the check, the 4 queued messages
    // and one more follow.
    assert!(
        received <= (2 << 20) + 2 * ((1 << 20) + (64 << 10)),
        "B read {received} bytes of entries after A removed it"
    );
}

/// A subscription takes at most 4,096 origins: a node that knows more (a
/// national roster, say) subscribes with several and still replicates,
/// and opens publishing from its peer (its own origin is in the first).
/// With `read`, the peer's read policy leaves most of them out, so some
/// subscriptions name nothing it may read.
async fn replicates_knowing_more_origins_than_one_subscription_takes(read: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let b_key = make_key(&dir.path().join("b"));
    let a = TestNode::start(
        &dir.path().join("a"),
        Spec::new("city-a")
            .trust("city-b", &b_key)
            .allow_without_peers(),
    )
    .await;
    a.wait_ready().await;
    publish_row(&a, "x", 1.0).await;
    if let Some(read) = read {
        a.add_peer_reading("city-b", "127.0.0.1:9", &[read]).await;
    }
    let mut spec = Spec::new("city-b")
        .peer("city-a", &a.address)
        .trust("city-a", &a.public_key);
    for i in 0..4096u32 {
        let mut seed = [1u8; 32];
        seed[..4].copy_from_slice(&i.to_be_bytes());
        let key = ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key();
        spec = spec.trust(&format!("m-{i}"), &civex_node::keys::public_key_hex(&key));
    }
    let b = TestNode::start(&dir.path().join("b"), spec).await;
    b.wait_ready().await;
    eventually("B to replicate city-a with 4,098 origins known", || async {
        b.head("city-a").await.0 == 1
    })
    .await;
    // Live tail too, over whichever subscription carries city-a.
    publish_row(&a, "y", 2.0).await;
    eventually("B to follow city-a live", || async {
        b.head("city-a").await.0 == 2
    })
    .await;
    let peer = b.status().await.peers.remove(0);
    assert!(peer.connected && peer.last_error.is_empty(), "{peer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_knowing_more_origins_than_one_subscription_takes_still_replicates() {
    replicates_knowing_more_origins_than_one_subscription_takes(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_origins_and_a_narrow_read_policy_still_replicate_what_it_allows() {
    replicates_knowing_more_origins_than_one_subscription_takes(Some("city-a")).await;
}
