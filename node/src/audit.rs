//! Re-verification of everything a store holds (`civex verify`): every hash
//! link and every signature (strict Ed25519, spread over threads), and that
//! each head names the last entry held.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::{
    core::feed::{check_link, verify_signature, Entry, Tip},
    keys::KeyResolver,
    store::{Store, StoreError},
};

/// Entries read per step.
const PAGE: usize = 8192;

/// What the audit found for one origin.
#[derive(Debug, Clone)]
pub struct OriginReport {
    /// Origin.
    pub origin: String,
    /// Entries verified good.
    pub verified: u64,
    /// Seq the head names.
    pub head_seq: u64,
    /// The first problem found, if any; verification of the origin stops there.
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

/// Verifies every origin in `store` with `threads` signature threads,
/// calling `progress` with the running count of entries checked.
pub fn audit(
    store: &dyn Store,
    keys: &KeyResolver,
    threads: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Report, StoreError> {
    let checked = AtomicU64::new(0);
    let mut report = Report::default();
    for (origin, head) in store.heads()? {
        let mut origin_report = OriginReport {
            origin: origin.clone(),
            verified: 0,
            head_seq: head.tip.seq,
            problem: None,
        };
        let Some(key) = keys.key_for(&origin, &head.tip.feed_id, head.tip.seq) else {
            origin_report.problem =
                Some("no pinned feed key for this origin: cannot verify".into());
            report.origins.push(origin_report);
            continue;
        };
        let mut tip: Option<Tip> = None;
        let mut next = 1;
        while next <= head.tip.seq {
            let page = store.entries(&origin, next, PAGE, usize::MAX)?;
            if page.is_empty() {
                break;
            }
            // Links first (cheap, in order), then the signatures of every
            // entry that linked; a bad signature is reported before a broken
            // link after it, since it is the earlier fault.
            let mut entries = Vec::with_capacity(page.len());
            let mut link_problem = None;
            for signed in page {
                let seq = next;
                let linked = Entry::decode(signed)
                    .map_err(|err| format!("seq {seq}: {err}"))
                    .and_then(|entry| {
                        check_link(&origin, tip.as_ref(), &entry).map_err(|e| e.to_string())?;
                        Ok(entry)
                    });
                match linked {
                    Ok(entry) => {
                        tip = Some(entry.tip());
                        next += 1;
                        entries.push(entry);
                    }
                    Err(problem) => {
                        link_problem = Some(problem);
                        break;
                    }
                }
            }
            let chunk = entries.len().div_ceil(threads.max(1)).max(1);
            let first_bad = std::thread::scope(|scope| {
                let workers: Vec<_> = entries
                    .chunks(chunk)
                    .map(|part| {
                        let checked = &checked;
                        scope.spawn(move || {
                            for entry in part {
                                if let Err(err) = verify_signature(key, entry) {
                                    return Some((entry.body.seq, err));
                                }
                                let done = checked.fetch_add(1, Ordering::Relaxed) + 1;
                                if done.is_multiple_of(16_384) {
                                    progress(done);
                                }
                            }
                            None
                        })
                    })
                    .collect();
                workers
                    .into_iter()
                    .filter_map(|w| w.join().ok().flatten())
                    .min_by_key(|(seq, _)| *seq)
            });
            if let Some((seq, err)) = first_bad {
                origin_report.verified = seq - 1;
                origin_report.problem = Some(err.to_string());
                break;
            }
            origin_report.verified = next - 1;
            if link_problem.is_some() {
                origin_report.problem = link_problem;
                break;
            }
        }
        if origin_report.problem.is_none()
            && tip.map(|t| (t.seq, t.hash)) != Some((head.tip.seq, head.tip.hash))
        {
            origin_report.problem = Some(format!(
                "the head names seq {} but the entries held end at seq {}",
                head.tip.seq,
                tip.map_or(0, |t| t.seq)
            ));
        }
        report.origins.push(origin_report);
    }
    progress(checked.load(Ordering::Relaxed));
    Ok(report)
}
