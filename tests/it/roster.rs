//! The federation roster: nodes that pin only the roster origin's key learn
//! every member's feed key from its signed roster entries, and verify a
//! relayed feed of a city they never talked to.

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
    let consortium = TestNode::start(
        &dir.path().join("consortium"),
        Spec::new("consortium")
            .roster("consortium")
            .allow_without_peers(),
    )
    .await;
    consortium.wait_ready().await;
    for (origin, key) in [("city-a", &a_key), ("city-b", &b_key), ("hub", &h_key)] {
        let out = consortium
            .cli(&["roster", "add", origin, "--key", key, "--name", origin])
            .await;
        assert!(out.status.success(), "{}", stderr(&out));
    }

    // Each node pins only the consortium's key.
    let member = |origin: &str| {
        Spec::new(origin)
            .trust("consortium", &k_key)
            .roster("consortium")
    };
    let a = TestNode::start(
        &dir.path().join("city-a"),
        member("city-a").allow_without_peers(),
    )
    .await;
    let hub = TestNode::start(
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
    let out = crate::support::civex_async(&[
        "--output",
        "json",
        "verify",
        "--config",
        b.config_path().to_str().unwrap(),
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
            .any(|o| o["origin"] == "city-a" && o["verified"] == 1),
        "{report}"
    );

    // A member is removed; bad input names the field and publishes nothing.
    let out = consortium.cli(&["roster", "remove", "city-a"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let before = consortium.head("consortium").await.0;
    let out = consortium
        .cli(&["roster", "add", "city-x", "--key", "abcd"])
        .await;
    assert!(stderr(&out).contains("--key"), "{}", stderr(&out));
    assert_eq!(consortium.head("consortium").await.0, before);

    // Only the roster origin publishes roster entries.
    let out = a.cli(&["roster", "add", "city-x", "--key", &b_key]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not the federation's roster origin"),
        "{}",
        stderr(&out)
    );
}
