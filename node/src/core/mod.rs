//! The core: feed signing and verification, ingest and disclosure control,
//! query-index derivation and period arithmetic. Plain functions and types:
//! no sockets, no files, no sled, no tonic. The signed-data format is the
//! prost messages of `civex.v1` (entry.proto), which are data, not gRPC.

pub mod catalog;
pub mod feed;
pub mod ids;
pub mod index;
pub mod ingest;
pub mod period;
pub mod policy;
pub mod sdc;
