//! Query-index records derived from verified entries: what the store keeps
//! beside the feed so that queries need not decode every entry. Pure: the
//! store decides how records are laid out.

use civex_proto::v1::{entry_body::Payload, OfferResponse, PublishGroup, ServiceOffer};

use super::feed::{Entry, Hash};

/// The key of an observation: one current value per key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObservationKey {
    /// Origin.
    pub origin: String,
    /// Indicator code.
    pub indicator: String,
    /// Catalog edition.
    pub catalog_edition: String,
    /// Reference area.
    pub ref_area: String,
    /// Period.
    pub period: String,
    /// Breakdown; empty until breakdowns exist.
    pub breakdown: String,
}

impl ObservationKey {
    /// The parts in key order.
    pub fn parts(&self) -> [&str; 6] {
        [
            &self.origin,
            &self.indicator,
            &self.catalog_edition,
            &self.ref_area,
            &self.period,
            &self.breakdown,
        ]
    }
}

/// One index record.
#[derive(Debug, Clone, PartialEq)]
pub enum IndexRecord {
    /// An observation held at `seq` of its origin's feed.
    Observation {
        /// Key.
        key: ObservationKey,
        /// Seq of the entry holding it.
        seq: u64,
        /// Functional area of the cell (for filtering without the entry).
        area: i32,
        /// Position of the cell in the entry's batch.
        position: u32,
        /// Seq of the last part of the cell's publish group (0: no group);
        /// the cell is queryable only once the feed is held up to it.
        /// [`NEVER_QUERYABLE`]: the cell is never answered.
        group_end: u64,
    },
    /// A version of an offer.
    OfferVersion {
        /// Origin.
        origin: String,
        /// Seq of the entry.
        seq: u64,
        /// Entry hash: the version.
        hash: Hash,
        /// The offer; only its id when not `answerable`.
        offer: ServiceOffer,
        /// False for a version of an entry with fields this build does not
        /// know: it is still the offer's latest, but is never answered.
        answerable: bool,
    },
    /// A final withdrawal.
    Withdrawal {
        /// Origin.
        origin: String,
        /// Offer id.
        offer_id: String,
        /// Seq of the withdrawal entry.
        seq: u64,
    },
    /// A response to an offer (perhaps one not held yet).
    Response {
        /// Responding origin.
        responder: String,
        /// Seq of the response entry.
        seq: u64,
        /// The response.
        response: OfferResponse,
    },
    /// An entry of `origin` retracted by a later one. Takes effect only if
    /// `entry_hash` is the hash of the entry held at `retracted_seq` (the
    /// writer checks; this module sees one entry at a time).
    Retraction {
        /// Origin.
        origin: String,
        /// Retracted seq.
        retracted_seq: u64,
        /// Hash the retraction names.
        entry_hash: Vec<u8>,
        /// Seq of the retracting entry.
        by_seq: u64,
    },
    /// A roster entry published by `publisher` about one member.
    Roster {
        /// Origin that published it.
        publisher: String,
        /// Seq of the entry.
        seq: u64,
        /// The entry.
        entry: civex_proto::v1::RosterEntry,
    },
    /// Privacy budget spent by a noised table of `origin`.
    PrivacyDebit {
        /// Origin.
        origin: String,
        /// Seq of the entry carrying it.
        seq: u64,
        /// Indicator code.
        indicator: String,
        /// Catalog edition.
        edition: String,
        /// Period.
        period: String,
        /// rho spent, in 1e-9.
        rho_nanos: u64,
    },
    /// A key rotation: from `seq + 1` on, the feed is signed by `new_key`.
    KeyRotation {
        /// Origin.
        origin: String,
        /// Seq of the rotation entry.
        seq: u64,
        /// The new key.
        new_key: [u8; 32],
    },
}

/// The `group_end` of a cell that is never answered: one of an entry with
/// fields this build does not know, or of a malformed publish group. Such a
/// cell is still its key's latest: it supersedes what came before it, so
/// the key has no current value to answer until it is retracted.
pub const NEVER_QUERYABLE: u64 = u64::MAX;

/// Seq of the last part of the group that the entry at `seq` is part of; a
/// malformed group (a part outside its count or before seq 1) is never
/// queryable.
fn group_end(seq: u64, group: &PublishGroup) -> u64 {
    seq.checked_sub(u64::from(group.part))
        .filter(|first| *first >= 1 && group.part < group.count)
        .map_or(NEVER_QUERYABLE, |first| first + u64::from(group.count) - 1)
}

/// Where an origin's feed stands inside a publish group: what its next
/// entry must be for the group to complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenGroup {
    /// Seq of the next part.
    pub next_seq: u64,
    /// The group's id.
    pub id: Vec<u8>,
    /// The part the next entry must be.
    pub part: u32,
    /// The group's count of parts.
    pub count: u32,
}

impl OpenGroup {
    /// The group's `group_end`: the seq of its last part.
    pub fn end(&self) -> u64 {
        self.next_seq - u64::from(self.part) + u64::from(self.count) - 1
    }
}

fn group_claim(entry: &Entry) -> Option<&PublishGroup> {
    match &entry.body.payload {
        Some(Payload::Indicators(batch)) => batch.group.as_ref(),
        _ => None,
    }
}

/// The group left open by `entry`, taking the parts before it as given: it
/// is a well-formed part that is not its group's last.
pub fn opened_by(entry: &Entry) -> Option<OpenGroup> {
    let group = group_claim(entry)?;
    let seq = entry.body.seq;
    (group_end(seq, group) != NEVER_QUERYABLE && group.part + 1 < group.count).then(|| OpenGroup {
        next_seq: seq + 1,
        id: group.id.clone(),
        part: group.part + 1,
        count: group.count,
    })
}

/// Parts of a publish group that can never complete: the entries at seqs
/// `low..=high`, whose rows carry `group_end` `end`. Another group may end
/// at the same seq (a complete one, after a broken one), so the seqs say
/// which rows are meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrokenParts {
    /// The `group_end` the parts claim.
    pub end: u64,
    /// Seq of the first part held.
    pub low: u64,
    /// Seq of the last part held.
    pub high: u64,
}

/// Follows an origin's feed through its next entry. `open` is the group
/// the entry before it left open. Returns the group this entry leaves open,
/// and the parts that this entry shows can never complete: the open
/// group's, if the entry is not its next part, and the entry itself, if it
/// claims a later part of a group that was not open. Each part's end alone
/// says nothing of this (part 0 of two, then any other entry, is held "up
/// to its end"), and a publish group is answered only once complete (spec
/// rule 8). Only a malformed feed has broken groups: the sequencer signs a
/// group's parts back to back.
pub fn follow_group(
    open: Option<&OpenGroup>,
    entry: &Entry,
) -> (Option<OpenGroup>, Vec<BrokenParts>) {
    let seq = entry.body.seq;
    let claim = group_claim(entry);
    let expected = open.filter(|o| o.next_seq == seq);
    let continues = match (expected, claim) {
        (Some(open), Some(group)) => {
            group.id == open.id && group.part == open.part && group.count == open.count
        }
        _ => false,
    };
    let mut broken = Vec::new();
    if let Some(open) = expected.filter(|_| !continues) {
        broken.push(BrokenParts {
            end: open.end(),
            low: open.next_seq - u64::from(open.part),
            high: open.next_seq - 1,
        });
    }
    if let Some(group) = claim {
        let end = group_end(seq, group);
        if group.part > 0 && !continues && end != NEVER_QUERYABLE {
            broken.push(BrokenParts {
                end,
                low: seq,
                high: seq,
            });
            return (None, broken);
        }
    }
    (opened_by(entry), broken)
}

fn usable(text: &str) -> bool {
    !text.contains('\0')
}

/// Index records of a verified entry. Payload kinds this node does not know,
/// and cells whose key parts could not be indexed, are left out. What an
/// entry with fields this node does not know would add to query answers is
/// kept out of them too (spec rule 1): decoding drops those fields, and
/// answering the rest as if they were not there could misstate the cell or
/// offer they qualify. Its responses are not indexed. Its cells are, as
/// never queryable (`group_end` past any feed), and its offer version is,
/// as not answerable, because each still supersedes what came before it
/// (the own feed's disclosure control must count the cells, too). What
/// only takes from answers (withdrawals, retractions) and what verifying
/// and the privacy ledger need (rotations, roster entries, debits) stays
/// as it is.
pub fn records_of(entry: &Entry) -> Vec<IndexRecord> {
    let mut records = known_records(entry);
    if has_unknown_fields(entry) {
        records.retain(|record| !matches!(record, IndexRecord::Response { .. }));
        for record in &mut records {
            match record {
                IndexRecord::Observation { group_end, .. } => *group_end = NEVER_QUERYABLE,
                IndexRecord::OfferVersion {
                    offer, answerable, ..
                } => {
                    *offer = ServiceOffer {
                        offer_id: std::mem::take(&mut offer.offer_id),
                        ..Default::default()
                    };
                    *answerable = false;
                }
                _ => {}
            }
        }
    }
    records
}

/// Whether decoding `entry` dropped bytes of its body: fields (or payload
/// kinds) this build does not know, or an encoding other than the one this
/// build writes (which the conservative answer treats the same). Decoding
/// keeps every known field, so re-encoding it is shorter exactly then.
fn has_unknown_fields(entry: &Entry) -> bool {
    use prost::Message;
    entry.body.encoded_len() != entry.signed.body.len()
}

fn known_records(entry: &Entry) -> Vec<IndexRecord> {
    let body = &entry.body;
    let origin = &body.origin;
    let seq = body.seq;
    match &body.payload {
        Some(Payload::Indicators(batch)) => {
            let group_end = batch.group.as_ref().map_or(0, |g| group_end(seq, g));
            let debits = batch
                .privacy
                .iter()
                .filter(|d| {
                    [&d.indicator, &d.catalog_edition, &d.period]
                        .iter()
                        .all(|t| usable(t))
                })
                .map(|d| IndexRecord::PrivacyDebit {
                    origin: origin.clone(),
                    seq,
                    indicator: d.indicator.clone(),
                    edition: d.catalog_edition.clone(),
                    period: d.period.clone(),
                    rho_nanos: d.rho_nanos,
                });
            batch
                .observations
                .iter()
                .zip(0u32..)
                .filter(|(o, _)| {
                    [
                        &o.indicator,
                        &o.catalog_edition,
                        &o.ref_area,
                        &o.period,
                        &o.breakdown,
                    ]
                    .iter()
                    .all(|t| usable(t))
                })
                .map(|(o, position)| IndexRecord::Observation {
                    key: ObservationKey {
                        origin: origin.clone(),
                        indicator: o.indicator.clone(),
                        catalog_edition: o.catalog_edition.clone(),
                        ref_area: o.ref_area.clone(),
                        period: o.period.clone(),
                        breakdown: o.breakdown.clone(),
                    },
                    seq,
                    area: o.area,
                    position,
                    group_end,
                })
                .chain(debits)
                .collect()
        }
        Some(Payload::Offer(offer)) if usable(&offer.offer_id) => vec![IndexRecord::OfferVersion {
            origin: origin.clone(),
            seq,
            hash: entry.hash,
            offer: offer.clone(),
            answerable: true,
        }],
        Some(Payload::Withdrawal(w)) if usable(&w.offer_id) => vec![IndexRecord::Withdrawal {
            origin: origin.clone(),
            offer_id: w.offer_id.clone(),
            seq,
        }],
        Some(Payload::Response(r)) if usable(&r.offer_origin) && usable(&r.offer_id) => {
            vec![IndexRecord::Response {
                responder: origin.clone(),
                seq,
                response: r.clone(),
            }]
        }
        // The writer checks the hash named against the entry held, which
        // covers its feed id (an entry before a lost key's replacement is
        // of an earlier feed id than the retraction's own).
        Some(Payload::Retraction(r)) if r.seq < seq => {
            vec![IndexRecord::Retraction {
                origin: origin.clone(),
                retracted_seq: r.seq,
                entry_hash: r.entry_hash.clone(),
                by_seq: seq,
            }]
        }
        Some(Payload::Roster(member)) if usable(&member.origin) => vec![IndexRecord::Roster {
            publisher: origin.clone(),
            seq,
            entry: member.clone(),
        }],
        Some(Payload::KeyRotation(rotation)) => match rotation.new_key.as_slice().try_into() {
            Ok(new_key) => vec![IndexRecord::KeyRotation {
                origin: origin.clone(),
                seq,
                new_key,
            }],
            Err(_) => Vec::new(),
        },
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::feed::tests::{chain, key};

    #[test]
    fn a_malformed_publish_group_is_never_queryable() {
        use civex_proto::v1::{IndicatorBatch, Observation, PublishGroup};
        let mut entry = chain(&key(1), "city-a", 1).remove(0);
        let with_group = |part, count| {
            Some(Payload::Indicators(IndicatorBatch {
                observations: vec![Observation::default()],
                rules: Vec::new(),
                privacy: Vec::new(),
                group: Some(PublishGroup {
                    id: vec![],
                    part,
                    count,
                }),
            }))
        };
        // The body changed after signing: its bytes follow, as if signed so.
        let end_of = |entry: &mut Entry| {
            entry.signed.body = prost::Message::encode_to_vec(&entry.body).into();
            match records_of(entry).as_slice() {
                [IndexRecord::Observation { group_end, .. }] => *group_end,
                other => panic!("{other:?}"),
            }
        };
        entry.body.payload = with_group(0, 3);
        assert_eq!(end_of(&mut entry), 3);
        entry.body.payload = with_group(5, 9);
        assert_eq!(end_of(&mut entry), NEVER_QUERYABLE, "a part before seq 1");
        entry.body.payload = with_group(0, 0);
        assert_eq!(
            end_of(&mut entry),
            NEVER_QUERYABLE,
            "a part outside its count"
        );
    }

    #[test]
    fn a_group_that_cannot_complete_is_named_broken() {
        use civex_proto::v1::{IndicatorBatch, PublishGroup};
        // Entries 1..=n of one feed; `group[i]` is (id, part, count) of entry
        // i + 1, or none. Returns the broken ends each entry names.
        let follow = |groups: &[Option<(u8, u32, u32)>]| -> Vec<Vec<u64>> {
            let mut entries = chain(&key(1), "city-a", groups.len() as u64);
            let mut open = None;
            let mut out = Vec::new();
            for (entry, group) in entries.iter_mut().zip(groups) {
                entry.body.payload = Some(Payload::Indicators(IndicatorBatch {
                    group: group.map(|(id, part, count)| PublishGroup {
                        id: vec![id; 16],
                        part,
                        count,
                    }),
                    ..Default::default()
                }));
                let (next, broken) = follow_group(open.as_ref(), entry);
                open = next;
                out.push(broken.iter().map(|b| b.end).collect());
            }
            out
        };
        let none: Vec<u64> = Vec::new();
        // Whole groups, back to back, and entries without one: nothing broken.
        assert_eq!(
            follow(&[
                Some((1, 0, 2)),
                Some((1, 1, 2)),
                None,
                Some((2, 0, 3)),
                Some((2, 1, 3)),
                Some((2, 2, 3)),
                Some((3, 0, 1)),
            ]),
            vec![none.clone(); 7]
        );
        // Part 0 of two, then an entry of no group: the group ends at 2,
        // which the feed reaches, but it never completes.
        assert_eq!(follow(&[Some((1, 0, 2)), None]), [none.clone(), vec![2]]);
        // Then part 0 of another group: the first is broken, the second not.
        assert_eq!(
            follow(&[Some((1, 0, 2)), Some((2, 0, 2)), Some((2, 1, 2))]),
            [none.clone(), vec![2], none.clone()]
        );
        // A later part with nothing open before it, or of another id, part
        // or count than the open group's: both groups are broken.
        assert_eq!(follow(&[None, Some((1, 1, 2))]), [none.clone(), vec![2]]);
        assert_eq!(
            follow(&[Some((1, 0, 3)), Some((2, 1, 3))]),
            [none.clone(), vec![3, 3]]
        );
        assert_eq!(
            follow(&[None, Some((1, 0, 3)), Some((1, 2, 3))]),
            [none.clone(), none.clone(), vec![4, 3]]
        );
        assert_eq!(
            follow(&[Some((1, 0, 3)), Some((1, 1, 2))]),
            [none.clone(), vec![3, 2]]
        );
        // The parts meant: those held of the open group, and the lone part.
        let entries = chain(&key(1), "city-a", 4);
        let with = |mut entry: Entry, part, count| {
            entry.body.payload = Some(Payload::Indicators(IndicatorBatch {
                group: Some(PublishGroup {
                    id: vec![1; 16],
                    part,
                    count,
                }),
                ..Default::default()
            }));
            entry
        };
        let (open, _) = follow_group(None, &with(entries[1].clone(), 0, 4));
        let (open, _) = follow_group(open.as_ref(), &with(entries[2].clone(), 1, 4));
        let (_, broken) = follow_group(open.as_ref(), &with(entries[3].clone(), 3, 4));
        assert_eq!(
            broken,
            [
                BrokenParts {
                    end: 5,
                    low: 2,
                    high: 3
                },
                BrokenParts {
                    end: 4,
                    low: 4,
                    high: 4
                }
            ]
        );
        // A malformed part is never queryable anyway; it breaks the open
        // group and opens none.
        assert_eq!(
            follow(&[Some((1, 0, 2)), Some((1, 5, 2)), Some((1, 1, 2))]),
            [none.clone(), vec![2], vec![3]]
        );
    }

    #[test]
    fn what_an_entry_with_unknown_fields_adds_to_answers_is_never_queryable() {
        use crate::core::feed::tests::signed_with_extra;
        use civex_proto::v1::{EntryBody, IndicatorBatch, Observation, Retraction};
        let signer = key(1);
        // A body as a newer build might write it: a known payload, plus
        // field 99 (varint 1) inside the entry body.
        let signed_with = |payload: Payload, extra: &[u8]| {
            let body = EntryBody {
                origin: "city-a".into(),
                feed_id: vec![1; 16],
                seq: 2,
                prev_hash: vec![0; 32],
                time_unix_micros: 1,
                idempotency_key: vec![1; 16],
                payload: Some(payload),
            };
            signed_with_extra(&signer, body, extra)
        };
        let indicators = Payload::Indicators(IndicatorBatch {
            observations: vec![Observation {
                indicator: "a".into(),
                catalog_edition: "local".into(),
                ref_area: "city-a".into(),
                period: "2025".into(),
                value: Some(1.0),
                ..Default::default()
            }],
            ..Default::default()
        });
        let retraction = Payload::Retraction(Retraction {
            feed_id: vec![1; 16],
            seq: 1,
            entry_hash: vec![0; 32],
            reason: String::new(),
        });
        let unknown_field = [0x98, 0x06, 0x01];
        assert_eq!(records_of(&signed_with(indicators.clone(), &[])).len(), 1);
        match records_of(&signed_with(indicators, &unknown_field)).as_slice() {
            [IndexRecord::Observation { group_end, .. }] => assert_eq!(
                *group_end, NEVER_QUERYABLE,
                "a cell of an entry with an unknown field is queryable"
            ),
            other => panic!("expected the cell, never queryable: {other:?}"),
        }
        // An offer version is still the offer's latest, never answered,
        // and keeps nothing but its id.
        let offer = Payload::Offer(ServiceOffer {
            offer_id: "o1".into(),
            title: "terms".into(),
            ..Default::default()
        });
        match records_of(&signed_with(offer, &unknown_field)).as_slice() {
            [IndexRecord::OfferVersion {
                offer, answerable, ..
            }] => {
                assert!(!answerable, "an offer of unknown fields is answerable");
                assert_eq!(
                    offer,
                    &ServiceOffer {
                        offer_id: "o1".into(),
                        ..Default::default()
                    }
                );
            }
            other => panic!("expected the offer version: {other:?}"),
        }
        // A retraction still takes what it names out of answers.
        assert!(matches!(
            records_of(&signed_with(retraction, &unknown_field)).as_slice(),
            [IndexRecord::Retraction { .. }]
        ));
    }

    #[test]
    fn unknown_payloads_are_not_indexed() {
        let mut entry = chain(&key(1), "city-a", 1).remove(0);
        assert_eq!(records_of(&entry).len(), 1);
        entry.body.payload = None;
        assert!(records_of(&entry).is_empty());
    }
}
