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
