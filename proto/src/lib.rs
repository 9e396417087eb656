//! The civex public contract: messages and gRPC services generated from
//! `proto/civex/v1/*.proto`. Everything else in civex speaks these types;
//! only `civex-node`'s service layer and the CLI name the gRPC parts.

/// `civex.v1`: signed entries, payloads and the node's services.
#[allow(unreachable_pub, missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("civex.v1");
}

/// Encoded `FileDescriptorSet` of the contract, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("civex_descriptor");
