//! The storage node: one store's process — engine, raftstore, transport, the KV service over
//! the transaction layer, PD registration and heartbeats, status server.
//!
//! | module | owns |
//! | --- | --- |
//! | [`config`] | the node's configuration (TOML + flags) |
//! | [`node`] | start-up (identity, bootstrap, registration) and graceful shutdown |
//! | [`storage`] | request semantics: MVCC reads at timestamps, plain writes in one phase, Percolator commands, GC |
//! | [`service`] | the `Kv` gRPC service (a thin shell over `storage`) |

pub mod config;
pub mod node;
pub mod service;
pub mod storage;

pub use config::NodeConfig;
pub use node::{run, Node};
