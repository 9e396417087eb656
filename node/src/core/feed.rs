//! Signed, hash-chained entries: signing, hashing and verification.
//!
//! Signatures cover `ENTRY_SIGNATURE_CONTEXT || body` where `body` is the
//! exact encoded `EntryBody`; verification always uses the received bytes.
//! The entry hash covers `ENTRY_HASH_CONTEXT || len(body) as u64 BE || body ||
//! signature`, so each link commits to the earlier signature as well.

use bytes::Bytes;
use civex_proto::v1::{entry_body::Payload, EntryBody, SignedEntry};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use prost::Message;
use sha2::{Digest, Sha256};

/// Context string (with its zero byte) that entry signatures cover first.
pub const ENTRY_SIGNATURE_CONTEXT: &[u8] = b"civex/v1/entry\0";
/// Context string (with its zero byte) that entry hashes cover first.
pub const ENTRY_HASH_CONTEXT: &[u8] = b"civex/v1/entry-hash\0";
/// Largest signed entry (body plus signature), in bytes.
pub const MAX_ENTRY_BYTES: usize = 64 * 1024;
/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// Length of a feed id.
pub const FEED_ID_LEN: usize = 16;

/// SHA-256 entry hash.
pub type Hash = [u8; 32];
/// Random feed id fixed at genesis.
pub type FeedId = [u8; FEED_ID_LEN];
/// What seq 1 links to.
pub const GENESIS_PREV_HASH: Hash = [0; 32];

/// Why an entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeedError {
    /// The bytes are not a well-formed entry.
    #[error("malformed entry: {0}")]
    Malformed(String),
    /// Larger than [`MAX_ENTRY_BYTES`].
    #[error("entry of {size} bytes exceeds the {MAX_ENTRY_BYTES}-byte limit")]
    TooLarge {
        /// Size seen.
        size: usize,
    },
    /// The body names another origin than the feed being read.
    #[error("entry names origin {found:?}, expected {expected:?}")]
    WrongOrigin {
        /// Origin expected.
        expected: String,
        /// Origin in the body.
        found: String,
    },
    /// The body names another feed id than the feed held.
    #[error("origin {origin}: seq {seq} names feed id {found}, the feed held is {held}")]
    WrongFeedId {
        /// Origin.
        origin: String,
        /// Seq of the entry.
        seq: u64,
        /// Feed id in the body, hex.
        found: String,
        /// Feed id held, hex.
        held: String,
    },
    /// The entry does not come right after the head held.
    #[error("origin {origin}: expected seq {expected}, got {found}")]
    SeqGap {
        /// Origin.
        origin: String,
        /// Seq expected.
        expected: u64,
        /// Seq received.
        found: u64,
    },
    /// `prev_hash` does not name the previous entry.
    #[error("origin {origin}: seq {seq} does not link to the previous entry (prev hash mismatch)")]
    BrokenLink {
        /// Origin.
        origin: String,
        /// Seq of the entry.
        seq: u64,
    },
    /// Entry time earlier than the previous entry's.
    #[error("origin {origin}: seq {seq} claims a time earlier than the previous entry")]
    TimeWentBack {
        /// Origin.
        origin: String,
        /// Seq of the entry.
        seq: u64,
    },
    /// Signature check failed.
    #[error("origin {origin}: seq {seq} has an invalid signature")]
    BadSignature {
        /// Origin.
        origin: String,
        /// Seq of the entry.
        seq: u64,
    },
    /// No key is known for the origin.
    #[error("origin {0:?} is not a known origin (no pinned feed key)")]
    UnknownOrigin(String),
    /// An entry of a feed the roster ended (its key was lost).
    #[error("origin {origin}: seq {seq} is of feed {feed_id}, which the roster ended at seq {last_seq} (its key was lost); later or other entries of it are refused")]
    Replaced {
        /// Origin.
        origin: String,
        /// Seq of the entry.
        seq: u64,
        /// The ended feed's id, hex.
        feed_id: String,
        /// Its last accepted seq.
        last_seq: u64,
    },
    /// A feed start the roster's history of the origin does not name.
    #[error("origin {origin}: seq 1 starts feed {found}, but the roster's history of this origin starts with feed {first} (its key was lost and replaced); a feed it does not name is refused")]
    NotRosterFeed {
        /// Origin.
        origin: String,
        /// Feed id in the body, hex.
        found: String,
        /// The first feed the roster names, hex.
        first: String,
    },
}

/// A lost feed key replaced through the federation roster: the old feed
/// ends at a named entry and the next seq starts a new feed (new feed id,
/// new key) linked to it, so one chain keeps the whole history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replacement {
    /// The feed that ends.
    pub old_feed_id: FeedId,
    /// Its last accepted entry.
    pub last_seq: u64,
    /// That entry's hash.
    pub last_hash: Hash,
    /// The feed that goes on from `last_seq + 1`.
    pub new_feed_id: FeedId,
    /// The key of the new feed's first entry.
    pub new_key: VerifyingKey,
}

impl Replacement {
    /// Reads a roster entry's replacement; `None` if malformed.
    pub fn from_proto(r: &civex_proto::v1::FeedReplacement) -> Option<Self> {
        let key: [u8; 32] = r.new_feed_key.as_slice().try_into().ok()?;
        Some(Self {
            old_feed_id: r.old_feed_id.as_slice().try_into().ok()?,
            last_seq: r.last_seq,
            last_hash: r.last_hash.as_slice().try_into().ok()?,
            new_feed_id: r.new_feed_id.as_slice().try_into().ok()?,
            new_key: VerifyingKey::from_bytes(&key)
                .ok()
                .filter(|k| !k.is_weak())?,
        })
    }

    /// Whether the entry at `at` is one the roster refused: a later entry
    /// of the feed it ended, or another one at the last seq it kept.
    pub fn refuses(&self, at: &Tip) -> bool {
        at.feed_id == self.old_feed_id
            && (at.seq > self.last_seq || (at.seq == self.last_seq && at.hash != self.last_hash))
    }

    /// Whether the new feed starts right after `tip`.
    pub fn starts_after(&self, tip: &Tip) -> bool {
        tip.feed_id == self.old_feed_id && tip.seq == self.last_seq && tip.hash == self.last_hash
    }

    /// Whether `entry`, coming after `tip`, starts this replacement's feed.
    pub fn starts(&self, tip: &Tip, entry: &Entry) -> bool {
        self.starts_after(tip) && entry.body.feed_id.as_slice() == self.new_feed_id
    }
}

/// The replacements of a roster entry, oldest first; `None` if one is
/// malformed or they do not follow each other (each new feed is the next
/// one's old feed, at increasing seqs).
pub fn replacements_of(entry: &civex_proto::v1::RosterEntry) -> Option<Vec<Replacement>> {
    let replacements: Vec<Replacement> = entry
        .replacements
        .iter()
        .map(Replacement::from_proto)
        .collect::<Option<_>>()?;
    let ordered = replacements.windows(2).all(|pair| {
        pair[1].old_feed_id == pair[0].new_feed_id && pair[1].last_seq > pair[0].last_seq
    });
    ordered.then_some(replacements)
}

/// The key of the first entry after `seq` before any rotation, and the seq
/// its feed starts at: the key of seq 1, or of the newest replacement at or
/// below `seq`.
fn feed_start_after(
    first_key: &VerifyingKey,
    replacements: &[Replacement],
    seq: u64,
) -> (u64, VerifyingKey) {
    replacements
        .iter()
        .rev()
        .find(|r| r.last_seq <= seq)
        .map_or((1, *first_key), |r| (r.last_seq + 1, r.new_key))
}

/// A signed entry with its decoded envelope and its hash. Decoding checks
/// shape only: see [`check_link`] and [`verify_signature`] for trust.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The bytes as received or signed.
    pub signed: SignedEntry,
    /// Decoded body.
    pub body: EntryBody,
    /// Entry hash.
    pub hash: Hash,
}

impl Entry {
    /// Decodes and hashes a signed entry, checking sizes and field shapes.
    pub fn decode(signed: SignedEntry) -> Result<Self, FeedError> {
        let size = signed.body.len() + signed.signature.len();
        if size > MAX_ENTRY_BYTES {
            return Err(FeedError::TooLarge { size });
        }
        if signed.signature.len() != SIGNATURE_LEN {
            return Err(FeedError::Malformed(format!(
                "signature is {} bytes, expected {SIGNATURE_LEN}",
                signed.signature.len()
            )));
        }
        let body = EntryBody::decode(signed.body.as_ref())
            .map_err(|err| FeedError::Malformed(format!("body does not decode: {err}")))?;
        if body.feed_id.len() != FEED_ID_LEN {
            return Err(FeedError::Malformed(format!(
                "feed id is {} bytes, expected {FEED_ID_LEN}",
                body.feed_id.len()
            )));
        }
        if body.prev_hash.len() != 32 {
            return Err(FeedError::Malformed(format!(
                "prev hash is {} bytes, expected 32",
                body.prev_hash.len()
            )));
        }
        if body.seq == 0 {
            return Err(FeedError::Malformed("seq 0 does not exist".into()));
        }
        let hash = entry_hash(&signed.body, &signed.signature);
        Ok(Self { signed, body, hash })
    }

    /// Encodes and signs a body.
    pub fn sign(key: &SigningKey, body: EntryBody) -> Result<Self, FeedError> {
        let body_bytes = Bytes::from(body.encode_to_vec());
        let mut message = Vec::with_capacity(ENTRY_SIGNATURE_CONTEXT.len() + body_bytes.len());
        message.extend_from_slice(ENTRY_SIGNATURE_CONTEXT);
        message.extend_from_slice(&body_bytes);
        let signature = key.sign(&message);
        let signed = SignedEntry {
            body: body_bytes,
            signature: Bytes::copy_from_slice(&signature.to_bytes()),
        };
        let size = signed.body.len() + signed.signature.len();
        if size > MAX_ENTRY_BYTES {
            return Err(FeedError::TooLarge { size });
        }
        let hash = entry_hash(&signed.body, &signed.signature);
        Ok(Self { signed, body, hash })
    }

    /// Feed id of the body.
    pub fn feed_id(&self) -> FeedId {
        let mut id = [0; FEED_ID_LEN];
        id.copy_from_slice(&self.body.feed_id);
        id
    }

    /// The chain position this entry makes.
    pub fn tip(&self) -> Tip {
        Tip {
            feed_id: self.feed_id(),
            seq: self.body.seq,
            hash: self.hash,
            time_unix_micros: self.body.time_unix_micros,
        }
    }
}

/// Hash of a signed entry.
pub fn entry_hash(body: &[u8], signature: &[u8]) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update(ENTRY_HASH_CONTEXT);
    hasher.update((body.len() as u64).to_be_bytes());
    hasher.update(body);
    hasher.update(signature);
    hasher.finalize().into()
}

/// The last entry of a contiguous verified prefix: what the next entry must
/// link to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tip {
    /// Feed id.
    pub feed_id: FeedId,
    /// Seq of the last entry.
    pub seq: u64,
    /// Its hash.
    pub hash: Hash,
    /// Its claimed time.
    pub time_unix_micros: i64,
}

/// The key in force for an origin's entries after `seq`: the key its feed
/// there started with (the key of seq 1, or the one a replacement names),
/// then each rotation of that feed (`(seq, new key)`, in order) up to
/// `seq`. Fails on a rotation that names no valid key.
pub fn key_after(
    origin: &str,
    first_key: &VerifyingKey,
    replacements: &[Replacement],
    rotations: &[(u64, [u8; 32])],
    seq: u64,
) -> Result<VerifyingKey, FeedError> {
    let (start, mut key) = feed_start_after(first_key, replacements, seq);
    for (at, new_key) in rotations
        .iter()
        .filter(|(at, _)| *at >= start && *at <= seq)
    {
        key = VerifyingKey::from_bytes(new_key).map_err(|_| {
            FeedError::Malformed(format!(
                "origin {origin}: the rotation at seq {at} names no valid key"
            ))
        })?;
    }
    Ok(key)
}

/// Checks that `entry` comes right after `tip` (`None`: the feed is empty) in
/// `origin`'s feed: origin, feed id, seq, prev hash and time. Not the
/// signature. The feed id may change only where one of `replacements`
/// starts a new feed.
pub fn check_link(
    origin: &str,
    replacements: &[Replacement],
    tip: Option<&Tip>,
    entry: &Entry,
) -> Result<(), FeedError> {
    let body = &entry.body;
    if body.origin != origin {
        return Err(FeedError::WrongOrigin {
            expected: origin.to_owned(),
            found: body.origin.clone(),
        });
    }
    let (expected_seq, expected_prev) = match tip {
        Some(tip) => (tip.seq + 1, tip.hash),
        None => (1, GENESIS_PREV_HASH),
    };
    if body.seq != expected_seq {
        return Err(FeedError::SeqGap {
            origin: origin.to_owned(),
            expected: expected_seq,
            found: body.seq,
        });
    }
    if let Some(ended) = replacements.iter().find(|r| r.refuses(&entry.tip())) {
        return Err(FeedError::Replaced {
            origin: origin.to_owned(),
            seq: body.seq,
            feed_id: crate::core::ids::hex(&ended.old_feed_id),
            last_seq: ended.last_seq,
        });
    }
    // Where the roster replaced a lost key, the history it names starts
    // with the first ended feed: a genesis of any other feed would be one
    // the lost key made up after the fact.
    if let (None, Some(first)) = (tip, replacements.first()) {
        if body.feed_id.as_ref() != first.old_feed_id {
            return Err(FeedError::NotRosterFeed {
                origin: origin.to_owned(),
                found: crate::core::ids::hex(&body.feed_id),
                first: crate::core::ids::hex(&first.old_feed_id),
            });
        }
    }
    if let Some(tip) = tip {
        let replaced = replacements.iter().any(|r| r.starts(tip, entry));
        if body.feed_id.as_ref() != tip.feed_id && !replaced {
            return Err(FeedError::WrongFeedId {
                origin: origin.to_owned(),
                seq: body.seq,
                found: crate::core::ids::hex(&body.feed_id),
                held: crate::core::ids::hex(&tip.feed_id),
            });
        }
        if body.time_unix_micros < tip.time_unix_micros {
            return Err(FeedError::TimeWentBack {
                origin: origin.to_owned(),
                seq: body.seq,
            });
        }
    }
    if body.prev_hash.as_ref() != expected_prev {
        return Err(FeedError::BrokenLink {
            origin: origin.to_owned(),
            seq: body.seq,
        });
    }
    Ok(())
}

/// Strict Ed25519 check of one entry's signature over its received bytes.
pub fn verify_signature(key: &VerifyingKey, entry: &Entry) -> Result<(), FeedError> {
    #[cfg(test)]
    SIGNATURE_CHECKS.with(|checks| checks.set(checks.get() + 1));
    let bad = || FeedError::BadSignature {
        origin: entry.body.origin.clone(),
        seq: entry.body.seq,
    };
    let signature = Signature::from_slice(&entry.signed.signature).map_err(|_| bad())?;
    let mut message = Vec::with_capacity(ENTRY_SIGNATURE_CONTEXT.len() + entry.signed.body.len());
    message.extend_from_slice(ENTRY_SIGNATURE_CONTEXT);
    message.extend_from_slice(&entry.signed.body);
    key.verify_strict(&message, &signature).map_err(|_| bad())
}

#[cfg(test)]
thread_local! {
    /// Signatures this thread checked, for tests of the work done.
    static SIGNATURE_CHECKS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Signatures this thread has checked.
#[cfg(test)]
fn signature_checks() -> u64 {
    SIGNATURE_CHECKS.with(std::cell::Cell::get)
}

/// Authenticates a contiguous range of `origin`'s feed that must follow `tip`:
/// every link is checked, and the signature of the range's last entry, which
/// commits through the links to every earlier entry and signature. Returns
/// the new tip. Nothing in the range may be trusted if this fails.
pub fn verify_range(
    origin: &str,
    key: &VerifyingKey,
    replacements: &[Replacement],
    tip: Option<&Tip>,
    entries: &[Entry],
) -> Result<Option<Tip>, FeedError> {
    let mut current = tip.copied();
    for entry in entries {
        check_link(origin, replacements, current.as_ref(), entry)?;
        current = Some(entry.tip());
    }
    if let Some(last) = entries.last() {
        verify_signature(key, last)?;
    }
    Ok(current)
}

/// The key an entry hands its feed to, if it is a key rotation. A rotation
/// that names no valid Ed25519 key is malformed.
pub fn rotation_key(entry: &Entry) -> Result<Option<VerifyingKey>, FeedError> {
    let Some(Payload::KeyRotation(rotation)) = &entry.body.payload else {
        return Ok(None);
    };
    let bytes: [u8; 32] = rotation.new_key.as_slice().try_into().map_err(|_| {
        FeedError::Malformed(format!(
            "seq {}: key rotation names a {}-byte key, not 32",
            entry.body.seq,
            rotation.new_key.len()
        ))
    })?;
    let key = VerifyingKey::from_bytes(&bytes)
        .ok()
        .filter(|k| !k.is_weak())
        .ok_or_else(|| {
            FeedError::Malformed(format!(
                "seq {}: key rotation names no valid Ed25519 key",
                entry.body.seq
            ))
        })?;
    Ok(Some(key))
}

/// [`verify_range`] across key rotations and replacements: the range is
/// cut after every rotation and roster entry, whose own signature is
/// checked (a rotation with the key in force before it; the piece after it
/// with the key it names), and before the first entry of a replacement's
/// feed, from which on the replacement's key holds. Returns the new tip and
/// the key in force after the range.
pub fn verify_chain(
    origin: &str,
    key: &VerifyingKey,
    replacements: &[Replacement],
    tip: Option<&Tip>,
    entries: &[Entry],
) -> Result<(Option<Tip>, VerifyingKey), FeedError> {
    let mut key = *key;
    let mut tip = tip.copied();
    let mut start = 0;
    for (i, entry) in entries.iter().enumerate() {
        // The tip just before this entry, as far as the links go.
        let before = if i == 0 {
            tip
        } else {
            Some(entries[i - 1].tip())
        };
        let new_feed =
            before.and_then(|before| replacements.iter().find(|r| r.starts(&before, entry)));
        if let Some(replacement) = new_feed {
            tip = verify_range(origin, &key, replacements, tip.as_ref(), &entries[start..i])?;
            key = replacement.new_key;
            start = i;
        }
        let rotation = rotation_key(entry)?;
        // Entries that carry trust (a new key, a roster member) end a piece,
        // so their own signature is checked, never only covered by a link.
        let carries_trust =
            rotation.is_some() || matches!(entry.body.payload, Some(Payload::Roster(_)));
        if carries_trust {
            tip = verify_range(
                origin,
                &key,
                replacements,
                tip.as_ref(),
                &entries[start..=i],
            )?;
            key = rotation.unwrap_or(key);
            start = i + 1;
        }
    }
    tip = verify_range(origin, &key, replacements, tip.as_ref(), &entries[start..])?;
    Ok((tip, key))
}

/// Most bytes of entries, counted from the first whose own signature does
/// not verify, that a later entry's signature may cover: one message's
/// worth at the default `limits.max_message_bytes`. A range a node takes
/// can so always be taken again by the node it serves it to, however it
/// is cut into messages there.
pub const COVER_BYTES: usize = 4 * 1024 * 1024;

/// An entry's size as [`COVER_BYTES`] counts it: body and signature.
pub fn entry_bytes(entry: &Entry) -> usize {
    entry.signed.body.len() + entry.signed.signature.len()
}

/// What [`authenticate`] made of entries received after a tip.
#[derive(Debug)]
pub struct Authenticated {
    /// The entries authenticated, in order: each by its own signature, or
    /// covered by the signature of a later one within [`COVER_BYTES`]
    /// with every link between.
    pub accepted: Vec<Entry>,
    /// The tip after them.
    pub tip: Option<Tip>,
    /// The key in force after them.
    pub key: VerifyingKey,
    /// Entries linked after `accepted`, each with a signature that does
    /// not verify, that a later entry may still cover: given back as
    /// `held`, with the entries that follow them. Never trusted as they
    /// are.
    pub uncovered: Uncovered,
    /// The first entry refused, and why; the entries after it were not
    /// looked at.
    pub refused: Option<(FeedError, Entry)>,
}

/// Entries [`authenticate`] left waiting for a later signature to cover
/// them, in order, with their size as [`COVER_BYTES`] counts it (carried,
/// so a run fed one entry at a time costs no more than one fed whole).
#[derive(Debug, Default, Clone)]
pub struct Uncovered {
    entries: Vec<Entry>,
    bytes: usize,
}

impl Uncovered {
    /// The entries, in order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Their size, body and signature: at most [`COVER_BYTES`].
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether none wait.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Authenticates `entries` received after `tip` (and after `held`, what
/// an earlier call left uncovered from that tip), in order, as far as they
/// go. Ranges of at most [`COVER_BYTES`] are taken by [`verify_chain`]
/// (one signature check each); once one fails, entry by entry, an entry
/// whose own signature fails being taken only when a later entry within
/// [`COVER_BYTES`] of it verifies its own and every link between holds.
/// An entry that carries trust (a rotation, a roster entry) must verify
/// its own signature, and no signature covers entries of an earlier feed
/// (a replacement's). The held ones are not checked again, and no
/// signature is checked more than three times (a failed range, entry by
/// entry, the ranges once more after the first cover): the signature
/// work is linear in the entries.
pub fn authenticate(
    origin: &str,
    key: &VerifyingKey,
    replacements: &[Replacement],
    tip: Option<Tip>,
    held: Uncovered,
    entries: Vec<Entry>,
) -> Authenticated {
    authenticate_within(COVER_BYTES, origin, key, replacements, tip, held, entries)
}

/// [`authenticate`], with `cover` bytes in place of [`COVER_BYTES`].
fn authenticate_within(
    cover: usize,
    origin: &str,
    key: &VerifyingKey,
    replacements: &[Replacement],
    tip: Option<Tip>,
    held: Uncovered,
    entries: Vec<Entry>,
) -> Authenticated {
    let Uncovered {
        entries: mut all,
        bytes: mut run_bytes,
    } = held;
    let checked = all.len();
    all.extend(entries);
    let (mut tip, mut key) = (tip, *key);
    // `all[..accepted]` is authenticated; `all[accepted..i]`, each with a
    // bad signature, waits for a cover (the run), `run_bytes` in all.
    let mut accepted = 0;
    if checked == 0 {
        accepted = ranges(cover, origin, &mut key, replacements, &mut tip, &all, 0);
    }
    // The key of the held run: its first entry may start a new feed.
    let mut run_key = tip
        .zip(all[..checked].first())
        .and_then(|(t, first)| replacements.iter().find(|r| r.starts(&t, first)))
        .map_or(key, |r| r.new_key);
    let mut last = all[..checked].last().map(Entry::tip).or(tip);
    let mut ranges_again = true;
    let mut i = accepted.max(checked);
    let mut fault = None;
    while i < all.len() {
        let entry = &all[i];
        let run = accepted < i;
        let new_feed = last.and_then(|t| replacements.iter().find(|r| r.starts(&t, entry)));
        let entry_key = match (run, new_feed) {
            (true, _) => run_key,
            (false, new_feed) => new_feed.map_or(key, |r| r.new_key),
        };
        let bytes = entry_bytes(entry);
        let linked = check_link(origin, replacements, last.as_ref(), entry)
            .and_then(|()| rotation_key(entry));
        let rotation = match linked {
            Ok(_) if run && (new_feed.is_some() || run_bytes + bytes > cover) => {
                fault = Some(None);
                break;
            }
            Ok(rotation) => rotation,
            Err(err) => {
                fault = Some(Some(err));
                break;
            }
        };
        if verify_signature(&entry_key, entry).is_ok() {
            // It, and the run before it, are authenticated.
            (tip, key) = (Some(entry.tip()), rotation.unwrap_or(entry_key));
            accepted = i + 1;
            if std::mem::take(&mut ranges_again) {
                accepted = ranges(
                    cover,
                    origin,
                    &mut key,
                    replacements,
                    &mut tip,
                    &all,
                    accepted,
                );
            }
            (i, run_bytes, last) = (accepted, 0, tip);
            continue;
        }
        if carries_trust(entry) {
            fault = Some(None);
            break;
        }
        if !run {
            run_key = entry_key;
        }
        (run_bytes, last, i) = (run_bytes + bytes, Some(entry.tip()), i + 1);
    }
    let mut rest = all.split_off(accepted);
    let mut out = Authenticated {
        accepted: all,
        tip,
        key,
        uncovered: Uncovered::default(),
        refused: None,
    };
    match fault {
        None => {
            debug_assert_eq!(run_bytes, rest.iter().map(entry_bytes).sum::<usize>());
            out.uncovered = Uncovered {
                entries: rest,
                bytes: run_bytes,
            };
        }
        // The first entry not taken is refused: a bad signature nothing
        // covered, or this entry's own fault.
        Some(own) => {
            let first = rest.remove(0);
            let fault = match (own, accepted < i) {
                (Some(err), false) => err,
                _ => FeedError::BadSignature {
                    origin: origin.to_owned(),
                    seq: first.body.seq,
                },
            };
            out.refused = Some((fault, first));
        }
    }
    out
}

/// Takes ranges of `entries` from `from` by [`verify_chain`], each of at
/// most `cover` bytes, while they verify, moving `key` and `tip` past
/// them; returns where the first that does not verify starts.
fn ranges(
    cover: usize,
    origin: &str,
    key: &mut VerifyingKey,
    replacements: &[Replacement],
    tip: &mut Option<Tip>,
    entries: &[Entry],
    mut from: usize,
) -> usize {
    while from < entries.len() {
        let mut bytes = 0;
        let size = entries[from..]
            .iter()
            .take_while(|e| {
                bytes += entry_bytes(e);
                bytes <= cover
            })
            .count()
            .max(1);
        let range = &entries[from..from + size];
        match verify_chain(origin, key, replacements, tip.as_ref(), range) {
            Ok((t, k)) => (*tip, *key, from) = (t, k, from + size),
            Err(_) => break,
        }
    }
    from
}

/// Whether an entry's own signature must verify: it hands over a key or
/// names a member.
fn carries_trust(entry: &Entry) -> bool {
    matches!(
        entry.body.payload,
        Some(Payload::KeyRotation(_) | Payload::Roster(_))
    )
}

/// How an origin's validly signed entries disagree with the feed held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConflictKind {
    /// Two different entries at one seq of one feed: the key holder signed
    /// two histories (or the key leaked).
    Fork,
    /// Entries of another feed id: the origin started its feed over.
    Recreated,
}

impl ConflictKind {
    /// Lowercase name, for status and the store.
    pub fn name(self) -> &'static str {
        match self {
            Self::Fork => "fork",
            Self::Recreated => "recreated",
        }
    }
}

/// Evidence that an origin's feed conflicts with the one held: both
/// entries, each validly signed by the origin's key.
#[derive(Debug, Clone)]
pub struct Conflict {
    /// What kind of conflict.
    pub kind: ConflictKind,
    /// The entry held (at the same seq for a fork; the head for a
    /// re-created feed).
    pub held: Entry,
    /// The conflicting entry received.
    pub other: Entry,
}

/// Judges an entry that disagrees with the feed held, given the held entry
/// at the same seq (or the head, if the received feed id differs), each with
/// the origin's key in force for it (for a new feed id, the key pinned for
/// the origin). Returns the evidence when both are validly signed and
/// really conflict; `None` when they agree, or when `other` does not verify
/// (that is a bad peer, not evidence against the origin).
pub fn judge_conflict(
    (held_key, held): (&VerifyingKey, &Entry),
    (other_key, other): (&VerifyingKey, &Entry),
) -> Option<Conflict> {
    if held.body.origin != other.body.origin
        || held.hash == other.hash
        || verify_signature(held_key, held).is_err()
        || verify_signature(other_key, other).is_err()
    {
        return None;
    }
    let kind = if held.body.feed_id != other.body.feed_id {
        // Only the genesis of a new feed (signed by the pinned key) is
        // evidence: a later entry would be judged with a key that a
        // rotation may have retired.
        if other.body.seq != 1 {
            return None;
        }
        ConflictKind::Recreated
    } else if held.body.seq == other.body.seq {
        ConflictKind::Fork
    } else {
        return None;
    };
    Some(Conflict {
        kind,
        held: held.clone(),
        other: other.clone(),
    })
}

#[cfg(test)]
mod cover_rule;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use civex_proto::v1::{entry_body::Payload, OfferWithdrawal};

    pub(crate) fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    pub(crate) fn chain(key: &SigningKey, origin: &str, count: u64) -> Vec<Entry> {
        let mut entries: Vec<Entry> = Vec::new();
        for seq in 1..=count {
            let prev = entries.last().map_or(GENESIS_PREV_HASH, |e| e.hash);
            let body = EntryBody {
                origin: origin.into(),
                feed_id: vec![7; 16],
                seq,
                prev_hash: prev.to_vec(),
                time_unix_micros: 1_000 + seq as i64,
                idempotency_key: vec![seq as u8; 16],
                payload: Some(Payload::Withdrawal(OfferWithdrawal {
                    offer_id: format!("offer-{seq}"),
                    reason: String::new(),
                })),
            };
            entries.push(Entry::sign(key, body).unwrap());
        }
        entries
    }

    /// `body` signed by `key` with `extra` bytes appended to its encoding,
    /// as a newer build writes fields this one does not know (a trailing
    /// field 99, varint 1: `[0x98, 0x06, 0x01]`).
    pub(crate) fn signed_with_extra(key: &SigningKey, body: EntryBody, extra: &[u8]) -> Entry {
        use ed25519_dalek::Signer;
        let mut bytes = prost::Message::encode_to_vec(&body);
        bytes.extend_from_slice(extra);
        let mut message = ENTRY_SIGNATURE_CONTEXT.to_vec();
        message.extend_from_slice(&bytes);
        let signature = key.sign(&message).to_bytes();
        Entry::decode(SignedEntry {
            body: bytes.into(),
            signature: signature.to_vec().into(),
        })
        .unwrap()
    }

    fn tampered(entry: &Entry, change: impl FnOnce(&mut SignedEntry)) -> Result<Entry, FeedError> {
        let mut signed = entry.signed.clone();
        change(&mut signed);
        Entry::decode(signed)
    }

    #[test]
    fn a_signed_chain_verifies_entry_by_entry_and_as_a_range() {
        let key = key(1);
        let entries = chain(&key, "city-a", 5);
        let mut tip = None;
        for entry in &entries {
            check_link("city-a", &[], tip.as_ref(), entry).unwrap();
            verify_signature(&key.verifying_key(), entry).unwrap();
            tip = Some(entry.tip());
        }
        let tip = verify_range("city-a", &key.verifying_key(), &[], None, &entries).unwrap();
        assert_eq!(tip.unwrap().seq, 5);
        let resumed = verify_range(
            "city-a",
            &key.verifying_key(),
            &[],
            Some(&entries[1].tip()),
            &entries[2..],
        )
        .unwrap();
        assert_eq!(resumed.unwrap().hash, entries[4].hash);
    }

    #[test]
    fn decoding_the_received_bytes_reproduces_the_hash() {
        let entries = chain(&key(1), "city-a", 2);
        let decoded = Entry::decode(entries[1].signed.clone()).unwrap();
        assert_eq!(decoded.hash, entries[1].hash);
        assert_ne!(entries[0].hash, entries[1].hash);
    }

    #[test]
    fn flipped_body_byte_is_refused() {
        let key = key(1);
        let entries = chain(&key, "city-a", 3);
        // Flip the last byte of the body: it lies in the payload, so it still decodes.
        let forged = tampered(&entries[2], |s| {
            let mut body = s.body.to_vec();
            let last = body.len() - 1;
            body[last] ^= 1;
            s.body = body.into();
        })
        .unwrap();
        let mut range = entries[..2].to_vec();
        range.push(forged.clone());
        assert!(matches!(
            verify_range("city-a", &key.verifying_key(), &[], None, &range),
            Err(FeedError::BadSignature { seq: 3, .. })
        ));
        assert!(verify_signature(&key.verifying_key(), &forged).is_err());
    }

    #[test]
    fn flipped_signature_byte_is_refused_in_the_middle_and_at_the_end() {
        let key = key(1);
        let entries = chain(&key, "city-a", 3);
        for at in [1, 2] {
            let mut range = entries.clone();
            range[at] = tampered(&entries[at], |s| {
                let mut sig = s.signature.to_vec();
                sig[10] ^= 1;
                s.signature = sig.into();
            })
            .unwrap();
            let result = verify_range("city-a", &key.verifying_key(), &[], None, &range);
            assert!(result.is_err(), "flip at index {at} accepted");
        }
    }

    #[test]
    fn wrong_prev_hash_gap_origin_and_key_are_refused() {
        let key = key(1);
        let entries = chain(&key, "city-a", 3);
        // A correctly signed entry with a wrong prev hash.
        let mut body = entries[1].body.clone();
        body.prev_hash = vec![9; 32];
        let forged = Entry::sign(&key, body).unwrap();
        assert!(matches!(
            verify_range(
                "city-a",
                &key.verifying_key(),
                &[],
                None,
                &[entries[0].clone(), forged]
            ),
            Err(FeedError::BrokenLink { seq: 2, .. })
        ));
        assert!(matches!(
            check_link("city-a", &[], Some(&entries[0].tip()), &entries[2]),
            Err(FeedError::SeqGap {
                expected: 2,
                found: 3,
                ..
            })
        ));
        assert!(matches!(
            check_link("city-b", &[], None, &entries[0]),
            Err(FeedError::WrongOrigin { .. })
        ));
        let other = self::key(2);
        assert!(verify_range("city-a", &other.verifying_key(), &[], None, &entries).is_err());
    }

    #[test]
    fn shape_errors_and_size_limit() {
        let entries = chain(&key(1), "city-a", 1);
        let short_sig = tampered(&entries[0], |s| s.signature = vec![0; 10].into());
        assert!(matches!(short_sig, Err(FeedError::Malformed(_))));
        let garbage = tampered(&entries[0], |s| s.body = vec![0xff; 20].into());
        assert!(matches!(garbage, Err(FeedError::Malformed(_))));
        let huge = tampered(&entries[0], |s| s.body = vec![0; MAX_ENTRY_BYTES].into());
        assert!(matches!(huge, Err(FeedError::TooLarge { .. })));
    }

    #[test]
    fn time_must_not_go_back() {
        let key = key(1);
        let entries = chain(&key, "city-a", 1);
        let mut body = entries[0].body.clone();
        body.seq = 2;
        body.prev_hash = entries[0].hash.to_vec();
        body.time_unix_micros = 0;
        let back = Entry::sign(&key, body).unwrap();
        assert!(matches!(
            check_link("city-a", &[], Some(&entries[0].tip()), &back),
            Err(FeedError::TimeWentBack { .. })
        ));
    }

    #[test]
    fn ranges_follow_key_rotations() {
        let old = key(1);
        let new = key(2);
        let mut entries = chain(&old, "city-a", 2);
        entries.push(rotation(&old, &entries[1], None, &new));
        for seq in 4..=5u64 {
            let mut body = entries[1].body.clone();
            body.seq = seq;
            body.prev_hash = entries.last().unwrap().hash.to_vec();
            entries.push(Entry::sign(&new, body).unwrap());
        }
        let (tip, after) =
            verify_chain("city-a", &old.verifying_key(), &[], None, &entries).unwrap();
        assert_eq!(tip.unwrap().seq, 5);
        assert_eq!(after, new.verifying_key());
        // Without following the rotation, the range fails.
        assert!(verify_range("city-a", &old.verifying_key(), &[], None, &entries).is_err());
        // An entry after the rotation signed by the old key is refused.
        let mut body = entries[4].body.clone();
        body.seq = 6;
        body.prev_hash = entries[4].hash.to_vec();
        let stale = Entry::sign(&old, body).unwrap();
        let mut with_stale = entries.clone();
        with_stale.push(stale);
        assert!(matches!(
            verify_chain("city-a", &old.verifying_key(), &[], None, &with_stale),
            Err(FeedError::BadSignature { seq: 6, .. })
        ));
        // A rotation naming no valid key is malformed.
        let mut body = entries[1].body.clone();
        body.seq = 3;
        body.payload = Some(Payload::KeyRotation(civex_proto::v1::KeyRotation {
            new_key: vec![1; 5],
        }));
        let bad = Entry::sign(&old, body).unwrap();
        assert!(matches!(rotation_key(&bad), Err(FeedError::Malformed(_))));
    }

    /// The entry after `before`, signed by `signer`, rotating to `new`;
    /// under feed id `[feed_id; 16]` if given, else `before`'s.
    fn rotation(
        signer: &SigningKey,
        before: &Entry,
        feed_id: Option<u8>,
        new: &SigningKey,
    ) -> Entry {
        let mut body = before.body.clone();
        body.seq += 1;
        if let Some(id) = feed_id {
            body.feed_id = vec![id; 16];
        }
        body.prev_hash = before.hash.to_vec();
        body.payload = Some(Payload::KeyRotation(civex_proto::v1::KeyRotation {
            new_key: new.verifying_key().to_bytes().to_vec(),
        }));
        Entry::sign(signer, body).unwrap()
    }

    /// Entries `first..=last` of `origin` under `feed_id`, signed by `key`,
    /// after `before`.
    fn extend(key: &SigningKey, before: &Entry, feed_id: u8, last: u64) -> Vec<Entry> {
        let mut entries: Vec<Entry> = Vec::new();
        for seq in before.body.seq + 1..=last {
            let mut body = before.body.clone();
            body.seq = seq;
            body.feed_id = vec![feed_id; 16];
            body.prev_hash = entries.last().unwrap_or(before).hash.to_vec();
            entries.push(Entry::sign(key, body).unwrap());
        }
        entries
    }

    /// `count` entries of city-a, each signed by `signer(seq)`, with
    /// `padding` bytes of text each.
    pub(crate) fn chain_by<'k>(
        signer: impl Fn(u64) -> &'k SigningKey,
        count: u64,
        padding: usize,
    ) -> Vec<Entry> {
        let mut entries: Vec<Entry> = Vec::new();
        for seq in 1..=count {
            let prev = entries.last().map_or(GENESIS_PREV_HASH, |e| e.hash);
            let body = EntryBody {
                origin: "city-a".into(),
                feed_id: vec![7; 16],
                seq,
                prev_hash: prev.to_vec(),
                time_unix_micros: 1_000 + seq as i64,
                idempotency_key: vec![seq as u8; 16],
                payload: Some(Payload::Withdrawal(OfferWithdrawal {
                    offer_id: format!("offer-{seq}"),
                    reason: "x".repeat(padding),
                })),
            };
            entries.push(Entry::sign(signer(seq), body).unwrap());
        }
        entries
    }

    /// [`authenticate`] of city-a's `entries` from genesis, nothing held.
    fn from_genesis(key: &VerifyingKey, entries: Vec<Entry>) -> Authenticated {
        authenticate("city-a", key, &[], None, Uncovered::default(), entries)
    }

    fn seqs(entries: &[Entry]) -> Vec<u64> {
        entries.iter().map(|e| e.body.seq).collect()
    }

    #[test]
    fn entries_a_later_signature_covers_are_taken_across_messages() {
        let (good, wrong) = (key(1), key(9));
        let entries = chain_by(
            |seq| {
                if (2..=4).contains(&seq) {
                    &wrong
                } else {
                    &good
                }
            },
            6,
            0,
        );
        let pk = good.verifying_key();
        // In one message: all of it.
        let whole = from_genesis(&pk, entries.clone());
        assert_eq!(seqs(&whole.accepted), [1, 2, 3, 4, 5, 6]);
        assert!(whole.refused.is_none() && whole.uncovered.is_empty());
        assert_eq!(whole.tip, Some(entries[5].tip()));
        // Cut after seq 3: seq 1 is taken, 2 and 3 wait for the next
        // message, which covers them.
        let first = from_genesis(&pk, entries[..3].to_vec());
        assert_eq!(seqs(&first.accepted), [1]);
        assert_eq!(seqs(first.uncovered.entries()), [2, 3]);
        assert!(first.refused.is_none());
        assert_eq!(first.tip, Some(entries[0].tip()));
        let rest = entries[3..].to_vec();
        let second = authenticate("city-a", &pk, &[], first.tip, first.uncovered, rest);
        assert_eq!(seqs(&second.accepted), [2, 3, 4, 5, 6]);
        assert!(second.refused.is_none() && second.uncovered.is_empty());
    }

    #[test]
    fn a_bad_signature_nothing_within_reach_covers_is_refused() {
        let (good, wrong) = (key(1), key(9));
        let pk = good.verifying_key();
        // A broken link before any good signature: seq 2 is refused.
        let mut entries = chain_by(|seq| if seq == 2 { &wrong } else { &good }, 4, 0);
        let mut body = entries[2].body.clone();
        body.prev_hash = vec![0; 32];
        entries[2] = Entry::sign(&good, body).unwrap();
        let out = from_genesis(&pk, entries);
        assert_eq!(seqs(&out.accepted), [1]);
        assert!(matches!(
            out.refused,
            Some((FeedError::BadSignature { seq: 2, .. }, _))
        ));
        assert!(out.uncovered.is_empty());
        // More than COVER_BYTES of bad signatures before the good one.
        let padding = 60 * 1024;
        let count = (COVER_BYTES / padding) as u64 + 3;
        let entries = chain_by(
            |seq| if seq == count { &good } else { &wrong },
            count,
            padding,
        );
        let out = from_genesis(&pk, entries.clone());
        assert!(out.accepted.is_empty() && out.uncovered.is_empty());
        assert!(matches!(
            out.refused,
            Some((FeedError::BadSignature { seq: 1, .. }, _))
        ));
        // Within reach it waits: the covering entry may come next.
        let out = from_genesis(&pk, entries[..10].to_vec());
        assert_eq!((out.accepted.len(), out.uncovered.entries().len()), (0, 10));
        assert!(out.refused.is_none());
    }

    #[test]
    fn bad_and_good_signatures_in_turn_are_taken_up_to_the_last_good_one() {
        let (good, wrong) = (key(1), key(9));
        let pk = good.verifying_key();
        let entries = chain_by(|seq| if seq % 2 == 1 { &wrong } else { &good }, 201, 0);
        let out = from_genesis(&pk, entries.clone());
        assert_eq!(out.accepted.len(), 200);
        assert_eq!(seqs(out.uncovered.entries()), [201]);
        assert_eq!(out.tip, Some(entries[199].tip()));
        // Held back one message at a time, they wait while within reach,
        // and are refused, from the first, once past it.
        let padding = 60 * 1024;
        let count = (COVER_BYTES / padding) as u64 + 3;
        let entries = chain_by(
            |seq| if seq == count { &good } else { &wrong },
            count,
            padding,
        );
        let mut held = Uncovered::default();
        for (i, entry) in entries.iter().enumerate() {
            let out = authenticate("city-a", &pk, &[], None, held, vec![entry.clone()]);
            assert!(out.accepted.is_empty());
            if out.refused.is_some() {
                assert!(matches!(
                    out.refused,
                    Some((FeedError::BadSignature { seq: 1, .. }, _))
                ));
                assert!(
                    i as u64 > COVER_BYTES as u64 / padding as u64 - 2,
                    "refused at {i}"
                );
                return;
            }
            held = out.uncovered;
        }
        panic!("entries past COVER_BYTES were held back");
    }

    #[test]
    fn a_rotation_must_verify_its_own_signature() {
        let (good, wrong, next) = (key(1), key(9), key(3));
        let pk = good.verifying_key();
        let first = chain(&good, "city-a", 1);
        // A rotation signed with the wrong key, then an entry the key it
        // names signs: the rotation is refused, not covered.
        let bad_rotation = rotation(&wrong, &first[0], None, &next);
        let after = extend(&next, &bad_rotation, 7, 3);
        let entries: Vec<Entry> = first
            .iter()
            .chain([&bad_rotation])
            .chain(&after)
            .cloned()
            .collect();
        let out = from_genesis(&pk, entries);
        assert_eq!(seqs(&out.accepted), [1]);
        assert!(matches!(
            out.refused,
            Some((FeedError::BadSignature { seq: 2, .. }, _))
        ));
        // A bad entry before a good rotation is covered by it, and the key
        // it names holds after it.
        let bad = chain_by(|seq| if seq == 2 { &wrong } else { &good }, 2, 0);
        let good_rotation = rotation(&good, &bad[1], None, &next);
        let after = extend(&next, &good_rotation, 7, 5);
        let entries: Vec<Entry> = bad
            .iter()
            .chain([&good_rotation])
            .chain(&after)
            .cloned()
            .collect();
        let out = from_genesis(&pk, entries);
        assert_eq!(seqs(&out.accepted), [1, 2, 3, 4, 5]);
        assert_eq!(out.key, next.verifying_key());
        assert!(out.refused.is_none());
    }

    #[test]
    fn a_lost_key_replaced_by_the_roster_continues_the_chain() {
        let (lost, new) = (key(1), key(2));
        let old_feed = chain(&lost, "city-a", 3);
        let replacement = Replacement {
            old_feed_id: [7; 16],
            last_seq: 3,
            last_hash: old_feed[2].hash,
            new_feed_id: [9; 16],
            new_key: new.verifying_key(),
        };
        let new_feed = extend(&new, &old_feed[2], 9, 5);
        let whole: Vec<Entry> = old_feed.iter().chain(&new_feed).cloned().collect();
        let replaced = [replacement];

        // In one range, from genesis or resumed at the cut, the key changes there.
        let (tip, after) =
            verify_chain("city-a", &lost.verifying_key(), &replaced, None, &whole).unwrap();
        assert_eq!((tip.unwrap().seq, after), (5, new.verifying_key()));
        let (_, after) = verify_chain(
            "city-a",
            &lost.verifying_key(),
            &replaced,
            Some(&old_feed[2].tip()),
            &new_feed,
        )
        .unwrap();
        assert_eq!(after, new.verifying_key());
        // Without the roster's word, the new feed id is refused.
        assert!(matches!(
            verify_chain("city-a", &lost.verifying_key(), &[], None, &whole),
            Err(FeedError::WrongFeedId { seq: 4, .. })
        ));

        // The old key signs on after the cut: refused, whatever it claims.
        let stale = extend(&lost, &old_feed[2], 7, 4);
        assert!(matches!(
            check_link("city-a", &replaced, Some(&old_feed[2].tip()), &stale[0]),
            Err(FeedError::Replaced {
                seq: 4,
                last_seq: 3,
                ..
            })
        ));
        // Nor may it sign another entry at the seq the roster kept.
        let other_last = extend(&lost, &old_feed[1], 7, 3);
        assert!(matches!(
            check_link(
                "city-a",
                &replaced,
                Some(&old_feed[1].tip()),
                &other_last[0]
            ),
            Err(FeedError::Replaced { seq: 3, .. })
        ));
        // The old key cannot start the new feed either.
        let forged = extend(&lost, &old_feed[2], 9, 4);
        assert!(matches!(
            verify_chain(
                "city-a",
                &lost.verifying_key(),
                &replaced,
                None,
                &[old_feed.clone(), forged].concat()
            ),
            Err(FeedError::BadSignature { seq: 4, .. })
        ));
        // Nor may the new feed start anywhere but right after the entry named.
        let early = extend(&new, &old_feed[1], 9, 3);
        assert!(verify_chain(
            "city-a",
            &lost.verifying_key(),
            &replaced,
            None,
            &[old_feed[..2].to_vec(), early].concat()
        )
        .is_err());

        // A node that holds nothing of the origin takes only the history
        // the roster names: the lost key cannot make up a feed of its own.
        let mut genesis = old_feed[0].body.clone();
        genesis.feed_id = vec![5; 16];
        let made_up = [Entry::sign(&lost, genesis).unwrap()];
        assert!(matches!(
            verify_chain("city-a", &lost.verifying_key(), &replaced, None, &made_up),
            Err(FeedError::NotRosterFeed { .. })
        ));
        // Without a replacement, any feed may start.
        assert!(check_link("city-a", &[], None, &made_up[0]).is_ok());

        // Rotations of the old feed do not carry over to the new one.
        let rotations = [
            (2, key(5).verifying_key().to_bytes()),
            (4, key(6).verifying_key().to_bytes()),
        ];
        let at =
            |seq| key_after("city-a", &lost.verifying_key(), &replaced, &rotations, seq).unwrap();
        assert_eq!(at(1), lost.verifying_key());
        assert_eq!(at(2), key(5).verifying_key());
        assert_eq!(at(3), new.verifying_key());
        assert_eq!(at(4), key(6).verifying_key());
    }

    #[test]
    fn a_replacement_next_to_rotations() {
        // Old feed: seq 1 by key 1, seq 2 rotates to key 3 (the last entry
        // kept). New feed from seq 3 by key 2, whose first entry rotates to
        // key 4; seq 4 is signed by key 4.
        let (first, rotated, new, new_rotated) = (key(1), key(3), key(2), key(4));
        let mut old_feed = chain(&first, "city-a", 1);
        old_feed.push(rotation(&first, &old_feed[0], None, &rotated));
        let switch = rotation(&new, &old_feed[1], Some(9), &new_rotated);
        let after = extend(&new_rotated, &switch, 9, 4);
        let replaced = [Replacement {
            old_feed_id: [7; 16],
            last_seq: 2,
            last_hash: old_feed[1].hash,
            new_feed_id: [9; 16],
            new_key: new.verifying_key(),
        }];
        let whole = [old_feed.clone(), vec![switch.clone()], after].concat();
        let (tip, key_after_range) =
            verify_chain("city-a", &first.verifying_key(), &replaced, None, &whole).unwrap();
        assert_eq!(tip.unwrap().seq, 4);
        assert_eq!(key_after_range, new_rotated.verifying_key());
        // The rotated old key cannot sign the new feed's first entry.
        let mut body = switch.body.clone();
        body.payload = None;
        let forged = Entry::sign(&rotated, body).unwrap();
        assert!(matches!(
            verify_chain(
                "city-a",
                &first.verifying_key(),
                &replaced,
                None,
                &[old_feed, vec![forged]].concat()
            ),
            Err(FeedError::BadSignature { seq: 3, .. })
        ));
    }

    #[test]
    fn roster_replacements_must_follow_each_other() {
        let replacement = |old: u8, last_seq: u64, new: u8| civex_proto::v1::FeedReplacement {
            old_feed_id: vec![old; 16],
            last_seq,
            last_hash: vec![1; 32],
            new_feed_id: vec![new; 16],
            new_feed_key: key(new).verifying_key().to_bytes().to_vec(),
        };
        let entry = |replacements| civex_proto::v1::RosterEntry {
            origin: "city-a".into(),
            replacements,
            ..Default::default()
        };
        let chained = entry(vec![replacement(1, 5, 2), replacement(2, 9, 3)]);
        assert_eq!(replacements_of(&chained).unwrap().len(), 2);
        assert!(
            replacements_of(&entry(vec![replacement(1, 5, 2), replacement(4, 9, 3)])).is_none()
        );
        assert!(
            replacements_of(&entry(vec![replacement(1, 5, 2), replacement(2, 5, 3)])).is_none()
        );
        let mut short = replacement(1, 5, 2);
        short.new_feed_key.pop();
        assert!(replacements_of(&entry(vec![short])).is_none());
    }

    #[test]
    fn conflicts_need_two_valid_signatures() {
        let key = key(1);
        let entries = chain(&key, "city-a", 2);
        // Another entry at seq 2, linked to the same seq 1: a fork.
        let mut body = entries[1].body.clone();
        body.time_unix_micros += 1;
        let fork = Entry::sign(&key, body).unwrap();
        let k = key.verifying_key();
        let judged = judge_conflict((&k, &entries[1]), (&k, &fork)).unwrap();
        assert_eq!(judged.kind, ConflictKind::Fork);
        // The same entry twice is no conflict.
        assert!(judge_conflict((&k, &entries[1]), (&k, &entries[1])).is_none());
        // An entry the origin's key did not sign is no evidence.
        let forged = Entry::sign(&self::key(9), fork.body.clone()).unwrap();
        assert!(judge_conflict((&k, &entries[1]), (&k, &forged)).is_none());
        // A new feed id, validly signed: the feed was started over.
        let restarted = chain(&key, "city-a", 1);
        let mut body = restarted[0].body.clone();
        body.feed_id = vec![8; FEED_ID_LEN];
        let restarted = Entry::sign(&key, body).unwrap();
        let judged = judge_conflict((&k, &entries[1]), (&k, &restarted)).unwrap();
        assert_eq!(judged.kind, ConflictKind::Recreated);
        // Only a new feed's seq 1 is evidence of a re-created feed.
        let mut later = restarted.body.clone();
        later.seq = 2;
        let later = Entry::sign(&key, later).unwrap();
        assert!(judge_conflict((&k, &entries[1]), (&k, &later)).is_none());
    }
}
