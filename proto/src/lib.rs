//! Atoll's wire protocol, generated from `proto/*.proto` by tonic/prost.
//!
//! | module | owns |
//! | --- | --- |
//! | [`metapb`] | stores, regions, peers, epochs |
//! | [`errorpb`] | typed region errors (not leader, epoch not match, ...) |
//! | [`raft_serverpb`] | store-to-store envelopes, snapshot chunks, persisted local states |
//! | [`raft_cmdpb`] | what a raft entry carries: column-family mutations or one admin command |
//! | [`kvrpcpb`] | the store's KV and transaction service |
//! | [`pdpb`] | the placement driver's service, and PD-to-PD raft |
//! | [`etcdserverpb`], [`mvccpb`], [`authpb`], [`v3electionpb`], [`v3lockpb`] | etcd's v3 API, vendored from etcd unchanged but for annotations (`proto/etcd/`) |
//!
//! raft-rs messages (rust-protobuf 2) travel as opaque bytes inside these envelopes.

#![allow(clippy::all, clippy::pedantic)]

pub mod metapb {
    tonic::include_proto!("metapb");
}
pub mod errorpb {
    tonic::include_proto!("errorpb");
}
pub mod raft_serverpb {
    tonic::include_proto!("raft_serverpb");
}
pub mod raft_cmdpb {
    tonic::include_proto!("raft_cmdpb");
}
pub mod kvrpcpb {
    tonic::include_proto!("kvrpcpb");
}
pub mod pdpb {
    tonic::include_proto!("pdpb");
}

pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}
pub mod authpb {
    tonic::include_proto!("authpb");
}
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}
pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
}
pub mod v3lockpb {
    tonic::include_proto!("v3lockpb");
}

pub use prost::Message;
