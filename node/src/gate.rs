//! The publish gate (restore safety): publishing opens only once this
//! node has fetched its own feed's newest entries from a peer, or every
//! peer counts as unreachable (with `publish.allow_without_peers`). The
//! replication tasks report to it (`replicate`); the publisher asks it
//! (`publish`).

use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// Failed attempts in a row after which a peer counts as unreachable.
const UNREACHABLE_AFTER: u32 = 3;

/// How one attempt to replicate from a peer came out, for the publish gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Attempt {
    /// The peer delivered its backlog marker of this node's own feed.
    Served,
    /// It did not: it could not be dialled, refused this node, or its
    /// stream failed or ended before the marker.
    Failed,
    /// Neither: this node ended it (a roster change) before the marker.
    Interrupted,
    /// The peer has delivered entries of this node's own feed (in this
    /// attempt or an earlier one) but not yet its marker: it holds the
    /// feed, perhaps further than this node, so it never counts as
    /// unreachable (publishing now could fork the own feed); the gate
    /// waits for its marker, or for `civex peer remove`.
    Delivering,
}

/// Attempts in a row that failed (see [`UNREACHABLE_AFTER`]).
#[derive(Debug, Default)]
pub(crate) struct Attempts {
    failed: u32,
}

impl Attempts {
    /// Records how an attempt came out; returns whether the peer now
    /// counts as unreachable.
    pub(crate) fn ended(&mut self, attempt: Attempt) -> bool {
        match attempt {
            Attempt::Served | Attempt::Delivering => self.failed = 0,
            Attempt::Failed => self.failed += 1,
            Attempt::Interrupted => return false,
        }
        self.failed >= UNREACHABLE_AFTER
    }
}

/// What one peer has told this node about its own feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerSync {
    /// Not heard from yet.
    Unknown,
    /// Served the own feed, and this node holds all of it.
    Synced,
    /// Could not be reached (or its stream failed) before it served it.
    Unreachable,
    /// Removed at runtime before it served it.
    Removed,
}

/// Opens publishing (restore safety): with peers, only once every peer has
/// either served this node's own feed up to its head or could not be
/// reached, and at least one served it; with `publish.allow_without_peers`,
/// once every peer has been tried even if none answered. Once open, it
/// stays open; a peer that served the feed keeps counting as served.
pub struct PublishGate {
    /// Each peer present at start, by name.
    peers: Mutex<Vec<(String, PeerSync)>>,
    allow_without_peers: bool,
    open: watch::Sender<bool>,
}

/// Peers named at most in the message of a closed gate.
const NAMED_AT_MOST: usize = 8;

impl PublishGate {
    /// A gate held by the peers `names` (peers present at start, in the
    /// order of their slots).
    pub fn new(names: Vec<String>, allow_without_peers: bool) -> Arc<Self> {
        let open = watch::channel(names.is_empty()).0;
        let peers = names
            .into_iter()
            .map(|name| (name, PeerSync::Unknown))
            .collect();
        Arc::new(Self {
            peers: Mutex::new(peers),
            allow_without_peers,
            open,
        })
    }

    /// Whether publishing is open.
    pub fn is_open(&self) -> bool {
        *self.open.borrow()
    }

    /// Records what peer `index` came to, and opens the gate when it may.
    pub fn report(&self, index: usize, state: PeerSync) {
        let Ok(mut peers) = self.peers.lock() else {
            return;
        };
        if let Some((_, slot)) = peers.get_mut(index) {
            if *slot != PeerSync::Synced {
                *slot = state;
            }
        }
        let all_heard = peers.iter().all(|(_, p)| *p != PeerSync::Unknown);
        let any_synced = peers.iter().any(|(_, p)| *p == PeerSync::Synced);
        if all_heard && (any_synced || self.allow_without_peers) && !self.is_open() {
            tracing::info!(synced_from_a_peer = any_synced, "publishing opens");
            self.open.send_replace(true);
        }
    }

    /// Why publishing is closed, and what the operator can do about it;
    /// `None` once open. Names peers, nothing they sent.
    pub fn closed_reason(&self) -> Option<String> {
        if self.is_open() {
            return None;
        }
        let peers = self
            .peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Some(closed_message(&peers))
    }
}

/// The message of a closed gate over `peers`: the peers it waits for and
/// the way out of each case.
fn closed_message(peers: &[(String, PeerSync)]) -> String {
    let prefix = "publishing is closed until this node has fetched its own feed's newest entries \
                  from a peer (restore safety)";
    let named = |state: PeerSync| -> Vec<&str> {
        peers
            .iter()
            .filter(|(_, p)| *p == state)
            .map(|(name, _)| name.as_str())
            .collect()
    };
    let list = |names: &[&str]| {
        let mut list = names[..names.len().min(NAMED_AT_MOST)].join(", ");
        if names.len() > NAMED_AT_MOST {
            list.push_str(&format!(" and {} more", names.len() - NAMED_AT_MOST));
        }
        list
    };
    // Peers neither served the own feed nor count as unreachable yet: the
    // gate waits for them, reachable or not (three failed attempts in a
    // row and they no longer count).
    let waiting = named(PeerSync::Unknown);
    match waiting.as_slice() {
        [] => {}
        [name] => {
            return format!(
                "{prefix}: peer {name} has not served this node's own feed yet (its last error \
                 is in civex status); fix that peer, or remove it (civex peer remove {name})"
            )
        }
        names => {
            return format!(
                "{prefix}: peers {} have not served this node's own feed yet (their last errors \
                 are in civex status); fix those peers, or remove them (civex peer remove NAME)",
                list(names)
            )
        }
    }
    // Every peer was heard from and none served it: none is reachable.
    let override_ = "or set publish.allow_without_peers and restart the node if this node is \
                     known to be current";
    match named(PeerSync::Unreachable).as_slice() {
        [] => format!(
            "{prefix}, and every peer was removed: add one that holds this node's feed (civex \
             peer add) and restart the node, {override_}"
        ),
        names => format!(
            "{prefix}, and no peer is reachable: {} failed {UNREACHABLE_AFTER} attempts in a row \
             (see the last errors in civex status); make a peer reachable that admits this node, \
             {override_}",
            list(names)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(names: &[&str]) -> Vec<String> {
        names.iter().map(|&name| name.to_owned()).collect()
    }

    /// Only the own feed's backlog marker makes an attempt succeed:
    /// connecting does not. A roster change ending a session counts for
    /// neither side.
    #[test]
    fn a_peer_counts_as_unreachable_after_three_attempts_without_the_own_feed() {
        let mut attempts = Attempts::default();
        assert!(!attempts.ended(Attempt::Failed));
        assert!(!attempts.ended(Attempt::Interrupted));
        assert!(!attempts.ended(Attempt::Failed));
        assert!(attempts.ended(Attempt::Failed));
        assert!(attempts.ended(Attempt::Failed), "still unreachable");
        assert!(!attempts.ended(Attempt::Served));
        assert!(
            !attempts.ended(Attempt::Failed),
            "counted from the served one"
        );
        assert!(!attempts.ended(Attempt::Failed));
        assert!(attempts.ended(Attempt::Failed));
        // A peer that served the own feed keeps counting as having served
        // it when it fails later.
        let gate = PublishGate::new(names(&["city-m", "city-x"]), false);
        gate.report(0, PeerSync::Synced);
        gate.report(0, PeerSync::Unreachable);
        gate.report(1, PeerSync::Unreachable);
        assert!(gate.is_open());
    }

    #[test]
    fn the_gate_waits_for_every_peer_and_one_sync() {
        let gate = PublishGate::new(names(&["city-m", "city-x"]), false);
        gate.report(0, PeerSync::Unreachable);
        assert!(!gate.is_open(), "opened with a peer not heard from");
        gate.report(1, PeerSync::Unreachable);
        assert!(
            !gate.is_open(),
            "opened with no peer synced and no override"
        );
        gate.report(1, PeerSync::Synced);
        assert!(gate.is_open());
        // Once open, it stays open.
        gate.report(1, PeerSync::Unreachable);
        assert!(gate.is_open());
    }

    /// A closed gate says what holds it closed and what lifts it: the
    /// peers that have not served the own feed, to fix or remove, and the
    /// override only once no peer is reachable.
    #[test]
    fn a_closed_gate_names_what_holds_it_and_the_way_out() {
        let gate = PublishGate::new(names(&["city-m", "city-x", "city-y"]), false);
        let reason = gate.closed_reason().unwrap();
        assert!(
            reason
                .contains("peers city-m, city-x, city-y have not served this node's own feed yet")
                && reason.contains("civex peer remove NAME"),
            "{reason}"
        );
        gate.report(0, PeerSync::Unreachable);
        gate.report(1, PeerSync::Removed);
        let reason = gate.closed_reason().unwrap();
        assert!(
            reason.contains("peer city-y has not served this node's own feed yet")
                && reason.ends_with("fix that peer, or remove it (civex peer remove city-y)"),
            "{reason}"
        );
        assert!(
            !reason.contains("allow_without_peers"),
            "the override offered while a peer may serve the feed: {reason}"
        );
        gate.report(2, PeerSync::Unreachable);
        let reason = gate.closed_reason().unwrap();
        assert!(
            reason.contains("no peer is reachable: city-m, city-y failed 3 attempts in a row")
                && reason.contains("publish.allow_without_peers"),
            "{reason}"
        );
        let gate = PublishGate::new(names(&["city-m"]), false);
        gate.report(0, PeerSync::Removed);
        let reason = gate.closed_reason().unwrap();
        assert!(
            reason.contains("every peer was removed") && reason.contains("allow_without_peers"),
            "{reason}"
        );
        let many: Vec<String> = (0..10).map(|i| format!("city-{i}")).collect();
        let reason = PublishGate::new(many, false).closed_reason().unwrap();
        assert!(reason.contains("city-7 and 2 more have not"), "{reason}");
        let gate = PublishGate::new(names(&["city-m"]), false);
        gate.report(0, PeerSync::Synced);
        assert_eq!(gate.closed_reason(), None);
    }

    #[test]
    fn the_override_opens_once_every_peer_was_tried() {
        let gate = PublishGate::new(names(&["city-m", "city-x"]), true);
        gate.report(0, PeerSync::Unreachable);
        assert!(!gate.is_open());
        gate.report(1, PeerSync::Unreachable);
        assert!(gate.is_open());
        let gate = PublishGate::new(Vec::new(), false);
        assert!(gate.is_open(), "a node without peers publishes at once");
    }
}
