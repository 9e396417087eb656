//! The feed key file and the key resolver.
//!
//! A feed key is an Ed25519 seed stored as hex in a file of mode 0600; a key
//! file that group or others may read is refused. The feed key signs feed
//! entries and nothing else.

use std::{
    collections::BTreeMap,
    fs::OpenOptions,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
};

use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::core::{
    feed::Replacement,
    ids::{hex, unhex},
};

/// A key file problem, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading or writing failed.
    #[error("key file {path}: {message}")]
    File {
        /// Path of the file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// A public key in text does not parse.
    #[error("feed key {0}")]
    Public(String),
}

fn file_error(path: &Path, message: impl Into<String>) -> KeyError {
    KeyError::File {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Writes a new secret file with mode 0600; never overwrites. The file
/// appears whole or not at all: it is written and synced as
/// `<path>.partial`, then linked to its name (which fails if the name is
/// taken) and the directory synced. A crash can leave only the partial
/// file, removed by the next write, never an empty or cut-short key that
/// would stop the node from starting.
pub fn write_secret_file(path: &Path, contents: &[u8]) -> Result<(), KeyError> {
    if path.exists() {
        return Err(file_error(path, "cannot create: it already exists"));
    }
    let partial = partial_of(path);
    match std::fs::remove_file(&partial) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(file_error(&partial, format!("cannot remove: {err}"))),
    }
    let create = |at: &Path| {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(at)
            .and_then(|mut file| {
                file.write_all(contents)?;
                file.sync_all()
            })
    };
    let written = create(&partial).and_then(|()| match std::fs::hard_link(&partial, path) {
        Err(err) if err.kind() != std::io::ErrorKind::AlreadyExists => {
            // No hard links here (FAT, some network mounts): write in
            // place, as whole as that filesystem allows.
            create(path)
        }
        linked => linked,
    });
    let _ = std::fs::remove_file(&partial);
    written
        .and_then(|()| sync_parent(path))
        .map_err(|err| file_error(path, format!("cannot create: {err}")))
}

/// Where [`write_secret_file`] writes `path` before linking it.
fn partial_of(path: &Path) -> std::path::PathBuf {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    partial.into()
}

/// Reads a secret file, refusing one that group or others may read. A
/// crash between the link and the removal of [`write_secret_file`] leaves
/// `<path>.partial` as a second name of the secret, which would outlive
/// the file (a rotated-out key, say): it is removed here. Only that
/// second name is: a partial file that is not the same file is a write
/// that never completed, replaced by the next one.
pub fn read_secret_file(path: &Path) -> Result<String, KeyError> {
    use std::os::unix::fs::MetadataExt;
    let partial = partial_of(path);
    if let (Ok(file), Ok(other)) = (std::fs::metadata(path), std::fs::symlink_metadata(&partial)) {
        if (file.dev(), file.ino()) == (other.dev(), other.ino()) {
            std::fs::remove_file(&partial)
                .map_err(|err| file_error(&partial, format!("cannot remove: {err}")))?;
        }
    }
    // Opened once, and the mode checked on the file opened: the file read
    // is the file checked, even if the path is swapped in between.
    let cannot_read = |err: std::io::Error| file_error(path, format!("cannot read: {err}"));
    let mut file = std::fs::File::open(path).map_err(cannot_read)?;
    let metadata = file.metadata().map_err(cannot_read)?;
    if !metadata.is_file() {
        return Err(file_error(path, "is not a regular file"));
    }
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(file_error(
            path,
            format!(
                "is readable by group or others (mode {mode:o}); run: chmod 600 {}",
                path.display()
            ),
        ));
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut file, &mut text).map_err(cannot_read)?;
    Ok(text)
}

/// The key the noise of publishes is derived from: read from `path`, or
/// created there (mode 0600) when `create` is set and the file is missing.
/// Without a file and `create`, `None`.
pub fn noise_key(path: &Path, create: bool) -> Result<Option<[u8; 32]>, KeyError> {
    if !path.exists() {
        if !create {
            return Ok(None);
        }
        let mut key = [0u8; 32];
        getrandom::getrandom(&mut key)
            .map_err(|err| file_error(path, format!("no randomness for a key: {err}")))?;
        write_secret_file(path, crate::core::ids::hex(&key).as_bytes())?;
        tracing::info!(file = %path.display(), "created the noise key");
        return Ok(Some(key));
    }
    let text = read_secret_file(path)?;
    crate::core::ids::unhex(text.trim())
        .ok()
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
        .map(Some)
        .ok_or_else(|| file_error(path, "is not 64 hex digits (a noise key)"))
}

/// Creates a new random feed key in `path` (mode 0600; never overwrites).
pub fn create_key_file(path: &Path) -> Result<SigningKey, KeyError> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed)
        .map_err(|err| file_error(path, format!("no randomness available: {err}")))?;
    let key = SigningKey::from_bytes(&seed);
    let written = write_secret_file(path, format!("{}\n", hex(&seed)).as_bytes());
    seed.fill(0);
    written.map(|()| key)
}

/// Loads a feed key, refusing a file that group or others may read.
pub fn load_key_file(path: &Path) -> Result<SigningKey, KeyError> {
    let text = read_secret_file(path)?;
    let seed = unhex(text.trim())
        .ok()
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
        .ok_or_else(|| file_error(path, "does not hold a 32-byte hex Ed25519 seed"))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// The public key peers pin for this node's feed (the key of seq 1):
/// `feed.pub` beside the key file, written by `civex init` and kept by key
/// rotation; without it, the key file's own key (no rotation yet).
pub fn genesis_key(key_file: &Path, current: &SigningKey) -> Result<VerifyingKey, KeyError> {
    let path = key_file.with_extension("pub");
    match std::fs::read_to_string(&path) {
        Ok(text) => parse_public_key(&text).map_err(|err| file_error(&path, err.to_string())),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(current.verifying_key()),
        Err(err) => Err(file_error(&path, format!("cannot read: {err}"))),
    }
}

/// Where a rotation keeps the new key until the rotation entry is durable.
pub fn next_key_file(key_file: &Path) -> std::path::PathBuf {
    let mut name = key_file.as_os_str().to_owned();
    name.push(".next");
    name.into()
}

/// Prepares a key rotation: makes the new key, kept in `<key file>.next`
/// (mode 0600), and records the current key as the genesis key if no
/// `feed.pub` names one yet. Returns the new key.
pub fn prepare_rotation(key_file: &Path, current: &SigningKey) -> Result<SigningKey, KeyError> {
    let genesis = key_file.with_extension("pub");
    if !genesis.exists() {
        let text = format!("{}\n", public_key_hex(&current.verifying_key()));
        replace_file(&genesis, text.as_bytes())
            .map_err(|err| file_error(&genesis, format!("cannot write: {err}")))?;
    }
    let next = next_key_file(key_file);
    if next.exists() {
        return Err(file_error(
            &next,
            "an earlier rotation is not settled; restart the node to settle it",
        ));
    }
    let key = create_key_file(&next)?;
    sync_parent(&next).map_err(|err| file_error(&next, format!("cannot sync: {err}")))?;
    Ok(key)
}

/// Writes `path` whole or not at all: a temporary file beside it, fsynced,
/// renamed over it, and the directory fsynced.
pub fn replace_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = std::path::PathBuf::from(temporary);
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)?;
    sync_parent(path)
}

/// Fsyncs the directory holding `path`, so a new name in it survives.
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        // A bare file name: its folder is the working directory.
        Some(dir) if dir.as_os_str().is_empty() => {
            std::fs::File::open(".").and_then(|d| d.sync_all())
        }
        Some(dir) => std::fs::File::open(dir).and_then(|d| d.sync_all()),
        None => Ok(()),
    }
}

/// Makes the rotated key the key file, once the rotation entry is durable
/// (or found in the feed at start-up).
pub fn finish_rotation(key_file: &Path) -> Result<(), KeyError> {
    let next = next_key_file(key_file);
    std::fs::rename(&next, key_file)
        .and_then(|()| sync_parent(key_file))
        .map_err(|err| file_error(key_file, format!("cannot install the rotated key: {err}")))
}

/// At start-up: completes a rotation the feed holds (whose new key is the
/// one in `<key file>.next`), or drops the new key of one it never made
/// durable. `last_rotation` is the newest key the own feed rotated to.
pub fn recover_rotation(key_file: &Path, last_rotation: Option<[u8; 32]>) -> Result<(), KeyError> {
    let next = next_key_file(key_file);
    if !next.exists() {
        return Ok(());
    }
    let pending = load_key_file(&next)?;
    if last_rotation == Some(pending.verifying_key().to_bytes()) {
        tracing::warn!(key_file = %key_file.display(), "completing a key rotation the feed holds");
        finish_rotation(key_file)
    } else {
        tracing::warn!(key_file = %key_file.display(), "dropping the new key of a rotation never made durable");
        std::fs::remove_file(&next)
            .map_err(|err| file_error(&next, format!("cannot remove: {err}")))
    }
}

/// Parses a hex Ed25519 public key.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, KeyError> {
    let bytes = unhex(text.trim())
        .ok()
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
        .ok_or_else(|| KeyError::Public(format!("{text:?} is not 64 hex digits")))?;
    let key = VerifyingKey::from_bytes(&bytes)
        .map_err(|_| KeyError::Public(format!("{text:?} is not an Ed25519 public key")))?;
    if key.is_weak() {
        return Err(KeyError::Public(format!(
            "{text:?} is a weak (small-order) key"
        )));
    }
    Ok(key)
}

/// Hex of a public key, as written in `node.toml`.
pub fn public_key_hex(key: &VerifyingKey) -> String {
    hex(key.as_bytes())
}

/// Answers "which key is valid for (origin, feed id, seq)": the key of
/// seq 1 of an origin's feed, and the replacements of lost keys after which
/// the feed goes on under a new feed id and key (rotations are followed
/// along the feed). Keys come from `node.toml` (pinned) or from the
/// federation's roster, itself a feed verified with its pinned key; never
/// from a peer. Replacements come from the roster only.
#[derive(Debug)]
pub struct KeyResolver {
    own_origin: String,
    pinned: BTreeMap<String, VerifyingKey>,
    roster: std::sync::RwLock<BTreeMap<String, Member>>,
}

/// A member as the roster names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The key of seq 1 of its feed.
    pub key: VerifyingKey,
    /// Its lost keys' replacements, oldest first.
    pub replacements: Vec<Replacement>,
    /// It left the federation: what is held of its feed stays verifiable,
    /// but it is no longer replicated.
    pub removed: bool,
}

impl KeyResolver {
    /// This node's own key plus the pinned keys of other origins.
    pub fn new(
        own_origin: &str,
        own: VerifyingKey,
        pinned: BTreeMap<String, VerifyingKey>,
    ) -> Self {
        let mut keys = pinned;
        keys.insert(own_origin.to_owned(), own);
        Self {
            own_origin: own_origin.to_owned(),
            pinned: keys,
            roster: std::sync::RwLock::default(),
        }
    }

    /// The key of seq 1 of `origin`'s feed: pinned first, then the roster's.
    pub fn key_for(&self, origin: &str, _feed_id: &[u8], _seq: u64) -> Option<VerifyingKey> {
        self.pinned.get(origin).copied().or_else(|| {
            self.roster
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(origin)
                .map(|m| m.key)
        })
    }

    /// The replacements of `origin`'s lost keys the roster names, oldest
    /// first (none for an origin pinned in `node.toml`).
    pub fn replacements(&self, origin: &str) -> Vec<Replacement> {
        self.roster
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(origin)
            .map(|m| m.replacements.clone())
            .unwrap_or_default()
    }

    /// Whether `origin`'s first key is pinned here (`trusted_origins`, or
    /// this node's own origin): the roster's replacements of other
    /// origins' keys do not apply to it.
    pub fn is_pinned(&self, origin: &str) -> bool {
        self.pinned.contains_key(origin)
    }

    /// Whether `origin` is a member this node knows now: pinned (its own
    /// origin included), or named by the roster and not removed.
    pub fn is_member(&self, origin: &str) -> bool {
        self.pinned.contains_key(origin) || self.removed_from_roster(origin) == Some(false)
    }

    /// Whether the roster removed `origin` (and it is not pinned).
    pub fn was_removed(&self, origin: &str) -> bool {
        !self.pinned.contains_key(origin) && self.removed_from_roster(origin) == Some(true)
    }

    /// Whether the roster names `origin` as removed; `None` if it names it
    /// not at all.
    fn removed_from_roster(&self, origin: &str) -> Option<bool> {
        self.roster
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(origin)
            .map(|m| m.removed)
    }

    /// Every origin to replicate: pinned, or a member the roster has not
    /// removed; in order.
    pub fn origins(&self) -> Vec<String> {
        let roster = self
            .roster
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let members = roster.iter().filter(|(_, m)| !m.removed).map(|(o, _)| o);
        let mut origins: Vec<String> = self.pinned.keys().chain(members).cloned().collect();
        origins.sort();
        origins.dedup();
        origins
    }

    /// Replaces the members learned from the roster; returns whether
    /// anything changed. An origin pinned in `node.toml` keeps its pinned
    /// key and ignores the roster, its replacements included: pinning means
    /// the roster has no say. This node's own origin (whose first key is
    /// `feed.pub`) takes the roster's replacements when the roster names
    /// that first key, so a node whose key was lost can publish again.
    pub fn set_roster(&self, members: BTreeMap<String, Member>) -> bool {
        let members: BTreeMap<String, Member> = members
            .into_iter()
            .filter(|(origin, member)| match self.pinned.get(origin) {
                None => true,
                Some(pinned) if *origin == self.own_origin && *pinned == member.key => true,
                Some(pinned) => {
                    if *pinned != member.key {
                        tracing::warn!(%origin, "the roster names another first key than this node pins (trusted_origins, or feed.pub for its own origin); the pinned key stays");
                    }
                    false
                }
            })
            .collect();
        let mut roster = self
            .roster
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = *roster != members;
        *roster = members;
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_are_private_and_refused_when_readable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("feed.key");
        let key = create_key_file(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_key_file(&path).unwrap().to_bytes(), key.to_bytes());
        assert!(
            create_key_file(&path).is_err(),
            "an existing key was overwritten"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = load_key_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("readable by group or others (mode 640)"),
            "{err}"
        );
        assert!(
            !err.contains(&hex(&key.to_bytes())),
            "the secret leaked into an error"
        );
        // Through a link (a mounted secret, say) the file read is the file
        // checked: its mode counts, not the link's.
        let link = dir.path().join("linked.key");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let err = load_key_file(&link).unwrap_err().to_string();
        assert!(err.contains("(mode 640)"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load_key_file(&link).unwrap().to_bytes(), key.to_bytes());
        // Nor is anything but a regular file read (a FIFO would hang).
        let err = read_secret_file(dir.path()).unwrap_err().to_string();
        assert!(err.contains("is not a regular file"), "{err}");
    }

    #[test]
    fn a_secret_file_appears_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("feed.key.next");
        // What a crash in the middle of an earlier write leaves: only the
        // partial file, which the next write replaces.
        let partial = dir.path().join("feed.key.next.partial");
        std::fs::write(&partial, b"").unwrap();
        assert!(!path.exists());
        write_secret_file(&path, b"secret\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"secret\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!partial.exists(), "the partial file was left behind");
        // Never overwrites, and leaves the file as it was.
        let err = write_secret_file(&path, b"other\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("already exists"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"secret\n");

        // A crash after the link left the partial name as a second name of
        // the secret: reading the secret removes it. A partial file of a
        // write that never completed stays for the next write to replace.
        std::fs::hard_link(&path, &partial).unwrap();
        assert_eq!(read_secret_file(&path).unwrap(), "secret\n");
        assert!(!partial.exists(), "a second name of the secret was left");
        std::fs::write(&partial, b"never linked").unwrap();
        assert_eq!(read_secret_file(&path).unwrap(), "secret\n");
        assert_eq!(std::fs::read(&partial).unwrap(), b"never linked");
    }

    #[test]
    fn the_roster_replaces_keys_of_its_members_and_the_own_origin_only() {
        let key = |seed: u8| SigningKey::from_bytes(&[seed; 32]).verifying_key();
        let replaced = |first| Member {
            removed: false,
            key: first,
            replacements: vec![Replacement {
                old_feed_id: [1; 16],
                last_seq: 3,
                last_hash: [2; 32],
                new_feed_id: [3; 16],
                new_key: key(9),
            }],
        };
        let resolver = KeyResolver::new(
            "own",
            key(1),
            [("pinned".to_owned(), key(2))].into_iter().collect(),
        );
        resolver.set_roster(
            [
                ("own".to_owned(), replaced(key(1))),
                ("pinned".to_owned(), replaced(key(2))),
                ("member".to_owned(), replaced(key(4))),
            ]
            .into_iter()
            .collect(),
        );
        assert_eq!(resolver.replacements("own").len(), 1);
        assert_eq!(resolver.replacements("member").len(), 1);
        assert!(resolver.replacements("pinned").is_empty());
        assert_eq!(resolver.key_for("member", &[], 0), Some(key(4)));
        // The roster naming another first key for the own origin is ignored.
        resolver.set_roster([("own".to_owned(), replaced(key(5)))].into_iter().collect());
        assert!(resolver.replacements("own").is_empty());
        assert_eq!(resolver.key_for("own", &[], 0), Some(key(1)));
    }

    #[test]
    fn members_are_the_pinned_and_the_rosters_not_removed() {
        let key = |seed: u8| SigningKey::from_bytes(&[seed; 32]).verifying_key();
        let member = |seed, removed| Member {
            key: key(seed),
            replacements: Vec::new(),
            removed,
        };
        let resolver = KeyResolver::new(
            "own",
            key(1),
            [("pinned".to_owned(), key(2))].into_iter().collect(),
        );
        resolver.set_roster(
            [
                ("member".to_owned(), member(3, false)),
                ("gone".to_owned(), member(4, true)),
            ]
            .into_iter()
            .collect(),
        );
        for (origin, known) in [
            ("own", true),
            ("pinned", true),
            ("member", true),
            ("gone", false),
            ("stranger", false),
        ] {
            assert_eq!(resolver.is_member(origin), known, "{origin}");
            assert_eq!(resolver.was_removed(origin), origin == "gone", "{origin}");
        }
        // A removed member's key stays, to verify what is held of it.
        assert_eq!(resolver.key_for("gone", &[], 0), Some(key(4)));
    }

    #[test]
    fn public_keys_parse() {
        let key = SigningKey::from_bytes(&[3; 32]).verifying_key();
        assert_eq!(parse_public_key(&public_key_hex(&key)).unwrap(), key);
        assert!(parse_public_key("abcd").is_err());
        // The identity point is a small-order key.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert!(parse_public_key(&hex(&identity)).is_err());
    }

    #[test]
    fn a_rotation_cut_short_is_finished_or_dropped_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("feed.key");
        let old = create_key_file(&file).unwrap();
        // Prepared but never durable: the new key is dropped.
        let new = prepare_rotation(&file, &old).unwrap();
        assert_eq!(
            genesis_key(&file, &new).unwrap(),
            old.verifying_key(),
            "the genesis key was not kept"
        );
        recover_rotation(&file, None).unwrap();
        assert!(!next_key_file(&file).exists());
        assert_eq!(load_key_file(&file).unwrap().to_bytes(), old.to_bytes());
        // Durable (the feed names the new key): the rotation is finished.
        let new = prepare_rotation(&file, &old).unwrap();
        recover_rotation(&file, Some(new.verifying_key().to_bytes())).unwrap();
        assert_eq!(load_key_file(&file).unwrap().to_bytes(), new.to_bytes());
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
