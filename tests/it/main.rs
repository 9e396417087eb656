//! End-to-end tests: real nodes on 127.0.0.1 port 0 with a temp dir each,
//! driven through gRPC clients and the built `civex` / `civex-node` binaries.

#![allow(unreachable_pub)]

mod backup;
mod cli;
mod daemon;
mod disclosure;
mod faults;
mod feed;
mod interop;
mod keys;
mod malicious;
mod peers;
mod publish_query;
mod replication;
mod roster;
mod schedules;
mod support;
mod tamper;
mod tls;
