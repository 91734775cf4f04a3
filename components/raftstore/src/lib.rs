//! The batched Multi-Raft store: many regions (raft groups) over one engine and one transport.
//!
//! | module | owns |
//! | --- | --- |
//! | [`batch`] | the batch system: FSMs, mailboxes, a fixed pool of pollers |
//! | [`store`] | wiring: pollers, workers, the store thread, the ticker; [`RaftRouter`] |
//! | [`fsm_peer`] | a region's peer as an FSM; the raft poller (one synced write per round) |
//! | [`peer`] | the raft side of a peer: proposals, ReadIndex, hibernation, the Ready cycle |
//! | [`storage`] | raft-rs `Storage` over the engine: log, states, entry cache |
//! | [`apply`] | the apply side: committed entries become batched engine writes; admin commands |
//! | [`snap`] | snapshot files: build, verify, apply |
//! | [`worker`] | region worker (snapshots) and split checker threads |
//! | [`pd_worker`] | everything the store says to PD and what PD says back |
//! | [`meta`] | `StoreMeta`: region ranges, read delegates, parked messages |
//! | [`liveness`] | when each other store was last heard from; down/up transitions |
//! | [`transport`] | what the raftstore needs from the network |
//! | [`msg`] | messages and callbacks |
//! | [`config`], [`errors`], [`metrics`], [`failpoints`], [`util`] | the rest |
//!
//! Invariants:
//! - raft entries and hard states of one poll round are persisted with **one** synced write
//!   before any message that depends on them is sent, and before their commit is applied;
//! - the apply side writes data and the applied index atomically (unsynced: the raft log is
//!   the durable record);
//! - a region's peers never overlap on one store: a peer for a new range is created only when
//!   no local region covers any of it;
//! - no thread, task or timer exists per region; idle regions hibernate (no ticks).

pub mod apply;
pub mod batch;
pub mod config;
pub mod errors;
pub mod failpoints;
pub mod fsm_peer;
pub mod liveness;
pub mod meta;
pub mod metrics;
pub mod msg;
pub mod pd_worker;
pub mod peer;
pub mod snap;
pub mod storage;
pub mod store;
#[cfg(test)]
pub(crate) mod test_support;
pub mod transport;
pub mod util;
pub mod worker;

pub use config::Config;
pub use errors::{Error, Result};
pub use msg::{RegionSnapshot, WriteResponse};
pub use store::{RaftRouter, RaftStore, StoreDeps};
pub use transport::Transport;
