//! A malicious peer: a test server speaking the Feed protocol (over mTLS,
//! with a valid member certificate) that sends every kind of bad entry and
//! a fork. Each is refused or kept as evidence; the good origin goes on.

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use civex_node::{
    core::{
        feed::{Entry, ENTRY_SIGNATURE_CONTEXT, GENESIS_PREV_HASH},
        ids::hex,
    },
    keys::public_key_hex,
    pki::Identity,
    tls::{Tls, TlsFiles},
    transport::{self, Security},
};
use civex_proto::v1::{
    self as pb,
    entry_body::Payload,
    feed_server::{Feed, FeedServer},
    subscribe_response::Event,
    EntryBody, OfferWithdrawal, SignedEntry,
};
use ed25519_dalek::SigningKey;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::support::{civex_async, eventually, issue_identity, stderr, stdout, Spec, TestNode};

/// A feed of `origin` signed with `key`, with entries made on demand.
struct Forger {
    key: SigningKey,
    origin: String,
    feed_id: Vec<u8>,
}

impl Forger {
    fn new(seed: u8, origin: &str) -> Self {
        Self {
            key: SigningKey::from_bytes(&[seed; 32]),
            origin: origin.into(),
            feed_id: vec![seed; 16],
        }
    }

    /// Entry `seq` linked to `prev`, with `note` making it unique.
    fn entry(&self, seq: u64, prev: &[u8], note: &str) -> Entry {
        let withdrawal = Payload::Withdrawal(OfferWithdrawal {
            offer_id: format!("offer-{seq}"),
            reason: note.into(),
        });
        self.entry_with(seq, prev, withdrawal, &[])
    }

    /// Entry `seq` linked to `prev` carrying `payload`, with `extra` bytes
    /// appended to the body as a newer build might write fields this one
    /// does not know; signed over the bytes as they are.
    fn entry_with(&self, seq: u64, prev: &[u8], payload: Payload, extra: &[u8]) -> Entry {
        use ed25519_dalek::Signer;
        use prost::Message;
        let mut body = EntryBody {
            origin: self.origin.clone(),
            feed_id: self.feed_id.clone(),
            seq,
            prev_hash: prev.to_vec(),
            time_unix_micros: 1_000 + seq as i64,
            idempotency_key: vec![seq as u8; 16],
            payload: Some(payload),
        }
        .encode_to_vec();
        body.extend_from_slice(extra);
        let mut message = ENTRY_SIGNATURE_CONTEXT.to_vec();
        message.extend_from_slice(&body);
        let signature = self.key.sign(&message).to_bytes();
        Entry::decode(SignedEntry {
            body: body.into(),
            signature: signature.to_vec().into(),
        })
        .unwrap()
    }

    /// A good chain of `count` entries.
    fn chain(&self, count: u64) -> Vec<Entry> {
        let mut out: Vec<Entry> = Vec::new();
        for seq in 1..=count {
            let prev = out
                .last()
                .map_or(GENESIS_PREV_HASH.to_vec(), |e| e.hash.to_vec());
            out.push(self.entry(seq, &prev, "good"));
        }
        out
    }
}

fn batch(origin: &str, entries: Vec<SignedEntry>) -> pb::SubscribeResponse {
    pb::SubscribeResponse {
        event: Some(Event::Entries(pb::EntryBatch {
            origin: origin.into(),
            entries,
        })),
    }
}

/// What a scripted peer serves on each subscription.
#[derive(Clone, Default)]
struct Script {
    /// Step n on the n-th subscription,
    steps: Vec<Vec<pb::SubscribeResponse>>,
    /// then this on every later one;
    then: Vec<pb::SubscribeResponse>,
    /// each stream then failing with this, if set, or else ending.
    end: Option<Status>,
    /// What `Heads` answers, if set (else UNIMPLEMENTED).
    heads: Option<Vec<pb::Head>>,
    /// Streams from the n-th subscription on (counted from 0) wait this
    /// long after their step, before their end.
    hold: Option<(usize, Duration)>,
    /// When each subscription came, if set.
    times: Option<Arc<std::sync::Mutex<Vec<std::time::Instant>>>>,
    /// If set, `Heads` never answers, counted here.
    stall_heads: Option<Arc<Stalled>>,
    /// If set, sent again and again, as fast as the node reads, after the
    /// step for as long as the hold lasts.
    flood: Option<pb::SubscribeResponse>,
}

/// `Heads` calls that never answer: how many began, how many are pending
/// now (a call the client gives up is dropped), and the most pending when
/// one began.
#[derive(Default)]
struct Stalled {
    calls: AtomicUsize,
    pending: AtomicUsize,
    most: AtomicUsize,
}

/// Counts a stalled call pending until dropped.
struct Pending(Arc<Stalled>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves a [`Script`].
struct Malicious {
    script: Script,
    calls: Arc<AtomicUsize>,
}

type Messages = Pin<Box<dyn Stream<Item = Result<pb::SubscribeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Feed for Malicious {
    type SubscribeStream = Messages;

    async fn subscribe(
        &self,
        _request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Messages>, Status> {
        let script = &self.script;
        if let Some(times) = &script.times {
            times.lock().unwrap().push(std::time::Instant::now());
        }
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        let step = script.steps.get(call).unwrap_or(&script.then).clone();
        // Send the step and end the stream: the node reconnects for the next.
        let end = script.end.clone().map(Err);
        let hold = match script.hold {
            Some((from, hold)) if call >= from => hold,
            _ => Duration::ZERO,
        };
        let flood = script.flood.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(step.len() + 1);
        tokio::spawn(async move {
            for message in step {
                if tx.send(Ok(message)).await.is_err() {
                    return;
                }
            }
            let until = tokio::time::Instant::now() + hold;
            while let Some(message) = flood
                .clone()
                .filter(|_| tokio::time::Instant::now() < until)
            {
                if tx.send(Ok(message)).await.is_err() {
                    return;
                }
            }
            tokio::time::sleep_until(until).await;
            if let Some(end) = end {
                let _ = tx.send(end).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn heads(
        &self,
        _request: Request<pb::HeadsRequest>,
    ) -> Result<Response<pb::HeadsResponse>, Status> {
        if let Some(stalled) = &self.script.stall_heads {
            let before = stalled.pending.fetch_add(1, Ordering::SeqCst);
            stalled.most.fetch_max(before, Ordering::SeqCst);
            stalled.calls.fetch_add(1, Ordering::SeqCst);
            let _pending = Pending(Arc::clone(stalled));
            std::future::pending::<()>().await;
        }
        let heads = self.script.heads.clone();
        let heads = heads.ok_or_else(|| Status::unimplemented("not in this test"))?;
        Ok(Response::new(pb::HeadsResponse {
            heads,
            next_page_token: String::new(),
        }))
    }
}

/// Starts a [`Malicious`] peer serving `steps` over mTLS as member
/// `city-m` (its identity made under `dir`); returns its address and the
/// count of subscriptions it answered.
async fn serve_script(
    dir: &std::path::Path,
    steps: Vec<Vec<pb::SubscribeResponse>>,
) -> (String, Arc<AtomicUsize>) {
    let script = Script {
        steps,
        ..Script::default()
    };
    serve_script_as(dir, "city-m", script).await
}

/// Serves `script` as [`serve_script`] does, as member `origin`.
async fn serve_script_as(
    dir: &std::path::Path,
    origin: &str,
    script: Script,
) -> (String, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let identity = Identity::Origin(origin.into());
    issue_identity(dir, &identity);
    let tls = Tls::load(TlsFiles::in_dir(dir), Some(identity)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let incoming = transport::incoming(listener, Security::Mutual(tls), Duration::from_secs(5));
    let server = FeedServer::new(Malicious {
        script,
        calls: calls.clone(),
    })
    .max_encoding_message_size(16 << 20);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(server)
            .serve_with_incoming(incoming),
    );
    (address, calls)
}

/// Node city-n (under `dir`, publishing open without peers) with one peer,
/// city-m, serving `script`; `spec` adds to its config. Returns the node
/// and city-m's count of subscriptions.
async fn node_with_scripted_peer(
    dir: &std::path::Path,
    script: Script,
    spec: impl FnOnce(Spec) -> Spec,
) -> (TestNode, Arc<AtomicUsize>) {
    let (m_address, m_calls) = serve_script_as(&dir.join("m"), "city-m", script).await;
    let spec = spec(Spec::new("city-n").peer("city-m", &m_address)).allow_without_peers();
    (TestNode::start(&dir.join("node"), spec).await, m_calls)
}

/// Node city-n (under `dir`) replicating `feed`, city-a's entries signed
/// as `a`'s key holder made them, from a scripted peer that serves them in
/// one message and holds nothing of city-n's own feed; returned once it
/// holds all of them.
async fn node_replicating(dir: &std::path::Path, a: &Forger, feed: &[Entry]) -> TestNode {
    let own_drained = pb::SubscribeResponse {
        event: Some(Event::Drained(pb::BacklogDrained {
            origin: "city-n".into(),
            head_seq: 0,
        })),
    };
    let signed = feed.iter().map(|e| e.signed.clone()).collect();
    let step = vec![batch("city-a", signed), own_drained];
    let (m_address, _) = serve_script(&dir.join("m"), vec![step]).await;
    let node = TestNode::start(
        &dir.join("node"),
        Spec::new("city-n")
            .peer("city-m", &m_address)
            .trust("city-a", &public_key_hex(&a.key.verifying_key()))
            .allow_without_peers(),
    )
    .await;
    let held = feed.len() as u64;
    eventually("city-a's entries to be held", || async {
        node.head("city-a").await.0 == held
    })
    .await;
    node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malicious_peer_is_refused_and_its_fork_kept_as_evidence() {
    let dir = tempfile::tempdir().unwrap();
    let a = Forger::new(1, "city-a");
    let b = Forger::new(2, "city-b");
    let a_good = a.chain(2);
    let b_good = b.chain(5);
    let signed = |entries: &[Entry]| entries.iter().map(|e| e.signed.clone()).collect::<Vec<_>>();

    // Bad entries for city-b, each after the 3 good ones the node holds.
    let tip = b_good[2].hash.to_vec();
    let mut bad_signature = b.entry(4, &tip, "x").signed;
    let mut signature = bad_signature.signature.to_vec();
    signature[0] ^= 1;
    bad_signature.signature = signature.into();
    let broken_chain = b.entry(4, &[9; 32], "x").signed;
    let out_of_order = b.entry(6, &tip, "x").signed;
    let replayed = b_good[1].signed.clone();
    let malformed = SignedEntry {
        body: vec![0xff, 0xff, 0xff].into(),
        signature: vec![0; 64].into(),
    };
    let forged_by_another_key = Forger::new(3, "city-b").entry(4, &tip, "x").signed;
    let unknown_origin = Forger::new(4, "city-x").chain(1);
    let oversize = SignedEntry {
        body: vec![0; 5 << 20].into(),
        signature: vec![0; 64].into(),
    };
    // A fork of city-a: another entry at seq 2, validly signed by its key.
    let fork = a.entry(2, &a_good[0].hash, "the other history");

    let bad_steps: Vec<(&str, pb::SubscribeResponse)> = vec![
        ("bad signature", batch("city-b", vec![bad_signature])),
        ("broken chain", batch("city-b", vec![broken_chain])),
        ("out of order", batch("city-b", vec![out_of_order])),
        ("replayed", batch("city-b", vec![replayed])),
        ("malformed", batch("city-b", vec![malformed])),
        ("another key", batch("city-b", vec![forged_by_another_key])),
        ("unknown origin", batch("city-x", signed(&unknown_origin))),
        ("oversize message", batch("city-b", vec![oversize])),
        (
            "fork",
            pb::SubscribeResponse {
                event: Some(Event::Mismatch(pb::CursorMismatch {
                    origin: "city-a".into(),
                    held: Some(fork.signed.clone()),
                    feed_id: a.feed_id.clone(),
                })),
            },
        ),
    ];
    let mut steps = vec![vec![
        batch("city-a", signed(&a_good)),
        batch("city-b", signed(&b_good[..3])),
    ]];
    steps.extend(bad_steps.iter().map(|(_, message)| vec![message.clone()]));
    // Last: the rest of city-b, and a valid next entry of city-a (linked
    // to the seq 2 held): quarantined, city-a takes nothing more.
    let a_next = a.chain(3).remove(2);
    assert_eq!(a_next.body.prev_hash, a_good[1].hash.to_vec());
    // Its marker names that seq 3: an honest peer's head, which the node
    // skipped, so not a claim to blame the peer for.
    let a_drained = pb::SubscribeResponse {
        event: Some(Event::Drained(pb::BacklogDrained {
            origin: "city-a".into(),
            head_seq: 3,
        })),
    };
    steps.push(vec![
        batch("city-b", signed(&b_good[3..])),
        batch("city-a", vec![a_next.signed]),
        a_drained,
    ]);
    let (m_address, calls) = serve_script(&dir.path().join("m"), steps).await;

    let node = TestNode::start(
        &dir.path().join("node"),
        Spec::new("city-n")
            .peer("city-m", &m_address)
            .trust("city-a", &public_key_hex(&a.key.verifying_key()))
            .trust("city-b", &public_key_hex(&b.key.verifying_key()))
            .allow_without_peers(),
    )
    .await;

    // One more subscription after the last step: it was read to its end.
    eventually("the good entries and every bad step", || async {
        calls.load(Ordering::SeqCst) > bad_steps.len() + 2 && node.head("city-b").await.0 == 5
    })
    .await;
    // city-b: exactly the good chain, nothing of the bad steps.
    let mut feed = node.feed().await;
    let mut stream = feed
        .subscribe(pb::SubscribeRequest {
            cursors: vec![pb::Cursor {
                origin: "city-b".into(),
                ..Default::default()
            }],
            all_origins: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut held = Vec::new();
    while held.len() < 5 {
        if let Some(Event::Entries(batch)) = stream.message().await.unwrap().unwrap().event {
            held.extend(batch.entries);
        }
    }
    assert_eq!(held, signed(&b_good), "city-b differs from its good chain");

    // city-a: the original history stays, the fork is on record, and
    // nothing after it was taken.
    assert_eq!(node.head("city-a").await, (2, a_good[1].hash.to_vec()));
    assert_eq!(
        node.head("city-x").await.0,
        0,
        "an unknown origin was stored"
    );
    let status = node.status().await;
    let conflict = status
        .conflicts
        .iter()
        .find(|c| c.origin == "city-a")
        .expect("no conflict on record for city-a");
    assert_eq!((conflict.kind.as_str(), conflict.seq), ("fork", 2));
    assert_eq!(conflict.peer, "city-m");
    // The status names the two entries; the evidence is served apart.
    let size = |e: &Entry| (e.signed.body.len() + e.signed.signature.len()) as u32;
    assert_eq!(conflict.held_seq, 2);
    assert_eq!(conflict.held_hash, a_good[1].hash.to_vec());
    assert_eq!(conflict.held_size, size(&a_good[1]));
    assert_eq!(conflict.other_hash, fork.hash.to_vec());
    assert_eq!(conflict.other_size, size(&fork));
    assert_eq!(status.conflicts_not_shown, 0);
    let mut status_client = pb::status_client::StatusClient::new(node.channel().await);
    let evidence = status_client
        .conflict_evidence(pb::ConflictEvidenceRequest {
            origin: "city-a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(evidence.report.as_ref(), Some(conflict));
    assert_eq!(evidence.other.as_ref(), Some(&fork.signed));
    assert_eq!(evidence.held.as_ref(), Some(&a_good[1].signed));
    let none = status_client
        .conflict_evidence(pb::ConflictEvidenceRequest {
            origin: "city-b".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(none.code(), tonic::Code::NotFound, "{none:?}");
    // The same from the CLI: listed by civex status, shown whole by civex
    // conflict, its JSON the signed bytes.
    let out = node.cli(&["status"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    let short = |e: &Entry| hex(&e.hash[..8]);
    assert!(
        table.contains(&short(&a_good[1])) && table.contains(&short(&fork)),
        "{table}"
    );
    assert!(table.contains("civex conflict ORIGIN"), "{table}");
    let out = node.cli(&["--output", "json", "status"]).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["conflicts"][0]["other_hash"], hex(&fork.hash));
    assert_eq!(json["conflicts"][0]["held_size"], size(&a_good[1]));
    assert_eq!(json["conflicts_not_shown"], 0);
    let out = node.cli(&["conflict", "city-a"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    assert!(
        table.contains("fork of city-a at seq 2, from peer city-m")
            && table.contains(&hex(&fork.hash))
            && table.contains(&hex(&a_good[1].hash)),
        "{table}"
    );
    let out = node.cli(&["--output", "json", "conflict", "city-a"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for (side, entry) in [("held", &a_good[1]), ("other", &fork)] {
        assert_eq!(json[side]["seq"], 2);
        assert_eq!(json[side]["hash"], hex(&entry.hash));
        assert_eq!(json[side]["body"], hex(&entry.signed.body));
        assert_eq!(json[side]["signature"], hex(&entry.signed.signature));
    }
    let out = node.cli(&["conflict", "city-b"]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no conflict of city-b is on record"),
        "{}",
        stderr(&out)
    );
    let peer = &status.peers[0];
    assert!(
        !peer.last_error.contains("claims"),
        "an honest head of a quarantined origin shown as a claim: {}",
        peer.last_error
    );
    assert!(
        peer.refused >= 7,
        "only {} entries counted as refused",
        peer.refused
    );
}

/// The roster origin `consortium`'s first two entries: one adding city-a
/// (`a`'s key), one ending its feed at `last` and naming `new`'s feed and
/// key.
fn roster_replacing(consortium: &Forger, a: &Forger, new: &Forger, last: &Entry) -> (Entry, Entry) {
    let member = |replacements| {
        Payload::Roster(pb::RosterEntry {
            origin: "city-a".into(),
            name: "City A".into(),
            feed_key: a.key.verifying_key().to_bytes().to_vec(),
            tls_identity: "civex:origin:city-a".into(),
            removed: false,
            replacements,
        })
    };
    let added = consortium.entry_with(1, &GENESIS_PREV_HASH, member(Vec::new()), &[]);
    let replaced = pb::FeedReplacement {
        old_feed_id: a.feed_id.clone(),
        last_seq: last.body.seq,
        last_hash: last.hash.to_vec(),
        new_feed_id: new.feed_id.clone(),
        new_feed_key: new.key.verifying_key().to_bytes().to_vec(),
    };
    let replacement = consortium.entry_with(2, &added.hash, member(vec![replaced]), &[]);
    (added, replacement)
}

/// Where the roster replaced a city's lost key, whoever holds that key can
/// still sign another entry at a seq of the history the roster kept. Once
/// the node holds that history's last entry, such an entry is refused as
/// the roster's word says, not kept as evidence of a fork: replication of
/// the city is not stopped, and its new feed goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_signed_with_a_lost_key_in_the_kept_history_is_refused_not_evidence() {
    let dir = tempfile::tempdir().unwrap();
    let consortium = Forger::new(30, "consortium");
    let a = Forger::new(31, "city-a");
    let a_new = Forger::new(32, "city-a");
    let a_feed = a.chain(3);
    let (added, replacement) = roster_replacing(&consortium, &a, &a_new, &a_feed[2]);
    // The lost key's other history, at seq 3, sent as a peer holding it
    // answers a cursor at seq 3 (a mismatch), each time.
    let forged = a.entry(3, &a_feed[1].hash, "the thief's");
    let mismatch = pb::SubscribeResponse {
        event: Some(Event::Mismatch(pb::CursorMismatch {
            origin: "city-a".into(),
            held: Some(forged.signed.clone()),
            feed_id: a.feed_id.clone(),
        })),
    };
    let a_next = a_new.entry(4, &a_feed[2].hash, "under the new key");
    let own_drained = pb::SubscribeResponse {
        event: Some(Event::Drained(pb::BacklogDrained {
            origin: "city-n".into(),
            head_seq: 0,
        })),
    };
    let signed = |entries: &[&Entry]| entries.iter().map(|e| e.signed.clone()).collect();
    let script = Script {
        steps: vec![
            vec![
                batch("consortium", signed(&[&added, &replacement])),
                own_drained.clone(),
            ],
            vec![
                batch("city-a", signed(&a_feed.iter().collect::<Vec<_>>())),
                own_drained.clone(),
            ],
            vec![mismatch.clone(), own_drained.clone()],
        ],
        then: vec![mismatch, batch("city-a", signed(&[&a_next])), own_drained],
        ..Script::default()
    };
    let (node, calls) = node_with_scripted_peer(dir.path(), script, |spec| {
        spec.trust(
            "consortium",
            &public_key_hex(&consortium.key.verifying_key()),
        )
        .roster("consortium")
    })
    .await;
    eventually("city-a's entry under the new key", || async {
        node.head("city-a").await == (4, a_next.hash.to_vec())
    })
    .await;
    assert!(calls.load(Ordering::SeqCst) > 3);
    let status = node.status().await;
    assert!(
        status.conflicts.is_empty(),
        "a fork signed with the lost key was kept as evidence: {:?}",
        status.conflicts
    );
    let peer = &status.peers[0];
    assert!(
        peer.last_error.contains("the roster ended at seq 3"),
        "{}",
        peer.last_error
    );
}

/// A replica that took a city's entries past the seq where the roster
/// later ends the city's feed cannot follow the new feed: its peers answer
/// its cursor with a mismatch. Status says so and names the way out,
/// instead of a bare "diverges".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_holding_entries_past_a_replacement_is_told_the_way_out() {
    let dir = tempfile::tempdir().unwrap();
    let consortium = Forger::new(40, "consortium");
    let a = Forger::new(41, "city-a");
    let a_new = Forger::new(42, "city-a");
    let a_feed = a.chain(5);
    let (added, replacement) = roster_replacing(&consortium, &a, &a_new, &a_feed[2]);
    let own_drained = pb::SubscribeResponse {
        event: Some(Event::Drained(pb::BacklogDrained {
            origin: "city-n".into(),
            head_seq: 0,
        })),
    };
    // A peer that follows the new feed answers the cursor at seq 5 of the
    // ended feed with its genesis.
    let mismatch = pb::SubscribeResponse {
        event: Some(Event::Mismatch(pb::CursorMismatch {
            origin: "city-a".into(),
            held: Some(a_feed[0].signed.clone()),
            feed_id: a.feed_id.clone(),
        })),
    };
    let signed = |entries: &[Entry]| entries.iter().map(|e| e.signed.clone()).collect();
    let script = Script {
        steps: vec![
            vec![batch("consortium", signed(&[added])), own_drained.clone()],
            vec![batch("city-a", signed(&a_feed)), own_drained.clone()],
            vec![
                batch("consortium", signed(&[replacement])),
                own_drained.clone(),
            ],
        ],
        then: vec![mismatch, own_drained],
        ..Script::default()
    };
    let (node, _) = node_with_scripted_peer(dir.path(), script, |spec| {
        spec.trust(
            "consortium",
            &public_key_hex(&consortium.key.verifying_key()),
        )
        .roster("consortium")
    })
    .await;
    eventually("the way out on show", || async {
        node.status().await.peers[0]
            .last_error
            .contains("up to seq 5, past seq 3 where the federation roster ended it")
    })
    .await;
    let status = node.status().await;
    assert!(
        status.peers[0]
            .last_error
            .contains("restore this node's store"),
        "{}",
        status.peers[0].last_error
    );
    assert!(status.conflicts.is_empty());
    assert_eq!(node.head("city-a").await.0, 5);
}

/// A city's key holder can make a range that only its last entry's
/// signature covers; a hub that took it whole serves it on in pieces (of
/// 1,024 entries), and a node takes it from the hub all the same: the
/// pieces a later signature covers wait for it, and nothing is stored
/// before it verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_covered_range_a_hub_took_is_taken_from_it_in_pieces() {
    let dir = tempfile::tempdir().unwrap();
    let a = Forger::new(1, "city-a");
    let wrong = Forger {
        key: SigningKey::from_bytes(&[9; 32]),
        ..Forger::new(1, "city-a")
    };
    // More entries than a hub serves in one message (1,024).
    let total = 1_100;
    let mut feed: Vec<Entry> = Vec::new();
    for seq in 1..=total {
        let prev = feed
            .last()
            .map_or(GENESIS_PREV_HASH.to_vec(), |e| e.hash.to_vec());
        let by = if seq == total { &a } else { &wrong };
        feed.push(by.entry(seq, &prev, "covered"));
    }
    let hub_drained = pb::SubscribeResponse {
        event: Some(Event::Drained(pb::BacklogDrained {
            origin: "city-h".into(),
            head_seq: 0,
        })),
    };
    let signed = feed.iter().map(|e| e.signed.clone()).collect();
    let (m_address, _) = serve_script(
        &dir.path().join("m"),
        vec![vec![batch("city-a", signed), hub_drained]],
    )
    .await;
    let n_key = crate::support::make_key(&dir.path().join("n"));
    let a_key = public_key_hex(&a.key.verifying_key());
    let hub = TestNode::start(
        &dir.path().join("h"),
        Spec::new("city-h")
            .peer("city-m", &m_address)
            .trust("city-a", &a_key)
            .trust("city-n", &n_key)
            .allow_without_peers(),
    )
    .await;
    eventually("the hub to hold city-a's range", || async {
        hub.head("city-a").await.0 == total
    })
    .await;
    hub.wait_ready().await;
    crate::support::publish_row(&hub, "k0", 1.0).await;
    let n = TestNode::start(
        &dir.path().join("n"),
        Spec::new("city-n")
            .peer("city-h", &hub.address)
            .trust("city-a", &a_key)
            .trust("city-h", &hub.public_key),
    )
    .await;
    eventually(
        "city-n to take city-a's range and the hub's own entry",
        || async { n.head("city-a").await.0 == total && n.head("city-h").await.0 == 1 },
    )
    .await;
    assert_eq!(n.head("city-a").await.1, feed.last().unwrap().hash.to_vec());
    let status = n.status().await;
    let peer = status.peers.iter().find(|p| p.name == "city-h").unwrap();
    assert_eq!(peer.refused, 0, "{peer:?}");
    assert!(status.publish_ready);
}

/// Entries no signature covers are refused at the peer's backlog marker
/// of their origin, counted and named, and that origin is set aside for
/// the session: the origins the peer serves after it still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_refused_from_a_peer_stop_their_origin_only() {
    let dir = tempfile::tempdir().unwrap();
    let a = Forger::new(1, "city-a");
    let b = Forger::new(2, "city-b");
    let wrong = Forger {
        key: SigningKey::from_bytes(&[9; 32]),
        ..Forger::new(1, "city-a")
    };
    let signed = |entries: &[Entry]| entries.iter().map(|e| e.signed.clone()).collect::<Vec<_>>();
    let drained = |origin: &str, head_seq: u64| pb::SubscribeResponse {
        event: Some(Event::Drained(pb::BacklogDrained {
            origin: origin.into(),
            head_seq,
        })),
    };
    // city-a: three linked entries, none validly signed, over two messages.
    let forged = wrong.chain(3);
    let b_good = b.chain(2);
    let step = vec![
        batch("city-a", signed(&forged[..2])),
        batch("city-a", signed(&forged[2..])),
        drained("city-a", 3),
        batch("city-b", signed(&b_good)),
        drained("city-b", 2),
        drained("city-n", 0),
    ];
    let script = Script {
        steps: vec![step],
        ..Script::default()
    };
    let (node, _) = node_with_scripted_peer(dir.path(), script, |spec| {
        spec.trust("city-a", &public_key_hex(&a.key.verifying_key()))
            .trust("city-b", &public_key_hex(&b.key.verifying_key()))
    })
    .await;
    eventually("city-b's entries after city-a's refusal", || async {
        node.head("city-b").await.0 == 2
    })
    .await;
    eventually("the refusal of city-a on show", || async {
        let status = node.status().await;
        status.peers[0]
            .last_error
            .contains("city-a: seq 1 has an invalid signature")
    })
    .await;
    assert_eq!(node.head("city-a").await.0, 0, "a refused entry was stored");
    assert!(node.status().await.peers[0].refused >= 3);
}

/// Entries a peer leaves waiting for a cover in its live tail, its stream
/// left open, are refused once the connect timeout has passed, counted and
/// named: a peer cannot hold them back for the rest of the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_left_waiting_for_a_cover_are_refused_after_the_timeout() {
    refused_while_waiting_for_a_cover(None).await;
}

/// The same while the peer sends other messages without a pause: the
/// entries still wait no longer than twice the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_left_waiting_for_a_cover_are_refused_while_a_peer_floods_the_session() {
    // A marker of an origin this node does not know, read and skipped.
    let unknown = pb::SubscribeResponse {
        event: Some(Event::Drained(pb::BacklogDrained {
            origin: "city-z".into(),
            head_seq: 0,
        })),
    };
    refused_while_waiting_for_a_cover(Some(unknown)).await;
}

/// A scripted peer sends both backlogs' markers, then three entries of
/// city-a with forged signatures, then `flood` (if any) for a minute:
/// the node refuses the three, and stores none.
async fn refused_while_waiting_for_a_cover(flood: Option<pb::SubscribeResponse>) {
    let dir = tempfile::tempdir().unwrap();
    let a = Forger::new(1, "city-a");
    let wrong = Forger {
        key: SigningKey::from_bytes(&[9; 32]),
        ..Forger::new(1, "city-a")
    };
    let drained = |origin: &str| pb::SubscribeResponse {
        event: Some(Event::Drained(pb::BacklogDrained {
            origin: origin.into(),
            head_seq: 0,
        })),
    };
    let forged = wrong.chain(3);
    let signed = forged.iter().map(|e| e.signed.clone()).collect();
    // Both backlogs drained, then the live tail sends them and stays open.
    let step = vec![
        drained("city-n"),
        drained("city-a"),
        batch("city-a", signed),
    ];
    let script = Script {
        steps: vec![step],
        hold: Some((0, Duration::from_secs(60))),
        flood,
        ..Script::default()
    };
    let (node, _) = node_with_scripted_peer(dir.path(), script, |spec| {
        spec.trust("city-a", &public_key_hex(&a.key.verifying_key()))
    })
    .await;
    eventually("the held-back entries refused", || async {
        let peer = &node.status().await.peers[0];
        peer.refused == 3
            && peer
                .last_error
                .contains("city-a: seq 1 has an invalid signature")
    })
    .await;
    assert_eq!(node.head("city-a").await.0, 0, "a refused entry was stored");
}

/// A peer relaying many origins: the status lists 16 of them for it (those
/// this node lags furthest behind first) and counts the rest, through gRPC
/// and in both forms of `civex status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_of_many_origins_is_shown_with_a_bounded_list_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let origins: Vec<Forger> = (0..20u8)
        .map(|i| Forger::new(10 + i, &format!("city-{i:02}")))
        .collect();
    // The peer holds nothing more of any of them: a marker each, and one
    // for this node's own feed.
    let drained = |origin: &str| pb::SubscribeResponse {
        event: Some(Event::Drained(pb::BacklogDrained {
            origin: origin.into(),
            head_seq: 0,
        })),
    };
    let step: Vec<pb::SubscribeResponse> = origins
        .iter()
        .map(|f| drained(&f.origin))
        .chain([drained("city-n")])
        .collect();
    let (m_address, _) = serve_script(&dir.path().join("m"), vec![step]).await;
    let mut spec = Spec::new("city-n")
        .peer("city-m", &m_address)
        .allow_without_peers();
    for forger in &origins {
        spec = spec.trust(&forger.origin, &public_key_hex(&forger.key.verifying_key()));
    }
    let node = TestNode::start(&dir.path().join("node"), spec).await;
    eventually("the peer's 21 origins to be known", || async {
        node.status()
            .await
            .peers
            .first()
            .is_some_and(|p| p.origins.len() as u64 + p.origins_not_shown == 21)
    })
    .await;
    let status = node.status().await;
    let peer = &status.peers[0];
    assert_eq!((peer.origins.len(), peer.origins_not_shown), (16, 5));
    assert_eq!((peer.origins_behind, peer.entries_behind), (0, 0));
    // None lags: listed by origin.
    let listed: Vec<&str> = peer.origins.iter().map(|o| o.origin.as_str()).collect();
    let expected: Vec<String> = (0..16).map(|i| format!("city-{i:02}")).collect();
    assert_eq!(listed, expected);
    assert_eq!(status.peers_not_shown, 0);

    let out = node.cli(&["status"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    assert!(
        table.contains("city-15:0 (5 more origins not shown)") && !table.contains("city-16:"),
        "{table}"
    );
    let out = node.cli(&["--output", "json", "status"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let peer = &json["peers"][0];
    assert_eq!(peer["origins"].as_array().unwrap().len(), 16);
    assert_eq!(peer["origins_not_shown"], 5);
    assert_eq!(peer["origins_behind"], 0);
    assert_eq!(json["heads_not_shown"], 0);
    assert_eq!(json["peers_not_shown"], 0);
}

/// A newer build's entries (fields this one does not know) are stored and
/// verified, and supersede what came before them: the older offer version
/// and value are no longer answered as current, and the offer cannot be
/// answered by "latest version" (spec rules 1 and 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_builds_entries_supersede_and_are_never_answered_stale() {
    let dir = tempfile::tempdir().unwrap();
    let a = Forger::new(1, "city-a");
    let offer = |id: &str, title: &str| {
        Payload::Offer(pb::ServiceOffer {
            offer_id: id.into(),
            title: title.into(),
            area: pb::FunctionalArea::Environment as i32,
            category: "collection".into(),
            valid_from_unix: 0,
            valid_until_unix: i64::MAX,
            contact_role: "public works office".into(),
            ..Default::default()
        })
    };
    let cell = |indicator: &str, value: f64| {
        Payload::Indicators(pb::IndicatorBatch {
            observations: vec![pb::Observation {
                indicator: indicator.into(),
                catalog_edition: "test".into(),
                area: pb::FunctionalArea::Economy as i32,
                ref_area: "city-a".into(),
                period: "2025".into(),
                value: Some(value),
                ..Default::default()
            }],
            ..Default::default()
        })
    };
    // Field 99 of the body (varint 1): unknown to this build.
    let newer = [0x98, 0x06, 0x01];
    let payloads = [
        (offer("waste", "old terms"), &[][..]),
        (offer("parks", "readable terms"), &[][..]),
        (cell("k1", 1.0), &[][..]),
        (cell("k2", 5.0), &[][..]),
        (offer("waste", "new terms"), &newer[..]),
        (cell("k1", 2.0), &newer[..]),
    ];
    let mut feed: Vec<Entry> = Vec::new();
    for (seq, (payload, extra)) in (1..).zip(payloads) {
        let prev = feed
            .last()
            .map_or(GENESIS_PREV_HASH.to_vec(), |e| e.hash.to_vec());
        feed.push(a.entry_with(seq, &prev, payload, extra));
    }
    let node = node_replicating(dir.path(), &a, &feed).await;

    // k1's newest value cannot be read here: no value of k1 is answered.
    // k2 is untouched.
    let observations = node
        .query()
        .await
        .observations(pb::ObservationsRequest {
            origins: vec!["city-a".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let answered: Vec<(&str, Option<f64>)> = observations
        .observations
        .iter()
        .map(|row| {
            let o = row.observation.as_ref().unwrap();
            (o.indicator.as_str(), o.value)
        })
        .collect();
    assert_eq!(
        answered,
        [("k2", Some(5.0))],
        "a superseded value was answered"
    );

    // The offer's newest version cannot be read: the old terms are not
    // answered, with or without inactive offers.
    let out = node
        .cli(&["--output", "json", "query", "offers", "--all"])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        !stdout(&out).contains("old terms") && stdout(&out).contains("readable terms"),
        "a superseded offer version was answered, or a readable one not: {}",
        stdout(&out)
    );
    let out = node
        .cli(&[
            "offer", "respond", "--origin", "city-a", "--offer", "waste", "--kind", "accept",
        ])
        .await;
    assert!(!out.status.success(), "answered an offer it cannot read");
    assert!(
        stderr(&out).contains("has fields this build of civex does not know"),
        "{}",
        stderr(&out)
    );
    assert_eq!(node.head("city-n").await.0, 0, "something was published");
}

/// An origin's key holder may sign an entry badly and sign later entries
/// over it: replication takes the range (its links and last signature
/// hold), and so do `civex verify`, which reports it, and a restore of the
/// node's backup (spec rule 7: the entry is covered by the origin's
/// signature, nothing in the store was changed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_the_origin_signed_badly_but_covered_verifies_and_restores() {
    let dir = tempfile::tempdir().unwrap();
    let a = Forger::new(1, "city-a");
    // Another key, in city-a's feed.
    let wrong = Forger {
        key: SigningKey::from_bytes(&[9; 32]),
        ..Forger::new(1, "city-a")
    };
    let mut feed: Vec<Entry> = Vec::new();
    for seq in 1..=3 {
        let prev = feed
            .last()
            .map_or(GENESIS_PREV_HASH.to_vec(), |e| e.hash.to_vec());
        let by = if seq == 2 { &wrong } else { &a };
        feed.push(Forger::entry(by, seq, &prev, "signed by the origin"));
    }
    let mut node = node_replicating(dir.path(), &a, &feed).await;
    let file = dir.path().join("node.backup");
    let out = node.cli(&["backup", "--out", file.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    node.stop().await;

    let config = node.config_path();
    let verify = ["verify", "--config", config.to_str().unwrap()];
    let out = civex_async(&verify).await;
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("entries whose own signature is bad, covered by the origin's later signatures (so authentic): 1, the first at seq 2"),
        "{}",
        stdout(&out)
    );
    std::fs::remove_dir_all(node.dir.join("data")).unwrap();
    let out = civex_async(&[
        "restore",
        "--config",
        config.to_str().unwrap(),
        file.to_str().unwrap(),
    ])
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = civex_async(&verify).await;
    assert!(out.status.success(), "{}", stdout(&out));
}

/// A peer claiming more of the node's own feed than it sends holds
/// publishing closed (restore safety: the claim may be true, and publishing
/// past it would fork the feed), but the claim is shown as one, with the
/// peer, the seq claimed and what lifts it; removing the peer does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_claiming_more_of_the_own_feed_than_it_sends_is_named_and_can_be_removed() {
    let dir = tempfile::tempdir().unwrap();
    let claim = pb::SubscribeResponse {
        event: Some(Event::Drained(pb::BacklogDrained {
            origin: "city-n".into(),
            head_seq: 5,
        })),
    };
    // It claims so on every stream (a stream ending before the marker
    // would be a failed attempt, and three in a row would make the peer
    // count as unreachable).
    let script = Script {
        then: vec![claim],
        ..Script::default()
    };
    let (m_address, calls) = serve_script_as(&dir.path().join("m"), "city-m", script).await;
    let node = TestNode::start(
        &dir.path().join("node"),
        Spec::new("city-n")
            .peer("city-m", &m_address)
            .allow_without_peers(),
    )
    .await;
    let expected = "the peer claims this node's own feed (city-n) up to seq 5, but sent nothing \
                    past seq 0 (this node's head) that verified; publishing stays closed \
                    (restore safety) until the peer delivers those entries, or, if its claim is \
                    false, until it is removed (civex peer remove city-m)";
    eventually("city-m's claim to be named in status", || async {
        node.status()
            .await
            .peers
            .iter()
            .any(|p| p.last_error == expected)
    })
    .await;
    // It stays named through the peer's later streams.
    eventually("city-m to be subscribed to again", || async {
        calls.load(Ordering::SeqCst) > 2
    })
    .await;
    let status = node.status().await;
    assert!(!status.publish_ready, "a claim of the own feed was ignored");
    assert_eq!(status.peers[0].last_error, expected);
    assert!(
        status.peers[0].origins.iter().all(|o| o.origin != "city-n"),
        "the claim is shown as the peer's head: {:?}",
        status.peers[0]
    );
    let refused = node
        .publisher()
        .await
        .publish_indicators(pb::PublishIndicatorsRequest {
            idempotency_key: crate::support::key(),
            rows: vec![crate::support::row("k0", "city-n", "2025", 1.0, 10)],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    // The refusal names the peer and what lifts it; the override would not
    // (the peer is reachable and holds the gate whatever it is).
    let message = refused.message();
    assert!(
        message.contains("peer city-m has not served this node's own feed yet")
            && message.contains("civex peer remove city-m")
            && !message.contains("allow_without_peers"),
        "{message}"
    );

    let out = node.cli(&["peer", "remove", "city-m"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    node.wait_ready().await;
    assert_eq!(crate::support::publish_row(&node, "k0", 1.0).await.seq, 1);
}

/// Peers that connect and then fail every time before serving this node's
/// own feed (the stream errors out, or ends before the own feed's backlog
/// marker) count as unreachable after as many failed attempts in a row as
/// a peer that cannot be dialled, so they do not hold publishing closed
/// forever; a peer that served the own feed and then fails the same way
/// still counts as having served it (spec rule 10).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_that_connect_but_never_serve_the_own_feed_count_as_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let own_drained = pb::SubscribeResponse {
        event: Some(Event::Drained(pb::BacklogDrained {
            origin: "city-n".into(),
            head_seq: 0,
        })),
    };
    let reset = Status::unavailable("reset after connecting");
    // city-m serves the own feed once; every stream of it then fails.
    let failing = |steps| Script {
        steps,
        end: Some(reset.clone()),
        ..Script::default()
    };
    let (m_address, _) = serve_script_as(
        &dir.path().join("m"),
        "city-m",
        failing(vec![vec![own_drained]]),
    )
    .await;
    // city-x's streams fail at once; city-y's end at once.
    let (x_address, x_calls) =
        serve_script_as(&dir.path().join("x"), "city-x", failing(Vec::new())).await;
    let (y_address, y_calls) =
        serve_script_as(&dir.path().join("y"), "city-y", Script::default()).await;
    let node = TestNode::start(
        &dir.path().join("node"),
        Spec::new("city-n")
            .peer("city-m", &m_address)
            .peer("city-x", &x_address)
            .peer("city-y", &y_address),
    )
    .await;
    node.wait_ready().await;
    let (x_calls, y_calls) = (
        x_calls.load(Ordering::SeqCst),
        y_calls.load(Ordering::SeqCst),
    );
    assert!(
        x_calls >= 3 && y_calls >= 3,
        "publishing opened before city-x and city-y failed three attempts each \
         ({x_calls}, {y_calls})"
    );
    assert_eq!(crate::support::publish_row(&node, "k0", 1.0).await.seq, 1);
    let status = node.status().await;
    let error = |name: &str| {
        let peer = status.peers.iter().find(|p| p.name == name).unwrap();
        peer.last_error.clone()
    };
    assert!(
        error("city-x").contains("reset after connecting"),
        "{}",
        error("city-x")
    );
    assert_eq!(
        error("city-y"),
        "the peer ended the stream before serving this node's own feed (city-n: no backlog \
         marker)"
    );
}

/// A peer that holds this node's own feed further than this node (one
/// restored from an old backup) and delivers part of it on each attempt,
/// its stream failing every time before the own feed's marker (a flaky
/// link, or an entry past the message limit), never counts as
/// unreachable, even once it delivers nothing more: another peer that
/// holds less of the own feed must not open publishing, or the next
/// publish forks the own feed. Found by review.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_delivered_the_own_feed_but_fails_keeps_publishing_closed() {
    let dir = tempfile::tempdir().unwrap();
    let node_dir = dir.path().join("node");
    std::fs::create_dir_all(&node_dir).unwrap();
    civex_node::keys::write_secret_file(
        &node_dir.join("feed.key"),
        format!("{}\n", hex(&[40u8; 32])).as_bytes(),
    )
    .unwrap();
    // The own feed as city-m holds it: six entries.
    let own = Forger::new(40, "city-n");
    let held = own.chain(6);
    let upto = |from: usize, to: usize| {
        batch(
            "city-n",
            held[from - 1..to]
                .iter()
                .map(|e| e.signed.clone())
                .collect(),
        )
    };
    // Each of three streams delivers one more entry of the own feed and
    // fails; every later stream fails at once.
    let m = Script {
        steps: vec![vec![upto(1, 1)], vec![upto(2, 2)], vec![upto(3, 3)]],
        then: Vec::new(),
        end: Some(Status::unavailable("connection reset")),
        ..Script::default()
    };
    let (m_address, m_calls) = serve_script_as(&dir.path().join("m"), "city-m", m).await;
    // city-y holds none of it, and says so.
    let y = Script {
        then: vec![pb::SubscribeResponse {
            event: Some(Event::Drained(pb::BacklogDrained {
                origin: "city-n".into(),
                head_seq: 0,
            })),
        }],
        ..Script::default()
    };
    let (y_address, _) = serve_script_as(&dir.path().join("y"), "city-y", y).await;
    let node = TestNode::start(
        &node_dir,
        Spec::new("city-n")
            .peer("city-m", &m_address)
            .peer("city-y", &y_address),
    )
    .await;
    // Six attempts have ended (each reports to the gate before the next
    // begins): three that delivered, three that delivered nothing.
    eventually("city-m to be tried seven times", || async {
        m_calls.load(Ordering::SeqCst) >= 7
    })
    .await;
    let status = node.status().await;
    let m = status.peers.iter().find(|p| p.name == "city-m").unwrap();
    assert_eq!(m.refused, 0, "city-m's entries were refused: {m:?}");
    assert_eq!(node.head("city-n").await.0, 3);
    assert!(
        !status.publish_ready,
        "publishing opened while city-m, which delivered the own feed, holds more of it"
    );
    let refused = node
        .publisher()
        .await
        .publish_indicators(pb::PublishIndicatorsRequest {
            idempotency_key: crate::support::key(),
            rows: vec![crate::support::row("k0", "city-n", "2025", 1.0, 10)],
        })
        .await
        .unwrap_err();
    assert!(
        refused.message().contains("city-m") && refused.message().contains("civex peer remove"),
        "{}",
        refused.message()
    );
}

/// A peer that takes the subscription and then sends a forged entry every
/// time is retried less and less often, up to the longest backoff, not
/// every `backoff_initial_ms`: connecting is no progress (the test config
/// backs off from 20 ms to at most 300 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_fails_after_connecting_is_retried_with_growing_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let a = Forger::new(50, "city-a");
    let forger = Forger::new(51, "city-a");
    let forged = forger.chain(1).remove(0).signed;
    let times = Arc::default();
    let script = Script {
        then: vec![batch("city-a", vec![forged])],
        times: Some(Arc::clone(&times)),
        ..Script::default()
    };
    let trust = |spec: Spec| spec.trust("city-a", &public_key_hex(&a.key.verifying_key()));
    let (node, m_calls) = node_with_scripted_peer(dir.path(), script, trust).await;
    eventually("city-m to be subscribed to seven times", || {
        std::future::ready(m_calls.load(Ordering::SeqCst) >= 7)
    })
    .await;
    // Waits of 20, 40, 80, 160, 300 and 300 ms: the last gap is at least
    // 300 ms. Without backoff it is about 20.
    let seen = times.lock().unwrap().clone();
    let last_gap = seen[6] - seen[5];
    assert!(
        last_gap >= Duration::from_millis(300),
        "city-m was subscribed to again {last_gap:?} after a failed session"
    );
    let status = node.status().await;
    let m = status.peers.iter().find(|p| p.name == "city-m").unwrap();
    assert!(m.refused >= 6, "{m:?}");
    assert!(m.last_error.contains("signature"), "{}", m.last_error);
    assert_eq!(node.head("city-a").await.0, 0);
}

/// `civex status` shows how far behind the peer this node is while it
/// catches up: beside what the peer delivered, what its `Heads` reported
/// (unverified, shown only). A reported head of another feed than the one
/// held, or of an origin this node did not ask for, is not shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_lag_behind_the_head_a_peer_reports() {
    let dir = tempfile::tempdir().unwrap();
    let a = Forger::new(60, "city-a");
    let b = Forger::new(61, "city-b");
    let head = |origin: &str, feed_id: &[u8], seq: u64| pb::Head {
        origin: origin.into(),
        feed_id: feed_id.to_vec(),
        seq,
        entry_hash: vec![0; 32],
        time_unix_micros: 1,
        received_unix_micros: 1,
    };
    let signed = |feed: Vec<Entry>| feed.into_iter().map(|e| e.signed).collect();
    // The peer says it holds 25 of city-a and delivers 10 of them; of
    // city-b it delivers 3 and reports 50 of another feed. Its stream then
    // stays open.
    let script = Script {
        steps: vec![vec![
            batch("city-a", signed(a.chain(10))),
            batch("city-b", signed(b.chain(3))),
        ]],
        heads: Some(vec![
            head("city-a", &a.feed_id, 25),
            head("city-b", &[99; 16], 50),
            head("city-q", &a.feed_id, 7),
        ]),
        hold: Some((0, Duration::from_secs(600))),
        ..Script::default()
    };
    let trust = |spec: Spec| {
        spec.trust("city-a", &public_key_hex(&a.key.verifying_key()))
            .trust("city-b", &public_key_hex(&b.key.verifying_key()))
    };
    let (node, _) = node_with_scripted_peer(dir.path(), script, trust).await;
    let row = |status: &pb::NodeStatusResponse, origin: &str| {
        let peer = &status.peers[0];
        let row = peer.origins.iter().find(|o| o.origin == origin);
        row.map(|o| (o.held_seq, o.peer_seq, o.reported_seq))
    };
    eventually("city-m's reported head of city-a to show", || async {
        let status = node.status().await;
        row(&status, "city-a") == Some((10, 10, 25)) && row(&status, "city-b") == Some((3, 3, 0))
    })
    .await;
    let status = node.status().await;
    let peer = &status.peers[0];
    assert_eq!((peer.origins_behind, peer.entries_behind), (1, 15));
    assert_eq!(row(&status, "city-q"), None, "{peer:?}");
    let out = node.cli(&["--output", "json", "status"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let json_peer = &json["peers"][0];
    assert_eq!(json_peer["entries_behind"], 15, "{json}");
    assert_eq!(json_peer["origins"][0]["origin"], "city-a", "{json}");
    assert_eq!(json_peer["origins"][0]["reported_seq"], 25, "{json}");
    assert_eq!(json_peer["origins"][0]["lag"], 15, "{json}");
}

/// A peer whose sessions last is retried soon after one is cut, even after
/// an outage grew the backoff: a session that stayed up at least as long
/// as the wait before it starts the backoff over (backoff 20 ms to 3 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_lasted_starts_the_backoff_over() {
    let dir = tempfile::tempdir().unwrap();
    let times = Arc::default();
    // Seven streams fail at once (waits of 20 ms to 1.28 s follow), the
    // eighth stays up 1.5 s, then every stream fails.
    let script = Script {
        end: Some(Status::unavailable("restarting")),
        hold: Some((7, Duration::from_millis(1500))),
        times: Some(Arc::clone(&times)),
        ..Script::default()
    };
    let longer = |spec: Spec| spec.backoff_max_ms(3000);
    let (_node, m_calls) = node_with_scripted_peer(dir.path(), script, longer).await;
    eventually("city-m to be subscribed to nine times", || {
        std::future::ready(m_calls.load(Ordering::SeqCst) >= 9)
    })
    .await;
    let seen = times.lock().unwrap().clone();
    assert!(
        seen[7] - seen[6] >= Duration::from_millis(1280),
        "the outage did not grow the backoff"
    );
    // 1.5 s up, then the first wait again (20 ms); the grown one is 2.56 s.
    let gap = seen[8] - seen[7];
    assert!(
        gap < Duration::from_millis(2500),
        "city-m was subscribed to again {gap:?} after a session of 1.5 s"
    );
}

/// The reading of a peer's `Heads` ends with its session: a peer that never
/// answers it holds no reading open past the session that asked (before,
/// each session left one behind for the connect timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heads_reading_ends_with_its_session() {
    let dir = tempfile::tempdir().unwrap();
    let stalled = Arc::new(Stalled::default());
    // Every stream fails at once; Heads never answers.
    let script = Script {
        end: Some(Status::unavailable("restarting")),
        stall_heads: Some(Arc::clone(&stalled)),
        ..Script::default()
    };
    let (_node, _) = node_with_scripted_peer(dir.path(), script, |spec| spec).await;
    eventually("city-m's Heads to be asked six times", || {
        std::future::ready(stalled.calls.load(Ordering::SeqCst) >= 6)
    })
    .await;
    // Sessions came at least 20 ms apart, within the 2 s connect timeout.
    assert_eq!(
        stalled.most.load(Ordering::SeqCst),
        0,
        "a Heads reading of an ended session was still pending when the next began"
    );
}
