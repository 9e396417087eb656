//! The operator's status answer (`NodeStatus`), bounded so that it fits the
//! smallest gRPC message limit ([`crate::config::MIN_MESSAGE_BYTES`])
//! however many origins, peers and conflicts the node has: each list is cut
//! at a fixed count and says how much it left out, and the free-text
//! fields are cut to a fixed length. The evidence of a conflict (two
//! entries of up to 64 KiB each) is not in it; `ConflictEvidence` serves it
//! one origin at a time.

use std::collections::BTreeMap;

use civex_proto::v1 as pb;

use crate::{
    replicate::PeerState,
    store::{ConflictRecord, Head},
};

/// Heads listed at most (about 150 bytes each).
pub const MAX_HEADS: usize = 4096;
/// Peers listed at most (about 2.9 KiB each at most, their origins included).
pub const MAX_PEERS: usize = 256;
/// Origins listed per peer at most (about 90 bytes each).
pub const MAX_PEER_ORIGINS: usize = 16;
/// Conflicts listed at most (about 260 bytes each).
pub const MAX_CONFLICTS: usize = 1024;
/// Bytes of a peer's last error shown at most.
pub const MAX_ERROR_BYTES: usize = 1000;
/// Bytes of a peer's address shown at most.
pub const MAX_ADDRESS_BYTES: usize = 300;

/// A peer as the status shows it.
pub struct PeerView<'a> {
    /// Name.
    pub name: &'a str,
    /// Address dialled.
    pub address: &'a str,
    /// What is known of it.
    pub state: PeerState,
}

/// What the status is made of.
pub struct StatusInput<'a> {
    /// This node's origin.
    pub origin: &'a str,
    /// The durable heads, by origin.
    pub heads: &'a BTreeMap<String, Head>,
    /// The configured peers.
    pub peers: Vec<PeerView<'a>>,
    /// Whether publishing is open.
    pub publish_ready: bool,
    /// Packed index pieces not folded yet.
    pub index_pieces_pending: u64,
    /// The conflicts on record.
    pub conflicts: &'a [ConflictRecord],
}

/// The head of `origin` as the protocol shows it.
pub fn head_message(origin: String, head: &Head) -> pb::Head {
    pb::Head {
        origin,
        feed_id: head.tip.feed_id.to_vec(),
        seq: head.tip.seq,
        entry_hash: head.tip.hash.to_vec(),
        time_unix_micros: head.tip.time_unix_micros,
        received_unix_micros: head.received_unix_micros,
    }
}

/// A conflict on record as the status shows it: the two entries' seqs,
/// hashes and sizes, not the entries.
pub fn conflict_report(record: &ConflictRecord) -> pb::ConflictReport {
    let conflict = &record.conflict;
    let size = |signed: &pb::SignedEntry| {
        u32::try_from(signed.body.len() + signed.signature.len()).unwrap_or(u32::MAX)
    };
    pb::ConflictReport {
        origin: conflict.held.body.origin.clone(),
        kind: conflict.kind.name().into(),
        seq: conflict.other.body.seq,
        peer: record.peer.clone(),
        detected_unix_micros: record.detected_unix_micros,
        held_seq: conflict.held.body.seq,
        held_hash: conflict.held.hash.to_vec(),
        held_size: size(&conflict.held.signed),
        other_hash: conflict.other.hash.to_vec(),
        other_size: size(&conflict.other.signed),
    }
}

/// `text` cut to at most `max` bytes at a character boundary, ending in
/// "…" when cut.
fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let ellipsis = '…';
    let mut end = max.saturating_sub(ellipsis.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = text[..end].to_owned();
    out.push(ellipsis);
    out
}

/// One peer's status: its origins this node lags furthest behind first.
fn peer_status(peer: PeerView<'_>, heads: &BTreeMap<String, Head>) -> pb::PeerStatus {
    let state = peer.state;
    // What the peer delivered, and what its Heads reported of the feed
    // held here (unverified).
    let mut rows: BTreeMap<&str, pb::PeerOriginLag> = BTreeMap::new();
    let row = |origin: &str| pb::PeerOriginLag {
        origin: origin.to_owned(),
        held_seq: heads.get(origin).map_or(0, |h| h.tip.seq),
        ..pb::PeerOriginLag::default()
    };
    for (origin, seq) in &state.peer_heads {
        rows.insert(
            origin,
            pb::PeerOriginLag {
                peer_seq: *seq,
                ..row(origin)
            },
        );
    }
    for (origin, reported) in &state.reported_heads {
        let held_feed = heads.get(origin).map(|h| h.tip.feed_id);
        if held_feed.is_some_and(|feed| feed != reported.feed_id) {
            continue;
        }
        rows.entry(origin)
            .or_insert_with(|| row(origin))
            .reported_seq = reported.seq;
    }
    let mut origins: Vec<pb::PeerOriginLag> = rows.into_values().collect();
    let lag = |o: &pb::PeerOriginLag| o.peer_seq.max(o.reported_seq).saturating_sub(o.held_seq);
    let origins_behind = origins.iter().filter(|o| lag(o) > 0).count() as u64;
    let entries_behind = origins.iter().map(lag).fold(0u64, u64::saturating_add);
    // Stable: origins of one lag stay in origin order.
    origins.sort_by_key(|o| std::cmp::Reverse(lag(o)));
    let origins_not_shown = origins.len().saturating_sub(MAX_PEER_ORIGINS) as u64;
    origins.truncate(MAX_PEER_ORIGINS);
    pb::PeerStatus {
        name: peer.name.to_owned(),
        address: clip(peer.address, MAX_ADDRESS_BYTES),
        connected: state.connected,
        last_error: clip(&state.last_error, MAX_ERROR_BYTES),
        refused: state.refused,
        origins,
        origins_not_shown,
        origins_behind,
        entries_behind,
    }
}

/// The status answer, bounded (see the module documentation).
pub fn node_status(input: StatusInput<'_>) -> pb::NodeStatusResponse {
    let StatusInput {
        origin,
        heads,
        peers,
        publish_ready,
        index_pieces_pending,
        conflicts,
    } = input;
    // By origin, the own head always among those listed.
    let own = heads.contains_key(origin);
    let others = MAX_HEADS - usize::from(own);
    let mut listed = 0;
    let shown: Vec<pb::Head> = heads
        .iter()
        .filter(|(o, _)| {
            if o.as_str() == origin {
                return true;
            }
            listed += 1;
            listed <= others
        })
        .map(|(o, head)| head_message(o.clone(), head))
        .collect();
    let heads_not_shown = (heads.len() - shown.len()) as u64;
    let peers_not_shown = peers.len().saturating_sub(MAX_PEERS) as u64;
    let peers = peers
        .into_iter()
        .take(MAX_PEERS)
        .map(|peer| peer_status(peer, heads))
        .collect();
    let mut reports: Vec<&ConflictRecord> = conflicts.iter().collect();
    reports.sort_by(|a, b| {
        a.conflict
            .held
            .body
            .origin
            .cmp(&b.conflict.held.body.origin)
    });
    let conflicts_not_shown = reports.len().saturating_sub(MAX_CONFLICTS) as u64;
    pb::NodeStatusResponse {
        origin: origin.to_owned(),
        heads: shown,
        peers,
        publish_ready,
        index_pieces_pending,
        conflicts: reports
            .into_iter()
            .take(MAX_CONFLICTS)
            .map(conflict_report)
            .collect(),
        heads_not_shown,
        peers_not_shown,
        conflicts_not_shown,
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::core::feed::{tests::key, Conflict, ConflictKind, Entry, Tip};

    /// An origin id of the longest kind (64 characters).
    fn long_origin(i: usize) -> String {
        format!("{i:064}")
    }

    /// A head with every number at its largest (but for one entry).
    fn head() -> Head {
        Head {
            tip: Tip {
                seq: u64::MAX - 1,
                hash: [0xff; 32],
                feed_id: [0xff; 16],
                time_unix_micros: i64::MIN,
            },
            received_unix_micros: i64::MIN,
        }
    }

    fn heads(count: usize) -> BTreeMap<String, Head> {
        (0..count).map(|i| (long_origin(i), head())).collect()
    }

    /// A peer holding `origins` of `heads`, each `lag(i)` entries ahead.
    fn peer_state(origins: usize, lag: impl Fn(usize) -> u64) -> PeerState {
        PeerState {
            connected: true,
            last_error: "é".repeat(10_000),
            refused: u64::MAX,
            peer_heads: (0..origins).map(|i| (long_origin(i), lag(i))).collect(),
            ..Default::default()
        }
    }

    /// A conflict of origin `origin` whose entries are `size` bytes or so.
    fn conflict(origin: &str, size: usize) -> ConflictRecord {
        use civex_proto::v1::{entry_body::Payload, EntryBody, OfferWithdrawal};
        let entry = |note: &str| {
            let body = EntryBody {
                origin: origin.into(),
                feed_id: vec![7; 16],
                seq: u64::MAX,
                prev_hash: vec![0; 32],
                time_unix_micros: 1,
                idempotency_key: vec![1; 16],
                payload: Some(Payload::Withdrawal(OfferWithdrawal {
                    offer_id: "o".into(),
                    reason: note.repeat(size),
                })),
            };
            Entry::sign(&key(1), body).unwrap()
        };
        ConflictRecord {
            conflict: Conflict {
                kind: ConflictKind::Recreated,
                held: entry("a"),
                other: entry("b"),
            },
            peer: "p".repeat(64),
            detected_unix_micros: i64::MIN,
        }
    }

    /// The largest status this node can send: every list past its cap,
    /// every name and number at its longest, large conflict evidence.
    #[test]
    fn the_largest_status_fits_the_smallest_message_limit() {
        let origin = long_origin(0);
        let heads = heads(MAX_HEADS + 100);
        let names: Vec<String> = (0..MAX_PEERS + 10).map(|i| format!("{i:064}")).collect();
        let address = "a".repeat(100_000);
        let peers = names
            .iter()
            .map(|name| PeerView {
                name,
                address: &address,
                state: peer_state(1_000, |_| u64::MAX),
            })
            .collect();
        // Evidence of 60 KB a side for the first (its size is no part of
        // the status).
        let conflicts: Vec<ConflictRecord> = (0..MAX_CONFLICTS + 10)
            .map(|i| conflict(&long_origin(i), if i == 0 { 60_000 } else { 10 }))
            .collect();
        let status = node_status(StatusInput {
            origin: &origin,
            heads: &heads,
            peers,
            publish_ready: true,
            index_pieces_pending: u64::MAX,
            conflicts: &conflicts,
        });
        let size = status.encoded_len();
        // The gRPC frame adds 5 bytes; keep a wide margin below the limit.
        assert!(
            size < crate::config::MIN_MESSAGE_BYTES - (256 << 10),
            "the status is {size} bytes"
        );
        assert_eq!(
            (status.heads.len(), status.heads_not_shown),
            (MAX_HEADS, 100)
        );
        assert_eq!(
            (status.peers.len(), status.peers_not_shown),
            (MAX_PEERS, 10)
        );
        assert_eq!(
            (status.conflicts.len(), status.conflicts_not_shown),
            (MAX_CONFLICTS, 10)
        );
        let peer = &status.peers[0];
        assert_eq!(peer.origins.len(), MAX_PEER_ORIGINS);
        assert_eq!(peer.origins_not_shown, 1_000 - MAX_PEER_ORIGINS as u64);
        assert_eq!((peer.origins_behind, peer.entries_behind), (1_000, 1_000));
        assert!(peer.last_error.len() <= MAX_ERROR_BYTES && peer.last_error.ends_with('…'));
        assert!(peer.address.len() <= MAX_ADDRESS_BYTES);
        let report = &status.conflicts[0];
        assert!(report.held_size > 60_000 && report.other_size > 60_000);
        assert_eq!(report.held_hash, conflicts[0].conflict.held.hash.to_vec());
        assert_eq!(report.other_hash, conflicts[0].conflict.other.hash.to_vec());
    }

    /// 200 peers each reporting 200 origins, as a region's hub sees them:
    /// about 1.6 MB of lag rows when every row was listed.
    #[test]
    fn a_hub_of_200_peers_and_200_origins_lists_their_furthest_lags() {
        let origin = long_origin(7);
        let heads = heads(200);
        let names: Vec<String> = (0..200).map(|i| format!("peer-{i}")).collect();
        let peers = names
            .iter()
            .map(|name| PeerView {
                name,
                address: "127.0.0.1:7400",
                // The peer holds origins 0..20 up to u64::MAX, this node
                // origin i up to u64::MAX - i; the others one entry less
                // than this node.
                state: PeerState {
                    last_error: String::new(),
                    ..peer_state(200, |i| if i < 20 { u64::MAX } else { u64::MAX - 2 })
                },
            })
            .collect();
        let mut heads = heads;
        for i in 0..20 {
            heads.get_mut(&long_origin(i)).unwrap().tip.seq = u64::MAX - i as u64;
        }
        let status = node_status(StatusInput {
            origin: &origin,
            heads: &heads,
            peers,
            publish_ready: true,
            index_pieces_pending: 0,
            conflicts: &[],
        });
        assert!(status.encoded_len() < 1 << 20, "{}", status.encoded_len());
        assert_eq!(status.heads.len(), 200);
        assert_eq!(status.peers.len(), 200);
        let peer = &status.peers[199];
        assert_eq!(peer.origins_not_shown, 200 - MAX_PEER_ORIGINS as u64);
        assert_eq!(peer.origins_behind, 19);
        assert_eq!(peer.entries_behind, (1..20).sum::<u64>());
        // Furthest behind first: origin 19 (19 entries), 18, ...; those of
        // one lag by origin.
        let lags: Vec<(String, u64)> = peer
            .origins
            .iter()
            .map(|o| (o.origin.clone(), o.peer_seq - o.held_seq))
            .collect();
        let expected: Vec<(String, u64)> =
            (4..20).rev().map(|i| (long_origin(i), i as u64)).collect();
        assert_eq!(lags, expected);
    }

    #[test]
    fn the_own_head_is_listed_whatever_its_place() {
        let heads = heads(MAX_HEADS + 10);
        let own = long_origin(MAX_HEADS + 5);
        let status = node_status(StatusInput {
            origin: &own,
            heads: &heads,
            peers: Vec::new(),
            publish_ready: true,
            index_pieces_pending: 0,
            conflicts: &[],
        });
        assert_eq!(status.heads.len(), MAX_HEADS);
        assert_eq!(status.heads_not_shown, 10);
        assert!(status.heads.iter().any(|h| h.origin == own));
        assert!(status.heads.windows(2).all(|w| w[0].origin < w[1].origin));
    }

    #[test]
    fn text_is_cut_at_a_character_boundary() {
        assert_eq!(clip("short", 10), "short");
        let cut = clip(&"é".repeat(10), 8);
        assert!(cut.len() <= 8, "{cut}");
        assert_eq!(cut, "éé…");
    }
}
