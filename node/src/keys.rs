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

use crate::core::ids::{hex, unhex};

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

/// Writes a new secret file with mode 0600; never overwrites.
pub fn write_secret_file(path: &Path, contents: &[u8]) -> Result<(), KeyError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|err| file_error(path, format!("cannot create: {err}")))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|err| file_error(path, format!("cannot write: {err}")))
}

/// Reads a secret file, refusing one that group or others may read.
pub fn read_secret_file(path: &Path) -> Result<String, KeyError> {
    let metadata =
        std::fs::metadata(path).map_err(|err| file_error(path, format!("cannot read: {err}")))?;
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
    std::fs::read_to_string(path).map_err(|err| file_error(path, format!("cannot read: {err}")))
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

/// Answers "which key is valid for (origin, feed id, seq)". Until the
/// federation roster exists, keys are pinned in `node.toml`, never learned
/// from a feed or a peer.
#[derive(Debug, Clone)]
pub struct KeyResolver {
    keys: BTreeMap<String, VerifyingKey>,
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
        Self { keys }
    }

    /// The key valid for an entry of `origin`'s feed. Every feed id and seq
    /// has the one pinned key until key rotation exists.
    pub fn key_for(&self, origin: &str, _feed_id: &[u8], _seq: u64) -> Option<&VerifyingKey> {
        self.keys.get(origin)
    }

    /// Every origin with a known key.
    pub fn origins(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
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
}
