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
    // Bytes in the entry log past what the store recorded (the end of a
    // commit a crash cut short, or commits sled lost): verify names them
    // and leaves them where they are.
    let log = dir.path().join("data/entries.log");
    let before = std::fs::metadata(&log).unwrap().len();
    let mut file = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    std::io::Write::write_all(&mut file, &[0xAB; 100]).unwrap();
    drop(file);
    let out = civex_async(&["verify", "--config", config.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("data/entries.log: 100 bytes past the length the store recorded"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::metadata(&log).unwrap().len(), before + 100);
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
                .env("RUST_BACKTRACE", "1")
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    // One line, each cause once, no backtrace.
    let text = stderr(&out);
    assert_eq!(text.trim().lines().count(), 1, "{text}");
    assert_eq!(
        text.matches("readable by group or others").count(),
        1,
        "{text}"
    );
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

/// `deploy/civex-node.service`: systemd accepts it, and its command, run as
/// it says (a test node directory standing for /srv/civex), starts a node
/// that SIGTERM, its stop signal, ends cleanly within its stop timeout.
#[test]
fn the_systemd_unit_verifies_and_its_command_runs_a_node() {
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let unit = std::fs::read_to_string(deploy.join("civex-node.service")).unwrap();
    let setting = |name: &str| -> String {
        let prefix = format!("{name}=");
        unit.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("the unit has no {name}="))
            .to_owned()
    };
    let node_dir = setting("WorkingDirectory");
    assert_eq!(
        setting("ReadWritePaths"),
        node_dir,
        "the node may not write its directory"
    );
    assert_eq!(setting("UMask"), "0077");
    assert_eq!(setting("KillSignal"), "SIGTERM");
    let exec = setting("ExecStart");
    let command: Vec<&str> = exec.split_whitespace().collect();
    let config = format!("{node_dir}/node.toml");
    assert_eq!(command[0], "/usr/local/bin/civex-node");
    assert_eq!(command[1..], ["--config", config.as_str()]);
    let grace = civex_node::config::Config::load(&deploy.join("node.toml"), std::iter::empty())
        .unwrap()
        .limits
        .shutdown_grace_ms;
    let stop_ms = setting("TimeoutStopSec").parse::<u64>().unwrap() * 1000;
    assert!(
        stop_ms > grace,
        "systemd would kill the node inside its shutdown grace"
    );

    // systemd checks the unit, with ExecStart naming the binary built here.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("civex-node.service");
    let built = crate::support::bin("civex-node");
    std::fs::write(&copy, unit.replace(command[0], built.to_str().unwrap())).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .expect("systemd-analyze (Debian's systemd package; .ci/run installs it) is needed");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The unit's arguments, with the test's node directory for its own.
    let node = dir.path().join("node");
    write_node_dir(&node, &Spec::new("city-a"), "127.0.0.1:0");
    let args: Vec<String> = command[1..]
        .iter()
        .map(|a| a.replace(&node_dir, node.to_str().unwrap()))
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut child = ChildNode::start_with(&node, &args);
    let status = child.sigterm();
    assert!(status.success(), "{status}: {}", child.log_text());
}
