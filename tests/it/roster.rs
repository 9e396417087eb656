//! The federation roster: nodes that pin only the roster origin's key learn
//! every member's feed key from its signed roster entries, and verify a
//! relayed feed of a city they never talked to.

use std::time::Duration;

use civex_node::{
    tls::{Tls, TlsFiles},
    transport::{self, Security},
};
use civex_proto::v1 as pb;

use crate::support::{eventually, make_key, publish_row, stderr, Spec, TestNode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_keys_come_from_the_roster_and_relayed_feeds_verify() {
    let dir = tempfile::tempdir().unwrap();
    let key_of = |name: &str| make_key(&dir.path().join(name));
    let (k_key, a_key, b_key, h_key) = (
        key_of("consortium"),
        key_of("city-a"),
        key_of("city-b"),
        key_of("hub"),
    );
    let consortium = start_consortium(
        dir.path(),
        &[("city-a", &a_key), ("city-b", &b_key), ("hub", &h_key)],
    )
    .await;

    // Each node pins only the consortium's key.
    let member = |origin: &str| {
        Spec::new(origin)
            .trust("consortium", &k_key)
            .roster("consortium")
    };
    // A has no peer to learn the roster from: it admits the hub, whose key
    // it pins.
    let a = TestNode::start(
        &dir.path().join("city-a"),
        member("city-a").trust("hub", &h_key).allow_without_peers(),
    )
    .await;
    let mut hub = TestNode::start(
        &dir.path().join("hub"),
        member("hub")
            .peer("consortium", &consortium.address)
            .peer("city-a", &a.address),
    )
    .await;
    let b = TestNode::start(
        &dir.path().join("city-b"),
        member("city-b").peer("hub", &hub.address),
    )
    .await;
    a.wait_ready().await;
    publish_row(&a, "never-met", 1.0).await;
    // B never talked to A and pins no key of A's: it learns it from the
    // roster (relayed by the hub) and verifies A's feed relayed by the hub.
    eventually("B to hold A's feed through the hub", || async {
        b.head("city-a").await.0 == 1
    })
    .await;
    assert_eq!(b.head("city-a").await, a.head("city-a").await);
    // civex feed tail, with the hub's config, verifies A's feed with the
    // key the roster gives.
    let out = hub
        .cli(&[
            "feed",
            "tail",
            "--config",
            hub.config_path().to_str().unwrap(),
            "--origin",
            "city-a",
            "--count",
            "1",
        ])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        crate::support::stdout(&out).starts_with("city-a       1"),
        "{}",
        crate::support::stdout(&out)
    );
    // civex verify, on B's stopped store, checks A's feed with the key the
    // roster gives.
    let mut b = b;
    b.stop().await;
    assert_verified(&b, "city-a", 1).await;

    // civex feed tail without --origin follows a member the roster adds
    // while it runs.
    let mut tail = spawn_tail(&consortium, &["--count", "5"]);
    let mut lines = lines_of(&mut tail);
    // The consortium's three roster entries first.
    for _ in 0..3 {
        assert!(next_line(&mut lines).await.starts_with("consortium"));
    }
    let c_key = key_of("city-c");
    let out = consortium
        .cli(&["roster", "add", "city-c", "--key", &c_key])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(next_line(&mut lines).await.contains("roster: city-c"));
    let c = TestNode::start(
        &dir.path().join("city-c"),
        member("city-c").allow_without_peers(),
    )
    .await;
    consortium.add_peer("city-c", &c.address).await;
    c.wait_ready().await;
    publish_row(&c, "late", 1.0).await;
    let line = next_line(&mut lines).await;
    assert!(line.starts_with("city-c       1"), "{line}");
    assert!(tail.wait().unwrap().success());

    // A member is removed; bad input names the field and publishes nothing.
    let out = consortium.cli(&["roster", "remove", "city-a"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let before = consortium.head("consortium").await.0;
    let out = consortium
        .cli(&["roster", "add", "city-x", "--key", "abcd"])
        .await;
    assert!(stderr(&out).contains("--key"), "{}", stderr(&out));
    assert_eq!(consortium.head("consortium").await.0, before);
    // What the hub holds of the removed member stays verifiable.
    eventually("the hub to hold the removal", || async {
        hub.head("consortium").await.0 == before
    })
    .await;
    // The consortium knows the hub only through the roster: once the hub
    // is removed, an open stream of the hub's is cut and says why.
    let channel = crate::support::connect_as(&consortium.address, &hub.dir.join("tls")).await;
    let mut stream = crate::support::subscribe_all_over(channel).await;
    let out = consortium.cli(&["roster", "remove", "hub"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let cut = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without saying why"),
                Err(status) => break status,
            }
        }
    })
    .await
    .expect("the removed member's stream was not cut within 30 s");
    assert_eq!(cut.code(), tonic::Code::PermissionDenied);
    assert!(
        cut.message().contains(
            "node consortium does not admit origin hub: the federation roster removed it"
        ),
        "{}",
        cut.message()
    );
    hub.stop().await;
    assert_verified(&hub, "city-a", 1).await;

    // Only the roster origin publishes roster entries.
    let out = a.cli(&["roster", "add", "city-x", "--key", &b_key]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not the federation's roster origin"),
        "{}",
        stderr(&out)
    );
}

/// A city loses its feed key: it makes a new one offline, the consortium
/// names it in the roster with the last entry kept, and the city's feed
/// goes on under a new feed id. Peers that know the city only through the
/// roster follow, and the whole history still verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_key_is_replaced_through_the_roster_and_the_history_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let key_of = |name: &str| make_key(&dir.path().join(name));
    let (k_key, a_key, b_key) = (key_of("consortium"), key_of("city-a"), key_of("city-b"));
    let consortium = start_consortium(dir.path(), &[("city-a", &a_key), ("city-b", &b_key)]).await;
    let member = |origin: &str| {
        Spec::new(origin)
            .trust("consortium", &k_key)
            .roster("consortium")
            .peer("consortium", &consortium.address)
    };
    let a_dir = dir.path().join("city-a");
    let mut a = TestNode::start(&a_dir, member("city-a")).await;
    let b = TestNode::start(&dir.path().join("city-b"), member("city-b")).await;
    // The consortium replicates A (it names A's last entry) and relays it to B.
    consortium.add_peer("city-a", &a.address).await;
    a.wait_ready().await;
    publish_row(&a, "k0", 1.0).await;
    publish_row(&a, "k1", 2.0).await;
    eventually("B to hold A's two entries", || async {
        b.head("city-a").await.0 == 2
    })
    .await;

    // The key is lost. A new one is made offline; feed.pub is gone too, so
    // the first key must be given.
    a.stop().await;
    let lost = std::fs::read(a_dir.join("feed.key")).unwrap();
    std::fs::remove_file(a_dir.join("feed.key")).unwrap();
    let config = a.config_path();
    let config = config.to_str().unwrap();
    let out = crate::support::civex_async(&["key", "replace", "--config", config]).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--first-key"), "{}", stderr(&out));
    let out = crate::support::civex_async(&[
        "--output",
        "json",
        "key",
        "replace",
        "--config",
        config,
        "--first-key",
        &a_key,
    ])
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let made: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let new_key = made["new_key"].as_str().unwrap().to_owned();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(a_dir.join("feed.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let out = crate::support::civex_async(&["key", "replace", "--config", config]).await;
    assert!(
        stderr(&out).contains("civex key rotate"),
        "{}",
        stderr(&out)
    );
    // Say the lost key leaked instead, and A's node runs on with it: it
    // must stop signing once the roster replaces the key.
    let new_file = dir.path().join("new.key");
    std::fs::rename(a_dir.join("feed.key"), &new_file).unwrap();
    civex_node::keys::write_secret_file(&a_dir.join("feed.key"), &lost).unwrap();
    a = TestNode::start(&a_dir, member("city-a")).await;
    consortium.add_peer("city-a", &a.address).await;
    a.wait_ready().await;
    assert_eq!(publish_row(&a, "k2", 3.0).await.seq, 3);
    eventually("the consortium to hold A's third entry", || async {
        consortium.head("city-a").await.0 == 3
    })
    .await;
    // An analyst follows A alone from here on, across the replacement.
    let mut tail = spawn_tail(&consortium, &["--origin", "city-a", "--count", "4"]);
    let mut tail_lines = lines_of(&mut tail);
    for seq in 1..=3 {
        let line = next_line(&mut tail_lines).await;
        assert!(line.starts_with(&format!("city-a       {seq}")), "{line}");
    }

    // B is down while A's feed moves on: it resumes later from a cursor in
    // the old feed.
    let mut b = b;
    b.stop().await;

    // The consortium names the new key; reusing a key of the feed is refused
    // and publishes nothing.
    let before = consortium.head("consortium").await.0;
    let out = consortium
        .cli(&["roster", "replace-key", "city-a", "--key", &a_key])
        .await;
    assert!(
        stderr(&out).contains("used this key already"),
        "{}",
        stderr(&out)
    );
    let out = consortium
        .cli(&[
            "roster",
            "replace-key",
            "city-a",
            "--key",
            &new_key,
            "--last-seq",
            "9",
        ])
        .await;
    assert!(stderr(&out).contains("up to seq 3"), "{}", stderr(&out));
    assert_eq!(consortium.head("consortium").await.0, before);
    // A peer that claims more of A's feed than the consortium holds, and
    // sends none of it, names no entry a replacement could keep: its claim
    // is shown as one, not as its head, and holds nothing back.
    let boaster = boasting_peer(dir.path(), "city-x", "city-a", 9).await;
    consortium.add_peer("city-x", &boaster).await;
    let claim = "the peer claims city-a's feed up to seq 9, but sent nothing past seq 3 (this \
                 node's head) that verified; an unverified claim, not counted";
    eventually(
        "the consortium to hear city-x's claim on city-a",
        || async {
            consortium
                .status()
                .await
                .peers
                .iter()
                .any(|p| p.name == "city-x" && p.last_error == claim)
        },
    )
    .await;
    let status = consortium.status().await;
    let x = status.peers.iter().find(|p| p.name == "city-x").unwrap();
    assert!(
        x.origins.iter().all(|o| o.origin != "city-a"),
        "the claim is shown as city-x's head: {x:?}"
    );
    // A key named by mistake (or lost again before its first use) is
    // amended while its feed has no entry: the next replacement takes its
    // place.
    let mistaken = make_key(&dir.path().join("mistaken"));
    let out = consortium
        .cli(&["roster", "replace-key", "city-a", "--key", &mistaken])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = consortium.cli(&["peer", "remove", "city-x"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let replace = pb::ReplaceFeedKeyRequest {
        idempotency_key: crate::support::key(),
        origin: "city-a".into(),
        new_feed_key: civex_node::keys::parse_public_key(&new_key)
            .unwrap()
            .to_bytes()
            .to_vec(),
        last_seq: 0,
    };
    let mut publisher = consortium.publisher().await;
    let first = publisher.replace_feed_key(replace.clone()).await.unwrap();
    // A retry (a lost answer, say) gets the same receipt, publishing nothing.
    let again = publisher.replace_feed_key(replace).await.unwrap();
    assert_eq!(first.into_inner(), again.into_inner());

    // A's node, still on the old key (its tip in memory), refuses to
    // publish once it holds that roster entry.
    let roster_head = consortium.head("consortium").await;
    eventually("A to hold the roster entry naming its new key", || async {
        a.head("consortium").await == roster_head
    })
    .await;
    let refused = a
        .publisher()
        .await
        .publish_indicators(pb::PublishIndicatorsRequest {
            idempotency_key: crate::support::key(),
            rows: vec![crate::support::row("k3", "city-a", "2025", 4.0, 10)],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert!(
        refused.message().contains("not the key in force"),
        "{refused:?}"
    );
    assert_eq!(a.head("city-a").await.0, 3);

    // A starts again with the new key and publishes; its feed goes on at
    // seq 3 under a new feed id.
    a.stop().await;
    std::fs::rename(&new_file, a_dir.join("feed.key")).unwrap();
    a = TestNode::start(&a_dir, member("city-a")).await;
    consortium.add_peer("city-a", &a.address).await;
    let roster_head = consortium.head("consortium").await;
    eventually("A to hold the roster entry naming its new key", || async {
        a.head("consortium").await == roster_head
    })
    .await;
    a.wait_ready().await;
    let receipt = publish_row(&a, "k4", 5.0).await;
    assert_eq!(receipt.seq, 4);
    let feed: Vec<civex_node::core::feed::Entry> = crate::support::whole_feed(&a.address, "city-a")
        .await
        .into_iter()
        .map(|e| civex_node::core::feed::Entry::decode(e).unwrap())
        .collect();
    assert_eq!(feed.len(), 4);
    assert_eq!(feed[0].body.feed_id, feed[2].body.feed_id);
    assert_ne!(feed[3].body.feed_id, feed[2].body.feed_id);
    assert_eq!(feed[3].body.prev_hash, feed[2].hash.to_vec());
    assert_eq!(receipt.feed_id, feed[3].body.feed_id);

    // B, which knows A only through the roster, follows from its cursor in
    // the old feed once the consortium holds the new entry.
    eventually("the consortium to hold it", || async {
        consortium.head("city-a").await.0 == 4
    })
    .await;
    // The tail started before the replacement verified A's fourth entry
    // with the new key, showed only A, and ended there.
    let fourth = tokio::time::timeout(Duration::from_secs(60), tail_lines.recv())
        .await
        .expect("civex feed tail did not show A's fourth entry within 60 s");
    let tailed = tokio::task::spawn_blocking(move || tail.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let fourth = fourth.unwrap_or_else(|| panic!("civex feed tail ended: {}", stderr(&tailed)));
    assert!(fourth.starts_with("city-a       4"), "{fourth}");
    assert!(tailed.status.success(), "{}", stderr(&tailed));
    b.restart().await;
    eventually("B to hold A's entry under the new key", || async {
        b.head("city-a").await == a.head("city-a").await
    })
    .await;
    // Renaming A in the roster keeps its replacement: A's next entry, signed
    // by the new key, still verifies everywhere.
    let out = consortium
        .cli(&[
            "roster", "add", "city-a", "--key", &a_key, "--name", "City A",
        ])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let roster_head = consortium.head("consortium").await;
    eventually("A to hold the renamed roster entry", || async {
        a.head("consortium").await == roster_head
    })
    .await;
    assert_eq!(publish_row(&a, "k5", 6.0).await.seq, 5);
    eventually("B to hold A's entry after the rename", || async {
        b.head("city-a").await.0 == 5
    })
    .await;
    // Removed and added again, A keeps its replacement too.
    for args in [
        &["roster", "remove", "city-a"][..],
        &[
            "roster", "add", "city-a", "--key", &a_key, "--name", "City A",
        ][..],
    ] {
        let out = consortium.cli(args).await;
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let roster_head = consortium.head("consortium").await;
    eventually("A and B to hold the re-added roster entry", || async {
        a.head("consortium").await == roster_head && b.head("consortium").await == roster_head
    })
    .await;
    assert_eq!(publish_row(&a, "k6", 7.0).await.seq, 6);
    eventually("B to hold A's entry after the re-add", || async {
        b.head("city-a").await.0 == 6
    })
    .await;
    // civex feed tail verifies across the replacement with the roster's word.
    let out = consortium
        .cli(&[
            "--output",
            "json",
            "feed",
            "tail",
            "--config",
            consortium.config_path().to_str().unwrap(),
            "--origin",
            "city-a",
            "--count",
            "6",
        ])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(crate::support::stdout(&out).lines().count(), 6);
    // A backup of B, taken while it runs, holds the roster and A's feed
    // across the replacement.
    let backup = dir.path().join("b.backup");
    let out = b.cli(&["backup", "--out", backup.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    // civex verify on B's stopped store checks every signature of A's
    // feed, old key and new.
    b.stop().await;
    assert_verified(&b, "city-a", 6).await;
    // Restored from the backup (the roster's entries first, so A's new key
    // and feed are known), B's store verifies the same.
    std::fs::rename(b.dir.join("data"), dir.path().join("b-data-lost")).unwrap();
    let out = crate::support::civex_async(&[
        "restore",
        "--config",
        b.config_path().to_str().unwrap(),
        backup.to_str().unwrap(),
    ])
    .await;
    assert!(
        out.status.success(),
        "{}\n{}",
        crate::support::stdout(&out),
        stderr(&out)
    );
    assert_verified(&b, "city-a", 6).await;
}

/// `civex verify` on `node`'s stopped store is clean and has verified
/// `entries` entries of `origin`.
async fn assert_verified(node: &TestNode, origin: &str, entries: u64) {
    let out = crate::support::civex_async(&[
        "--output",
        "json",
        "verify",
        "--config",
        node.config_path().to_str().unwrap(),
    ])
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["clean"], true, "{report}");
    assert!(
        report["origins"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["origin"] == origin && o["verified"] == entries),
        "{report}"
    );
}

/// A Feed server with the member certificate of `origin` that tells every
/// subscriber it holds `claimed`'s feed up to `head_seq` (and sends
/// nothing); returns its address.
async fn boasting_peer(
    dir: &std::path::Path,
    origin: &str,
    claimed: &str,
    head_seq: u64,
) -> String {
    struct Boaster {
        claimed: String,
        head_seq: u64,
    }
    type Messages = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::SubscribeResponse, tonic::Status>> + Send>,
    >;
    #[tonic::async_trait]
    impl pb::feed_server::Feed for Boaster {
        type SubscribeStream = Messages;

        async fn subscribe(
            &self,
            _request: tonic::Request<pb::SubscribeRequest>,
        ) -> Result<tonic::Response<Messages>, tonic::Status> {
            use tokio_stream::StreamExt;
            let drained = pb::SubscribeResponse {
                event: Some(pb::subscribe_response::Event::Drained(pb::BacklogDrained {
                    origin: self.claimed.clone(),
                    head_seq: self.head_seq,
                })),
            };
            let stream = tokio_stream::once(Ok(drained)).chain(tokio_stream::pending());
            Ok(tonic::Response::new(Box::pin(stream)))
        }

        async fn heads(
            &self,
            _request: tonic::Request<pb::HeadsRequest>,
        ) -> Result<tonic::Response<pb::HeadsResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("not in this test"))
        }
    }
    let identity = civex_node::pki::Identity::Origin(origin.into());
    let tls_dir = dir.join(origin);
    crate::support::issue_identity(&tls_dir, &identity);
    let tls = Tls::load(TlsFiles::in_dir(&tls_dir), Some(identity)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let incoming = transport::incoming(listener, Security::Mutual(tls), Duration::from_secs(5));
    let server = pb::feed_server::FeedServer::new(Boaster {
        claimed: claimed.into(),
        head_seq,
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(server)
            .serve_with_incoming(incoming),
    );
    address
}

/// The lines `child` writes to its stdout, as they come.
fn lines_of(child: &mut std::process::Child) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (lines_tx, lines) = tokio::sync::mpsc::unbounded_channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(out)) {
            if line.map(|l| lines_tx.send(l)).is_err() {
                break;
            }
        }
    });
    lines
}

/// The next line of `lines`, within 30 s.
async fn next_line(lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(Duration::from_secs(30), lines.recv())
        .await
        .expect("no line from civex feed tail within 30 s")
        .expect("civex feed tail ended early")
}

/// Starts `civex feed tail --config` on `node` with `args`, its output piped.
fn spawn_tail(node: &TestNode, args: &[&str]) -> std::process::Child {
    let (identity, config) = (node.operator_dir(), node.config_path());
    std::process::Command::new(crate::support::bin("civex"))
        .args(["--node", &node.address, "--identity"])
        .arg(identity)
        .args(["feed", "tail", "--config"])
        .arg(config)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Makes `node` replicate `origin`'s node at `address` (`civex peer add`).
/// Starts the roster origin's node, "consortium", in `dir` and adds each
/// (origin, feed key) as a member named after its origin.
async fn start_consortium(dir: &std::path::Path, members: &[(&str, &str)]) -> TestNode {
    let consortium = TestNode::start(
        &dir.join("consortium"),
        Spec::new("consortium")
            .roster("consortium")
            .allow_without_peers(),
    )
    .await;
    consortium.wait_ready().await;
    for (origin, key) in members {
        let out = consortium
            .cli(&["roster", "add", origin, "--key", key, "--name", origin])
            .await;
        assert!(out.status.success(), "{}", stderr(&out));
    }
    consortium
}

/// A subscriber already in the new feed the roster started after a lost
/// key, further than this node holds, is told this node's head and waits;
/// it is not reported as diverging (and its origin not stopped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_ahead_in_a_replacement_feed_waits_and_is_no_mismatch() {
    use civex_node::core::feed::Entry;
    use civex_proto::v1::{entry_body::Payload, subscribe_response::Event};
    let dir = tempfile::tempdir().unwrap();
    let key_of = |name: &str| make_key(&dir.path().join(name));
    let (k_key, a_key) = (key_of("consortium"), key_of("city-a"));
    let consortium = start_consortium(dir.path(), &[("city-a", &a_key)]).await;
    let a = TestNode::start(
        &dir.path().join("city-a"),
        Spec::new("city-a")
            .trust("consortium", &k_key)
            .roster("consortium")
            .peer("consortium", &consortium.address),
    )
    .await;
    consortium.add_peer("city-a", &a.address).await;
    a.wait_ready().await;
    publish_row(&a, "k0", 1.0).await;
    publish_row(&a, "k1", 2.0).await;
    eventually("the consortium to hold A's two entries", || async {
        consortium.head("city-a").await.0 == 2
    })
    .await;
    let new_key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
    let receipt = consortium
        .publisher()
        .await
        .replace_feed_key(pb::ReplaceFeedKeyRequest {
            idempotency_key: crate::support::key(),
            origin: "city-a".into(),
            new_feed_key: new_key.to_bytes().to_vec(),
            last_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let roster_feed = crate::support::whole_feed(&consortium.address, "consortium").await;
    let entry = Entry::decode(roster_feed[receipt.seq as usize - 1].clone()).unwrap();
    let Some(Payload::Roster(member)) = entry.body.payload else {
        panic!("not a roster entry")
    };
    let replacement = member.replacements.last().unwrap().clone();
    assert_eq!(replacement.last_seq, 2);
    let subscribe = |feed_id: Vec<u8>| {
        let consortium = &consortium;
        async move {
            let mut stream = consortium
                .feed()
                .await
                .subscribe(pb::SubscribeRequest {
                    cursors: vec![pb::Cursor {
                        origin: "city-a".into(),
                        feed_id,
                        seq: 3,
                        entry_hash: vec![0x33; 32],
                    }],
                    all_origins: false,
                })
                .await
                .unwrap()
                .into_inner();
            tokio::time::timeout(crate::support::DEADLINE, stream.message())
                .await
                .expect("no message")
                .unwrap()
                .expect("the stream ended")
                .event
                .unwrap()
        }
    };
    match subscribe(replacement.new_feed_id.clone()).await {
        Event::Drained(d) => assert_eq!(d.head_seq, 2),
        other => panic!(
            "the consortium, which only holds less of city-a, stopped city-a for a \
             subscriber in the new feed: {other:?}"
        ),
    }
    // A cursor ahead in a feed the roster never named still diverges.
    match subscribe(vec![0x44; 16]).await {
        Event::Mismatch(m) => assert_eq!(m.origin, "city-a"),
        other => panic!("expected a mismatch, got {other:?}"),
    }
    // The roster origin, a member of its own roster, holds its key: it
    // rotates it, and never ends its own feed with a replacement (whose
    // roster entry would be the next entry of that very feed).
    let out = consortium
        .cli(&["roster", "add", "consortium", "--key", &k_key])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let own = consortium
        .publisher()
        .await
        .replace_feed_key(pb::ReplaceFeedKeyRequest {
            idempotency_key: crate::support::key(),
            origin: "consortium".into(),
            new_feed_key: new_key.to_bytes().to_vec(),
            last_seq: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(own.code(), tonic::Code::InvalidArgument, "{own:?}");
    assert!(own.message().contains("own origin"), "{}", own.message());
}
