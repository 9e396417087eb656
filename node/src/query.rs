//! Queries over the store: current observations (filtered, keyset-paged)
//! and offers with their state. Free of gRPC types.

use civex_proto::v1::{
    entry_body::Payload, DisclosureRules, EntryBody, FunctionalArea, IndicatorBatch, Observation,
};
use prost::Message;
use std::collections::{BTreeMap, HashSet};

use crate::{
    core::{
        ids::{hex, unhex},
        index::{ObservationKey, NEVER_QUERYABLE},
        period::Period,
    },
    store::{Head, ObservationRow, OfferRow, ResponseRow, Store, StoreError},
};

/// Largest page.
pub const MAX_PAGE: usize = 1000;
/// Page size when none is asked.
pub const DEFAULT_PAGE: usize = 100;
/// Index rows one page may read (a page ends at the first key, or offer,
/// past it: the versions of one are read whole). A filter that matches
/// little ends its page early, with a token to go on from, rather than
/// reading the whole index in one call.
pub const SCAN_BUDGET: usize = 20_000;
/// Responses listed with one offer at most; a page of offers also ends once
/// it lists this many.
pub const MAX_RESPONSES: usize = 1000;
/// Encoded bytes after which a page ends (a record can be up to two
/// entries' worth, 128 KiB; the smallest message limit is 2 MiB).
pub const PAGE_BYTES: usize = 1 << 20;
/// Encoded bytes of responses listed with one offer at most.
pub const RESPONSE_BYTES: usize = 512 << 10;

/// What queries may answer: each origin's entries up to its durable head
/// (the writer's, once synced). sled shows a batch before it is synced, and
/// a commit whose sync failed stays visible until the node restarts: an
/// answer from it could name a value that is then gone.
#[derive(Debug, Clone, Copy)]
pub struct Durable<'a>(pub &'a BTreeMap<String, Head>);

impl Durable<'_> {
    /// The durable head's seq of `origin` (0: nothing).
    fn seq(&self, origin: &str) -> u64 {
        self.0.get(origin).map_or(0, |head| head.tip.seq)
    }

    /// Whether `origin`'s entry `seq` is durable.
    fn holds(&self, origin: &str, seq: u64) -> bool {
        seq <= self.seq(origin)
    }

    /// Whether `origin`'s entry `seq` is retracted by a durable entry.
    fn retracted(&self, store: &dyn Store, origin: &str, seq: u64) -> Result<bool, StoreError> {
        Ok(store
            .retracted_by(origin, seq)?
            .is_some_and(|by| self.holds(origin, by)))
    }
}

/// About what a record takes in an answer: its parts and some framing.
fn record_bytes(parts: &[usize]) -> usize {
    parts.iter().sum::<usize>() + 32
}

/// A query problem.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// A filter is wrong; the message names it.
    #[error("{0}")]
    Invalid(String),
    /// Storage failed.
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// Observation filter. Empty lists do not filter.
#[derive(Debug, Clone, Default)]
pub struct ObservationFilter {
    /// Areas.
    pub areas: Vec<FunctionalArea>,
    /// Indicator codes.
    pub indicators: Vec<String>,
    /// Origins.
    pub origins: Vec<String>,
    /// Earliest period.
    pub period_from: Option<String>,
    /// Latest period.
    pub period_to: Option<String>,
}

/// A current observation, read from the signed entry that holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct CurrentObservation {
    /// Key.
    pub key: ObservationKey,
    /// Seq of the entry holding it.
    pub seq: u64,
    /// The cell as signed.
    pub observation: Observation,
    /// Rules applied to its batch.
    pub rules: Option<DisclosureRules>,
}

/// A page of current observations.
#[derive(Debug, Clone)]
pub struct ObservationPage {
    /// Rows, in key order.
    pub rows: Vec<CurrentObservation>,
    /// Token for the next page.
    pub next: Option<String>,
}

/// Reads the cell an index row points at from its entry (the last entry
/// read is kept, as a batch's cells sit next to each other in the index).
struct Resolver<'a> {
    store: &'a dyn Store,
    last: Option<(String, u64, IndicatorBatch)>,
}

impl Resolver<'_> {
    fn resolve(&mut self, row: ObservationRow) -> Result<CurrentObservation, QueryError> {
        let held = self
            .last
            .as_ref()
            .is_some_and(|(origin, seq, _)| *origin == row.key.origin && *seq == row.seq);
        if !held {
            let corrupt = |message: &str| {
                QueryError::Store(StoreError::Corrupt {
                    path: String::new(),
                    message: format!("{} seq {}: {message}", row.key.origin, row.seq),
                })
            };
            let signed = self
                .store
                .entries(&row.key.origin, row.seq, 1, usize::MAX)?
                .into_iter()
                .next()
                .ok_or_else(|| corrupt("indexed entry is missing"))?;
            let body = EntryBody::decode(signed.body.as_ref())
                .map_err(|_| corrupt("indexed entry does not decode"))?;
            let Some(Payload::Indicators(batch)) = body.payload else {
                return Err(corrupt("indexed entry is not an indicator batch"));
            };
            self.last = Some((row.key.origin.clone(), row.seq, batch));
        }
        let batch = self.last.as_ref().map(|(_, _, batch)| batch);
        let observation = batch
            .and_then(|b| b.observations.get(row.position as usize))
            .cloned()
            .unwrap_or_default();
        Ok(CurrentObservation {
            rules: batch.and_then(|b| b.rules.get(observation.rules as usize).cloned()),
            key: row.key,
            seq: row.seq,
            observation,
        })
    }
}

fn encode_token(key: &ObservationKey) -> String {
    hex(key.parts().join("\0").as_bytes())
}

fn decode_token(token: &str) -> Result<ObservationKey, QueryError> {
    let invalid = || QueryError::Invalid("page_token: not a token this node issued".into());
    let bytes = unhex(token).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let parts: Vec<&str> = text.split('\0').collect();
    let [origin, indicator, catalog_edition, ref_area, period, breakdown] = parts[..] else {
        return Err(invalid());
    };
    Ok(ObservationKey {
        origin: origin.into(),
        indicator: indicator.into(),
        catalog_edition: catalog_edition.into(),
        ref_area: ref_area.into(),
        period: period.into(),
        breakdown: breakdown.into(),
    })
}

fn parse_bound(field: &str, text: &Option<String>) -> Result<Option<Period>, QueryError> {
    text.as_deref()
        .filter(|t| !t.is_empty())
        .map(|t| Period::parse(t).map_err(|m| QueryError::Invalid(format!("{field}: {m}"))))
        .transpose()
}

fn full_page(rows: Vec<CurrentObservation>) -> ObservationPage {
    ObservationPage {
        next: rows.last().map(|r| encode_token(&r.key)),
        rows,
    }
}

fn page_limit(page_size: usize) -> usize {
    match page_size {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    }
}

/// Current observations matching `filter`, one page after `page_token`.
/// The current value of a key is its latest entry that is not retracted
/// (and, for a publish group, whose every part is held). A key whose latest
/// such entry cannot be answered (see [`NEVER_QUERYABLE`]) is left out.
/// A page ends when it is full, holds [`PAGE_BYTES`], or has read
/// [`SCAN_BUDGET`] index rows, so it may hold fewer rows than asked, even
/// none, and still have a next token.
pub fn observations(
    store: &dyn Store,
    durable: Durable<'_>,
    filter: &ObservationFilter,
    page_size: usize,
    page_token: Option<&str>,
) -> Result<ObservationPage, QueryError> {
    observations_within(store, durable, filter, page_size, page_token, SCAN_BUDGET)
}

fn observations_within(
    store: &dyn Store,
    durable: Durable<'_>,
    filter: &ObservationFilter,
    page_size: usize,
    page_token: Option<&str>,
    budget: usize,
) -> Result<ObservationPage, QueryError> {
    let limit = page_limit(page_size);
    // Each origin named costs a scan of its own, even when it holds nothing.
    if filter.origins.len() > MAX_PAGE {
        return Err(QueryError::Invalid(format!(
            "origins: {} named, at most {MAX_PAGE}",
            filter.origins.len()
        )));
    }
    let from = parse_bound("period_from", &filter.period_from)?;
    let to = parse_bound("period_to", &filter.period_to)?;
    let after = page_token
        .filter(|t| !t.is_empty())
        .map(decode_token)
        .transpose()?;
    let areas: HashSet<i32> = filter.areas.iter().map(|a| *a as i32).collect();
    let indicators: HashSet<&str> = filter.indicators.iter().map(String::as_str).collect();
    let matches = |row: &ObservationRow| {
        (areas.is_empty() || areas.contains(&row.area))
            && (indicators.is_empty() || indicators.contains(row.key.indicator.as_str()))
            && Period::parse(&row.key.period).is_ok_and(|p| p.within(from.as_ref(), to.as_ref()))
    };
    let mut origins: Vec<Option<&str>> = if filter.origins.is_empty() {
        vec![None]
    } else {
        filter.origins.iter().map(|o| Some(o.as_str())).collect()
    };
    origins.sort();
    origins.dedup();

    let mut rows = Vec::new();
    let mut bytes = 0;
    let mut scanned = 0;
    // The last key read whole, where a page cut short goes on from.
    let mut read_whole: Option<ObservationKey> = None;
    let mut resolver = Resolver { store, last: None };
    let mut broken_groups: std::collections::HashMap<(String, u64), Vec<(u64, u64)>> =
        std::collections::HashMap::new();
    for origin in origins {
        let after_here = match (&after, origin) {
            (Some(after), Some(origin)) if after.origin.as_str() > origin => continue,
            (Some(after), Some(origin)) if after.origin.as_str() < origin => None,
            (after, _) => after.as_ref(),
        };
        let mut current: Option<ObservationRow> = None;
        let mut group_key: Option<ObservationKey> = None;
        // Moves a finished group's current row into the page; true when full.
        let mut take = |current: &mut Option<ObservationRow>,
                        rows: &mut Vec<CurrentObservation>|
         -> Result<bool, QueryError> {
            if let Some(row) = current.take().filter(|row| matches(row)) {
                let row = resolver.resolve(row)?;
                bytes += record_bytes(&[
                    row.key.origin.len(),
                    row.observation.encoded_len(),
                    row.rules.as_ref().map_or(0, Message::encoded_len),
                ]);
                rows.push(row);
            }
            Ok(rows.len() >= limit || bytes >= PAGE_BYTES)
        };
        for row in store.observation_rows(origin, after_here) {
            let row = row?;
            if group_key.as_ref() != Some(&row.key) {
                if take(&mut current, &mut rows)? {
                    return Ok(full_page(rows));
                }
                if let Some(key) = group_key.take() {
                    read_whole = Some(key);
                }
                if scanned >= budget {
                    return Ok(ObservationPage {
                        rows,
                        next: read_whole.as_ref().map(encode_token),
                    });
                }
                group_key = Some(row.key.clone());
            }
            scanned += 1;
            // A cell of a publish group counts only once every part is held.
            let held = durable.seq(&row.key.origin);
            if row.seq > held {
                continue;
            }
            // A group the feed went on past without completing it is
            // never answered either.
            let never = row.group_end == NEVER_QUERYABLE
                || (row.group_end != 0 && {
                    let group = (row.key.origin.clone(), row.group_end);
                    let parts = match broken_groups.get(&group) {
                        Some(parts) => parts,
                        None => {
                            let parts = store.broken_parts(&group.0, group.1)?;
                            broken_groups.entry(group).or_insert(parts)
                        }
                    };
                    parts
                        .iter()
                        .any(|(low, high)| (*low..=*high).contains(&row.seq))
                });
            // A cell never answered still supersedes the key's earlier
            // values: answering one of them as current would be wrong.
            let answerable = row.group_end <= held && !never;
            if (answerable || never) && !durable.retracted(store, &row.key.origin, row.seq)? {
                current = answerable.then_some(row);
            }
        }
        if take(&mut current, &mut rows)? {
            return Ok(full_page(rows));
        }
        if let Some(key) = group_key {
            read_whole = Some(key);
        }
    }
    Ok(ObservationPage { rows, next: None })
}

/// Offer filter. Empty lists do not filter.
#[derive(Debug, Clone, Default)]
pub struct OfferFilter {
    /// Areas.
    pub areas: Vec<FunctionalArea>,
    /// Categories.
    pub categories: Vec<String>,
    /// Origins.
    pub origins: Vec<String>,
    /// Also inactive offers.
    pub include_inactive: bool,
}

/// An offer's latest version and its state.
#[derive(Debug, Clone)]
pub struct OfferState {
    /// Latest version.
    pub version: OfferRow,
    /// Active by the reader's clock.
    pub active: bool,
    /// Responses held for the offer, retracted ones left out; at most
    /// [`MAX_RESPONSES`].
    pub responses: Vec<ResponseRow>,
    /// Whether responses were left unread: past [`MAX_RESPONSES`] or
    /// [`RESPONSE_BYTES`], or past [`SCAN_BUDGET`] read (retracted ones
    /// among them).
    pub more_responses: bool,
    /// About what the record takes in an answer.
    pub bytes: usize,
}

/// A page of offers.
#[derive(Debug, Clone)]
pub struct OfferPage {
    /// Offers, by origin and offer id.
    pub offers: Vec<OfferState>,
    /// Token for the next page.
    pub next: Option<String>,
}

fn encode_offer_token(origin: &str, offer_id: &str) -> String {
    hex(format!("{origin}\0{offer_id}").as_bytes())
}

fn decode_offer_token(token: &str) -> Result<(String, String), QueryError> {
    let invalid = || QueryError::Invalid("page_token: not a token this node issued".into());
    let text = String::from_utf8(unhex(token).map_err(|_| invalid())?).map_err(|_| invalid())?;
    let (origin, offer_id) = text.split_once('\0').ok_or_else(invalid)?;
    if offer_id.contains('\0') {
        return Err(invalid());
    }
    Ok((origin.into(), offer_id.into()))
}

/// Offers matching `filter`, by origin and offer id, one page after
/// `page_token`, each with its responses not retracted. Active means: the
/// latest version, not withdrawn, not retracted, and `now` inside
/// `[valid_from, valid_until)`. An offer whose latest version cannot be
/// answered is left out. A page ends when it holds `page_size` offers, lists
/// [`MAX_RESPONSES`] responses, holds [`PAGE_BYTES`], or has read
/// [`SCAN_BUDGET`] offer versions;
/// it may hold fewer offers than asked, even none, and still have a token.
pub fn offers(
    store: &dyn Store,
    durable: Durable<'_>,
    filter: &OfferFilter,
    now_unix: i64,
    page_size: usize,
    page_token: Option<&str>,
) -> Result<OfferPage, QueryError> {
    offers_within(
        store,
        durable,
        filter,
        now_unix,
        page_size,
        page_token,
        SCAN_BUDGET,
    )
}

fn offers_within(
    store: &dyn Store,
    durable: Durable<'_>,
    filter: &OfferFilter,
    now_unix: i64,
    page_size: usize,
    page_token: Option<&str>,
    budget: usize,
) -> Result<OfferPage, QueryError> {
    let limit = page_limit(page_size);
    let after = page_token
        .filter(|t| !t.is_empty())
        .map(decode_offer_token)
        .transpose()?;
    let areas: HashSet<i32> = filter.areas.iter().map(|a| *a as i32).collect();
    let categories: HashSet<&str> = filter.categories.iter().map(String::as_str).collect();
    let origins: HashSet<&str> = filter.origins.iter().map(String::as_str).collect();
    let wanted = |version: &OfferRow| {
        let offer = &version.offer;
        // A latest version this build cannot read leaves its offer out: an
        // older version is no longer what the offer says.
        version.answerable
            && (areas.is_empty() || areas.contains(&offer.area))
            && (categories.is_empty() || categories.contains(offer.category.as_str()))
            && (origins.is_empty() || origins.contains(version.origin.as_str()))
    };
    let mut page = OfferPage {
        offers: Vec::new(),
        next: None,
    };
    let (mut listed, mut bytes, mut scanned) = (0, 0, 0);
    let mut latest: Option<OfferRow> = None;
    let mut versions = store.offer_versions(after.as_ref().map(|(o, i)| (o.as_str(), i.as_str())));
    loop {
        let row = versions.next().transpose()?;
        if row
            .as_ref()
            .is_some_and(|row| !durable.holds(&row.origin, row.seq))
        {
            scanned += 1;
            continue;
        }
        if let (Some(last), Some(row)) = (latest.as_mut(), row.as_ref()) {
            if last.origin == row.origin && last.offer.offer_id == row.offer.offer_id {
                if row.seq > last.seq {
                    *last = row.clone();
                }
                scanned += 1;
                continue;
            }
        }
        // The versions of `latest` are read whole.
        if let Some(version) = latest.take() {
            page.next = Some(encode_offer_token(&version.origin, &version.offer.offer_id));
            if wanted(&version) {
                let state = offer_state(store, durable, version, now_unix, filter, &mut scanned)?;
                if let Some(state) = state {
                    listed += state.responses.len();
                    bytes += state.bytes;
                    page.offers.push(state);
                }
            }
        }
        let Some(row) = row else {
            page.next = None;
            return Ok(page);
        };
        if page.offers.len() >= limit
            || listed >= MAX_RESPONSES
            || bytes >= PAGE_BYTES
            || scanned >= budget
        {
            return Ok(page);
        }
        scanned += 1;
        latest = Some(row);
    }
}

/// The state of an offer's latest version; none when it is inactive and
/// inactive offers are not asked for. It reads at most [`SCAN_BUDGET`]
/// responses, counted in `scanned` (so the page ends after it when they
/// use up the page's budget).
fn offer_state(
    store: &dyn Store,
    durable: Durable<'_>,
    version: OfferRow,
    now_unix: i64,
    filter: &OfferFilter,
    scanned: &mut usize,
) -> Result<Option<OfferState>, QueryError> {
    let offer = &version.offer;
    let active = !store
        .withdrawal(&version.origin, &offer.offer_id)?
        .is_some_and(|seq| durable.holds(&version.origin, seq))
        && !durable.retracted(store, &version.origin, version.seq)?
        && (offer.valid_from_unix..offer.valid_until_unix).contains(&now_unix);
    if !active && !filter.include_inactive {
        return Ok(None);
    }
    // A retraction covers the whole entry (rule 3), so a retracted
    // response is no longer an answer to the offer.
    let mut responses = Vec::new();
    let mut more_responses = false;
    let mut response_bytes = 0;
    for (read, response) in store
        .responses(&version.origin, &offer.offer_id)
        .enumerate()
    {
        let response = response?;
        if read == SCAN_BUDGET {
            more_responses = true;
            break;
        }
        *scanned += 1;
        if !durable.holds(&response.responder, response.seq)
            || durable.retracted(store, &response.responder, response.seq)?
        {
            continue;
        }
        let size = record_bytes(&[response.responder.len(), response.response.encoded_len()]);
        if responses.len() == MAX_RESPONSES || response_bytes + size > RESPONSE_BYTES {
            more_responses = true;
            break;
        }
        response_bytes += size;
        responses.push(response);
    }
    Ok(Some(OfferState {
        bytes: record_bytes(&[
            version.origin.len(),
            32,
            offer.encoded_len(),
            response_bytes,
        ]),
        version,
        active,
        responses,
        more_responses,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        core::feed::{Entry, GENESIS_PREV_HASH},
        store::{tests::commit_of, SledStore},
    };
    use civex_proto::v1::PublishGroup;

    /// A cell of city-a's table for 2025.
    fn observation(indicator: &str, value: f64) -> Observation {
        Observation {
            indicator: indicator.into(),
            catalog_edition: "local".into(),
            area: 2,
            ref_area: "city-a".into(),
            period: "2025".into(),
            value: Some(value),
            ..Default::default()
        }
    }

    fn part(
        key: &ed25519_dalek::SigningKey,
        prev: Option<&Entry>,
        part: u32,
        indicator: &str,
    ) -> Entry {
        let body = EntryBody {
            origin: "city-a".into(),
            feed_id: vec![1; 16],
            seq: prev.map_or(1, |e| e.body.seq + 1),
            prev_hash: prev.map_or(GENESIS_PREV_HASH, |e| e.hash).to_vec(),
            time_unix_micros: 1,
            idempotency_key: vec![9; 16],
            payload: Some(Payload::Indicators(IndicatorBatch {
                observations: vec![observation(indicator, 1.0)],
                rules: Vec::new(),
                privacy: Vec::new(),
                group: Some(PublishGroup {
                    id: vec![9; 16],
                    part,
                    count: 2,
                }),
            })),
        };
        Entry::sign(key, body).unwrap()
    }

    /// Commits consecutive entries of one origin, with their index records.
    fn commit(store: &SledStore, entries: &[Entry]) {
        store.commit(&commit_of(entries)).unwrap();
    }

    /// Every head the store holds, as durable.
    fn all_durable(store: &dyn Store) -> BTreeMap<String, Head> {
        store.heads().unwrap().into_iter().collect()
    }

    // The queries over everything the store holds (tests of what is
    // durable pass the heads themselves).
    fn observations(
        store: &dyn Store,
        filter: &ObservationFilter,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<ObservationPage, QueryError> {
        observations_within(store, filter, page_size, page_token, SCAN_BUDGET)
    }

    fn observations_within(
        store: &dyn Store,
        filter: &ObservationFilter,
        page_size: usize,
        page_token: Option<&str>,
        budget: usize,
    ) -> Result<ObservationPage, QueryError> {
        let durable = all_durable(store);
        super::observations_within(
            store,
            Durable(&durable),
            filter,
            page_size,
            page_token,
            budget,
        )
    }

    fn offers(
        store: &dyn Store,
        filter: &OfferFilter,
        now_unix: i64,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<OfferPage, QueryError> {
        offers_within(store, filter, now_unix, page_size, page_token, SCAN_BUDGET)
    }

    fn offers_within(
        store: &dyn Store,
        filter: &OfferFilter,
        now_unix: i64,
        page_size: usize,
        page_token: Option<&str>,
        budget: usize,
    ) -> Result<OfferPage, QueryError> {
        let durable = all_durable(store);
        let durable = Durable(&durable);
        super::offers_within(
            store, durable, filter, now_unix, page_size, page_token, budget,
        )
    }

    /// A feed may retract one entry twice; the first retraction counts, so
    /// a second one not yet durable does not bring the cell back. Found
    /// by review.
    #[test]
    fn an_entrys_first_retraction_is_the_one_that_counts() {
        use civex_proto::v1::Retraction;
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 1 << 22).unwrap();
        let key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
        let cell = Payload::Indicators(IndicatorBatch {
            observations: vec![observation("a", 1.0)],
            ..Default::default()
        });
        let first = signed(&key, "city-a", None, cell);
        let retraction = Payload::Retraction(Retraction {
            feed_id: vec![1; 16],
            seq: 1,
            entry_hash: first.hash.to_vec(),
            reason: String::new(),
        });
        let once = signed(&key, "city-a", Some(&first), retraction.clone());
        let twice = signed(&key, "city-a", Some(&once), retraction);
        commit(&store, &[first, once.clone(), twice]);
        let mut durable = all_durable(&store);
        let mut at_two = durable["city-a"];
        at_two.tip = once.tip();
        durable.insert("city-a".into(), at_two);
        let filter = ObservationFilter::default();
        let page = super::observations(&store, Durable(&durable), &filter, 0, None).unwrap();
        assert!(page.rows.is_empty(), "{:?}", page.rows);
    }

    /// sled shows a commit before it is synced, and one whose sync failed
    /// until the node restarts: answers hold only what is durable. Found
    /// by review.
    #[test]
    fn answers_hold_only_durable_entries() {
        use civex_proto::v1::{OfferWithdrawal, Retraction, ServiceOffer};
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 1 << 22).unwrap();
        let key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
        let cell = |indicator: &str, value: f64| {
            Payload::Indicators(IndicatorBatch {
                observations: vec![observation(indicator, value)],
                ..Default::default()
            })
        };
        let offer = Payload::Offer(ServiceOffer {
            offer_id: "o1".into(),
            title: "t".into(),
            area: 2,
            category: "c".into(),
            valid_from_unix: 0,
            valid_until_unix: i64::MAX,
            contact_role: "r".into(),
            ..Default::default()
        });
        // Durable: "a" = 1 and an offer (seqs 1-2). Not: "a" = 2, "b" = 3,
        // the retraction of seq 1 and the offer's withdrawal (seqs 3-6).
        let mut entries: Vec<Entry> = Vec::new();
        for payload in [
            cell("a", 1.0),
            offer,
            cell("a", 2.0),
            cell("b", 3.0),
            Payload::Retraction(Retraction {
                feed_id: vec![1; 16],
                seq: 1,
                ..Default::default()
            }),
            Payload::Withdrawal(OfferWithdrawal {
                offer_id: "o1".into(),
                reason: String::new(),
            }),
        ] {
            let entry = signed(&key, "city-a", entries.last(), payload);
            entries.push(entry);
        }
        // The retraction names seq 1 by its hash.
        let mut body = entries[4].body.clone();
        body.payload = Some(Payload::Retraction(Retraction {
            feed_id: vec![1; 16],
            seq: 1,
            entry_hash: entries[0].hash.to_vec(),
            reason: String::new(),
        }));
        entries[4] = Entry::sign(&key, body).unwrap();
        let mut body = entries[5].body.clone();
        body.prev_hash = entries[4].hash.to_vec();
        entries[5] = Entry::sign(&key, body).unwrap();
        commit(&store, &entries);
        let mut durable = all_durable(&store);
        let mut at_two = durable["city-a"];
        at_two.tip = entries[1].tip();
        durable.insert("city-a".into(), at_two);
        let durable = Durable(&durable);

        let filter = ObservationFilter::default();
        let page = super::observations(&store, durable, &filter, 0, None).unwrap();
        let cells: Vec<(&str, Option<f64>)> = page
            .rows
            .iter()
            .map(|r| (r.observation.indicator.as_str(), r.observation.value))
            .collect();
        assert_eq!(cells, [("a", Some(1.0))]);
        let page = super::offers(&store, durable, &OfferFilter::default(), 100, 0, None).unwrap();
        let states: Vec<(u64, bool)> = page
            .offers
            .iter()
            .map(|o| (o.version.seq, o.active))
            .collect();
        assert_eq!(states, [(2, true)]);
        // Once all of it is durable, all of it is answered ("a" = 2
        // supersedes the retracted "a" = 1).
        assert_eq!(answered(&store), ["a", "b"]);
        let page = observations(&store, &filter, 0, None).unwrap();
        assert_eq!(page.rows[0].observation.value, Some(2.0));
        let withdrawn = OfferFilter {
            include_inactive: true,
            ..Default::default()
        };
        let page = offers(&store, &withdrawn, 100, 0, None).unwrap();
        let states: Vec<(u64, bool)> = page
            .offers
            .iter()
            .map(|o| (o.version.seq, o.active))
            .collect();
        assert_eq!(states, [(2, false)]);
    }

    #[test]
    fn a_publish_group_is_queryable_only_once_complete() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 1 << 22).unwrap();
        let key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
        let first = part(&key, None, 0, "a");
        let second = part(&key, Some(&first), 1, "b");
        commit(&store, std::slice::from_ref(&first));
        let page = observations(&store, &ObservationFilter::default(), 0, None).unwrap();
        assert!(page.rows.is_empty(), "half a publish group was queryable");
        commit(&store, std::slice::from_ref(&second));
        let page = observations(&store, &ObservationFilter::default(), 0, None).unwrap();
        let names: Vec<&str> = page
            .rows
            .iter()
            .map(|r| r.observation.indicator.as_str())
            .collect();
        assert_eq!(names, ["a", "b"]);
    }

    /// Indicators of the current observations, in key order.
    fn answered(store: &SledStore) -> Vec<String> {
        let page = observations(store, &ObservationFilter::default(), 0, None).unwrap();
        assert_eq!(page.next, None);
        page.rows
            .into_iter()
            .map(|r| r.observation.indicator)
            .collect()
    }

    #[test]
    fn a_publish_group_the_feed_went_on_past_is_never_answered() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
        let plain = |prev: Option<&Entry>, indicator: &str, value: f64| {
            let batch = IndicatorBatch {
                observations: vec![observation(indicator, value)],
                ..Default::default()
            };
            signed(&key, "city-a", prev, Payload::Indicators(batch))
        };
        // "a" = 1, then part 0 of two with "a" = 2, then an entry of no
        // group: the feed is held past the group's end, but its part 1
        // never came.
        let old = plain(None, "a", 1.0);
        let half = part(&key, Some(&old), 0, "a");
        let after = plain(Some(&half), "b", 3.0);
        // In one commit, and in three with the store reopened before the
        // entry that breaks the group (what the head left open is read
        // back from the entry).
        let one = tempfile::tempdir().unwrap();
        let store = SledStore::open(one.path(), 1 << 22).unwrap();
        commit(&store, &[old.clone(), half.clone(), after.clone()]);
        assert_eq!(
            answered(&store),
            ["b"],
            "half a group, or the value it supersedes, was answered"
        );
        let three = tempfile::tempdir().unwrap();
        let store = SledStore::open(three.path(), 1 << 22).unwrap();
        commit(&store, std::slice::from_ref(&old));
        commit(&store, std::slice::from_ref(&half));
        assert_eq!(answered(&store), ["a"]);
        drop(store);
        let store = SledStore::open(three.path(), 1 << 22).unwrap();
        commit(&store, std::slice::from_ref(&after));
        assert_eq!(answered(&store), ["b"]);
        drop(store);
        let store = SledStore::open(three.path(), 1 << 22).unwrap();
        assert_eq!(answered(&store), ["b"], "the broken group was not kept");

        // Part 1 with no part 0 before it: broken, though held to its end.
        let lone = part(&key, Some(&old), 1, "c");
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 1 << 22).unwrap();
        commit(&store, &[old, lone]);
        assert_eq!(answered(&store), ["a"]);
    }

    /// A broken group and a complete one after it may end at the same seq:
    /// only the broken one's cells are left out (found by review).
    #[test]
    fn a_complete_group_ending_where_a_broken_one_would_is_answered() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
        let grouped = |prev: Option<&Entry>, indicator: &str, id: u8, part: u32, count: u32| {
            let batch = IndicatorBatch {
                observations: vec![observation(indicator, 1.0)],
                group: Some(PublishGroup {
                    id: vec![id; 16],
                    part,
                    count,
                }),
                ..Default::default()
            };
            signed(&key, "city-a", prev, Payload::Indicators(batch))
        };
        // Seq 1: part 0 of group A (3 parts, ending at 3), broken by seq 2.
        // Seqs 2 and 3: group B, whole, ending at 3 too.
        let a0 = grouped(None, "a", 1, 0, 3);
        let b0 = grouped(Some(&a0), "b", 2, 0, 2);
        let b1 = grouped(Some(&b0), "c", 2, 1, 2);
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 1 << 22).unwrap();
        commit(&store, &[a0, b0, b1]);
        assert_eq!(answered(&store), ["b", "c"]);
    }

    #[test]
    fn tokens_round_trip_and_garbage_is_refused() {
        let key = ObservationKey {
            origin: "city-a".into(),
            indicator: "x".into(),
            catalog_edition: "local".into(),
            ref_area: "city-a".into(),
            period: "2025".into(),
            breakdown: String::new(),
        };
        assert_eq!(decode_token(&encode_token(&key)).unwrap(), key);
        assert!(decode_token("zz").is_err());
        assert!(decode_token(&hex(b"a\0b")).is_err());
    }

    fn signed(
        key: &ed25519_dalek::SigningKey,
        origin: &str,
        prev: Option<&Entry>,
        payload: Payload,
    ) -> Entry {
        let seq = prev.map_or(1, |e| e.body.seq + 1);
        let body = EntryBody {
            origin: origin.into(),
            feed_id: vec![1; 16],
            seq,
            prev_hash: prev.map_or(GENESIS_PREV_HASH, |e| e.hash).to_vec(),
            time_unix_micros: 1,
            idempotency_key: vec![seq as u8; 16],
            payload: Some(payload),
        };
        Entry::sign(key, body).unwrap()
    }

    #[test]
    fn a_retracted_response_is_left_out_of_its_offer() {
        use civex_proto::v1::{OfferResponse, Retraction, ServiceOffer};
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 1 << 22).unwrap();
        let a = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
        let b = ed25519_dalek::SigningKey::from_bytes(&[6; 32]);
        let offer = signed(
            &a,
            "city-a",
            None,
            Payload::Offer(ServiceOffer {
                offer_id: "o1".into(),
                title: "t".into(),
                area: 2,
                category: "c".into(),
                valid_from_unix: 0,
                valid_until_unix: i64::MAX,
                contact_role: "r".into(),
                ..Default::default()
            }),
        );
        commit(&store, std::slice::from_ref(&offer));
        let response = |prev: Option<&Entry>, message: &str| {
            signed(
                &b,
                "city-b",
                prev,
                Payload::Response(OfferResponse {
                    offer_origin: "city-a".into(),
                    offer_id: "o1".into(),
                    offer_version_hash: offer.hash.to_vec(),
                    kind: 1,
                    message: message.into(),
                }),
            )
        };
        let withdrawn = response(None, "yes");
        let kept = response(Some(&withdrawn), "still yes");
        let retraction = signed(
            &b,
            "city-b",
            Some(&kept),
            Payload::Retraction(Retraction {
                feed_id: vec![1; 16],
                seq: 1,
                entry_hash: withdrawn.hash.to_vec(),
                reason: String::new(),
            }),
        );
        commit(&store, &[withdrawn, kept, retraction]);
        let found = offers(&store, &OfferFilter::default(), 100, 0, None)
            .unwrap()
            .offers;
        assert_eq!(found.len(), 1);
        let answered: Vec<(u64, &str)> = found[0]
            .responses
            .iter()
            .map(|r| (r.seq, r.response.message.as_str()))
            .collect();
        assert_eq!(
            answered,
            [(2, "still yes")],
            "a retracted response is answered"
        );
    }

    #[test]
    fn a_latest_cell_that_cannot_be_answered_hides_the_value_it_supersedes() {
        use crate::core::feed::tests::signed_with_extra;
        use civex_proto::v1::Retraction;
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 1 << 22).unwrap();
        let key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
        let cell = |value: f64| {
            Payload::Indicators(IndicatorBatch {
                observations: vec![observation("a", value)],
                ..Default::default()
            })
        };
        let first = signed(&key, "city-a", None, cell(1.0));
        // The same key again, as a newer build writes it: field 99 of the
        // body is one this build does not know.
        let newer = signed_with_extra(
            &key,
            EntryBody {
                origin: "city-a".into(),
                feed_id: vec![1; 16],
                seq: 2,
                prev_hash: first.hash.to_vec(),
                time_unix_micros: 1,
                idempotency_key: vec![2; 16],
                payload: Some(cell(2.0)),
            },
            &[0x98, 0x06, 0x01],
        );
        let values = |store: &SledStore| -> Vec<Option<f64>> {
            observations(store, &ObservationFilter::default(), 0, None)
                .unwrap()
                .rows
                .iter()
                .map(|r| r.observation.value)
                .collect()
        };
        commit(&store, std::slice::from_ref(&first));
        assert_eq!(values(&store), [Some(1.0)]);
        commit(&store, std::slice::from_ref(&newer));
        assert!(
            values(&store).is_empty(),
            "a superseded value was answered as current"
        );
        // Once the newer entry is retracted, the first is current again.
        let retraction = signed(
            &key,
            "city-a",
            Some(&newer),
            Payload::Retraction(Retraction {
                feed_id: vec![1; 16],
                seq: 2,
                entry_hash: newer.hash.to_vec(),
                reason: String::new(),
            }),
        );
        commit(&store, &[retraction]);
        assert_eq!(values(&store), [Some(1.0)]);
    }

    fn cell(indicator: &str) -> Payload {
        Payload::Indicators(IndicatorBatch {
            observations: vec![observation(indicator, 1.0)],
            ..Default::default()
        })
    }

    /// Entries of `origin`, one per payload, chained from genesis.
    fn chain(key: &ed25519_dalek::SigningKey, origin: &str, payloads: Vec<Payload>) -> Vec<Entry> {
        let mut entries: Vec<Entry> = Vec::new();
        for payload in payloads {
            let entry = signed(key, origin, entries.last(), payload);
            entries.push(entry);
        }
        entries
    }

    /// Every page of `filter` read with `budget`: (indicators, page count,
    /// pages that came back empty with a token).
    fn read_all(
        store: &SledStore,
        filter: &ObservationFilter,
        size: usize,
        budget: usize,
    ) -> (Vec<String>, usize, usize) {
        let (mut names, mut pages, mut empty) = (Vec::new(), 0, 0);
        let mut token: Option<String> = None;
        loop {
            let page = observations_within(store, filter, size, token.as_deref(), budget).unwrap();
            pages += 1;
            if page.rows.is_empty() && page.next.is_some() {
                empty += 1;
            }
            names.extend(
                page.rows
                    .into_iter()
                    .map(|r| format!("{}/{}", r.key.origin, r.observation.indicator)),
            );
            match page.next {
                Some(next) => token = Some(next),
                None => return (names, pages, empty),
            }
            assert!(pages < 100, "paging does not end");
        }
    }

    #[test]
    fn a_page_ends_at_its_scan_budget_and_the_next_goes_on_from_there() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 1 << 22).unwrap();
        let key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
        for origin in ["city-a", "city-b"] {
            let payloads = (0..7).map(|i| cell(&format!("i{i}"))).collect();
            commit(&store, &chain(&key, origin, payloads));
        }
        let wanted = ObservationFilter {
            indicators: vec!["i6".into(), "i0".into()],
            ..Default::default()
        };
        let whole = read_all(&store, &wanted, 2, usize::MAX);
        assert_eq!(
            whole.0,
            ["city-a/i0", "city-a/i6", "city-b/i0", "city-b/i6"]
        );
        // Two full pages, then an empty last one.
        assert_eq!((whole.1, whole.2), (3, 0));
        // Three rows a page: pages end early, some empty, and together
        // they answer the same rows once each.
        let budgeted = read_all(&store, &wanted, 2, 3);
        assert_eq!(budgeted.0, whole.0);
        assert!(budgeted.2 >= 2, "no page ended at its budget: {budgeted:?}");
        // The same over an origin list, cut at the boundary between origins.
        let listed = ObservationFilter {
            origins: vec!["city-b".into(), "city-a".into()],
            ..wanted
        };
        let cut = read_all(&store, &listed, 100, 7);
        assert_eq!((cut.0, cut.1), (whole.0.clone(), 2));
        let too_many = ObservationFilter {
            origins: (0..=MAX_PAGE).map(|i| format!("city-{i}")).collect(),
            ..Default::default()
        };
        let err = observations(&store, &too_many, 0, None)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("origins: 1001 named"), "{err}");
        let all = read_all(&store, &ObservationFilter::default(), 2, 1).0;
        assert_eq!(all.len(), 14);
    }

    fn offer(id: &str, area: i32) -> Payload {
        Payload::Offer(civex_proto::v1::ServiceOffer {
            offer_id: id.into(),
            title: "t".into(),
            area,
            category: "c".into(),
            valid_from_unix: 0,
            valid_until_unix: i64::MAX,
            contact_role: "r".into(),
            ..Default::default()
        })
    }

    #[test]
    fn offers_come_in_pages_by_origin_and_offer_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 1 << 22).unwrap();
        let key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
        // o2 has two versions; the area filter below wants o3 of each origin.
        for origin in ["city-b", "city-a"] {
            let payloads = vec![
                offer("o1", 2),
                offer("o2", 2),
                offer("o2", 2),
                offer("o3", 3),
            ];
            commit(&store, &chain(&key, origin, payloads));
        }
        let read = |filter: &OfferFilter, size: usize, budget: usize| {
            let (mut found, mut pages) = (Vec::new(), 0);
            let mut token: Option<String> = None;
            loop {
                let page =
                    offers_within(&store, filter, 100, size, token.as_deref(), budget).unwrap();
                pages += 1;
                found.extend(page.offers.iter().map(|o| {
                    format!(
                        "{}/{}@{}",
                        o.version.origin, o.version.offer.offer_id, o.version.seq
                    )
                }));
                match page.next {
                    Some(next) => token = Some(next),
                    None => return (found, pages),
                }
                assert!(pages < 100, "paging does not end");
            }
        };
        let all = OfferFilter::default();
        let whole = read(&all, 0, usize::MAX);
        assert_eq!(
            whole,
            (
                vec![
                    "city-a/o1@1".to_owned(),
                    "city-a/o2@3".into(),
                    "city-a/o3@4".into(),
                    "city-b/o1@1".into(),
                    "city-b/o2@3".into(),
                    "city-b/o3@4".into(),
                ],
                1
            )
        );
        assert_eq!(read(&all, 1, usize::MAX), (whole.0.clone(), 6));
        let third = OfferFilter {
            areas: vec![FunctionalArea::try_from(3).unwrap()],
            ..Default::default()
        };
        let (found, pages) = read(&third, 0, 2);
        assert_eq!(found, ["city-a/o3@4", "city-b/o3@4"]);
        assert!(pages >= 3, "no page ended at its budget");
        assert!(offers(&store, &all, 100, 0, Some("zz")).is_err());
        assert!(offers(&store, &all, 100, 0, Some(&hex(b"city-a"))).is_err());
    }

    /// A response of city-b to offer o1 of city-a, version `version`.
    fn response_to(version: &Entry, message: String) -> Payload {
        Payload::Response(civex_proto::v1::OfferResponse {
            offer_origin: "city-a".into(),
            offer_id: "o1".into(),
            offer_version_hash: version.hash.to_vec(),
            kind: 1,
            message,
        })
    }

    /// A store holding city-a's offers o1 and o2.
    fn two_offers() -> (tempfile::TempDir, SledStore, Vec<Entry>) {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 1 << 22).unwrap();
        let a = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
        let offers_of_a = chain(&a, "city-a", vec![offer("o1", 2), offer("o2", 2)]);
        commit(&store, &offers_of_a);
        (dir, store, offers_of_a)
    }

    #[test]
    fn an_offer_lists_at_most_max_responses_and_ends_its_page() {
        let (_dir, store, offers_of_a) = two_offers();
        let b = ed25519_dalek::SigningKey::from_bytes(&[6; 32]);
        let responses = (0..=MAX_RESPONSES)
            .map(|i| response_to(&offers_of_a[0], format!("{i}")))
            .collect();
        commit(&store, &chain(&b, "city-b", responses));
        let page = offers(&store, &OfferFilter::default(), 100, 0, None).unwrap();
        assert_eq!(
            page.offers.len(),
            1,
            "the page did not end after the responses"
        );
        assert_eq!(page.offers[0].responses.len(), MAX_RESPONSES);
        assert!(page.offers[0].more_responses);
        let next = offers(
            &store,
            &OfferFilter::default(),
            100,
            0,
            page.next.as_deref(),
        )
        .unwrap();
        assert_eq!(next.offers.len(), 1);
        assert_eq!(next.offers[0].version.offer.offer_id, "o2");
        assert!(!next.offers[0].more_responses && next.next.is_none());
    }

    #[test]
    fn pages_and_response_lists_end_at_their_byte_budgets() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 1 << 24).unwrap();
        let a = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
        // A peer's feed may hold cells and responses near the entry limit.
        let large = "x".repeat(50_000);
        let mut payloads: Vec<Payload> = (0..30)
            .map(|i| {
                let Payload::Indicators(mut batch) = cell(&format!("i{i:02}")) else {
                    unreachable!()
                };
                batch.observations[0].unit = large.clone();
                Payload::Indicators(batch)
            })
            .collect();
        payloads.push(offer("o1", 2));
        let entries = chain(&a, "city-a", payloads);
        commit(&store, &entries);
        let (mut read, mut token) = (0, None::<String>);
        loop {
            let page = observations(
                &store,
                &ObservationFilter::default(),
                1000,
                token.as_deref(),
            )
            .unwrap();
            let bytes: usize = page.rows.iter().map(|r| r.observation.encoded_len()).sum();
            assert!(bytes < PAGE_BYTES + 60_000, "a page of {bytes} bytes");
            assert!(page.rows.len() < 30, "one page held every large cell");
            read += page.rows.len();
            match page.next {
                Some(next) => token = Some(next),
                None => break,
            }
        }
        assert_eq!(read, 30);
        let b = ed25519_dalek::SigningKey::from_bytes(&[6; 32]);
        let responses = (0..20)
            .map(|_| response_to(&entries[30], large.clone()))
            .collect();
        commit(&store, &chain(&b, "city-b", responses));
        let page = offers(&store, &OfferFilter::default(), 100, 0, None).unwrap();
        let listed = &page.offers[0];
        assert!(listed.more_responses);
        assert!((1..20).contains(&listed.responses.len()));
        let bytes: usize = listed
            .responses
            .iter()
            .map(|r| r.response.encoded_len())
            .sum();
        assert!(bytes <= RESPONSE_BYTES);
    }

    #[test]
    fn responses_read_count_in_the_page_budget_retracted_ones_too() {
        use civex_proto::v1::Retraction;
        let (_dir, store, offers_of_a) = two_offers();
        // Six responses to o1, each retracted.
        let b = ed25519_dalek::SigningKey::from_bytes(&[6; 32]);
        let response = response_to(&offers_of_a[0], String::new());
        let mut feed = chain(&b, "city-b", vec![response; 6]);
        for seq in 1..=6 {
            let retraction = Payload::Retraction(Retraction {
                feed_id: vec![1; 16],
                seq,
                entry_hash: feed[seq as usize - 1].hash.to_vec(),
                reason: String::new(),
            });
            let next = signed(&b, "city-b", feed.last(), retraction);
            feed.push(next);
        }
        commit(&store, &feed);
        let all = OfferFilter::default();
        let first = offers_within(&store, &all, 100, 0, None, 4).unwrap();
        let ids = |page: &OfferPage| -> Vec<String> {
            page.offers
                .iter()
                .map(|o| o.version.offer.offer_id.clone())
                .collect()
        };
        assert_eq!(
            ids(&first),
            ["o1"],
            "the responses read did not end the page"
        );
        assert!(first.offers[0].responses.is_empty() && !first.offers[0].more_responses);
        let second = offers_within(&store, &all, 100, 0, first.next.as_deref(), 4).unwrap();
        assert_eq!(ids(&second), ["o2"]);
        assert!(second.next.is_none());
    }
}
