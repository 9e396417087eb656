//! Replication: one task per configured peer subscribes to every origin
//! with a pinned key (this node's own included, for restore safety),
//! verifies each batch against the origin's key and the head held, and
//! hands it to the writer. Reconnects with exponential backoff and resumes
//! from the stored heads. A gRPC client edge: the decisions are in
//! `core::feed`.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use civex_proto::v1::{
    self as pb, feed_client::FeedClient, subscribe_response::Event, Cursor, SubscribeRequest,
};
use ed25519_dalek::VerifyingKey;
use tokio::sync::{oneshot, watch};
use tokio_stream::StreamExt;

use crate::{
    config::ReplicationConfig,
    core::{
        feed::{
            authenticate, judge_conflict, key_after, replacements_of, Authenticated, Conflict,
            Entry, FeedError, FeedId, Replacement, Tip, Uncovered, COVER_BYTES,
        },
        ids::hex,
    },
    gate::{Attempt, Attempts, PeerSync, PublishGate},
    keys::{KeyResolver, Member},
    peers::PeerPolicy,
    pki::Identity,
    publish::Recovery,
    service::MAX_CURSORS,
    store::{ConflictRecord, SharedStore},
    transport::{self, Security},
    writer::{FeedEnd, Job, Stored, WriteError, Writer},
};

/// Commits awaited at most at once per peer stream.
const IN_FLIGHT_COMMITS: usize = 8;

/// What is known of one peer, for status.
#[derive(Debug, Clone, Default)]
pub struct PeerState {
    /// A subscription stream is open.
    pub connected: bool,
    /// Last error, empty if none.
    pub last_error: String,
    /// Entries refused from this peer since start.
    pub refused: u64,
    /// The peer's head seq per origin as far as this node can tell: the
    /// last entry it delivered that verified and that this node stored or
    /// is storing (a refused commit takes its entries back), or the head
    /// its backlog marker named where this node holds that much. A head
    /// it only claims is never here.
    pub peer_heads: BTreeMap<String, u64>,
    /// Heads the peer's backlog marker named beyond what this node holds
    /// once everything the peer sent before it is settled: the peer sent
    /// nothing up to them that verified, so they are unverified claims,
    /// counted for nothing (for this node's own feed, the peer does not
    /// count as having served it, so publishing may stay closed). Resolved
    /// once this node has stored the feed up to one after a commit of the
    /// peer's; dropped when its stream ends.
    pub claimed_heads: BTreeMap<String, u64>,
    /// The text each claim put in `last_error`, taken out of it once the
    /// claim is resolved (or a later marker names no more than is held).
    pub(crate) claim_errors: BTreeMap<String, String>,
    /// Entries new to this node that it stored from this peer since start.
    pub(crate) stored: u64,
    /// The heads the peer's `Heads` answered when the current session
    /// began, of the origins this node asked it for: unverified, for
    /// showing how far behind this node may be (status, where only those
    /// of the feed held count), never for deciding anything.
    pub reported_heads: BTreeMap<String, ReportedHead>,
}

/// A head a peer's `Heads` reported (unverified).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportedHead {
    /// Its feed id.
    pub feed_id: FeedId,
    /// Its seq.
    pub seq: u64,
}

/// A configured peer and its state.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Name from the config.
    pub name: String,
    /// Address dialled.
    pub address: String,
    /// Origin its certificate must name (mutual TLS).
    pub origin: Option<String>,
    /// Whether other origins are taken through it, or only its own.
    pub relay: bool,
    /// Shared state.
    pub state: Arc<Mutex<PeerState>>,
}

impl Peer {
    /// A peer from its policy.
    pub fn new(policy: &PeerPolicy) -> Self {
        Self {
            name: policy.name.clone(),
            address: policy.address.clone(),
            origin: policy.origin.clone(),
            relay: policy.relay,
            state: Arc::default(),
        }
    }

    /// Entries new to this node stored from this peer since start.
    fn stored(&self) -> u64 {
        self.state.lock().map_or(0, |s| s.stored)
    }

    fn update(&self, change: impl FnOnce(&mut PeerState)) {
        if let Ok(mut state) = self.state.lock() {
            change(&mut state);
        }
    }
}

impl PeerState {
    /// Records the head the peer's backlog marker names for `origin`, this
    /// node holding `held` of it once every entry the peer sent before the
    /// marker is settled. Returns whether this node holds that much; if
    /// not, the head is only a claim (an honest peer sends its backlog
    /// before the marker), kept apart from the heads known.
    fn drained(&mut self, origin: &str, claimed: u64, held: u64) -> bool {
        if claimed > held {
            self.claimed_heads.insert(origin.to_owned(), claimed);
            return false;
        }
        self.claimed_heads.remove(origin);
        self.claim_resolved(origin);
        self.peer_heads.insert(origin.to_owned(), claimed);
        true
    }

    /// Shows the claim of `origin`'s feed described by `message`.
    fn show_claim(&mut self, origin: &str, message: String) {
        self.claim_errors.insert(origin.to_owned(), message.clone());
        self.last_error = message;
    }

    /// This node holds `origin`'s feed up to `held` after a commit of the
    /// peer's. Returns whether that resolved the peer's claim of it.
    fn stored(&mut self, origin: &str, held: u64) -> bool {
        if self
            .claimed_heads
            .get(origin)
            .is_none_or(|&claim| claim > held)
        {
            return false;
        }
        self.claimed_heads.remove(origin);
        self.claim_resolved(origin);
        true
    }

    /// Takes the text of a claim of `origin` that no longer stands out of
    /// `last_error`, if it is still there (another error stays).
    fn claim_resolved(&mut self, origin: &str) {
        if self.claim_errors.remove(origin).as_ref() == Some(&self.last_error) {
            self.last_error.clear();
        }
    }

    /// Records entries of `origin` up to `seq` that the peer delivered and
    /// that verified, handed to the writer (not stored yet: a refusal
    /// takes them back, [`Self::refused_after`]).
    fn delivered(&mut self, origin: &str, seq: u64) {
        let seen = self.peer_heads.entry(origin.to_owned()).or_default();
        *seen = (*seen).max(seq);
    }

    /// Takes back what the peer delivered of `origin` past seq `after`
    /// that was not stored: its commit, whose first entry links to the
    /// entry at `after`, was refused (a commit is stored whole or not at
    /// all). The peer holds that entry, which this node holds too.
    fn refused_after(&mut self, origin: &str, after: u64) {
        if let Some(seen) = self.peer_heads.get_mut(origin) {
            *seen = (*seen).min(after);
        }
    }
}

/// Most pages of a peer's `Heads` read when a session begins.
const MAX_HEADS_PAGES: usize = 64;

/// Reads the peer's `Heads` (at most `MAX_HEADS_PAGES` pages, all within
/// `timeout`) and keeps, as its reported heads, those of the `asked`
/// origins (status shows only those of the feed held). Errors (an older
/// peer, one that refuses or is too slow) are logged and change nothing.
async fn report_heads(
    mut client: FeedClient<tonic::transport::Channel>,
    peer: &Peer,
    asked: HashSet<String>,
    timeout: Duration,
) {
    let read = async {
        let mut request = pb::HeadsRequest {
            page_size: MAX_CURSORS as u32,
            page_token: String::new(),
        };
        let mut reported = BTreeMap::new();
        for _ in 0..MAX_HEADS_PAGES {
            let page = client.heads(request.clone()).await?.into_inner();
            for head in page.heads {
                let Ok(feed_id) = FeedId::try_from(&head.feed_id[..]) else {
                    continue;
                };
                if asked.contains(&head.origin) {
                    let seq = head.seq;
                    reported.insert(head.origin, ReportedHead { feed_id, seq });
                }
            }
            if page.next_page_token.is_empty() || page.next_page_token == request.page_token {
                break;
            }
            request.page_token = page.next_page_token;
        }
        Ok::<_, tonic::Status>(reported)
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(reported)) => peer.update(|s| s.reported_heads = reported),
        Ok(Err(status)) => tracing::debug!(peer = %peer.name, reason = %status.message(),
            "the peer did not tell its heads"),
        Err(_) => tracing::debug!(peer = %peer.name, "the peer did not tell its heads in time"),
    }
}

/// How far a session with a peer got, read when it ends.
#[derive(Default)]
struct Reached {
    /// The peer delivered its backlog marker of this node's own feed.
    served: bool,
    /// When the subscription opened.
    subscribed: Option<Instant>,
}

/// A commit queued to the writer with entries of one origin from a peer.
struct Commit {
    origin: String,
    /// The seq its first entry links to.
    after: u64,
    answer: oneshot::Receiver<Result<Stored, WriteError>>,
}

/// The peers' unverified claims to hold `origin`'s feed past `held` (see
/// [`PeerState::claimed_heads`]), by peer name.
pub fn claims_past(peers: &[Peer], origin: &str, held: u64) -> Vec<(String, u64)> {
    peers
        .iter()
        .filter_map(|peer| {
            let state = peer.state.lock().ok()?;
            let seq = *state.claimed_heads.get(origin)?;
            (seq > held).then(|| (peer.name.clone(), seq))
        })
        .collect()
}

/// The first of `peers` known to hold `origin`'s feed past `held`, with the
/// seq it holds it up to: it delivered entries past `held` that verified
/// (and that this node may still be storing). A head a peer only claims
/// does not count.
pub fn holding_more(peers: &[Peer], origin: &str, held: u64) -> Option<(String, u64)> {
    peers.iter().find_map(|peer| {
        let state = peer.state.lock().ok()?;
        let seq = *state.peer_heads.get(origin)?;
        (seq > held).then(|| (peer.name.clone(), seq))
    })
}

/// Everything a replication task needs.
#[derive(Clone)]
pub struct Replicator {
    /// This node's origin.
    pub own_origin: String,
    /// Keys of the origins to replicate.
    pub keys: Arc<KeyResolver>,
    /// The store (read heads).
    pub store: SharedStore,
    /// The writer.
    pub writer: Writer,
    /// Timing.
    pub timing: ReplicationConfig,
    /// Largest message accepted.
    pub max_message_bytes: usize,
    /// Opens publishing once the own feed is caught up from the peers.
    pub gate: Arc<PublishGate>,
    /// How connections to peers are secured.
    pub security: Security,
    /// Origins whose feed conflicts with the one held (evidence in the
    /// store): not replicated from any peer while the evidence stands.
    pub quarantined: Arc<Mutex<HashSet<String>>>,
    /// The federation roster, refreshed when its origin's entries arrive.
    pub roster: Arc<Roster>,
}

/// How a session that did not fail ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The peer ended the stream.
    ByPeer,
    /// The roster changed: subscribe again with the new origins.
    RosterChanged,
}

/// What a received entry, differing from the one held at its seq, shows.
#[derive(Debug)]
enum Judged {
    /// Evidence against the origin: its key signed both.
    Conflict(Box<Conflict>),
    /// No evidence: the roster kept the held one when it replaced the
    /// origin's lost key (`Replicator::kept_by_roster`).
    Refused(FeedError),
    /// No evidence: the received one is not validly signed.
    Forged,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("stream failed: {}", .0.message())]
    Status(#[from] tonic::Status),
    #[error("refused entries: {0}")]
    Refused(#[from] FeedError),
    #[error("store: {0}")]
    Write(#[from] WriteError),
    #[error("peer sent origin {0:?}, which has no pinned key")]
    UnknownOrigin(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    HeldBack(String),
}

impl Replicator {
    /// Replicates from `peer` until `shutdown` turns true; `index` is the
    /// peer's slot in the publish gate (peers present at start have one).
    pub async fn run(self, peer: Peer, index: Option<usize>, mut shutdown: watch::Receiver<bool>) {
        let initial = Duration::from_millis(self.timing.backoff_initial_ms);
        let max = Duration::from_millis(self.timing.backoff_max_ms);
        let mut backoff = initial;
        // The wait before the session now beginning.
        let mut waited = Duration::ZERO;
        let mut attempts = Attempts::default();
        loop {
            let mut reached = Reached::default();
            let stored_before = peer.stored();
            let result = tokio::select! {
                result = self.session(&peer, index, &mut reached) => result,
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            let served = reached.served;
            // The backoff starts over only after a session that got
            // somewhere: it stored entries new to this node, stayed
            // subscribed at least as long as the wait before it, or ended
            // for a roster change. A peer that takes the subscription and
            // then fails at once every time (a broken or hostile one) is
            // retried less and less often, as one that cannot be dialled
            // is; one whose sessions last is retried soon.
            let progressed = matches!(result, Ok(Ended::RosterChanged))
                || peer.stored() > stored_before
                || reached.subscribed.is_some_and(|at| at.elapsed() >= waited);
            if progressed {
                backoff = initial;
            }
            // A claim belongs to the stream that made it (its last error
            // stays on show).
            peer.update(|s| {
                s.connected = false;
                s.claimed_heads.clear();
            });
            let delivered_own = {
                let state = peer.state.lock().unwrap_or_else(|e| e.into_inner());
                state
                    .peer_heads
                    .get(&self.own_origin)
                    .is_some_and(|seq| *seq > 0)
            };
            let attempt = match (&result, served) {
                (_, true) => Attempt::Served,
                (Ok(Ended::RosterChanged), false) => Attempt::Interrupted,
                _ if delivered_own => Attempt::Delivering,
                _ => Attempt::Failed,
            };
            match result {
                Ok(Ended::RosterChanged) => {
                    tracing::info!(peer = %peer.name, "the roster changed; subscribing again")
                }
                Ok(Ended::ByPeer) => {
                    tracing::info!(peer = %peer.name, address = %peer.address, "peer ended the stream");
                    if !served {
                        let message = format!(
                            "the peer ended the stream before serving this node's own feed \
                             ({}: no backlog marker)",
                            self.own_origin
                        );
                        peer.update(|s| s.last_error = message);
                    }
                }
                Err(err) => {
                    tracing::warn!(peer = %peer.name, address = %peer.address, error = %err, retry_in_ms = backoff.as_millis() as u64, "replication stream failed");
                    peer.update(|s| s.last_error = err.to_string());
                }
            }
            // A peer counts as unreachable for the publish gate only after
            // several failed attempts in a row (it may be restarting too,
            // and hold this node's newest entries). An attempt fails unless
            // the peer serves this node's own feed (its backlog marker): a
            // peer that cannot be dialled, that refuses this node, or that
            // connects and then fails or ends the stream before the marker
            // all count the same. A peer holds this node's feed only if it
            // knows this node, which admits it, except in two cases where
            // restore safety then rests on the other peers: the roster
            // removed this node, or the peer's read policy for it leaves
            // out its own origin. A peer that served the own feed once
            // keeps counting as having served it; one that delivered
            // entries of it (they verified and were stored) but no marker
            // yet never counts as unreachable.
            let unreachable = attempts.ended(attempt);
            if let Some(index) = index.filter(|_| unreachable) {
                self.gate.report(index, PeerSync::Unreachable);
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            waited = backoff;
            backoff = (backoff * 2).min(max);
        }
    }

    /// One session with `peer`; `reached` says how far it got.
    async fn session(
        &self,
        peer: &Peer,
        index: Option<usize>,
        reached: &mut Reached,
    ) -> Result<Ended, SessionError> {
        let mut pending = VecDeque::new();
        let mut ended = self.replicate(peer, index, &mut pending, reached).await;
        // However the session ended, the commits it queued are answered
        // before it returns: a refused one takes its entries back from the
        // peer's heads, and a fork the writer found is judged.
        while let Some(commit) = pending.pop_front() {
            let settled = self.settle(peer, index, Some(commit)).await;
            match (settled, &ended) {
                (Err(err), Ok(_)) => ended = Err(err),
                (Err(err), Err(_)) => tracing::debug!(peer = %peer.name, error = %err,
                    "a later commit of the failed session was refused too"),
                (Ok(()), _) => {}
            }
        }
        ended
    }

    /// One session: subscribes and replicates until the stream ends or
    /// fails, or the roster changes. Commits are queued in `pending`.
    async fn replicate(
        &self,
        peer: &Peer,
        index: Option<usize>,
        pending: &mut VecDeque<Commit>,
        reached: &mut Reached,
    ) -> Result<Ended, SessionError> {
        // Watched from before the cursors are made, so a roster change while
        // connecting still makes this session start over with new origins.
        let mut roster_changes = self.roster.changes();
        roster_changes.borrow_and_update();
        let timeout = Duration::from_millis(self.timing.connect_timeout_ms);
        let expected = peer.origin.clone().map(Identity::Origin);
        let channel = transport::connect(&peer.address, &self.security, expected, timeout)
            .await
            .map_err(|err| SessionError::Connect(transport::error_chain(&err)))?;
        let mut client = FeedClient::new(channel)
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes);
        let mut tips: HashMap<String, Option<Tip>> = HashMap::new();
        // The key in force after each origin's tip (rotations followed).
        let mut keys: HashMap<String, VerifyingKey> = HashMap::new();
        // Origins whose entries of a new feed id the roster does not name
        // (yet): skipped until the session reconnects, which a roster
        // change makes it do, while the other origins go on.
        let mut waiting: HashSet<String> = HashSet::new();
        // Origins whose entries were refused in this session: skipped from
        // then on, while the others go on (a peer serves origins in its own
        // order, so ending the session at once would starve those after
        // the bad one for good); once every origin's backlog has been
        // drained, the session ends with the first refusal and is retried
        // with backoff.
        let mut set_aside: HashSet<String> = HashSet::new();
        let mut first_refusal: Option<SessionError> = None;
        let mut held = HeldBack::default();
        // Idempotency records of the own feed's entries learned back, whose
        // publishes may come in several messages, or began in an earlier
        // session (read back from the store).
        let mut recovery = Recovery::after(self.store.as_ref(), &self.own_origin)
            .map_err(|e| SessionError::Write(e.into()))?;
        let mut cursors = Vec::new();
        for origin in self.keys.origins() {
            let origin = origin.as_str();
            let taken =
                peer.relay || origin == self.own_origin || peer.origin.as_deref() == Some(origin);
            if !taken || self.is_quarantined(origin) {
                continue;
            }
            let tip = self
                .store
                .head(origin)
                .map_err(|e| SessionError::Write(e.into()))?
                .map(|h| h.tip);
            cursors.push(Cursor {
                origin: origin.to_owned(),
                feed_id: tip.map(|t| t.feed_id.to_vec()).unwrap_or_default(),
                seq: tip.map_or(0, |t| t.seq),
                entry_hash: tip.map(|t| t.hash.to_vec()).unwrap_or_default(),
            });
            if let Some(key) = self.key_after(origin, tip.map_or(0, |t| t.seq))? {
                keys.insert(origin.to_owned(), key);
            }
            tips.insert(origin.to_owned(), tip);
        }
        // A subscription takes at most `MAX_CURSORS` origins: a node that
        // knows more (a national roster) opens several, read as one. The
        // first holds this node's own origin (always readable: the peer
        // admits it or refuses the session), the roster origin (served
        // before members' entries under keys it names) and the peer's own.
        let first = |c: &Cursor| {
            c.origin == self.own_origin
                || self.roster.origin.as_deref() == Some(c.origin.as_str())
                || peer.origin.as_deref() == Some(c.origin.as_str())
        };
        cursors.sort_by_key(|c| !first(c));
        let mut streams = tokio_stream::StreamMap::new();
        let chunks: Vec<Vec<Cursor>> = if cursors.is_empty() {
            vec![Vec::new()]
        } else {
            cursors
                .chunks(MAX_CURSORS)
                .map(<[Cursor]>::to_vec)
                .collect()
        };
        // Origins whose backlog marker has not come yet (see `set_aside`).
        let mut undrained: HashSet<String> = HashSet::new();
        for (i, cursors) in chunks.into_iter().enumerate() {
            let origins = cursors.iter().map(|c| c.origin.clone());
            let origins: Vec<String> = origins.collect();
            let subscribed = client
                .subscribe(SubscribeRequest {
                    cursors,
                    all_origins: false,
                })
                .await;
            let stream = match subscribed {
                Ok(stream) => stream.into_inner(),
                // A later subscription may name only origins the peer's
                // read policy leaves out: nothing to read there.
                Err(status) if i > 0 && status.code() == tonic::Code::PermissionDenied => {
                    tracing::debug!(peer = %peer.name, reason = %status.message(),
                        "the peer serves none of one subscription's origins");
                    continue;
                }
                Err(status) => return Err(status.into()),
            };
            undrained.extend(origins);
            // Each ends with `None`, so the end of any one ends the session.
            streams.insert(i, stream.map(Some).chain(tokio_stream::once(None)));
        }
        // The last error stays on show after a reconnect: a peer that fails
        // the same way every time is connected only briefly.
        peer.update(|s| {
            s.connected = true;
            s.reported_heads.clear();
        });
        // Its own feed cannot be verified here, so it is not taken: say so,
        // or `civex peer add` looks like it worked and nothing arrives;
        // once the key is known (the roster added it), stop saying so.
        if let Some(origin) = peer.origin.as_deref() {
            let unknown = format!("its own origin {origin} has no feed key here");
            if self.keys.key_for(origin, &[], 0).is_none() {
                let message = format!(
                    "{unknown} (not under [trusted_origins], not in the federation roster): its \
                     entries are not taken; pin its key, or have the roster add it"
                );
                tracing::warn!(peer = %peer.name, "{message}");
                peer.update(|s| s.last_error = message);
            } else {
                peer.update(|s| {
                    if s.last_error.starts_with(&unknown) {
                        s.last_error.clear();
                    }
                });
            }
        }
        reached.subscribed = Some(Instant::now());
        tracing::info!(peer = %peer.name, address = %peer.address, "replicating");
        // How far the peer says it is, read beside the streams within the
        // connect timeout (a peer that never answers holds nothing up), and
        // given up with the session.
        let asked = tips.keys().cloned().collect();
        let reported = report_heads(client.clone(), peer, asked, timeout);
        tokio::pin!(reported);
        let mut reporting = true;
        let mut ended = Ended::ByPeer;
        loop {
            if first_refusal.is_some() && undrained.is_empty() {
                break;
            }
            let deadline = held.oldest().map(|since| since + timeout);
            let message = tokio::select! {
                // In this order: a message already come is read before the
                // wait is judged (the cover may be in it, however long the
                // session spent storing what came before).
                biased;
                // New members: reconnect with their cursors.
                _ = roster_changes.changed() => {
                    ended = Ended::RosterChanged;
                    break;
                }
                () = &mut reported, if reporting => {
                    reporting = false;
                    continue;
                }
                next = streams.next() => next.and_then(|(_, message)| message).transpose()?,
                // Held back too long, with nothing more come: no cover is
                // coming.
                () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now).into()),
                    if deadline.is_some() =>
                {
                    for (origin, waited) in held.take_waiting(timeout, None) {
                        refuse_held(peer, origin, &waited, &mut set_aside, &mut first_refusal);
                    }
                    continue;
                }
            };
            let Some(message) = message else {
                // The peer's stream ended before a cover came.
                for (origin, waited) in held.take_waiting(Duration::ZERO, None) {
                    refuse_held(peer, origin, &waited, &mut set_aside, &mut first_refusal);
                }
                break;
            };
            // However busy a peer keeps the session with other origins'
            // messages, nothing waits for a cover longer than twice the
            // timeout.
            let about = match &message.event {
                Some(Event::Entries(batch)) => Some(batch.origin.as_str()),
                Some(Event::Drained(drained)) => Some(drained.origin.as_str()),
                _ => None,
            };
            for (origin, waited) in held.take_waiting(2 * timeout, about) {
                refuse_held(peer, origin, &waited, &mut set_aside, &mut first_refusal);
            }
            match message.event {
                Some(Event::Entries(batch)) => {
                    let origin = batch.origin;
                    if self.is_quarantined(&origin)
                        || waiting.contains(&origin)
                        || set_aside.contains(&origin)
                    {
                        continue;
                    }
                    let key = *keys.get(&origin).ok_or_else(|| {
                        peer.update(|s| s.refused += batch.entries.len() as u64);
                        SessionError::UnknownOrigin(origin.clone())
                    })?;
                    let key = &key;
                    let replacements = self.keys.replacements(&origin);
                    let tip = tips
                        .get(&origin)
                        .copied()
                        .ok_or_else(|| SessionError::UnknownOrigin(origin.clone()))?;
                    let received = batch.entries.len() as u64;
                    let entries = batch
                        .entries
                        .into_iter()
                        .map(Entry::decode)
                        .collect::<Result<Vec<_>, _>>()
                        .inspect_err(|_| peer.update(|s| s.refused += received))?;
                    // Entries held back by the last message, waiting for
                    // a signature to cover them, come first.
                    let (before, since) = held.take(&origin);
                    let received = before.entries().len() + entries.len();
                    // A peer can make each entry need its own signature
                    // check (and some, three): a long message takes a while.
                    let heavy = entries.len() > CHECKED_INLINE;
                    let Authenticated {
                        accepted: entries,
                        tip: new_tip,
                        key: new_key,
                        uncovered: held_back,
                        refused,
                    } = crate::cpu_bound(heavy, || {
                        authenticate(&origin, key, &replacements, tip, before, entries)
                    });
                    // Still waiting from the same entry: since then.
                    let since = since
                        .filter(|_| entries.is_empty())
                        .unwrap_or_else(Instant::now);
                    let waiting_here = (held_back.entries().len(), held_back.bytes());
                    if !held.hold(&origin, held_back, since) {
                        let err = SessionError::HeldBack(format!(
                            "origin {origin}: {} entries ({} KiB) wait for a later signature \
                             to cover them, and with the entries of other origins waiting this \
                             session would hold back more than {} MiB; the origin is taken \
                             again in the next session",
                            waiting_here.0,
                            waiting_here.1.div_ceil(1024),
                            HELD_BACK_BYTES >> 20
                        ));
                        set_aside_for_session(
                            peer,
                            origin.clone(),
                            err,
                            &mut set_aside,
                            &mut first_refusal,
                        );
                    }
                    let refused = match refused {
                        None => None,
                        Some(first_fault) => {
                            peer.update(|s| s.refused += (received - entries.len()) as u64);
                            // A validly signed entry of another feed id:
                            // the origin started over; keep the evidence.
                            if let (FeedError::WrongFeedId { .. }, other) = &first_fault {
                                let head = entries.last().cloned().map_or_else(
                                    || self.held_entry(&origin, tip.map_or(0, |t| t.seq)),
                                    |e| Ok(Some(e)),
                                )?;
                                let judged = match head {
                                    Some(held) => self.judge(&held, other)?,
                                    None => Judged::Forged,
                                };
                                if let Judged::Conflict(conflict) = judged {
                                    // One at a time: on an error the rest stay queued, and
                                    // the session settles them before it ends.
                                    while let Some(answer) = pending.pop_front() {
                                        self.settle(peer, index, Some(answer)).await?;
                                    }
                                    return Err(self.quarantine(peer, *conflict).await);
                                }
                            }
                            // A later entry of a new feed id, validly
                            // linked: the replacement of a lost key that
                            // the roster names in entries not read yet
                            // (another origin's, maybe later in this
                            // stream), or a peer's forgery. Either way
                            // it is refused, and the origin waits. So
                            // does an entry of a feed the roster ended,
                            // from a node that held it before the
                            // roster's word.
                            let waits = match &first_fault {
                                (fault @ FeedError::WrongFeedId { .. }, other)
                                    if other.body.seq > 1 =>
                                {
                                    Some(fault)
                                }
                                (fault @ FeedError::Replaced { .. }, _) => Some(fault),
                                _ => None,
                            };
                            if let (Some(fault), Some(_)) = (waits, &self.roster.origin) {
                                let message = format!(
                                    "{fault}; refused, and replication of origin {origin} \
                                     from this peer waits for a roster change"
                                );
                                tracing::warn!(peer = %peer.name, "{message}");
                                peer.update(|s| s.last_error = message);
                                waiting.insert(origin.clone());
                            }
                            match waiting.contains(&origin) {
                                true => None,
                                false => Some(first_fault.0),
                            }
                        }
                    };
                    keys.insert(origin.clone(), new_key);
                    tips.insert(origin.clone(), new_tip);
                    let after = tip.map_or(0, |t| t.seq);
                    let roster_ends = match self.roster.origin.as_deref() == Some(origin.as_str()) {
                        true => self.roster.ends_in(&entries),
                        false => Vec::new(),
                    };
                    let mut job = recovery.job(origin == self.own_origin, entries, replacements);
                    job.roster_ends = roster_ends;
                    pending.push_back(self.hand_over(peer, &origin, after, job).await?);
                    while pending.len() > IN_FLIGHT_COMMITS {
                        self.settle(peer, index, pending.pop_front()).await?;
                    }
                    if self.roster.origin.as_deref() == Some(origin.as_str()) {
                        while let Some(answer) = pending.pop_front() {
                            self.settle(peer, index, Some(answer)).await?;
                        }
                        self.roster
                            .refresh()
                            .map_err(|e| SessionError::Write(e.into()))?;
                    }
                    if let Some(err) = refused {
                        // Keep what verified before the bad entry; the rest
                        // of this origin waits for the next session.
                        while let Some(answer) = pending.pop_front() {
                            self.settle(peer, index, Some(answer)).await?;
                        }
                        set_aside_for_session(
                            peer,
                            origin,
                            err.into(),
                            &mut set_aside,
                            &mut first_refusal,
                        );
                    }
                }
                Some(Event::Drained(drained)) => {
                    if self.keys.key_for(&drained.origin, &[], 0).is_none() {
                        continue;
                    }
                    while let Some(answer) = pending.pop_front() {
                        self.settle(peer, index, Some(answer)).await?;
                    }
                    undrained.remove(&drained.origin);
                    // The peer's backlog ended, and no signature covered
                    // the entries held back.
                    let (waited, _) = held.take(&drained.origin);
                    if !waited.is_empty() {
                        let origin = drained.origin.clone();
                        refuse_held(peer, origin, &waited, &mut set_aside, &mut first_refusal);
                    }
                    // The entries of a quarantined origin were skipped, not
                    // refused: the marker says nothing of this peer then.
                    // Nor does it for an origin set aside: its backlog was
                    // not taken.
                    if self.is_quarantined(&drained.origin) || set_aside.contains(&drained.origin) {
                        continue;
                    }
                    reached.served |= drained.origin == self.own_origin;
                    // Where entries it sent wait for a roster change, that
                    // message stays on show.
                    let show = !waiting.contains(&drained.origin);
                    self.marker(peer, index, &drained.origin, drained.head_seq, show);
                }
                Some(Event::Mismatch(mismatch)) => {
                    // The peer stops serving that origin: no marker follows.
                    undrained.remove(&mismatch.origin);
                    // The peer's entry at our head's seq, if it is validly
                    // signed, is evidence of a fork or a re-created feed.
                    let theirs = mismatch.held.clone().and_then(|e| Entry::decode(e).ok());
                    let mut message = format!(
                        "origin {} diverges: the peer holds feed {} and a different entry at our head; \
                         replication of that origin from this peer stopped",
                        mismatch.origin,
                        hex(&mismatch.feed_id)
                    );
                    // This node holds entries past where the roster ended
                    // the origin's feed (taken before the roster's word):
                    // every peer that follows the new feed answers so, and
                    // no entry of it links to the head here.
                    let head = self
                        .store
                        .head(&mismatch.origin)
                        .map_err(|e| SessionError::Write(e.into()))?
                        .map(|h| h.tip);
                    let ended = head.and_then(|tip| {
                        let replacements = self.keys.replacements(&mismatch.origin);
                        let ended = replacements.into_iter().find(|r| r.refuses(&tip));
                        ended.map(|r| (r, tip))
                    });
                    if let Some((ended, tip)) = ended {
                        message = format!(
                            "this node holds origin {}'s feed {} up to seq {}, past seq {} where \
                             the federation roster ended it (its key was lost): those entries \
                             are refused everywhere and this node cannot follow the new feed; \
                             restore this node's store from a backup of a peer that follows \
                             the new feed",
                            mismatch.origin,
                            hex(&ended.old_feed_id),
                            tip.seq,
                            ended.last_seq
                        );
                    } else if let Some(theirs) = theirs.filter(|t| t.body.origin == mismatch.origin)
                    {
                        let ours = self.held_entry(&mismatch.origin, theirs.body.seq)?;
                        if let Some(ours) = ours {
                            match self.judge(&ours, &theirs)? {
                                Judged::Conflict(conflict) => {
                                    // One at a time: on an error the rest stay queued, and
                                    // the session settles them before it ends.
                                    while let Some(answer) = pending.pop_front() {
                                        self.settle(peer, index, Some(answer)).await?;
                                    }
                                    return Err(self.quarantine(peer, *conflict).await);
                                }
                                Judged::Refused(fault) => {
                                    message = format!(
                                        "the peer holds another entry at our head: {fault}; \
                                         replication of that origin from this peer stopped"
                                    );
                                }
                                Judged::Forged => {}
                            }
                        }
                    }
                    tracing::error!(peer = %peer.name, address = %peer.address, "{message}");
                    peer.update(|s| s.last_error = message);
                }
                Some(Event::NotServed(not_served)) => {
                    undrained.remove(&not_served.origin);
                    // The peer's read policy leaves the origin out (never
                    // this node's own): the others go on.
                    tracing::debug!(peer = %peer.name, origin = %not_served.origin,
                        reason = %not_served.reason, "the peer does not serve this origin to this node");
                }
                None => {}
            }
        }
        while let Some(commit) = pending.pop_front() {
            self.settle(peer, index, Some(commit)).await?;
        }
        match first_refusal {
            Some(err) => Err(err),
            None => Ok(ended),
        }
    }

    /// Takes the peer's backlog marker of `origin`, naming its head
    /// `claimed`, once every commit queued before it is answered. A head
    /// beyond what this node holds is a claim, shown as one (in the peer's
    /// last error, if `show`).
    fn marker(&self, peer: &Peer, index: Option<usize>, origin: &str, claimed: u64, show: bool) {
        let held = self.held_seq(origin);
        let held_all = peer
            .state
            .lock()
            .is_ok_and(|mut s| s.drained(origin, claimed, held));
        let own = origin == self.own_origin;
        if held_all {
            if let Some(index) = index.filter(|_| own) {
                self.gate.report(index, PeerSync::Synced);
            }
            return;
        }
        // The peer sent nothing up to the head it names that verified.
        let holds_gate = own && index.is_some() && !self.gate.is_open();
        let message = unverified_claim(&peer.name, origin, own, claimed, held, holds_gate);
        tracing::warn!(peer = %peer.name, address = %peer.address, "{message}");
        if show {
            peer.update(|s| s.show_claim(origin, message));
        }
    }

    /// After a commit of the peer's entries of `origin`: a claim of the
    /// peer's that this node now holds the feed up to is resolved. For this
    /// node's own feed, the peer then counts as having served it.
    fn resolve_claim(&self, peer: &Peer, index: Option<usize>, origin: &str) {
        let claims = peer
            .state
            .lock()
            .is_ok_and(|s| s.claimed_heads.contains_key(origin));
        if !claims {
            return;
        }
        let held = self.held_seq(origin);
        let resolved = peer.state.lock().is_ok_and(|mut s| s.stored(origin, held));
        if !resolved {
            return;
        }
        tracing::info!(peer = %peer.name, %origin, seq = held, "the peer delivered the entries it claimed");
        if let Some(index) = index.filter(|_| origin == self.own_origin) {
            self.gate.report(index, PeerSync::Synced);
        }
    }

    /// The seq this node holds `origin`'s feed up to, durably.
    fn held_seq(&self, origin: &str) -> u64 {
        self.writer.heads().get(origin).map_or(0, |h| h.tip.seq)
    }

    /// Hands entries of `origin` that verified, the first linked to the
    /// entry at seq `after`, to the writer. From now they count as the
    /// peer's head (this node may still be storing them) until their
    /// commit is refused.
    async fn hand_over(
        &self,
        peer: &Peer,
        origin: &str,
        after: u64,
        job: Job,
    ) -> Result<Commit, SessionError> {
        if let Some(last) = job.entries.last() {
            let seq = last.entry.body.seq;
            peer.update(|s| s.delivered(origin, seq));
        }
        match self.writer.send(job).await {
            Ok(answer) => Ok(Commit {
                origin: origin.to_owned(),
                after,
                answer,
            }),
            Err(err) => {
                peer.update(|s| s.refused_after(origin, after));
                Err(err.into())
            }
        }
    }

    fn is_quarantined(&self, origin: &str) -> bool {
        self.quarantined
            .lock()
            .map(|set| set.contains(origin))
            .unwrap_or(true)
    }

    /// The key in force for `origin`'s entries after `seq` (see
    /// [`crate::core::feed::key_after`]), from the rotations held.
    fn key_after(&self, origin: &str, seq: u64) -> Result<Option<VerifyingKey>, SessionError> {
        let Some(first) = self.keys.key_for(origin, &[], 0) else {
            return Ok(None);
        };
        let rotations = self
            .store
            .rotations(origin)
            .map_err(|e| SessionError::Write(e.into()))?;
        let replacements = self.keys.replacements(origin);
        key_after(origin, &first, &replacements, &rotations, seq)
            .map(Some)
            .map_err(SessionError::Refused)
    }

    /// Judges a received entry against the one held, each with the key in
    /// force for it (the pinned key for another feed id). Where the roster
    /// replaced the origin's lost key, another feed's genesis is no
    /// evidence: the only key that could sign it is the lost one; nor is
    /// another entry at a seq of the history the roster kept, once this
    /// node holds that history's last entry.
    fn judge(&self, held: &Entry, other: &Entry) -> Result<Judged, SessionError> {
        let origin = &held.body.origin;
        if let Some(fault) = self.kept_by_roster(held, other)? {
            return Ok(Judged::Refused(fault));
        }
        let Some(held_key) = self.key_after(origin, held.body.seq.saturating_sub(1))? else {
            return Ok(Judged::Forged);
        };
        // Another feed is the origin's word only with the key in force
        // now: a key rotated away may have been retired for being exposed.
        let other_key = if other.body.feed_id == held.body.feed_id {
            self.key_after(origin, other.body.seq.saturating_sub(1))?
        } else if self.keys.replacements(origin).is_empty() {
            self.key_after(origin, self.held_seq(origin))?
        } else {
            None
        };
        Ok(other_key
            .and_then(|key| judge_conflict((&held_key, held), (&key, other)))
            .map_or(Judged::Forged, |c| Judged::Conflict(Box::new(c))))
    }

    /// The refusal of `other`, an entry of `held`'s feed at `held`'s seq,
    /// when the roster ended that feed at or after that seq and this node
    /// holds the last entry it kept: the held entries up to it are then
    /// the history the roster names (each links to the one before), and a
    /// different one can only have been signed with the lost key.
    fn kept_by_roster(
        &self,
        held: &Entry,
        other: &Entry,
    ) -> Result<Option<FeedError>, SessionError> {
        let origin = &held.body.origin;
        let (feed_id, seq) = (held.feed_id(), held.body.seq);
        if other.body.feed_id != feed_id || other.body.seq != seq {
            return Ok(None);
        }
        for ended in self.keys.replacements(origin) {
            if ended.old_feed_id != feed_id || ended.last_seq < seq {
                continue;
            }
            let last = self.held_entry(origin, ended.last_seq)?;
            if last.is_some_and(|last| ended.starts_after(&last.tip())) {
                return Ok(Some(FeedError::Replaced {
                    origin: origin.clone(),
                    seq,
                    feed_id: hex(&feed_id),
                    last_seq: ended.last_seq,
                }));
            }
        }
        Ok(None)
    }

    /// The entry held at (origin, seq), if any.
    fn held_entry(&self, origin: &str, seq: u64) -> Result<Option<Entry>, SessionError> {
        if seq == 0 {
            return Ok(None);
        }
        let held = self
            .store
            .entries(origin, seq, 1, usize::MAX)
            .map_err(|e| SessionError::Write(e.into()))?;
        Ok(held.into_iter().next().and_then(|e| Entry::decode(e).ok()))
    }

    /// Waits for a commit. A refused one takes its entries back from the
    /// peer's heads. A fork the writer found (a validly linked entry
    /// differing from the one held) becomes evidence when the origin's key
    /// signed both; otherwise the entry is refused as forged.
    async fn settle(
        &self,
        peer: &Peer,
        index: Option<usize>,
        commit: Option<Commit>,
    ) -> Result<(), SessionError> {
        let Some(commit) = commit else {
            return Ok(());
        };
        let answer = commit.answer.await.unwrap_or(Err(WriteError::Stopped));
        if answer.is_err() {
            peer.update(|s| s.refused_after(&commit.origin, commit.after));
        }
        match answer {
            Ok(stored) => {
                peer.update(|s| s.stored += stored.new as u64);
                self.resolve_claim(peer, index, &commit.origin);
                Ok(())
            }
            Err(WriteError::Fork {
                origin,
                seq,
                received,
            }) => {
                let judged = match self.held_entry(&origin, seq)? {
                    Some(held) => self.judge(&held, &received)?,
                    None => Judged::Forged,
                };
                if let Judged::Conflict(conflict) = judged {
                    return Err(self.quarantine(peer, *conflict).await);
                }
                peer.update(|s| s.refused += 1);
                Err(SessionError::Refused(match judged {
                    Judged::Refused(fault) => fault,
                    _ => FeedError::BadSignature { origin, seq },
                }))
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Keeps the evidence of a conflict and stops replicating its origin
    /// from every peer; other origins go on after the reconnect.
    async fn quarantine(&self, peer: &Peer, conflict: Conflict) -> SessionError {
        let origin = conflict.held.body.origin.clone();
        let (kind, seq) = (conflict.kind, conflict.other.body.seq);
        let record = ConflictRecord {
            conflict,
            peer: peer.name.clone(),
            detected_unix_micros: now_micros(),
        };
        let job = Job {
            entries: Vec::new(),
            idempotency: Vec::new(),
            conflict: Some(record),
            replacements: Vec::new(),
            feed_end: None,
            roster_ends: Vec::new(),
        };
        if let Err(err) = self.writer.write(job).await {
            return SessionError::Write(err);
        }
        if let Ok(mut set) = self.quarantined.lock() {
            set.insert(origin.clone());
        }
        let message = format!(
            "origin {origin}: {} at seq {seq} (evidence kept, see status); replication of {origin} \
             stopped, other origins go on",
            match kind {
                crate::core::feed::ConflictKind::Fork => "two validly signed entries (fork)",
                crate::core::feed::ConflictKind::Recreated => "the feed was started over with a new feed id",
            }
        );
        tracing::error!(peer = %peer.name, address = %peer.address, "{message}");
        SessionError::Conflict(message)
    }
}

/// Says that `peer` claims `origin`'s feed up to `claimed` while this node
/// holds it up to `held`, and what that claim does: it holds publishing
/// closed (`holds_gate`, this node's own feed) or nothing.
fn unverified_claim(
    peer: &str,
    origin: &str,
    own: bool,
    claimed: u64,
    held: u64,
    holds_gate: bool,
) -> String {
    let feed = match own {
        true => format!("this node's own feed ({origin})"),
        false => format!("{origin}'s feed"),
    };
    let claim = format!(
        "the peer claims {feed} up to seq {claimed}, but sent nothing past seq {held} (this \
         node's head) that verified"
    );
    match holds_gate {
        true => format!(
            "{claim}; publishing stays closed (restore safety) until the peer delivers those \
             entries, or, if its claim is false, until it is removed (civex peer remove {peer})"
        ),
        false => format!("{claim}; an unverified claim, not counted"),
    }
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// The federation roster: members' feed keys learned from the roster
/// origin's verified feed (`federation.roster_origin`).
pub struct Roster {
    /// The roster origin, if the federation has one.
    pub origin: Option<String>,
    keys: Arc<KeyResolver>,
    store: SharedStore,
    version: watch::Sender<u64>,
}

impl Roster {
    /// A roster kept in `keys`, read from `store`.
    pub fn new(origin: Option<String>, keys: Arc<KeyResolver>, store: SharedStore) -> Arc<Self> {
        Arc::new(Self {
            origin,
            keys,
            store,
            version: watch::channel(0).0,
        })
    }

    /// Re-reads the members from the roster origin's entries held. When
    /// they changed, replication sessions reconnect with the new origins.
    pub fn refresh(&self) -> Result<bool, crate::store::StoreError> {
        let Some(origin) = &self.origin else {
            return Ok(false);
        };
        let members = self
            .store
            .roster(origin)?
            .into_iter()
            .filter_map(|entry| {
                let bytes: [u8; 32] = entry.feed_key.as_slice().try_into().ok()?;
                let key = VerifyingKey::from_bytes(&bytes)
                    .ok()
                    .filter(|k| !k.is_weak())?;
                let replacements = replacements_of(&entry).unwrap_or_else(|| {
                    tracing::warn!(member = %entry.origin, "the roster's key replacements of this member are malformed; ignored");
                    Vec::new()
                });
                let removed = entry.removed;
                Some((
                    entry.origin,
                    Member {
                        key,
                        replacements,
                        removed,
                    },
                ))
            })
            .collect();
        let changed = self.keys.set_roster(members);
        if changed {
            tracing::info!(roster = %origin, origins = self.keys.origins().len(), "federation roster changed");
            self.version.send_modify(|v| *v += 1);
        }
        Ok(changed)
    }

    /// The feeds that the roster entries among `entries` (the roster
    /// origin's) end, for members whose keys the roster replaces here: the
    /// writer refuses later entries of them from the commit on, also in
    /// jobs of other sessions made before [`Self::refresh`] ran. A
    /// replacement amended (the same end, another new feed: its key was
    /// lost before its first use) also ends the new feed it named before.
    pub fn ends_in(&self, entries: &[Entry]) -> Vec<FeedEnd> {
        entries
            .iter()
            .filter_map(|entry| match &entry.body.payload {
                Some(pb::entry_body::Payload::Roster(member)) => Some(member),
                _ => None,
            })
            .filter(|member| !self.keys.is_pinned(&member.origin))
            .flat_map(|member| {
                let known = self.keys.replacements(&member.origin);
                let replacements = replacements_of(member).unwrap_or_default();
                replacements.into_iter().map(move |r| FeedEnd {
                    origin: member.origin.clone(),
                    feed_id: r.old_feed_id,
                    seq: r.last_seq,
                    hash: r.last_hash,
                    abandoned: known
                        .iter()
                        .find(|k| {
                            k.old_feed_id == r.old_feed_id
                                && k.last_seq == r.last_seq
                                && k.new_feed_id != r.new_feed_id
                        })
                        .map(|k| k.new_feed_id),
                    enforce: true,
                })
            })
            .collect()
    }

    /// Notified whenever the members change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Whether `origin` is a member this node knows now (see
    /// [`KeyResolver::is_member`]).
    pub fn is_member(&self, origin: &str) -> bool {
        self.keys.is_member(origin)
    }

    /// The replacements of `origin`'s lost keys the roster names (see
    /// [`KeyResolver::replacements`]).
    pub fn replacements(&self, origin: &str) -> Vec<Replacement> {
        self.keys.replacements(origin)
    }

    /// Whether the roster's replacements of lost keys apply to `origin` on
    /// this node: it is not pinned here.
    pub fn replaces_keys_of(&self, origin: &str) -> bool {
        !self.keys.is_pinned(origin)
    }

    /// Whether the roster removed `origin` (see [`KeyResolver::was_removed`]).
    pub fn was_removed(&self, origin: &str) -> bool {
        self.keys.was_removed(origin)
    }
}

/// The running replication tasks, one per peer, started and stopped as
/// peers are added and removed.
pub struct Replication {
    replicator: Replicator,
    shutdown: watch::Receiver<bool>,
    /// By name.
    running: Mutex<BTreeMap<String, Running>>,
}

/// A peer replicated from: the peer, its publish-gate slot, its task.
type Running = (Peer, Option<usize>, tokio::task::JoinHandle<()>);

impl Replication {
    /// Starts a task per peer; these peers hold the publish gate's slots.
    pub fn start(
        replicator: Replicator,
        peers: &[PeerPolicy],
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Self> {
        let this = Arc::new(Self {
            replicator,
            shutdown,
            running: Mutex::default(),
        });
        for (index, policy) in peers.iter().enumerate() {
            this.spawn(policy, Some(index));
        }
        this
    }

    fn spawn(&self, policy: &PeerPolicy, index: Option<usize>) {
        let peer = Peer::new(policy);
        let task = tokio::spawn(self.replicator.clone().run(
            peer.clone(),
            index,
            self.shutdown.clone(),
        ));
        let mut running = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, _, old)) = running.insert(policy.name.clone(), (peer, index, task)) {
            old.abort();
        }
    }

    /// Starts replicating from a peer added at runtime (replacing one of
    /// the same name, whose publish-gate slot it takes over).
    pub fn add(&self, policy: &PeerPolicy) {
        let slot = self
            .running
            .lock()
            .ok()
            .and_then(|running| running.get(&policy.name).and_then(|(_, slot, _)| *slot));
        self.spawn(policy, slot);
    }

    /// Stops replicating from a peer; what it sent and was stored stays.
    pub fn remove(&self, name: &str) {
        let removed = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(name);
        if let Some((_, slot, task)) = removed {
            task.abort();
            // A removed peer no longer holds publishing closed.
            if let Some(slot) = slot {
                self.replicator.gate.report(slot, PeerSync::Removed);
            }
        }
    }

    /// The peers replicated from now, by name.
    pub fn peers(&self) -> Vec<Peer> {
        self.running
            .lock()
            .map(|running| running.values().map(|(peer, _, _)| peer.clone()).collect())
            .unwrap_or_default()
    }

    /// Waits for every task to end (after shutdown).
    pub async fn join(&self) {
        let tasks: Vec<_> = self
            .running
            .lock()
            .map(|mut running| {
                std::mem::take(&mut *running)
                    .into_values()
                    .map(|(_, _, task)| task)
                    .collect()
            })
            .unwrap_or_default();
        for task in tasks {
            let _ = task.await;
        }
    }
}

/// Most entries of a message authenticated without telling the runtime
/// (at most some 200 signature checks, a few milliseconds).
const CHECKED_INLINE: usize = 64;

/// Most bytes of entries a session holds back for all origins together,
/// waiting for later signatures to cover them (each origin's at most
/// `COVER_BYTES`).
const HELD_BACK_BYTES: usize = 4 * COVER_BYTES;

/// Entries a session holds back, per origin: linked after its tip, each
/// with a signature that does not verify, waiting for a later one to cover
/// them (`feed::authenticate`), with the time they began waiting. Bounded
/// by [`HELD_BACK_BYTES`]; never stored, and dropped with the session.
#[derive(Default)]
struct HeldBack {
    origins: HashMap<String, (Uncovered, Instant)>,
    bytes: usize,
}

impl HeldBack {
    /// Takes `origin`'s entries (none if it has none), with their time.
    fn take(&mut self, origin: &str) -> (Uncovered, Option<Instant>) {
        match self.origins.remove(origin) {
            Some((held, since)) => {
                self.bytes -= held.bytes();
                (held, Some(since))
            }
            None => (Uncovered::default(), None),
        }
    }

    /// Holds `entries` of `origin` (if any); `false`, holding none, if
    /// they do not fit.
    fn hold(&mut self, origin: &str, held: Uncovered, since: Instant) -> bool {
        if held.is_empty() {
            return true;
        }
        if self.bytes + held.bytes() > HELD_BACK_BYTES {
            return false;
        }
        self.bytes += held.bytes();
        self.origins.insert(origin.to_owned(), (held, since));
        true
    }

    /// When the entries waiting longest began to.
    fn oldest(&self) -> Option<Instant> {
        self.origins.values().map(|(_, since)| *since).min()
    }

    /// Takes the entries of every origin but `except` that has waited
    /// `wait` or longer.
    fn take_waiting(&mut self, wait: Duration, except: Option<&str>) -> Vec<(String, Uncovered)> {
        let now = Instant::now();
        let waited: Vec<String> = self
            .origins
            .iter()
            .filter(|(origin, _)| except != Some(origin.as_str()))
            .filter(|(_, (_, since))| now.saturating_duration_since(*since) >= wait)
            .map(|(origin, _)| origin.clone())
            .collect();
        waited
            .into_iter()
            .map(|origin| {
                let (held, _) = self.take(&origin);
                (origin, held)
            })
            .collect()
    }
}

/// Refuses the entries of `origin` held back until no signature could
/// cover them any more (the peer's backlog marker of the origin, the end
/// of its stream, or the wait), and sets the origin aside.
fn refuse_held(
    peer: &Peer,
    origin: String,
    held: &Uncovered,
    set_aside: &mut HashSet<String>,
    first_refusal: &mut Option<SessionError>,
) {
    let entries = held.entries();
    peer.update(|s| s.refused += entries.len() as u64);
    let fault = FeedError::BadSignature {
        origin: origin.clone(),
        seq: entries[0].body.seq,
    };
    set_aside_for_session(peer, origin, fault.into(), set_aside, first_refusal);
}

/// Sets `origin` aside for the rest of the session after `err` refused
/// its entries: the other origins go on, and the session ends with the
/// first refusal once every backlog has come.
fn set_aside_for_session(
    peer: &Peer,
    origin: String,
    err: SessionError,
    set_aside: &mut HashSet<String>,
    first_refusal: &mut Option<SessionError>,
) {
    tracing::warn!(peer = %peer.name, address = %peer.address, error = %err,
        "entries refused; the origin is set aside until the session is retried");
    peer.update(|s| s.last_error = err.to_string());
    set_aside.insert(origin);
    first_refusal.get_or_insert(err);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        core::feed::tests::{chain, chain_by, key},
        store::SledStore,
        writer::Prepared,
    };

    fn peer(name: &str) -> Peer {
        Peer {
            name: name.into(),
            address: "127.0.0.1:1".into(),
            origin: None,
            relay: true,
            state: Arc::default(),
        }
    }

    #[test]
    fn entries_held_back_are_bounded_for_the_whole_session() {
        // 3.6 MiB of entries no signature covers, as `authenticate` holds
        // them back.
        let wrong = key(9);
        let forged = chain_by(|_| &wrong, 60, 60 * 1024);
        let pk = key(1).verifying_key();
        let run = authenticate("city-a", &pk, &[], None, Uncovered::default(), forged).uncovered;
        assert_eq!(run.entries().len(), 60);
        let now = Instant::now();
        let mut held = HeldBack::default();
        // Four origins' worth fit in 16 MiB; a fifth does not, and is not
        // held at all.
        for origin in ["a", "b", "c", "d"] {
            assert!(held.hold(origin, run.clone(), now));
        }
        assert!(!held.hold("e", run.clone(), now));
        assert_eq!(held.bytes, 4 * run.bytes());
        // Taking one back makes room.
        let (back, since) = held.take("a");
        assert_eq!((back.bytes(), since), (run.bytes(), Some(now)));
        assert!(held.hold("e", run.clone(), now));
        // Those that have waited long enough are taken; the others stay.
        let (b, _) = held.take("b");
        let earlier = now.checked_sub(Duration::from_secs(120)).unwrap();
        assert!(held.hold("b", b, earlier));
        assert_eq!(held.oldest(), Some(earlier));
        assert!(held
            .take_waiting(Duration::from_secs(60), Some("b"))
            .is_empty());
        let waited = held.take_waiting(Duration::from_secs(60), None);
        let origins: Vec<&str> = waited.iter().map(|(o, _)| o.as_str()).collect();
        assert_eq!(origins, ["b"]);
        assert_eq!((held.oldest(), held.bytes), (Some(now), 3 * run.bytes()));
        assert!(held.take("b").0.is_empty());
    }

    /// A replicator of node city-n (feed key `key(9)`) over a fresh store
    /// in `dir`, pinning city-a's key (`key(1)`), its publish gate held by
    /// `gate_peers`; no peer is dialled.
    fn replicator(dir: &std::path::Path, gate_peers: &[&str]) -> Replicator {
        let store: SharedStore = Arc::new(SledStore::open(dir, 1 << 24).unwrap());
        let (writer, _thread) = Writer::start(store.clone()).unwrap();
        let pinned = BTreeMap::from([("city-a".to_owned(), key(1).verifying_key())]);
        let keys = Arc::new(KeyResolver::new("city-n", key(9).verifying_key(), pinned));
        let roster = Roster::new(None, keys.clone(), store.clone());
        Replicator {
            own_origin: "city-n".into(),
            keys,
            store,
            writer,
            timing: ReplicationConfig::default(),
            max_message_bytes: 4 << 20,
            gate: PublishGate::new(names(gate_peers), false),
            security: Security::Insecure,
            quarantined: Arc::default(),
            roster,
        }
    }

    #[test]
    fn roster_entries_end_the_replaced_feeds_of_members_not_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let store: SharedStore = Arc::new(SledStore::open(dir.path(), 1 << 24).unwrap());
        let pinned = BTreeMap::from([("city-p".to_owned(), key(1).verifying_key())]);
        let keys = Arc::new(KeyResolver::new("city-n", key(9).verifying_key(), pinned));
        let roster = Roster::new(Some("roster".into()), keys, store);
        let replaced = |member: &str| pb::RosterEntry {
            origin: member.into(),
            replacements: vec![pb::FeedReplacement {
                old_feed_id: vec![1; 16],
                last_seq: 3,
                last_hash: vec![2; 32],
                new_feed_id: vec![3; 16],
                new_feed_key: key(4).verifying_key().to_bytes().to_vec(),
            }],
            ..Default::default()
        };
        let mut entries = chain(&key(8), "roster", 3);
        for (entry, member) in entries.iter_mut().zip(["city-x", "city-p"]) {
            let mut body = entry.body.clone();
            body.payload = Some(pb::entry_body::Payload::Roster(replaced(member)));
            *entry = Entry::sign(&key(8), body).unwrap();
        }
        // The third entry is no roster entry; city-p is pinned here.
        assert_eq!(
            roster.ends_in(&entries),
            [FeedEnd {
                origin: "city-x".into(),
                feed_id: [1; 16],
                seq: 3,
                hash: [2; 32],
                abandoned: None,
                enforce: true,
            }]
        );
    }

    /// A validly signed genesis of another feed id is evidence that the
    /// origin started over, unless the roster replaced the origin's lost
    /// key: then only the lost key can have signed it.
    #[test]
    fn another_feeds_genesis_is_no_evidence_once_the_roster_replaced_the_key() {
        use crate::core::feed::ConflictKind;
        let dir = tempfile::tempdir().unwrap();
        let replicator = replicator(dir.path(), &[]);
        let held = chain(&key(2), "city-x", 1).remove(0);
        let mut body = held.body.clone();
        body.feed_id = vec![5; 16];
        let other = Entry::sign(&key(2), body).unwrap();
        let member = |replacements| {
            let member = Member {
                key: key(2).verifying_key(),
                replacements,
                removed: false,
            };
            replicator
                .keys
                .set_roster(BTreeMap::from([("city-x".to_owned(), member)]));
        };
        member(Vec::new());
        let judged = replicator.judge(&held, &other).unwrap();
        assert!(
            matches!(&judged, Judged::Conflict(c) if c.kind == ConflictKind::Recreated),
            "{judged:?}"
        );
        member(vec![Replacement {
            old_feed_id: held.feed_id(),
            last_seq: 1,
            last_hash: held.hash,
            new_feed_id: [3; 16],
            new_key: key(4).verifying_key(),
        }]);
        let judged = replicator.judge(&held, &other).unwrap();
        assert!(matches!(judged, Judged::Forged), "{judged:?}");
    }

    /// Once the roster ended a feed whose key was lost, and this node holds
    /// the last entry it kept, an entry the lost key signs at one of the
    /// seqs kept is refused, not evidence: a thief cannot stop the origin's
    /// replication by signing a fork of its past. Before this node holds
    /// that last entry, it cannot tell which one the roster kept.
    #[tokio::test]
    async fn another_feeds_genesis_is_judged_with_the_key_in_force_not_one_rotated_away() {
        use crate::core::feed::ConflictKind;
        use civex_proto::v1::{entry_body::Payload, KeyRotation};
        let dir = tempfile::tempdir().unwrap();
        let replicator = replicator(dir.path(), &[]);
        // city-a (first key 1) rotates to key 3 at seq 2.
        let first = chain(&key(1), "city-a", 1).remove(0);
        let mut body = first.body.clone();
        (body.seq, body.prev_hash) = (2, first.hash.to_vec());
        body.payload = Some(Payload::KeyRotation(KeyRotation {
            new_key: key(3).verifying_key().to_bytes().to_vec(),
        }));
        let rotation = Entry::sign(&key(1), body).unwrap();
        replicator
            .writer
            .write(job(&[first.clone(), rotation]))
            .await
            .unwrap();
        let genesis_by = |signer: u8| {
            let mut body = first.body.clone();
            body.feed_id = vec![5; 16];
            Entry::sign(&key(signer), body).unwrap()
        };
        let judged = replicator.judge(&first, &genesis_by(1)).unwrap();
        assert!(matches!(judged, Judged::Forged), "{judged:?}");
        let judged = replicator.judge(&first, &genesis_by(3)).unwrap();
        assert!(
            matches!(&judged, Judged::Conflict(c) if c.kind == ConflictKind::Recreated),
            "{judged:?}"
        );
    }

    #[tokio::test]
    async fn a_fork_of_the_history_the_roster_kept_is_refused_not_evidence() {
        use crate::core::feed::ConflictKind;
        let dir = tempfile::tempdir().unwrap();
        let replicator = replicator(dir.path(), &[]);
        let feed = chain(&key(2), "city-x", 3);
        let mut body = feed[1].body.clone();
        body.time_unix_micros += 1;
        let forged = Entry::sign(&key(2), body).unwrap();
        let member = |last: &Entry| Member {
            key: key(2).verifying_key(),
            replacements: vec![Replacement {
                old_feed_id: last.feed_id(),
                last_seq: last.body.seq,
                last_hash: last.hash,
                new_feed_id: [3; 16],
                new_key: key(4).verifying_key(),
            }],
            removed: false,
        };
        replicator
            .keys
            .set_roster(BTreeMap::from([("city-x".to_owned(), member(&feed[2]))]));
        replicator.writer.write(job(&feed[..2])).await.unwrap();
        let judged = replicator.judge(&feed[1], &forged).unwrap();
        assert!(
            matches!(&judged, Judged::Conflict(c) if c.kind == ConflictKind::Fork),
            "{judged:?}"
        );
        replicator.writer.write(job(&feed[2..])).await.unwrap();
        let judged = replicator.judge(&feed[1], &forged).unwrap();
        let Judged::Refused(fault) = judged else {
            panic!("a fork of the kept history was judged {judged:?}");
        };
        assert!(
            matches!(
                fault,
                FeedError::Replaced {
                    seq: 2,
                    last_seq: 3,
                    ..
                }
            ),
            "{fault}"
        );
    }

    /// A replacement amended (the new feed's key was lost before its first
    /// use) ends the feed it named before on a replica too: a job made
    /// before the roster was read again, still carrying the first
    /// replacement, is refused. (Found by review.)
    #[tokio::test]
    async fn an_amended_replacement_ends_the_feed_it_named_before() {
        let dir = tempfile::tempdir().unwrap();
        let replicator = replicator(dir.path(), &[]);
        let x = chain(&key(2), "city-x", 3);
        replicator.writer.write(job(&x)).await.unwrap();
        let replacement = |feed: u8, new_key: u8| Replacement {
            old_feed_id: x[0].feed_id(),
            last_seq: 3,
            last_hash: x[2].hash,
            new_feed_id: [feed; 16],
            new_key: key(new_key).verifying_key(),
        };
        // The roster named feed [1; 16] first, then amended it to [2; 16].
        let member = Member {
            key: key(2).verifying_key(),
            replacements: vec![replacement(1, 4)],
            removed: false,
        };
        replicator
            .keys
            .set_roster(BTreeMap::from([("city-x".to_owned(), member)]));
        let amended = replacement(2, 5);
        let mut roster_entry = chain(&key(8), "roster", 1).remove(0);
        let mut body = roster_entry.body.clone();
        body.payload = Some(pb::entry_body::Payload::Roster(pb::RosterEntry {
            origin: "city-x".into(),
            feed_key: key(2).verifying_key().to_bytes().to_vec(),
            replacements: vec![pb::FeedReplacement {
                old_feed_id: amended.old_feed_id.to_vec(),
                last_seq: amended.last_seq,
                last_hash: amended.last_hash.to_vec(),
                new_feed_id: amended.new_feed_id.to_vec(),
                new_feed_key: amended.new_key.to_bytes().to_vec(),
            }],
            ..Default::default()
        }));
        roster_entry = Entry::sign(&key(8), body).unwrap();
        let ends = replicator
            .roster
            .ends_in(std::slice::from_ref(&roster_entry));
        assert_eq!(ends.len(), 1, "{ends:?}");
        assert_eq!(ends[0].abandoned, Some([1; 16]));
        let mut roster_job = job(&[roster_entry]);
        roster_job.roster_ends = ends;
        replicator.writer.write(roster_job).await.unwrap();
        // Feed [1; 16]'s first entry, signed with its lost key, in a job
        // made before the amendment was read.
        let mut body = x[2].body.clone();
        body.seq = 4;
        body.feed_id = vec![1; 16];
        body.prev_hash = x[2].hash.to_vec();
        let mut stale = job(&[Entry::sign(&key(4), body).unwrap()]);
        stale.replacements = vec![replacement(1, 4)];
        let stored = replicator.writer.write(stale).await;
        assert!(
            matches!(
                stored,
                Err(WriteError::Chain(FeedError::Replaced { seq: 4, .. }))
            ),
            "the abandoned feed's entry: {stored:?}"
        );
    }

    fn names(names: &[&str]) -> Vec<String> {
        names.iter().map(|&name| name.to_owned()).collect()
    }

    fn job(entries: &[Entry]) -> Job {
        Job::entries(entries.iter().cloned().map(Prepared::new).collect())
    }

    /// A commit the store refuses (here: it holds another entry at a seq,
    /// stored from another peer since this peer's session began) takes the
    /// peer's entries back: the peer shows no head beyond what this node
    /// holds, so it does not hold a key replacement back with entries
    /// never stored.
    #[tokio::test]
    async fn a_refused_commit_leaves_no_head_above_what_is_held() {
        let dir = tempfile::tempdir().unwrap();
        let replicator = replicator(dir.path(), &[]);
        let held = chain(&key(1), "city-a", 4);
        replicator.writer.write(job(&held)).await.unwrap();
        // The peer's seqs 4 to 6, linked to seq 3 and validly signed by
        // city-a's key: another history from seq 4 on (a fork).
        let later = chain(&key(1), "city-a", 6);
        let mut forked = held[..3].to_vec();
        for seq in 4..=6 {
            let mut body = later[seq - 1].body.clone();
            body.prev_hash = forked[seq - 2].hash.to_vec();
            body.time_unix_micros += 1;
            forked.push(Entry::sign(&key(1), body).unwrap());
        }
        let sender = peer("city-m");
        let peers = [sender.clone()];
        let commit = replicator
            .hand_over(&sender, "city-a", 3, job(&forked[3..]))
            .await
            .unwrap();
        // Entries this node may still be storing count.
        assert_eq!(
            holding_more(&peers, "city-a", 4),
            Some(("city-m".into(), 6))
        );
        let settled = replicator.settle(&sender, None, Some(commit)).await;
        assert!(
            matches!(settled, Err(SessionError::Conflict(_))),
            "{settled:?}"
        );
        assert_eq!(replicator.store.head("city-a").unwrap().unwrap().tip.seq, 4);
        assert_eq!(
            holding_more(&peers, "city-a", 4),
            None,
            "a refused commit left the peer's head above what this node holds"
        );
        assert_eq!(
            sender.state.lock().unwrap().peer_heads.get("city-a"),
            Some(&3)
        );
    }

    #[test]
    fn a_head_a_peer_only_claims_counts_for_nothing_until_it_delivers() {
        let boaster = peer("city-x");
        let peers = [boaster.clone()];
        // Its backlog marker names city-a up to seq 9; this node holds it
        // up to seq 3, and the peer sent nothing more before the marker.
        assert!(!boaster.state.lock().unwrap().drained("city-a", 9, 3));
        assert_eq!(
            holding_more(&peers, "city-a", 3),
            None,
            "an unverified claim holds a key replacement back"
        );
        assert!(!boaster
            .state
            .lock()
            .unwrap()
            .peer_heads
            .contains_key("city-a"));
        assert_eq!(claims_past(&peers, "city-a", 3), [("city-x".into(), 9)]);
        // Entries it delivers that verify count, before this node has
        // stored them; the claim they reach is no longer one once stored.
        boaster.update(|s| s.delivered("city-a", 9));
        assert_eq!(
            holding_more(&peers, "city-a", 3),
            Some(("city-x".into(), 9))
        );
        assert!(!boaster.state.lock().unwrap().stored("city-a", 8));
        assert!(boaster.state.lock().unwrap().stored("city-a", 9));
        assert!(claims_past(&peers, "city-a", 3).is_empty());
        // A marker naming no more than this node holds is the peer's head
        // (one behind blocks nothing).
        let behind = peer("city-y");
        assert!(behind.state.lock().unwrap().drained("city-a", 2, 3));
        assert_eq!(
            behind.state.lock().unwrap().peer_heads.get("city-a"),
            Some(&2)
        );
        assert_eq!(holding_more(&[behind], "city-a", 3), None);
    }

    /// A peer whose backlog marker claimed more of a feed than this node
    /// held, and which then delivers those entries: once they are stored
    /// the claim is resolved, its text leaves the peer's last error (an
    /// error shown since stays), and for this node's own feed the peer
    /// counts as having served it, without waiting for another marker.
    #[tokio::test]
    async fn a_claim_delivered_and_stored_counts_as_served_and_leaves_last_error() {
        let dir = tempfile::tempdir().unwrap();
        let replicator = replicator(dir.path(), &["city-m"]);
        let own = chain(&key(9), "city-n", 2);
        let m = peer("city-m");
        replicator.marker(&m, Some(0), "city-n", 2, true);
        let claim = m.state.lock().unwrap().last_error.clone();
        assert!(claim.contains("claims this node's own feed"), "{claim}");
        assert!(!replicator.gate.is_open());
        let commit = replicator
            .hand_over(&m, "city-n", 0, job(&own[..1]))
            .await
            .unwrap();
        replicator.settle(&m, Some(0), Some(commit)).await.unwrap();
        assert!(!replicator.gate.is_open(), "opened short of the claim");
        assert_eq!(m.state.lock().unwrap().last_error, claim);
        let commit = replicator
            .hand_over(&m, "city-n", 1, job(&own[1..]))
            .await
            .unwrap();
        replicator.settle(&m, Some(0), Some(commit)).await.unwrap();
        assert!(
            replicator.gate.is_open(),
            "the peer delivered the own feed it claimed, and publishing stayed closed"
        );
        assert_eq!(m.state.lock().unwrap().last_error, "");
        assert!(claims_past(std::slice::from_ref(&m), "city-n", 0).is_empty());

        // Another origin's claim, and then another error: that error stays.
        let x = peer("city-x");
        replicator.marker(&x, None, "city-a", 1, true);
        assert!(x.state.lock().unwrap().last_error.contains("not counted"));
        x.update(|s| s.last_error = "stream failed: reset".into());
        let commit = replicator
            .hand_over(&x, "city-a", 0, job(&chain(&key(1), "city-a", 1)))
            .await
            .unwrap();
        replicator.settle(&x, None, Some(commit)).await.unwrap();
        let state = x.state.lock().unwrap().clone();
        assert!(state.claimed_heads.is_empty(), "{state:?}");
        assert_eq!(state.last_error, "stream failed: reset");
    }
}
