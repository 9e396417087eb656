//! Subscriptions: backlog, live tail, exact resume, cursor mismatch.

use civex_node::{
    core::feed::{verify_range, Entry, Tip},
    keys::parse_public_key,
};
use civex_proto::v1::{self as pb, subscribe_response::Event};
use tonic::Streaming;

use crate::support::{eventually, make_key, publish_row, Pair, Spec, TestNode};

/// Reads the next event, failing after the deadline.
async fn next_event(stream: &mut Streaming<pb::SubscribeResponse>) -> Event {
    let message = tokio::time::timeout(crate::support::DEADLINE, stream.message())
        .await
        .expect("no message before the deadline")
        .unwrap()
        .expect("the stream ended");
    message.event.unwrap()
}

/// Reads entries until `count` have arrived, verifying them from `tip`.
async fn read_entries(
    stream: &mut Streaming<pb::SubscribeResponse>,
    key: &ed25519_dalek::VerifyingKey,
    tip: &mut Option<Tip>,
    count: usize,
) -> Vec<Entry> {
    let mut out = Vec::new();
    while out.len() < count {
        match next_event(stream).await {
            Event::Entries(batch) => {
                let entries: Vec<Entry> = batch
                    .entries
                    .into_iter()
                    .map(|e| Entry::decode(e).unwrap())
                    .collect();
                *tip = verify_range("city-a", key, &[], tip.as_ref(), &entries).unwrap();
                out.extend(entries);
            }
            Event::Drained(_) => {}
            Event::Mismatch(m) => panic!("unexpected mismatch {m:?}"),
            Event::NotServed(n) => panic!("unexpected refusal {n:?}"),
        }
    }
    out
}

fn cursor(tip: Option<&Tip>) -> pb::Cursor {
    pb::Cursor {
        origin: "city-a".into(),
        feed_id: tip.map(|t| t.feed_id.to_vec()).unwrap_or_default(),
        seq: tip.map_or(0, |t| t.seq),
        entry_hash: tip.map(|t| t.hash.to_vec()).unwrap_or_default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_then_live_tail_then_exact_resume() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), Spec::new("city-a")).await;
    let key = parse_public_key(&node.public_key).unwrap();
    for i in 0..5 {
        publish_row(&node, &format!("i{i}"), 1.0).await;
    }
    let mut stream = node
        .feed()
        .await
        .subscribe(pb::SubscribeRequest {
            cursors: vec![cursor(None)],
            all_origins: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut tip = None;
    let backlog = read_entries(&mut stream, &key, &mut tip, 5).await;
    assert_eq!(
        backlog.iter().map(|e| e.body.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    match next_event(&mut stream).await {
        Event::Drained(d) => assert_eq!((d.origin.as_str(), d.head_seq), ("city-a", 5)),
        other => panic!("expected the backlog marker, got {other:?}"),
    }
    for i in 5..8 {
        publish_row(&node, &format!("i{i}"), 1.0).await;
    }
    let live = read_entries(&mut stream, &key, &mut tip, 3).await;
    assert_eq!(
        live.iter().map(|e| e.body.seq).collect::<Vec<_>>(),
        [6, 7, 8]
    );
    drop(stream);

    // Resume exactly after seq 8, while seq 9 is published.
    publish_row(&node, "i8", 1.0).await;
    let mut resumed = node
        .feed()
        .await
        .subscribe(pb::SubscribeRequest {
            cursors: vec![cursor(tip.as_ref())],
            all_origins: false,
        })
        .await
        .unwrap()
        .into_inner();
    let next = read_entries(&mut resumed, &key, &mut tip, 1).await;
    assert_eq!(
        next[0].body.seq, 9,
        "resume did not start at the exact next entry"
    );
    assert_eq!(node.head("city-a").await, (9, tip.unwrap().hash.to_vec()));
}

/// A subscription to one origin from `cursor`.
async fn subscribe_from(
    node: &TestNode,
    cursor: pb::Cursor,
) -> tonic::Streaming<pb::SubscribeResponse> {
    node.feed()
        .await
        .subscribe(pb::SubscribeRequest {
            cursors: vec![cursor],
            all_origins: false,
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_naming_another_entry_gets_the_evidence_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), Spec::new("city-a")).await;
    let receipts = [
        publish_row(&node, "a", 1.0).await,
        publish_row(&node, "b", 1.0).await,
    ];
    publish_row(&node, "c", 1.0).await;
    let cursor = |feed_id: Vec<u8>, seq| pb::Cursor {
        origin: "city-a".into(),
        feed_id,
        seq,
        entry_hash: vec![0xee; 32],
    };
    let mut stream = subscribe_from(&node, cursor(receipts[1].feed_id.clone(), 2)).await;
    match next_event(&mut stream).await {
        Event::Mismatch(m) => {
            let held = Entry::decode(m.held.unwrap()).unwrap();
            assert_eq!(held.body.seq, 2);
            assert_eq!(held.hash.to_vec(), receipts[1].entry_hash);
        }
        other => panic!("expected a mismatch, got {other:?}"),
    }
    // A cursor of another feed (the origin started over, on one side or the
    // other), behind or ahead of the head: the evidence is the genesis of
    // the feed held, which the subscriber checks with the origin's first
    // key (before, the entry at the cursor or the head, which is evidence
    // only where that is seq 1).
    assert_eq!(publish_row(&node, "d", 1.0).await.seq, 4);
    let first = crate::support::whole_feed(&node.address, "city-a").await[0].clone();
    for seq in [3, 9] {
        let mut stream = subscribe_from(&node, cursor(vec![0x99; 16], seq)).await;
        match next_event(&mut stream).await {
            Event::Mismatch(m) => {
                assert_eq!(m.held.as_ref(), Some(&first), "cursor at seq {seq}");
                assert_eq!(m.feed_id, receipts[0].feed_id);
            }
            other => panic!("expected a mismatch at seq {seq}, got {other:?}"),
        }
    }
    let bad = node
        .feed()
        .await
        .subscribe(pb::SubscribeRequest {
            cursors: vec![pb::Cursor {
                origin: "City A".into(),
                ..Default::default()
            }],
            all_origins: false,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(
        bad.message()
            .contains("cursors[0].origin: origin id \"City A\""),
        "{}",
        bad.message()
    );
    // A cursor at the largest seq has no next entry: refused by name (it
    // once overflowed and ended the stream without a word).
    let bad = node
        .feed()
        .await
        .subscribe(pb::SubscribeRequest {
            cursors: vec![pb::Cursor {
                origin: "city-a".into(),
                feed_id: receipts[0].feed_id.clone(),
                seq: u64::MAX,
                entry_hash: vec![0; 32],
            }],
            all_origins: false,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(
        bad.message().contains("cursors[0].seq"),
        "{}",
        bad.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_to_all_picks_up_origins_that_appear_later() {
    let dir = tempfile::tempdir().unwrap();
    // A admits B, whose key it pins.
    let b_key = make_key(&dir.path().join("b"));
    let a = TestNode::start(
        &dir.path().join("a"),
        Spec::new("city-a").trust("city-b", &b_key),
    )
    .await;
    let b = TestNode::start(
        &dir.path().join("b"),
        Spec::new("city-b")
            .peer("city-a", &a.address)
            .trust("city-a", &a.public_key),
    )
    .await;
    let mut stream = b.subscribe_all().await;
    // B holds nothing of city-a yet; A publishes only now.
    let receipt = publish_row(&a, "late", 1.0).await;
    loop {
        if let Event::Entries(batch) = next_event(&mut stream).await {
            let entry = Entry::decode(batch.entries[0].clone()).unwrap();
            assert_eq!((entry.body.origin.as_str(), entry.body.seq), ("city-a", 1));
            assert_eq!(entry.hash.to_vec(), receipt.entry_hash);
            break;
        }
    }
}

/// `Heads` with page_size 0 answers every head at once while they fit one
/// page (the refusal is for more than 4,096, tested with the backups).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_with_page_size_zero_answers_every_head_that_fits() {
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::start(dir.path()).await;
    pair.a.wait_ready().await;
    pair.b.wait_ready().await;
    publish_row(&pair.a, "x", 1.0).await;
    publish_row(&pair.b, "x", 2.0).await;
    eventually("A to hold city-b's entry", || async {
        pair.a.head("city-b").await.0 == 1
    })
    .await;
    let page = pair
        .a
        .feed()
        .await
        .heads(pb::HeadsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let origins: Vec<_> = page.heads.iter().map(|h| h.origin.as_str()).collect();
    assert_eq!(origins, ["city-a", "city-b"]);
    assert!(page.next_page_token.is_empty());
}
