//! [`authenticate`] against the covered-range rule stated entry by entry,
//! on random feeds (rotations, lost keys' replacements, roster entries,
//! forged signatures, broken links) cut at random into messages, with a
//! reach small enough for random feeds to cross it.

use super::tests::key;
use super::*;
use civex_proto::v1::{KeyRotation, OfferWithdrawal, RosterEntry};
use proptest::prelude::*;

/// The reach of a cover in these tests.
const COVER: usize = 4 * 1024;

/// How one entry of a random feed is made.
#[derive(Debug, Clone)]
struct Made {
    /// Below 8: it starts a replacement's feed (of a lost key); below 18,
    /// a key rotation; below 23, a roster entry; else a plain entry.
    kind: u8,
    /// Signed by a key not the origin's.
    forged: bool,
    /// Linked to a made-up hash.
    unlinked: bool,
    /// Bytes of text in a plain entry.
    padding: usize,
}

fn made() -> impl Strategy<Value = Made> {
    let padding = prop_oneof![3 => 0usize..200, 1 => 500usize..2_500];
    (
        0u8..100,
        prop::bool::weighted(0.4),
        prop::bool::weighted(0.03),
        padding,
    )
        .prop_map(|(kind, forged, unlinked, padding)| Made {
            kind,
            forged,
            unlinked,
            padding,
        })
}

/// The feed of city-a that `made` describes, first signed by `key(1)`, and
/// the replacements the roster would name for it.
fn build(made: &[Made]) -> (Vec<Entry>, Vec<Replacement>) {
    let (mut signer, mut feed_id, mut next_key) = (key(1), [7u8; 16], 2u8);
    let (mut entries, mut replacements) = (Vec::<Entry>::new(), Vec::new());
    for (seq, m) in (1u64..).zip(made) {
        if let (0..8, Some(last)) = (m.kind, entries.last()) {
            let new_key = key(next_key);
            let new_feed_id = [100 + seq as u8; 16];
            replacements.push(Replacement {
                old_feed_id: feed_id,
                last_seq: last.body.seq,
                last_hash: last.hash,
                new_feed_id,
                new_key: new_key.verifying_key(),
            });
            (signer, feed_id, next_key) = (new_key, new_feed_id, next_key + 1);
        }
        let mut rotated = None;
        let payload = match m.kind {
            8..18 => {
                let new_key = key(next_key);
                next_key += 1;
                let new_key_bytes = new_key.verifying_key().to_bytes().to_vec();
                rotated = Some(new_key);
                Payload::KeyRotation(KeyRotation {
                    new_key: new_key_bytes,
                })
            }
            18..23 => Payload::Roster(RosterEntry::default()),
            _ => Payload::Withdrawal(OfferWithdrawal {
                offer_id: format!("offer-{seq}"),
                reason: "x".repeat(m.padding),
            }),
        };
        let prev_hash = match (m.unlinked, entries.last()) {
            (true, _) => [3; 32],
            (false, last) => last.map_or(GENESIS_PREV_HASH, |e| e.hash),
        };
        let body = EntryBody {
            origin: "city-a".into(),
            feed_id: feed_id.to_vec(),
            seq,
            prev_hash: prev_hash.to_vec(),
            time_unix_micros: 1_000 + seq as i64,
            idempotency_key: vec![seq as u8; 16],
            payload: Some(payload),
        };
        let by = if m.forged { key(250) } else { signer.clone() };
        entries.push(Entry::sign(&by, body).unwrap());
        if let Some(new_key) = rotated {
            signer = new_key;
        }
    }
    (entries, replacements)
}

/// What is made of a feed: how many entries are taken, the first refused
/// (its index, and whether for its bad signature or one before it that
/// nothing covered), and how many wait for a cover.
#[derive(Debug, PartialEq)]
struct Outcome {
    taken: usize,
    refused: Option<(usize, bool)>,
    waiting: usize,
}

/// The rule, entry by entry, from genesis with `first_key`: an entry is
/// taken when it links, and its own signature verifies, or a later one's
/// does with every link between, within [`COVER`] bytes of it and not
/// across the start of a replacement's feed; a rotation or roster entry
/// must verify its own.
fn by_the_rule(
    first_key: VerifyingKey,
    replacements: &[Replacement],
    entries: &[Entry],
) -> Outcome {
    let (mut key, mut tip) = (first_key, None::<Tip>);
    // Entries `taken..i` wait for a cover, signed with `run_key`.
    let (mut taken, mut run_bytes, mut run_key) = (0, 0, first_key);
    let refuse = |taken, at, bad_signature| Outcome {
        taken,
        refused: Some((at, bad_signature)),
        waiting: 0,
    };
    for (i, entry) in entries.iter().enumerate() {
        let run = taken < i;
        let last = match run {
            true => Some(entries[i - 1].tip()),
            false => tip,
        };
        let new_feed = last.and_then(|t| replacements.iter().find(|r| r.starts(&t, entry)));
        let rotation = check_link("city-a", replacements, last.as_ref(), entry)
            .and_then(|()| rotation_key(entry));
        let rotation = match (rotation, run) {
            (Err(_), false) => return refuse(taken, i, false),
            (Err(_), true) => return refuse(taken, taken, true),
            (Ok(_), true) if new_feed.is_some() || run_bytes + entry_bytes(entry) > COVER => {
                return refuse(taken, taken, true)
            }
            (Ok(rotation), _) => rotation,
        };
        let entry_key = match run {
            true => run_key,
            false => new_feed.map_or(key, |r| r.new_key),
        };
        if verify_signature(&entry_key, entry).is_ok() {
            (key, tip, taken, run_bytes) =
                (rotation.unwrap_or(entry_key), Some(entry.tip()), i + 1, 0);
        } else if carries_trust(entry) {
            return refuse(taken, taken, true);
        } else {
            run_key = entry_key;
            run_bytes += entry_bytes(entry);
        }
    }
    Outcome {
        taken,
        refused: None,
        waiting: entries.len() - taken,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn authenticate_takes_what_the_rule_takes_however_the_entries_are_cut(
        made in prop::collection::vec(made(), 1..40),
        cuts in prop::collection::vec(1usize..16, 40),
    ) {
        let (entries, replacements) = build(&made);
        let first_key = key(1).verifying_key();
        let expected = by_the_rule(first_key, &replacements, &entries);
        let checks_before = signature_checks();
        let (mut key, mut tip, mut held) = (first_key, None, Uncovered::default());
        let (mut taken, mut refused) = (Vec::new(), None);
        let mut rest = entries.as_slice();
        for &cut in &cuts {
            if rest.is_empty() || refused.is_some() {
                break;
            }
            let (message, after) = rest.split_at(cut.min(rest.len()));
            rest = after;
            let out = authenticate_within(
                COVER, "city-a", &key, &replacements, tip, held, message.to_vec(),
            );
            taken.extend(out.accepted);
            (key, tip, held) = (out.key, out.tip, out.uncovered);
            refused = out.refused.map(|(fault, entry)| {
                let bad_signature = matches!(fault, FeedError::BadSignature { .. });
                (entry.body.seq as usize - 1, bad_signature)
            });
        }
        let checks = signature_checks() - checks_before;
        let waiting = held.entries().len();
        prop_assert_eq!(Outcome { taken: taken.len(), refused, waiting }, expected);
        prop_assert!(taken.iter().zip(&entries).all(|(a, b)| a.hash == b.hash));
        prop_assert_eq!(tip, taken.last().map(Entry::tip));
        prop_assert_eq!(held.bytes(), held.entries().iter().map(entry_bytes).sum::<usize>());
        prop_assert!(
            checks <= 3 * entries.len() as u64,
            "{} signature checks for {} entries", checks, entries.len()
        );
    }
}
