//! civex-node: a city's node in a civex federation.
//!
//! Layout:
//! - [`core`]: feed signing and verification, ingest and the threshold rule,
//!   index derivation, periods. No IO.
//! - [`store`]: the only module that names sled. Entries, heads, query
//!   indexes and idempotency records behind the [`store::Store`] trait.
//! - [`writer`]: the single writer thread, group commit and durable acks.
//! - [`publish`]: sequencing and signing this node's own feed.
//! - [`replicate`]: subscribing to peers, verifying and storing their feeds.
//! - [`peers`]: peers added and removed at runtime, persisted and audited.
//! - [`service`]: the gRPC layer; the only module that names tonic servers.
//! - [`status`]: the operator's status answer, bounded to fit one message.
//! - [`transport`]: every listener and client connection, plain or TLS.
//! - [`tls`]: mutual TLS: certificates, verification, reload, revocation.
//! - [`pki`]: identities, the federation CA, requests and revocation lists.
//! - [`audit`]: re-verification of a whole store (`civex verify`).
//! - [`config`], [`keys`]: `node.toml` and the feed key file.
//! - [`node`]: wiring it all together: [`node::run`].
//! - [`allocator`]: the binaries' mimalloc settings (the only unsafe code).
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod allocator;
pub mod audit;
pub mod backup;
pub mod config;
pub mod core;
pub mod gate;
pub mod keys;
pub mod node;
pub mod peers;
pub mod pki;
pub mod publish;
pub mod query;
pub mod replicate;
pub mod service;
pub mod status;
pub mod store;
pub mod tls;
pub mod transport;
pub mod writer;

/// Runs `work` on this task's thread; when it is `heavy` (keeps a core
/// busy for a while) and the runtime has several threads, the runtime first
/// moves its other tasks off this one, so sessions and subscribers go on.
pub(crate) fn cpu_bound<T>(heavy: bool, work: impl FnOnce() -> T) -> T {
    let threaded = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    match heavy && threaded {
        true => tokio::task::block_in_place(work),
        false => work(),
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::mpsc, time::Duration};

    #[test]
    fn heavy_work_leaves_the_runtime_free_for_other_tasks() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let waited = runtime.block_on(async {
            tokio::spawn(async {
                // On the only worker thread: the task it starts can run
                // only if the runtime moves it elsewhere.
                let (tx, rx) = mpsc::channel();
                tokio::spawn(async move { tx.send(()) });
                super::cpu_bound(true, || rx.recv_timeout(Duration::from_secs(10)))
            })
            .await
            .unwrap()
        });
        assert!(waited.is_ok(), "the other task did not run");
    }
}
