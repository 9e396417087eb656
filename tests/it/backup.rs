//! `civex backup` from a running node and `civex restore` into a stopped
//! one, run as binaries: what is restored verifies, serves and answers
//! retries; a restore from an older backup never forks the own feed; a
//! damaged or forged backup, or a data directory in use, restores nothing.

use std::path::Path;

use civex_node::backup::{BackupReader, BackupWriter};
use civex_proto::v1 as pb;

use crate::support::{
    civex_async, eventually, key, publish, publish_row, row, stderr, stdout, Pair, Spec, TestNode,
};

async fn restore(config: &Path, file: &Path) -> std::process::Output {
    civex_async(&[
        "restore",
        "--config",
        config.to_str().unwrap(),
        file.to_str().unwrap(),
    ])
    .await
}

/// `civex backup --out FILE` on `node`, which must succeed; its JSON summary.
async fn backup(node: &TestNode, file: &Path) -> serde_json::Value {
    let out = node
        .cli(&[
            "backup",
            "--out",
            file.to_str().unwrap(),
            "--output",
            "json",
        ])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_str(&stdout(&out)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restored_from_an_older_backup_verifies_serves_and_does_not_fork() {
    let dir = tempfile::tempdir().unwrap();
    let mut pair = Pair::start(dir.path()).await;
    pair.a.wait_ready().await;
    pair.b.wait_ready().await;
    let a_dir = pair.a.dir.clone();
    publish_row(&pair.b, "y", 7.0).await;
    publish_row(&pair.a, "x", 1.0).await;
    let second_request = pb::PublishIndicatorsRequest {
        idempotency_key: key(),
        rows: vec![row("z", "city-a", "2025", 2.0, 10)],
    };
    let second = publish(&pair.a, second_request.clone()).await;
    eventually("A to hold B's entry", || async {
        pair.a.head("city-b").await.0 == 1
    })
    .await;

    // Backed up while A runs: its own two entries and B's one.
    let file = dir.path().join("city-a.backup");
    let summary = backup(&pair.a, &file).await;
    assert_eq!(summary["entries"], 3, "{summary}");
    assert!(!dir.path().join("city-a.backup.part").exists());

    // A publishes once more (B takes it), then loses its store.
    let third = publish_row(&pair.a, "w", 3.0).await;
    eventually("B to hold A's seq 3", || async {
        pair.b.head("city-a").await == (3, third.entry_hash.clone())
    })
    .await;
    pair.a.stop().await;
    let config = a_dir.join("node.toml");
    let refused = restore(&config, &file).await;
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("not empty"),
        "{}",
        stderr(&refused)
    );
    std::fs::remove_dir_all(a_dir.join("data")).unwrap();

    let out = restore(&config, &file).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("3 entries verified"),
        "{}",
        stdout(&out)
    );
    let verified = civex_async(&["verify", "--config", config.to_str().unwrap()]).await;
    assert!(verified.status.success(), "{}", stdout(&verified));

    pair.start_a().await;
    let a = &pair.a;
    a.wait_ready().await;
    assert_eq!(a.head("city-b").await.0, 1);
    assert_eq!(
        a.head("city-a").await,
        (3, third.entry_hash.clone()),
        "A did not learn its newer entry from B before publishing"
    );
    // The backup's own publishes answer a retry with their receipts; the
    // same key with other rows is refused (spec rule 4), also when the
    // request is known only from the feed.
    let retried = publish(a, second_request.clone()).await;
    assert_eq!(retried, second);
    let mut other = second_request;
    other.rows[0].period = "2024".into();
    let reused = a
        .publisher()
        .await
        .publish_indicators(other)
        .await
        .unwrap_err();
    assert_eq!(reused.code(), tonic::Code::AlreadyExists, "{reused:?}");
    assert_eq!(
        a.head("city-a").await.0,
        3,
        "the refused request was published"
    );
    let fourth = publish_row(a, "d", 4.0).await;
    assert_eq!(fourth.seq, 4, "the restored node forked its own feed");
    // The restored entries are queryable.
    let out = a.cli(&["query", "observations", "--output", "json"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let indicators: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["indicator"].as_str())
        .collect();
    for indicator in ["x", "y", "z", "w", "d"] {
        assert!(
            indicators.contains(&indicator),
            "{indicator} missing: {rows}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_or_forged_backup_restores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let a_dir = dir.path().join("a");
    let mut a = TestNode::start(&a_dir, Spec::new("city-a")).await;
    for value in 0..5 {
        publish_row(&a, "x", value as f64).await;
    }
    // A place the backup cannot be written is named.
    let nowhere = dir.path().join("no-such-folder").join("city-a.backup");
    let out = a.cli(&["backup", "--out", nowhere.to_str().unwrap()]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no-such-folder/city-a.backup.part: cannot create it"),
        "{}",
        stderr(&out)
    );
    let file = dir.path().join("city-a.backup");
    let out = a.cli(&["backup", "--out", file.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("5 entries"), "{}", stdout(&out));
    a.stop().await;
    let config = a_dir.join("node.toml");
    let data = a_dir.join("data");
    std::fs::remove_dir_all(&data).unwrap();
    let nothing_restored = || {
        assert!(!data.exists(), "a failed restore made the data directory");
        assert!(!a_dir.join("data.restoring").exists());
    };

    let whole = std::fs::read(&file).unwrap();
    let cut = dir.path().join("cut.backup");
    std::fs::write(&cut, &whole[..whole.len() - 100]).unwrap();
    let out = restore(&config, &cut).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cut.backup: byte") && stderr(&out).contains("truncated"),
        "{}",
        stderr(&out)
    );
    nothing_restored();

    // The last entry's signature forged, the file otherwise whole.
    let forged = dir.path().join("forged.backup");
    let mut entries: Vec<pb::SignedEntry> = BackupReader::open(&file)
        .unwrap()
        .map(|r| r.unwrap().1)
        .collect();
    let last = entries.last_mut().unwrap();
    let mut signature = last.signature.to_vec();
    signature[0] ^= 1;
    last.signature = signature.into();
    let mut writer = BackupWriter::create(&forged).unwrap();
    for entry in &entries {
        writer.append(entry).unwrap();
    }
    writer.finish().unwrap();
    let out = restore(&config, &forged).await;
    assert!(!out.status.success());
    assert!(
        stdout(&out).contains("BAD ENTRIES FOUND"),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains("seq 5 has an invalid signature"),
        "{}",
        stdout(&out)
    );
    assert!(
        stderr(&out).contains("nothing was restored"),
        "{}",
        stderr(&out)
    );
    nothing_restored();

    // The whole backup restores.
    let out = restore(&config, &file).await;
    assert!(out.status.success(), "{}", stderr(&out));
    a = TestNode::start(&a_dir, Spec::new("city-a")).await;
    assert_eq!(a.head("city-a").await.0, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_of_a_node_that_keeps_publishing_is_a_whole_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let a_dir = dir.path().join("a");
    let mut a = TestNode::start(&a_dir, Spec::new("city-a")).await;
    publish_row(&a, "x", 0.0).await;
    // Publishes go on, as fast as they are acknowledged, while the backup runs.
    let requests = |n: usize| {
        (0..n)
            .map(|i| pb::PublishIndicatorsRequest {
                idempotency_key: key(),
                rows: vec![row(
                    &format!("c{}-{}", i % 10, i % 50),
                    "city-a",
                    "2025",
                    i as f64,
                    10,
                )],
            })
            .collect::<Vec<_>>()
    };
    let mut publisher = a.publisher().await;
    let publishing = tokio::spawn(async move {
        let mut receipts = publisher
            .publish_indicators_stream(tokio_stream::iter(requests(20_000)))
            .await
            .unwrap()
            .into_inner();
        let mut count = 0;
        while receipts.message().await.unwrap().is_some() {
            count += 1;
        }
        count
    });
    eventually("the publishes to start", || async {
        a.head("city-a").await.0 > 100
    })
    .await;
    let file = dir.path().join("city-a.backup");
    let summary = backup(&a, &file).await;
    assert_eq!(publishing.await.unwrap(), 20_000);
    let backed_up = summary["entries"].as_u64().unwrap();
    // A prefix taken while publishes went on.
    assert!(backed_up > 100 && backed_up < 20_001, "{summary}");
    a.stop().await;

    std::fs::remove_dir_all(a_dir.join("data")).unwrap();
    let config = a_dir.join("node.toml");
    let out = restore(&config, &file).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("{backed_up} entries verified")),
        "{}",
        stdout(&out)
    );
    a = TestNode::start(&a_dir, Spec::new("city-a").allow_without_peers()).await;
    assert_eq!(a.head("city-a").await.0, backed_up);
}

/// Runs `civex` with `args` in `cwd`, with `env` set.
async fn civex_in(cwd: &Path, env: &[(&str, &Path)], args: &[&str]) -> std::process::Output {
    let mut command = std::process::Command::new(crate::support::bin("civex"));
    command
        .args(args)
        .current_dir(cwd)
        .stdin(std::process::Stdio::null());
    for (name, value) in env {
        command.env(name, value);
    }
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_verify_and_restore_as_an_operator_runs_them() {
    let dir = tempfile::tempdir().unwrap();
    let a_dir = dir.path().join("a");
    let mut a = TestNode::start(&a_dir, Spec::new("city-a").allow_without_peers()).await;
    publish_row(&a, "x", 1.0).await;
    let (address, identity) = (a.address.clone(), a.operator_dir());
    let identity = identity.to_str().unwrap();

    // `--out` a bare file name: the backup goes to the working directory,
    // and says so with success.
    let out = civex_in(
        dir.path(),
        &[],
        &[
            "--node",
            &address,
            "--identity",
            identity,
            "backup",
            "--out",
            "city-a.backup",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        BackupReader::open(&dir.path().join("city-a.backup"))
            .unwrap()
            .count(),
        1
    );
    a.stop().await;

    // The secret key kept apart (spec rule 10): verify and restore use
    // feed.pub, which `civex init` writes.
    std::fs::write(a_dir.join("feed.pub"), format!("{}\n", a.public_key)).unwrap();
    std::fs::rename(a_dir.join("feed.key"), dir.path().join("feed.key.offline")).unwrap();
    let config = a_dir.join("node.toml");
    let config = config.to_str().unwrap();
    let out = civex_in(dir.path(), &[], &["verify", "--config", config]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("1 entries verified"),
        "{}",
        stdout(&out)
    );

    // A mistyped data directory is named, not verified as an empty store,
    // and nothing is made there.
    let typo = a_dir.join("dta");
    let out = civex_in(
        dir.path(),
        &[("CIVEX_DATA_DIR", &typo)],
        &["verify", "--config", config],
    )
    .await;
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("no store here") && stderr(&out).contains("dta"),
        "{}",
        stderr(&out)
    );
    assert!(!typo.exists(), "verify made a store at the mistyped path");

    std::fs::remove_dir_all(a_dir.join("data")).unwrap();
    let out = civex_in(
        dir.path(),
        &[],
        &["restore", "--config", config, "city-a.backup"],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("1 entries verified"),
        "{}",
        stdout(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_holding_more_origins_than_one_subscription_takes_is_backed_up_whole() {
    use civex_node::{
        core::feed::{Entry, GENESIS_PREV_HASH},
        store::{CommitBatch, Head, SledStore, Store},
    };
    use civex_proto::v1::{entry_body::Payload, EntryBody, OfferWithdrawal};
    let dir = tempfile::tempdir().unwrap();
    let hub_dir = dir.path().join("hub");
    let mut hub = TestNode::start(&hub_dir, Spec::new("city-a").allow_without_peers()).await;
    hub.stop().await;
    // One more origin than a subscription takes, each with one entry, put
    // in the stopped hub's store as replication would have.
    let origins = civex_node::service::MAX_CURSORS + 1;
    {
        let signer = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let store = SledStore::open(&hub_dir.join("data"), 16 << 20).unwrap();
        let mut commit = CommitBatch::default();
        for i in 0..origins {
            let body = EntryBody {
                origin: format!("member-{i}"),
                feed_id: vec![7; 16],
                seq: 1,
                prev_hash: GENESIS_PREV_HASH.to_vec(),
                time_unix_micros: 1_000,
                idempotency_key: vec![1; 16],
                payload: Some(Payload::Withdrawal(OfferWithdrawal {
                    offer_id: "o".into(),
                    reason: String::new(),
                })),
            };
            let entry = Entry::sign(&signer, body).unwrap();
            let head = Head {
                tip: entry.tip(),
                received_unix_micros: 5,
            };
            commit.heads.push((entry.body.origin.clone(), head));
            commit.runs.push(vec![entry]);
        }
        store.commit(&commit).unwrap();
    }
    hub = TestNode::start(&hub_dir, Spec::new("city-a").allow_without_peers()).await;
    let file = dir.path().join("hub.backup");
    let summary = backup(&hub, &file).await;
    assert_eq!(summary["entries"], origins as u64, "{summary}");
    let mut read: Vec<String> = BackupReader::open(&file)
        .unwrap()
        .map(|r| {
            let body = <EntryBody as prost::Message>::decode(r.unwrap().1.body).unwrap();
            body.origin
        })
        .collect();
    read.sort();
    read.dedup();
    assert_eq!(read.len(), origins);

    // Heads through a real client: pages of at most 4,096 origins, in
    // order of origin id, whole when read on.
    let mut feed = hub.feed().await;
    // A caller that does not page (an older CLI) is refused, not answered
    // in part.
    let whole = feed
        .heads(civex_proto::v1::HeadsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(whole.code(), tonic::Code::FailedPrecondition);
    assert!(
        whole
            .message()
            .starts_with("page_size: 0 asks for every head"),
        "{}",
        whole.message()
    );
    let mut request = civex_proto::v1::HeadsRequest {
        page_size: civex_node::service::MAX_CURSORS as u32,
        page_token: String::new(),
    };
    let (mut listed, mut pages) = (Vec::new(), Vec::new());
    loop {
        let page = feed.heads(request.clone()).await.unwrap().into_inner();
        pages.push(page.heads.len());
        listed.extend(page.heads.into_iter().map(|h| h.origin));
        if page.next_page_token.is_empty() {
            break;
        }
        request = civex_proto::v1::HeadsRequest {
            page_size: 1000,
            page_token: page.next_page_token,
        };
    }
    assert_eq!(pages, [civex_node::service::MAX_CURSORS, 1]);
    let mut sorted = listed.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(listed, sorted, "heads not in order, or repeated");
    assert_eq!(listed, read);
    let small = civex_proto::v1::HeadsRequest {
        page_size: 1000,
        page_token: String::new(),
    };
    let small = feed.heads(small).await.unwrap().into_inner();
    assert_eq!(small.heads.len(), 1000);
    assert_eq!(
        small.next_page_token,
        format!("heads-after-{}", listed[999])
    );
    let forged = civex_proto::v1::HeadsRequest {
        page_size: 0,
        page_token: "member-1".into(),
    };
    let refused = feed.heads(forged).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("page_token"),
        "{}",
        refused.message()
    );
    hub.stop().await;
}
