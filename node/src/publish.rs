//! Publishing into this node's own feed: validation, idempotency, chaining
//! and signing. Signing is serial by nature (each entry names the previous
//! hash), so one sequencer task owns the own feed's tip: it takes every
//! queued request at once, validates and signs them back to back, and hands
//! them to the writer as one job, without waiting for the previous job to be
//! durable. Durability is the writer's group commit.

use std::{
    cell::RefCell,
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex as StdMutex},
};

use civex_proto::v1::{
    entry_body::Payload, EntryBody, IndicatorBatch, Observation, OfferResponse, OfferWithdrawal,
    ResponseKind, Retraction, ServiceOffer,
};
use ed25519_dalek::SigningKey;
use prost::Message;
use tokio::sync::{mpsc, oneshot};

use crate::{
    core::{
        catalog::Catalog,
        feed::{key_after, Entry, FeedError, Hash, Replacement, Tip, GENESIS_PREV_HASH},
        ids::{check_origin_id, check_slug, hex, quote},
        index::ObservationKey,
        ingest::{
            prepare_batch, split_batch, EarlierVersion, FeedView, IngestContext, IngestError,
            InputRow, Noise, PreparedBatch, RowError, TableHistory, VersionCell,
        },
        policy::Policy,
        sdc::{rounding::rounding_interval, AggregationKind, NoiseSeed},
    },
    gate::PublishGate,
    keys::KeyResolver,
    store::{IdempotencyRecord, SharedStore, Store, StoreError},
    writer::{FeedEnd, Job, Prepared, WriteError, Writer},
};

/// The feed key and the file it lives in (a rotation replaces it there).
pub struct FeedKey {
    /// The key in force.
    pub signing: SigningKey,
    /// Its file.
    pub file: std::path::PathBuf,
    /// The key of seq 1 of the feed (peers pin it).
    pub genesis: ed25519_dalek::VerifyingKey,
}

/// How indicator rows are checked and protected.
pub struct IndicatorRules {
    /// Configured districts.
    pub districts: Vec<String>,
    /// The catalog.
    pub catalog: Catalog,
    /// Disclosure-control settings per indicator.
    pub policy: Policy,
    /// Secret key the noise of each publish is derived from (made at start
    /// when an indicator has noise).
    pub noise_key: Option<[u8; 32]>,
}

impl IndicatorRules {
    /// The rounding base configured for an indicator, if any.
    fn rounding_base(&self, indicator: &str, edition: &str) -> Option<f64> {
        let indicator = self.catalog.find(indicator, Some(edition)).ok()?;
        Some(self.policy.resolve(indicator).settings.rounding?.base)
    }

    fn context<'a>(&'a self, origin: &'a str) -> IngestContext<'a> {
        IngestContext {
            origin,
            districts: &self.districts,
            catalog: &self.catalog,
            policy: &self.policy,
        }
    }

    /// The noise seed of one table of one publish: a retry with the same
    /// idempotency key draws the same noise, and no one without the noise
    /// key can predict it.
    fn seed(
        &self,
        idempotency_key: &[u8; 16],
        indicator: &str,
        edition: &str,
        period: &str,
    ) -> Option<NoiseSeed> {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, self.noise_key.as_ref()?);
        let mut context = ring::hmac::Context::with_key(&key);
        context.update(b"civex/v1/noise-seed\0");
        context.update(idempotency_key);
        for part in [indicator, edition, period] {
            context.update(&(part.len() as u64).to_be_bytes());
            context.update(part.as_bytes());
        }
        let mut seed = [0u8; 32];
        seed.copy_from_slice(context.sign().as_ref());
        Some(NoiseSeed(seed))
    }
}

/// The versions of one table the own feed holds, oldest first, and the
/// publish group of the latest (a group's later parts, signed but not yet
/// durable, belong to that version too).
#[derive(Debug, Clone, Default, PartialEq)]
struct TableVersions {
    /// Shared with the ingest reading it: a publish copies none of it.
    history: Arc<TableHistory>,
    latest_group: Option<Vec<u8>>,
}

/// Which version an entry's cells belong to: one publish is one entry, or
/// the parts of one publish group.
fn version_id(seq: u64, batch: &IndicatorBatch) -> Result<u64, Vec<u8>> {
    batch.group.as_ref().map_or(Ok(seq), |g| Err(g.id.clone()))
}

/// The versions of a table the own feed holds, from the store: each
/// publish of it, superseded and retracted ones too (spec rule 2), oldest
/// first. `secret_base` is the rounding base of versions that withhold it
/// (see [`version_cell`]).
fn stored_versions(
    store: &SharedStore,
    origin: &str,
    indicator: &str,
    edition: &str,
    period: &str,
    secret_base: Option<f64>,
) -> Result<TableVersions, String> {
    let start = ObservationKey {
        origin: origin.to_owned(),
        indicator: indicator.to_owned(),
        catalog_edition: edition.to_owned(),
        ref_area: String::new(),
        period: String::new(),
        breakdown: String::new(),
    };
    let mut cells: Vec<(ObservationKey, u64, u32)> = Vec::new();
    for row in store.observation_rows(Some(origin), Some(&start)) {
        let row = row.map_err(|e| e.to_string())?;
        if row.key.indicator != indicator || row.key.catalog_edition != edition {
            break;
        }
        if row.key.period != period {
            continue;
        }
        cells.push((row.key, row.seq, row.position));
    }
    // Entries in feed order, so versions come oldest first.
    cells.sort_by_key(|&(_, seq, position)| (seq, position));
    // Each entry decoded once, however many of its cells it holds.
    let mut batches: HashMap<u64, IndicatorBatch> = HashMap::new();
    let mut history = TableHistory::default();
    let mut latest: Option<Result<u64, Vec<u8>>> = None;
    for (key, seq, position) in cells {
        let batch = match batches.entry(seq) {
            std::collections::hash_map::Entry::Occupied(held) => held.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => {
                let signed = store
                    .entries(origin, seq, 1, usize::MAX)
                    .map_err(|e| e.to_string())?
                    .into_iter()
                    .next()
                    .ok_or_else(|| format!("entry {seq} of the own feed is indexed but missing"))?;
                let body = EntryBody::decode(signed.body.as_ref())
                    .map_err(|_| format!("entry {seq} of the own feed does not decode"))?;
                let Some(Payload::Indicators(batch)) = body.payload else {
                    return Err(format!(
                        "entry {seq} of the own feed is not an indicator batch"
                    ));
                };
                slot.insert(batch)
            }
        };
        let observation = batch
            .observations
            .get(position as usize)
            .ok_or_else(|| format!("entry {seq} of the own feed has no cell {position}"))?;
        debug_assert_eq!(observation.ref_area, key.ref_area);
        let cell = version_cell(observation, batch, secret_base)
            .map_err(|m| format!("entry {seq} of the own feed: {m}"))?;
        let id = version_id(seq, batch);
        match latest.as_ref() == Some(&id) {
            true => history.extend_latest(vec![cell]),
            false => history.push(EarlierVersion { cells: vec![cell] }),
        }
        latest = Some(id);
    }
    Ok(TableVersions {
        history: Arc::new(history),
        latest_group: latest.and_then(Result::err),
    })
}

/// What a published cell tells an attacker. A rounding base withheld from
/// the entry is one an attacker can guess (bases are small whole numbers),
/// so the value is known to its interval under `secret_base`, the base
/// configured for the indicator, as if it were public; with none
/// configured, what the version tells cannot be modelled, and reading the
/// table fails (the publish is refused) rather than take it as telling
/// nothing.
fn version_cell(
    observation: &Observation,
    batch: &IndicatorBatch,
    secret_base: Option<f64>,
) -> Result<VersionCell, String> {
    let rules = batch.rules.get(observation.rules as usize);
    let noised = rules.is_some_and(|r| {
        r.parameters.iter().any(|p| p.rule == "noise")
            || r.withheld.iter().any(|w| w.starts_with("noise."))
    });
    let withheld = rules.is_some_and(|r| r.withheld.iter().any(|w| w == "rounding.base"));
    let base = match (withheld, secret_base) {
        (true, Some(base)) => base,
        (true, None) if observation.value.is_some() && !noised => {
            return Err(format!(
                "{} {} was published rounded to a withheld base, and no rounding_base is configured for it: set the base it was rounded to, so a revision can be audited",
                observation.indicator, observation.period
            ))
        }
        _ => rules
            .and_then(|r| {
                r.parameters
                    .iter()
                    .find(|p| p.rule == "rounding" && p.name == "base")
            })
            .and_then(|p| p.value.parse::<f64>().ok())
            .unwrap_or(0.0),
    };
    // A count's true value is a whole number (ingest refuses others): with
    // a whole base its interval is the exact integer range.
    let integer = rules.is_some_and(|r| r.aggregation == AggregationKind::Count.name())
        && base.fract() == 0.0;
    Ok(VersionCell {
        ref_area: observation.ref_area.clone(),
        breakdown: observation.breakdown.clone(),
        suppressed: observation.value.is_none(),
        known: observation.value.filter(|_| !noised).map(|v| {
            if base > 0.0 {
                rounding_interval(v, base, integer)
            } else {
                (v, v)
            }
        }),
    })
}

/// Adds what `batch` publishes of one table to its versions: a version of
/// its own, or the next part of the latest one's publish group.
fn note_version(
    table: &mut TableVersions,
    batch: &IndicatorBatch,
    indicator: &str,
    edition: &str,
    period: &str,
    secret_base: Option<f64>,
) -> Result<(), String> {
    let cells: Vec<VersionCell> = batch
        .observations
        .iter()
        .filter(|o| o.indicator == indicator && o.catalog_edition == edition && o.period == period)
        .map(|o| version_cell(o, batch, secret_base))
        .collect::<Result<_, _>>()?;
    if cells.is_empty() {
        return Ok(());
    }
    let group = batch.group.as_ref().map(|g| g.id.clone());
    // Not shared once the ingest that read it is done: nothing is copied.
    let history = Arc::make_mut(&mut table.history);
    match group.is_some() && group == table.latest_group {
        true => history.extend_latest(cells),
        false => history.push(EarlierVersion { cells }),
    }
    table.latest_group = group;
    Ok(())
}

/// Tables whose cells the sequencer keeps between publishes.
const MAX_CACHED_TABLES: usize = 4096;

/// Table key: indicator, edition, period.
type TableKey = (String, String, String);

/// The own feed as an ingest sees it: durable entries, and the payloads
/// signed but not yet durable.
struct OwnView<'a> {
    origin: &'a str,
    store: &'a SharedStore,
    /// The catalog and policy: the rounding base of each indicator.
    rules: &'a IndicatorRules,
    /// Payloads signed but perhaps not durable yet, by seq.
    pending: &'a [(u64, Payload)],
    /// Versions per table, kept by the sequencer between publishes.
    cache: Option<&'a RefCell<HashMap<TableKey, TableVersions>>>,
}

impl FeedView for OwnView<'_> {
    fn earlier_versions(
        &mut self,
        indicator: &str,
        edition: &str,
        period: &str,
    ) -> Result<Arc<TableHistory>, String> {
        let key = (indicator.to_owned(), edition.to_owned(), period.to_owned());
        if let Some(table) = self.cache.and_then(|c| c.borrow().get(&key).cloned()) {
            return Ok(table.history);
        }
        let secret_base = self.rules.rounding_base(indicator, edition);
        let mut table = stored_versions(
            self.store,
            self.origin,
            indicator,
            edition,
            period,
            secret_base,
        )?;
        for (_, payload) in self.pending {
            if let Payload::Indicators(batch) = payload {
                note_version(&mut table, batch, indicator, edition, period, secret_base)?;
            }
        }
        let history = table.history.clone();
        if let Some(cache) = self.cache {
            let mut cache = cache.borrow_mut();
            // Bounded: reloading a table from the store is only slower.
            if cache.len() >= MAX_CACHED_TABLES {
                cache.clear();
            }
            cache.insert(key, table);
        }
        Ok(history)
    }

    fn spent_nanos(&mut self, indicator: &str, edition: &str, period: &str) -> Result<u64, String> {
        let (stored, as_of) = self
            .store
            .privacy_spent(self.origin, indicator, edition, period)
            .map_err(|e| e.to_string())?;
        // Debits of entries after the last one the ledger includes.
        let pending: u64 = self
            .pending
            .iter()
            .filter(|(seq, _)| *seq > as_of)
            .filter_map(|(_, p)| match p {
                Payload::Indicators(batch) => Some(batch),
                _ => None,
            })
            .flat_map(|b| &b.privacy)
            .filter(|d| {
                d.indicator == indicator && d.catalog_edition == edition && d.period == period
            })
            .map(|d| d.rho_nanos)
            .sum();
        Ok(stored.saturating_add(pending))
    }
}

/// What to publish.
#[derive(Debug, Clone)]
pub enum Request {
    /// Indicator rows (with contributor counts).
    Indicators(Vec<InputRow>),
    /// An offer, new or replacing.
    Offer(ServiceOffer),
    /// Final withdrawal of an own offer.
    Withdraw {
        /// Offer id.
        offer_id: String,
        /// Why.
        reason: String,
    },
    /// An answer to another origin's offer.
    Respond {
        /// Offering origin.
        offer_origin: String,
        /// Offer id.
        offer_id: String,
        /// Version answered; `None` means the latest held.
        version: Option<Hash>,
        /// Kind.
        kind: ResponseKind,
        /// Message.
        message: String,
    },
    /// Retraction of an own entry.
    Retract {
        /// Seq retracted.
        seq: u64,
        /// Why.
        reason: String,
    },
    /// Hand the feed to a new key, made here: the rotation entry is signed
    /// by the current key, every later entry by the new one.
    RotateKey,
    /// A roster entry (this node being the federation's roster origin),
    /// checked by the caller.
    Roster(civex_proto::v1::RosterEntry),
}

impl Request {
    /// Rows it carries (1 for anything but indicators), to bound batches.
    fn rows(&self) -> usize {
        match self {
            Request::Indicators(rows) => rows.len().max(1),
            _ => 1,
        }
    }
}

/// What a publish produced, once durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// Origin.
    pub origin: String,
    /// Feed id.
    pub feed_id: [u8; 16],
    /// First seq of the publish (below `seq` for a publish group).
    pub first_seq: u64,
    /// Seq of the (last) entry.
    pub seq: u64,
    /// Entry hash.
    pub hash: Hash,
    /// Cells published with a value.
    pub published: u32,
    /// Cells suppressed.
    pub suppressed: u32,
}

/// Why a publish failed. Mapped to gRPC status codes in `service`.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The request is wrong; the message names the field.
    #[error("{0}")]
    Invalid(String),
    /// A row is wrong.
    #[error("{0}")]
    Row(#[from] RowError),
    /// Something named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The idempotency key was used for a different request.
    #[error("idempotency key {0} was already used for a different request")]
    KeyReused(String),
    /// A publish with this key is under way.
    #[error("a publish with idempotency key {0} is in progress; retry with the same key")]
    InProgress(String),
    /// Publishing is not open yet.
    #[error("{0}")]
    NotReady(String),
    /// Something failed inside the node (not the request's fault).
    #[error("{0}")]
    Internal(String),
    /// Storage failed.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The writer refused or failed.
    #[error("{0}")]
    Write(#[from] WriteError),
    /// What the node holds refuses the publish: disclosure control (privacy
    /// budget, a revision that earlier versions would reveal), or a
    /// response to an offer version this build cannot read.
    #[error("{0}")]
    Refused(String),
}

impl From<IngestError> for PublishError {
    fn from(err: IngestError) -> Self {
        match err {
            IngestError::Row(row) => PublishError::Row(row),
            IngestError::Feed(message) => PublishError::Internal(message),
        }
    }
}

/// What the feed shows of a publish: its kind and what it names (the
/// cells of an indicator batch, an offer whole, the offer a withdrawal or
/// response names, a retraction's reason). An idempotency record rebuilt
/// from the feed has it as its fingerprint, since the request itself
/// (contributor counts and all) is not in the feed: a retry of its key is
/// matched against the outline of the retried request, so the same key
/// with a request of another kind, or naming other cells or another
/// offer, fails (spec rule 4). Values are not compared: noise and
/// suppression change them on their way into the feed.
#[derive(Debug, Default)]
pub struct Outline {
    /// One hash per thing named; a set, since the feed holds a batch's
    /// cells in another order than the request, and a group's retraction
    /// repeats its reason once per part.
    parts: std::collections::BTreeSet<[u8; 32]>,
}

impl Outline {
    /// The outline of `request`.
    pub fn of_request(request: &Request) -> [u8; 32] {
        let mut outline = Self::default();
        match request {
            Request::Indicators(rows) => {
                for row in rows {
                    outline.add(
                        "cell",
                        &[&row.indicator, &row.ref_area, &row.period, &row.breakdown],
                    );
                }
            }
            Request::Offer(offer) => outline.add_offer(offer),
            Request::Withdraw { offer_id, reason } => outline.add("withdraw", &[offer_id, reason]),
            Request::Respond {
                offer_origin,
                offer_id,
                kind,
                message,
                ..
            } => outline.add_response(offer_origin, offer_id, *kind as i32, message),
            Request::Retract { reason, .. } => outline.add("retract", &[reason]),
            Request::RotateKey => outline.add("rotate-key", &[]),
            Request::Roster(_) => outline.add("roster", &[]),
        }
        outline.finish()
    }

    /// The outline of a roster entry (what the roster origin publishes for
    /// a member, or a replaced key), whatever it holds.
    pub fn of_roster() -> [u8; 32] {
        Self::of_request(&Request::Roster(Default::default()))
    }

    /// Adds what one entry of the publish holds.
    fn add_payload(&mut self, payload: Option<&Payload>) {
        match payload {
            Some(Payload::Indicators(batch)) => {
                for o in &batch.observations {
                    self.add(
                        "cell",
                        &[&o.indicator, &o.ref_area, &o.period, &o.breakdown],
                    );
                }
            }
            Some(Payload::Offer(offer)) => self.add_offer(offer),
            Some(Payload::Withdrawal(w)) => self.add("withdraw", &[&w.offer_id, &w.reason]),
            Some(Payload::Response(r)) => {
                self.add_response(&r.offer_origin, &r.offer_id, r.kind, &r.message)
            }
            Some(Payload::Retraction(r)) => self.add("retract", &[&r.reason]),
            Some(Payload::KeyRotation(_)) => self.add("rotate-key", &[]),
            Some(Payload::Roster(_)) => self.add("roster", &[]),
            // Nothing this node publishes: no request matches it.
            _ => self.add("unknown", &[]),
        }
    }

    fn add_offer(&mut self, offer: &ServiceOffer) {
        self.add("offer", &[&hex(&offer.encode_to_vec())]);
    }

    fn add_response(&mut self, origin: &str, offer_id: &str, kind: i32, message: &str) {
        self.add("respond", &[origin, offer_id, &kind.to_string(), message]);
    }

    fn add(&mut self, kind: &str, fields: &[&str]) {
        use sha2::Digest;
        let mut hasher = sha2::Sha256::new();
        hasher.update(b"civex/v1/publish-outline\0");
        for field in std::iter::once(&kind).chain(fields) {
            hasher.update((field.len() as u64).to_be_bytes());
            hasher.update(field.as_bytes());
        }
        self.parts.insert(hasher.finalize().into());
    }

    fn finish(&self) -> [u8; 32] {
        use sha2::Digest;
        let mut hasher = sha2::Sha256::new();
        hasher.update(b"civex/v1/publish-outline\0");
        for part in &self.parts {
            hasher.update(part);
        }
        hasher.finalize().into()
    }
}

/// The idempotency records of own entries learned back (from a peer, or a
/// backup), so a restored node answers retries of publishes it no longer
/// remembers. It is fed the own feed's entries in seq order, in as many
/// calls as they arrive in. Consecutive entries with one idempotency key
/// are one publish (the parts of a group, or the retractions of a group's
/// parts): its record starts at the first of them and counts the cells of
/// every part; a group's record is made at its last part.
#[derive(Debug, Default)]
pub struct Recovery {
    /// The publish being read.
    open: Option<OpenPublish>,
}

/// A publish [`Recovery`] is reading.
#[derive(Debug)]
struct OpenPublish {
    key: [u8; 16],
    first_seq: u64,
    /// The seq its next entry would have.
    next: u64,
    /// Its cells so far with a value, and without.
    published: u32,
    suppressed: u32,
    outline: Outline,
}

/// Entries of one publish read back at most (a publish is at most one
/// message, so a group has far fewer parts).
const MAX_PUBLISH_ENTRIES: u64 = 4096;

impl Recovery {
    /// A recovery that goes on after the own feed's head held in `store`:
    /// the entries of the publish that ends there are read back, so those
    /// that follow (the rest of a group a peer is still sending) count
    /// with them.
    pub fn after(store: &dyn Store, origin: &str) -> Result<Self, StoreError> {
        let mut recovery = Self::default();
        let Some(head) = store.head(origin)? else {
            return Ok(recovery);
        };
        let mut run: Vec<Entry> = Vec::new();
        let mut seq = head.tip.seq;
        while seq >= 1 && (run.len() as u64) < MAX_PUBLISH_ENTRIES {
            let Some(signed) = store.entries(origin, seq, 1, usize::MAX)?.pop() else {
                break;
            };
            let Ok(entry) = Entry::decode(signed) else {
                break;
            };
            if run
                .last()
                .is_some_and(|later| later.body.idempotency_key != entry.body.idempotency_key)
            {
                break;
            }
            run.push(entry);
            seq -= 1;
        }
        run.reverse();
        // Their records are held already.
        recovery.records(&run);
        Ok(recovery)
    }

    /// The write job of `entries`, consecutive entries of one origin learned
    /// from elsewhere, with their idempotency records if they are of the
    /// own feed (`own`).
    pub fn job(&mut self, own: bool, entries: Vec<Entry>, replacements: Vec<Replacement>) -> Job {
        let idempotency = if own {
            self.records(&entries)
        } else {
            Vec::new()
        };
        Job {
            entries: entries.into_iter().map(Prepared::new).collect(),
            idempotency,
            conflict: None,
            replacements,
            feed_end: None,
            roster_ends: Vec::new(),
        }
    }

    /// The records completed by `entries`, the next own entries in seq order.
    pub fn records(&mut self, entries: &[Entry]) -> Vec<([u8; 16], IdempotencyRecord)> {
        let mut records = Vec::new();
        for entry in entries {
            let Ok(key) = <[u8; 16]>::try_from(entry.body.idempotency_key.as_slice()) else {
                self.open = None;
                continue;
            };
            let (group, published, suppressed) = match &entry.body.payload {
                Some(Payload::Indicators(batch)) => {
                    let with_value = batch
                        .observations
                        .iter()
                        .filter(|o| o.value.is_some())
                        .count() as u32;
                    let without = batch.observations.len() as u32 - with_value;
                    (batch.group.clone(), with_value, without)
                }
                _ => (None, 0, 0),
            };
            let seq = entry.body.seq;
            let part = group.as_ref().map_or(0, |g| u64::from(g.part));
            let open = match self.open.take() {
                // The same publish goes on.
                Some(open) if open.key == key && open.next == seq => open,
                _ => OpenPublish {
                    key,
                    first_seq: seq.saturating_sub(part).max(1),
                    next: seq,
                    published: 0,
                    suppressed: 0,
                    outline: Outline::default(),
                },
            };
            let mut open = OpenPublish {
                next: seq + 1,
                published: open.published + published,
                suppressed: open.suppressed + suppressed,
                ..open
            };
            open.outline.add_payload(entry.body.payload.as_ref());
            let complete = group.is_none_or(|g| g.part.saturating_add(1) >= g.count);
            if complete {
                records.push((
                    key,
                    IdempotencyRecord {
                        fingerprint: open.outline.finish(),
                        first_seq: open.first_seq,
                        seq,
                        hash: entry.hash,
                        published: open.published,
                        suppressed: open.suppressed,
                    },
                ));
            }
            self.open = Some(open);
        }
        records
    }
}

/// The last second RFC 3339 can write (9999-12-31T23:59:59Z).
pub const LAST_RFC3339_SECOND: i64 = 253_402_300_799;

/// `unix` (seconds) as an RFC 3339 time in UTC; `None` outside 1970 to
/// [`LAST_RFC3339_SECOND`].
pub fn rfc3339(unix: i64) -> Option<String> {
    let seconds = u64::try_from(unix)
        .ok()
        .filter(|_| unix <= LAST_RFC3339_SECOND)?;
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds);
    Some(humantime::format_rfc3339_seconds(time).to_string())
}

/// Requests signed per batch at most.
const MAX_SEQUENCED: usize = 512;
/// Indicator rows signed per batch at most (bounds one commit's size).
const MAX_SEQUENCED_ROWS: usize = 50_000;
/// Largest indicator batch in one entry; larger ones become publish groups
/// (the envelope and signature fit in the rest of the 64 KiB entry).
const MAX_PART_BYTES: usize = 60_000;

/// Publishing into the own feed: the front that checks idempotency and
/// readiness, and queues requests to the sequencer.
pub struct Publisher {
    origin: String,
    rules: Arc<IndicatorRules>,
    store: SharedStore,
    writer: Writer,
    /// Restore safety: publishing opens once the own feed is caught up.
    gate: Arc<PublishGate>,
    sequencer: mpsc::Sender<Queued>,
    in_flight: Arc<StdMutex<HashSet<[u8; 16]>>>,
}

/// A request waiting for the sequencer.
struct Queued {
    key: [u8; 16],
    fingerprint: [u8; 32],
    request: Request,
    /// The member's feed end its roster entry names, checked by the writer.
    feed_end: Option<FeedEnd>,
    reply: oneshot::Sender<Result<Receipt, PublishError>>,
}

/// Own-feed state, owned by the sequencer task.
#[derive(Default)]
struct OwnFeed {
    /// Tip as signed so far; `None` until loaded from the store.
    tip: Option<Option<Tip>>,
    /// Payloads signed and queued but not yet durable, by seq: checks that
    /// look at the feed (totals and components, withdrawals, retractions)
    /// must see them, or two concurrent publishes could both pass.
    pending: Vec<(u64, Payload)>,
    /// Bumped at every reset of the tip: a failure of a job signed in an
    /// earlier epoch (chained on one that already failed) resets nothing.
    epoch: u64,
}

impl OwnFeed {
    fn pending_payloads(&self) -> impl Iterator<Item = &Payload> {
        self.pending.iter().map(|(_, p)| p)
    }
}

/// The sequencer: validates, chains and signs own-feed entries.
struct Sequencer {
    origin: String,
    key: SigningKey,
    /// The key file: a rotation installs the new key there once durable.
    key_file: std::path::PathBuf,
    /// The key of seq 1 (in force until a rotation).
    genesis: ed25519_dalek::VerifyingKey,
    /// The new key of the rotation being signed.
    next_key: Option<SigningKey>,
    /// Seq of a rotation signed but not durable yet.
    rotation_seq: Option<u64>,
    rules: Arc<IndicatorRules>,
    /// Where the roster replaced this feed's lost keys.
    keys: Arc<KeyResolver>,
    /// Versions of the tables published lately (see [`OwnView`]).
    tables: RefCell<HashMap<TableKey, TableVersions>>,
    store: SharedStore,
    writer: Writer,
    own: OwnFeed,
    /// Jobs sent to the writer whose outcome has not reached the sequencer.
    in_flight: usize,
}

/// A job's outcome as the sequencer learns it: its seqs, whether stored, and
/// the epoch it was signed in.
type Settled = (Vec<u64>, bool, u64);

/// Removes an idempotency key from the in-flight set when dropped.
struct InFlight {
    set: Arc<StdMutex<HashSet<[u8; 16]>>>,
    key: [u8; 16],
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut set) = self.set.lock() {
            set.remove(&self.key);
        }
    }
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

fn check_text(
    field: &str,
    text: &str,
    max: usize,
    required: bool,
    multiline: bool,
) -> Result<(), PublishError> {
    if required && text.trim().is_empty() {
        return Err(PublishError::Invalid(format!("{field}: is empty")));
    }
    if text.len() > max {
        return Err(PublishError::Invalid(format!(
            "{field}: longer than {max} bytes"
        )));
    }
    if text
        .chars()
        .any(|c| c.is_control() && !(multiline && (c == '\n' || c == '\t')))
    {
        return Err(PublishError::Invalid(format!(
            "{field}: holds a control character"
        )));
    }
    Ok(())
}

/// Checks an offer's fields.
pub fn check_offer(offer: &ServiceOffer) -> Result<(), PublishError> {
    check_slug(&offer.offer_id)
        .map_err(|m| PublishError::Invalid(format!("offer_id: {} {m}", quote(&offer.offer_id))))?;
    check_text("title", &offer.title, 200, true, false)?;
    check_text("description", &offer.description, 4000, false, true)?;
    if !(1..=7).contains(&offer.area) {
        return Err(PublishError::Invalid(format!(
            "area: {} is not a functional area (1-7)",
            offer.area
        )));
    }
    check_slug(&offer.category)
        .map_err(|m| PublishError::Invalid(format!("category: {} {m}", quote(&offer.category))))?;
    check_text("capacity", &offer.capacity, 200, false, false)?;
    check_text("terms", &offer.terms, 2000, false, true)?;
    check_text("region", &offer.region, 200, false, false)?;
    check_text("contact_role", &offer.contact_role, 200, true, false)?;
    if offer.valid_from_unix >= offer.valid_until_unix {
        let time = |unix: i64| rfc3339(unix).unwrap_or_else(|| format!("{unix} (Unix time)"));
        return Err(PublishError::Invalid(format!(
            "valid_until: {} is not after valid_from {}",
            time(offer.valid_until_unix),
            time(offer.valid_from_unix)
        )));
    }
    Ok(())
}

impl Publisher {
    /// A publisher for `origin`'s feed; starts its sequencer task.
    pub fn new(
        origin: String,
        key: FeedKey,
        rules: Arc<IndicatorRules>,
        keys: Arc<KeyResolver>,
        store: SharedStore,
        writer: Writer,
        gate: Arc<PublishGate>,
    ) -> Self {
        let (sequencer, queue) = mpsc::channel(4 * MAX_SEQUENCED);
        let task = Sequencer {
            origin: origin.clone(),
            key: key.signing,
            key_file: key.file,
            genesis: key.genesis,
            next_key: None,
            rotation_seq: None,
            rules: rules.clone(),
            keys,
            tables: RefCell::new(HashMap::new()),
            store: store.clone(),
            writer: writer.clone(),
            own: OwnFeed::default(),
            in_flight: 0,
        };
        tokio::spawn(task.run(queue));
        Self {
            origin,
            rules,
            store,
            writer,
            gate,
            sequencer,
            in_flight: Arc::default(),
        }
    }

    /// This node's origin.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// What a publish of `rows` would do now, publishing nothing. Entries
    /// being signed at this moment are not seen.
    pub fn preview(&self, rows: &[InputRow]) -> Result<PreparedBatch, PublishError> {
        let mut view = OwnView {
            origin: &self.origin,
            store: &self.store,
            rules: &self.rules,
            pending: &[],
            cache: None,
        };
        let context = self.rules.context(&self.origin);
        Ok(prepare_batch(&context, rows, &mut view, Noise::Preview)?)
    }

    /// Whether publishing is open.
    pub fn is_ready(&self) -> bool {
        self.gate.is_open() && !self.writer.is_stopped()
    }

    /// The receipt of an earlier publish with this idempotency key and
    /// request, once durable; `None` if the key is new.
    /// `outline` gives the request's [`Outline`], for a record rebuilt from
    /// the feed; `retracts`, the seq a retraction request names, which such
    /// a record must have retracted too (its outline holds only the reason).
    pub fn replay(
        &self,
        key: &[u8; 16],
        fingerprint: &[u8; 32],
        outline: impl FnOnce() -> [u8; 32],
        retracts: Option<u64>,
    ) -> Result<Option<Receipt>, PublishError> {
        let Some(record) = self.store.idempotency(key)? else {
            return Ok(None);
        };
        if &record.fingerprint != fingerprint {
            let rebuilt_matches = record.fingerprint == outline()
                && match retracts {
                    Some(seq) => self.retracted_in(&record, seq)?,
                    None => true,
                };
            if !rebuilt_matches {
                return Err(PublishError::KeyReused(hex(key)));
            }
        }
        // sled shows a batch before it is synced: answer only from durable state.
        let heads = self.writer.heads();
        let Some(head) = heads.get(&self.origin).filter(|h| h.tip.seq >= record.seq) else {
            if self.writer.is_stopped() {
                return Err(PublishError::Write(WriteError::Stopped));
            }
            return Err(PublishError::InProgress(hex(key)));
        };
        // The feed the entry is in (a lost key's replacement since may have
        // started another).
        let feed_id = match head.tip.seq == record.seq {
            true => head.tip.feed_id,
            false => self
                .store
                .entries(&self.origin, record.seq, 1, usize::MAX)?
                .into_iter()
                .next()
                .and_then(|signed| Entry::decode(signed).ok())
                .map_or(head.tip.feed_id, |entry| entry.feed_id()),
        };
        Ok(Some(receipt_of(&self.origin, feed_id, &record)))
    }

    /// Whether the entries of `record` retract the own entry `seq`.
    fn retracted_in(&self, record: &IdempotencyRecord, seq: u64) -> Result<bool, PublishError> {
        let count =
            usize::try_from(record.seq.saturating_sub(record.first_seq) + 1).unwrap_or(usize::MAX);
        let entries = self
            .store
            .entries(&self.origin, record.first_seq, count, usize::MAX)?;
        Ok(entries.into_iter().any(|signed| {
            matches!(
                Entry::decode(signed).map(|e| e.body.payload),
                Ok(Some(Payload::Retraction(r))) if r.seq == seq
            )
        }))
    }

    /// Publishes one request as one entry, durable when this returns.
    /// `fingerprint` identifies the request (without its key) for retries.
    pub async fn publish(
        &self,
        idempotency_key: [u8; 16],
        fingerprint: [u8; 32],
        request: Request,
    ) -> Result<Receipt, PublishError> {
        self.publish_ending(idempotency_key, fingerprint, request, None)
            .await
    }

    /// [`Self::publish`] of a roster entry that ends a member's feed at
    /// `feed_end`: refused ([`WriteError::HeadMoved`]) if this node stored
    /// more of that feed after the request was checked. Such a request is
    /// signed once every earlier job is settled and committed alone, and
    /// nothing later is signed before its outcome, so a refusal fails no
    /// other publish.
    pub async fn publish_ending(
        &self,
        idempotency_key: [u8; 16],
        fingerprint: [u8; 32],
        request: Request,
        feed_end: Option<FeedEnd>,
    ) -> Result<Receipt, PublishError> {
        self.submit_ending(idempotency_key, fingerprint, request, feed_end)
            .await?
            .receipt()
            .await
    }

    /// Checks a publish and queues it to the sequencer; the answer resolves
    /// once its entry is durable (or the publish failed). Publishes
    /// submitted one after another are signed in that order. The work goes
    /// on if the answer is dropped, but the idempotency key is busy only
    /// while the answer is held: hold it until it resolves.
    pub async fn submit(
        &self,
        idempotency_key: [u8; 16],
        fingerprint: [u8; 32],
        request: Request,
    ) -> Result<Submitted, PublishError> {
        self.submit_ending(idempotency_key, fingerprint, request, None)
            .await
    }

    /// [`Self::submit`] with the feed end of [`Self::publish_ending`].
    pub async fn submit_ending(
        &self,
        idempotency_key: [u8; 16],
        fingerprint: [u8; 32],
        request: Request,
        feed_end: Option<FeedEnd>,
    ) -> Result<Submitted, PublishError> {
        // The key is marked in flight first, so one look at the store
        // answers a repeat (also while writes are stopped) and no repeat
        // slips in between.
        let in_flight = {
            let mut set = self
                .in_flight
                .lock()
                .map_err(|_| PublishError::InProgress(hex(&idempotency_key)))?;
            if !set.insert(idempotency_key) {
                return Err(PublishError::InProgress(hex(&idempotency_key)));
            }
            InFlight {
                set: self.in_flight.clone(),
                key: idempotency_key,
            }
        };
        let retracts = match &request {
            Request::Retract { seq, .. } => Some(*seq),
            _ => None,
        };
        let outline = || Outline::of_request(&request);
        if let Some(receipt) = self.replay(&idempotency_key, &fingerprint, outline, retracts)? {
            return Ok(Submitted {
                answer: Answer::Replayed(receipt),
                _in_flight: in_flight,
            });
        }
        if self.writer.is_stopped() {
            return Err(PublishError::Write(WriteError::Stopped));
        }
        if let Some(reason) = self.gate.closed_reason() {
            return Err(PublishError::NotReady(reason));
        }
        let (reply, answer) = oneshot::channel();
        let queued = Queued {
            key: idempotency_key,
            fingerprint,
            request,
            feed_end,
            reply,
        };
        self.sequencer
            .send(queued)
            .await
            .map_err(|_| PublishError::Write(WriteError::Stopped))?;
        Ok(Submitted {
            answer: Answer::Queued(answer),
            _in_flight: in_flight,
        })
    }
}

/// A publish checked and queued ([`Publisher::submit`]).
pub struct Submitted {
    answer: Answer,
    /// Keeps the idempotency key busy until the answer is in.
    _in_flight: InFlight,
}

enum Answer {
    /// A repeat of a durable publish: its original receipt.
    Replayed(Receipt),
    /// Queued to the sequencer.
    Queued(oneshot::Receiver<Result<Receipt, PublishError>>),
}

impl Submitted {
    /// The receipt, once the entry is durable.
    pub async fn receipt(self) -> Result<Receipt, PublishError> {
        match self.answer {
            Answer::Replayed(receipt) => Ok(receipt),
            Answer::Queued(answer) => answer
                .await
                .unwrap_or(Err(PublishError::Write(WriteError::Stopped))),
        }
    }
}

fn receipt_of(origin: &str, feed_id: [u8; 16], record: &IdempotencyRecord) -> Receipt {
    Receipt {
        origin: origin.to_owned(),
        feed_id,
        first_seq: record.first_seq,
        seq: record.seq,
        hash: record.hash,
        published: record.published,
        suppressed: record.suppressed,
    }
}

impl Sequencer {
    async fn run(mut self, mut queue: mpsc::Receiver<Queued>) {
        let (settled_tx, mut settled) = mpsc::unbounded_channel::<Settled>();
        loop {
            tokio::select! {
                biased;
                Some(done) = settled.recv() => self.settled(done),
                next = queue.recv() => {
                    let Some(first) = next else { return };
                    while let Ok(done) = settled.try_recv() {
                        self.settled(done);
                    }
                    let mut rows = first.request.rows();
                    let mut batch = vec![first];
                    while batch.len() < MAX_SEQUENCED && rows < MAX_SEQUENCED_ROWS {
                        match queue.try_recv() {
                            Ok(queued) => {
                                rows += queued.request.rows();
                                batch.push(queued);
                            }
                            Err(_) => break,
                        }
                    }
                    // A request that ends a member's feed is signed alone,
                    // once every earlier job is settled (the tip is then
                    // durable, and no rotation is pending), and awaited
                    // before anything after it is signed: a refusal resets
                    // the tip with nothing chained on it.
                    while !batch.is_empty() {
                        match batch.iter().position(|q| q.feed_end.is_some()) {
                            Some(0) => {
                                let rest = batch.split_off(1);
                                while self.in_flight > 0 {
                                    let Some(done) = settled.recv().await else { break };
                                    self.settled(done);
                                }
                                self.sequence(batch, &settled_tx).await;
                                batch = rest;
                            }
                            Some(at) => {
                                let rest = batch.split_off(at);
                                self.sequence(batch, &settled_tx).await;
                                batch = rest;
                            }
                            None => {
                                self.sequence(std::mem::take(&mut batch), &settled_tx).await;
                            }
                        }
                    }
                }
            }
        }
    }

    /// The outcome of a job counted in `in_flight`.
    fn settled(&mut self, done: Settled) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.settle(done);
    }

    /// A job became durable or failed: its payloads stop being pending;
    /// after a failure the tip is reloaded from the store (whatever was
    /// queued after it fails its link check and settles the same way).
    fn settle(&mut self, (seqs, stored, epoch): Settled) {
        if let Some(rotation) = self.rotation_seq {
            let settled_now = seqs.contains(&rotation);
            if settled_now {
                self.rotation_seq = None;
            }
            let done = match (settled_now, stored) {
                (true, true) => crate::keys::finish_rotation(&self.key_file).map(|()| {
                    tracing::info!(seq = rotation, "feed key rotated");
                }),
                // The rotation (or an entry after it) failed: sign with the
                // key of the key file again. The new key stays in its file:
                // a failed commit may still have reached the disk, and the
                // next start settles it from what the store holds.
                (_, false) => crate::keys::load_key_file(&self.key_file).map(|old| {
                    tracing::warn!(
                        seq = rotation,
                        "key rotation not stored; the old key signs until a restart settles it"
                    );
                    self.key = old;
                }),
                (false, true) => Ok(()),
            };
            if let Err(err) = done {
                tracing::error!(error = %err, "key rotation: the key file could not be updated");
            }
        }
        if epoch != self.own.epoch {
            return;
        }
        self.own.pending.retain(|(seq, _)| !seqs.contains(seq));
        if !stored {
            self.own.tip = None;
            self.own.pending.clear();
            self.tables.borrow_mut().clear();
            self.own.epoch += 1;
        }
    }

    /// Keeps the cached tables a signed batch touches up to date.
    fn note_published(&self, batch: &IndicatorBatch) {
        let mut tables = self.tables.borrow_mut();
        let touched: HashSet<TableKey> = batch
            .observations
            .iter()
            .map(|o| {
                (
                    o.indicator.clone(),
                    o.catalog_edition.clone(),
                    o.period.clone(),
                )
            })
            .collect();
        for key in touched {
            let secret_base = self.rules.rounding_base(&key.0, &key.1);
            if let Some(table) = tables.get_mut(&key) {
                // A table that cannot be noted leaves the cache: the next
                // publish reads it again, and is refused there.
                if note_version(table, batch, &key.0, &key.1, &key.2, secret_base).is_err() {
                    tables.remove(&key);
                }
            }
        }
    }

    /// The own feed's tip from the store, checking that this node holds the
    /// key in force there (a rotation learned back from a peer, after a
    /// restore from an old backup, may have named another; a lost key's
    /// replacement is in force once the roster names it), and
    /// [`Self::check_not_replaced`].
    fn load_tip(&self, replacements: &[Replacement]) -> Result<Option<Tip>, PublishError> {
        let Some(tip) = self.store.head(&self.origin)?.map(|h| h.tip) else {
            return Ok(None);
        };
        self.check_not_replaced(&tip, replacements)?;
        let rotations = self.store.rotations(&self.origin)?;
        let in_force = key_after(
            &self.origin,
            &self.genesis,
            replacements,
            &rotations,
            tip.seq,
        )
        .map_err(|err| PublishError::Internal(err.to_string()))?;
        if self.key.verifying_key() != in_force {
            return Err(PublishError::NotReady(
                "this node's signing key is not the key in force at its feed's head (a key \
                 rotation is unsettled or was learned from a peer after a restore, or the \
                 federation roster does not name this key as the replacement of a lost one \
                 yet); restart the node, restore the key file that rotation wrote, or wait for \
                 the roster"
                    .into(),
            ));
        }
        Ok(Some(tip))
    }

    /// Checks, before every batch while the roster names replacements of
    /// this feed's keys, that the roster has not ended the feed at or
    /// before `tip`, and that where it starts the new feed right after
    /// `tip` this node signs with the new key (a node still running with
    /// the replaced key stops there).
    fn check_not_replaced(
        &self,
        tip: &Tip,
        replacements: &[Replacement],
    ) -> Result<(), PublishError> {
        if let Some(ended) = replacements.iter().find(|r| r.refuses(tip)) {
            return Err(PublishError::NotReady(format!(
                "the federation roster ended this node's feed {} at seq {}, but this node holds \
                 another entry there or later ones (up to seq {}), which every peer refuses: \
                 restore this node's store from a peer that follows the new feed",
                hex(&ended.old_feed_id),
                ended.last_seq,
                tip.seq
            )));
        }
        let starts = replacements.iter().find(|r| r.starts_after(tip));
        if starts.is_some_and(|r| r.new_key != self.key.verifying_key()) {
            return Err(PublishError::NotReady(
                "this node's signing key is not the key in force at its feed's head: the \
                 federation roster replaced it; start the node with the new key file"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Validates and signs a batch of requests on the current tip, and
    /// queues the good ones to the writer as one job. A request with a feed
    /// end comes alone, and its outcome is awaited here.
    async fn sequence(&mut self, batch: Vec<Queued>, settled: &mpsc::UnboundedSender<Settled>) {
        let feed_end = match batch.as_slice() {
            [one] => one.feed_end.clone(),
            _ => None,
        };
        let replacements = self.keys.replacements(&self.origin);
        let start = match self.own.tip {
            // A roster change may end the feed at the tip: check every batch.
            Some(Some(tip)) if !replacements.is_empty() => self
                .check_not_replaced(&tip, &replacements)
                .map(|()| Some(tip)),
            Some(tip) => Ok(tip),
            None => self.load_tip(&replacements),
        };
        let start = match start {
            Ok(tip) => tip,
            Err(err) => {
                for queued in batch {
                    let _ = queued.reply.send(Err(match &err {
                        PublishError::NotReady(m) => PublishError::NotReady(m.clone()),
                        PublishError::Store(e) => PublishError::Store(e.clone()),
                        other => PublishError::Internal(other.to_string()),
                    }));
                }
                return;
            }
        };
        let mut tip = start;
        let mut entries = Vec::new();
        let mut idempotency = Vec::new();
        let mut replies = Vec::new();
        let mut seqs = Vec::new();
        for queued in batch {
            let rotating = matches!(queued.request, Request::RotateKey);
            if rotating {
                let pending = self.rotation_seq.is_some()
                    || crate::keys::next_key_file(&self.key_file).exists();
                let prepared = if pending {
                    Err(PublishError::NotReady(
                        "an earlier key rotation is not settled yet (feed.key.next exists); \
                         restart the node to settle it"
                            .into(),
                    ))
                } else {
                    crate::keys::prepare_rotation(&self.key_file, &self.key)
                        .map_err(|err| PublishError::Internal(err.to_string()))
                };
                match prepared {
                    Ok(next) => self.next_key = Some(next),
                    Err(err) => {
                        let _ = queued.reply.send(Err(err));
                        continue;
                    }
                }
            }
            // Disclosure control of a large table takes a while: let the
            // runtime move other tasks off this thread meanwhile.
            let heavy = matches!(&queued.request, Request::Indicators(rows) if rows.len() > 100);
            let (key, fingerprint, request) = (queued.key, queued.fingerprint, queued.request);
            // A bug that panics on some request must not stop every later
            // publish: that request is refused, nothing of it was sent to
            // the writer, and the cached tables it may have touched go.
            let guarded = || {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.sign(key, fingerprint, request, tip, &replacements)
                }))
                .unwrap_or_else(|_| {
                    self.tables.borrow_mut().clear();
                    tracing::error!("a publish request made the node fail; it was refused");
                    Err(PublishError::Internal(
                        "this request made the node fail (a bug: please report it); nothing \
                         of it was published"
                            .into(),
                    ))
                })
            };
            let signed = crate::cpu_bound(heavy, guarded);
            match signed {
                Ok((signed, record)) => {
                    if let Some(next) = self.next_key.take() {
                        // Every later entry is signed by the new key.
                        self.key = next;
                        self.rotation_seq = signed.last().map(|(e, _)| e.body.seq);
                    }
                    let feed_id = signed.first().map(|(e, _)| e.feed_id()).unwrap_or_default();
                    for (entry, payload) in signed {
                        if let Payload::Indicators(batch) = &payload {
                            self.note_published(batch);
                        }
                        tip = Some(entry.tip());
                        seqs.push(entry.body.seq);
                        self.own.pending.push((entry.body.seq, payload));
                        entries.push(Prepared::new(entry));
                    }
                    idempotency.push((queued.key, record));
                    replies.push((queued.reply, receipt_of(&self.origin, feed_id, &record)));
                }
                Err(err) => {
                    if self.next_key.take().is_some() {
                        let _ = std::fs::remove_file(crate::keys::next_key_file(&self.key_file));
                    }
                    let _ = queued.reply.send(Err(err));
                }
            }
        }
        if entries.is_empty() {
            return;
        }
        let epoch = self.own.epoch;
        // A job that ends a feed, or rotates the key, is settled before
        // its replies go out: a receipt for a rotation means the key file
        // holds the new key.
        let awaited = feed_end.is_some() || self.rotation_seq.is_some_and(|r| seqs.contains(&r));
        match self
            .writer
            .send(Job {
                entries,
                idempotency,
                conflict: None,
                replacements,
                feed_end,
                roster_ends: Vec::new(),
            })
            .await
        {
            Ok(answer) if awaited => {
                self.own.tip = Some(tip);
                let outcome = answer.await.unwrap_or(Err(WriteError::Stopped));
                self.settle((seqs, outcome.is_ok(), epoch));
                for (reply, receipt) in replies {
                    let _ =
                        reply.send(outcome.clone().map(|_| receipt).map_err(PublishError::from));
                }
            }
            Ok(answer) => {
                self.own.tip = Some(tip);
                self.in_flight += 1;
                let settled = settled.clone();
                tokio::spawn(async move {
                    let outcome = answer.await.unwrap_or(Err(WriteError::Stopped));
                    let _ = settled.send((seqs, outcome.is_ok(), epoch));
                    for (reply, receipt) in replies {
                        let _ = reply
                            .send(outcome.clone().map(|_| receipt).map_err(PublishError::from));
                    }
                });
            }
            Err(err) => {
                self.settle((seqs, false, epoch));
                for (reply, _) in replies {
                    let _ = reply.send(Err(err.clone().into()));
                }
            }
        }
    }

    /// Builds and signs the entries of one request on `tip`: one entry, or
    /// the consecutive parts of a publish group.
    #[allow(clippy::type_complexity)]
    fn sign(
        &self,
        idempotency_key: [u8; 16],
        fingerprint: [u8; 32],
        request: Request,
        tip: Option<Tip>,
        replacements: &[Replacement],
    ) -> Result<(Vec<(Entry, Payload)>, IdempotencyRecord), PublishError> {
        #[cfg(test)]
        if matches!(&request, Request::Offer(offer) if offer.offer_id == tests::PANICS) {
            panic!("a request that makes signing fail, for the panic guard's test");
        }
        let (payloads, published, suppressed) = self.payload(request, idempotency_key)?;
        let feed_id = match &tip {
            // Where the roster replaced a lost key, the new feed starts.
            Some(tip) => replacements
                .iter()
                .find(|r| r.starts_after(tip))
                .map_or(tip.feed_id, |r| r.new_feed_id),
            None => {
                let mut id = [0u8; 16];
                getrandom::getrandom(&mut id).map_err(|err| {
                    PublishError::Internal(format!("no randomness for a feed id: {err}"))
                })?;
                id
            }
        };
        let mut tip = tip;
        let mut signed = Vec::with_capacity(payloads.len());
        for payload in payloads {
            let body = EntryBody {
                origin: self.origin.clone(),
                feed_id: feed_id.to_vec(),
                seq: tip.map_or(1, |t| t.seq + 1),
                prev_hash: tip.map_or(GENESIS_PREV_HASH, |t| t.hash).to_vec(),
                time_unix_micros: now_micros().max(tip.map_or(0, |t| t.time_unix_micros)),
                idempotency_key: idempotency_key.to_vec(),
                payload: Some(payload.clone()),
            };
            let entry = Entry::sign(&self.key, body).map_err(|err| match err {
                FeedError::TooLarge { size } => PublishError::Invalid(format!(
                    "the entry would be {size} bytes, above the 65536-byte limit; shorten the text fields"
                )),
                other => PublishError::Internal(other.to_string()),
            })?;
            tip = Some(entry.tip());
            signed.push((entry, payload));
        }
        let (first, last) = match (signed.first(), signed.last()) {
            (Some((first, _)), Some((last, _))) => (first.body.seq, last),
            _ => return Err(PublishError::Internal("a publish produced no entry".into())),
        };
        let record = IdempotencyRecord {
            fingerprint,
            first_seq: first,
            seq: last.body.seq,
            hash: last.hash,
            published,
            suppressed,
        };
        Ok((signed, record))
    }

    /// The retraction of entry `seq`; for a part of a publish group, of
    /// every part not retracted yet (a group is published, and withdrawn,
    /// as a whole).
    fn retractions(&self, seq: u64, reason: String) -> Result<Vec<Payload>, PublishError> {
        check_text("reason", &reason, 2000, false, true)?;
        if seq == 0 {
            return Err(PublishError::Invalid("seq: entries start at seq 1".into()));
        }
        let load = |seq: u64| -> Result<Entry, PublishError> {
            let held = self.store.entries(&self.origin, seq, 1, usize::MAX)?;
            let entry = held.into_iter().next().ok_or_else(|| {
                PublishError::NotFound(format!("seq: this node's feed has no entry {seq}"))
            })?;
            Entry::decode(entry).map_err(|e| PublishError::Internal(e.to_string()))
        };
        let retracted = |seq: u64| -> Result<bool, PublishError> {
            let pending = self
                .own
                .pending_payloads()
                .any(|p| matches!(p, Payload::Retraction(r) if r.seq == seq));
            Ok(pending || self.store.is_retracted(&self.origin, seq)?)
        };
        let named = load(seq)?;
        // A retraction withdraws what an entry says; these say something
        // that cannot be taken back.
        let lasting = match &named.body.payload {
            Some(Payload::KeyRotation(_)) => {
                Some("a key rotation: the feed's key changed for good")
            }
            Some(Payload::Withdrawal(_)) => Some("an offer's withdrawal, which is final"),
            Some(Payload::Retraction(_)) => Some("a retraction, which is final"),
            Some(Payload::Roster(_)) => {
                Some("a roster entry: publish the member's entry again to change it")
            }
            _ => None,
        };
        if let Some(what) = lasting {
            return Err(PublishError::Invalid(format!(
                "seq: entry {seq} is {what}; it cannot be retracted"
            )));
        }
        if retracted(seq)? {
            return Err(PublishError::Invalid(format!(
                "seq: entry {seq} is already retracted"
            )));
        }
        let (first, count) = match &named.body.payload {
            Some(Payload::Indicators(batch)) => match &batch.group {
                Some(g) if g.part < g.count => (
                    seq.saturating_sub(u64::from(g.part)).max(1),
                    u64::from(g.count),
                ),
                _ => (seq, 1),
            },
            _ => (seq, 1),
        };
        let mut payloads = Vec::new();
        for part in first..first + count {
            if part != seq && retracted(part)? {
                continue;
            }
            let entry = if part == seq {
                named.clone()
            } else {
                load(part)?
            };
            payloads.push(Payload::Retraction(Retraction {
                feed_id: entry.body.feed_id.clone(),
                seq: part,
                entry_hash: entry.hash.to_vec(),
                reason: reason.clone(),
            }));
        }
        Ok(payloads)
    }

    /// Whether an own offer is withdrawn, durably or by a queued entry.
    fn is_withdrawn(&self, offer_id: &str) -> Result<bool, PublishError> {
        let pending = self
            .own
            .pending_payloads()
            .any(|p| matches!(p, Payload::Withdrawal(w) if w.offer_id == offer_id));
        Ok(pending || self.store.withdrawal(&self.origin, offer_id)?.is_some())
    }

    /// The payloads of a request: one, or the parts of a publish group when
    /// an indicator batch is too large for one entry.
    fn payload(
        &self,
        request: Request,
        idempotency_key: [u8; 16],
    ) -> Result<(Vec<Payload>, u32, u32), PublishError> {
        if let Request::Retract { seq, reason } = request {
            return Ok((self.retractions(seq, reason)?, 0, 0));
        }
        let (payload, published, suppressed) = self.payload_one(request, idempotency_key)?;
        let payloads = match payload {
            Payload::Indicators(batch) => split_batch(batch, idempotency_key, MAX_PART_BYTES)
                .into_iter()
                .map(Payload::Indicators)
                .collect(),
            other => vec![other],
        };
        Ok((payloads, published, suppressed))
    }

    fn payload_one(
        &self,
        request: Request,
        idempotency_key: [u8; 16],
    ) -> Result<(Payload, u32, u32), PublishError> {
        Ok(match request {
            Request::Indicators(rows) => {
                let mut view = OwnView {
                    origin: &self.origin,
                    store: &self.store,
                    rules: &self.rules,
                    pending: &self.own.pending,
                    cache: Some(&self.tables),
                };
                let seed = |indicator: &str, edition: &str, period: &str| {
                    self.rules
                        .seed(&idempotency_key, indicator, edition, period)
                };
                let context = self.rules.context(&self.origin);
                let prepared = prepare_batch(&context, &rows, &mut view, Noise::Seeded(&seed))?;
                if let Some(refusal) = prepared.refusal {
                    return Err(PublishError::Refused(refusal));
                }
                (
                    Payload::Indicators(prepared.batch),
                    prepared.published,
                    prepared.suppressed,
                )
            }
            Request::Offer(offer) => {
                check_offer(&offer)?;
                if self.is_withdrawn(&offer.offer_id)? {
                    return Err(PublishError::Invalid(format!(
                        "offer_id: {:?} was withdrawn; withdrawal is final, publish under a new id",
                        offer.offer_id
                    )));
                }
                (Payload::Offer(offer), 0, 0)
            }
            Request::Withdraw { offer_id, reason } => {
                check_slug(&offer_id).map_err(|m| {
                    PublishError::Invalid(format!("offer_id: {} {m}", quote(&offer_id)))
                })?;
                check_text("reason", &reason, 2000, false, true)?;
                let pending = self
                    .own
                    .pending_payloads()
                    .any(|p| matches!(p, Payload::Offer(o) if o.offer_id == offer_id));
                let held = pending
                    || !self
                        .store
                        .offer_versions_of(&self.origin, &offer_id)?
                        .is_empty();
                if !held {
                    return Err(PublishError::NotFound(format!(
                        "offer_id: this node has no offer {offer_id:?}"
                    )));
                }
                if self.is_withdrawn(&offer_id)? {
                    return Err(PublishError::Invalid(format!(
                        "offer_id: {offer_id:?} is already withdrawn"
                    )));
                }
                (
                    Payload::Withdrawal(OfferWithdrawal { offer_id, reason }),
                    0,
                    0,
                )
            }
            Request::Respond {
                offer_origin,
                offer_id,
                version,
                kind,
                message,
            } => {
                check_origin_id(&offer_origin)
                    .map_err(|m| PublishError::Invalid(format!("offer_origin: {m}")))?;
                check_slug(&offer_id).map_err(|m| {
                    PublishError::Invalid(format!("offer_id: {} {m}", quote(&offer_id)))
                })?;
                if kind == ResponseKind::Unspecified {
                    return Err(PublishError::Invalid(
                        "kind: must be interest, accept or decline".into(),
                    ));
                }
                check_text("message", &message, 2000, false, true)?;
                if offer_origin == self.origin {
                    return Err(PublishError::Invalid(format!(
                        "offer_origin: {offer_origin} is this node's own origin; a city does not \
                         answer its own offers"
                    )));
                }
                if self.store.withdrawal(&offer_origin, &offer_id)?.is_some() {
                    return Err(PublishError::Refused(format!(
                        "offer: {offer_id:?} of {offer_origin:?} was withdrawn; withdrawal is \
                         final, and a withdrawn offer takes no responses"
                    )));
                }
                let version = match version {
                    Some(version) => version,
                    None => {
                        let versions = self.store.offer_versions_of(&offer_origin, &offer_id)?;
                        let latest = versions
                            .iter()
                            .max_by_key(|o| o.seq)
                            .ok_or_else(|| {
                                PublishError::NotFound(format!(
                                    "offer: this node holds no offer {offer_id:?} of {offer_origin:?}; \
                                     wait for replication or name the version hash"
                                ))
                            })?;
                        if !latest.answerable {
                            return Err(PublishError::Refused(format!(
                                "offer: the latest version of {offer_id:?} of {offer_origin:?} \
                                 has fields this build of civex does not know; upgrade to read \
                                 it before answering, or name the hash of a version you have read"
                            )));
                        }
                        latest.hash
                    }
                };
                let response = OfferResponse {
                    offer_origin,
                    offer_id,
                    offer_version_hash: version.to_vec(),
                    kind: kind as i32,
                    message,
                };
                (Payload::Response(response), 0, 0)
            }
            Request::Retract { .. } => {
                return Err(PublishError::Internal(
                    "retractions are built by retractions()".into(),
                ))
            }
            Request::Roster(entry) => (Payload::Roster(entry), 0, 0),
            Request::RotateKey => {
                let next = self.next_key.as_ref().ok_or_else(|| {
                    PublishError::Internal("a key rotation without a new key".into())
                })?;
                (
                    Payload::KeyRotation(civex_proto::v1::KeyRotation {
                        new_key: next.verifying_key().to_bytes().to_vec(),
                    }),
                    0,
                    0,
                )
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use civex_proto::v1::{EntryBody, IndicatorBatch, Observation, PublishGroup};

    use super::*;
    use crate::core::feed::tests::key;

    /// The offer id whose publish panics while it is signed.
    pub(super) const PANICS: &str = "panics-for-test";

    #[tokio::test]
    async fn a_request_that_panics_while_signed_is_refused_and_later_ones_publish() {
        let dir = tempfile::tempdir().unwrap();
        let store: SharedStore =
            Arc::new(crate::store::SledStore::open(&dir.path().join("data"), 16 << 20).unwrap());
        let (writer, _thread) = crate::writer::Writer::start(store.clone()).unwrap();
        let signing = key(1);
        let genesis = signing.verifying_key();
        let publisher = Publisher::new(
            "city-a".into(),
            FeedKey {
                signing,
                file: dir.path().join("feed.key"),
                genesis,
            },
            Arc::new(IndicatorRules {
                districts: Vec::new(),
                catalog: crate::core::catalog::Catalog::builtin(),
                policy: Default::default(),
                noise_key: None,
            }),
            Arc::new(KeyResolver::new("city-a", genesis, Default::default())),
            store.clone(),
            writer,
            // No peers: open.
            crate::gate::PublishGate::new(Vec::new(), false),
        );
        let offer = |id: &str| {
            Request::Offer(ServiceOffer {
                offer_id: id.into(),
                title: "Snow clearing".into(),
                area: 1,
                category: "maintenance".into(),
                contact_role: "public works".into(),
                valid_until_unix: 1,
                ..Default::default()
            })
        };
        let refused = publisher.publish([1; 16], [1; 32], offer(PANICS)).await;
        match refused {
            Err(PublishError::Internal(message)) => {
                assert!(message.contains("nothing of it was published"), "{message}")
            }
            other => panic!("expected the request refused: {other:?}"),
        }
        assert_eq!(store.head("city-a").unwrap(), None, "part of it was stored");
        // The sequencer goes on: the next publish is entry 1.
        let receipt = publisher
            .publish([2; 16], [2; 32], offer("snow"))
            .await
            .unwrap();
        assert_eq!(receipt.seq, 1);
        assert_eq!(store.head("city-a").unwrap().unwrap().tip.seq, 1);
    }

    /// Own entry `seq` of the publish with key `k`.
    fn own_entry(seq: u64, k: u8, payload: Payload) -> Entry {
        let body = EntryBody {
            origin: "city-a".into(),
            feed_id: vec![7; 16],
            seq,
            prev_hash: vec![0; 32],
            time_unix_micros: 1,
            idempotency_key: vec![k; 16],
            payload: Some(payload),
        };
        Entry::sign(&key(1), body).unwrap()
    }

    /// Entry `seq` of a publish with key `k`: part `group` (part, count),
    /// with `cells` observations, `suppressed` of them without a value.
    fn part(seq: u64, k: u8, group: Option<(u32, u32)>, cells: usize, suppressed: usize) -> Entry {
        let observations = (0..cells)
            .map(|i| Observation {
                value: (i >= suppressed).then_some(1.0),
                ..Default::default()
            })
            .collect();
        let batch = IndicatorBatch {
            observations,
            group: group.map(|(part, count)| PublishGroup {
                id: vec![k; 16],
                part,
                count,
            }),
            ..Default::default()
        };
        own_entry(seq, k, Payload::Indicators(batch))
    }

    fn counted(records: &[([u8; 16], IdempotencyRecord)]) -> Vec<(u8, u64, u64, u32, u32)> {
        records
            .iter()
            .map(|(k, r)| (k[0], r.first_seq, r.seq, r.published, r.suppressed))
            .collect()
    }

    /// A publish of one entry, a group of three parts, and the first part
    /// of another group.
    fn feed_with_groups() -> [Entry; 5] {
        [
            part(1, 1, None, 3, 1),
            part(2, 2, Some((0, 3)), 10, 2),
            part(3, 2, Some((1, 3)), 10, 0),
            part(4, 2, Some((2, 3)), 5, 1),
            part(5, 3, Some((0, 2)), 4, 0),
        ]
    }

    #[test]
    fn a_group_learned_back_in_pieces_counts_every_part() {
        let entries = feed_with_groups();
        let mut recovery = Recovery::default();
        assert_eq!(counted(&recovery.records(&entries[..2])), [(1, 1, 1, 2, 1)]);
        assert!(recovery.records(&entries[2..3]).is_empty());
        assert_eq!(
            counted(&recovery.records(&entries[3..])),
            [(2, 2, 4, 22, 3)],
            "the group's record counts the parts of earlier calls"
        );
        // Told nothing of the first parts, it counts what it was fed.
        let mut late = Recovery::default();
        assert_eq!(counted(&late.records(&entries[2..4])), [(2, 2, 4, 14, 1)]);
    }

    #[test]
    fn a_recovery_after_a_head_inside_a_group_counts_the_parts_held() {
        let entries = feed_with_groups();
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::SledStore::open(dir.path(), 16 << 20).unwrap();
        // The store holds the group's first two parts (a session ended
        // there); the next session goes on from its head.
        let held = &entries[..3];
        store
            .commit(&crate::store::CommitBatch {
                runs: vec![held.to_vec()],
                heads: vec![(
                    "city-a".into(),
                    crate::store::Head {
                        tip: held[2].tip(),
                        received_unix_micros: 1,
                    },
                )],
                ..Default::default()
            })
            .unwrap();
        let mut recovery = Recovery::after(&store, "city-a").unwrap();
        assert_eq!(
            counted(&recovery.records(&entries[3..4])),
            [(2, 2, 4, 22, 3)]
        );
        // An empty feed starts afresh.
        let empty = tempfile::tempdir().unwrap();
        let store = crate::store::SledStore::open(empty.path(), 16 << 20).unwrap();
        let mut fresh = Recovery::after(&store, "city-a").unwrap();
        assert_eq!(counted(&fresh.records(&entries[..1])), [(1, 1, 1, 2, 1)]);
    }

    #[test]
    fn every_published_version_of_a_cell_stays_known() {
        // South published as 30, corrected to 37 (a correction since
        // retracted, say), then suppressed: its value 30 is still known,
        // and so is 37.
        let cell = |value: Option<f64>| {
            Payload::Indicators(IndicatorBatch {
                observations: vec![Observation {
                    indicator: "jobs".into(),
                    catalog_edition: "test".into(),
                    ref_area: "city-a/south".into(),
                    period: "2025".into(),
                    value,
                    ..Default::default()
                }],
                ..Default::default()
            })
        };
        let mut entries: Vec<Entry> = Vec::new();
        for (seq, value) in [(1, Some(30.0)), (2, Some(37.0)), (3, None)] {
            let mut entry = own_entry(seq, seq as u8, cell(value));
            entry.body.prev_hash = entries
                .last()
                .map_or(crate::core::feed::GENESIS_PREV_HASH, |e| e.hash)
                .to_vec();
            entries.push(Entry::sign(&key(1), entry.body).unwrap());
        }
        let dir = tempfile::tempdir().unwrap();
        let store: SharedStore =
            Arc::new(crate::store::SledStore::open(dir.path(), 16 << 20).unwrap());
        store
            .commit(&crate::store::tests::commit_of(&entries))
            .unwrap();
        let table = stored_versions(&store, "city-a", "jobs", "test", "2025", None).unwrap();
        assert_eq!(table.history.versions().len(), 3, "one version per publish");
        let cells = table.history.cells();
        assert_eq!(cells.len(), 1);
        assert!(
            cells[0].suppressed,
            "the latest version is not the suppressed one"
        );
        assert_eq!(cells[0].known, [(30.0, 30.0), (37.0, 37.0)]);
        // A version signed but not yet durable adds to what is known too.
        let mut cached = table.clone();
        let Payload::Indicators(batch) = cell(Some(41.0)) else {
            unreachable!()
        };
        note_version(&mut cached, &batch, "jobs", "test", "2025", None).unwrap();
        assert_eq!(cached.history.versions().len(), 4);
        let cells = cached.history.cells();
        assert!(!cells[0].suppressed);
        assert_eq!(cells[0].known, [(30.0, 30.0), (37.0, 37.0), (41.0, 41.0)]);
        let rebuilt = TableHistory::of(cached.history.versions().to_vec());
        assert_eq!(rebuilt.cells(), cells, "kept up to date as read again");
        // The sequencer's cache hands the ingest its history, not a copy,
        // and the next version is added to it in place: a publish costs
        // the same however often the table was revised.
        let key: TableKey = ("jobs".into(), "test".into(), "2025".into());
        let cache = RefCell::new(HashMap::from([(key.clone(), cached)]));
        let rules = IndicatorRules {
            districts: Vec::new(),
            catalog: Catalog::with_city_file(crate::core::catalog::tests::TEST_CATALOG, "t.toml")
                .unwrap(),
            policy: Policy::default(),
            noise_key: None,
        };
        let mut view = OwnView {
            origin: "city-a",
            store: &store,
            rules: &rules,
            pending: &[],
            cache: Some(&cache),
        };
        let read = view.earlier_versions("jobs", "test", "2025").unwrap();
        let held = cache.borrow()[&key].history.clone();
        assert!(Arc::ptr_eq(&read, &held));
        drop((read, held));
        let before = Arc::as_ptr(&cache.borrow()[&key].history);
        let mut cache = cache.into_inner();
        let table = cache.get_mut(&key).unwrap();
        note_version(table, &batch, "jobs", "test", "2025", None).unwrap();
        assert_eq!(table.history.versions().len(), 5);
        assert_eq!(
            Arc::as_ptr(&table.history),
            before,
            "the history was copied"
        );
    }

    #[test]
    fn the_parts_of_a_publish_group_are_one_version_of_a_table() {
        // A plain publish, a group of two parts, and the first part of a
        // group whose second part is signed but not durable yet.
        let batch = |areas: &[&str], group: Option<(u8, u32, u32)>| IndicatorBatch {
            observations: areas
                .iter()
                .map(|area| Observation {
                    indicator: "jobs".into(),
                    catalog_edition: "test".into(),
                    ref_area: (*area).into(),
                    period: "2025".into(),
                    value: Some(10.0),
                    ..Default::default()
                })
                .collect(),
            group: group.map(|(k, part, count)| PublishGroup {
                id: vec![k; 16],
                part,
                count,
            }),
            ..Default::default()
        };
        let payloads = [
            batch(&["city-a/north", "city-a/south"], None),
            batch(&["city-a", "city-a/north"], Some((2, 0, 2))),
            batch(&["city-a/south"], Some((2, 1, 2))),
            batch(&["city-a", "city-a/north"], Some((3, 0, 2))),
        ];
        let mut entries: Vec<Entry> = Vec::new();
        for (seq, payload) in (1..).zip(payloads) {
            let mut entry = own_entry(seq, seq as u8, Payload::Indicators(payload));
            entry.body.prev_hash = entries
                .last()
                .map_or(crate::core::feed::GENESIS_PREV_HASH, |e| e.hash)
                .to_vec();
            entries.push(Entry::sign(&key(1), entry.body).unwrap());
        }
        let dir = tempfile::tempdir().unwrap();
        let store: SharedStore =
            Arc::new(crate::store::SledStore::open(dir.path(), 16 << 20).unwrap());
        store
            .commit(&crate::store::tests::commit_of(&entries))
            .unwrap();
        let mut table = stored_versions(&store, "city-a", "jobs", "test", "2025", None).unwrap();
        let sizes = |t: &TableVersions| {
            t.history
                .versions()
                .iter()
                .map(|v| v.cells.len())
                .collect::<Vec<_>>()
        };
        assert_eq!(sizes(&table), [2, 3, 2]);
        assert_eq!(table.latest_group, Some(vec![3; 16]));
        let rest = batch(&["city-a/south"], Some((3, 1, 2)));
        note_version(&mut table, &rest, "jobs", "test", "2025", None).unwrap();
        assert_eq!(
            sizes(&table),
            [2, 3, 3],
            "the group's last part is its version's"
        );
        // Its cells are merged as if the history were read again whole.
        let merged_again = |t: &TableVersions| {
            let again = TableHistory::of(t.history.versions().to_vec());
            assert_eq!(t.history.cells(), again.cells());
        };
        merged_again(&table);
        let next = batch(&["city-a", "city-a/north", "city-a/south"], None);
        note_version(&mut table, &next, "jobs", "test", "2025", None).unwrap();
        assert_eq!(sizes(&table), [2, 3, 3, 3]);
        merged_again(&table);
    }

    /// One cell of `indicator` published as `value`, with the rule set of
    /// an `aggregation` rounded to a base: `base` among its parameters.
    fn rounded(indicator: &str, aggregation: &str, base: &str, value: f64) -> IndicatorBatch {
        IndicatorBatch {
            observations: vec![Observation {
                indicator: indicator.into(),
                catalog_edition: "local".into(),
                ref_area: "city-a/south".into(),
                period: "2025".into(),
                value: Some(value),
                ..Default::default()
            }],
            rules: vec![civex_proto::v1::DisclosureRules {
                parameters: vec![civex_proto::v1::RuleParameter {
                    rule: "rounding".into(),
                    name: "base".into(),
                    value: base.into(),
                }],
                aggregation: aggregation.into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_rounded_count_is_known_to_its_exact_integer_range() {
        // Rounded to 5 (halves away from zero), a published 10 means 8 to 12
        // for a whole number; for a sum, any real from 7.5 to 12.5.
        let known = |batch: IndicatorBatch| {
            let mut table = TableVersions::default();
            note_version(&mut table, &batch, "jobs", "local", "2025", None).unwrap();
            table.history.cells()[0].known.clone()
        };
        assert_eq!(known(rounded("jobs", "count", "5", 10.0)), [(8.0, 12.0)]);
        assert_eq!(known(rounded("jobs", "count", "5", 0.0)), [(-2.0, 2.0)]);
        assert_eq!(known(rounded("jobs", "count", "10", 30.0)), [(25.0, 34.0)]);
        assert_eq!(known(rounded("jobs", "sum", "5", 10.0)), [(7.5, 12.5)]);
    }

    #[test]
    fn a_withheld_rounding_base_is_known_as_the_configured_one() {
        // Jobs published as 10, rounded to a base the entry withholds: an
        // attacker who guesses 5 knows 8 to 12, as if the base were public
        // (taken as the exact value, the version told nothing of a true 9).
        let mut batch = rounded("jobs", "count", "5", 10.0);
        batch.rules[0].parameters.clear();
        batch.rules[0].withheld.push("rounding.base".into());
        let dir = tempfile::tempdir().unwrap();
        let store: SharedStore =
            Arc::new(crate::store::SledStore::open(dir.path(), 16 << 20).unwrap());
        let entries = [own_entry(1, 1, Payload::Indicators(batch))];
        store
            .commit(&crate::store::tests::commit_of(&entries))
            .unwrap();
        let catalog =
            Catalog::with_city_file(crate::core::catalog::tests::TEST_CATALOG, "test.toml")
                .unwrap();
        let mut policy = Policy {
            overrides: vec![crate::core::policy::Override {
                code: "jobs".into(),
                rounding_base: Some(5.0),
                ..Default::default()
            }],
            ..Policy::default()
        };
        policy
            .secret
            .push(crate::core::sdc::ParameterId::RoundingBase);
        policy.check(&catalog).unwrap();
        let mut rules = IndicatorRules {
            districts: vec!["south".into()],
            catalog,
            policy,
            noise_key: None,
        };
        let known = |rules: &IndicatorRules| {
            let mut view = OwnView {
                origin: "city-a",
                store: &store,
                rules,
                pending: &[],
                cache: None,
            };
            view.earlier_versions("jobs", "local", "2025")
                .map(|history| history.cells()[0].known.clone())
        };
        assert_eq!(known(&rules), Ok(vec![(8.0, 12.0)]));
        // With no base configured any more, the revision is refused, not
        // audited as if the version told nothing.
        rules.policy.overrides.clear();
        let err = known(&rules).unwrap_err();
        assert!(
            err.contains("entry 1 of the own feed") && err.contains("withheld base"),
            "{err}"
        );
    }

    /// A publisher of origin `roster` over `store`, open for publishing.
    /// Its key file is `dir/feed.key`.
    fn publisher_over(dir: &std::path::Path, store: SharedStore, writer: Writer) -> Publisher {
        let signing = crate::keys::create_key_file(&dir.join("feed.key")).unwrap();
        let genesis = signing.verifying_key();
        let rules = IndicatorRules {
            districts: Vec::new(),
            catalog: Catalog::builtin(),
            policy: Policy::default(),
            noise_key: None,
        };
        let keys = Arc::new(KeyResolver::new("roster", genesis, Default::default()));
        Publisher::new(
            "roster".into(),
            FeedKey {
                signing,
                file: dir.join("feed.key"),
                genesis,
            },
            Arc::new(rules),
            keys,
            store,
            writer,
            // No peers: open.
            crate::gate::PublishGate::new(Vec::new(), false),
        )
    }

    fn offer(id: &str) -> Request {
        Request::Offer(ServiceOffer {
            offer_id: id.into(),
            title: "Shared data centre".into(),
            area: 6,
            category: "it".into(),
            contact_role: "IT office".into(),
            valid_from_unix: 0,
            valid_until_unix: 1,
            ..Default::default()
        })
    }

    /// The roster entry (whatever it says) and the end of city-x's feed
    /// at `at`, as `ReplaceFeedKey` makes them.
    fn ending(at: &Entry) -> (Request, Option<FeedEnd>) {
        let entry = civex_proto::v1::RosterEntry {
            origin: "city-x".into(),
            ..Default::default()
        };
        let end = FeedEnd {
            abandoned: None,
            origin: "city-x".into(),
            feed_id: at.feed_id(),
            seq: at.body.seq,
            hash: at.hash,
            enforce: true,
        };
        (Request::Roster(entry), Some(end))
    }

    /// A record rebuilt from the feed knows a retraction by its reason, and
    /// the entries it retracted: a retry naming another seq is refused.
    /// Found by review.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rebuilt_retraction_record_answers_only_a_retry_of_its_seq() {
        let dir = tempfile::tempdir().unwrap();
        let store: SharedStore =
            Arc::new(crate::store::SledStore::open(&dir.path().join("store"), 16 << 20).unwrap());
        let (writer, _thread) = Writer::start(store.clone()).unwrap();
        let publisher = publisher_over(dir.path(), store.clone(), writer.clone());
        for (k, id) in [(1, "a"), (2, "b")] {
            publisher
                .publish([k; 16], [k; 32], offer(id))
                .await
                .unwrap();
        }
        let retract = |seq| Request::Retract {
            seq,
            reason: String::new(),
        };
        let receipt = publisher
            .publish([3; 16], [3; 32], retract(1))
            .await
            .unwrap();
        // As a restore leaves it: the record rebuilt from the entry.
        let signed = store.entries("roster", 3, 1, usize::MAX).unwrap().remove(0);
        let records = Recovery::default().records(&[Entry::decode(signed).unwrap()]);
        store
            .commit(&crate::store::CommitBatch {
                idempotency: records,
                ..Default::default()
            })
            .unwrap();
        let replay = |seq| {
            let request = retract(seq);
            publisher.replay(
                &[3; 16],
                &[9; 32],
                || Outline::of_request(&request),
                Some(seq),
            )
        };
        assert_eq!(replay(1).unwrap(), Some(receipt));
        assert!(
            matches!(replay(2), Err(PublishError::KeyReused(_))),
            "a retry of another seq got the receipt"
        );
    }

    // One thread: the three publishes below are queued before the
    // sequencer runs, so it takes them as one batch.
    #[tokio::test(flavor = "current_thread")]
    async fn a_feed_end_refused_after_more_of_the_feed_arrived_fails_only_its_own_publish() {
        let dir = tempfile::tempdir().unwrap();
        let store: SharedStore =
            Arc::new(crate::store::SledStore::open(&dir.path().join("store"), 16 << 20).unwrap());
        let (writer, _thread) = Writer::start(store.clone()).unwrap();
        let x = crate::core::feed::tests::chain(&key(2), "city-x", 5);
        let stored = x[..3].iter().cloned().map(Prepared::new).collect();
        writer.write(Job::entries(stored)).await.unwrap();
        let publisher = publisher_over(dir.path(), store.clone(), writer.clone());
        let first = publisher
            .publish([1; 16], [1; 32], offer("a"))
            .await
            .unwrap();
        assert_eq!(first.seq, 1);

        // ReplaceFeedKey checked city-x's head at seq 3; then seq 4 is
        // replicated and stored, before the roster entry is signed.
        let (roster_entry, end) = ending(&x[2]);
        writer
            .write(Job::entries(vec![Prepared::new(x[3].clone())]))
            .await
            .unwrap();
        let before = publisher
            .submit([2; 16], [2; 32], offer("b"))
            .await
            .unwrap();
        let refused = publisher
            .submit_ending([3; 16], [3; 32], roster_entry.clone(), end)
            .await
            .unwrap();
        let after = publisher
            .submit([4; 16], [4; 32], offer("c"))
            .await
            .unwrap();
        let before = before.receipt().await.unwrap();
        let err = refused.receipt().await.unwrap_err();
        assert!(
            matches!(
                err,
                PublishError::Write(WriteError::HeadMoved {
                    expected: 3,
                    held: 4,
                    ..
                })
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("retry"), "{err}");
        // The publishes around it are not refused with it, and the tip
        // after the refusal is the one stored.
        let after = after.receipt().await.unwrap();
        assert_eq!((before.seq, after.seq), (2, 3));
        let head = store.head("roster").unwrap().unwrap().tip;
        assert_eq!((head.seq, head.hash), (3, after.hash));
        assert!(store.idempotency(&[3; 16]).unwrap().is_none());
        // A retry, checked against the head now held, is published.
        let (roster_entry, end) = ending(&x[3]);
        let retried = publisher
            .publish_ending([3; 16], [3; 32], roster_entry, end)
            .await
            .unwrap();
        assert_eq!(retried.seq, 4);
        let next = publisher
            .publish([5; 16], [5; 32], offer("d"))
            .await
            .unwrap();
        assert_eq!(next.seq, 5);
        // And city-x's feed now ends at seq 4 here.
        let late = writer
            .write(Job::entries(vec![Prepared::new(x[4].clone())]))
            .await;
        assert!(
            matches!(
                late,
                Err(WriteError::Chain(FeedError::Replaced { seq: 5, .. }))
            ),
            "{late:?}"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_feed_end_is_signed_once_a_key_rotation_before_it_settled() {
        let dir = tempfile::tempdir().unwrap();
        let store: SharedStore =
            Arc::new(crate::store::SledStore::open(&dir.path().join("store"), 16 << 20).unwrap());
        let (writer, _thread) = Writer::start(store.clone()).unwrap();
        let x = crate::core::feed::tests::chain(&key(2), "city-x", 4);
        let stored = x[..4].iter().cloned().map(Prepared::new).collect();
        writer.write(Job::entries(stored)).await.unwrap();
        let publisher = publisher_over(dir.path(), store.clone(), writer.clone());
        publisher
            .publish([1; 16], [1; 32], offer("a"))
            .await
            .unwrap();
        // A rotation, then a feed end refused (city-x is at seq 4, not 3),
        // then an offer, taken as one batch.
        let (roster_entry, end) = ending(&x[2]);
        let rotation = publisher
            .submit([2; 16], [2; 32], Request::RotateKey)
            .await
            .unwrap();
        let refused = publisher
            .submit_ending([3; 16], [3; 32], roster_entry, end)
            .await
            .unwrap();
        let after = publisher
            .submit([4; 16], [4; 32], offer("b"))
            .await
            .unwrap();
        assert_eq!(rotation.receipt().await.unwrap().seq, 2);
        assert!(refused.receipt().await.is_err());
        assert_eq!(after.receipt().await.unwrap().seq, 3);
        // The refusal did not put the old key back: publishing goes on
        // with the rotated one, which is the key file now.
        let next = publisher
            .publish([5; 16], [5; 32], offer("c"))
            .await
            .unwrap();
        assert_eq!(next.seq, 4);
        let in_file = crate::keys::load_key_file(&dir.path().join("feed.key")).unwrap();
        let signed = store.entries("roster", 4, 1, usize::MAX).unwrap().remove(0);
        crate::core::feed::verify_signature(
            &in_file.verifying_key(),
            &Entry::decode(signed).unwrap(),
        )
        .unwrap();
    }

    #[test]
    fn offer_dates_the_wrong_way_round_are_named_as_dates() {
        let offer = ServiceOffer {
            offer_id: "snow".into(),
            title: "Snow clearing".into(),
            area: 2,
            category: "roads".into(),
            contact_role: "public works".into(),
            valid_from_unix: 1_798_761_600,
            valid_until_unix: 1_767_225_600,
            ..Default::default()
        };
        let err = check_offer(&offer).unwrap_err().to_string();
        assert_eq!(
            err,
            "valid_until: 2026-01-01T00:00:00Z is not after valid_from 2027-01-01T00:00:00Z"
        );
    }

    #[test]
    fn a_record_rebuilt_from_the_feed_knows_its_request_by_outline() {
        let rebuilt = |entries: &[Entry]| {
            let records = Recovery::default().records(entries);
            records.last().map(|(_, r)| r.fingerprint).unwrap()
        };
        // A batch, published as a group whose parts hold its cells in
        // another order, with other values (noise).
        let rows = vec![
            InputRow::new("x", "city-a", "2025", 1.0),
            InputRow::new("y", "city-a", "2025", 2.0),
            InputRow::new("y", "city-a/north", "2025", 3.0),
        ];
        let cell = |indicator: &str, ref_area: &str| Observation {
            indicator: indicator.into(),
            ref_area: ref_area.into(),
            period: "2025".into(),
            value: Some(9.0),
            ..Default::default()
        };
        let group = |part| {
            Some(PublishGroup {
                id: vec![4; 16],
                part,
                count: 2,
            })
        };
        let batch = |observations, part| {
            Payload::Indicators(IndicatorBatch {
                observations,
                group: group(part),
                ..Default::default()
            })
        };
        let feed = [
            own_entry(1, 4, batch(vec![cell("y", "city-a/north")], 0)),
            own_entry(
                2,
                4,
                batch(vec![cell("y", "city-a"), cell("x", "city-a")], 1),
            ),
        ];
        let record = rebuilt(&feed);
        assert_eq!(
            record,
            Outline::of_request(&Request::Indicators(rows.clone()))
        );
        // Another period, a cell left out: another request.
        let mut other_period = rows.clone();
        other_period[1].period = "2024".into();
        let fewer = rows[..2].to_vec();
        for other in [other_period, fewer] {
            assert_ne!(record, Outline::of_request(&Request::Indicators(other)));
        }

        // An offer is known whole.
        let offer = ServiceOffer {
            offer_id: "snow".into(),
            title: "Snow clearing".into(),
            ..Default::default()
        };
        let record = rebuilt(&[own_entry(1, 5, Payload::Offer(offer.clone()))]);
        assert_eq!(record, Outline::of_request(&Request::Offer(offer.clone())));
        let retitled = ServiceOffer {
            title: "Snow ploughing".into(),
            ..offer
        };
        assert_ne!(record, Outline::of_request(&Request::Offer(retitled)));
        let withdraw = Request::Withdraw {
            offer_id: "snow".into(),
            reason: String::new(),
        };
        assert_ne!(record, Outline::of_request(&withdraw), "another kind");

        // A group's retraction: one reason, an entry per part.
        let retraction = |seq| {
            let retraction = Retraction {
                seq,
                reason: "wrong unit".into(),
                ..Default::default()
            };
            own_entry(seq + 2, 6, Payload::Retraction(retraction))
        };
        let record = rebuilt(&[retraction(1), retraction(2)]);
        let retract = |reason: &str| Request::Retract {
            seq: 2,
            reason: reason.into(),
        };
        assert_eq!(record, Outline::of_request(&retract("wrong unit")));
        assert_ne!(record, Outline::of_request(&retract("wrong year")));
    }

    #[test]
    fn the_retractions_of_a_group_are_one_publish() {
        // A group's retraction: one publish, an entry per part, one key.
        let retraction = |seq| own_entry(seq, 9, Payload::Retraction(Default::default()));
        let entries = [
            part(1, 1, None, 3, 1),
            retraction(2),
            retraction(3),
            retraction(4),
        ];
        let mut recovery = Recovery::default();
        let records = counted(&recovery.records(&entries));
        // The last record of a key is the one kept.
        assert_eq!(records.last(), Some(&(9, 2, 4, 0, 0)));
    }
}
