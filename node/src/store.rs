//! The store: the only module that names sled.
//!
//! Everything lives in one sled tree under one-byte prefixes, so that one
//! commit (entries, heads, indexes, idempotency records) is one atomic
//! `Batch`, except the entry bytes of a bulk commit (catch-up): those are
//! appended to the entry log ([`entry_log`]), a file never rewritten, and
//! synced before the batch naming where they lie is written. sled copies a
//! value again at every rewrite of its page, so bulk entry bytes in sled
//! were written to disk several times over. A commit is durable when
//! [`Store::commit`] returns: sled's `flush` only issues `sync_file_range`
//! (no device cache flush, no size metadata; sled issue #1452), so the
//! store then calls `fdatasync` on a handle of sled's `db` file through a
//! [`SyncHook`].
//!
//! sled writes any log item larger than a quarter of its segment (128 KiB)
//! to a blob file it never syncs, and a leaf page holds up to 17 values.
//! Entry chunks are 4 KiB and index rows 13 bytes, so their pages stay well
//! below that; leaves of packed index pieces (about 40 KiB each) and of
//! large single entries (up to 64 KiB) cross it, so every commit fsyncs new
//! blob files (and the blob directory) before it counts as durable.
//!
//! Key layout (`|` is concatenation, strings end with a zero byte, numbers
//! are big-endian):
//! - `m|format` store format version
//! - `m|log_end` length of the entry log after the last bulk commit
//! - `e|origin|first_seq` a chunk of consecutive entries written together,
//!   or where it lies in the entry log (offset, length, CRC-32)
//! - `h|origin` head: feed id, seq, hash, claimed time, receive time
//! - `i|key` idempotency record of an own publish
//! - `o|origin|indicator|edition|ref_area|period|breakdown|seq` observation
//! - `x|origin|seq|position` a packed piece of observation rows written by a
//!   bulk commit (catch-up), folded into `o|` rows later, one atomic batch
//!   per fold; readers merge unfolded pieces, so they see the same rows
//! - `r|origin|seq` retraction marker (value: retracting seq)
//! - `f|origin|offer_id|seq` offer version (value: hash, offer)
//! - `w|origin|offer_id` withdrawal (value: seq)
//! - `p|offer_origin|offer_id|responder|seq` offer response
//! - `M|publisher|member` the latest roster entry a publisher made about a
//!   member (value: seq, then the encoded entry)
//! - `K|origin|seq` key rotation at seq (value: the new 32-byte key)
//! - `b|origin|indicator|edition|period` privacy budget spent (rho in 1e-9,
//!   summed from the debits of the origin's entries), then the seq of the
//!   last entry whose debit it includes
//! - `k|origin` evidence of a conflict (fork or re-created feed): the first
//!   one found (kind, time, peer, the entry held), and `k|origin|1` the
//!   other entry, apart so that each value stays below 96 KiB; replication
//!   of the origin stops while it is held
//! - `g|origin|group_end|low` parts at seqs low..=high (value: high) of a
//!   publish group of the origin that can never complete; their cells are
//!   never answered

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    ops::Bound,
    path::{Path, PathBuf},
    sync::Arc,
};

use bytes::Bytes;
use civex_proto::v1::{OfferResponse, RosterEntry, ServiceOffer, SignedEntry};
use prost::Message;

use self::entry_log::{EntryLog, Locator};
use crate::core::{
    feed::{Conflict, ConflictKind, Entry, FeedId, Hash, Tip, FEED_ID_LEN, SIGNATURE_LEN},
    index::{follow_group, opened_by, IndexRecord, ObservationKey, OpenGroup},
};

mod entry_log;

/// Format version this build writes (2: bulk entry bytes in the entry
/// log; 3: offer records that mark a version never answered, conflict
/// evidence in two values). It reads versions 1 (only chunks in sled) and
/// 2 too, and marks such a store version 3 when it opens it, so that an
/// older build refuses the store instead of misreading those records.
/// Offer versions of entries with unknown fields that a version 2 build
/// stored were not indexed, and are not indexed on upgrade either.
pub const FORMAT_VERSION: u32 = 3;
/// Key of the entry log's recorded length.
const LOG_END_KEY: &[u8] = b"mlog_end";
/// First byte of an `e|` value holding the chunk itself.
const CHUNK_INLINE: u8 = 1;
/// First byte of an `e|` value holding where the chunk lies in the log.
const CHUNK_IN_LOG: u8 = 2;
/// Commits with at least this many bytes of entries write them to the
/// entry log (one more `fdatasync`, paid for by the sled writes saved);
/// smaller ones, every publish among them, keep them in sled.
const LOG_MIN_BYTES: usize = 256 * 1024;
/// Entries are packed into chunks of at most this many bytes (one entry may
/// be larger alone, up to the 64 KiB entry limit), so no value nears 96 KiB.
const CHUNK_BYTES: usize = 4 * 1024;
/// Chunks in the entry log are larger: one read serves a whole message to
/// a subscriber, and sled holds fewer locators.
const LOG_CHUNK_BYTES: usize = 64 * 1024;
/// sled segment size (sled's default): a quarter of it is the blob threshold.
const SEGMENT_BYTES: usize = 512 * 1024;

/// A storage failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The disk or the storage engine failed; writes stop.
    #[error("storage failure in {path}: {message}")]
    Io {
        /// Store directory, or the file in it that failed.
        path: String,
        /// What failed.
        message: String,
    },
    /// The store holds bytes this build cannot read.
    #[error("store {path} is corrupt or of another format: {message}")]
    Corrupt {
        /// Store directory, or the file in it that is damaged.
        path: String,
        /// What is wrong.
        message: String,
    },
}

impl StoreError {
    /// Prefixes the message with what was being read or written.
    fn about(self, what: &str) -> Self {
        match self {
            Self::Io { path, message } => Self::Io {
                path,
                message: format!("{what}: {message}"),
            },
            Self::Corrupt { path, message } => Self::Corrupt {
                path,
                message: format!("{what}: {message}"),
            },
        }
    }
}

/// What a node holds of one origin's feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// Last contiguous verified entry.
    pub tip: Tip,
    /// When this node stored it, microseconds since the epoch.
    pub received_unix_micros: i64,
}

/// What a node remembers of one of its own publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdempotencyRecord {
    /// SHA-256 of the request (never in the signed body).
    pub fingerprint: [u8; 32],
    /// First seq of the publish (below `seq` for a publish group).
    pub first_seq: u64,
    /// Seq of the (last) entry published.
    pub seq: u64,
    /// Hash of that entry.
    pub hash: Hash,
    /// Cells published with a value.
    pub published: u32,
    /// Cells suppressed.
    pub suppressed: u32,
}

/// One atomic, durable commit.
#[derive(Debug, Default)]
pub struct CommitBatch {
    /// Runs of consecutive entries, each of one origin, in seq order.
    pub runs: Vec<Vec<Entry>>,
    /// New heads.
    pub heads: Vec<(String, Head)>,
    /// Index records of the entries.
    pub index: Vec<IndexRecord>,
    /// Idempotency records of own publishes.
    pub idempotency: Vec<([u8; 16], IdempotencyRecord)>,
    /// Conflict evidence found; the first per origin is kept.
    pub conflicts: Vec<ConflictRecord>,
}

/// Evidence that an origin's feed conflicts with the one held.
#[derive(Debug, Clone)]
pub struct ConflictRecord {
    /// The two validly signed entries.
    pub conflict: Conflict,
    /// Peer it came from.
    pub peer: String,
    /// When it was found.
    pub detected_unix_micros: i64,
}

/// An observation row of the index: where the cell is, not the cell (the
/// signed entry holds it; small index values keep ingest fast).
#[derive(Debug, Clone, PartialEq)]
pub struct ObservationRow {
    /// Key.
    pub key: ObservationKey,
    /// Seq of the entry holding it.
    pub seq: u64,
    /// Functional area of the cell.
    pub area: i32,
    /// Position of the cell in the entry's batch.
    pub position: u32,
    /// Last seq of the cell's publish group (0: no group).
    pub group_end: u64,
}

/// An offer version of the index.
#[derive(Debug, Clone, PartialEq)]
pub struct OfferRow {
    /// Origin.
    pub origin: String,
    /// Seq of the entry.
    pub seq: u64,
    /// Version hash.
    pub hash: Hash,
    /// The offer; only its id when not `answerable`.
    pub offer: ServiceOffer,
    /// False when the version's entry has fields this build does not know:
    /// it is the offer's latest all the same, and is never answered.
    pub answerable: bool,
}

/// A response of the index.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseRow {
    /// Responding origin.
    pub responder: String,
    /// Seq of its entry.
    pub seq: u64,
    /// The response.
    pub response: OfferResponse,
}

/// What the node needs from storage.
pub trait Store: Send + Sync + 'static {
    /// Head of an origin, if any entry is held.
    fn head(&self, origin: &str) -> Result<Option<Head>, StoreError>;
    /// Heads of every origin held, by origin.
    fn heads(&self) -> Result<Vec<(String, Head)>, StoreError>;
    /// Up to `max_entries` consecutive entries of `origin` from `from_seq`,
    /// stopping early once `max_bytes` is reached (at least one entry).
    fn entries(
        &self,
        origin: &str,
        from_seq: u64,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<Vec<SignedEntry>, StoreError>;
    /// Applies a commit atomically and returns once it is durable.
    fn commit(&self, batch: &CommitBatch) -> Result<(), StoreError>;
    /// The record of an own publish by idempotency key.
    fn idempotency(&self, key: &[u8; 16]) -> Result<Option<IdempotencyRecord>, StoreError>;
    /// Observation rows in key order, then seq order, of one origin or all,
    /// starting after every row of `after`.
    fn observation_rows<'a>(
        &'a self,
        origin: Option<&str>,
        after: Option<&ObservationKey>,
    ) -> Box<dyn Iterator<Item = Result<ObservationRow, StoreError>> + 'a>;
    /// Privacy budget spent by `origin` on (indicator, edition, period), in
    /// 1e-9 rho (the sum of the debits its entries carry), and the seq of the
    /// last entry included (0: none).
    fn privacy_spent(
        &self,
        origin: &str,
        indicator: &str,
        edition: &str,
        period: &str,
    ) -> Result<(u64, u64), StoreError>;
    /// Whether an entry of `origin` has been retracted.
    fn is_retracted(&self, origin: &str, seq: u64) -> Result<bool, StoreError> {
        Ok(self.retracted_by(origin, seq)?.is_some())
    }
    /// The seq of the entry that (first) retracted `origin`'s entry `seq`,
    /// if any.
    fn retracted_by(&self, origin: &str, seq: u64) -> Result<Option<u64>, StoreError>;
    /// The seq ranges (low, high) of `origin`'s entries whose cells claim
    /// `group_end` and belong to a publish group that can never complete:
    /// the feed goes on past a part with something other than the group's
    /// next part.
    fn broken_parts(&self, origin: &str, group_end: u64) -> Result<Vec<(u64, u64)>, StoreError>;
    /// Folds up to `limit` packed index pieces into the ordered observation
    /// index, each fold one atomic batch; returns how many were folded.
    /// Readers see the same rows before and after.
    fn merge_index_pieces(&self, limit: usize) -> Result<usize, StoreError>;
    /// Packed index pieces not folded yet.
    fn index_pieces_pending(&self) -> Result<u64, StoreError>;
    /// Offer versions held, by origin, offer id and seq, from the offer
    /// after `after` (an origin and offer id; none: from the first).
    fn offer_versions<'a>(
        &'a self,
        after: Option<(&str, &str)>,
    ) -> Box<dyn Iterator<Item = Result<OfferRow, StoreError>> + 'a>;
    /// The versions held of one offer, in seq order.
    fn offer_versions_of(&self, origin: &str, offer_id: &str) -> Result<Vec<OfferRow>, StoreError>;
    /// Seq of the withdrawal of (origin, offer id), if withdrawn.
    fn withdrawal(&self, origin: &str, offer_id: &str) -> Result<Option<u64>, StoreError>;
    /// Responses held for (offer origin, offer id), by responder and seq.
    fn responses<'a>(
        &'a self,
        offer_origin: &str,
        offer_id: &str,
    ) -> Box<dyn Iterator<Item = Result<ResponseRow, StoreError>> + 'a>;
    /// Conflict evidence held, one record per origin.
    fn conflicts(&self) -> Result<Vec<ConflictRecord>, StoreError>;
    /// The conflict evidence held for `origin`, if any.
    fn conflict(&self, origin: &str) -> Result<Option<ConflictRecord>, StoreError> {
        Ok(self
            .conflicts()?
            .into_iter()
            .find(|record| record.conflict.held.body.origin == origin))
    }
    /// Key rotations of an origin's feed held: (seq, new key), in seq order.
    fn rotations(&self, origin: &str) -> Result<Vec<(u64, [u8; 32])>, StoreError>;
    /// The latest roster entry `publisher` made about each member.
    fn roster(&self, publisher: &str) -> Result<Vec<RosterEntry>, StoreError>;
}

/// Makes a commit durable once sled has written it. The default calls
/// `fdatasync` on sled's `db` file; tests inject their own.
pub type SyncHook = Box<dyn Fn() -> std::io::Result<()> + Send + Sync>;

/// An offer record's value after the hash, for a version never answered.
/// Field number 0 is not valid protobuf, so no encoded offer is this byte.
const NOT_ANSWERABLE: u8 = 0;

/// The sled-backed store.
pub struct SledStore {
    db: sled::Db,
    path: PathBuf,
    sync: SyncHook,
    /// Blob files already fsynced.
    synced_blobs: std::sync::Mutex<std::collections::HashSet<std::ffi::OsString>>,
    log: EntryLog,
    /// The publish group each origin's head leaves open, by origin: derived
    /// from the head entry, read at an origin's first commit after open.
    open_groups: std::sync::Mutex<HashMap<String, Option<OpenGroup>>>,
}

fn sled_error(path: &Path) -> impl Fn(sled::Error) -> StoreError + '_ {
    move |err| StoreError::Io {
        path: path.display().to_string(),
        message: err.to_string(),
    }
}

fn io_error(path: &Path, what: &str, err: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.display().to_string(),
        message: format!("{what}: {err}"),
    }
}

impl SledStore {
    /// The publish group that `origin`'s entry before `seq` left open: its
    /// parts before it are taken as given (were they not, the group was
    /// marked broken when they were stored).
    fn group_opened_before(&self, origin: &str, seq: u64) -> Result<Option<OpenGroup>, StoreError> {
        if seq <= 1 {
            return Ok(None);
        }
        let before = self.entries(origin, seq - 1, 1, 1)?;
        Ok(before
            .into_iter()
            .next()
            .and_then(|signed| Entry::decode(signed).ok())
            .filter(|entry| entry.body.seq == seq - 1)
            .and_then(|entry| opened_by(&entry)))
    }

    /// The budget spent recorded under a `b|` key and the seq it is as of
    /// ((0, 0) when none).
    fn spent_at(&self, key: &[u8]) -> Result<(u64, u64), StoreError> {
        let Some(value) = self.db.get(key).map_err(sled_error(&self.path))? else {
            return Ok((0, 0));
        };
        let number = |range: std::ops::Range<usize>| {
            value
                .get(range)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
        };
        match (value.len(), number(0..8), number(8..16)) {
            (16, Some(spent), Some(last)) => Ok((spent, last)),
            _ => Err(self.corrupt("a privacy budget record does not decode".into())),
        }
    }

    /// Opens (or creates) the store in `dir`, durable through `fdatasync`.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        Self::open_with_sync(dir, cache_bytes, None)
    }

    /// Opens the store in `dir` to read it (`civex verify`): a store must
    /// be there, and one of an older format is not marked this build's, so
    /// the build that wrote it still opens it.
    pub fn open_existing(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = dir.join("db");
        if !std::fs::metadata(&db).is_ok_and(|m| m.len() > 0) {
            return Err(StoreError::Io {
                path: dir.display().to_string(),
                message: "no store here (no sled `db` file); check data_dir in the config, or \
                          CIVEX_DATA_DIR"
                    .into(),
            });
        }
        Self::open_as(dir, cache_bytes, None, false)
    }

    /// The entry log and its bytes past the length the store recorded,
    /// left in place by [`Self::open_existing`]: the end of a commit a crash cut
    /// short (the node moves it aside at its next start), or commits
    /// that sled lost (a damaged `db`).
    pub fn unrecorded_log(&self) -> Option<(&Path, u64)> {
        self.log.unrecorded()
    }

    /// Opens the store with a custom sync hook (tests), or the default.
    pub fn open_with_sync(
        dir: &Path,
        cache_bytes: u64,
        sync: Option<SyncHook>,
    ) -> Result<Self, StoreError> {
        Self::open_as(dir, cache_bytes, sync, true)
    }

    /// Opens (with `writable`: creates, or marks this build's format) the
    /// store in `dir`.
    fn open_as(
        dir: &Path,
        cache_bytes: u64,
        sync: Option<SyncHook>,
        writable: bool,
    ) -> Result<Self, StoreError> {
        let path = dir.to_path_buf();
        std::fs::create_dir_all(dir)
            .map_err(|e| io_error(dir, "cannot create store directory", e))?;
        let db = open_sled(dir, cache_bytes)?;
        let sync = match sync {
            Some(sync) => sync,
            None => {
                let db_file = File::open(dir.join("db"))
                    .map_err(|e| io_error(dir, "cannot open sled's db file for fdatasync", e))?;
                Box::new(move || db_file.sync_data())
            }
        };
        check_format(&db, &path, writable)?;
        let log_end = match db.get(LOG_END_KEY).map_err(sled_error(&path))? {
            None => 0,
            Some(value) => <[u8; 8]>::try_from(value.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| corrupt(&path, "the entry log's length does not decode".into()))?,
        };
        let store = Self {
            log: EntryLog::open(dir, log_end, || named_log_end(&db, dir), writable)?,
            db,
            path,
            sync,
            synced_blobs: Default::default(),
            open_groups: Default::default(),
        };
        store.sync_new_files()?;
        Ok(store)
    }

    /// sled never fsyncs its `conf` file or directories: do it once per open.
    fn sync_new_files(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(sled_error(&self.path))?;
        (self.sync)().map_err(|e| io_error(&self.path, "fdatasync of the store", e))?;
        for file in ["conf", "db"] {
            let path = self.path.join(file);
            if path.exists() {
                File::open(&path)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| io_error(&self.path, "fsync of sled's files", e))?;
            }
        }
        for dir in [Some(self.path.as_path()), self.path.parent()]
            .into_iter()
            .flatten()
        {
            File::open(dir)
                .and_then(|f| f.sync_all())
                .map_err(|e| io_error(&self.path, "fsync of the store directory", e))?;
        }
        Ok(())
    }

    /// fsyncs blob files sled wrote since the last commit, and their directory.
    fn sync_blobs(&self) -> Result<(), StoreError> {
        let dir = self.path.join("blobs");
        let listing = match std::fs::read_dir(&dir) {
            Ok(listing) => listing,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(err) => return Err(io_error(&self.path, "listing blobs", err)),
        };
        let mut synced = self.synced_blobs.lock().map_err(|_| {
            io_error(
                &self.path,
                "blob sync",
                std::io::Error::other("poisoned lock"),
            )
        })?;
        let mut present = std::collections::HashSet::new();
        let mut new = false;
        for item in listing {
            let item = item.map_err(|e| io_error(&self.path, "listing blobs", e))?;
            let name = item.file_name();
            if !synced.contains(&name) {
                match File::open(item.path()).and_then(|f| f.sync_all()) {
                    Ok(()) => new = true,
                    // Garbage-collected by sled meanwhile: nothing to keep.
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(err) => return Err(io_error(&self.path, "fsync of a blob file", err)),
                }
            }
            present.insert(name);
        }
        if new {
            File::open(&dir)
                .and_then(|f| f.sync_all())
                .map_err(|e| io_error(&self.path, "fsync of the blob directory", e))?;
        }
        *synced = present;
        Ok(())
    }

    /// Index rows still in packed pieces, of one origin or all.
    fn piece_rows(&self, origin: Option<&str>) -> Result<Vec<IndexRow>, StoreError> {
        let prefix = match origin {
            Some(origin) => key_of(b'x', &[origin], None),
            None => vec![b'x'],
        };
        let mut rows = Vec::new();
        for item in self.db.scan_prefix(prefix) {
            let (_, value) = item.map_err(sled_error(&self.path))?;
            rows.extend(
                decode_piece(&value)
                    .ok_or_else(|| self.corrupt("an index piece does not decode".into()))?,
            );
        }
        Ok(rows)
    }

    /// Decodes an `o|` index row.
    fn observation_row(&self, key: &[u8], value: &[u8]) -> Result<ObservationRow, StoreError> {
        let (parts, seq) = split_key(key, 1, 6)
            .ok_or_else(|| self.corrupt("an observation key does not decode".into()))?;
        if value.len() != OBSERVATION_VALUE_LEN {
            return Err(self.corrupt("an observation index value does not decode".into()));
        }
        let mut group_end = [0u8; 8];
        group_end.copy_from_slice(&value[5..13]);
        let mut parts = parts.into_iter();
        let mut next = || parts.next().unwrap_or_default();
        Ok(ObservationRow {
            key: ObservationKey {
                origin: next(),
                indicator: next(),
                catalog_edition: next(),
                ref_area: next(),
                period: next(),
                breakdown: next(),
            },
            seq: seq.unwrap_or_default(),
            area: i32::from(value[0]),
            position: u32::from_be_bytes([value[1], value[2], value[3], value[4]]),
            group_end: u64::from_be_bytes(group_end),
        })
    }

    /// Whether a value written at `key` is its first one: none is stored,
    /// and none was written earlier in this batch (`written`, which then
    /// takes it; sled shows a batch only once applied).
    fn is_first(&self, key: &[u8], written: &mut HashSet<Vec<u8>>) -> Result<bool, StoreError> {
        if written.contains(key) || self.db.get(key).map_err(sled_error(&self.path))?.is_some() {
            return Ok(false);
        }
        written.insert(key.to_vec());
        Ok(true)
    }

    fn corrupt(&self, message: String) -> StoreError {
        corrupt(&self.path, message)
    }

    /// Decodes an offer version record (`f` origin, offer id, seq).
    fn offer_row(
        &self,
        item: sled::Result<(sled::IVec, sled::IVec)>,
    ) -> Result<OfferRow, StoreError> {
        let (key, value) = item.map_err(sled_error(&self.path))?;
        let decoded =
            split_key(&key, 1, 2)
                .zip(value.get(..32))
                .and_then(|((parts, seq), hash)| {
                    let answerable = value[32..] != [NOT_ANSWERABLE];
                    let offer = match answerable {
                        true => ServiceOffer::decode(&value[32..]).ok()?,
                        false => ServiceOffer {
                            offer_id: parts[1].clone(),
                            ..Default::default()
                        },
                    };
                    Some(OfferRow {
                        origin: parts[0].clone(),
                        seq: seq?,
                        hash: hash.try_into().ok()?,
                        offer,
                        answerable,
                    })
                });
        decoded.ok_or_else(|| self.corrupt("an offer record does not decode".into()))
    }
}

fn corrupt(path: &Path, message: String) -> StoreError {
    StoreError::Corrupt {
        path: path.display().to_string(),
        message,
    }
}

/// The end of the last entry log chunk that `db` names (reads every `e|`
/// value: the entry log asks only when it has bytes to cut off).
fn named_log_end(db: &sled::Db, dir: &Path) -> Result<u64, StoreError> {
    let mut named_end = 0;
    for item in db.scan_prefix(b"e") {
        let (_, value) = item.map_err(sled_error(dir))?;
        if value.first() == Some(&CHUNK_IN_LOG) {
            let at = Locator::decode(&value[1..])
                .ok_or_else(|| corrupt(dir, "an entry locator does not decode".into()))?;
            named_end = named_end.max(at.offset + u64::from(at.len));
        }
    }
    Ok(named_end)
}

/// Checks the format version of `db`, recording it in a new store.
/// Checks the store's format version; with `writable`, marks a store of
/// an older format (or a new one) as this build's.
fn check_format(db: &sled::Db, path: &Path, writable: bool) -> Result<(), StoreError> {
    let key = b"mformat";
    match db.get(key).map_err(sled_error(path))? {
        Some(value) => {
            let version = <[u8; 4]>::try_from(value.as_ref())
                .ok()
                .map(u32::from_be_bytes);
            match version {
                Some(FORMAT_VERSION) => {}
                Some(1 | 2) if !writable => {}
                Some(1 | 2) => {
                    db.insert(key, &FORMAT_VERSION.to_be_bytes())
                        .map_err(sled_error(path))?;
                }
                Some(other) => {
                    return Err(corrupt(
                        path,
                        format!(
                            "format version {other}, this build reads versions 1 to \
                             {FORMAT_VERSION} (a newer build wrote it?)"
                        ),
                    ))
                }
                None => return Err(corrupt(path, "the format version does not decode".into())),
            }
        }
        None => {
            if db.iter().next().is_some() {
                return Err(corrupt(path, "no format version recorded".into()));
            }
            if !writable {
                return Ok(());
            }
            db.insert(key, &FORMAT_VERSION.to_be_bytes())
                .map_err(sled_error(path))?;
        }
    }
    Ok(())
}

/// Bytes of an observation index value: area, position, group end.
const OBSERVATION_VALUE_LEN: usize = 13;
/// Observation index rows per packed piece at most (about 40 KiB of rows
/// with short key parts).
const PIECE_ROWS: usize = 600;
/// Encoded bytes per packed piece at most, unless its one row is larger:
/// long key parts would make 600 rows far larger than the 96 KiB a sled
/// value may hold (rule 8), while one row stays below the 64 KiB entry
/// limit that bounds its key.
const PIECE_BYTES: usize = 40 * 1024;
/// Commits with fewer observation rows write them straight to the index.
const PIECE_MIN_ROWS: usize = 1024;

/// An observation index row: its full `o|` key and its value.
type IndexRow = (Vec<u8>, [u8; OBSERVATION_VALUE_LEN]);

/// A packed piece a bulk commit is filling.
struct Piece {
    /// Origin of its rows.
    origin: String,
    /// Seq and position of its first row, which name the piece.
    first: (u64, u32),
    /// Its rows, in the commit's order.
    rows: Vec<IndexRow>,
    /// Encoded length of `rows`.
    bytes: usize,
}

/// Bytes of `key` and its value in an encoded piece.
fn piece_row_bytes(key: &[u8]) -> usize {
    2 + key.len() + OBSERVATION_VALUE_LEN
}

fn encode_piece(rows: &[IndexRow]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows.iter().map(|(k, _)| piece_row_bytes(k)).sum());
    for (key, value) in rows {
        out.extend_from_slice(&(key.len() as u16).to_be_bytes());
        out.extend_from_slice(key);
        out.extend_from_slice(value);
    }
    out
}

fn decode_piece(bytes: &[u8]) -> Option<Vec<IndexRow>> {
    let mut rows = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let len = u16::from_be_bytes(bytes.get(at..at + 2)?.try_into().ok()?) as usize;
        at += 2;
        let key = bytes.get(at..at + len)?.to_vec();
        at += len;
        let value = bytes.get(at..at + OBSERVATION_VALUE_LEN)?.try_into().ok()?;
        at += OBSERVATION_VALUE_LEN;
        rows.push((key, value));
    }
    Some(rows)
}

/// Clears what sled left unfinished when the process was killed while it
/// opened the store, which would make every later open fail ("Read
/// corrupted data"):
/// - snapshot files `snap.*.generating`: sled 0.34.7 writes a snapshot on
///   every open to that name and renames it once synced, but reads the
///   newest `snap.*` file whatever its suffix. The snapshot only speeds up
///   recovery; the previous one, or the log, stands in for it;
/// - a `conf` cut short while the store was first created (sled writes it
///   before it creates `db`): only while `db` is absent or empty, so
///   nothing was ever stored.
///
/// Done only while holding sled's lock on `db`, taken as sled takes it
/// (`flock`, exclusive): no other process has the store open, so no
/// snapshot is being written.
fn clear_interrupted_open(dir: &Path) -> Result<(), StoreError> {
    let db = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(false)
        .open(dir.join("db"))
        .map_err(|e| io_error(dir, "cannot open sled's db file", e))?;
    match db.try_lock() {
        Ok(()) => {}
        // Another process has the store open: opening sled reports it.
        Err(std::fs::TryLockError::WouldBlock) => return Ok(()),
        Err(std::fs::TryLockError::Error(err)) => {
            return Err(io_error(dir, "cannot lock sled's db file", err))
        }
    }
    let empty = db
        .metadata()
        .map_err(|e| io_error(dir, "cannot read sled's db file", e))?
        .len()
        == 0;
    let conf = dir.join("conf");
    if empty && conf.exists() {
        std::fs::remove_file(&conf).map_err(|e| io_error(dir, "cannot remove conf", e))?;
        tracing::warn!(store = %dir.display(), "removed the conf of a store whose creation was cut short; it is created again");
    }
    let listing = std::fs::read_dir(dir).map_err(|e| io_error(dir, "cannot list", e))?;
    for file in listing.flatten() {
        let name = file.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            std::fs::remove_file(file.path())
                .map_err(|e| io_error(dir, &format!("cannot remove {name}"), e))?;
            tracing::warn!(store = %dir.display(), file = %name, "removed a storage snapshot left unfinished by a crash; the store recovers from its log");
        }
    }
    Ok(())
}

/// Opens sled. sled's io threads can hold the store's file lock for a
/// moment after the previous handle in this process was dropped, so a lock
/// conflict is retried for a short, bounded time before it is reported.
fn open_sled(dir: &Path, cache_bytes: u64) -> Result<sled::Db, StoreError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        clear_interrupted_open(dir)?;
        let opened = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .segment_size(SEGMENT_BYTES)
            .flush_every_ms(None)
            .open();
        match opened {
            Ok(db) => return Ok(db),
            Err(err) => {
                let message = err.to_string();
                if !message.contains("could not acquire lock") {
                    return Err(sled_error(dir)(err));
                }
                if std::time::Instant::now() >= deadline {
                    return Err(StoreError::Io {
                        path: dir.display().to_string(),
                        message: format!(
                            "store is in use by another process (is civex-node running?): {message}"
                        ),
                    });
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

fn key_of(prefix: u8, parts: &[&str], seq: Option<u64>) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + parts.iter().map(|p| p.len() + 1).sum::<usize>() + 8);
    key.push(prefix);
    for part in parts {
        key.extend_from_slice(part.as_bytes());
        key.push(0);
    }
    if let Some(seq) = seq {
        key.extend_from_slice(&seq.to_be_bytes());
    }
    key
}

fn split_key(key: &[u8], prefix_len: usize, parts: usize) -> Option<(Vec<String>, Option<u64>)> {
    let mut rest = key.get(prefix_len..)?;
    let mut out = Vec::with_capacity(parts);
    for _ in 0..parts {
        let end = rest.iter().position(|b| *b == 0)?;
        out.push(String::from_utf8(rest[..end].to_vec()).ok()?);
        rest = &rest[end + 1..];
    }
    let seq = match rest.len() {
        0 => None,
        8 => Some(u64::from_be_bytes(rest.try_into().ok()?)),
        _ => return None,
    };
    Some((out, seq))
}

fn encode_head(head: &Head) -> Vec<u8> {
    let mut out = Vec::with_capacity(72);
    out.extend_from_slice(&head.tip.feed_id);
    out.extend_from_slice(&head.tip.seq.to_be_bytes());
    out.extend_from_slice(&head.tip.hash);
    out.extend_from_slice(&head.tip.time_unix_micros.to_be_bytes());
    out.extend_from_slice(&head.received_unix_micros.to_be_bytes());
    out
}

fn decode_head(bytes: &[u8]) -> Option<Head> {
    if bytes.len() != 72 {
        return None;
    }
    let feed_id: FeedId = bytes[0..16].try_into().ok()?;
    Some(Head {
        tip: Tip {
            feed_id,
            seq: u64::from_be_bytes(bytes[16..24].try_into().ok()?),
            hash: bytes[24..56].try_into().ok()?,
            time_unix_micros: i64::from_be_bytes(bytes[56..64].try_into().ok()?),
        },
        received_unix_micros: i64::from_be_bytes(bytes[64..72].try_into().ok()?),
    })
}

/// Appends the chunk of `entries` to `out`.
fn encode_chunk(entries: &[Entry], out: &mut Vec<u8>) {
    let size: usize = entries
        .iter()
        .map(|e| 4 + e.signed.body.len() + SIGNATURE_LEN)
        .sum();
    out.reserve(1 + size);
    out.push(CHUNK_INLINE);
    for entry in entries {
        out.extend_from_slice(&(entry.signed.body.len() as u32).to_be_bytes());
        out.extend_from_slice(&entry.signed.body);
        out.extend_from_slice(&entry.signed.signature);
    }
}

fn decode_chunk(bytes: Bytes) -> Option<Vec<SignedEntry>> {
    if bytes.first() != Some(&CHUNK_INLINE) {
        return None;
    }
    let mut entries = Vec::new();
    let mut at = 1;
    while at < bytes.len() {
        let len = u32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize;
        at += 4;
        let body_end = at.checked_add(len)?;
        let sig_end = body_end.checked_add(SIGNATURE_LEN)?;
        if sig_end > bytes.len() {
            return None;
        }
        entries.push(SignedEntry {
            body: bytes.slice(at..body_end),
            signature: bytes.slice(body_end..sig_end),
        });
        at = sig_end;
    }
    Some(entries)
}

/// A conflict record as two values, each below the 96 KiB a sled value may
/// hold (two entries of up to 64 KiB would not be): `k|origin` with the
/// kind, time, peer and the entry held, and `k|origin|1` with the other.
fn encode_conflict(record: &ConflictRecord) -> (Vec<u8>, Vec<u8>) {
    let mut out = vec![match record.conflict.kind {
        ConflictKind::Fork => 1,
        ConflictKind::Recreated => 2,
    }];
    out.extend_from_slice(&record.detected_unix_micros.to_be_bytes());
    let peer = record.peer.as_bytes();
    let peer = &peer[..peer.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(peer.len() as u16).to_be_bytes());
    out.extend_from_slice(peer);
    encode_chunk(std::slice::from_ref(&record.conflict.held), &mut out);
    let mut other = Vec::new();
    encode_chunk(std::slice::from_ref(&record.conflict.other), &mut other);
    (out, other)
}

/// Reads a conflict record: `value` holds both entries (as stores before
/// the split wrote it) or the held one, the other then in `other`.
fn decode_conflict(value: &[u8], other: Option<&[u8]>) -> Option<ConflictRecord> {
    let kind = match value.first()? {
        1 => ConflictKind::Fork,
        2 => ConflictKind::Recreated,
        _ => return None,
    };
    let detected_unix_micros = i64::from_be_bytes(value.get(1..9)?.try_into().ok()?);
    let peer_len = u16::from_be_bytes(value.get(9..11)?.try_into().ok()?) as usize;
    let peer = String::from_utf8(value.get(11..11 + peer_len)?.to_vec()).ok()?;
    let mut entries =
        decode_chunk(Bytes::copy_from_slice(value.get(11 + peer_len..)?))?.into_iter();
    let held = Entry::decode(entries.next()?).ok()?;
    let other = match entries.next() {
        Some(other) => other,
        None => decode_chunk(Bytes::copy_from_slice(other?))?
            .into_iter()
            .next()?,
    };
    let other = Entry::decode(other).ok()?;
    Some(ConflictRecord {
        conflict: Conflict { kind, held, other },
        peer,
        detected_unix_micros,
    })
}

impl Store for SledStore {
    fn head(&self, origin: &str) -> Result<Option<Head>, StoreError> {
        let key = key_of(b'h', &[origin], None);
        match self.db.get(key).map_err(sled_error(&self.path))? {
            None => Ok(None),
            Some(value) => decode_head(&value)
                .map(Some)
                .ok_or_else(|| self.corrupt(format!("head of {origin:?} does not decode"))),
        }
    }

    fn heads(&self) -> Result<Vec<(String, Head)>, StoreError> {
        let mut heads = Vec::new();
        for item in self.db.scan_prefix([b'h']) {
            let (key, value) = item.map_err(sled_error(&self.path))?;
            let (parts, _) = split_key(&key, 1, 1)
                .ok_or_else(|| self.corrupt("a head key does not decode".into()))?;
            let head = decode_head(&value)
                .ok_or_else(|| self.corrupt(format!("head of {:?} does not decode", parts[0])))?;
            heads.push((parts[0].clone(), head));
        }
        Ok(heads)
    }

    fn entries(
        &self,
        origin: &str,
        from_seq: u64,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<Vec<SignedEntry>, StoreError> {
        let prefix = key_of(b'e', &[origin], None);
        let start = key_of(b'e', &[origin], Some(from_seq.max(1)));
        // The chunk holding `from_seq` starts at or before it.
        let first_chunk = self
            .db
            .range(prefix.clone()..=start)
            .next_back()
            .transpose()
            .map_err(sled_error(&self.path))?;
        let Some((first_key, _)) = first_chunk else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        let mut bytes = 0;
        for item in self.db.range(first_key..) {
            let (key, value) = item.map_err(sled_error(&self.path))?;
            if !key.starts_with(&prefix) {
                break;
            }
            let first_seq = split_key(&key, 1, 1)
                .and_then(|(_, seq)| seq)
                .ok_or_else(|| {
                    self.corrupt(format!("an entry key of {origin:?} does not decode"))
                })?;
            let undecodable = || {
                self.corrupt(format!(
                    "entries of {origin:?} from seq {first_seq} do not decode"
                ))
            };
            let chunk = match value.first() {
                Some(&CHUNK_IN_LOG) => {
                    let at = Locator::decode(&value[1..]).ok_or_else(undecodable)?;
                    let chunk = self.log.read(at).map_err(|err| {
                        err.about(&format!("entries of {origin:?} from seq {first_seq}"))
                    })?;
                    Bytes::from(chunk)
                }
                _ => Bytes::copy_from_slice(&value),
            };
            let chunk = decode_chunk(chunk).ok_or_else(undecodable)?;
            for (offset, entry) in chunk.into_iter().enumerate() {
                if first_seq + offset as u64 >= from_seq {
                    bytes += entry.body.len() + entry.signature.len();
                    out.push(entry);
                    if out.len() >= max_entries || bytes >= max_bytes {
                        return Ok(out);
                    }
                }
            }
        }
        Ok(out)
    }

    fn commit(&self, commit: &CommitBatch) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        let entry_size = |e: &Entry| 4 + e.signed.body.len() + SIGNATURE_LEN;
        let total: usize = commit.runs.iter().flatten().map(entry_size).sum();
        let in_log = total >= LOG_MIN_BYTES;
        let chunk_bytes = if in_log { LOG_CHUNK_BYTES } else { CHUNK_BYTES };
        let mut chunks = Vec::new();
        let mut encoded = Vec::with_capacity(total + commit.runs.len());
        for run in &commit.runs {
            let mut rest = run.as_slice();
            while let Some(first) = rest.first() {
                let mut take = 0;
                let mut size = 0;
                for entry in rest {
                    let entry_size = entry_size(entry);
                    if take > 0 && size + entry_size > chunk_bytes {
                        break;
                    }
                    take += 1;
                    size += entry_size;
                }
                let key = key_of(b'e', &[&first.body.origin], Some(first.body.seq));
                let start = encoded.len();
                encode_chunk(&rest[..take], &mut encoded);
                chunks.push((key, start..encoded.len()));
                rest = &rest[take..];
            }
        }
        // Held to the end of the commit, so batches record log lengths in
        // the order the appends happened.
        let mut log_end = self.log.lock()?;
        let mut open_groups = self.open_groups.lock().map_err(|_| {
            io_error(
                &self.path,
                "publish groups",
                std::io::Error::other("poisoned lock"),
            )
        })?;
        let mut groups_after: HashMap<&str, Option<OpenGroup>> = HashMap::new();
        for run in &commit.runs {
            let Some(first) = run.first() else { continue };
            let origin = first.body.origin.as_str();
            let mut open = match groups_after.get(origin).or(open_groups.get(origin)) {
                Some(open) => open.clone(),
                None => self.group_opened_before(origin, first.body.seq)?,
            };
            for entry in run {
                let (next, broken) = follow_group(open.as_ref(), entry);
                for parts in broken {
                    let mut key = key_of(b'g', &[origin], Some(parts.end));
                    key.extend_from_slice(&parts.low.to_be_bytes());
                    batch.insert(key, &parts.high.to_be_bytes());
                }
                open = next;
            }
            groups_after.insert(origin, open);
        }
        if in_log {
            // Synced before the batch naming the chunks is written (see
            // `entry_log`).
            let start = *log_end;
            self.log.append(&mut log_end, &encoded)?;
            for (key, range) in chunks {
                let chunk = &encoded[range.clone()];
                let at = Locator {
                    offset: start + range.start as u64,
                    len: chunk.len() as u32,
                    crc: crc32fast::hash(chunk),
                };
                let mut value = vec![CHUNK_IN_LOG];
                value.extend_from_slice(&at.encode());
                batch.insert(key, value);
            }
            batch.insert(LOG_END_KEY, &log_end.to_be_bytes()[..]);
        } else {
            for (key, range) in chunks {
                batch.insert(key, &encoded[range]);
            }
        }
        for (origin, head) in &commit.heads {
            batch.insert(key_of(b'h', &[origin], None), encode_head(head));
        }
        // A bulk commit (catch-up) writes its observation rows in packed
        // pieces, folded into the ordered index later (`merge_index_pieces`);
        // small commits write them directly.
        let observation_rows = commit
            .index
            .iter()
            .filter(|r| matches!(r, IndexRecord::Observation { .. }))
            .count();
        let bulk = observation_rows >= PIECE_MIN_ROWS;
        let mut pieces: Vec<Piece> = Vec::new();
        let mut debits: HashMap<Vec<u8>, (u64, u64)> = HashMap::new();
        // Keys whose first value stays, written in this batch.
        let mut first_written: HashSet<Vec<u8>> = HashSet::new();
        for record in &commit.index {
            match record {
                IndexRecord::Observation {
                    key,
                    seq,
                    area,
                    position,
                    group_end,
                } => {
                    let mut value = [0u8; OBSERVATION_VALUE_LEN];
                    value[0] = u8::try_from(*area).unwrap_or(0);
                    value[1..5].copy_from_slice(&position.to_be_bytes());
                    value[5..].copy_from_slice(&group_end.to_be_bytes());
                    let row = (key_of(b'o', &key.parts(), Some(*seq)), value);
                    if bulk {
                        let row_bytes = piece_row_bytes(&row.0);
                        match pieces.last_mut() {
                            Some(piece)
                                if piece.origin == key.origin
                                    && piece.rows.len() < PIECE_ROWS
                                    && piece.bytes + row_bytes <= PIECE_BYTES =>
                            {
                                piece.rows.push(row);
                                piece.bytes += row_bytes;
                            }
                            _ => pieces.push(Piece {
                                origin: key.origin.clone(),
                                first: (*seq, *position),
                                rows: vec![row],
                                bytes: row_bytes,
                            }),
                        }
                    } else {
                        batch.insert(row.0, &row.1[..]);
                    }
                }
                IndexRecord::OfferVersion {
                    origin,
                    seq,
                    hash,
                    offer,
                    answerable,
                } => {
                    let mut value = hash.to_vec();
                    if *answerable {
                        value.extend_from_slice(&offer.encode_to_vec());
                    } else {
                        value.push(NOT_ANSWERABLE);
                    }
                    batch.insert(key_of(b'f', &[origin, &offer.offer_id], Some(*seq)), value);
                }
                IndexRecord::Withdrawal {
                    origin,
                    offer_id,
                    seq,
                } => {
                    let key = key_of(b'w', &[origin, offer_id], None);
                    // Withdrawal is final: the first one stays.
                    if self.is_first(&key, &mut first_written)? {
                        batch.insert(key, &seq.to_be_bytes());
                    }
                }
                IndexRecord::Response {
                    responder,
                    seq,
                    response,
                } => {
                    let key = key_of(
                        b'p',
                        &[&response.offer_origin, &response.offer_id, responder],
                        Some(*seq),
                    );
                    batch.insert(key, response.encode_to_vec());
                }
                IndexRecord::Roster {
                    publisher,
                    seq,
                    entry,
                } => {
                    let mut value = seq.to_be_bytes().to_vec();
                    value.extend_from_slice(&entry.encode_to_vec());
                    batch.insert(key_of(b'M', &[publisher, &entry.origin], None), value);
                }
                IndexRecord::KeyRotation {
                    origin,
                    seq,
                    new_key,
                } => {
                    batch.insert(key_of(b'K', &[origin], Some(*seq)), &new_key[..]);
                }
                IndexRecord::PrivacyDebit {
                    origin,
                    seq,
                    indicator,
                    edition,
                    period,
                    rho_nanos,
                } => {
                    let key = key_of(b'b', &[origin, indicator, edition, period], None);
                    let (spent, last) = match debits.get(&key) {
                        Some(known) => *known,
                        None => self.spent_at(&key)?,
                    };
                    debits.insert(key, (spent.saturating_add(*rho_nanos), last.max(*seq)));
                }
                IndexRecord::Retraction {
                    origin,
                    retracted_seq,
                    by_seq,
                    ..
                } => {
                    // The first retraction stays: the entry is retracted
                    // from it on (a feed may hold a second one).
                    let key = key_of(b'r', &[origin], Some(*retracted_seq));
                    if self.is_first(&key, &mut first_written)? {
                        batch.insert(key, &by_seq.to_be_bytes());
                    }
                }
            }
        }
        for piece in pieces {
            let (seq, position) = piece.first;
            let mut key = key_of(b'x', &[&piece.origin], Some(seq));
            key.extend_from_slice(&position.to_be_bytes());
            batch.insert(key, encode_piece(&piece.rows));
        }
        for (key, (spent, last)) in debits {
            let mut value = spent.to_be_bytes().to_vec();
            value.extend_from_slice(&last.to_be_bytes());
            batch.insert(key, value);
        }
        for (key, record) in &commit.idempotency {
            let mut value = Vec::with_capacity(88);
            value.extend_from_slice(&record.fingerprint);
            value.extend_from_slice(&record.seq.to_be_bytes());
            value.extend_from_slice(&record.hash);
            value.extend_from_slice(&record.published.to_be_bytes());
            value.extend_from_slice(&record.suppressed.to_be_bytes());
            value.extend_from_slice(&record.first_seq.to_be_bytes());
            let mut full_key = vec![b'i'];
            full_key.extend_from_slice(key);
            batch.insert(full_key, value);
        }
        for record in &commit.conflicts {
            let key = key_of(b'k', &[&record.conflict.held.body.origin], None);
            // The first evidence of an origin stays.
            if self.is_first(&key, &mut first_written)? {
                let (first, other) = encode_conflict(record);
                let origin = &record.conflict.held.body.origin;
                batch.insert(key_of(b'k', &[origin], Some(1)), other);
                batch.insert(key, first);
            }
        }
        let applied = (|| {
            self.db.apply_batch(batch).map_err(sled_error(&self.path))?;
            self.db.flush().map_err(sled_error(&self.path))?;
            self.sync_blobs()?;
            (self.sync)().map_err(|e| io_error(&self.path, "fdatasync of the store", e))
        })();
        for (origin, open) in groups_after {
            match applied {
                Ok(()) => open_groups.insert(origin.to_owned(), open),
                // Whether sled kept the batch is not known: read it again.
                Err(_) => open_groups.remove(origin),
            };
        }
        applied
    }

    fn idempotency(&self, key: &[u8; 16]) -> Result<Option<IdempotencyRecord>, StoreError> {
        let mut full_key = vec![b'i'];
        full_key.extend_from_slice(key);
        let Some(value) = self.db.get(full_key).map_err(sled_error(&self.path))? else {
            return Ok(None);
        };
        let decode = || -> Option<IdempotencyRecord> {
            Some(IdempotencyRecord {
                fingerprint: value.get(0..32)?.try_into().ok()?,
                seq: u64::from_be_bytes(value.get(32..40)?.try_into().ok()?),
                hash: value.get(40..72)?.try_into().ok()?,
                published: u32::from_be_bytes(value.get(72..76)?.try_into().ok()?),
                suppressed: u32::from_be_bytes(value.get(76..80)?.try_into().ok()?),
                first_seq: u64::from_be_bytes(value.get(80..88)?.try_into().ok()?),
            })
        };
        decode()
            .map(Some)
            .ok_or_else(|| self.corrupt("an idempotency record does not decode".into()))
    }

    fn observation_rows<'a>(
        &'a self,
        origin: Option<&str>,
        after: Option<&ObservationKey>,
    ) -> Box<dyn Iterator<Item = Result<ObservationRow, StoreError>> + 'a> {
        let prefix = match origin {
            Some(origin) => key_of(b'o', &[origin], None),
            None => vec![b'o'],
        };
        let start = match after {
            Some(after) => Bound::Excluded(key_of(b'o', &after.parts(), Some(u64::MAX))),
            None => Bound::Included(prefix.clone()),
        };
        // Rows still in packed pieces, merged in key order with the index.
        let mut pending = match self.piece_rows(origin) {
            Ok(rows) => rows,
            Err(err) => return Box::new(std::iter::once(Err(err))),
        };
        pending.retain(|(key, _)| {
            key.starts_with(&prefix)
                && match &start {
                    Bound::Excluded(bound) => key > bound,
                    _ => true,
                }
        });
        // A key repeated within one batch (a peer's batch may repeat one;
        // only its signature vouches for it) is kept in its last row, as a
        // small commit or a fold leaves it (each inserts rows in order, the
        // later over the earlier). The sort is stable, so rows of one key
        // stay in piece order; `dedup_by` removes the later of two equal
        // rows, so the later one is first moved into the kept place.
        pending.sort_by(|a, b| a.0.cmp(&b.0));
        pending.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                std::mem::swap(later, kept);
            }
            same
        });
        let mut pending = pending.into_iter().peekable();
        let mut indexed = self
            .db
            .range((start, Bound::Unbounded))
            .take_while(move |item| item.as_ref().map_or(true, |(k, _)| k.starts_with(&prefix)))
            .peekable();
        let rows = std::iter::from_fn(move || {
            let from_index = match indexed.peek() {
                Some(Ok((key, _))) => match pending.peek() {
                    Some((pending_key, _)) => key.as_ref() < pending_key.as_slice(),
                    None => true,
                },
                Some(Err(_)) => true,
                None => false,
            };
            if from_index {
                let item = indexed.next()?;
                Some(
                    item.map_err(sled_error(&self.path))
                        .and_then(|(k, v)| self.observation_row(&k, &v)),
                )
            } else {
                let (key, value) = pending.next()?;
                // A folded row of the same key (origin, cell key, seq) is of
                // the same batch, from a piece before this one (pieces fold
                // in key order, which is row order): the pending row is the
                // later one, and the one the fold of its piece will keep.
                if let Some(Ok((indexed_key, _))) = indexed.peek() {
                    if indexed_key.as_ref() == key.as_slice() {
                        indexed.next();
                    }
                }
                Some(self.observation_row(&key, &value))
            }
        });
        Box::new(rows)
    }

    fn index_pieces_pending(&self) -> Result<u64, StoreError> {
        let mut count = 0;
        for item in self.db.scan_prefix([b'x']).keys() {
            item.map_err(sled_error(&self.path))?;
            count += 1;
        }
        Ok(count)
    }

    fn merge_index_pieces(&self, limit: usize) -> Result<usize, StoreError> {
        let mut batch = sled::Batch::default();
        let mut merged = 0;
        for item in self.db.scan_prefix([b'x']).take(limit) {
            let (key, value) = item.map_err(sled_error(&self.path))?;
            let rows = decode_piece(&value)
                .ok_or_else(|| self.corrupt("an index piece does not decode".into()))?;
            for (row_key, row_value) in rows {
                batch.insert(row_key, &row_value[..]);
            }
            batch.remove(key);
            merged += 1;
        }
        if merged > 0 {
            // Not while a commit runs: sled files the fold's pages, blob
            // files among them, when it writes; a commit's fdatasync could
            // make them part of the durable log after its blobs were
            // synced, and a power cut would leave a log naming a blob that
            // is not on disk. Folded between commits, the next commit's
            // flush writes them and its blob sync covers them.
            let _between_commits = self.log.lock()?;
            self.db.apply_batch(batch).map_err(sled_error(&self.path))?;
        }
        Ok(merged)
    }

    fn privacy_spent(
        &self,
        origin: &str,
        indicator: &str,
        edition: &str,
        period: &str,
    ) -> Result<(u64, u64), StoreError> {
        self.spent_at(&key_of(b'b', &[origin, indicator, edition, period], None))
    }

    fn retracted_by(&self, origin: &str, seq: u64) -> Result<Option<u64>, StoreError> {
        match self
            .db
            .get(key_of(b'r', &[origin], Some(seq)))
            .map_err(sled_error(&self.path))?
        {
            None => Ok(None),
            Some(value) => <[u8; 8]>::try_from(value.as_ref())
                .map(|bytes| Some(u64::from_be_bytes(bytes)))
                .map_err(|_| self.corrupt("a retraction record does not decode".into())),
        }
    }

    fn broken_parts(&self, origin: &str, group_end: u64) -> Result<Vec<(u64, u64)>, StoreError> {
        let prefix = key_of(b'g', &[origin], Some(group_end));
        let seq = |bytes: &[u8]| <[u8; 8]>::try_from(bytes).ok().map(u64::from_be_bytes);
        self.db
            .scan_prefix(&prefix)
            .map(|item| {
                let (key, value) = item.map_err(sled_error(&self.path))?;
                match (seq(&key[prefix.len()..]), seq(&value)) {
                    (Some(low), Some(high)) => Ok((low, high)),
                    _ => Err(self.corrupt("a broken publish group record does not decode".into())),
                }
            })
            .collect()
    }

    fn offer_versions<'a>(
        &'a self,
        after: Option<(&str, &str)>,
    ) -> Box<dyn Iterator<Item = Result<OfferRow, StoreError>> + 'a> {
        let items = match after {
            Some((origin, offer_id)) => {
                let start = key_of(b'f', &[origin, offer_id], Some(u64::MAX));
                self.db
                    .range((Bound::Excluded(start), Bound::Excluded(vec![b'f' + 1])))
            }
            None => self.db.scan_prefix([b'f']),
        };
        Box::new(items.map(|item| self.offer_row(item)))
    }

    fn offer_versions_of(&self, origin: &str, offer_id: &str) -> Result<Vec<OfferRow>, StoreError> {
        // An id holding a NUL would match a prefix of other keys: exact ids only.
        let rows = self
            .db
            .scan_prefix(key_of(b'f', &[origin, offer_id], None))
            .map(|item| self.offer_row(item));
        rows.filter(|row| {
            row.as_ref()
                .map_or(true, |r| r.origin == origin && r.offer.offer_id == offer_id)
        })
        .collect()
    }

    fn withdrawal(&self, origin: &str, offer_id: &str) -> Result<Option<u64>, StoreError> {
        let value = self
            .db
            .get(key_of(b'w', &[origin, offer_id], None))
            .map_err(sled_error(&self.path))?;
        Ok(value.and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes)))
    }

    fn responses<'a>(
        &'a self,
        offer_origin: &str,
        offer_id: &str,
    ) -> Box<dyn Iterator<Item = Result<ResponseRow, StoreError>> + 'a> {
        let items = self
            .db
            .scan_prefix(key_of(b'p', &[offer_origin, offer_id], None));
        Box::new(items.map(|item| {
            let (key, value) = item.map_err(sled_error(&self.path))?;
            let decoded = split_key(&key, 1, 3).and_then(|(parts, seq)| {
                Some(ResponseRow {
                    responder: parts[2].clone(),
                    seq: seq?,
                    response: OfferResponse::decode(value.as_ref()).ok()?,
                })
            });
            decoded.ok_or_else(|| self.corrupt("a response record does not decode".into()))
        }))
    }

    fn roster(&self, publisher: &str) -> Result<Vec<RosterEntry>, StoreError> {
        let mut members = Vec::new();
        for item in self.db.scan_prefix(key_of(b'M', &[publisher], None)) {
            let (_, value) = item.map_err(sled_error(&self.path))?;
            let decoded = value
                .get(8..)
                .and_then(|bytes| RosterEntry::decode(bytes).ok());
            members.push(
                decoded.ok_or_else(|| self.corrupt("a roster record does not decode".into()))?,
            );
        }
        Ok(members)
    }

    fn rotations(&self, origin: &str) -> Result<Vec<(u64, [u8; 32])>, StoreError> {
        let mut rotations = Vec::new();
        for item in self.db.scan_prefix(key_of(b'K', &[origin], None)) {
            let (key, value) = item.map_err(sled_error(&self.path))?;
            let decoded = split_key(&key, 1, 1)
                .and_then(|(_, seq)| Some((seq?, value.as_ref().try_into().ok()?)));
            rotations.push(
                decoded
                    .ok_or_else(|| self.corrupt("a key rotation record does not decode".into()))?,
            );
        }
        Ok(rotations)
    }

    fn conflicts(&self) -> Result<Vec<ConflictRecord>, StoreError> {
        let mut records = Vec::new();
        for item in self.db.scan_prefix([b'k']) {
            let (key, value) = item.map_err(sled_error(&self.path))?;
            let (parts, part) = split_key(&key, 1, 1)
                .ok_or_else(|| self.corrupt("a conflict key does not decode".into()))?;
            if part.is_some() {
                // The other entry of the record just read.
                continue;
            }
            let other_key = key_of(b'k', &[&parts[0]], Some(1));
            let other = self.db.get(other_key).map_err(sled_error(&self.path))?;
            records.push(decode_conflict(&value, other.as_deref()).ok_or_else(|| {
                self.corrupt(format!(
                    "the conflict record of {:?} does not decode",
                    parts[0]
                ))
            })?);
        }
        Ok(records)
    }

    fn conflict(&self, origin: &str) -> Result<Option<ConflictRecord>, StoreError> {
        let key = key_of(b'k', &[origin], None);
        let Some(value) = self.db.get(key).map_err(sled_error(&self.path))? else {
            return Ok(None);
        };
        let other_key = key_of(b'k', &[origin], Some(1));
        let other = self.db.get(other_key).map_err(sled_error(&self.path))?;
        decode_conflict(&value, other.as_deref())
            .map(Some)
            .ok_or_else(|| {
                self.corrupt(format!("the conflict record of {origin:?} does not decode"))
            })
    }
}

/// Shared handle to a store.
pub type SharedStore = Arc<dyn Store>;

#[allow(dead_code)]
const _: () = assert!(FEED_ID_LEN == 16);

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::core::{
        feed::tests::{chain, key},
        index::records_of,
    };

    /// One commit of consecutive `entries` of one origin, with their head
    /// and index records.
    pub(crate) fn commit_of(entries: &[Entry]) -> CommitBatch {
        let last = entries.last().unwrap();
        CommitBatch {
            runs: vec![entries.to_vec()],
            heads: vec![(
                last.body.origin.clone(),
                Head {
                    tip: last.tip(),
                    received_unix_micros: 5,
                },
            )],
            index: entries.iter().flat_map(records_of).collect(),
            idempotency: Vec::new(),
            conflicts: Vec::new(),
        }
    }

    /// Within one batch too, the first withdrawal of an offer and the
    /// first evidence of an origin stay. Found by review.
    #[test]
    fn the_first_withdrawal_and_evidence_stay_within_one_batch() {
        use civex_proto::v1::{entry_body::Payload, OfferWithdrawal};
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        // Three withdrawals of one offer, as a careless or hostile origin
        // may sign them.
        let mut entries = chain(&key(1), "city-a", 3);
        for i in 0..entries.len() {
            let mut body = entries[i].body.clone();
            if i > 0 {
                body.prev_hash = entries[i - 1].hash.to_vec();
            }
            body.payload = Some(Payload::Withdrawal(OfferWithdrawal {
                offer_id: "o".into(),
                reason: String::new(),
            }));
            entries[i] = Entry::sign(&key(1), body).unwrap();
        }
        let other = chain(&key(1), "city-a", 2);
        let evidence = |other: &Entry| ConflictRecord {
            conflict: Conflict {
                kind: ConflictKind::Fork,
                held: entries[0].clone(),
                other: other.clone(),
            },
            peer: "peer city-b".into(),
            detected_unix_micros: 9,
        };
        let mut batch = commit_of(&entries);
        batch.conflicts = vec![evidence(&other[0]), evidence(&other[1])];
        store.commit(&batch).unwrap();
        assert_eq!(store.withdrawal("city-a", "o").unwrap(), Some(1));
        let kept = store.conflict("city-a").unwrap().unwrap();
        assert_eq!(kept.conflict.other.hash, other[0].hash);
    }

    #[test]
    fn conflict_evidence_of_two_large_entries_is_kept_in_values_below_96_kib() {
        use civex_proto::v1::{entry_body::Payload, EntryBody, OfferWithdrawal};
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        // Two entries near the 64 KiB limit at one seq, as a fork between
        // two parts of large publishes would be.
        let large = |text: &str| {
            let body = EntryBody {
                origin: "city-a".into(),
                feed_id: vec![7; 16],
                seq: 1,
                prev_hash: vec![0; 32],
                time_unix_micros: 1,
                idempotency_key: vec![1; 16],
                payload: Some(Payload::Withdrawal(OfferWithdrawal {
                    offer_id: "o".into(),
                    reason: text.repeat(60_000),
                })),
            };
            Entry::sign(&key(1), body).unwrap()
        };
        let record = ConflictRecord {
            conflict: Conflict {
                kind: ConflictKind::Fork,
                held: large("a"),
                other: large("b"),
            },
            peer: "peer city-b".into(),
            detected_unix_micros: 9,
        };
        store
            .commit(&CommitBatch {
                conflicts: vec![record.clone()],
                ..Default::default()
            })
            .unwrap();
        let largest = store
            .db
            .scan_prefix([b'k'])
            .map(|item| item.unwrap().1.len())
            .max()
            .unwrap();
        assert!(largest <= 96 * 1024, "a sled value of {largest} bytes");
        let read = store.conflicts().unwrap();
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].conflict.held.hash, record.conflict.held.hash);
        assert_eq!(read[0].conflict.other.hash, record.conflict.other.hash);
        assert_eq!(read[0].peer, "peer city-b");
        // One origin's record alone reads the same.
        let one = store.conflict("city-a").unwrap().unwrap();
        assert_eq!(one.conflict.held.signed, record.conflict.held.signed);
        assert_eq!(one.conflict.other.signed, record.conflict.other.signed);
        assert!(store.conflict("city-").unwrap().is_none());
        // A record written whole in one value (before the split) reads too.
        let (mut whole, _) = encode_conflict(&record);
        // Kind, time, peer length and peer; then both entries in one chunk.
        whole.truncate(1 + 8 + 2 + record.peer.len());
        encode_chunk(
            &[record.conflict.held.clone(), record.conflict.other.clone()],
            &mut whole,
        );
        store.db.clear().unwrap();
        store
            .db
            .insert(key_of(b'k', &["city-a"], None), whole)
            .unwrap();
        let read = store.conflicts().unwrap();
        assert_eq!(read[0].conflict.other.hash, record.conflict.other.hash);
        let one = store.conflict("city-a").unwrap().unwrap();
        assert_eq!(one.conflict.other.hash, record.conflict.other.hash);
    }

    #[test]
    fn a_snapshot_left_unfinished_by_a_kill_does_not_stop_the_store_opening() {
        let dir = tempfile::tempdir().unwrap();
        let entries = chain(&key(1), "city-a", 50);
        {
            let store = SledStore::open(dir.path(), 16 << 20).unwrap();
            store.commit(&commit_of(&entries)).unwrap();
        }
        // sled writes a snapshot while it opens, as `snap.<lsn>.generating`
        // renamed once complete; a kill meanwhile leaves it cut short, and
        // sled 0.34.7 then reads it as the newest snapshot and refuses.
        let unfinished = dir.path().join("snap.7FFFFFFFFFFFFFFF.generating");
        std::fs::write(&unfinished, [0x5a; 40]).unwrap();
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        assert!(!unfinished.exists());
        // While sled holds the store, nothing of it is touched: a snapshot
        // may be being written.
        std::fs::write(&unfinished, [0x5a; 40]).unwrap();
        clear_interrupted_open(dir.path()).unwrap();
        assert!(unfinished.exists(), "removed while sled held the store");
        std::fs::remove_file(&unfinished).unwrap();
        assert_eq!(
            store.head("city-a").unwrap().unwrap().tip,
            entries[49].tip()
        );
        let all = store.entries("city-a", 1, 100, usize::MAX).unwrap();
        assert_eq!(all.len(), 50);
        assert_eq!(all[49], entries[49].signed);
    }

    #[test]
    fn a_store_whose_creation_was_cut_short_is_created_again() {
        let dir = tempfile::tempdir().unwrap();
        // Killed while sled wrote `conf` (before it creates `db`): its text
        // without the checksum that follows it.
        std::fs::write(
            dir.path().join("conf"),
            b"segment_size: 8388608\nuse_compression: false\nversion: 0.34",
        )
        .unwrap();
        let entries = chain(&key(1), "city-a", 3);
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        store.commit(&commit_of(&entries)).unwrap();
        drop(store);
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        assert_eq!(store.head("city-a").unwrap().unwrap().tip, entries[2].tip());
    }

    fn log_len(dir: &Path) -> u64 {
        std::fs::metadata(dir.join(entry_log::FILE_NAME))
            .unwrap()
            .len()
    }

    /// Commits one entry, then `count - 1` in one commit, reopens, and
    /// checks what reads back.
    fn read_back_across_chunks_and_reopen(count: u64) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let entries = chain(&key(1), "city-a", count);
        {
            let store = SledStore::open(dir.path(), 16 << 20).unwrap();
            store.commit(&commit_of(&entries[..1])).unwrap();
            store.commit(&commit_of(&entries[1..])).unwrap();
        }
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        let head = store.head("city-a").unwrap().unwrap();
        assert_eq!(head.tip, entries.last().unwrap().tip());
        let all = store.entries("city-a", 1, 10_000, usize::MAX).unwrap();
        assert_eq!(all.len(), entries.len());
        for (read, written) in all.iter().zip(&entries) {
            assert_eq!(read, &written.signed);
        }
        let middle = store.entries("city-a", 300, 5, usize::MAX).unwrap();
        assert_eq!(middle[0], entries[299].signed);
        assert_eq!(middle.len(), 5);
        assert!(store
            .entries("city-a", count + 1, 5, usize::MAX)
            .unwrap()
            .is_empty());
        assert!(store
            .entries("city-b", 1, 5, usize::MAX)
            .unwrap()
            .is_empty());
        assert_eq!(store.heads().unwrap().len(), 1);
        dir
    }

    #[test]
    fn entries_read_back_byte_for_byte_across_chunks_and_reopen() {
        let dir = read_back_across_chunks_and_reopen(600);
        assert_eq!(log_len(dir.path()), 0, "a small commit went to the log");
    }

    /// Entries of `chain` enough for a bulk commit.
    pub(crate) fn bulk_count() -> u64 {
        let one = chain(&key(1), "city-a", 1)[0].signed.encoded_len();
        (LOG_MIN_BYTES / one * 2) as u64
    }

    #[test]
    fn bulk_commits_keep_entries_in_the_log_and_read_back_byte_for_byte() {
        let dir = read_back_across_chunks_and_reopen(bulk_count());
        assert!(log_len(dir.path()) as usize >= LOG_MIN_BYTES);
    }

    /// A store holding one bulk commit of `count` entries, closed.
    fn bulk_store(count: u64) -> (tempfile::TempDir, Vec<Entry>) {
        let dir = tempfile::tempdir().unwrap();
        let entries = chain(&key(1), "city-a", count);
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        store.commit(&commit_of(&entries)).unwrap();
        (dir, entries)
    }

    #[test]
    fn log_bytes_past_the_recorded_length_are_kept_apart_and_cut_off_at_open() {
        let count = bulk_count();
        let (dir, entries) = bulk_store(count);
        let recorded = log_len(dir.path());
        // What a crash leaves after the log append and before the batch.
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(entry_log::FILE_NAME))
            .unwrap();
        std::io::Write::write_all(&mut log, &[0xAB; 5000]).unwrap();
        drop(log);
        // Opened to read (civex verify), the log is left as it is.
        let read = SledStore::open_existing(dir.path(), 16 << 20).unwrap();
        assert_eq!(read.unrecorded_log().map(|(_, bytes)| bytes), Some(5000));
        drop(read);
        assert_eq!(log_len(dir.path()), recorded + 5000);
        // The node cuts them off, and keeps them in a file of their own.
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        assert_eq!(log_len(dir.path()), recorded);
        let kept = dir
            .path()
            .join(format!("{}.cut-{recorded}", entry_log::FILE_NAME));
        assert_eq!(std::fs::read(kept).unwrap(), [0xAB; 5000]);
        // The next bulk commit appends right after the recorded bytes.
        let more = chain(&key(1), "city-a", 2 * count);
        assert_eq!(more[entries.len() - 1].hash, entries.last().unwrap().hash);
        store.commit(&commit_of(&more[entries.len()..])).unwrap();
        assert!(log_len(dir.path()) as usize >= recorded as usize + LOG_MIN_BYTES);
        let all = store.entries("city-a", 1, usize::MAX, usize::MAX).unwrap();
        assert_eq!(all.len(), more.len());
        for (read, written) in all.iter().zip(&more) {
            assert_eq!(read, &written.signed);
        }
    }

    #[test]
    fn concurrent_bulk_commits_of_several_origins_all_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let count = bulk_count();
        let chains: Vec<Vec<Vec<Entry>>> = (0..4u8)
            .map(|i| {
                ["a", "b"]
                    .iter()
                    .map(|o| chain(&key(i + 1), &format!("city-{i}{o}"), 2 * count))
                    .collect()
            })
            .collect();
        {
            let store = SledStore::open(dir.path(), 16 << 20).unwrap();
            std::thread::scope(|scope| {
                for runs in &chains {
                    let store = &store;
                    scope.spawn(move || {
                        let batch = CommitBatch {
                            runs: runs.clone(),
                            heads: runs
                                .iter()
                                .map(|run| {
                                    let last = run.last().unwrap();
                                    let head = Head {
                                        tip: last.tip(),
                                        received_unix_micros: 5,
                                    };
                                    (last.body.origin.clone(), head)
                                })
                                .collect(),
                            ..Default::default()
                        };
                        store.commit(&batch).unwrap();
                    });
                }
            });
        }
        // Each commit recorded the log's length after its own append: a
        // batch recording a shorter length than an earlier one would make
        // the next open cut acknowledged entries off.
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        for run in chains.iter().flatten() {
            let origin = &run[0].body.origin;
            let read = store.entries(origin, 1, usize::MAX, usize::MAX).unwrap();
            assert_eq!(read.len(), run.len(), "{origin}");
            assert!(
                read.iter().zip(run).all(|(r, w)| *r == w.signed),
                "{origin}"
            );
        }
    }

    #[test]
    fn a_bulk_commit_whose_log_sync_fails_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let entries = chain(&key(1), "city-a", bulk_count());
        {
            let mut store = SledStore::open(dir.path(), 16 << 20).unwrap();
            store
                .log
                .set_sync(Box::new(|_| Err(std::io::Error::other("device gone"))));
            let err = store.commit(&commit_of(&entries)).err().unwrap();
            let message = err.to_string();
            assert!(message.contains("entries.log"), "{message}");
            assert!(message.contains("device gone"), "{message}");
            // The batch naming the chunks was never written.
            assert_eq!(store.head("city-a").unwrap(), None);
        }
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        assert_eq!(store.head("city-a").unwrap(), None);
        assert_eq!(log_len(dir.path()), 0);
        store.commit(&commit_of(&entries)).unwrap();
        let read = store.entries("city-a", 1, usize::MAX, usize::MAX).unwrap();
        assert_eq!(read.len(), entries.len());
    }

    #[test]
    fn a_lost_log_length_never_cuts_named_chunks() {
        let (dir, entries) = bulk_store(bulk_count());
        let len = log_len(dir.path());
        {
            let db = open_sled(dir.path(), 1 << 22).unwrap();
            db.remove(LOG_END_KEY).unwrap();
            db.flush().unwrap();
        }
        let err = SledStore::open(dir.path(), 16 << 20).err().unwrap();
        let message = err.to_string();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{message}");
        assert!(message.contains("entries.log"), "{message}");
        assert!(message.contains("nothing was cut off"), "{message}");
        assert_eq!(log_len(dir.path()), len);
        // Put back, the store opens and reads as before.
        {
            let db = open_sled(dir.path(), 1 << 22).unwrap();
            db.insert(LOG_END_KEY, &len.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        let read = store.entries("city-a", 1, usize::MAX, usize::MAX).unwrap();
        assert_eq!(read.len(), entries.len());
    }

    #[test]
    fn a_log_shorter_than_recorded_is_refused() {
        let (dir, _) = bulk_store(bulk_count());
        let log = dir.path().join(entry_log::FILE_NAME);
        let len = log_len(dir.path());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&log)
            .unwrap()
            .set_len(len - 1)
            .unwrap();
        let err = SledStore::open(dir.path(), 16 << 20).err().unwrap();
        let message = err.to_string();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{message}");
        assert!(message.contains("entries.log"), "{message}");
        assert!(message.contains("are missing"), "{message}");
    }

    #[test]
    fn a_damaged_log_chunk_is_reported_not_served() {
        let (dir, _) = bulk_store(bulk_count());
        let log = dir.path().join(entry_log::FILE_NAME);
        let mut bytes = std::fs::read(&log).unwrap();
        bytes[100] ^= 1;
        std::fs::write(&log, bytes).unwrap();
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        let err = store.entries("city-a", 1, 10, usize::MAX).err().unwrap();
        let message = err.to_string();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{message}");
        assert!(
            message.contains("offset 0 of the entry log fail their checksum"),
            "{message}"
        );
    }

    #[test]
    fn a_damaged_chunk_record_is_reported_before_anything_is_allocated() {
        let (dir, _) = bulk_store(bulk_count());
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        // The record of the first chunk claims 4 GiB.
        let key = key_of(b'e', &["city-a"], Some(1));
        let mut value = vec![CHUNK_IN_LOG];
        let locator = entry_log::Locator {
            offset: 0,
            len: u32::MAX,
            crc: 0,
        };
        value.extend_from_slice(&locator.encode());
        store.db.insert(key, value).unwrap();
        let err = store.entries("city-a", 1, 10, usize::MAX).err().unwrap();
        let message = err.to_string();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{message}");
        assert!(message.contains("larger than any it writes"), "{message}");
    }

    #[test]
    fn stores_of_versions_1_and_2_open_and_become_the_current_version() {
        for old in [1u32, 2] {
            let dir = tempfile::tempdir().unwrap();
            let entries = chain(&key(1), "city-a", 3);
            {
                let store = SledStore::open(dir.path(), 16 << 20).unwrap();
                store.commit(&commit_of(&entries)).unwrap();
                store.db.insert(b"mformat", &old.to_be_bytes()).unwrap();
                store.db.flush().unwrap();
            }
            // A store of format 1 has no entry log.
            if old == 1 {
                std::fs::remove_file(dir.path().join(entry_log::FILE_NAME)).unwrap();
            }
            // Opened to be read (`civex verify`), it stays of its format,
            // so the build that wrote it still opens it.
            {
                let store = SledStore::open_existing(dir.path(), 16 << 20).unwrap();
                assert_eq!(store.entries("city-a", 1, 10, usize::MAX).unwrap().len(), 3);
                let version = store.db.get(b"mformat").unwrap().unwrap();
                assert_eq!(version.as_ref(), &old.to_be_bytes(), "from {old}");
            }
            let store = SledStore::open(dir.path(), 16 << 20).unwrap();
            let all = store.entries("city-a", 1, 10, usize::MAX).unwrap();
            assert_eq!(all.len(), 3);
            assert_eq!(all[2], entries[2].signed);
            let version = store.db.get(b"mformat").unwrap().unwrap();
            assert_eq!(
                version.as_ref(),
                &FORMAT_VERSION.to_be_bytes(),
                "from {old}"
            );
        }
    }

    #[test]
    fn bulk_index_pieces_read_the_same_before_and_after_folding() {
        use civex_proto::v1::{entry_body::Payload, IndicatorBatch, Observation};
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        let key = key(3);
        // Small commit first (direct rows), then a bulk one (pieces).
        let mut entries: Vec<Entry> = Vec::new();
        for seq in 1..=1500u64 {
            let body = civex_proto::v1::EntryBody {
                origin: "city-a".into(),
                feed_id: vec![1; 16],
                seq,
                prev_hash: entries.last().map_or([0; 32], |e| e.hash).to_vec(),
                time_unix_micros: 1,
                idempotency_key: vec![0; 16],
                payload: Some(Payload::Indicators(IndicatorBatch {
                    observations: vec![Observation {
                        indicator: format!("i{}", seq % 37),
                        catalog_edition: "local".into(),
                        ref_area: "city-a".into(),
                        period: format!("{}", 1900 + seq % 101),
                        area: 1,
                        ..Default::default()
                    }],
                    rules: Vec::new(),
                    group: None,
                    privacy: Vec::new(),
                })),
            };
            entries.push(Entry::sign(&key, body).unwrap());
        }
        store.commit(&commit_of(&entries[..10])).unwrap();
        store.commit(&commit_of(&entries[10..])).unwrap();
        assert!(
            store.index_pieces_pending().unwrap() > 0,
            "a bulk commit wrote no pieces"
        );
        let read = |after: Option<&ObservationKey>| -> Vec<(ObservationKey, u64)> {
            store
                .observation_rows(Some("city-a"), after)
                .map(|r| r.map(|r| (r.key, r.seq)).unwrap())
                .collect()
        };
        let before = read(None);
        assert_eq!(before.len(), 1500);
        assert!(
            before
                .windows(2)
                .all(|w| (&w[0].0.parts(), w[0].1) < (&w[1].0.parts(), w[1].1)),
            "not in key order"
        );
        let middle = before[700].0.clone();
        let after_middle = read(Some(&middle));
        while store.merge_index_pieces(3).unwrap() > 0 {}
        assert_eq!(store.index_pieces_pending().unwrap(), 0);
        assert_eq!(read(None), before);
        assert_eq!(read(Some(&middle)), after_middle);
    }

    #[test]
    fn a_failed_sync_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let failing: SyncHook = Box::new(|| Err(std::io::Error::other("disk full")));
        // The hook also runs at open: the open itself reports it.
        let err = SledStore::open_with_sync(dir.path(), 1 << 20, Some(failing))
            .err()
            .unwrap();
        assert!(err.to_string().contains("disk full"), "{err}");
    }

    #[test]
    fn a_store_of_another_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = open_sled(dir.path(), 1 << 22).unwrap();
            db.insert(b"mformat", &99u32.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        let err = SledStore::open(dir.path(), 1 << 20).err().unwrap();
        assert!(
            err.to_string()
                .contains("format version 99, this build reads versions 1 to"),
            "{err}"
        );
        let missing = dir.path().join("missing");
        let err = SledStore::open_existing(&missing, 1 << 20).err().unwrap();
        assert!(err.to_string().contains("no store here"), "{err}");
        assert!(!missing.exists());
    }

    /// A peer's validly signed entry of `city-a`: one cell per number in
    /// `indicators` (indicator `ind-<n>`, value n), each with `breakdown`.
    fn cells(
        seq: u64,
        prev: Option<&Entry>,
        indicators: impl IntoIterator<Item = usize>,
        breakdown: &str,
    ) -> Entry {
        use civex_proto::v1::{entry_body::Payload, EntryBody, IndicatorBatch, Observation};
        let observations = indicators
            .into_iter()
            .map(|i| Observation {
                indicator: format!("ind-{i}"),
                catalog_edition: "local".into(),
                area: 2,
                ref_area: "city-a".into(),
                period: "2025".into(),
                breakdown: breakdown.into(),
                value: Some(i as f64),
                ..Default::default()
            })
            .collect();
        let body = EntryBody {
            origin: "city-a".into(),
            feed_id: vec![7; 16],
            seq,
            prev_hash: prev.map_or([0; 32], |e| e.hash).to_vec(),
            time_unix_micros: 1,
            idempotency_key: vec![1; 16],
            payload: Some(Payload::Indicators(IndicatorBatch {
                observations,
                ..Default::default()
            })),
        };
        Entry::sign(&key(1), body).unwrap()
    }

    #[test]
    fn bulk_index_pieces_of_long_keys_stay_below_96_kib() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        // Long but legal key parts: 300 entries of 4 cells, each breakdown
        // over 1,000 bytes, so 600 rows would make a piece of 637,200 bytes.
        let breakdown = format!("sex=f;{}", "x".repeat(1000));
        let mut entries: Vec<Entry> = Vec::new();
        for seq in 1..=300u64 {
            entries.push(cells(seq, entries.last(), 0..4, &breakdown));
        }
        store.commit(&commit_of(&entries)).unwrap();
        assert!(store.index_pieces_pending().unwrap() > 0, "no bulk pieces");
        let largest = store
            .db
            .scan_prefix([b'x'])
            .map(|item| item.unwrap().1.len())
            .max()
            .unwrap_or(0);
        assert!(
            largest <= 96 * 1024,
            "an index piece of {largest} bytes is stored in sled (rule 8: at most 96 KiB)"
        );
        let count = |store: &SledStore| store.observation_rows(None, None).count();
        assert_eq!(count(&store), 1200);
        while store.merge_index_pieces(7).unwrap() > 0 {}
        assert_eq!(count(&store), 1200);
    }

    #[test]
    fn a_key_repeated_in_a_bulk_batch_reads_the_same_before_and_after_folding() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 16 << 20).unwrap();
        // A peer's batch that repeats a key (rule 3 says it never does, but
        // only the origin's signature vouches for it), in a bulk commit: the
        // repeat of `ind-5` is the last cell, position 1100.
        let entry = cells(1, None, (0..1100).chain([5]), "");
        store.commit(&commit_of(&[entry])).unwrap();
        assert!(store.index_pieces_pending().unwrap() > 1);
        let positions_of_5 = |store: &SledStore| {
            store
                .observation_rows(Some("city-a"), None)
                .map(|r| r.unwrap())
                .filter(|r| r.key.indicator == "ind-5")
                .map(|r| r.position)
                .collect::<Vec<_>>()
        };
        assert_eq!(positions_of_5(&store), [1100], "unfolded pieces");
        // The first piece (with position 5) folds first: the piece still
        // pending holds the later cell.
        while store.merge_index_pieces(1).unwrap() > 0 {
            assert_eq!(positions_of_5(&store), [1100], "partly folded");
        }
        assert_eq!(positions_of_5(&store), [1100], "folded index");
    }
}
