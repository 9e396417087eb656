//! Tampered entries: one flipped byte in a body, one in a signature, and a
//! correctly signed entry with a wrong prev hash, written into a node's
//! store behind its back. `civex verify` and a replicating node refuse them.

use civex_node::{
    core::feed::Entry,
    keys::load_key_file,
    store::{CommitBatch, SledStore, Store},
};
use civex_proto::v1::SignedEntry;
use prost::Message;

use crate::support::{civex_async, eventually, publish_row, stdout, Spec, TestNode};

#[derive(Clone, Copy, Debug)]
enum Tamper {
    BodyByte,
    SignatureByte,
    PrevHash,
}

/// Replaces seq 3 of city-a's feed in the store at `dir`.
fn tamper(dir: &std::path::Path, how: Tamper) {
    let store = SledStore::open(&dir.join("data"), 1 << 24).unwrap();
    let original = store.entries("city-a", 3, 1, usize::MAX).unwrap().remove(0);
    let forged = match how {
        Tamper::BodyByte => {
            let mut body = original.body.to_vec();
            let at = body.windows(8).position(|w| w == b"tamper-3").unwrap();
            body[at] ^= 1;
            SignedEntry {
                body: body.into(),
                ..original
            }
        }
        Tamper::SignatureByte => {
            let mut signature = original.signature.to_vec();
            signature[5] ^= 1;
            SignedEntry {
                signature: signature.into(),
                ..original
            }
        }
        Tamper::PrevHash => {
            let mut body = civex_proto::v1::EntryBody::decode(original.body.as_ref()).unwrap();
            body.prev_hash = vec![7; 32];
            let key = load_key_file(&dir.join("feed.key")).unwrap();
            Entry::sign(&key, body).unwrap().signed
        }
    };
    let batch = CommitBatch {
        runs: vec![vec![Entry::decode(forged).unwrap()]],
        ..Default::default()
    };
    store.commit(&batch).unwrap();
}

async fn refused_everywhere(how: Tamper, expected: &str) {
    let dir = tempfile::tempdir().unwrap();
    let a_dir = dir.path().join("a");
    let mut a = TestNode::start(&a_dir, Spec::new("city-a")).await;
    for i in 1..=5 {
        publish_row(&a, &format!("tamper-{i}"), i as f64).await;
    }
    a.stop().await;
    tamper(&a_dir, how);

    let config = a_dir.join("node.toml");
    let out = civex_async(&["verify", "--config", config.to_str().unwrap()]).await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "verify accepted a {how:?} tamper: {}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains(expected),
        "verify output lacks {expected:?}: {}",
        stdout(&out)
    );

    let a = TestNode::start(&a_dir, Spec::new("city-a")).await;
    let b = TestNode::start(
        &dir.path().join("b"),
        Spec::new("city-b")
            .peer("city-a", &a.address)
            .trust("city-a", &a.public_key),
    )
    .await;
    eventually("B to refuse the tampered entry", || async {
        let status = b.status().await;
        status.peers[0].refused > 0 && b.head("city-a").await.0 == 2
    })
    .await;
    let status = b.status().await;
    assert!(
        status.peers[0].last_error.contains(expected),
        "{}",
        status.peers[0].last_error
    );
    assert_eq!(
        b.head("city-a").await.0,
        2,
        "B stored a tampered entry or one after it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_body_byte_is_refused() {
    refused_everywhere(Tamper::BodyByte, "seq 3 has an invalid signature").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_signature_byte_is_refused() {
    refused_everywhere(Tamper::SignatureByte, "seq 3 has an invalid signature").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_prev_hash_is_refused() {
    refused_everywhere(Tamper::PrevHash, "seq 3 does not link").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_passes_a_clean_store() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = TestNode::start(dir.path(), Spec::new("city-a")).await;
    for i in 1..=3 {
        publish_row(&a, &format!("i{i}"), 1.0).await;
    }
    a.stop().await;
    let config = dir.path().join("node.toml");
    let out = civex_async(&[
        "verify",
        "--config",
        config.to_str().unwrap(),
        "--output",
        "json",
    ])
    .await;
    assert!(out.status.success(), "{}", stdout(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["clean"], true);
    assert_eq!(report["verified"], 3);
    // The store itself is untouched by verify.
    let store = SledStore::open(&dir.path().join("data"), 1 << 20).unwrap();
    assert_eq!(store.head("city-a").unwrap().unwrap().tip.seq, 3);
}
