//! Peers managed at runtime: the peers of `node.toml` plus the changes made
//! with `civex peer add|remove`, kept in `<data_dir>/peers.json`; every
//! change is appended to `<data_dir>/audit.jsonl` (who, when, what). Both
//! files are written whole or appended, then fsynced, before a change is
//! acknowledged.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};

use crate::{
    config::PeerConfig,
    core::ids::{check_origin_id, check_slug, quote},
};

/// One peer: a node this node subscribes to, and what it may do here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerPolicy {
    /// Name, for logs, status and `civex peer remove`.
    pub name: String,
    /// `host:port` dialled.
    pub address: String,
    /// Origin its certificate must name.
    pub origin: Option<String>,
    /// Origins it may read from this node; empty means every origin.
    #[serde(default)]
    pub may_read: Vec<String>,
    /// Whether this node takes other origins' feeds relayed through it;
    /// if not, only the peer's own origin (and this node's own feed, for
    /// restore safety) is taken from it.
    #[serde(default = "yes")]
    pub relay: bool,
    /// Where the peer comes from: `config` or `runtime`.
    #[serde(default)]
    pub source: String,
}

fn yes() -> bool {
    true
}

impl PeerPolicy {
    /// A peer of `node.toml`: reads everything, relays.
    pub fn from_config(config: &PeerConfig) -> Self {
        Self {
            name: config.name.clone(),
            address: config.address.clone(),
            origin: config.origin.clone(),
            may_read: Vec::new(),
            relay: true,
            source: "config".into(),
        }
    }

    /// Checks every field as `node.toml`'s peers are checked (`insecure`:
    /// `tls.mode = "insecure"`); the message names the field.
    pub fn check(&self, insecure: bool) -> Result<(), String> {
        check_slug(&self.name).map_err(|m| format!("name: {} {m}", quote(&self.name)))?;
        crate::config::check_peer_link(&self.address, self.origin.as_deref(), insecure)?;
        if self.may_read.len() > MAX_MAY_READ {
            return Err(format!(
                "may_read: {} origins, more than {MAX_MAY_READ}",
                self.may_read.len()
            ));
        }
        for origin in &self.may_read {
            check_origin_id(origin).map_err(|m| format!("may_read: {m}"))?;
        }
        Ok(())
    }

    /// What this peer may read, for people: `peer city-b may read: city-a,
    /// and its own origin`.
    pub fn read_policy(&self) -> String {
        match &self.origin {
            Some(own) if !self.may_read.contains(own) => format!(
                "peer {} may read: {}, and its own origin {own}",
                self.name,
                self.may_read.join(", ")
            ),
            _ => format!("peer {} may read: {}", self.name, self.may_read.join(", ")),
        }
    }

    /// Whether this peer may read `origin` from this node: an origin its
    /// policy names (every origin when it names none), and always its own
    /// feed, which it needs back to publish safely after a restore (spec
    /// rule 10) and which tells it nothing it does not hold.
    pub fn may_read(&self, origin: &str) -> bool {
        self.may_read.is_empty()
            || self.origin.as_deref() == Some(origin)
            || self.may_read.iter().any(|o| o == origin)
    }
}

/// One audited change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When, microseconds since the Unix epoch.
    pub time_unix_micros: i64,
    /// Who: the operator's certificate identity (or "local" in insecure mode).
    pub who: String,
    /// What: `peer add`, `peer remove`.
    pub action: String,
    /// The change, as JSON.
    pub detail: String,
}

/// What `peers.json` holds: changes on top of `node.toml`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Changes {
    /// Peers added or replaced at runtime.
    added: Vec<PeerPolicy>,
    /// Names of config peers removed at runtime.
    removed: Vec<String>,
}

/// A peer-registry problem, naming the file.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{path}: {message}")]
pub struct PeersError {
    /// The file.
    pub path: String,
    /// What went wrong.
    pub message: String,
    /// A change refused by a rule (two peers of one origin, too many
    /// peers), not a file that failed: retrying will not help.
    pub refused: bool,
}

/// Most origins a peer's read policy names (the origins one subscription
/// takes).
pub const MAX_MAY_READ: usize = crate::service::MAX_CURSORS;

/// Most bytes the peers take as JSON, so `ListPeers` answers them in one
/// message, far under the smallest message limit (2 MiB).
pub const MAX_PEERS_BYTES: usize = 1 << 20;

/// Why `peers` are refused if they take more than [`MAX_PEERS_BYTES`];
/// `remedy` says how to remove some.
fn oversize(peers: &[PeerPolicy], remedy: &str) -> Option<String> {
    let bytes = serde_json::to_vec(peers).map_or(usize::MAX, |json| json.len());
    (bytes > MAX_PEERS_BYTES).then(|| {
        format!(
            "the {} peers would take {bytes} bytes, more than {MAX_PEERS_BYTES} (ListPeers \
             answers them in one message): {remedy}, or shorten their read policies",
            peers.len()
        )
    })
}

/// Why `peers` are refused if two of them have one origin.
fn repeated_origin(peers: &[PeerPolicy]) -> Option<String> {
    let mut by_origin: BTreeMap<&str, &str> = BTreeMap::new();
    for peer in peers {
        let Some(origin) = peer.origin.as_deref() else {
            continue;
        };
        if let Some(first) = by_origin.insert(origin, &peer.name) {
            return Some(format!(
                "origin: {} is the origin of peers {first} and {}: a peer's read policy is \
                 found by its origin, so each origin may have one peer; remove one \
                 (civex peer remove NAME)",
                quote(origin),
                peer.name
            ));
        }
    }
    None
}

/// The peers, persisted and audited.
pub struct PeerRegistry {
    path: PathBuf,
    audit_path: PathBuf,
    config: Vec<PeerPolicy>,
    changes: Mutex<Changes>,
    /// Bumped after every change, so open subscriptions re-check who may
    /// read what.
    version: tokio::sync::watch::Sender<u64>,
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

impl PeerRegistry {
    /// Loads the runtime changes in `data_dir` on top of the config's peers,
    /// checking each added peer as `civex peer add` did, against the
    /// transport mode now (`insecure`: plain gRPC, loopback only), since
    /// the mode may have changed since it was added.
    pub fn open(
        data_dir: &Path,
        config: &[PeerConfig],
        insecure: bool,
    ) -> Result<Self, PeersError> {
        let path = data_dir.join("peers.json");
        let error = |message: String| PeersError {
            path: path.display().to_string(),
            message,
            refused: false,
        };
        let changes = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|err| error(format!("does not parse: {err}")))?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Changes::default(),
            Err(err) => return Err(error(format!("cannot read: {err}"))),
        };
        for peer in &changes.added {
            peer.check(insecure).map_err(|m| {
                // Plain gRPC refuses peers mutual TLS allows.
                let mode = match peer.check(false) {
                    Ok(()) => ", or set tls.mode back to \"mutual\"",
                    Err(_) => "",
                };
                error(format!(
                    "peer {:?} (added with civex peer add): {m}; fix or remove it in this \
                     file with the node stopped{mode}",
                    peer.name
                ))
            })?;
        }
        let registry = Self {
            audit_path: data_dir.join("audit.jsonl"),
            path: path.clone(),
            config: config.iter().map(PeerPolicy::from_config).collect(),
            changes: Mutex::new(changes),
            version: tokio::sync::watch::channel(0).0,
        };
        // node.toml may since have gained a peer whose origin one added at
        // runtime has, or peers enough to outgrow `ListPeers`.
        let peers = registry.list();
        let remedy = "remove peers (from this file or node.toml, with the node stopped)";
        if let Some(message) = repeated_origin(&peers).or_else(|| oversize(&peers, remedy)) {
            return Err(registry.error(
                &registry.path,
                format!("with node.toml's [[peers]]: {message}"),
            ));
        }
        Ok(registry)
    }

    fn error(&self, path: &Path, message: String) -> PeersError {
        PeersError {
            path: path.display().to_string(),
            message,
            refused: false,
        }
    }

    /// Every peer now: the config's (minus removed ones, unless replaced)
    /// and the runtime ones, by name.
    pub fn list(&self) -> Vec<PeerPolicy> {
        let changes = self
            .changes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.peers_with(&changes)
    }

    /// The peers with `changes` applied to the config's.
    fn peers_with(&self, changes: &Changes) -> Vec<PeerPolicy> {
        let mut peers: BTreeMap<String, PeerPolicy> = self
            .config
            .iter()
            .filter(|p| !changes.removed.contains(&p.name))
            .map(|p| (p.name.clone(), p.clone()))
            .collect();
        for peer in &changes.added {
            peers.insert(peer.name.clone(), peer.clone());
        }
        peers.into_values().collect()
    }

    /// The policy of the peer whose certificate names `origin`, if any.
    pub fn policy_for(&self, origin: &str) -> Option<PeerPolicy> {
        self.list()
            .into_iter()
            .find(|p| p.origin.as_deref() == Some(origin))
    }

    /// Adds (or replaces, by name) a peer; persisted and audited before it
    /// returns. Returns the peer as stored.
    pub fn add(
        &self,
        who: &str,
        mut peer: PeerPolicy,
        insecure: bool,
    ) -> Result<PeerPolicy, PeersError> {
        peer.source = "runtime".into();
        peer.check(insecure)
            .map_err(|m| self.error(&self.path, m))?;
        self.change(who, "peer add", &peer, |changes| {
            changes.added.retain(|p| p.name != peer.name);
            changes.added.push(peer.clone());
        })?;
        Ok(peer)
    }

    /// Removes a peer by name; `false` if there was none.
    pub fn remove(&self, who: &str, name: &str) -> Result<bool, PeersError> {
        if !self.list().iter().any(|p| p.name == name) {
            return Ok(false);
        }
        let in_config = self.config.iter().any(|p| p.name == name);
        let detail = serde_json::json!({ "name": name });
        self.change(who, "peer remove", &detail, |changes| {
            changes.added.retain(|p| p.name != name);
            if in_config && !changes.removed.iter().any(|n| n == name) {
                changes.removed.push(name.to_owned());
            }
        })?;
        Ok(true)
    }

    /// Applies `edit` to a copy of the changes, persists it, then makes it
    /// current and audits it: a failed write changes nothing.
    fn change(
        &self,
        who: &str,
        action: &str,
        detail: &impl Serialize,
        edit: impl FnOnce(&mut Changes),
    ) -> Result<(), PeersError> {
        let mut changes = self
            .changes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut next = changes.clone();
        edit(&mut next);
        // One peer per origin: a second name would lift the first's read
        // policy (policies are found by origin). Checked under the lock, so
        // two concurrent adds cannot both pass. And they all fit one
        // `ListPeers` answer.
        let peers = self.peers_with(&next);
        let remedy = "remove peers (civex peer remove NAME)";
        if let Some(message) = repeated_origin(&peers).or_else(|| oversize(&peers, remedy)) {
            return Err(PeersError {
                refused: true,
                ..self.error(&self.path, message)
            });
        }
        // Audited before it takes effect: no change without its record.
        self.audit(who, action, detail)?;
        self.persist(&next)?;
        *changes = next;
        self.version.send_modify(|v| *v += 1);
        Ok(())
    }

    /// Notified after every change.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// The audit log, oldest first.
    pub fn audit_log(&self) -> Result<Vec<AuditRecord>, PeersError> {
        let text = match std::fs::read_to_string(&self.audit_path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(self.error(&self.audit_path, format!("cannot read: {err}"))),
        };
        // A last line without its newline was cut short by a crash: skipped.
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.is_empty())
            .map(|(i, line)| {
                serde_json::from_str(line)
                    .map_err(|err| self.error(&self.audit_path, format!("line {}: {err}", i + 1)))
            })
            .collect()
    }

    /// Writes `peers.json` whole: a temporary file, fsync, rename, fsync of
    /// the directory.
    fn persist(&self, changes: &Changes) -> Result<(), PeersError> {
        let text = serde_json::to_vec_pretty(changes)
            .map_err(|err| self.error(&self.path, err.to_string()))?;
        crate::keys::replace_file(&self.path, &text)
            .map_err(|err| self.error(&self.path, format!("cannot write: {err}")))
    }

    fn audit(&self, who: &str, action: &str, detail: &impl Serialize) -> Result<(), PeersError> {
        let record = AuditRecord {
            time_unix_micros: now_micros(),
            who: who.to_owned(),
            action: action.to_owned(),
            detail: serde_json::to_string(detail)
                .map_err(|err| self.error(&self.audit_path, err.to_string()))?,
        };
        let mut line = serde_json::to_string(&record)
            .map_err(|err| self.error(&self.audit_path, err.to_string()))?;
        line.push('\n');
        let fail =
            |err: std::io::Error| self.error(&self.audit_path, format!("cannot append: {err}"));
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.audit_path)
            .map_err(fail)?;
        file.write_all(line.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(fail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str) -> PeerPolicy {
        PeerPolicy {
            name: name.into(),
            address: "127.0.0.1:7401".into(),
            origin: Some(name.into()),
            may_read: Vec::new(),
            relay: true,
            source: String::new(),
        }
    }

    #[test]
    fn runtime_peers_are_checked_again_against_the_mode_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let registry = PeerRegistry::open(dir.path(), &[], false).unwrap();
        let mut far = peer("city-far");
        far.address = "192.0.2.1:7400".into();
        registry.add("operator ops", far, false).unwrap();
        // Mutual TLS: a peer off loopback is fine.
        assert_eq!(
            PeerRegistry::open(dir.path(), &[], false)
                .unwrap()
                .list()
                .len(),
            1
        );
        // Switched to plain gRPC, the node would dial it in plaintext: refused.
        let err = PeerRegistry::open(dir.path(), &[], true)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("peers.json") && err.contains("city-far") && err.contains("loopback"),
            "{err}"
        );
    }

    #[test]
    fn a_second_peer_of_one_origin_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let registry = PeerRegistry::open(dir.path(), &[], false).unwrap();
        let mut narrow = peer("city-b");
        narrow.may_read = vec!["city-z".into()];
        registry.add("operator ops", narrow, false).unwrap();
        // Under another name, city-b would be found by its first peer or
        // its second: its read policy must not depend on which.
        let mut wide = peer("aaa");
        wide.origin = Some("city-b".into());
        let err = registry
            .add("operator ops", wide, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"city-b\" is the origin of peers aaa and city-b"),
            "{err}"
        );
        assert_eq!(registry.policy_for("city-b").unwrap().may_read, ["city-z"]);
        // Replacing the peer itself, by its name, is no conflict.
        registry.add("operator ops", peer("city-b"), false).unwrap();
        assert!(registry.policy_for("city-b").unwrap().may_read.is_empty());
        // node.toml gaining another peer of that origin stops the start.
        let config = vec![PeerConfig {
            name: "b-by-config".into(),
            address: "127.0.0.1:7402".into(),
            origin: Some("city-b".into()),
        }];
        let err = PeerRegistry::open(dir.path(), &config, false)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("peers.json") && err.contains("peers b-by-config and city-b"),
            "{err}"
        );
    }

    #[test]
    fn changes_persist_over_the_config_and_are_audited() {
        let dir = tempfile::tempdir().unwrap();
        let config = vec![PeerConfig {
            name: "city-b".into(),
            address: "127.0.0.1:7402".into(),
            origin: Some("city-b".into()),
        }];
        let registry = PeerRegistry::open(dir.path(), &config, false).unwrap();
        assert_eq!(registry.list().len(), 1);
        registry.add("operator ops", peer("city-c"), false).unwrap();
        assert!(registry.remove("operator ops", "city-b").unwrap());
        assert!(!registry.remove("operator ops", "nobody").unwrap());
        let mut bad = peer("city-d");
        bad.address = "nowhere".into();
        assert!(registry
            .add("operator ops", bad, false)
            .unwrap_err()
            .to_string()
            .contains("address"));

        let reopened = PeerRegistry::open(dir.path(), &config, false).unwrap();
        let names: Vec<String> = reopened.list().into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["city-c"]);
        assert_eq!(reopened.list()[0].source, "runtime");
        let log = reopened.audit_log().unwrap();
        let actions: Vec<(&str, &str)> = log
            .iter()
            .map(|r| (r.who.as_str(), r.action.as_str()))
            .collect();
        assert_eq!(
            actions,
            [
                ("operator ops", "peer add"),
                ("operator ops", "peer remove")
            ]
        );
        assert!(log[1].detail.contains("city-b"));
    }

    /// Each peer is bounded (address, read policy), and so are all of them
    /// together, so `ListPeers` fits one message; a refused add changes
    /// nothing, on disk or in the audit log.
    #[test]
    fn peers_are_bounded_one_by_one_and_together() {
        let dir = tempfile::tempdir().unwrap();
        let registry = PeerRegistry::open(dir.path(), &[], false).unwrap();
        let mut long = peer("city-long");
        long.address = format!("{}.example:7400", "a".repeat(250));
        let err = long.check(false).unwrap_err();
        assert!(
            err.starts_with("address: 263 bytes, longer than 260"),
            "{err}"
        );
        long.address = "city b.example:7400".into();
        let err = long.check(false).unwrap_err();
        assert!(
            err.starts_with("address: \"city b.example:7400\" holds ' '"),
            "{err}"
        );
        long.address = format!("{}.example:7400", "a".repeat(245));
        long.check(false).unwrap();

        let wide = |name: &str, origins: usize| {
            let mut p = peer(name);
            // Origin ids of 64 bytes, the longest.
            let pad = "x".repeat(64 - name.len() - 7);
            p.may_read = (0..origins)
                .map(|i| format!("{name}-{i:05}-{pad}"))
                .collect();
            p
        };
        let err = wide("city-w", MAX_MAY_READ + 1).check(false).unwrap_err();
        assert!(
            err.starts_with("may_read: 4097 origins, more than 4096"),
            "{err}"
        );
        // Four peers of 4,096 origins each take more than 1 MiB together.
        for name in ["city-w0", "city-w1", "city-w2"] {
            registry
                .add("operator ops", wide(name, MAX_MAY_READ), false)
                .unwrap();
        }
        let before = std::fs::read(dir.path().join("peers.json")).unwrap();
        let err = registry
            .add("operator ops", wide("city-w3", MAX_MAY_READ), false)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("peers.json")
                && err.contains("the 4 peers would take")
                && err.contains("more than 1048576"),
            "{err}"
        );
        assert_eq!(registry.list().len(), 3);
        assert_eq!(
            std::fs::read(dir.path().join("peers.json")).unwrap(),
            before
        );
        assert_eq!(registry.audit_log().unwrap().len(), 3);
        // Too many together in node.toml and peers.json: refused at start.
        let config = vec![PeerConfig {
            name: "city-c".into(),
            address: "127.0.0.1:7402".into(),
            origin: Some("city-c".into()),
        }];
        PeerRegistry::open(dir.path(), &config, false).unwrap();
        let config: Vec<PeerConfig> = (0..2_000)
            .map(|i| PeerConfig {
                name: format!("city-{i}"),
                address: format!("{}.example:7400", "a".repeat(240)),
                origin: Some(format!("city-{i}")),
            })
            .collect();
        let err = PeerRegistry::open(dir.path(), &config, false)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("peers would take"), "{err}");
    }
}
