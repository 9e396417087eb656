//! `node.toml`: the node's one config file, with `CIVEX_*` environment
//! overrides, validated before anything binds.

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::core::{
    catalog::Catalog,
    ids::{check_origin_id, check_slug},
    policy::{noise_settings, parse_parameter, Override, Policy},
    sdc::{DominanceRule, PPercentRule, ParameterId, ProtectionLevel, Settings},
};

/// Smallest `limits.max_message_bytes`: subscription messages carry up to
/// 1 MiB of entries plus framing.
pub const MIN_MESSAGE_BYTES: usize = 2 << 20;

/// The `CIVEX_*` variables that set one field, and the field's name in
/// validation messages.
const ENV_FIELDS: [(&str, &str); 3] = [
    ("CIVEX_ORIGIN", "origin"),
    ("CIVEX_LISTEN", "listen"),
    ("CIVEX_OPERATORS", "tls.operators"),
];

/// A config problem, naming the file and the field.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    /// The config file (or the environment variable).
    pub path: String,
    /// What is wrong.
    pub message: String,
}

/// The node's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's origin id, `[a-z0-9][a-z0-9-]{0,63}` (for example
    /// `br-ibge-3550308`). Env: `CIVEX_ORIGIN`.
    pub origin: String,
    /// Display name of the city, any script.
    #[serde(default)]
    pub name: String,
    /// Address the gRPC server listens on. With `tls.mode = "insecure"`
    /// only a loopback address is accepted. Env: `CIVEX_LISTEN`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Store directory, relative to this file. Env: `CIVEX_DATA_DIR`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Ed25519 feed key file (mode 0600), relative to this file.
    /// Env: `CIVEX_KEY_FILE`.
    #[serde(default = "default_key_file")]
    pub key_file: PathBuf,
    /// District names: reference areas are the origin or `<origin>/<district>`.
    #[serde(default)]
    pub districts: Vec<String>,
    /// Disclosure control.
    #[serde(default)]
    pub disclosure: DisclosureConfig,
    /// The indicator catalog.
    #[serde(default)]
    pub catalog: CatalogConfig,
    /// Publishing.
    #[serde(default)]
    pub publish: PublishConfig,
    /// Replication timing.
    #[serde(default)]
    pub replication: ReplicationConfig,
    /// Peers this node subscribes to.
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    /// Pinned feed keys of other origins: origin id = hex Ed25519 public key.
    /// Only these origins are replicated; keys are never learned from peers.
    #[serde(default)]
    pub trusted_origins: BTreeMap<String, String>,
    /// Transport security.
    #[serde(default)]
    pub tls: TlsConfig,
    /// The federation.
    #[serde(default)]
    pub federation: FederationConfig,
    /// Store tuning.
    #[serde(default)]
    pub store: StoreConfig,
    /// Message limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
}

/// Disclosure-control settings. Defaults follow the catalog's `subjects`:
/// persons get the threshold rule and secondary suppression, businesses
/// also the dominance and p% rules, public figures none.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisclosureConfig {
    /// Threshold rule: a cell with fewer contributors is published as
    /// confidential, without value. At least 1; default 3.
    #[serde(default = "default_min_contributors")]
    pub min_contributors: u32,
    /// Dominance rule (n, k): the n largest contributors holding more than
    /// k percent of a magnitude make it confidential. Default 2 and 85.
    #[serde(default = "default_dominance_n")]
    pub dominance_n: u32,
    /// See `dominance_n`.
    #[serde(default = "default_dominance_k")]
    pub dominance_k: f64,
    /// p% rule: the second-largest contributor must not estimate the
    /// largest to within p percent. Default 10.
    #[serde(default = "default_p_percent")]
    pub p_percent: f64,
    /// Protection interval of a small-count cell: this percent of its
    /// value, and at least `protection_minimum`. Defaults 20 and 3.
    #[serde(default = "default_protection_percent")]
    pub protection_percent: f64,
    /// See `protection_percent`.
    #[serde(default = "default_protection_minimum")]
    pub protection_minimum: f64,
    /// Parameters applied but left out of signed entries, as `rule.name`.
    #[serde(default = "default_secret")]
    pub secret: Vec<String>,
    /// Secret key (mode 0600, relative to this file) from which the noise of
    /// each publish is derived, so that a retry draws the same noise.
    /// Created on first start when an indicator has noise.
    #[serde(default = "default_noise_key_file")]
    pub noise_key_file: PathBuf,
    /// Settings per indicator.
    #[serde(default)]
    pub indicator: Vec<IndicatorDisclosure>,
}

/// Disclosure-control settings of one indicator.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndicatorDisclosure {
    /// Indicator code.
    pub code: String,
    /// Catalog edition; needed when several editions have the code.
    pub edition: Option<String>,
    /// Threshold rule for this indicator.
    pub min_contributors: Option<u32>,
    /// Whether the dominance and p% rules apply (magnitudes only).
    pub dominance: Option<bool>,
    /// Whether secondary suppression runs.
    pub secondary: Option<bool>,
    /// Published values are rounded to a multiple of this.
    pub rounding_base: Option<f64>,
    /// Differential-privacy noise: "laplace" or "gaussian" (counts and sums).
    pub noise: Option<String>,
    /// Laplace: epsilon per cell, as a fraction such as "1/2".
    pub epsilon: Option<String>,
    /// Gaussian: sigma squared, as a fraction such as "25".
    pub sigma_squared: Option<String>,
    /// Most one contributor can add to a cell (1 for counts; for sums, the
    /// clamp applied to each contribution before summing).
    pub clamp_bound: Option<u64>,
    /// Privacy budget per period (zero-concentrated rho); required with noise.
    pub budget_rho: Option<f64>,
}

/// The indicator catalog.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogConfig {
    /// The city's own indicators, in the catalog file format (see
    /// `civex catalog validate`), relative to this file.
    pub file: Option<PathBuf>,
}

/// Publishing settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishConfig {
    /// With peers configured, the node publishes only after every peer has
    /// served its own feed's newest entries or proved unreachable, and at
    /// least one served them (so a node restored from an old backup never
    /// forks its own feed). `true` opens publishing also when no peer is
    /// reachable, once each has been tried: only for a node known current.
    /// Env: `CIVEX_ALLOW_PUBLISH_WITHOUT_PEERS`.
    #[serde(default)]
    pub allow_without_peers: bool,
}

/// Replication timing. Every period comes from here.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// First wait before reconnecting to a failed peer, in milliseconds.
    #[serde(default = "default_backoff_initial_ms")]
    pub backoff_initial_ms: u64,
    /// Longest wait between reconnects, in milliseconds.
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// Connect timeout, in milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
}

/// A peer to subscribe to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Name for logs and status.
    pub name: String,
    /// `host:port` of its gRPC server.
    pub address: String,
    /// Origin id its certificate must name (required with mutual TLS):
    /// checked against the certificate, not the address dialled.
    #[serde(default)]
    pub origin: Option<String>,
}

/// The federation.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationConfig {
    /// The origin whose feed is the federation's roster: members' feed keys
    /// are learned from its roster entries (its own key must be pinned in
    /// `trusted_origins`, or be this node's). Unset: keys are only pinned.
    #[serde(default)]
    pub roster_origin: Option<String>,
}

/// How connections are secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Mutual TLS 1.3 with certificates from the federation CA (default).
    Mutual,
    /// Plain gRPC, for local experiments: loopback only, every caller may
    /// do everything.
    Insecure,
}

/// Transport security. Paths are relative to this file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// `mutual` (default) or `insecure`. Env: `CIVEX_TLS_MODE`.
    #[serde(default = "default_tls_mode")]
    pub mode: TlsMode,
    /// The federation CA certificate.
    #[serde(default = "default_ca_file")]
    pub ca_file: PathBuf,
    /// This node's certificate, naming `civex:origin:<origin>`.
    #[serde(default = "default_cert_file")]
    pub cert_file: PathBuf,
    /// Its private key (mode 0600).
    #[serde(default = "default_tls_key_file")]
    pub key_file: PathBuf,
    /// The CA's revocation list, if the federation publishes one.
    #[serde(default)]
    pub crl_file: Option<PathBuf>,
    /// How often the files above are re-read, in ms: a new revocation list
    /// takes effect, on live connections too, within this period.
    #[serde(default = "default_reload_ms")]
    pub reload_ms: u64,
    /// How long a TLS handshake may take, in ms.
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// Operators (the names in their `civex:operator:<name>` certificates)
    /// who may publish, query and administer this node. A certificate from
    /// the federation CA alone is not enough: an operator of another city
    /// is refused here.
    #[serde(default)]
    pub operators: Vec<String>,
}

/// Store tuning.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// sled page cache, in MiB.
    #[serde(default = "default_cache_mb")]
    pub cache_mb: u64,
}

/// Message and stream limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest gRPC message accepted or sent, in bytes (at least 2 MiB, so
    /// every subscription message of up to 1 MiB of entries fits).
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Open subscriptions per remote address at most.
    #[serde(default = "default_max_streams_per_peer")]
    pub max_streams_per_peer: usize,
    /// At shutdown, how long open streams get to finish (a subscriber that
    /// stopped reading never does) before connections are closed, in ms.
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// Bytes of requests all `PublishIndicatorsStream`s together may hold
    /// before they are durable (a request larger than this waits until it
    /// is alone in the node).
    #[serde(default = "default_publish_stream_bytes")]
    pub publish_stream_bytes: u32,
}

/// Log output.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `human` or `json`. Env: `CIVEX_LOG_FORMAT`.
    #[serde(default = "default_log_format")]
    pub format: String,
    /// `error`, `warn`, `info`, `debug` or `trace`. Env: `CIVEX_LOG_LEVEL`.
    #[serde(default = "default_log_level")]
    pub level: String,
}

fn default_listen() -> String {
    "127.0.0.1:7400".into()
}
fn default_data_dir() -> PathBuf {
    "data".into()
}
fn default_key_file() -> PathBuf {
    "feed.key".into()
}
fn default_min_contributors() -> u32 {
    crate::core::ingest::DEFAULT_MIN_CONTRIBUTORS
}
fn default_dominance_n() -> u32 {
    2
}
fn default_dominance_k() -> f64 {
    85.0
}
fn default_p_percent() -> f64 {
    10.0
}
fn default_protection_percent() -> f64 {
    20.0
}
fn default_protection_minimum() -> f64 {
    3.0
}
fn default_secret() -> Vec<String> {
    [
        "dominance.k",
        "p-percent.p",
        "threshold-protection.relative-percent",
        "threshold-protection.minimum",
    ]
    .map(str::to_owned)
    .to_vec()
}
fn default_noise_key_file() -> PathBuf {
    "noise.key".into()
}
fn default_backoff_initial_ms() -> u64 {
    200
}
fn default_backoff_max_ms() -> u64 {
    30_000
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_tls_mode() -> TlsMode {
    TlsMode::Mutual
}
fn default_ca_file() -> PathBuf {
    "tls/ca.pem".into()
}
fn default_cert_file() -> PathBuf {
    "tls/cert.pem".into()
}
fn default_tls_key_file() -> PathBuf {
    "tls/key.pem".into()
}
fn default_reload_ms() -> u64 {
    10_000
}
fn default_handshake_timeout_ms() -> u64 {
    5_000
}
fn default_cache_mb() -> u64 {
    64
}
fn default_max_message_bytes() -> usize {
    4 << 20
}
fn default_max_streams_per_peer() -> usize {
    64
}
fn default_shutdown_grace_ms() -> u64 {
    5_000
}
fn default_publish_stream_bytes() -> u32 {
    64 << 20
}
fn default_log_format() -> String {
    "human".into()
}
fn default_log_level() -> String {
    "info".into()
}

impl Default for DisclosureConfig {
    fn default() -> Self {
        Self {
            min_contributors: default_min_contributors(),
            dominance_n: default_dominance_n(),
            dominance_k: default_dominance_k(),
            p_percent: default_p_percent(),
            protection_percent: default_protection_percent(),
            protection_minimum: default_protection_minimum(),
            secret: default_secret(),
            noise_key_file: default_noise_key_file(),
            indicator: Vec::new(),
        }
    }
}
impl Default for ReplicationConfig {
    fn default() -> Self {
        Self {
            backoff_initial_ms: default_backoff_initial_ms(),
            backoff_max_ms: default_backoff_max_ms(),
            connect_timeout_ms: default_connect_timeout_ms(),
        }
    }
}
impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            mode: default_tls_mode(),
            ca_file: default_ca_file(),
            cert_file: default_cert_file(),
            key_file: default_tls_key_file(),
            crl_file: None,
            reload_ms: default_reload_ms(),
            handshake_timeout_ms: default_handshake_timeout_ms(),
            operators: Vec::new(),
        }
    }
}
impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            cache_mb: default_cache_mb(),
        }
    }
}
impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: default_max_message_bytes(),
            max_streams_per_peer: default_max_streams_per_peer(),
            shutdown_grace_ms: default_shutdown_grace_ms(),
            publish_stream_bytes: default_publish_stream_bytes(),
        }
    }
}
impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: default_log_format(),
            level: default_log_level(),
        }
    }
}

/// Environment variables of the `civex` CLI (its flags' defaults) and of
/// the benchmark script: not node settings, and never refused as unknown
/// ones when a `node.toml` is loaded from a shell that sets them.
pub const CLIENT_VARIABLES: &[&str] = &[
    "CIVEX_NODE",
    "CIVEX_IDENTITY",
    "CIVEX_INSECURE",
    "CIVEX_EXPECT_ORIGIN",
    "CIVEX_CA_DIR",
    "CIVEX_BIN",
];

impl Config {
    /// Reads `path`, applies `CIVEX_*` overrides from `env`, resolves
    /// relative paths against the file's directory, and validates.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let error = |message: String| ConfigError {
            path: path.display().to_string(),
            message,
        };
        let text =
            std::fs::read_to_string(path).map_err(|err| error(format!("cannot read: {err}")))?;
        let mut config = Self::parse(&text).map_err(error)?;
        let mut overridden = Vec::new();
        for (name, value) in env {
            config
                .apply_env(&name, &value)
                .map_err(|message| ConfigError {
                    path: format!("environment variable {name}"),
                    message,
                })?;
            overridden.push(name);
        }
        let base = path.parent().unwrap_or(Path::new("."));
        config.data_dir = base.join(&config.data_dir);
        config.key_file = base.join(&config.key_file);
        config.disclosure.noise_key_file = base.join(&config.disclosure.noise_key_file);
        if let Some(file) = &mut config.catalog.file {
            *file = base.join(&*file);
        }
        let tls = &mut config.tls;
        for file in [&mut tls.ca_file, &mut tls.cert_file, &mut tls.key_file] {
            *file = base.join(&*file);
        }
        if let Some(crl) = &mut tls.crl_file {
            *crl = base.join(&*crl);
        }
        config.validate().map_err(|message| {
            // A value an environment variable set is named as its.
            let from_env = overridden.iter().find(|name| {
                ENV_FIELDS
                    .iter()
                    .any(|(var, field)| var == name && message.starts_with(&format!("{field}:")))
            });
            match from_env {
                Some(name) => ConfigError {
                    path: format!("environment variable {name} (over {})", path.display()),
                    message,
                },
                None => error(message),
            }
        })?;
        Ok(config)
    }

    /// Parses TOML text (no overrides, no validation).
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|err| err.to_string().trim_end().to_owned())
    }

    /// Applies one `CIVEX_*` environment variable. Any other `CIVEX_*` name
    /// is refused (a typo must not pass unnoticed), except the
    /// [`CLIENT_VARIABLES`] of the `civex` CLI, which set in the same shell
    /// must not stop the node (or `civex verify --config`) from loading.
    fn apply_env(&mut self, name: &str, value: &str) -> Result<(), String> {
        let flag = |value: &str| match value {
            "1" | "true" => Ok(true),
            "0" | "false" => Ok(false),
            other => Err(format!("expected true or false, found {other:?}")),
        };
        match name {
            "CIVEX_ORIGIN" => self.origin = value.into(),
            "CIVEX_LISTEN" => self.listen = value.into(),
            "CIVEX_DATA_DIR" => self.data_dir = value.into(),
            "CIVEX_KEY_FILE" => self.key_file = value.into(),
            "CIVEX_LOG_FORMAT" => self.log.format = value.into(),
            "CIVEX_LOG_LEVEL" => self.log.level = value.into(),
            "CIVEX_OPERATORS" => {
                self.tls.operators = value
                    .split(',')
                    .map(str::trim)
                    .filter(|o| !o.is_empty())
                    .map(str::to_owned)
                    .collect();
            }
            "CIVEX_TLS_MODE" => {
                self.tls.mode = match value {
                    "mutual" => TlsMode::Mutual,
                    "insecure" => TlsMode::Insecure,
                    other => return Err(format!("expected mutual or insecure, found {other:?}")),
                }
            }
            "CIVEX_ALLOW_PUBLISH_WITHOUT_PEERS" => self.publish.allow_without_peers = flag(value)?,
            other if CLIENT_VARIABLES.contains(&other) => {}
            other if other.starts_with("CIVEX_") => {
                return Err("unknown setting (known: CIVEX_ORIGIN, CIVEX_LISTEN, CIVEX_DATA_DIR, CIVEX_KEY_FILE, \
                     CIVEX_LOG_FORMAT, CIVEX_LOG_LEVEL, CIVEX_TLS_MODE, CIVEX_OPERATORS, CIVEX_ALLOW_PUBLISH_WITHOUT_PEERS)".to_string())
            }
            _ => {}
        }
        Ok(())
    }

    /// The catalog (built-in editions and the city's file) and the
    /// disclosure policy checked against it.
    pub fn indicator_rules(&self) -> Result<(Catalog, Policy), String> {
        let catalog = match &self.catalog.file {
            None => Catalog::builtin(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|err| {
                    format!("catalog.file: cannot read {}: {err}", path.display())
                })?;
                Catalog::with_city_file(&text, &path.display().to_string())
                    .map_err(|err| format!("catalog.file: {err}"))?
            }
        };
        let d = &self.disclosure;
        let secret = d
            .secret
            .iter()
            .map(|name| parse_parameter(name).map_err(|m| format!("disclosure.secret: {m}")))
            .collect::<Result<Vec<_>, _>>()?;
        if secret.contains(&ParameterId::RoundingBase) {
            return Err("disclosure.secret: rounding.base cannot be secret: a revision of a table is audited with what earlier versions published, rounding included".into());
        }
        let mut overrides = Vec::with_capacity(d.indicator.len());
        for (index, o) in d.indicator.iter().enumerate() {
            let at = format!("disclosure.indicator[{index}] ({})", o.code);
            let noise = match (o.noise.as_deref(), &o.epsilon, &o.sigma_squared) {
                (None, None, None) => None,
                (Some("laplace"), Some(epsilon), None) => Some(("laplace", epsilon)),
                (Some("gaussian"), None, Some(sigma)) => Some(("gaussian", sigma)),
                _ => {
                    return Err(format!(
                        "{at}: noise = \"laplace\" takes epsilon, noise = \"gaussian\" takes sigma_squared"
                    ))
                }
            };
            let noise = noise
                .map(|(mechanism, parameter)| {
                    noise_settings(mechanism, parameter, o.clamp_bound.unwrap_or(1))
                        .map_err(|m| format!("{at}: {m}"))
                })
                .transpose()?;
            overrides.push(Override {
                code: o.code.clone(),
                edition: o.edition.clone(),
                min_contributors: o.min_contributors.map(u64::from),
                dominance: o.dominance,
                secondary: o.secondary,
                rounding_base: o.rounding_base,
                noise,
                budget_rho: o.budget_rho,
                clamp_given: o.clamp_bound.is_some(),
            });
        }
        let mut policy = Policy {
            min_contributors: u64::from(d.min_contributors),
            dominance: DominanceRule {
                n: d.dominance_n as usize,
                k: d.dominance_k,
            },
            p_percent: PPercentRule { p: d.p_percent },
            protection: ProtectionLevel {
                relative_percent: d.protection_percent,
                minimum: d.protection_minimum,
            },
            secret,
            overrides,
        };
        let defaults = Settings {
            dominance: Some(policy.dominance),
            p_percent: Some(policy.p_percent),
            threshold_protection: policy.protection,
            ..Settings::default()
        };
        defaults
            .validate()
            .map_err(|e| format!("disclosure: {e}"))?;
        policy.check(&catalog)?;
        Ok((catalog, policy))
    }

    /// Checks every field; the message names the field and the value.
    pub fn validate(&self) -> Result<(), String> {
        check_origin_id(&self.origin).map_err(|m| format!("origin: {m}"))?;
        let listen: SocketAddr = self
            .listen
            .parse()
            .map_err(|_| format!("listen: {:?} is not an IP address with a port", self.listen))?;
        let insecure = self.tls.mode == TlsMode::Insecure;
        if insecure && !listen.ip().is_loopback() {
            return Err(format!(
                "listen: {listen} is not a loopback address; with tls.mode = \"insecure\" plain \
                 gRPC is served only on loopback (use mutual TLS to serve other hosts)"
            ));
        }
        if self.tls.reload_ms == 0 || self.tls.handshake_timeout_ms == 0 {
            return Err("tls: reload_ms and handshake_timeout_ms must be above 0".into());
        }
        for name in &self.tls.operators {
            check_slug(name).map_err(|m| format!("tls.operators: {name:?} {m}"))?;
        }
        let mut districts = HashSet::new();
        for district in &self.districts {
            check_slug(district).map_err(|m| format!("districts: {district:?} {m}"))?;
            if !districts.insert(district) {
                return Err(format!("districts: {district:?} appears twice"));
            }
        }
        if self.disclosure.min_contributors == 0 {
            return Err("disclosure.min_contributors: must be at least 1".into());
        }
        self.indicator_rules()?;
        let r = &self.replication;
        if r.backoff_initial_ms == 0 || r.backoff_initial_ms > r.backoff_max_ms {
            return Err(format!(
                "replication: backoff_initial_ms ({}) must be above 0 and at most backoff_max_ms ({})",
                r.backoff_initial_ms, r.backoff_max_ms
            ));
        }
        if r.connect_timeout_ms == 0 {
            return Err("replication.connect_timeout_ms: must be above 0".into());
        }
        let mut names = HashSet::new();
        for peer in &self.peers {
            if peer.name.is_empty() || !names.insert(&peer.name) {
                return Err(format!(
                    "peers: name {:?} is empty or appears twice",
                    peer.name
                ));
            }
            check_peer_link(&peer.address, peer.origin.as_deref(), insecure)
                .map_err(|m| format!("peers.{}.{m}", peer.name))?;
            // Its own feed "from a peer" would open publishing after a
            // restore without any peer's copy (spec rule 10).
            if peer.origin.as_deref() == Some(self.origin.as_str()) {
                return Err(format!(
                    "peers.{}.origin: {} is this node's own origin: a node does not replicate \
                     from itself",
                    peer.name, self.origin
                ));
            }
        }
        for (origin, key) in &self.trusted_origins {
            check_origin_id(origin).map_err(|m| format!("trusted_origins: {m}"))?;
            if origin == &self.origin {
                return Err(format!(
                    "trusted_origins: {origin:?} is this node's own origin; its key is the key file"
                ));
            }
            crate::keys::parse_public_key(key)
                .map_err(|m| format!("trusted_origins.{origin}: {m}"))?;
        }
        if let Some(roster) = &self.federation.roster_origin {
            check_origin_id(roster).map_err(|m| format!("federation.roster_origin: {m}"))?;
            if roster != &self.origin && !self.trusted_origins.contains_key(roster) {
                return Err(format!(
                    "federation.roster_origin: {roster:?} has no pinned key in trusted_origins; \
                     the roster is trusted only through its pinned key"
                ));
            }
        }
        if self.limits.max_message_bytes < MIN_MESSAGE_BYTES {
            return Err(format!(
                "limits.max_message_bytes: {} is below the {MIN_MESSAGE_BYTES}-byte minimum",
                self.limits.max_message_bytes
            ));
        }
        if self.limits.max_streams_per_peer == 0 {
            return Err("limits.max_streams_per_peer: must be at least 1".into());
        }
        if self.limits.publish_stream_bytes == 0 {
            return Err("limits.publish_stream_bytes: must be at least 1".into());
        }
        if !["human", "json"].contains(&self.log.format.as_str()) {
            return Err(format!(
                "log.format: {:?} is not human or json",
                self.log.format
            ));
        }
        if self.log.level.parse::<tracing::Level>().is_err() {
            return Err(format!(
                "log.level: {:?} is not error, warn, info, debug or trace",
                self.log.level
            ));
        }
        Ok(())
    }

    /// Pinned keys, parsed (call after [`Config::validate`]).
    pub fn pinned_keys(&self) -> Result<BTreeMap<String, ed25519_dalek::VerifyingKey>, String> {
        self.trusted_origins
            .iter()
            .map(|(origin, key)| {
                crate::keys::parse_public_key(key)
                    .map(|key| (origin.clone(), key))
                    .map_err(|m| format!("trusted_origins.{origin}: {m}"))
            })
            .collect()
    }
}

/// Checks how a peer is reached, as `node.toml` and `civex peer add` both
/// need it: its `host:port`, the origin its certificate must name (required
/// with mutual TLS), and loopback only in insecure mode. The message starts
/// with the field at fault (`address:` or `origin:`).
pub fn check_peer_link(address: &str, origin: Option<&str>, insecure: bool) -> Result<(), String> {
    crate::transport::check_address(address).map_err(|m| format!("address: {m}"))?;
    match origin {
        Some(origin) => check_origin_id(origin).map_err(|m| format!("origin: {m}"))?,
        None if !insecure => {
            return Err(
                "origin: required with mutual TLS: the origin id the peer's \
                        certificate must name"
                    .into(),
            )
        }
        None => {}
    }
    if insecure && !is_loopback_address(address) {
        return Err(format!(
            "address: {address:?} is not a loopback address; with tls.mode = \"insecure\" \
             peers are dialled only on loopback"
        ));
    }
    Ok(())
}

/// Whether `host:port` names this machine: a loopback IP or `localhost`.
fn is_loopback_address(address: &str) -> bool {
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A documented `node.toml` for a new node.
pub fn template(origin: &str, name: &str, listen: &str) -> String {
    template_with_operators(origin, name, listen, &[])
}

/// [`template`] with `tls.operators` set.
pub fn template_with_operators(
    origin: &str,
    name: &str,
    listen: &str,
    operators: &[String],
) -> String {
    let operators = operators
        .iter()
        .map(|o| format!("{o:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"# civex node configuration. Every setting has a safe default; see
# deploy/node.toml in the civex repository for the full list.

# This node's origin id: [a-z0-9][a-z0-9-]{{0,63}}, e.g. an official code
# such as br-ibge-3550308. Env: CIVEX_ORIGIN
origin = "{origin}"
# Display name of the city (any script).
name = "{name}"
# gRPC listen address (mutual TLS; see [tls]). Env: CIVEX_LISTEN
listen = "{listen}"
# Store directory and feed key file, relative to this file.
# The key file must be mode 0600. Env: CIVEX_DATA_DIR, CIVEX_KEY_FILE
data_dir = "data"
key_file = "feed.key"
# Districts: reference areas are the origin or "<origin>/<district>".
districts = []

[disclosure]
# Every indicator passes disclosure control before it is signed. Defaults
# follow whose records it is computed from (see `civex catalog show CODE`).
# Threshold rule: cells with fewer contributors are suppressed.
min_contributors = 3
# Dominance (n, k) and p% rules, for businesses' magnitudes.
dominance_n = 2
dominance_k = 85.0
p_percent = 10.0
# Parameters applied but left out of signed entries.
secret = ["dominance.k", "p-percent.p", "threshold-protection.relative-percent", "threshold-protection.minimum"]
# Per indicator: rounding, noise with a privacy budget, other thresholds:
# [[disclosure.indicator]]
# code = "households-without-water"
# rounding_base = 5
# noise = "laplace"
# epsilon = "1/2"
# budget_rho = 1.0

[catalog]
# The city's own indicators (check with `civex catalog validate FILE`),
# beside the editions shipped with civex (`civex catalog list`):
# file = "catalog.toml"

[publish]
# With peers, publishing waits until this node has fetched its own newest
# entries from a peer (restore safety). true skips that when no peer is up.
allow_without_peers = false

[replication]
# A failed peer is retried after backoff_initial_ms, then twice as long each
# time up to backoff_max_ms; the wait starts over after a session that
# stored new entries or stayed up at least as long as the wait before it.
backoff_initial_ms = 200
backoff_max_ms = 30000
connect_timeout_ms = 5000

# Peers to subscribe to; origin is what the peer's certificate must name.
# A peer may also read from this node (a node serves only members it knows:
# peers, origins below, and roster members):
# [[peers]]
# name = "city-b"
# address = "city-b.example.org:7400"
# origin = "city-b"

# Pinned feed keys of the origins to replicate (printed by `civex init`).
# An origin pinned here may also read from this node.
[trusted_origins]
# "city-b" = "<64 hex digits>"

[tls]
# "mutual": TLS 1.3 both ways with certificates from the federation CA.
# "insecure": plain gRPC on loopback only, for local experiments.
# Env: CIVEX_TLS_MODE
mode = "mutual"
# The CA certificate, this node's certificate (naming civex:origin:<origin>)
# and its key (mode 0600), relative to this file. `civex init` writes the
# key and a certificate request (tls/request.csr) for the federation admin.
ca_file = "tls/ca.pem"
cert_file = "tls/cert.pem"
key_file = "tls/key.pem"
# The CA's revocation list, if the federation publishes one:
# crl_file = "tls/ca.crl"
# Files are re-read this often (ms), and live connections whose certificate
# is revoked or has expired are closed.
reload_ms = 10000
handshake_timeout_ms = 5000
# Operators who may publish, query and administer this node: the names of
# their civex:operator:<name> certificates. Env: CIVEX_OPERATORS (comma-separated)
operators = [{operators}]

[federation]
# The origin whose feed is the federation's roster: members' feed keys are
# learned from its signed roster entries (pin its key in trusted_origins).
# roster_origin = "consortium-id"

[store]
cache_mb = 64

[limits]
max_message_bytes = 4194304
max_streams_per_peer = 64
shutdown_grace_ms = 5000
# Bytes of requests all publish streams together may hold before they are
# durable (bounds the memory publishing scripts can take).
publish_stream_bytes = 67108864

[log]
# human or json. Env: CIVEX_LOG_FORMAT, CIVEX_LOG_LEVEL
format = "human"
level = "info"
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(
            &path,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn the_template_is_valid_and_paths_are_relative_to_the_file() {
        let config = load(&template("city-a", "Cidade A", "127.0.0.1:7400"), &[]).unwrap();
        assert!(config.data_dir.ends_with("data"));
        assert!(config.data_dir.is_absolute());
        assert_eq!(config.disclosure.min_contributors, 3);
    }

    #[test]
    fn the_deploy_example_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/node.toml");
        let config = Config::load(&path, std::iter::empty()).unwrap();
        let (catalog, policy) = config.indicator_rules().unwrap();
        assert!(catalog.find("bus-km", None).is_ok(), "deploy/catalog.toml");
        assert!(policy.overrides[0].noise.is_some());
        assert_eq!(config.peers.len(), 2);
        assert_eq!(config.pinned_keys().unwrap().len(), 2);
    }

    #[test]
    fn the_region_examples_are_valid_and_agree_with_each_other() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/region");
        let load = |name: &str| {
            Config::load(&dir.join(format!("{name}.toml")), std::iter::empty())
                .unwrap_or_else(|e| panic!("deploy/region/{name}.toml: {e}"))
        };
        let hub = load("hub");
        let cities: Vec<Config> = ["sao-carlos", "campinas", "sorocaba"]
            .into_iter()
            .map(load)
            .collect();
        // The hub peers with every city, by the origin each one has.
        let mut peered: Vec<&str> = hub
            .peers
            .iter()
            .map(|p| p.origin.as_deref().unwrap())
            .collect();
        let mut origins: Vec<&str> = cities.iter().map(|c| c.origin.as_str()).collect();
        peered.sort();
        origins.sort();
        assert_eq!(peered, origins, "the hub's peers are not the cities");
        assert_eq!(hub.federation.roster_origin.as_deref(), Some(&*hub.origin));
        for city in &cities {
            // Each city: the hub its only peer, only the hub's key pinned,
            // the hub's roster.
            let peers: Vec<&str> = city
                .peers
                .iter()
                .map(|p| p.origin.as_deref().unwrap())
                .collect();
            assert_eq!(peers, [&*hub.origin], "{}", city.origin);
            let pinned: Vec<String> = city.pinned_keys().unwrap().into_keys().collect();
            assert_eq!(pinned, [hub.origin.as_str()], "{}", city.origin);
            assert_eq!(city.federation.roster_origin, hub.federation.roster_origin);
            assert_eq!(city.tls.mode, TlsMode::Mutual);
        }
    }

    #[test]
    fn environment_overrides_apply_and_are_checked() {
        let text = template("city-a", "A", "127.0.0.1:7400");
        let config = load(
            &text,
            &[
                ("CIVEX_LISTEN", "127.0.0.1:9"),
                ("CIVEX_TLS_MODE", "insecure"),
                ("PATH", "x"),
            ],
        )
        .unwrap();
        assert_eq!(config.listen, "127.0.0.1:9");
        assert_eq!(config.tls.mode, TlsMode::Insecure);
        assert!(config.tls.cert_file.is_absolute());
        // The CLI's own variables, set in the same shell, are no settings.
        let config = load(&text, &[("CIVEX_IDENTITY", "ops"), ("CIVEX_NODE", "x:1")]).unwrap();
        assert_eq!(config.listen, "127.0.0.1:7400");
        let err = load(&text, &[("CIVEX_LISTN", "x")]).unwrap_err();
        assert!(
            err.contains("environment variable CIVEX_LISTN: unknown setting"),
            "{err}"
        );
        // A value the environment set is named as the variable's.
        let err = load(&text, &[("CIVEX_LISTEN", "garbage")]).unwrap_err();
        assert!(
            err.starts_with("environment variable CIVEX_LISTEN (over ")
                && err.contains("node.toml): listen: \"garbage\" is not an IP address"),
            "{err}"
        );
    }

    #[test]
    fn bad_configs_name_the_field() {
        let base = template("city-a", "A", "127.0.0.1:7400");
        let cases = [
            (
                base.replace("origin = \"city-a\"", "origin = \"City A\""),
                "origin: origin id",
            ),
            (
                format!(
                    "{base}\n[[peers]]\nname = \"me\"\naddress = \"127.0.0.1:7400\"\norigin = \"city-a\"\n"
                ),
                "peers.me.origin: city-a is this node's own origin",
            ),
            (
                base.replace("127.0.0.1:7400", "0.0.0.0:7400")
                    .replace("mode = \"mutual\"", "mode = \"insecure\""),
                "listen: 0.0.0.0:7400 is not a loopback",
            ),
            (
                base.replace("mode = \"mutual\"", "mode = \"plain\""),
                "unknown variant `plain`",
            ),
            (
                base.replace(
                    "# [[peers]]\n# name = \"city-b\"\n# address = \"city-b.example.org:7400\"",
                    "[[peers]]\nname = \"b\"\naddress = \"city-b.example.org:7400\"",
                ),
                "peers.b.origin: required with mutual TLS",
            ),
            (
                base.replace(
                    "# [[peers]]\n# name = \"city-b\"\n# address = \"city-b.example.org:7400\"",
                    "[[peers]]\nname = \"b\"\naddress = \"city-b.example.org:7400\"",
                )
                .replace("mode = \"mutual\"", "mode = \"insecure\""),
                "peers.b.address: \"city-b.example.org:7400\" is not a loopback address",
            ),
            (
                base.replace("publish_stream_bytes = 67108864", "publish_stream_bytes = 0"),
                "limits.publish_stream_bytes: must be at least 1",
            ),
            (
                base.replace("min_contributors = 3", "min_contributors = 0"),
                "disclosure.min_contributors",
            ),
            (
                base.replace("format = \"human\"", "format = \"xml\""),
                "log.format",
            ),
            (
                format!("{base}\n[[disclosure.indicator]]\ncode = \"nope\"\n"),
                "disclosure.indicator[0] (nope): unknown indicator \"nope\"",
            ),
            (
                format!("{base}\n[[disclosure.indicator]]\ncode = \"5.1\"\nedition = \"iso37120:2014\"\nnoise = \"laplace\"\nepsilon = \"1/2\"\nbudget_rho = 1.0\n"),
                "disclosure.indicator[0] (5.1): noise applies to counts and sums only",
            ),
            (
                format!("{base}\n[[disclosure.indicator]]\ncode = \"5.1\"\nnoise = \"laplace\"\n"),
                "noise = \"laplace\" takes epsilon",
            ),
            (
                base.replace("secret = [\"dominance.k\"", "secret = [\"dominance.q\""),
                "disclosure.secret: unknown parameter \"dominance.q\"",
            ),
            (
                base.replace("# file = \"catalog.toml\"", "file = \"missing.toml\""),
                "catalog.file: cannot read",
            ),
            (
                base.replace("secret = [\"dominance.k\"", "secret = [\"rounding.base\", \"dominance.k\""),
                "disclosure.secret: rounding.base cannot be secret",
            ),
            (
                base.replace("[store]", "[store]\ncolour = 1"),
                "unknown field `colour`",
            ),
            (
                base.replace("# \"city-b\" = \"<64 hex digits>\"", "\"city-b\" = \"abc\""),
                "trusted_origins.city-b: feed key",
            ),
            (
                base.replace(
                    "# [[peers]]\n# name = \"city-b\"\n# address = \"city-b.example.org:7400\"",
                    "[[peers]]\nname = \"b\"\naddress = \"nowhere\"",
                ),
                "peers.b.address",
            ),
        ];
        for (text, expected) in cases {
            let err = load(&text, &[]).unwrap_err();
            assert!(err.contains(expected), "{err:?} lacks {expected:?}");
        }
    }
}
