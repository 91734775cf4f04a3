//! The storage node: one store's process — engine, raftstore, transport, the KV service over
//! the transaction layer, PD registration and heartbeats, status server.
//!
//! | module | owns |
//! | --- | --- |
//! | [`config`] | the node's configuration (TOML + flags) |
//! | [`node`] | start-up (identity, bootstrap, registration), the client port (Atoll's and etcd's APIs, `atoll-etcd`) and graceful shutdown |
//! | [`service`] | the `Kv` gRPC service (a thin shell over `atoll_storage::Storage`, where the request semantics live; with auth on, each call checked for its user first: `atoll_etcd::auth`) |

pub mod config;
pub mod node;
pub mod service;

pub use config::NodeConfig;
pub use node::{run, Node};
