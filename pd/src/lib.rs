//! The placement driver (PD): a small raft-replicated service that knows every store and
//! region, hands out ids and timestamps, and tells stores what to move.
//!
//! | module | owns |
//! | --- | --- |
//! | [`config`] | `pd-server` configuration (TOML + flags) |
//! | [`raft_node`] | PD's own raft group (raft-rs over RocksDB), one driver thread |
//! | [`state`] | the replicated state machine: stores, regions, id/TSO marks, GC safe point |
//! | [`cluster`] | the leader's view and the PD API operations |
//! | [`tso`], [`id`] | timestamps and ids, safe across leader changes |
//! | [`schedule`] | checkers and schedulers as pure functions, operators, the coordinator |
//! | [`service`], [`peer`] | gRPC: the PD API, and PD-to-PD raft |
//! | [`server`] | wiring and lifecycle |
//!
//! Invariants: only a leader that has committed an entry of its term serves; timestamps
//! only grow (a window ahead is persisted before use); ids are never reused (a high-water
//! mark ahead is persisted before use); region metadata only moves forward in epoch.

pub mod cluster;
pub mod config;
pub mod id;
pub mod peer;
pub mod raft_node;
pub mod schedule;
pub mod server;
pub mod service;
pub mod state;
pub mod tso;

pub use config::PdConfig;
pub use server::{run, PdServer};
