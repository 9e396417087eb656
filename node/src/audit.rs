//! Re-verification of everything a store holds (`civex verify`): every hash
//! link and every signature (strict Ed25519), and that each head names the
//! last entry held. The reading thread decodes and checks links while
//! worker threads check signatures of the chunks already read.
//!
//! Replication takes an entry whose own signature fails when the
//! origin's key holder signed a later entry over it (`feed::authenticate`),
//! so a replica may hold one. Such an entry is authentic all the same, and
//! the audit agrees with replication, no more: it is *covered* when a
//! later entry within `feed::COVER_BYTES` of it verifies its own
//! signature, every entry between being linked and none of them one whose
//! own signature must verify (a rotation or roster entry, the last entry
//! before a replacement's feed). It is reported, but is no fault of the
//! store. Any other bad signature is.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc, Mutex,
    },
};

use civex_proto::v1::entry_body::Payload;
use ed25519_dalek::VerifyingKey;

use crate::{
    core::feed::{check_link, rotation_key, verify_signature, Entry, FeedError, Tip, COVER_BYTES},
    keys::KeyResolver,
    store::{Store, StoreError},
};

/// Entries read per step, and their bytes at most (past one entry): large
/// entries (up to 64 KiB) would otherwise hold half a GiB per page.
const PAGE: usize = 8192;
const PAGE_BYTES: usize = 8 << 20;
/// Entries per signature work item, and their bytes at most (past one
/// entry); `2 * threads` items wait at most.
const CHUNK: usize = 512;
const CHUNK_BYTES: usize = 1 << 20;

/// What the audit found for one origin.
#[derive(Debug, Clone)]
pub struct OriginReport {
    /// Origin.
    pub origin: String,
    /// Entries verified good (the prefix before the first fault).
    pub verified: u64,
    /// Seq the head names.
    pub head_seq: u64,
    /// The first fault, if any.
    pub problem: Option<String>,
    /// Entries, before any fault, whose own signature does not verify but
    /// a later signature of the origin covers (see the module doc).
    pub covered: u64,
    /// The lowest seq among them.
    pub first_covered: Option<u64>,
}

/// Audit of a whole store.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Per origin.
    pub origins: Vec<OriginReport>,
}

impl Report {
    /// Entries verified in all.
    pub fn verified(&self) -> u64 {
        self.origins.iter().map(|o| o.verified).sum()
    }

    /// Whether any origin has a problem.
    pub fn is_clean(&self) -> bool {
        self.origins.iter().all(|o| o.problem.is_none())
    }
}

/// First fault per origin: (seq, message); the lowest seq wins.
type Faults = Arc<Mutex<BTreeMap<String, (u64, String)>>>;

/// One entry's signature check, as the cover rule needs it: kept for each
/// bad signature, each good one right after a bad one, and each chunk's
/// first entry (a bad run may go on from the chunk before). Bounded by the
/// bad signatures and the chunk count, not entries.
#[derive(Debug, Clone, Copy)]
struct Mark {
    /// Body and signature bytes.
    bytes: usize,
    /// Whether its own signature verifies.
    good: bool,
}

/// The marks, per origin and seq.
type Marks = Mutex<BTreeMap<String, BTreeMap<u64, Mark>>>;

/// Entries with a bad signature that a later one covers: a run of them.
#[derive(Debug, Clone, Copy)]
struct Covered {
    first: u64,
    last: u64,
}

fn record_fault(faults: &Faults, origin: &str, seq: u64, message: String) {
    if let Ok(mut faults) = faults.lock() {
        let slot = faults
            .entry(origin.to_owned())
            .or_insert((seq, message.clone()));
        if seq < slot.0 {
            *slot = (seq, message);
        }
    }
}

/// Verifies every origin in `store` with `threads` signature threads,
/// calling `progress` with the running count of signatures checked.
pub fn audit(
    store: &dyn Store,
    keys: &KeyResolver,
    threads: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Report, StoreError> {
    let checked = AtomicU64::new(0);
    let faults: Faults = Arc::default();
    let marks = Marks::default();
    // Per origin, the seqs whose own signature replication always checks,
    // as far as the entries were read and linked.
    let mut strict: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    let heads = store.heads()?;
    let (work, queue) = mpsc::sync_channel::<(VerifyingKey, Vec<Entry>)>(threads * 2);
    let queue = Mutex::new(queue);
    let mut ends: BTreeMap<String, Option<Tip>> = BTreeMap::new();
    std::thread::scope(|scope| -> Result<(), StoreError> {
        for _ in 0..threads.max(1) {
            let (queue, marks, checked) = (&queue, &marks, &checked);
            scope.spawn(move || loop {
                let item = queue.lock().ok().and_then(|q| q.recv().ok());
                let Some((key, entries)) = item else { return };
                let mut kept = Vec::new();
                let mut after_bad = false;
                for (i, entry) in entries.iter().enumerate() {
                    let good = verify_signature(&key, entry).is_ok();
                    if i == 0 || !good || after_bad {
                        let bytes = entry.signed.body.len() + entry.signed.signature.len();
                        kept.push((entry.body.seq, Mark { bytes, good }));
                    }
                    after_bad = !good;
                }
                if let (Some(first), Ok(mut marks)) = (entries.first(), marks.lock()) {
                    let origin = marks.entry(first.body.origin.clone()).or_default();
                    origin.extend(kept);
                }
                let done = checked.fetch_add(entries.len() as u64, Ordering::Relaxed)
                    + entries.len() as u64;
                if done % (16 * CHUNK as u64) < CHUNK as u64 {
                    progress(done);
                }
            });
        }
        let result = (|| {
            for (origin, head) in &heads {
                let Some(mut key) = keys.key_for(origin, &head.tip.feed_id, 1) else {
                    record_fault(
                        &faults,
                        origin,
                        1,
                        "no pinned feed key for this origin: cannot verify".into(),
                    );
                    continue;
                };
                let replacements = keys.replacements(origin);
                let strict = strict.entry(origin.clone()).or_default();
                let mut tip: Option<Tip> = None;
                let mut next = 1;
                'pages: while next <= head.tip.seq {
                    let page = store.entries(origin, next, PAGE, PAGE_BYTES)?;
                    if page.is_empty() {
                        break;
                    }
                    let mut chunk = Vec::with_capacity(CHUNK);
                    let mut chunk_bytes = 0;
                    for signed in page {
                        let linked = Entry::decode(signed)
                            .map_err(|err| format!("seq {next}: {err}"))
                            .and_then(|entry| {
                                check_link(origin, &replacements, tip.as_ref(), &entry)
                                    .map_err(|e| e.to_string())?;
                                Ok(entry)
                            });
                        let linked = linked.and_then(|entry| {
                            let rotation = rotation_key(&entry).map_err(|e| e.to_string())?;
                            Ok((entry, rotation))
                        });
                        match linked {
                            Ok((entry, rotation)) => {
                                // The first entry of a replacement's feed and
                                // those after it are checked with its key.
                                let new_feed = tip.and_then(|t| {
                                    replacements.iter().find(|r| r.starts(&t, &entry))
                                });
                                if let Some(new_feed) = new_feed {
                                    strict.extend(tip.map(|t| t.seq));
                                    chunk_bytes = 0;
                                    let full =
                                        std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK));
                                    if !full.is_empty() {
                                        let _ = work.send((key, full));
                                    }
                                    key = new_feed.new_key;
                                }
                                tip = Some(entry.tip());
                                next += 1;
                                let roster = matches!(entry.body.payload, Some(Payload::Roster(_)));
                                if rotation.is_some() || roster {
                                    strict.insert(entry.body.seq);
                                }
                                chunk_bytes += entry.signed.body.len();
                                chunk.push(entry);
                                // A rotation entry is checked with the key
                                // before it, every later entry with its key;
                                // each strict entry ends its chunk.
                                let full_chunk = chunk.len() == CHUNK || chunk_bytes >= CHUNK_BYTES;
                                if rotation.is_some() || roster || full_chunk {
                                    chunk_bytes = 0;
                                }
                                if let Some(new_key) = rotation {
                                    let full =
                                        std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK));
                                    let _ = work.send((key, full));
                                    key = new_key;
                                } else if roster || full_chunk {
                                    let full =
                                        std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK));
                                    let _ = work.send((key, full));
                                }
                            }
                            Err(problem) => {
                                record_fault(&faults, origin, next, problem);
                                if !chunk.is_empty() {
                                    let _ = work.send((key, chunk));
                                }
                                break 'pages;
                            }
                        }
                    }
                    if !chunk.is_empty() {
                        let _ = work.send((key, chunk));
                    }
                }
                // The last entry read is the head only if nothing stopped
                // the reading (a fault, or entries missing).
                if tip.is_some_and(|t| t.seq == head.tip.seq) {
                    strict.insert(head.tip.seq);
                }
                ends.insert(origin.clone(), tip);
            }
            Ok(())
        })();
        drop(work);
        result
    })?;
    progress(checked.load(Ordering::Relaxed));

    // Runs of bad signatures that are covered, per origin.
    let mut covered: BTreeMap<String, Vec<Covered>> = BTreeMap::new();
    for (origin, marks) in marks.into_inner().unwrap_or_default() {
        let strict = strict.remove(&origin).unwrap_or_default();
        let mut marks = marks.into_iter().peekable();
        while let Some((first, mark)) = marks.next() {
            if mark.good {
                continue;
            }
            // The run of bad signatures from `first`, and the entry after it.
            let (mut last, mut bytes, mut trusted) = (first, mark.bytes, strict.contains(&first));
            let mut next = None;
            while let Some(&(seq, mark)) = marks.peek() {
                if seq != last + 1 {
                    break;
                }
                marks.next();
                if mark.good {
                    next = Some(mark);
                    break;
                }
                (last, bytes) = (seq, bytes + mark.bytes);
                trusted |= strict.contains(&seq);
            }
            match next {
                Some(cover) if !trusted && bytes + cover.bytes <= COVER_BYTES => {
                    covered
                        .entry(origin.clone())
                        .or_default()
                        .push(Covered { first, last });
                }
                _ => {
                    let problem = FeedError::BadSignature {
                        origin: origin.clone(),
                        seq: first,
                    };
                    record_fault(&faults, &origin, first, problem.to_string());
                }
            }
        }
    }
    let faults = faults.lock().map(|f| f.clone()).unwrap_or_default();
    let origins = heads
        .iter()
        .map(|(origin, head)| {
            let end = ends.get(origin).copied().flatten();
            let (verified, problem) = match faults.get(origin) {
                Some((seq, message)) => (seq - 1, Some(message.clone())),
                None if end.map(|t| (t.seq, t.hash)) != Some((head.tip.seq, head.tip.hash)) => (
                    end.map_or(0, |t| t.seq),
                    Some(match end {
                        Some(end) if end.seq == head.tip.seq => format!(
                            "the head names seq {} with hash {}, but the entry held there has \
                             hash {}",
                            head.tip.seq,
                            crate::core::ids::hex(&head.tip.hash[..8]),
                            crate::core::ids::hex(&end.hash[..8])
                        ),
                        end => format!(
                            "the head names seq {} but the entries held end at seq {}",
                            head.tip.seq,
                            end.map_or(0, |t| t.seq)
                        ),
                    }),
                ),
                None => (head.tip.seq, None),
            };
            // Only what lies before the first fault is covered: after it,
            // nothing is authenticated.
            let covered: Vec<Covered> = covered
                .remove(origin)
                .unwrap_or_default()
                .into_iter()
                .filter(|c| c.last <= verified)
                .collect();
            OriginReport {
                origin: origin.clone(),
                verified,
                head_seq: head.tip.seq,
                problem,
                covered: covered.iter().map(|c| c.last - c.first + 1).sum(),
                first_covered: covered.first().map(|c| c.first),
            }
        })
        .collect();
    Ok(Report { origins })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        core::feed::{tests::key, GENESIS_PREV_HASH},
        store::{tests::commit_of, SledStore},
    };
    use civex_proto::v1::{EntryBody, KeyRotation, OfferWithdrawal};
    use ed25519_dalek::SigningKey;

    /// A feed of city-a: each payload signed by the key in force, except
    /// at the seqs in `badly_signed`, signed by another key; every entry
    /// links to the one before, as the origin's key holder made them.
    fn feed(payloads: Vec<Payload>, badly_signed: &[u64]) -> Vec<Entry> {
        let (mut signer, wrong) = (key(1), key(9));
        let mut entries: Vec<Entry> = Vec::new();
        for (seq, payload) in (1..).zip(payloads) {
            // A rotation hands the feed to key(3) (see `rotation`).
            let next: Option<SigningKey> =
                matches!(payload, Payload::KeyRotation(_)).then(|| key(3));
            let body = EntryBody {
                origin: "city-a".into(),
                feed_id: vec![7; 16],
                seq,
                prev_hash: entries
                    .last()
                    .map_or(GENESIS_PREV_HASH, |e| e.hash)
                    .to_vec(),
                time_unix_micros: 1,
                idempotency_key: vec![seq as u8; 16],
                payload: Some(payload),
            };
            let by = if badly_signed.contains(&seq) {
                &wrong
            } else {
                &signer
            };
            entries.push(Entry::sign(by, body).unwrap());
            signer = next.unwrap_or(signer);
        }
        entries
    }

    fn withdrawals(count: usize) -> Vec<Payload> {
        (0..count)
            .map(|i| {
                Payload::Withdrawal(OfferWithdrawal {
                    offer_id: format!("offer-{i}"),
                    reason: String::new(),
                })
            })
            .collect()
    }

    /// Stores `entries` and audits the store: (verified, problem, covered
    /// count, first covered).
    fn audited(entries: &[Entry]) -> (u64, Option<String>, (u64, Option<u64>)) {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 1 << 22).unwrap();
        store.commit(&commit_of(entries)).unwrap();
        let pinned = [("city-a".to_owned(), key(1).verifying_key())].into();
        let keys = KeyResolver::new("city-n", key(2).verifying_key(), pinned);
        let report = audit(&store, &keys, 2, &|_| {}).unwrap();
        let origin = report.origins.into_iter().next().unwrap();
        (
            origin.verified,
            origin.problem,
            (origin.covered, origin.first_covered),
        )
    }

    #[test]
    fn a_bad_signature_a_later_signature_covers_is_reported_but_no_fault() {
        let (verified, problem, covered) = audited(&feed(withdrawals(5), &[2, 3]));
        assert_eq!((verified, problem, covered), (5, None, (2, Some(2))));
    }

    #[test]
    fn large_entries_are_read_in_pages_of_bounded_bytes_and_all_verified() {
        // 300 entries of about 60 KiB: pages end at their bytes (8 MiB)
        // and signature work at 1 MiB, long before their entry counts. A
        // bad signature among them, covered by the later ones, is found
        // at its place.
        let payloads = (0..300)
            .map(|i| {
                Payload::Withdrawal(OfferWithdrawal {
                    offer_id: format!("offer-{i}"),
                    reason: "x".repeat(60_000),
                })
            })
            .collect();
        let (verified, problem, covered) = audited(&feed(payloads, &[250]));
        assert_eq!((verified, problem, covered), (300, None, (1, Some(250))));
    }

    #[test]
    fn a_signature_covers_no_more_than_replication_takes() {
        // 80 entries of about 60 KiB with bad signatures (4.8 MB), then
        // good ones: more than COVER_BYTES, so replication would refuse
        // the first, and so does the audit.
        let payloads: Vec<Payload> = (0..90)
            .map(|i| {
                Payload::Withdrawal(OfferWithdrawal {
                    offer_id: format!("offer-{i}"),
                    reason: "x".repeat(60_000),
                })
            })
            .collect();
        let bad: Vec<u64> = (3..=82).collect();
        let (verified, problem, covered) = audited(&feed(payloads.clone(), &bad));
        assert_eq!(verified, 2);
        assert!(problem.unwrap().contains("seq 3"));
        assert_eq!(covered, (0, None));
        // The last 60 of them are within reach of the good entry after.
        let (verified, problem, covered) = audited(&feed(payloads, &[3, 4, 5]));
        assert_eq!((verified, problem, covered), (90, None, (3, Some(3))));
    }

    #[test]
    fn a_head_whose_hash_is_not_the_entry_held_is_named_so() {
        let entries = feed(withdrawals(3), &[]);
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 1 << 22).unwrap();
        let mut commit = commit_of(&entries);
        commit.heads[0].1.tip.hash = [9; 32];
        store.commit(&commit).unwrap();
        let pinned = [("city-a".to_owned(), key(1).verifying_key())].into();
        let keys = KeyResolver::new("city-n", key(2).verifying_key(), pinned);
        let report = audit(&store, &keys, 2, &|_| {}).unwrap();
        let problem = report.origins[0].problem.clone().unwrap();
        assert!(
            problem.contains("the head names seq 3 with hash 0909090909090909, but the entry held"),
            "{problem}"
        );
    }

    #[test]
    fn a_bad_signature_nothing_covers_is_a_fault() {
        // At the head.
        let (verified, problem, covered) = audited(&feed(withdrawals(5), &[5]));
        assert_eq!(verified, 4);
        assert!(problem.unwrap().contains("seq 5"));
        assert_eq!(covered, (0, None));
        // Before a head that is itself badly signed: seq 2 is covered by
        // seq 3, the head is the fault.
        let (verified, problem, covered) = audited(&feed(withdrawals(5), &[2, 5]));
        assert_eq!(verified, 4);
        assert!(problem.unwrap().contains("seq 5"));
        assert_eq!(covered, (1, Some(2)));
        // Two in a row before it: the first is the fault.
        let (verified, problem, _) = audited(&feed(withdrawals(5), &[3, 4, 5]));
        assert_eq!(verified, 2);
        assert!(problem.unwrap().contains("seq 3"));
    }

    #[test]
    fn a_rotation_must_verify_on_its_own_and_covers_what_comes_before() {
        let mut payloads = withdrawals(4);
        payloads[2] = Payload::KeyRotation(KeyRotation {
            new_key: key(3).verifying_key().to_bytes().to_vec(),
        });
        let (verified, problem, covered) = audited(&feed(payloads.clone(), &[3]));
        assert_eq!(verified, 2);
        assert!(problem.unwrap().contains("seq 3"), "a bad rotation passed");
        assert_eq!(covered, (0, None));
        let (verified, problem, covered) = audited(&feed(payloads.clone(), &[2]));
        assert_eq!((verified, problem, covered), (4, None, (1, Some(2))));
        // After a bad rotation nothing is authenticated: an entry the
        // head would otherwise cover is not reported as covered.
        let mut longer = payloads;
        longer.extend(withdrawals(2));
        let (verified, problem, covered) = audited(&feed(longer, &[3, 5]));
        assert_eq!(verified, 2);
        assert!(problem.unwrap().contains("seq 3"));
        assert_eq!(covered, (0, None));
    }

    /// Every file under `dir`, by path relative to it.
    fn files(dir: &std::path::Path) -> BTreeMap<std::path::PathBuf, Vec<u8>> {
        let mut out = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(at) = stack.pop() {
            for item in std::fs::read_dir(&at).unwrap() {
                let path = item.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    let relative = path.strip_prefix(dir).unwrap().to_path_buf();
                    out.insert(relative, std::fs::read(&path).unwrap());
                }
            }
        }
        out
    }

    /// Commits 3 entries one by one and then `last` entries in one
    /// commit, and opens copies of the store holding what the disk may hold
    /// after a crash during that commit: a prefix (in write order: the
    /// entry log, then sled's files by offset) of the bytes it changed. Each must open at one of the two commits,
    /// every entry verified.
    fn torn_writes_of_a_commit_of(last: u64) {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 1 << 22).unwrap();
        let entries = crate::core::feed::tests::chain(&key(1), "city-a", 3 + last);
        for entry in &entries[..3] {
            store
                .commit(&commit_of(std::slice::from_ref(entry)))
                .unwrap();
        }
        let before = files(dir.path());
        store.commit(&commit_of(&entries[3..])).unwrap();
        let after = files(dir.path());
        let mut changed: Vec<(&std::path::PathBuf, usize)> = Vec::new();
        for (path, new) in &after {
            let old = before.get(path).map_or(&[][..], Vec::as_slice);
            let differs = (0..new.len()).filter(|&i| old.get(i) != Some(&new[i]));
            changed.extend(differs.map(|i| (path, i)));
        }
        // The entry log is synced before the batch that names its bytes.
        changed.sort_by_key(|(path, i)| (!path.ends_with("entries.log"), *path, *i));
        assert!(!changed.is_empty(), "the commit changed no file");
        let pinned = [("city-a".to_owned(), key(1).verifying_key())].into();
        let keys = KeyResolver::new("city-n", key(2).verifying_key(), pinned);
        // Cuts spread over the whole write, around the end of the entry
        // log's part, and at each of the last bytes.
        let n = changed.len();
        let log_part = changed
            .iter()
            .take_while(|(path, _)| path.ends_with("entries.log"))
            .count();
        let mut cuts: BTreeSet<usize> = (0..=12).map(|k| k * n / 12).collect();
        cuts.extend([log_part.saturating_sub(1), log_part, (log_part + 1).min(n)]);
        cuts.extend(n.saturating_sub(8)..=n);
        let mut seen = BTreeSet::new();
        for cut in cuts {
            let torn = tempfile::tempdir().unwrap();
            let mut disk: BTreeMap<_, _> = after
                .keys()
                .map(|path| (path, before.get(path).cloned().unwrap_or_default()))
                .collect();
            for &(path, i) in &changed[..cut] {
                let bytes = disk.get_mut(path).unwrap();
                if i >= bytes.len() {
                    bytes.resize(i + 1, 0);
                }
                bytes[i] = after[path][i];
            }
            for (path, bytes) in disk {
                let target = torn.path().join(path);
                std::fs::create_dir_all(target.parent().unwrap()).unwrap();
                std::fs::write(target, bytes).unwrap();
            }
            let reopened = SledStore::open(torn.path(), 1 << 22)
                .unwrap_or_else(|err| panic!("torn at {cut}/{n}: {err}"));
            let report = audit(&reopened, &keys, 1, &|_| {}).unwrap();
            let origin = &report.origins[0];
            assert!(
                report.is_clean()
                    && [3, 3 + last].contains(&origin.head_seq)
                    && origin.verified == origin.head_seq,
                "torn at {cut}/{n}: {origin:?}"
            );
            seen.insert(origin.head_seq);
        }
        assert_eq!(
            seen,
            [3, 3 + last].into(),
            "both commits are among the states"
        );
    }

    #[test]
    fn a_torn_small_commit_leaves_the_store_at_either_commit() {
        torn_writes_of_a_commit_of(1);
    }

    #[test]
    fn a_torn_bulk_commit_leaves_the_store_at_either_commit() {
        torn_writes_of_a_commit_of(crate::store::tests::bulk_count());
    }
}
