//! Talking to a node: connect, retry with the same idempotency key.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use civex_node::{
    pki::Identity,
    tls::{Tls, TlsFiles},
    transport::{error_chain, Security},
};
use civex_proto::v1::{
    admin_client::AdminClient, feed_client::FeedClient, publish_client::PublishClient,
    query_client::QueryClient, status_client::StatusClient,
};
use tonic::{transport::Channel, Code};

/// Largest message the CLI sends or accepts.
pub(crate) const MAX_MESSAGE: usize = 16 << 20;

/// A node to talk to, and how.
#[derive(Clone, Debug)]
pub(crate) struct Node {
    /// `host:port`.
    pub(crate) address: String,
    /// Mutual TLS with an operator identity, or plain (insecure mode).
    pub(crate) security: Security,
    /// The origin the node's certificate must name; any member node if unset.
    pub(crate) expected: Option<Identity>,
    /// The idempotency key given for a publish (`--idempotency-key`).
    pub(crate) idempotency_key: Option<Vec<u8>>,
}

impl Node {
    /// Refuses to send `what` over mutual TLS to a node whose origin was not
    /// named (`--expect-origin`): any member node answering at the address
    /// would get it.
    pub(crate) fn require_expected(&self, what: &str) -> anyhow::Result<()> {
        if matches!(self.security, Security::Mutual(_)) && self.expected.is_none() {
            bail!(
                "{what}: name the node's origin with --expect-origin ID (or set \
                 CIVEX_EXPECT_ORIGIN), so that they reach that node and no other member's node \
                 at {}",
                self.address
            );
        }
        Ok(())
    }

    /// In insecure mode there is no certificate to name the node: an
    /// origin named with `--expect-origin` is checked against the one the
    /// node's status reports before anything is sent.
    pub(crate) async fn check_insecure_origin(&self) -> anyhow::Result<()> {
        let (Security::Insecure, Some(Identity::Origin(expected))) =
            (&self.security, &self.expected)
        else {
            return Ok(());
        };
        // Connected on first use and retried, as a publish is: the node
        // may still be starting.
        let channel = civex_node::transport::connect_lazy(
            &self.address,
            &self.security,
            None,
            Duration::from_secs(5),
        )
        .with_context(|| format!("--node {:?} is not a usable address", self.address))?;
        let client = StatusClient::new(channel);
        let status = with_retry(Duration::from_secs(10), || {
            let mut client = client.clone();
            async move {
                client
                    .node_status(civex_proto::v1::NodeStatusRequest {})
                    .await
            }
        })
        .await
        .map_err(|s| anyhow!("--expect-origin: the node's status: {}", describe(&s)))?
        .into_inner();
        if &status.origin != expected {
            bail!(
                "--expect-origin {expected}: the node at {} is {} (without TLS, its status names \
                 its origin); nothing was sent",
                self.address,
                status.origin
            );
        }
        Ok(())
    }

    /// From the global flags: `--identity DIR` (mutual TLS) or `--insecure`.
    pub(crate) fn from_flags(
        address: &str,
        identity: Option<&std::path::Path>,
        insecure: bool,
        expect_origin: Option<&str>,
        idempotency_key: Option<&str>,
    ) -> anyhow::Result<Self> {
        let idempotency_key = match idempotency_key {
            Some(text) => Some(
                civex_node::core::ids::unhex(text)
                    .ok()
                    .filter(|key| key.len() == 16)
                    .ok_or_else(|| {
                        anyhow!(
                            "--idempotency-key: {text:?} is not 32 hex digits (the key a \
                             publish whose answer was lost printed)"
                        )
                    })?,
            ),
            None => None,
        };
        let expected = match expect_origin {
            Some(origin) => Some(
                Identity::parse_uri(&format!("civex:origin:{origin}"))
                    .map_err(|m| anyhow!("--expect-origin: {m}"))?,
            ),
            None => None,
        };
        let security = match (identity, insecure) {
            (Some(_), true) => bail!("--identity and --insecure exclude each other"),
            (None, true) => Security::Insecure,
            (Some(dir), false) => Security::Mutual(
                Tls::load(TlsFiles::in_dir(dir), None)
                    .with_context(|| format!("--identity {}", dir.display()))?,
            ),
            (None, false) => bail!(
                "no TLS identity to talk to the node with: pass --identity DIR (or set \
                 CIVEX_IDENTITY), a directory made by `civex ca issue --operator NAME --out DIR`; \
                 or --insecure for a node with tls.mode = \"insecure\""
            ),
        };
        Ok(Self {
            address: address.to_owned(),
            security,
            expected,
            idempotency_key,
        })
    }

    /// The idempotency key of this invocation's publish: the one given,
    /// or a fresh one.
    pub(crate) fn idempotency_key(&self) -> anyhow::Result<Vec<u8>> {
        match &self.idempotency_key {
            Some(key) => Ok(key.clone()),
            None => idempotency_key(),
        }
    }
}

/// Opens a channel to a node.
pub(crate) async fn connect(node: &Node) -> anyhow::Result<Channel> {
    civex_node::transport::connect(
        &node.address,
        &node.security,
        node.expected.clone(),
        Duration::from_secs(5),
    )
    .await
    .map_err(|err| {
        let chain = error_chain(&err);
        match refusal_hint(&chain) {
            Some(hint) => anyhow!(
                "the node at {} refused the connection, or this CLI refused the node: {chain} \
                 ({hint})",
                node.address
            ),
            None => anyhow!(
                "cannot reach the node at {} (is civex-node running? see --node): {chain}",
                node.address
            ),
        }
    })
}

/// What to check when a connection failed in its TLS handshake, not for
/// want of a node at the address; `None` when it looks like the latter.
/// A retry cannot fix such a failure.
pub(crate) fn refusal_hint(error: &str) -> Option<&'static str> {
    if error.contains("InvalidContentType") || error.contains("corrupt message") {
        Some(
            "the node does not speak TLS: for a node with tls.mode = \"insecure\", pass --insecure",
        )
    } else if error.contains("certificate") || error.contains("Certificate") {
        Some(
            "check --identity (an identity issued by this federation's CA, not expired or \
             revoked) and --expect-origin (the origin the node's certificate names)",
        )
    } else {
        None
    }
}

/// Publish client; connects on first call, so retries cover a node that
/// is still starting.
pub(crate) fn publish(node: &Node) -> anyhow::Result<PublishClient<Channel>> {
    let channel = civex_node::transport::connect_lazy(
        &node.address,
        &node.security,
        node.expected.clone(),
        Duration::from_secs(5),
    )
    .with_context(|| format!("--node {:?} is not a usable address", node.address))?;
    Ok(PublishClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}

/// Query client.
pub(crate) async fn query(node: &Node) -> anyhow::Result<QueryClient<Channel>> {
    Ok(QueryClient::new(connect(node).await?).max_decoding_message_size(MAX_MESSAGE))
}

/// Feed client.
pub(crate) async fn feed(node: &Node) -> anyhow::Result<FeedClient<Channel>> {
    Ok(FeedClient::new(connect(node).await?).max_decoding_message_size(MAX_MESSAGE))
}

/// A subscription to `origins`, each from its first entry.
pub(crate) async fn subscribe_from_start(
    node: &Node,
    origins: &[String],
) -> anyhow::Result<tonic::Streaming<civex_proto::v1::SubscribeResponse>> {
    let from_start = origins
        .iter()
        .map(|origin| (origin.clone(), None))
        .collect();
    subscribe_at(node, &from_start).await
}

/// Subscribes to each origin after its tip (`None`: from seq 1).
pub(crate) async fn subscribe_at(
    node: &Node,
    tips: &std::collections::BTreeMap<String, Option<civex_node::core::feed::Tip>>,
) -> anyhow::Result<tonic::Streaming<civex_proto::v1::SubscribeResponse>> {
    let request = civex_proto::v1::SubscribeRequest {
        cursors: tips
            .iter()
            .map(|(origin, tip)| civex_proto::v1::Cursor {
                origin: origin.clone(),
                feed_id: tip.map(|t| t.feed_id.to_vec()).unwrap_or_default(),
                seq: tip.map_or(0, |t| t.seq),
                entry_hash: tip.map(|t| t.hash.to_vec()).unwrap_or_default(),
            })
            .collect(),
        all_origins: false,
    };
    Ok(feed(node)
        .await?
        .subscribe(request)
        .await
        .map_err(|s| anyhow::anyhow!("subscribe refused: {}", describe(&s)))?
        .into_inner())
}

/// Admin client.
pub(crate) async fn admin(node: &Node) -> anyhow::Result<AdminClient<Channel>> {
    Ok(AdminClient::new(connect(node).await?))
}

/// Status client.
pub(crate) async fn status(node: &Node) -> anyhow::Result<StatusClient<Channel>> {
    Ok(StatusClient::new(connect(node).await?))
}

/// A fresh idempotency key: one per invocation, reused on every retry.
pub(crate) fn idempotency_key() -> anyhow::Result<Vec<u8>> {
    let mut key = vec![0u8; 16];
    getrandom::getrandom(&mut key).map_err(|err| anyhow!("no randomness: {err}"))?;
    Ok(key)
}

/// A call that failed, retries included: the last answer, and whether the
/// node may have done it all the same ([`may_be_done`] of some attempt).
#[derive(Debug)]
pub(crate) struct Failed {
    pub(crate) status: tonic::Status,
    pub(crate) maybe_done: bool,
}

/// Runs `call` until it succeeds, fails for a reason a retry cannot fix,
/// or `wait` has passed. Unavailable nodes (down, or not ready to publish)
/// and a connection that broke under a call (not twice in a row) are
/// retried; the request, and so its idempotency key, stays the same.
pub(crate) async fn with_retry<T, F, Fut>(wait: Duration, call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    retrying(wait, call).await.map_err(|failed| failed.status)
}

/// [`with_retry`], telling whether a failed call may have been done.
pub(crate) async fn retrying<T, F, Fut>(wait: Duration, mut call: F) -> Result<T, Failed>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let deadline = Instant::now() + wait;
    let mut pause = Duration::from_millis(50);
    let (mut maybe_done, mut broke_before) = (false, false);
    loop {
        let status = match call().await {
            Ok(answer) => return Ok(answer),
            Err(status) => status,
        };
        maybe_done |= may_be_done(&status);
        // A connection that breaks twice in a row is no node going away:
        // most likely a node using TLS spoken to in plain HTTP/2.
        let broken = broke(&status);
        let retry = (status.code() == Code::Unavailable
            && refusal_hint(status.message()).is_none()
            && !writes_stopped(&status))
            || (broken && !broke_before);
        broke_before = broken;
        if !retry || Instant::now() + pause >= deadline {
            return Err(Failed { status, maybe_done });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// Whether the node stopped writing after a storage failure: it stays so
/// until an operator fixes the disk and restarts it, so a retry is no use.
fn writes_stopped(status: &tonic::Status) -> bool {
    status.message().starts_with("writes are stopped")
}

/// Whether the connection broke under the call: the node went away (its
/// answer, if it made one, is lost), or, among other causes, a node using
/// TLS was spoken to in plain HTTP/2 (--insecure), in one of these ways
/// depending on timing.
fn broke(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::Unknown | Code::Cancelled | Code::Internal
    ) && [
        "transport error",
        "operation was canceled",
        "h2 protocol error",
    ]
    .iter()
    .any(|m| status.message().contains(m))
}

/// Whether a call that failed so may have been done all the same: its
/// answer was lost (the connection broke, or it ran out of time), the
/// node found it in progress (an earlier attempt), or the node's store
/// failed while making it durable. Any other answer is a refusal, or
/// comes from a node never reached.
fn may_be_done(status: &tonic::Status) -> bool {
    let message = status.message();
    match status.code() {
        Code::Unavailable => {
            message.contains("is in progress") || message.starts_with("storage failure")
        }
        Code::Unknown
        | Code::Cancelled
        | Code::Internal
        | Code::DeadlineExceeded
        | Code::DataLoss => true,
        _ => false,
    }
}

/// What to say of a publish that failed (`key` its idempotency key):
/// nothing was published, or, when its answer was lost, that it may
/// have been and how to find out without publishing twice.
pub(crate) fn publish_failed(failed: &Failed, key: &[u8]) -> String {
    match failed.maybe_done {
        false => format!(
            "refused, nothing was published: {}",
            describe(&failed.status)
        ),
        true => format!(
            "the node's answer was lost, so this may have been published ({}); run the same \
             command again with --idempotency-key {}: if it was published, that shows its \
             receipt and publishes nothing more",
            describe(&failed.status),
            civex_node::core::ids::hex(key)
        ),
    }
}

/// Describes a failed call for a person: code and the node's message.
pub(crate) fn describe(status: &tonic::Status) -> String {
    let hint = match broke(status) {
        true => {
            " (the connection broke; if the node uses TLS, --insecure cannot talk to it: pass \
             --identity DIR)"
        }
        false => "",
    };
    format!("{:?}: {}{hint}", status.code(), status.message())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Calls `retrying` with a call that fails with `status` every time;
    /// returns how many times it was made.
    async fn attempts(status: tonic::Status) -> usize {
        let calls = AtomicUsize::new(0);
        let failed = retrying(Duration::from_millis(300), || {
            calls.fetch_add(1, Ordering::SeqCst);
            let status = status.clone();
            async move { Err::<(), _>(status) }
        })
        .await
        .unwrap_err();
        assert_eq!(failed.status.message(), status.message());
        calls.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn a_node_whose_writes_stopped_is_not_retried() {
        let stopped = tonic::Status::unavailable(
            "writes are stopped after a storage failure; reads still work; fix the disk and restart the node",
        );
        assert_eq!(attempts(stopped).await, 1);
        // A node not ready yet is retried until the wait is over.
        let not_ready = tonic::Status::unavailable("publishing is closed until a peer served");
        assert!(attempts(not_ready).await > 1);
    }
}
