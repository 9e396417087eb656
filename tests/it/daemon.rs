//! The `civex-node` binary as operators run it: SIGKILL mid-publish loses no
//! acknowledged entry, SIGTERM ends subscribers cleanly, a key file others
//! can read is refused.

use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt,
    sync::{Arc, Mutex},
};

use civex_node::core::feed::Entry;
use civex_proto::v1::{self as pb, publish_client::PublishClient};

use crate::support::{
    civex_async, eventually, key, row, stderr, stdout, subscribe_all, whole_feed, write_node_dir,
    ChildNode, Spec,
};

async fn hashes_held(address: &str, origin: &str) -> BTreeMap<u64, Vec<u8>> {
    let mut held = BTreeMap::new();
    for entry in whole_feed(address, origin).await {
        let entry = Entry::decode(entry).unwrap();
        assert!(
            held.insert(entry.body.seq, entry.hash.to_vec()).is_none(),
            "duplicate seq"
        );
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_publish_loses_no_acknowledged_entry() {
    let dir = tempfile::tempdir().unwrap();
    write_node_dir(dir.path(), &Spec::new("city-a"), "127.0.0.1:0");
    let mut node = ChildNode::start_async(dir.path()).await;
    let acked: Arc<Mutex<Vec<(pb::PublishIndicatorsRequest, pb::Receipt)>>> = Arc::default();
    let mut publishers = Vec::new();
    for p in 0..8 {
        let (address, acked) = (node.address.clone(), acked.clone());
        publishers.push(tokio::spawn(async move {
            let mut client = PublishClient::new(crate::support::connect(&address).await);
            for i in 0.. {
                let request = pb::PublishIndicatorsRequest {
                    idempotency_key: key(),
                    rows: vec![row(
                        &format!("p{p}-{}", i % 20),
                        "city-a",
                        "2025",
                        i as f64,
                        10,
                    )],
                };
                match client.publish_indicators(request.clone()).await {
                    Ok(receipt) => acked.lock().unwrap().push((request, receipt.into_inner())),
                    Err(_) => return,
                }
            }
        }));
    }
    eventually("200 acknowledged publishes", || async {
        acked.lock().unwrap().len() >= 200
    })
    .await;
    node.sigkill();
    for publisher in publishers {
        publisher.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();

    let mut node = ChildNode::start_async(dir.path()).await;
    let held = hashes_held(&node.address, "city-a").await;
    let top = *held.keys().last().unwrap();
    assert_eq!(
        held.keys().copied().collect::<Vec<_>>(),
        (1..=top).collect::<Vec<_>>(),
        "a gap in the feed"
    );
    for (_, receipt) in &acked {
        assert_eq!(
            held.get(&receipt.seq),
            Some(&receipt.entry_hash),
            "acknowledged seq {} lost",
            receipt.seq
        );
    }
    // A retry after the crash gets the original receipt.
    let (request, receipt) = acked.last().unwrap().clone();
    let mut client = PublishClient::new(crate::support::connect(&node.address).await);
    assert_eq!(
        client
            .publish_indicators(request)
            .await
            .unwrap()
            .into_inner(),
        receipt
    );

    let status = tokio::task::spawn_blocking(move || node.sigterm())
        .await
        .unwrap();
    assert!(status.success(), "civex-node exited with {status}");
    let config = dir.path().join("node.toml");
    let out = civex_async(&["verify", "--config", config.to_str().unwrap()]).await;
    assert!(
        out.status.success(),
        "verify after the crash: {}{}",
        stdout(&out),
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_subscriptions_cleanly_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    write_node_dir(dir.path(), &Spec::new("city-a"), "127.0.0.1:0");
    let mut node = ChildNode::start_async(dir.path()).await;
    let mut stream = subscribe_all(&node.address).await;
    let status = tokio::task::spawn_blocking(move || node.sigterm())
        .await
        .unwrap();
    assert!(status.success(), "civex-node exited with {status}");
    // Every message until the end is well-formed, and the end is clean.
    loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => break,
            Err(status) => panic!("the subscription ended with an error: {status:?}"),
        }
    }
}

#[tokio::test]
async fn a_key_file_others_can_read_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    write_node_dir(dir.path(), &Spec::new("city-a"), "127.0.0.1:0");
    let key_file = dir.path().join("feed.key");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let address_file = dir.path().join("address");
    let out = tokio::task::spawn_blocking({
        let config = dir.path().join("node.toml");
        let address_file = address_file.clone();
        move || {
            std::process::Command::new(crate::support::bin("civex-node"))
                .arg("--config")
                .arg(config)
                .arg("--address-file")
                .arg(address_file)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    // Refused before it bound: it never announced an address.
    assert!(
        !address_file.exists(),
        "civex-node announced {:?} before refusing its key file",
        std::fs::read_to_string(&address_file).unwrap_or_default()
    );
    let message = stderr(&out);
    assert!(
        message.contains("feed.key") && message.contains("readable by group or others"),
        "{message}"
    );
    assert!(
        !message.contains(
            &std::fs::read_to_string(&key_file)
                .unwrap()
                .trim()
                .to_string()
        ),
        "the secret leaked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_reading_blocks_neither_publishing_nor_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    write_node_dir(dir.path(), &Spec::new("city-a"), "127.0.0.1:0");
    let mut node = ChildNode::start_async(dir.path()).await;
    let address = node.address.clone();
    // Subscribe, read nothing.
    let _stream = subscribe_all(&address).await;
    // Far more than the transport and the subscription buffer can hold.
    let mut publisher = PublishClient::new(crate::support::connect(&address).await);
    let rows: Vec<_> = (0..500)
        .map(|i| pb::IndicatorRow {
            breakdown: format!("item=c{i}"),
            ..row("jobs", "city-a", "2025", i as f64, 10)
        })
        .collect();
    for _ in 0..200 {
        publisher
            .publish_indicators(pb::PublishIndicatorsRequest {
                idempotency_key: key(),
                rows: rows.clone(),
            })
            .await
            .unwrap();
    }
    let status = tokio::task::spawn_blocking(move || node.sigterm())
        .await
        .unwrap();
    assert!(status.success(), "civex-node exited with {status}");
}
