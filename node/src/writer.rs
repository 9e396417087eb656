//! The single writer: one thread owns every write to the store.
//!
//! Publishers and replication tasks send jobs (consecutive entries of one
//! origin, with their index records); the thread drains whatever is queued,
//! checks each job against the committed heads (seq continuity, hash links,
//! duplicates, forks, the feeds a roster replacement ended: [`FeedEnd`]),
//! writes the accepted ones in one atomic batch, makes
//! it durable with one sync (group commit), and only then replies. Under
//! load a small group waits 200 µs for more first. After a
//! storage error writes stop until restart; reads keep serving.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
};

use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    core::{
        feed::{check_link, Entry, FeedError, FeedId, Hash, Replacement, Tip},
        index::IndexRecord,
    },
    store::{CommitBatch, ConflictRecord, Head, IdempotencyRecord, SharedStore, StoreError},
};

/// Most entries merged into one commit.
const MAX_GROUP_ENTRIES: usize = 16 * 1024;
/// Jobs queued before senders wait.
const QUEUE_JOBS: usize = 1024;
/// Under load (the previous commit took at least `LINGER_AFTER` entries), a
/// commit of fewer than `LINGER_BELOW` entries first waits `LINGER` for the
/// entries already on their way, so more publishes share one sync (each
/// sync costs about a millisecond of sled flush and `fdatasync`). A lone
/// publish at low load never waits.
const LINGER_AFTER: usize = 8;
const LINGER_BELOW: usize = 64;
const LINGER: std::time::Duration = std::time::Duration::from_micros(200);

/// One entry to store, with its index records.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The verified entry, without its decoded payload: the writer stores
    /// the signed bytes and reads only the body's other fields.
    pub entry: Entry,
    /// Its index records.
    pub index: Vec<IndexRecord>,
}

impl Prepared {
    /// Derives the index records of a verified entry, then drops its
    /// decoded payload here, on the thread that decoded it: freed on the
    /// writer thread, its many small allocations took a third of the
    /// writer's time in a catch-up.
    pub fn new(mut entry: Entry) -> Self {
        let index = crate::core::index::records_of(&entry);
        entry.body.payload = None;
        Self { entry, index }
    }
}

/// A write request.
#[derive(Debug)]
pub struct Job {
    /// Consecutive entries of one origin, verified.
    pub entries: Vec<Prepared>,
    /// Idempotency records of own-feed entries in this job; each is kept
    /// only if its entry is newly stored.
    pub idempotency: Vec<([u8; 16], IdempotencyRecord)>,
    /// Conflict evidence to keep (with no entries: the job only records it).
    pub conflict: Option<ConflictRecord>,
    /// The origin's lost-key replacements, where its feed id may change.
    pub replacements: Vec<Replacement>,
    /// Where the roster entry this job stores ends another origin's feed
    /// (a lost key's replacement): checked and applied atomically with the
    /// commit.
    pub feed_end: Option<FeedEnd>,
    /// Feeds that the roster entries in this job end, as a replica learns
    /// them from the roster origin (with [`FeedEnd::enforce`]): once the
    /// job is committed, later entries of them are refused as after a
    /// committed `feed_end`, also those of jobs made before the roster was
    /// read again. No head is checked: a replica holds what it holds.
    pub roster_ends: Vec<FeedEnd>,
}

impl Job {
    /// A job storing `entries` with no idempotency records or evidence.
    pub fn entries(entries: Vec<Prepared>) -> Self {
        Self {
            entries,
            idempotency: Vec::new(),
            conflict: None,
            replacements: Vec::new(),
            feed_end: None,
            roster_ends: Vec::new(),
        }
    }
}

/// The end of a member's feed that a roster entry names (the replacement
/// of a lost key keeps every entry this node holds): the job storing that
/// entry is refused unless `origin`'s stored head is still (`seq`, `hash`),
/// checked by the writer thread, which serialises every commit
/// (replication's too), with nothing stored in between. Once the job is
/// committed, with `enforce`, every later entry of feed `feed_id` after
/// `seq` is refused, whatever replacements the job bringing it carries (a
/// replication job made before the roster was re-read carries the old
/// ones), until the node restarts and reads the roster from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedEnd {
    /// The member whose feed ends.
    pub origin: String,
    /// The feed that ends.
    pub feed_id: FeedId,
    /// Its last entry kept: the member's head when the entry was made.
    pub seq: u64,
    /// That entry's hash.
    pub hash: Hash,
    /// The new feed of a replacement this one amends (it ended the feed at
    /// the same entry, and nothing was signed under it yet): its entries
    /// are refused too.
    pub abandoned: Option<FeedId>,
    /// Whether the roster's replacements apply to the member on this node
    /// (it is not pinned in `trusted_origins`), so later entries of the
    /// ended feed are refused here.
    pub enforce: bool,
}

/// What a job came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// Entries newly stored.
    pub new: usize,
    /// Entries already held (same hash), skipped.
    pub duplicates: usize,
}

/// Why a job was not stored.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// Storage failed: this job and later writes fail until restart.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// Writes are stopped after an earlier storage failure.
    #[error("writes are stopped after a storage failure; reads still work; fix the disk and restart the node")]
    Stopped,
    /// The entries do not continue the feed held.
    #[error("{0}")]
    Chain(#[from] FeedError),
    /// The member's head moved past the entry a roster entry ends its feed
    /// at ([`FeedEnd`]): this node stored more of that feed meanwhile.
    #[error(
        "this node received more of {origin}'s feed (up to seq {held}) while the request was \
         checked against its head at seq {expected}; nothing was published: retry, and the \
         replacement keeps every entry held"
    )]
    HeadMoved {
        /// The member.
        origin: String,
        /// The head the job expected.
        expected: u64,
        /// The head held.
        held: u64,
    },
    /// A validly linked entry differs from the one held at its seq.
    #[error("fork: origin {origin} seq {seq} differs from the entry held")]
    Fork {
        /// Origin.
        origin: String,
        /// Seq.
        seq: u64,
        /// The entry received at that seq (its signature not yet judged).
        received: Box<Entry>,
    },
}

type Reply = oneshot::Sender<Result<Stored, WriteError>>;

/// Heads of every origin whose entries are durable, by origin.
pub type DurableHeads = Arc<std::collections::BTreeMap<String, Head>>;

/// Handle to the writer thread. Cloneable; the thread ends when every
/// handle is dropped, after finishing what was queued.
#[derive(Clone)]
pub struct Writer {
    /// Jobs; `None` asks the thread to finish what is queued and end.
    jobs: mpsc::Sender<Option<(Job, Reply)>>,
    committed: watch::Receiver<DurableHeads>,
    stopped: Arc<AtomicBool>,
}

impl Writer {
    /// Starts the writer thread over `store`.
    pub fn start(store: SharedStore) -> Result<(Self, JoinHandle<()>), StoreError> {
        let heads: HashMap<String, Head> = store.heads()?.into_iter().collect();
        let (jobs, receiver) = mpsc::channel(QUEUE_JOBS);
        let (notify, committed) = watch::channel(Arc::new(
            heads.iter().map(|(o, h)| (o.clone(), *h)).collect(),
        ));
        let stopped = Arc::new(AtomicBool::new(false));
        let thread_stopped = stopped.clone();
        let handle = std::thread::Builder::new()
            .name("civex-writer".into())
            .spawn(move || {
                WriterThread {
                    store,
                    heads,
                    ended: HashMap::new(),
                    notify,
                    stopped: thread_stopped,
                }
                .run(receiver)
            })
            .map_err(|err| StoreError::Io {
                path: String::new(),
                message: format!("cannot start the writer thread: {err}"),
            })?;
        Ok((
            Self {
                jobs,
                committed,
                stopped,
            },
            handle,
        ))
    }

    /// Queues a job; the receiver answers once it is durable or refused.
    pub async fn send(
        &self,
        job: Job,
    ) -> Result<oneshot::Receiver<Result<Stored, WriteError>>, WriteError> {
        if self.stopped.load(Ordering::Acquire) {
            return Err(WriteError::Stopped);
        }
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Some((job, reply)))
            .await
            .map_err(|_| WriteError::Stopped)?;
        Ok(answer)
    }

    /// Asks the writer thread to finish every job queued before this call
    /// and end, even while other handles remain (a connection that is still
    /// closing may hold one). Later sends fail with [`WriteError::Stopped`].
    pub async fn close(&self) {
        let _ = self.jobs.send(None).await;
    }

    /// Queues a job and waits until it is durable or refused.
    pub async fn write(&self, job: Job) -> Result<Stored, WriteError> {
        self.send(job)
            .await?
            .await
            .unwrap_or(Err(WriteError::Stopped))
    }

    /// The durable heads, changing after every durable commit ("head
    /// advanced"). Readers serve entries only up to these heads: sled makes
    /// a batch visible before it is synced.
    pub fn committed(&self) -> watch::Receiver<DurableHeads> {
        self.committed.clone()
    }

    /// The durable heads now.
    pub fn heads(&self) -> DurableHeads {
        self.committed.borrow().clone()
    }

    /// Whether writes stopped after a storage failure.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }
}

struct WriterThread {
    store: SharedStore,
    heads: HashMap<String, Head>,
    /// Feeds that committed roster entries ended ([`FeedEnd::enforce`]),
    /// by origin.
    ended: HashMap<String, Vec<FeedEnd>>,
    notify: watch::Sender<DurableHeads>,
    stopped: Arc<AtomicBool>,
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

impl WriterThread {
    fn run(mut self, mut receiver: mpsc::Receiver<Option<(Job, Reply)>>) {
        let mut closing = false;
        let mut last_count = 0;
        while let Some(Some(first)) = receiver.blocking_recv() {
            let mut group = vec![first];
            let mut count = group[0].0.entries.len();
            let mut lingered = false;
            loop {
                while count < MAX_GROUP_ENTRIES {
                    match receiver.try_recv() {
                        Ok(Some(job)) => {
                            count += job.0.entries.len();
                            group.push(job);
                        }
                        Ok(None) => {
                            closing = true;
                            break;
                        }
                        Err(_) => break,
                    }
                }
                // Under load, wait a moment for more (see `LINGER_AFTER`).
                if closing || lingered || last_count < LINGER_AFTER || count >= LINGER_BELOW {
                    break;
                }
                lingered = true;
                std::thread::sleep(LINGER);
            }
            last_count = count;
            self.commit_group(group);
            if closing {
                break;
            }
        }
    }

    fn commit_group(&mut self, group: Vec<(Job, Reply)>) {
        if self.stopped.load(Ordering::Acquire) {
            for (_, reply) in group {
                let _ = reply.send(Err(WriteError::Stopped));
            }
            return;
        }
        let mut batch = CommitBatch::default();
        let mut changed: HashMap<String, Tip> = HashMap::new();
        // Feeds ended by jobs of this group: later jobs in it see them.
        let mut ends: Vec<FeedEnd> = Vec::new();
        let mut replies = Vec::with_capacity(group.len());
        for (job, reply) in group {
            let outcome = self.accept(job, &mut batch, &mut changed, &mut ends);
            replies.push((reply, outcome));
        }
        if !changed.is_empty() || !batch.conflicts.is_empty() {
            let received = now_micros();
            batch.heads = changed
                .iter()
                .map(|(origin, tip)| {
                    let head = Head {
                        tip: *tip,
                        received_unix_micros: received,
                    };
                    (origin.clone(), head)
                })
                .collect();
            if let Err(err) = self.store.commit(&batch) {
                self.stopped.store(true, Ordering::Release);
                tracing::error!(error = %err, "store write failed; writes are stopped, reads go on");
                for (reply, _) in replies {
                    let _ = reply.send(Err(WriteError::Store(err.clone())));
                }
                return;
            }
            for (origin, head) in batch.heads {
                self.heads.insert(origin, head);
            }
            for end in ends {
                // Every peer brings the roster's entries again.
                let ended = self.ended.entry(end.origin.clone()).or_default();
                if !ended.contains(&end) {
                    ended.push(end);
                }
            }
            let durable = self.heads.iter().map(|(o, h)| (o.clone(), *h)).collect();
            self.notify.send_replace(Arc::new(durable));
        }
        for (reply, outcome) in replies {
            let _ = reply.send(outcome);
        }
    }

    /// Checks a job against the heads (committed, then this group's) and
    /// adds what is new to the batch. A job is taken whole or not at all.
    /// `ends` holds the feeds this group's earlier jobs ended.
    fn accept(
        &self,
        job: Job,
        batch: &mut CommitBatch,
        changed: &mut HashMap<String, Tip>,
        ends: &mut Vec<FeedEnd>,
    ) -> Result<Stored, WriteError> {
        batch.conflicts.extend(job.conflict);
        let head_of = |origin: &str| {
            changed
                .get(origin)
                .copied()
                .or_else(|| self.heads.get(origin).map(|h| h.tip))
        };
        if let Some(end) = &job.feed_end {
            let head = head_of(&end.origin);
            if head.map(|t| (t.seq, t.hash)) != Some((end.seq, end.hash)) {
                return Err(WriteError::HeadMoved {
                    origin: end.origin.clone(),
                    expected: end.seq,
                    held: head.map_or(0, |t| t.seq),
                });
            }
        }
        let feed_end: Vec<FeedEnd> = job
            .feed_end
            .filter(|end| end.enforce)
            .into_iter()
            .chain(job.roster_ends.into_iter().filter(|end| end.enforce))
            .collect();
        let Some(first) = job.entries.first() else {
            ends.extend(feed_end);
            return Ok(Stored {
                new: 0,
                duplicates: 0,
            });
        };
        let origin = first.entry.body.origin.clone();
        let start_tip = head_of(&origin);
        let mut tip = start_tip;
        // Entries already held come first (a job is consecutive entries).
        let held_seq = start_tip.map_or(0, |t| t.seq);
        let duplicates = job
            .entries
            .iter()
            .take_while(|p| p.entry.body.seq <= held_seq)
            .count();
        self.check_held(&origin, &job.entries[..duplicates], batch)?;
        let mut new = Vec::with_capacity(job.entries.len() - duplicates);
        let ended: Vec<&FeedEnd> = self
            .ended
            .get(&origin)
            .into_iter()
            .flatten()
            .chain(ends.iter().filter(|end| end.origin == origin))
            .collect();
        for prepared in job.entries.into_iter().skip(duplicates) {
            check_link(&origin, &job.replacements, tip.as_ref(), &prepared.entry)?;
            let at = prepared.entry.tip();
            if let Some(end) = ended.iter().find(|end| {
                (at.feed_id == end.feed_id && at.seq > end.seq) || end.abandoned == Some(at.feed_id)
            }) {
                return Err(WriteError::Chain(FeedError::Replaced {
                    origin: origin.clone(),
                    seq: at.seq,
                    feed_id: crate::core::ids::hex(&end.feed_id),
                    last_seq: end.seq,
                }));
            }
            tip = Some(at);
            new.push(prepared);
        }
        let count = new.len();
        if count == 0 {
            ends.extend(feed_end);
            return Ok(Stored { new: 0, duplicates });
        }
        // Extend the batch's last run when it ends right before this job.
        let extends_last_run = changed.contains_key(&origin)
            && batch
                .runs
                .last()
                .and_then(|run| run.last())
                .is_some_and(|last| last.body.origin == origin && Some(last.tip()) == start_tip);
        let mut entries: Vec<Entry> = Vec::with_capacity(count);
        // Kept apart until the whole job is accepted: a store read below may
        // fail midway, and records already in `batch.index` would be
        // committed with the group's other jobs, naming entries not stored.
        let mut index: Vec<IndexRecord> = Vec::new();
        for prepared in new {
            for record in prepared.index {
                if let IndexRecord::Retraction {
                    origin,
                    retracted_seq,
                    entry_hash,
                    by_seq,
                } = &record
                {
                    let in_job = entries
                        .iter()
                        .find(|e| e.body.seq == *retracted_seq)
                        .map(|e| e.hash);
                    let held = match in_job {
                        Some(hash) => Some(hash),
                        None => self.held_hash(origin, *retracted_seq, batch)?,
                    };
                    if held.map(|h| h.to_vec()).as_ref() != Some(entry_hash) {
                        tracing::warn!(%origin, seq = by_seq, retracted = retracted_seq,
                            "retraction names a hash that is not the entry held; it has no effect");
                        continue;
                    }
                }
                index.push(record);
            }
            entries.push(prepared.entry);
        }
        batch.index.extend(index);
        match (extends_last_run, batch.runs.last_mut()) {
            (true, Some(run)) => run.extend(entries),
            _ => batch.runs.push(entries),
        }
        let start_seq = start_tip.map_or(0, |t| t.seq);
        batch.idempotency.extend(
            job.idempotency
                .into_iter()
                .filter(|(_, r)| r.seq > start_seq),
        );
        if let Some(tip) = tip {
            changed.insert(origin, tip);
        }
        ends.extend(feed_end);
        Ok(Stored {
            new: count,
            duplicates,
        })
    }

    /// Hash of the entry held at (origin, seq), in this batch or the store.
    /// Checks that `received`, entries of `origin` at seqs already held,
    /// are the ones held; a different one is a fork, named at its seq.
    /// When they link one to the next, each hash commits to all before it,
    /// so the last one alone is looked up (one store read, not one per
    /// entry, for the duplicates that every second path of a federation
    /// brings); only a mismatch is searched entry by entry.
    fn check_held(
        &self,
        origin: &str,
        received: &[Prepared],
        batch: &CommitBatch,
    ) -> Result<(), WriteError> {
        let linked = received
            .windows(2)
            .all(|w| w[1].entry.body.prev_hash == w[0].entry.hash);
        if let (true, Some(last)) = (linked, received.last()) {
            if self.held_hash(origin, last.entry.body.seq, batch)? == Some(last.entry.hash) {
                return Ok(());
            }
        }
        for prepared in received {
            let entry = &prepared.entry;
            if self.held_hash(origin, entry.body.seq, batch)? != Some(entry.hash) {
                return Err(WriteError::Fork {
                    origin: origin.to_owned(),
                    seq: entry.body.seq,
                    received: Box::new(entry.clone()),
                });
            }
        }
        Ok(())
    }

    fn held_hash(
        &self,
        origin: &str,
        seq: u64,
        batch: &CommitBatch,
    ) -> Result<Option<Hash>, WriteError> {
        for run in batch.runs.iter().rev() {
            if let Some(entry) = run
                .iter()
                .find(|e| e.body.origin == origin && e.body.seq == seq)
            {
                return Ok(Some(entry.hash));
            }
        }
        let held = self.store.entries(origin, seq, 1, usize::MAX)?;
        Ok(held
            .into_iter()
            .next()
            .map(|signed| crate::core::feed::entry_hash(&signed.body, &signed.signature)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        core::feed::tests::{chain, key},
        store::{SledStore, Store, SyncHook},
    };
    use std::sync::{atomic::AtomicUsize, Mutex};

    fn job(entries: &[Entry]) -> Job {
        Job::entries(entries.iter().cloned().map(Prepared::new).collect())
    }

    fn open(dir: &std::path::Path, hook: Option<SyncHook>) -> SharedStore {
        Arc::new(SledStore::open_with_sync(dir, 1 << 24, hook).unwrap())
    }

    #[tokio::test]
    async fn duplicates_are_skipped_gaps_and_forks_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), None);
        let (writer, _thread) = Writer::start(store.clone()).unwrap();
        let entries = chain(&key(1), "city-a", 10);
        assert_eq!(writer.write(job(&entries[..5])).await.unwrap().new, 5);
        let overlap = writer.write(job(&entries[3..8])).await.unwrap();
        assert_eq!((overlap.new, overlap.duplicates), (3, 2));
        assert!(matches!(
            writer.write(job(&entries[9..])).await,
            Err(WriteError::Chain(FeedError::SeqGap { .. }))
        ));
        let other = chain(&key(2), "city-a", 3);
        assert!(matches!(
            writer.write(job(&other)).await,
            Err(WriteError::Fork { seq: 1, .. })
        ));
        assert_eq!(store.head("city-a").unwrap().unwrap().tip.seq, 8);
    }

    #[tokio::test]
    async fn a_fork_among_held_entries_is_named_at_its_first_seq() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), None);
        let (writer, _thread) = Writer::start(store.clone()).unwrap();
        let held = chain(&key(1), "city-a", 10);
        writer.write(job(&held)).await.unwrap();
        // The same key signed other entries from seq 5 on, linked to 4.
        let mut forked = held[..4].to_vec();
        for seq in 5..=7 {
            let mut body = held[seq - 1].body.clone();
            body.prev_hash = forked[seq - 2].hash.to_vec();
            body.time_unix_micros += 1;
            forked.push(Entry::sign(&key(1), body).unwrap());
        }
        assert!(matches!(
            writer.write(job(&forked)).await,
            Err(WriteError::Fork { seq: 5, .. })
        ));
        // Held entries sent again are duplicates, whatever their number.
        let again = writer.write(job(&held[2..])).await.unwrap();
        assert_eq!((again.new, again.duplicates), (0, 8));
        assert_eq!(store.head("city-a").unwrap().unwrap().tip.seq, 10);
    }

    // The std mutex is held across awaits on purpose: it blocks the writer
    // thread inside its sync while this task checks that no ack arrived.
    #[allow(clippy::await_holding_lock)]
    #[tokio::test]
    async fn acks_wait_for_the_sync_and_concurrent_jobs_share_it() {
        let dir = tempfile::tempdir().unwrap();
        let syncs = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Mutex::new(()));
        let hook: SyncHook = {
            let (syncs, gate) = (syncs.clone(), gate.clone());
            Box::new(move || {
                syncs.fetch_add(1, Ordering::SeqCst);
                let _held = gate.lock().unwrap();
                Ok(())
            })
        };
        let store = open(dir.path(), Some(hook));
        let after_open = syncs.load(Ordering::SeqCst);
        let (writer, _thread) = Writer::start(store.clone()).unwrap();
        let origins: Vec<Vec<Entry>> = (0..20u8)
            .map(|i| chain(&key(i + 1), &format!("city-{i}"), 1))
            .collect();
        let closed = gate.lock().unwrap();
        let mut answers = Vec::new();
        for entries in &origins {
            answers.push(writer.send(job(entries)).await.unwrap());
        }
        // Once the writer is blocked inside the sync, no ack may have arrived.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while syncs.load(Ordering::SeqCst) == after_open {
            assert!(
                std::time::Instant::now() < deadline,
                "the writer never synced"
            );
            tokio::task::yield_now().await;
        }
        for answer in &mut answers {
            assert!(answer.try_recv().is_err(), "acked before the sync finished");
        }
        // Nor are the heads durable yet, though sled already shows those
        // of the commit inside the sync.
        assert!(!store.heads().unwrap().is_empty());
        assert!(
            writer.heads().is_empty(),
            "a head was named durable before its sync"
        );
        drop(closed);
        for answer in answers {
            assert_eq!(answer.await.unwrap().unwrap().new, 1);
        }
        assert_eq!(writer.heads().len(), 20, "acked heads are not durable");
        let syncs = syncs.load(Ordering::SeqCst) - after_open;
        assert!(
            syncs < 20,
            "20 concurrent jobs took {syncs} syncs: no group commit"
        );
    }

    #[tokio::test]
    async fn a_storage_error_stops_writes_and_keeps_reads() {
        let dir = tempfile::tempdir().unwrap();
        let fail = Arc::new(AtomicBool::new(false));
        let hook: SyncHook = {
            let fail = fail.clone();
            Box::new(move || {
                if fail.load(Ordering::SeqCst) {
                    Err(std::io::Error::other("no space left on device"))
                } else {
                    Ok(())
                }
            })
        };
        let store = open(dir.path(), Some(hook));
        let (writer, _thread) = Writer::start(store.clone()).unwrap();
        let entries = chain(&key(1), "city-a", 3);
        writer.write(job(&entries[..1])).await.unwrap();
        fail.store(true, Ordering::SeqCst);
        let err = writer.write(job(&entries[1..2])).await.unwrap_err();
        assert!(err.to_string().contains("no space left"), "{err}");
        fail.store(false, Ordering::SeqCst);
        assert!(matches!(
            writer.write(job(&entries[1..2])).await,
            Err(WriteError::Stopped)
        ));
        assert!(writer.is_stopped());
        assert!(!store
            .entries("city-a", 1, 10, usize::MAX)
            .unwrap()
            .is_empty());
    }

    /// A store whose entry reads fail once `fail` is set; everything else
    /// goes to the sled store inside.
    struct FailingReads {
        inner: SledStore,
        fail: AtomicBool,
    }

    impl Store for FailingReads {
        fn head(&self, origin: &str) -> Result<Option<Head>, StoreError> {
            self.inner.head(origin)
        }
        fn heads(&self) -> Result<Vec<(String, Head)>, StoreError> {
            self.inner.heads()
        }
        fn entries(
            &self,
            origin: &str,
            from_seq: u64,
            max_entries: usize,
            max_bytes: usize,
        ) -> Result<Vec<civex_proto::v1::SignedEntry>, StoreError> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(StoreError::Io {
                    path: "test".into(),
                    message: format!("read of origin {origin} seq {from_seq} failed"),
                });
            }
            self.inner.entries(origin, from_seq, max_entries, max_bytes)
        }
        fn commit(&self, batch: &CommitBatch) -> Result<(), StoreError> {
            self.inner.commit(batch)
        }
        fn idempotency(&self, key: &[u8; 16]) -> Result<Option<IdempotencyRecord>, StoreError> {
            self.inner.idempotency(key)
        }
        fn observation_rows<'a>(
            &'a self,
            origin: Option<&str>,
            after: Option<&crate::core::index::ObservationKey>,
        ) -> Box<dyn Iterator<Item = Result<crate::store::ObservationRow, StoreError>> + 'a>
        {
            self.inner.observation_rows(origin, after)
        }
        fn privacy_spent(
            &self,
            origin: &str,
            indicator: &str,
            edition: &str,
            period: &str,
        ) -> Result<(u64, u64), StoreError> {
            self.inner.privacy_spent(origin, indicator, edition, period)
        }
        fn retracted_by(&self, origin: &str, seq: u64) -> Result<Option<u64>, StoreError> {
            self.inner.retracted_by(origin, seq)
        }
        fn broken_parts(
            &self,
            origin: &str,
            group_end: u64,
        ) -> Result<Vec<(u64, u64)>, StoreError> {
            self.inner.broken_parts(origin, group_end)
        }
        fn merge_index_pieces(&self, limit: usize) -> Result<usize, StoreError> {
            self.inner.merge_index_pieces(limit)
        }
        fn index_pieces_pending(&self) -> Result<u64, StoreError> {
            self.inner.index_pieces_pending()
        }
        fn offer_versions<'a>(
            &'a self,
            after: Option<(&str, &str)>,
        ) -> Box<dyn Iterator<Item = Result<crate::store::OfferRow, StoreError>> + 'a> {
            self.inner.offer_versions(after)
        }
        fn offer_versions_of(
            &self,
            origin: &str,
            offer_id: &str,
        ) -> Result<Vec<crate::store::OfferRow>, StoreError> {
            self.inner.offer_versions_of(origin, offer_id)
        }
        fn withdrawal(&self, origin: &str, offer_id: &str) -> Result<Option<u64>, StoreError> {
            self.inner.withdrawal(origin, offer_id)
        }
        fn responses<'a>(
            &'a self,
            offer_origin: &str,
            offer_id: &str,
        ) -> Box<dyn Iterator<Item = Result<crate::store::ResponseRow, StoreError>> + 'a> {
            self.inner.responses(offer_origin, offer_id)
        }
        fn conflicts(&self) -> Result<Vec<ConflictRecord>, StoreError> {
            self.inner.conflicts()
        }
        fn rotations(&self, origin: &str) -> Result<Vec<(u64, [u8; 32])>, StoreError> {
            self.inner.rotations(origin)
        }
        fn roster(&self, origin: &str) -> Result<Vec<civex_proto::v1::RosterEntry>, StoreError> {
            self.inner.roster(origin)
        }
    }

    /// Commits `jobs` as one group on `thread`; their outcomes.
    fn commit(thread: &mut WriterThread, jobs: Vec<Job>) -> Vec<Result<Stored, WriteError>> {
        let mut answers = Vec::new();
        let group = jobs
            .into_iter()
            .map(|job| {
                let (reply, answer) = oneshot::channel();
                answers.push(answer);
                (job, reply)
            })
            .collect();
        thread.commit_group(group);
        answers
            .into_iter()
            .map(|mut a| a.try_recv().unwrap())
            .collect()
    }

    /// A writer thread over a fresh store in `dir`, driven by hand.
    fn thread_over(dir: &std::path::Path) -> WriterThread {
        let (notify, _committed) = watch::channel(DurableHeads::default());
        WriterThread {
            store: open(dir, None),
            heads: HashMap::new(),
            ended: HashMap::new(),
            notify,
            stopped: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether `outcome` refuses seq 4 of a feed that ended at seq 3.
    fn replaced(outcome: &Result<Stored, WriteError>) -> bool {
        matches!(
            outcome,
            Err(WriteError::Chain(FeedError::Replaced {
                seq: 4,
                last_seq: 3,
                ..
            }))
        )
    }

    /// The job of the roster origin's entry ending city-x's feed (of
    /// `x`) at its entry `at`, as `ReplaceFeedKey` makes it.
    fn ending_job(x: &[Entry], at: usize) -> Job {
        let mut ending = job(&chain(&key(9), "roster", 1));
        ending.feed_end = Some(FeedEnd {
            abandoned: None,
            origin: "city-x".into(),
            feed_id: x[at].feed_id(),
            seq: x[at].body.seq,
            hash: x[at].hash,
            enforce: true,
        });
        ending
    }

    /// ReplaceFeedKey amends a replacement whose new feed has no entry yet
    /// (R1, then R2, both ending feed F0 at seq 3): an entry of R1's feed
    /// in a replication job made before the roster was read again (it
    /// carries R1) is refused once R2 is stored. Found by review.
    #[test]
    fn an_amended_replacement_refuses_the_feed_it_abandoned() {
        let x = chain(&key(2), "city-x", 3);
        let dir = tempfile::tempdir().unwrap();
        let mut thread = thread_over(dir.path());
        assert!(commit(&mut thread, vec![job(&x)])[0].is_ok());
        // R1's roster entry (roster seq 1), then R2's (seq 2), amending it.
        assert!(commit(&mut thread, vec![ending_job(&x, 2)])[0].is_ok());
        let roster = chain(&key(9), "roster", 2);
        let mut amend = job(&roster[1..]);
        amend.feed_end = ending_job(&x, 2).feed_end.map(|end| FeedEnd {
            abandoned: Some([8; 16]),
            ..end
        });
        assert!(commit(&mut thread, vec![amend])[0].is_ok());
        // The first entry of R1's feed F1, under R1's key.
        let r1_key = key(3);
        let mut body = chain(&key(2), "city-x", 4)[3].body.clone();
        body.feed_id = vec![8; 16];
        body.prev_hash = x[2].hash.to_vec();
        let f1 = Entry::sign(&r1_key, body).unwrap();
        let mut late = job(std::slice::from_ref(&f1));
        late.replacements = vec![Replacement {
            old_feed_id: x[2].feed_id(),
            last_seq: 3,
            last_hash: x[2].hash,
            new_feed_id: [8; 16],
            new_key: r1_key.verifying_key(),
        }];
        let outcome = commit(&mut thread, vec![late]);
        assert!(
            matches!(
                outcome[0],
                Err(WriteError::Chain(FeedError::Replaced { .. }))
            ),
            "an entry of the feed R2 abandoned was stored: {:?}",
            outcome[0]
        );
    }

    #[test]
    fn a_feed_end_is_refused_once_more_of_the_feed_was_stored() {
        let x = chain(&key(2), "city-x", 5);
        let moved = |outcome: &Result<Stored, WriteError>| {
            matches!(
                outcome,
                Err(WriteError::HeadMoved {
                    expected: 3,
                    held: 4,
                    ..
                })
            )
        };
        // Seq 4 replicated between the check of the head (seq 3) and the
        // roster entry's commit, in an earlier group...
        let dir = tempfile::tempdir().unwrap();
        let mut thread = thread_over(dir.path());
        assert!(commit(&mut thread, vec![job(&x[..3])])[0].is_ok());
        assert!(commit(&mut thread, vec![job(&x[3..4])])[0].is_ok());
        let outcome = commit(&mut thread, vec![ending_job(&x, 2)]);
        assert!(moved(&outcome[0]), "{:?}", outcome[0]);
        assert!(thread.store.head("roster").unwrap().is_none());
        // ...or earlier in the same group: the roster entry is refused,
        // the replicated entry stored.
        let dir = tempfile::tempdir().unwrap();
        let mut thread = thread_over(dir.path());
        assert!(commit(&mut thread, vec![job(&x[..3])])[0].is_ok());
        let outcomes = commit(&mut thread, vec![job(&x[3..4]), ending_job(&x, 2)]);
        assert_eq!(outcomes[0].as_ref().unwrap().new, 1);
        assert!(moved(&outcomes[1]), "{:?}", outcomes[1]);
        assert!(thread.store.head("roster").unwrap().is_none());
        assert_eq!(thread.store.head("city-x").unwrap().unwrap().tip.seq, 4);
        // With the head still at seq 3, it is stored.
        let outcome = commit(&mut thread, vec![ending_job(&x, 3)]);
        assert_eq!(outcome[0].as_ref().unwrap().new, 1);
    }

    #[test]
    fn a_committed_feed_end_refuses_later_entries_of_the_ended_feed() {
        let x = chain(&key(2), "city-x", 5);
        // A replication job made before the roster was re-read carries no
        // replacement: refused after the roster entry, in a later group...
        let dir = tempfile::tempdir().unwrap();
        let mut thread = thread_over(dir.path());
        assert!(commit(&mut thread, vec![job(&x[..3])])[0].is_ok());
        assert!(commit(&mut thread, vec![ending_job(&x, 2)])[0].is_ok());
        let outcome = commit(&mut thread, vec![job(&x[3..])]);
        assert!(replaced(&outcome[0]), "{:?}", outcome[0]);
        // ...or later in the same group.
        let dir = tempfile::tempdir().unwrap();
        let mut other = thread_over(dir.path());
        assert!(commit(&mut other, vec![job(&x[..3])])[0].is_ok());
        let outcomes = commit(&mut other, vec![ending_job(&x, 2), job(&x[3..])]);
        assert!(outcomes[0].is_ok(), "{:?}", outcomes[0]);
        assert!(replaced(&outcomes[1]), "{:?}", outcomes[1]);
        assert_eq!(other.store.head("city-x").unwrap().unwrap().tip.seq, 3);
        // Entries already held are duplicates, and the new feed goes on.
        let again = commit(&mut thread, vec![job(&x[1..3])]);
        assert_eq!(again[0].as_ref().unwrap().duplicates, 2);
        let new_key = key(3);
        let mut body = x[3].body.clone();
        body.feed_id = vec![8; 16];
        let next = Entry::sign(&new_key, body).unwrap();
        let mut going_on = job(&[next]);
        going_on.replacements = vec![Replacement {
            old_feed_id: x[2].feed_id(),
            last_seq: 3,
            last_hash: x[2].hash,
            new_feed_id: [8; 16],
            new_key: new_key.verifying_key(),
        }];
        let outcome = commit(&mut thread, vec![going_on]);
        assert_eq!(outcome[0].as_ref().unwrap().new, 1, "{:?}", outcome[0]);
        // A feed end this node does not enforce (the member is pinned
        // here) ends nothing.
        let dir = tempfile::tempdir().unwrap();
        let mut pinned = thread_over(dir.path());
        assert!(commit(&mut pinned, vec![job(&x[..3])])[0].is_ok());
        let mut ending = ending_job(&x, 2);
        ending.feed_end.as_mut().unwrap().enforce = false;
        assert!(commit(&mut pinned, vec![ending])[0].is_ok());
        assert!(commit(&mut pinned, vec![job(&x[3..])])[0].is_ok());
    }

    /// A replica learns a lost key's replacement from the roster origin's
    /// feed: other sessions' jobs made before it read the roster again
    /// carry no replacement, and are refused past the feed's end all the
    /// same. Found by review.
    #[test]
    fn a_replicated_roster_entry_ends_the_feed_for_jobs_made_before_it() {
        let x = chain(&key(2), "city-x", 5);
        let dir = tempfile::tempdir().unwrap();
        let mut thread = thread_over(dir.path());
        assert!(commit(&mut thread, vec![job(&x[..2])])[0].is_ok());
        // The roster ends city-x's feed at seq 3, which this replica does
        // not hold yet: stored all the same.
        let end = ending_job(&x, 2).feed_end.unwrap();
        let mut roster = job(&chain(&key(9), "roster", 1));
        roster.roster_ends = vec![end.clone()];
        assert!(commit(&mut thread, vec![roster])[0].is_ok());
        let outcome = commit(&mut thread, vec![job(&x[2..])]);
        assert!(replaced(&outcome[0]), "{:?}", outcome[0]);
        assert_eq!(thread.store.head("city-x").unwrap().unwrap().tip.seq, 2);
        // The feed up to its end is stored; nothing after it.
        assert_eq!(
            commit(&mut thread, vec![job(&x[2..3])])[0]
                .as_ref()
                .unwrap()
                .new,
            1
        );
        let outcome = commit(&mut thread, vec![job(&x[3..])]);
        assert!(replaced(&outcome[0]), "{:?}", outcome[0]);
        // Every peer brings the roster entry again: the end is kept once.
        let mut again = job(&chain(&key(9), "roster", 1));
        again.roster_ends = vec![end.clone()];
        assert_eq!(
            commit(&mut thread, vec![again])[0]
                .as_ref()
                .unwrap()
                .duplicates,
            1
        );
        assert_eq!(thread.ended["city-x"], [end]);
        // An end for a member pinned here ends nothing.
        let dir = tempfile::tempdir().unwrap();
        let mut pinned = thread_over(dir.path());
        let mut roster = job(&chain(&key(9), "roster", 1));
        roster.roster_ends = vec![FeedEnd {
            enforce: false,
            ..ending_job(&x, 2).feed_end.unwrap()
        }];
        assert!(commit(&mut pinned, vec![roster])[0].is_ok());
        assert_eq!(
            commit(&mut pinned, vec![job(&x)])[0].as_ref().unwrap().new,
            5
        );
    }

    #[test]
    fn a_job_failing_midway_leaves_none_of_its_records_in_the_group_commit() {
        use civex_proto::v1::{entry_body::Payload, Retraction};
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FailingReads {
            inner: SledStore::open(dir.path(), 1 << 24).unwrap(),
            fail: AtomicBool::new(false),
        });
        let (notify, _committed) = watch::channel(DurableHeads::default());
        let mut thread = WriterThread {
            store: store.clone(),
            heads: HashMap::new(),
            ended: HashMap::new(),
            notify,
            stopped: Arc::new(AtomicBool::new(false)),
        };
        let b = chain(&key(2), "city-b", 2);
        assert!(commit(&mut thread, vec![job(&b[..1])])[0].is_ok());
        // Seq 2 withdraws offer-2; seq 3 retracts seq 1, which is not in the
        // job, so its hash is read from the store, and that read fails.
        let mut body = b[1].body.clone();
        body.seq = 3;
        body.prev_hash = b[1].hash.to_vec();
        body.payload = Some(Payload::Retraction(Retraction {
            feed_id: vec![7; 16],
            seq: 1,
            entry_hash: b[0].hash.to_vec(),
            reason: String::new(),
        }));
        let retraction = Entry::sign(&key(2), body).unwrap();
        store.fail.store(true, Ordering::SeqCst);
        let a = chain(&key(1), "city-a", 1);
        let outcomes = commit(&mut thread, vec![job(&[b[1].clone(), retraction]), job(&a)]);
        assert!(
            matches!(outcomes[0], Err(WriteError::Store(_))),
            "{:?}",
            outcomes[0]
        );
        assert_eq!(outcomes[1].as_ref().unwrap().new, 1);
        assert_eq!(store.head("city-b").unwrap().unwrap().tip.seq, 1);
        assert_eq!(store.withdrawal("city-a", "offer-1").unwrap(), Some(1));
        assert_eq!(
            store.withdrawal("city-b", "offer-2").unwrap(),
            None,
            "the failed job's withdrawal of seq 2 was committed without its entry"
        );
    }
}
