//! The entry log: the signed entry bytes of bulk commits, appended to one
//! file; bytes the store recorded are never rewritten. sled holds only where each chunk lies (a
//! [`Locator`]) and how long the log is, so these bytes are written once
//! instead of being copied again by every sled page rewrite, split and
//! segment clean.
//!
//! Order of a bulk commit: the chunks are appended and `fdatasync`ed first, then
//! the sled batch naming them (with the new log length) is written and
//! synced. A crash between the two leaves bytes past the length sled
//! recorded; [`EntryLog::open`] moves them to a file of their own
//! (`entries.log.cut-<offset>`) and cuts them off, so that nothing is
//! destroyed should they be more than that (a damaged `db` that sled
//! rolled back to an earlier commit). A log shorter than recorded means
//! bytes that were acknowledged are gone: the store refuses to open.

use std::{
    fs::{File, OpenOptions},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::Mutex,
};

use super::StoreError;

/// The log's file name in the store directory.
pub(super) const FILE_NAME: &str = "entries.log";

/// Where a chunk of entries lies in the log, with its CRC-32 so that bytes
/// damaged on disk are reported as such.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Locator {
    pub(super) offset: u64,
    pub(super) len: u32,
    pub(super) crc: u32,
}

/// Largest chunk a read accepts: chunks are at most 64 KiB, or one entry
/// (at most 64 KiB) with its framing; this leaves room to spare.
pub(super) const MAX_CHUNK_BYTES: u32 = 1 << 20;

/// Encoded size of a [`Locator`].
pub(super) const LOCATOR_LEN: usize = 16;

impl Locator {
    pub(super) fn encode(&self) -> [u8; LOCATOR_LEN] {
        let mut out = [0; LOCATOR_LEN];
        out[..8].copy_from_slice(&self.offset.to_be_bytes());
        out[8..12].copy_from_slice(&self.len.to_be_bytes());
        out[12..].copy_from_slice(&self.crc.to_be_bytes());
        out
    }

    pub(super) fn decode(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; LOCATOR_LEN] = bytes.try_into().ok()?;
        Some(Self {
            offset: u64::from_be_bytes(bytes[..8].try_into().ok()?),
            len: u32::from_be_bytes(bytes[8..12].try_into().ok()?),
            crc: u32::from_be_bytes(bytes[12..].try_into().ok()?),
        })
    }
}

/// Copies bytes `from..to` of the log at `path` to a new file beside it,
/// `<log>.cut-<from>` (`.1`, `.2`, ... if taken), synced; returns its path.
fn keep_apart(log: &File, path: &Path, from: u64, to: u64) -> std::io::Result<PathBuf> {
    use std::io::{Read, Seek};
    let base = format!("{}.cut-{from}", path.display());
    let mut attempt = 0;
    loop {
        let kept = match attempt {
            0 => PathBuf::from(&base),
            n => PathBuf::from(format!("{base}.{n}")),
        };
        match OpenOptions::new().write(true).create_new(true).open(&kept) {
            Ok(mut file) => {
                // Copied in pieces: the tail may be large if sled lost much.
                let mut reader = log.try_clone()?;
                reader.seek(std::io::SeekFrom::Start(from))?;
                let copied = std::io::copy(&mut reader.take(to - from), &mut file)?;
                if copied != to - from {
                    return Err(std::io::Error::other(format!(
                        "copied {copied} of {} bytes",
                        to - from
                    )));
                }
                file.sync_all()?;
                if let Some(dir) = path.parent() {
                    File::open(dir)?.sync_all()?;
                }
                return Ok(kept);
            }
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => attempt += 1,
            Err(err) => return Err(err),
        }
    }
}

/// Makes appended bytes durable: `fdatasync` of the log; tests inject
/// their own.
pub(super) type LogSync = Box<dyn Fn(&File) -> std::io::Result<()> + Send + Sync>;

/// The open log.
pub(super) struct EntryLog {
    file: File,
    path: PathBuf,
    /// Length of the log: where the next append goes. Held for a whole
    /// commit, so appends and the sled batch recording them stay in order.
    end: Mutex<u64>,
    sync: LogSync,
    /// Bytes past the recorded length, left in place when opened to read.
    unrecorded: u64,
}

impl EntryLog {
    /// Opens (or creates) the log of the store in `dir`, whose sled batch
    /// last recorded `recorded_end` bytes, and (when `writable`) moves
    /// anything past it aside and cuts it off, unless a chunk the store
    /// names (`named_end` gives where the last one ends) lies past it:
    /// bytes of an acknowledged commit are never cut off, even if the
    /// recorded length were lost. Opened to read (`civex verify`), the log
    /// is left as it is and the bytes past it are counted
    /// ([`Self::unrecorded`]).
    pub(super) fn open(
        dir: &Path,
        recorded_end: u64,
        named_end: impl FnOnce() -> Result<u64, StoreError>,
        writable: bool,
    ) -> Result<Self, StoreError> {
        let path = dir.join(FILE_NAME);
        let io = |what: &str, err: std::io::Error| StoreError::Io {
            path: path.display().to_string(),
            message: format!("{what}: {err}"),
        };
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io("cannot open the entry log", e))?;
        let len = file
            .metadata()
            .map_err(|e| io("cannot read the entry log's size", e))?
            .len();
        if len < recorded_end {
            return Err(StoreError::Corrupt {
                path: path.display().to_string(),
                message: format!(
                    "the entry log holds {len} bytes but the store recorded {recorded_end}: \
                     stored entries are missing (restore the whole store directory from a backup)"
                ),
            });
        }
        if len > recorded_end {
            let named_end = named_end()?;
            if named_end > recorded_end {
                return Err(StoreError::Corrupt {
                    path: path.display().to_string(),
                    message: format!(
                        "the store recorded {recorded_end} bytes of entry log but names chunks \
                         up to byte {named_end}; nothing was cut off"
                    ),
                });
            }
            if !writable {
                return Ok(Self::at(file, path, recorded_end, len - recorded_end));
            }
            // Appended by a commit that a crash cut short, never
            // acknowledged: kept apart all the same, in case sled lost
            // commits it had synced (it takes a damaged record for the
            // torn end of its log).
            let kept = keep_apart(&file, &path, recorded_end, len)
                .map_err(|e| io("cannot keep the unrecorded end of the entry log apart", e))?;
            file.set_len(recorded_end)
                .and_then(|()| file.sync_all())
                .map_err(|e| io("cannot cut off the unfinished end of the entry log", e))?;
            tracing::warn!(log = %path.display(), bytes = len - recorded_end, kept = %kept.display(),
                "moved the end of the entry log past what the store recorded to a file of its \
                 own: the end of a commit a crash cut short, never acknowledged; if the node \
                 did not crash, the store may have lost commits (sled's db damaged): the file \
                 keeps their entries, and peers send back what they hold of them");
        }
        Ok(Self::at(file, path, recorded_end, 0))
    }

    fn at(file: File, path: PathBuf, end: u64, unrecorded: u64) -> Self {
        Self {
            file,
            path,
            end: Mutex::new(end),
            sync: Box::new(File::sync_data),
            unrecorded,
        }
    }

    /// The log and its bytes past the recorded length, when opened to read
    /// and there are some.
    pub(super) fn unrecorded(&self) -> Option<(&Path, u64)> {
        (self.unrecorded > 0).then_some((self.path.as_path(), self.unrecorded))
    }

    /// Replaces the sync step (tests).
    #[cfg(test)]
    pub(super) fn set_sync(&mut self, sync: LogSync) {
        self.sync = sync;
    }

    /// Takes the append position for one commit.
    pub(super) fn lock(&self) -> Result<std::sync::MutexGuard<'_, u64>, StoreError> {
        self.end.lock().map_err(|_| StoreError::Io {
            path: self.path.display().to_string(),
            message: "an earlier commit panicked".into(),
        })
    }

    /// Appends `bytes` at `*end` and syncs them, then moves `*end` past them.
    pub(super) fn append(&self, end: &mut u64, bytes: &[u8]) -> Result<(), StoreError> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.file
            .write_all_at(bytes, *end)
            .and_then(|()| (self.sync)(&self.file))
            .map_err(|e| StoreError::Io {
                path: self.path.display().to_string(),
                message: format!(
                    "cannot append {} bytes at offset {} of the entry log: {e}",
                    bytes.len(),
                    *end
                ),
            })?;
        *end += bytes.len() as u64;
        Ok(())
    }

    /// Reads the chunk at `at`, checking its CRC.
    pub(super) fn read(&self, at: Locator) -> Result<Vec<u8>, StoreError> {
        // A damaged locator must not make the node allocate gigabytes.
        if at.len > MAX_CHUNK_BYTES {
            return Err(StoreError::Corrupt {
                path: self.path.display().to_string(),
                message: format!(
                    "the store names a chunk of {} bytes at offset {}, larger than any it \
                     writes ({MAX_CHUNK_BYTES}): its record of the chunk is damaged",
                    at.len, at.offset
                ),
            });
        }
        let mut bytes = vec![0; at.len as usize];
        self.file
            .read_exact_at(&mut bytes, at.offset)
            .map_err(|e| {
                let message = format!(
                    "cannot read {} bytes at offset {} of the entry log: {e}",
                    at.len, at.offset
                );
                let path = self.path.display().to_string();
                match e.kind() {
                    // The store names bytes the log does not hold.
                    std::io::ErrorKind::UnexpectedEof => StoreError::Corrupt { path, message },
                    _ => StoreError::Io { path, message },
                }
            })?;
        if crc32fast::hash(&bytes) != at.crc {
            return Err(StoreError::Corrupt {
                path: self.path.display().to_string(),
                message: format!(
                    "the {} bytes at offset {} of the entry log fail their checksum",
                    at.len, at.offset
                ),
            });
        }
        Ok(bytes)
    }
}
