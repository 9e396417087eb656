//! Talking to a node: connect, retry with the same idempotency key.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use civex_proto::v1::{
    feed_client::FeedClient, publish_client::PublishClient, query_client::QueryClient,
    status_client::StatusClient,
};
use tonic::{transport::Channel, Code};

/// Largest message the CLI sends or accepts.
pub(crate) const MAX_MESSAGE: usize = 16 << 20;

/// Opens a channel to a node.
pub(crate) async fn connect(address: &str) -> anyhow::Result<Channel> {
    civex_node::transport::connect(address, Duration::from_secs(5))
        .await
        .with_context(|| {
            format!("cannot reach the node at {address} (is civex-node running? see --node)")
        })
}

/// Publish client; connects on first call, so retries cover a node that
/// is still starting.
pub(crate) fn publish(address: &str) -> anyhow::Result<PublishClient<Channel>> {
    let channel = civex_node::transport::connect_lazy(address, Duration::from_secs(5))
        .with_context(|| format!("--node {address:?} is not a usable address"))?;
    Ok(PublishClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}

/// Query client.
pub(crate) async fn query(address: &str) -> anyhow::Result<QueryClient<Channel>> {
    Ok(QueryClient::new(connect(address).await?).max_decoding_message_size(MAX_MESSAGE))
}

/// Feed client.
pub(crate) async fn feed(address: &str) -> anyhow::Result<FeedClient<Channel>> {
    Ok(FeedClient::new(connect(address).await?).max_decoding_message_size(MAX_MESSAGE))
}

/// Status client.
pub(crate) async fn status(address: &str) -> anyhow::Result<StatusClient<Channel>> {
    Ok(StatusClient::new(connect(address).await?))
}

/// A fresh idempotency key: one per invocation, reused on every retry.
pub(crate) fn idempotency_key() -> anyhow::Result<Vec<u8>> {
    let mut key = vec![0u8; 16];
    getrandom::getrandom(&mut key).map_err(|err| anyhow!("no randomness: {err}"))?;
    Ok(key)
}

/// Runs `call` until it succeeds, fails for a reason a retry cannot fix,
/// or `wait` has passed. Unavailable nodes (down, or not ready to publish)
/// are retried; the request, and so its idempotency key, stays the same.
pub(crate) async fn with_retry<T, F, Fut>(wait: Duration, mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let deadline = Instant::now() + wait;
    let mut pause = Duration::from_millis(50);
    loop {
        match call().await {
            Err(status)
                if status.code() == Code::Unavailable && Instant::now() + pause < deadline =>
            {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

/// Describes a failed call for a person: code and the node's message.
pub(crate) fn describe(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}
