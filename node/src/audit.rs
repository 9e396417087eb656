//! Re-verification of everything a store holds (`civex verify`): every hash
//! link and every signature (strict Ed25519), and that each head names the
//! last entry held. The reading thread decodes and checks links while
//! worker threads check signatures of the chunks already read.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc, Mutex,
    },
};

use ed25519_dalek::VerifyingKey;

use crate::{
    core::feed::{check_link, rotation_key, verify_signature, Entry, Tip},
    keys::KeyResolver,
    store::{Store, StoreError},
};

/// Entries read per step.
const PAGE: usize = 8192;
/// Entries per signature work item.
const CHUNK: usize = 512;

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
    let heads = store.heads()?;
    let (work, queue) = mpsc::sync_channel::<(VerifyingKey, Vec<Entry>)>(threads * 2);
    let queue = Mutex::new(queue);
    let mut ends: BTreeMap<String, Option<Tip>> = BTreeMap::new();
    std::thread::scope(|scope| -> Result<(), StoreError> {
        for _ in 0..threads.max(1) {
            let (queue, faults, checked) = (&queue, &faults, &checked);
            scope.spawn(move || loop {
                let item = queue.lock().ok().and_then(|q| q.recv().ok());
                let Some((key, entries)) = item else { return };
                for entry in &entries {
                    if let Err(err) = verify_signature(&key, entry) {
                        record_fault(faults, &entry.body.origin, entry.body.seq, err.to_string());
                        break;
                    }
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
                let mut tip: Option<Tip> = None;
                let mut next = 1;
                'pages: while next <= head.tip.seq {
                    let page = store.entries(origin, next, PAGE, usize::MAX)?;
                    if page.is_empty() {
                        break;
                    }
                    let mut chunk = Vec::with_capacity(CHUNK);
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
                                    let full =
                                        std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK));
                                    if !full.is_empty() {
                                        let _ = work.send((key, full));
                                    }
                                    key = new_feed.new_key;
                                }
                                tip = Some(entry.tip());
                                next += 1;
                                chunk.push(entry);
                                // A rotation entry is checked with the key
                                // before it, every later entry with its key.
                                if let Some(new_key) = rotation {
                                    let full =
                                        std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK));
                                    let _ = work.send((key, full));
                                    key = new_key;
                                } else if chunk.len() == CHUNK {
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
                ends.insert(origin.clone(), tip);
            }
            Ok(())
        })();
        drop(work);
        result
    })?;
    progress(checked.load(Ordering::Relaxed));

    let faults = faults.lock().map(|f| f.clone()).unwrap_or_default();
    let origins = heads
        .iter()
        .map(|(origin, head)| {
            let end = ends.get(origin).copied().flatten();
            let (verified, problem) = match faults.get(origin) {
                Some((seq, message)) => (seq - 1, Some(message.clone())),
                None if end.map(|t| (t.seq, t.hash)) != Some((head.tip.seq, head.tip.hash)) => (
                    end.map_or(0, |t| t.seq),
                    Some(format!(
                        "the head names seq {} but the entries held end at seq {}",
                        head.tip.seq,
                        end.map_or(0, |t| t.seq)
                    )),
                ),
                None => (head.tip.seq, None),
            };
            OriginReport {
                origin: origin.clone(),
                verified,
                head_seq: head.tip.seq,
                problem,
            }
        })
        .collect();
    Ok(Report { origins })
}
