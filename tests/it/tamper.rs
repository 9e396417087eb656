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

use crate::support::{civex_async, eventually, make_key, publish_row, stdout, Spec, TestNode};

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

    // A admits B, whose key it pins.
    let b_key = make_key(&dir.path().join("b"));
    let a = TestNode::start(&a_dir, Spec::new("city-a").trust("city-b", &b_key)).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_payload_kind_is_verified_stored_and_relayed_but_not_queried() {
    let dir = tempfile::tempdir().unwrap();
    let a_dir = dir.path().join("a");
    let mut a = TestNode::start(&a_dir, Spec::new("city-a")).await;
    let first = publish_row(&a, "known", 1.0).await;
    a.stop().await;
    // A newer node's entry: a payload field this build does not know (99).
    {
        let store = SledStore::open(&a_dir.join("data"), 1 << 24).unwrap();
        let head = store.head("city-a").unwrap().unwrap();
        let mut body = civex_proto::v1::EntryBody {
            origin: "city-a".into(),
            feed_id: head.tip.feed_id.to_vec(),
            seq: 2,
            prev_hash: head.tip.hash.to_vec(),
            time_unix_micros: head.tip.time_unix_micros + 1,
            idempotency_key: vec![3; 16],
            payload: None,
        }
        .encode_to_vec();
        prost::encoding::bytes::encode(99, &b"from the future".to_vec(), &mut body);
        let key = load_key_file(&a_dir.join("feed.key")).unwrap();
        let signature = {
            use ed25519_dalek::Signer;
            let mut message = b"civex/v1/entry\0".to_vec();
            message.extend_from_slice(&body);
            key.sign(&message).to_bytes().to_vec()
        };
        let entry = Entry::decode(SignedEntry {
            body: body.into(),
            signature: signature.into(),
        })
        .unwrap();
        let batch = CommitBatch {
            heads: vec![(
                "city-a".into(),
                civex_node::store::Head {
                    tip: entry.tip(),
                    received_unix_micros: 0,
                },
            )],
            runs: vec![vec![entry]],
            ..Default::default()
        };
        store.commit(&batch).unwrap();
    }
    // A admits B, whose key it pins.
    let b_key = make_key(&dir.path().join("b"));
    let a = TestNode::start(&a_dir, Spec::new("city-a").trust("city-b", &b_key)).await;
    let b = TestNode::start(
        &dir.path().join("b"),
        Spec::new("city-b")
            .peer("city-a", &a.address)
            .trust("city-a", &a.public_key),
    )
    .await;
    let a_head = a.head("city-a").await;
    assert_eq!(a_head.0, 2);
    eventually("B to take the unknown kind", || async {
        b.head("city-a").await == a_head
    })
    .await;
    let records = b
        .query()
        .await
        .observations(civex_proto::v1::ObservationsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .observations;
    assert_eq!(records.len(), 1, "only the known entry is queryable");
    assert_eq!(records[0].seq, first.seq);
}
