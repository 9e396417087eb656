//! Test support: real nodes on 127.0.0.1 port 0, a temp dir per node,
//! gRPC clients, a TCP proxy that keeps a restarted node's address, the
//! built binaries, and waiting on conditions with a deadline.

#![allow(dead_code)]

use std::{
    future::Future,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use civex_node::{
    config::{template_with_operators, Config},
    keys::{create_key_file, load_key_file, public_key_hex},
    node::NodeError,
    pki::{write_identity_dir, Authority, Identity},
    tls::{Tls, TlsFiles},
    transport::Security,
};
use civex_proto::v1::{
    self as pb, feed_client::FeedClient, publish_client::PublishClient, query_client::QueryClient,
    status_client::StatusClient,
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

/// How long any condition may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Waits until `check` returns true, or panics naming `what`.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + DEADLINE;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Blocking version of [`eventually`] for non-async tests.
pub fn eventually_blocking(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// This test's federation CA (nextest runs each test in its own process).
pub fn ca() -> &'static Authority {
    static CA: std::sync::OnceLock<Authority> = std::sync::OnceLock::new();
    CA.get_or_init(|| Authority::create("civex test federation", 2).unwrap().0)
}

/// Writes an identity issued by the test CA into `dir`, unless one is there.
pub fn issue_identity(dir: &Path, identity: &Identity) {
    if !dir.join("cert.pem").exists() {
        let issued = ca().issue(identity, None, 2).unwrap();
        write_identity_dir(dir, ca().cert_pem(), &issued).unwrap();
    }
}

/// Writes the revocation list of the node in `dir` (re-read within 50 ms),
/// revoking `serials` (hex).
pub fn revoke(dir: &Path, serials: &[String]) {
    static NUMBER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let number = NUMBER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let crl = ca().revocation_list(serials, number, 1).unwrap();
    let path = dir.join("tls/ca.crl");
    let temporary = dir.join("tls/ca.crl.tmp");
    std::fs::write(&temporary, crl).unwrap();
    std::fs::rename(&temporary, &path).unwrap();
}

/// The serial (hex) of the certificate in an identity directory.
pub fn serial_of(identity_dir: &Path) -> String {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let der = CertificateDer::from_pem_file(identity_dir.join("cert.pem")).unwrap();
    civex_node::core::ids::hex(&Identity::of_certificate(&der).unwrap().1)
}

/// An operator of the test federation, as a client holds it.
pub fn operator() -> Security {
    static OPERATOR: std::sync::OnceLock<Security> = std::sync::OnceLock::new();
    OPERATOR
        .get_or_init(|| {
            // Loaded once; the files are not needed after that.
            let dir = tempfile::tempdir().unwrap();
            issue_identity(dir.path(), &Identity::Operator("test".into()));
            Security::Mutual(Tls::load(TlsFiles::in_dir(dir.path()), None).unwrap())
        })
        .clone()
}

/// How long a test client's connect may take: far above a handshake on
/// loopback (milliseconds), since a CI machine can be many times slower
/// than usual for a while (seen: the whole suite at five times its time,
/// and 5 s connects timing out). A deadline, not a wait.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// A channel to the node at `address`, with the identity (certificate and
/// key) in `identity_dir`.
pub async fn connect_as(address: &str, identity_dir: &Path) -> Channel {
    let tls = Tls::load(TlsFiles::in_dir(identity_dir), None).unwrap();
    civex_node::transport::connect(address, &Security::Mutual(tls), None, CONNECT_TIMEOUT)
        .await
        .unwrap()
}

/// A channel to the node at `address`, as the test operator.
pub async fn connect(address: &str) -> Channel {
    civex_node::transport::connect(address, &operator(), None, CONNECT_TIMEOUT)
        .await
        .unwrap()
}

/// What a test node is.
#[derive(Clone, Debug)]
pub struct Spec {
    pub origin: String,
    pub districts: Vec<String>,
    /// (origin, address) of peers; the origin also names the peer.
    pub peers: Vec<(String, String)>,
    /// (origin, hex key) pinned.
    pub trusted: Vec<(String, String)>,
    pub allow_without_peers: bool,
    pub min_contributors: u32,
    /// federation.roster_origin.
    pub roster: Option<String>,
    /// TOML appended to node.toml (e.g. `[[disclosure.indicator]]` tables).
    pub extra: String,
    /// limits.shutdown_grace_ms.
    pub shutdown_grace_ms: u64,
    /// limits.publish_stream_bytes.
    pub publish_stream_bytes: u32,
    /// tls.handshake_timeout_ms.
    pub handshake_timeout_ms: u64,
    /// replication.backoff_max_ms (the initial backoff is 20 ms).
    pub backoff_max_ms: u64,
}

impl Spec {
    pub fn new(origin: &str) -> Self {
        Self {
            origin: origin.into(),
            districts: Vec::new(),
            peers: Vec::new(),
            trusted: Vec::new(),
            allow_without_peers: false,
            min_contributors: 3,
            roster: None,
            extra: String::new(),
            shutdown_grace_ms: 500,
            publish_stream_bytes: 64 << 20,
            handshake_timeout_ms: 5000,
            backoff_max_ms: 300,
        }
    }

    pub fn backoff_max_ms(mut self, ms: u64) -> Self {
        self.backoff_max_ms = ms;
        self
    }

    pub fn handshake_timeout_ms(mut self, ms: u64) -> Self {
        self.handshake_timeout_ms = ms;
        self
    }

    pub fn publish_stream_bytes(mut self, bytes: u32) -> Self {
        self.publish_stream_bytes = bytes;
        self
    }

    pub fn shutdown_grace_ms(mut self, ms: u64) -> Self {
        self.shutdown_grace_ms = ms;
        self
    }

    /// Appends TOML to the node's node.toml.
    pub fn extra(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self
    }

    pub fn roster(mut self, origin: &str) -> Self {
        self.roster = Some(origin.into());
        self
    }

    pub fn peer(mut self, name: &str, address: &str) -> Self {
        self.peers.push((name.into(), address.into()));
        self
    }

    pub fn trust(mut self, origin: &str, key: &str) -> Self {
        self.trusted.push((origin.into(), key.into()));
        self
    }

    pub fn districts(mut self, districts: &[&str]) -> Self {
        self.districts = districts.iter().map(|d| d.to_string()).collect();
        self
    }

    pub fn allow_without_peers(mut self) -> Self {
        self.allow_without_peers = true;
        self
    }
}

/// Creates the node directory (key on first use) and writes its node.toml
/// for `listen`; returns the config path and the public key.
pub fn write_node_dir(dir: &Path, spec: &Spec, listen: &str) -> (PathBuf, String) {
    std::fs::create_dir_all(dir).unwrap();
    let key_path = dir.join("feed.key");
    let key = if key_path.exists() {
        load_key_file(&key_path).unwrap()
    } else {
        create_key_file(&key_path).unwrap()
    };
    issue_identity(&dir.join("tls"), &Identity::Origin(spec.origin.clone()));
    issue_identity(&dir.join("operator"), &Identity::Operator("test".into()));
    if !dir.join("tls/ca.crl").exists() {
        revoke(dir, &[]);
    }
    let mut text = template_with_operators(&spec.origin, &spec.origin, listen, &["test".into()])
        .replace("# crl_file = \"tls/ca.crl\"", "crl_file = \"tls/ca.crl\"")
        .replace("reload_ms = 10000", "reload_ms = 50")
        .replace("backoff_initial_ms = 200", "backoff_initial_ms = 20")
        .replace(
            "backoff_max_ms = 30000",
            &format!("backoff_max_ms = {}", spec.backoff_max_ms),
        )
        .replace("connect_timeout_ms = 5000", "connect_timeout_ms = 2000")
        .replace(
            "handshake_timeout_ms = 5000",
            &format!("handshake_timeout_ms = {}", spec.handshake_timeout_ms),
        )
        .replace(
            "min_contributors = 3",
            &format!("min_contributors = {}", spec.min_contributors),
        )
        .replace("level = \"info\"", "level = \"warn\"")
        .replace(
            "shutdown_grace_ms = 5000",
            &format!("shutdown_grace_ms = {}", spec.shutdown_grace_ms),
        )
        .replace(
            "publish_stream_bytes = 67108864",
            &format!("publish_stream_bytes = {}", spec.publish_stream_bytes),
        );
    let districts: Vec<String> = spec.districts.iter().map(|d| format!("{d:?}")).collect();
    text = text.replace(
        "districts = []",
        &format!("districts = [{}]", districts.join(", ")),
    );
    if spec.allow_without_peers {
        text = text.replace("allow_without_peers = false", "allow_without_peers = true");
    }
    if let Some(roster) = &spec.roster {
        text = text.replace(
            "# roster_origin = \"consortium-id\"",
            &format!("roster_origin = {roster:?}"),
        );
    }
    let trusted: String = spec
        .trusted
        .iter()
        .map(|(o, k)| format!("{o:?} = {k:?}\n"))
        .collect();
    text = text.replace(
        "[trusted_origins]\n",
        &format!("[trusted_origins]\n{trusted}"),
    );
    for (name, address) in &spec.peers {
        text.push_str(&format!(
            "\n[[peers]]\nname = {name:?}\naddress = {address:?}\norigin = {name:?}\n"
        ));
    }
    std::fs::write(dir.join("catalog.toml"), test_catalog()).unwrap();
    text = text.replace("# file = \"catalog.toml\"", "file = \"catalog.toml\"");
    text.push_str(&spec.extra);
    let path = dir.join("node.toml");
    std::fs::write(&path, text).unwrap();
    (path, public_key_hex(&key.verifying_key()))
}

/// The indicators test nodes publish (edition "test"): (code, unit, area,
/// kind, frequency, subjects).
const TEST_INDICATORS: [(&str, &str, &str, &str, &str, &str); 5] = [
    ("jobs", "percent", "economy", "ratio", "annual", "persons"),
    (
        "firms",
        "firms",
        "economy",
        "count",
        "quarterly",
        "businesses",
    ),
    (
        "outages",
        "hours",
        "infrastructure",
        "mean",
        "monthly",
        "public",
    ),
    ("co2", "t", "environment", "ratio", "annual", "public"),
    (
        "households",
        "households",
        "infrastructure",
        "count",
        "annual",
        "persons",
    ),
];

/// Codes of annual ratios the tests publish one row of each.
const TEST_NAMES: [&str; 22] = [
    "a",
    "b",
    "c",
    "d",
    "h",
    "w",
    "x",
    "y",
    "z",
    "known",
    "late",
    "never-met",
    "before",
    "after-restart",
    "while-revoked",
    "turnover",
    "tamper-",
    "delayed-",
    "stalled-",
    "before-cut-",
    "after-cut-",
    "cell-",
];

/// The catalog file of test nodes: the indicators above, each name of
/// TEST_NAMES also with the suffixes 0 to 49, and i0..i49, b0..b49,
/// b-0..b-49, k0..k49, before-0.., after-0.., c0-0..c9-49, p0-0..p9-19.
pub fn test_catalog() -> String {
    let mut text = String::from("edition = \"test\"\nname = \"Indicators of the tests\"\n");
    let mut add = |code: &str,
                   unit: &str,
                   area: &str,
                   kind: &str,
                   frequency: &str,
                   subjects: &str| {
        text.push_str(&format!(
            "\n[[indicator]]\ncode = {code:?}\nlabel = \"test\"\nunit = {unit:?}\narea = {area:?}\nkind = {kind:?}\nfrequency = {frequency:?}\nsubjects = {subjects:?}\n"
        ));
    };
    for (code, unit, area, kind, frequency, subjects) in TEST_INDICATORS {
        add(code, unit, area, kind, frequency, subjects);
    }
    let mut names: Vec<String> = Vec::new();
    for name in TEST_NAMES {
        if !name.ends_with('-') {
            names.push(name.into());
        }
        names.extend((0..50).map(|i| format!("{name}{i}")));
    }
    for prefix in ["i", "b", "b-", "k", "before-", "after-"] {
        names.extend((0..50).map(|i| format!("{prefix}{i}")));
    }
    for c in 0..10 {
        names.extend((0..50).map(|i| format!("c{c}-{i}")));
        names.extend((0..20).map(|i| format!("p{c}-{i}")));
    }
    names.sort();
    names.dedup();
    for name in names {
        add(&name, "percent", "economy", "ratio", "annual", "persons");
    }
    text
}

/// Creates a node directory with a new feed key; returns the public key.
pub fn make_key(dir: &Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    public_key_hex(
        &create_key_file(&dir.join("feed.key"))
            .unwrap()
            .verifying_key(),
    )
}

/// Two nodes, city-a and city-b, each subscribed to the other through a
/// proxy (so either can restart), each pinning the other's key.
pub struct Pair {
    pub a: TestNode,
    pub b: TestNode,
    pub proxy_a: Proxy,
    pub proxy_b: Proxy,
}

impl Pair {
    pub async fn start(dir: &Path) -> Self {
        let (a_dir, b_dir) = (dir.join("a"), dir.join("b"));
        let (a_key, b_key) = (make_key(&a_dir), make_key(&b_dir));
        let (proxy_a, proxy_b) = (Proxy::start(NOWHERE).await, Proxy::start(NOWHERE).await);
        let a_spec = Spec::new("city-a")
            .peer("city-b", &proxy_b.address)
            .trust("city-b", &b_key);
        let a = TestNode::start(&a_dir, a_spec).await;
        proxy_a.set_target(&a.address);
        let b_spec = Spec::new("city-b")
            .peer("city-a", &proxy_a.address)
            .trust("city-a", &a_key);
        let b = TestNode::start(&b_dir, b_spec).await;
        proxy_b.set_target(&b.address);
        Self {
            a,
            b,
            proxy_a,
            proxy_b,
        }
    }

    /// Starts A again after it was stopped, same directory and spec, behind
    /// the same proxy.
    pub async fn start_a(&mut self) {
        self.a = TestNode::start(&self.a.dir.clone(), self.a.spec.clone()).await;
        self.proxy_a.set_target(&self.a.address);
    }
}

/// An address where nothing listens (the discard port), for proxies whose
/// node is not up yet.
pub const NOWHERE: &str = "127.0.0.1:9";

/// A node running in this process.
pub struct TestNode {
    pub spec: Spec,
    pub dir: PathBuf,
    pub address: String,
    pub public_key: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), NodeError>>>,
}

impl TestNode {
    /// Starts a node in `dir` on a fresh 127.0.0.1 port.
    pub async fn start(dir: &Path, spec: Spec) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (path, public_key) = write_node_dir(dir, &spec, &address);
        let config = Config::load(&path, std::iter::empty()).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(civex_node::node::run(config, listener, async move {
            let _ = stopped.await;
        }));
        Self {
            spec,
            dir: dir.to_path_buf(),
            address,
            public_key,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops the node gracefully and waits for it.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    /// Stops and starts again on a new port with the same dir and spec.
    pub async fn restart(&mut self) {
        self.stop().await;
        *self = Self::start(&self.dir.clone(), self.spec.clone()).await;
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("node.toml")
    }

    pub async fn channel(&self) -> Channel {
        connect(&self.address).await
    }

    /// The directory of an operator identity for this node's federation,
    /// for `civex --identity`.
    pub fn operator_dir(&self) -> PathBuf {
        self.dir.join("operator")
    }

    /// Runs `civex --node <this node> --identity <operator> args...`.
    /// `civex peer add ORIGIN --address ADDRESS --origin ORIGIN` on this
    /// node, which must succeed.
    pub async fn add_peer(&self, origin: &str, address: &str) {
        self.add_peer_reading(origin, address, &[]).await;
    }

    /// [`TestNode::add_peer`] with `--read` for each of `read` (none: it
    /// may read every origin).
    pub async fn add_peer_reading(&self, origin: &str, address: &str, read: &[&str]) {
        let mut args = vec![
            "peer",
            "add",
            origin,
            "--address",
            address,
            "--origin",
            origin,
        ];
        for origin in read {
            args.extend(["--read", origin]);
        }
        let out = self.cli(&args).await;
        assert!(out.status.success(), "{}", stderr(&out));
    }

    pub async fn cli(&self, args: &[&str]) -> Output {
        let identity = self.operator_dir();
        let mut full = vec![
            "--node",
            &self.address,
            "--identity",
            identity.to_str().unwrap(),
        ];
        if !args.contains(&"--expect-origin") {
            full.extend(["--expect-origin", &self.spec.origin]);
        }
        full.extend_from_slice(args);
        civex_async(&full).await
    }

    pub async fn publisher(&self) -> PublishClient<Channel> {
        PublishClient::new(self.channel().await)
    }

    pub async fn query(&self) -> QueryClient<Channel> {
        QueryClient::new(self.channel().await)
    }

    pub async fn feed(&self) -> FeedClient<Channel> {
        FeedClient::new(self.channel().await)
    }

    pub async fn admin(&self) -> pb::admin_client::AdminClient<Channel> {
        pb::admin_client::AdminClient::new(self.channel().await)
    }

    pub async fn status(&self) -> pb::NodeStatusResponse {
        StatusClient::new(self.channel().await)
            .node_status(pb::NodeStatusRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    /// (seq, hash) held for `origin`.
    pub async fn head(&self, origin: &str) -> (u64, Vec<u8>) {
        self.status()
            .await
            .heads
            .into_iter()
            .find(|h| h.origin == origin)
            .map_or((0, Vec::new()), |h| (h.seq, h.entry_hash))
    }

    /// A subscription to every origin this node holds or comes to hold.
    pub async fn subscribe_all(&self) -> tonic::Streaming<pb::SubscribeResponse> {
        subscribe_all(&self.address).await
    }

    pub async fn wait_ready(&self) {
        eventually(
            &format!("{} to open publishing", self.spec.origin),
            || async { self.status().await.publish_ready },
        )
        .await;
    }
}

/// A subscription to every origin the node at `address` holds or comes to hold.
pub async fn subscribe_all(address: &str) -> tonic::Streaming<pb::SubscribeResponse> {
    subscribe_all_over(connect(address).await).await
}

/// The same over `channel` (made with any identity); it must be admitted.
pub async fn subscribe_all_over(channel: Channel) -> tonic::Streaming<pb::SubscribeResponse> {
    FeedClient::new(channel)
        .subscribe(pb::SubscribeRequest {
            cursors: Vec::new(),
            all_origins: true,
        })
        .await
        .unwrap()
        .into_inner()
}

/// A fresh 16-byte idempotency key.
pub fn key() -> Vec<u8> {
    let mut key = vec![0u8; 16];
    getrandom_fill(&mut key);
    key
}

fn getrandom_fill(bytes: &mut [u8]) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(1);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    bytes[..8].copy_from_slice(&n.to_be_bytes());
    bytes[8..].copy_from_slice(&(time ^ u64::from(std::process::id())).to_be_bytes());
}

/// An indicator row.
pub fn row(
    indicator: &str,
    ref_area: &str,
    period: &str,
    value: f64,
    contributors: u64,
) -> pb::IndicatorRow {
    pb::IndicatorRow {
        indicator: indicator.into(),
        catalog_edition: "test".into(),
        ref_area: ref_area.into(),
        period: period.into(),
        value,
        contributors: Some(contributors),
        ..Default::default()
    }
}

/// Publishes one row as one entry; returns the receipt.
pub async fn publish_row(node: &TestNode, indicator: &str, value: f64) -> pb::Receipt {
    publish(
        node,
        pb::PublishIndicatorsRequest {
            idempotency_key: key(),
            rows: vec![row(indicator, &node.spec.origin, "2025", value, 10)],
        },
    )
    .await
}

/// A publish of 1,200 cells of about 1 KB each in `origin`'s table "jobs"
/// of `period`: about 1.3 MB, a group of about 22 entries of 60 KB.
pub fn large_publish(origin: &str, period: &str) -> pb::PublishIndicatorsRequest {
    pb::PublishIndicatorsRequest {
        idempotency_key: key(),
        rows: (0..1200)
            .map(|i| pb::IndicatorRow {
                breakdown: format!("item=i{i}"),
                method_notes: "n".repeat(1000),
                ..row("jobs", origin, period, 1.0, 100)
            })
            .collect(),
    }
}

/// Publishes `request`, which must succeed; its receipt.
pub async fn publish(node: &TestNode, request: pb::PublishIndicatorsRequest) -> pb::Receipt {
    node.publisher()
        .await
        .publish_indicators(request)
        .await
        .unwrap()
        .into_inner()
}

/// A TCP proxy whose target can change, so a restarted node keeps the
/// address its peers dial; it can also delay, stall and cut what it carries.
pub struct Proxy {
    pub address: String,
    target: Arc<Mutex<String>>,
    faults: tokio::sync::watch::Sender<Faults>,
    connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    task: JoinHandle<()>,
}

/// What the proxy does to the bytes it carries.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Faults {
    /// Added before each chunk is forwarded.
    pub delay: Duration,
    /// Nothing is forwarded while set; connections stay open.
    pub stalled: bool,
    /// Added before each chunk from the target to the dialler, after
    /// `delay`.
    pub reply_delay: Duration,
}

/// Copies one direction (`reply`: from the target), obeying the faults.
async fn carry(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut faults: tokio::sync::watch::Receiver<Faults>,
    reply: bool,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        if faults.wait_for(|f| !f.stalled).await.is_err() {
            break;
        }
        let delay = match *faults.borrow() {
            Faults {
                delay, reply_delay, ..
            } if reply => delay + reply_delay,
            Faults { delay, .. } => delay,
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

impl Proxy {
    pub async fn start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let target = Arc::new(Mutex::new(target.to_owned()));
        let (faults, watching) = tokio::sync::watch::channel(Faults::default());
        let connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (shared, live) = (target.clone(), connections.clone());
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let to = shared.lock().unwrap().clone();
                let watching = watching.clone();
                let connection = tokio::spawn(async move {
                    if let Ok(outbound) = tokio::net::TcpStream::connect(&to).await {
                        let _ = outbound.set_nodelay(true);
                        let (in_read, in_write) = inbound.into_split();
                        let (out_read, out_write) = outbound.into_split();
                        tokio::join!(
                            carry(in_read, out_write, watching.clone(), false),
                            carry(out_read, in_write, watching, true),
                        );
                    }
                });
                live.lock().unwrap().push(connection.abort_handle());
            }
        });
        Self {
            address,
            target,
            faults,
            connections,
            task,
        }
    }

    pub fn set_target(&self, target: &str) {
        *self.target.lock().unwrap() = target.to_owned();
    }

    /// Changes what happens to the bytes carried from now on.
    pub fn set_faults(&self, faults: Faults) {
        self.faults.send_replace(faults);
    }

    /// Cuts every connection open now (peers see their streams break).
    pub fn cut(&self) {
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

/// Sends `requests` on one `PublishIndicatorsStream`: the receipts, and the
/// status that ended the stream if it failed.
pub async fn publish_stream(
    node: &TestNode,
    requests: Vec<pb::PublishIndicatorsRequest>,
) -> (Vec<pb::Receipt>, Option<tonic::Status>) {
    let mut stream = node
        .publisher()
        .await
        .publish_indicators_stream(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut receipts = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(receipt)) => receipts.push(receipt),
            Ok(None) => return (receipts, None),
            Err(status) => return (receipts, Some(status)),
        }
    }
}

/// Every entry of `origin` the node at `address` holds, in order, byte for
/// byte as it serves them.
pub async fn whole_feed(address: &str, origin: &str) -> Vec<pb::SignedEntry> {
    let mut stream = FeedClient::new(connect(address).await)
        .subscribe(pb::SubscribeRequest {
            cursors: vec![pb::Cursor {
                origin: origin.into(),
                ..Default::default()
            }],
            all_origins: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut entries = Vec::new();
    loop {
        match stream.message().await.unwrap().unwrap().event {
            Some(pb::subscribe_response::Event::Entries(batch)) => entries.extend(batch.entries),
            Some(pb::subscribe_response::Event::Drained(_)) => return entries,
            other => panic!("unexpected message in {origin}'s feed: {other:?}"),
        }
    }
}

/// Path of a workspace binary built beside this test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: the test command builds the workspace binaries (cargo nextest run --workspace)",
        path.display()
    );
    path
}

/// Runs `civex` with arguments.
pub fn civex(args: &[&str]) -> Output {
    Command::new(bin("civex"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Runs `civex` in a blocking task (from async tests).
pub async fn civex_async(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        civex(&refs)
    })
    .await
    .unwrap()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A `civex-node` child process writing its bound address to a file and
/// its log to `node.log` in its directory.
pub struct ChildNode {
    pub child: Child,
    pub address: String,
    pub log: PathBuf,
}

impl ChildNode {
    /// Starts `civex-node --config` for a node dir prepared with
    /// [`write_node_dir`] (listen 127.0.0.1:0).
    pub fn start(dir: &Path) -> Self {
        let config = dir.join("node.toml");
        Self::start_with(dir, &["--config", config.to_str().unwrap()])
    }

    /// Starts `civex-node ARGS --address-file DIR/address`, logging to
    /// `DIR/node.log`.
    pub fn start_with(dir: &Path, args: &[&str]) -> Self {
        let address_file = dir.join("address");
        let _ = std::fs::remove_file(&address_file);
        let log = dir.join("node.log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut child = Command::new(bin("civex-node"))
            .args(args)
            .arg("--address-file")
            .arg(&address_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap();
        let mut address = String::new();
        eventually_blocking("civex-node to write its address", || {
            if let Some(status) = child.try_wait().unwrap() {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("civex-node exited ({status}) before it listened:\n{log}");
            }
            address = std::fs::read_to_string(&address_file)
                .unwrap_or_default()
                .trim()
                .to_owned();
            !address.is_empty()
        });
        Self {
            child,
            address,
            log,
        }
    }

    /// What the node logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// [`ChildNode::start`] from an async test.
    pub async fn start_async(dir: &Path) -> Self {
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || Self::start(&dir))
            .await
            .unwrap()
    }

    pub fn sigkill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "civex-node did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ChildNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
