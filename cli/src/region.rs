//! A region of in-process city nodes on loopback, for `demo` and `bench`.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context};
use civex_node::{
    config::{template_with_operators, Config},
    keys::{create_key_file, public_key_hex},
    node::NodeError,
    pki::{write_identity_dir, Authority, Identity},
    tls::{Tls, TlsFiles},
    transport::Security,
};
use civex_proto::v1 as pb;
use tokio::{sync::oneshot, task::JoinHandle};

use crate::client;

/// One running city node.
pub(crate) struct CityNode {
    /// Origin id.
    pub(crate) origin: String,
    /// Its directory (node.toml, feed.key, data/).
    pub(crate) dir: PathBuf,
    /// Address it serves on.
    pub(crate) address: String,
    /// The node, as an operator reaches it.
    pub(crate) client: client::Node,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), NodeError>>>,
}

impl CityNode {
    /// Stops the node gracefully and waits for it.
    pub(crate) async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.map_err(|e| anyhow!("node task failed: {e}"))??;
        }
        Ok(())
    }
}

/// The operator of a federation made on the fly.
pub(crate) const OPERATOR: &str = "demo";

/// A federation made on the fly: its CA and an operator identity.
pub(crate) struct Federation {
    ca: Authority,
    operator: Security,
}

impl Federation {
    /// A new CA and operator identity under `root`.
    pub(crate) fn create(root: &Path) -> anyhow::Result<Self> {
        let (ca, _key) = Authority::create("civex demo federation", 2)?;
        let operator = root.join("operator");
        let issued = ca.issue(&Identity::Operator(OPERATOR.into()), None, 2)?;
        write_identity_dir(&operator, ca.cert_pem(), &issued)?;
        let operator = Security::Mutual(Tls::load(TlsFiles::in_dir(&operator), None)?);
        Ok(Self { ca, operator })
    }

    /// Issues a node certificate for `origin` into `dir/tls`.
    pub(crate) fn equip(&self, dir: &Path, origin: &str) -> anyhow::Result<()> {
        let issued = self
            .ca
            .issue(&Identity::Origin(origin.to_owned()), None, 2)?;
        write_identity_dir(&dir.join("tls"), self.ca.cert_pem(), &issued)?;
        Ok(())
    }

    /// The node at `address`, as this federation's operator reaches it.
    pub(crate) fn client(&self, address: &str) -> client::Node {
        client::Node {
            address: address.to_owned(),
            security: self.operator.clone(),
            expected: None,
            idempotency_key: None,
        }
    }
}

/// The cities' own indicators, beside the editions shipped with civex.
const REGION_CATALOG: &str = r#"edition = "local"
name = "Demo region's own indicators"

[[indicator]]
code = "households-without-water"
label = "Households without piped water"
unit = "households"
area = "infrastructure"
kind = "count"
frequency = "annual"
subjects = "persons"

[[indicator]]
code = "new-large-firms"
label = "New firms with 250 or more employees"
unit = "firms"
area = "economy"
kind = "count"
frequency = "quarterly"
subjects = "businesses"
"#;

/// What each node of a region is.
pub(crate) struct CitySpec<'a> {
    /// Origin id.
    pub(crate) origin: &'a str,
    /// Display name.
    pub(crate) name: &'a str,
    /// District names.
    pub(crate) districts: &'a [&'a str],
    /// Origins (by index in the region) this node subscribes to.
    pub(crate) peers: Vec<usize>,
}

/// Creates node directories under `root`, binds every listener first, then
/// starts each node with its peers and their pinned keys.
pub(crate) async fn start_region(
    root: &Path,
    specs: &[CitySpec<'_>],
    allow_without_peers: bool,
) -> anyhow::Result<Vec<CityNode>> {
    let federation = Federation::create(root)?;
    let mut prepared = Vec::new();
    for spec in specs {
        let dir = root.join(spec.origin);
        std::fs::create_dir_all(&dir)?;
        let key = create_key_file(&dir.join("feed.key"))?;
        federation.equip(&dir, spec.origin)?;
        let listener = civex_node::transport::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        prepared.push((dir, public_key_hex(&key.verifying_key()), listener, address));
    }
    let mut nodes = Vec::new();
    for (spec, (dir, _, _, address)) in specs.iter().zip(prepared.iter()) {
        let mut text = template_with_operators(spec.origin, spec.name, address, &[OPERATOR.into()]);
        let districts = spec
            .districts
            .iter()
            .map(|d| format!("{d:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        text = text.replace("districts = []", &format!("districts = [{districts}]"));
        let trusted: String = spec
            .peers
            .iter()
            .map(|&p| format!("\"{}\" = \"{}\"\n", specs[p].origin, prepared[p].1))
            .collect();
        text = text.replace(
            "[trusted_origins]\n",
            &format!("[trusted_origins]\n{trusted}"),
        );
        text = text.replace("level = \"info\"", "level = \"warn\"");
        text = text.replace("backoff_max_ms = 30000", "backoff_max_ms = 2000");
        text = text.replace("backoff_initial_ms = 200", "backoff_initial_ms = 50");
        if allow_without_peers {
            text = text.replace("allow_without_peers = false", "allow_without_peers = true");
        }
        for &p in &spec.peers {
            text.push_str(&format!(
                "\n[[peers]]\nname = \"{0}\"\naddress = \"{1}\"\norigin = \"{0}\"\n",
                specs[p].origin, prepared[p].3
            ));
        }
        std::fs::write(dir.join("catalog.toml"), REGION_CATALOG)?;
        text = text.replace("# file = \"catalog.toml\"", "file = \"catalog.toml\"");
        let path = dir.join("node.toml");
        std::fs::write(&path, text)?;
        let config = Config::load(&path, std::iter::empty())
            .with_context(|| format!("demo config {}", path.display()))?;
        let (stop, stopped) = oneshot::channel::<()>();
        nodes.push((config, stop, stopped, dir.clone(), address.clone()));
    }
    let mut running = Vec::new();
    for ((config, stop, stopped, dir, address), (_, _, listener, _)) in
        nodes.into_iter().zip(prepared)
    {
        let origin = config.origin.clone();
        let task = tokio::spawn(civex_node::node::run(config, listener, async move {
            let _ = stopped.await;
        }));
        running.push(CityNode {
            origin,
            dir,
            client: federation.client(&address),
            address,
            stop: Some(stop),
            task: Some(task),
        });
    }
    Ok(running)
}

/// Waits until `check` holds, polling, or fails after `limit`.
pub(crate) async fn wait_until<F, Fut>(
    what: &str,
    limit: Duration,
    mut check: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The node's status, or `None` if it does not answer.
pub(crate) async fn node_status(node: &client::Node) -> Option<pb::NodeStatusResponse> {
    let mut status = client::status(node).await.ok()?;
    status
        .node_status(pb::NodeStatusRequest {})
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// Seq held by the node at `address` for `origin`.
pub(crate) async fn held_seq(node: &client::Node, origin: &str) -> u64 {
    node_status(node)
        .await
        .and_then(|s| s.heads.into_iter().find(|h| h.origin == origin))
        .map_or(0, |h| h.seq)
}
