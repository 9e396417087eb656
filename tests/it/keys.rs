//! Key rotation: a node hands its feed to a new key; peers follow it from
//! the feed with the key they pinned at the start, and a key file from
//! before the rotation is refused.

use crate::support::{civex_async, eventually, publish_row, stderr, stdout, Spec, TestNode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_is_followed_by_peers_and_an_old_key_file_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a_dir = dir.path().join("a");
    // A admits B, whose key it pins.
    let b_key = crate::support::make_key(&dir.path().join("b"));
    let mut a = TestNode::start(
        &a_dir,
        Spec::new("city-a")
            .trust("city-b", &b_key)
            .allow_without_peers(),
    )
    .await;
    a.wait_ready().await;
    // B dials A through a proxy, so A keeps its address across a restart.
    let proxy = crate::support::Proxy::start(&a.address).await;
    let b = TestNode::start(
        &dir.path().join("b"),
        Spec::new("city-b")
            .peer("city-a", &proxy.address)
            .trust("city-a", &a.public_key)
            .allow_without_peers(),
    )
    .await;
    for i in 0..3 {
        publish_row(&a, &format!("before-{i}"), 1.0).await;
    }
    let old_key = std::fs::read(a_dir.join("feed.key")).unwrap();

    let out = a.cli(&["--output", "json", "key", "rotate"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let receipt: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(receipt["seq"], 4);
    let new_key = std::fs::read(a_dir.join("feed.key")).unwrap();
    assert_ne!(new_key, old_key, "the key file was not replaced");
    assert!(!a_dir.join("feed.key.next").exists());
    let out = a.cli(&["retract", "4", "--reason", "undo"]).await;
    assert!(
        stderr(&out).contains("seq: entry 4 is a key rotation"),
        "{}",
        stderr(&out)
    );
    for i in 0..3 {
        publish_row(&a, &format!("after-{i}"), 1.0).await;
    }
    // B pinned the first key and follows the rotation from the feed.
    eventually("B to hold A's feed across the rotation", || async {
        b.head("city-a").await == a.head("city-a").await
    })
    .await;
    let out = b
        .cli(&[
            "feed",
            "tail",
            "--key",
            &format!("city-a={}", a.public_key),
            "--count",
            "7",
        ])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("key rotation to"), "{}", stdout(&out));

    // After a restart the node signs with the new key; B takes it.
    a.restart().await;
    proxy.set_target(&a.address);
    publish_row(&a, "after-restart", 1.0).await;
    eventually("B to hold the entry signed after the restart", || async {
        b.head("city-a").await.0 == 8
    })
    .await;
    let backup = dir.path().join("a.backup");
    let out = a.cli(&["backup", "--out", backup.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    a.stop().await;
    let config = a_dir.join("node.toml");
    let out = civex_async(&["verify", "--config", config.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", stdout(&out));
    // Restored from a backup, the feed verifies across the rotation.
    std::fs::rename(a_dir.join("data"), dir.path().join("a-data-lost")).unwrap();
    let config_arg = config.to_str().unwrap();
    let out = civex_async(&["restore", "--config", config_arg, backup.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("8 entries verified"),
        "{}",
        stdout(&out)
    );

    // A key file restored from before the rotation is refused at start.
    std::fs::write(a_dir.join("feed.key"), &old_key).unwrap();
    let loaded = civex_node::config::Config::load(&config, std::iter::empty()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = civex_node::node::run(loaded, listener, async {})
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("not the key in force"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_tells_the_operator_to_back_up_the_new_key() {
    let dir = tempfile::tempdir().unwrap();
    let a = TestNode::start(dir.path(), Spec::new("city-a")).await;
    let out = a.cli(&["key", "rotate"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("back that file up now"),
        "{}",
        stdout(&out)
    );
}
