//! The batched Multi-Raft store: many regions (raft groups) over one engine and one transport.
//!
//! Crate map, from the leaves up (a module's `use crate::` lines name only modules above it in
//! this table; `docs/design/write-path.md` draws the graph):
//!
//! | module | owns |
//! | --- | --- |
//! | [`config`], [`errors`], [`failpoints`], [`metrics`], [`ids`] | settings, errors, failpoint names, metrics, id newtypes |
//! | [`util`] | regions, epochs, keys: the one reading of a region's end bound |
//! | [`observer`] | the hook a change feed hangs on the apply side ([`observer::ApplyObserver`]) |
//! | [`transport`] | what the raftstore needs from the network |
//! | [`liveness`] | when each other store was last heard from; down/up transitions |
//! | [`batch`] | the batch system: FSMs, mailboxes, a fixed pool of pollers |
//! | [`msg`] | messages between the parts of a store, and the callbacks that answer requests |
//! | [`meta`] | `StoreMeta`: region ranges, read delegates and leases, parked messages |
//! | [`snap`] | snapshot files: build, verify, apply |
//! | [`raft::storage`] | raft-rs `Storage` over the engine: log, states, entry cache; the one place raft state is written and deleted |
//! | [`raft::peer`] | a peer's raft state: `RawNode`, proposals, reads, bookkeeping (state only) |
//! | [`task`] | the task enums of the workers (`RegionTask`, `SplitCheckMsg`, `PdTask`) |
//! | [`fsm::peer`], [`fsm::apply`] | the raft side and the apply side of a region as FSMs (state only) |
//! | [`fsm::context`] | `StoreContext`: what every thread of a store shares |
//! | [`fsm::apply_poller`] | the apply poller: one unsynced write per round, then callbacks |
//! | [`operation::query`] | ReadIndex reads, the leader lease, read delegates |
//! | [`operation::hibernation`] | ticks; idle regions sleeping and waking |
//! | [`operation::ready`] | the Ready cycle around the round's one write; apply flow control |
//! | [`operation::log_gc`] | raft log compaction, proposed, applied, deleted |
//! | [`operation::life`] | peer creation and registration, staleness, destroy |
//! | [`operation::snapshot`] | received snapshots accepted, applied, retried; generation |
//! | [`operation::split`] | split checks, the one split-key rule, proposing and applying splits |
//! | [`operation::command`] | proposing commands; executing writes on the apply side |
//! | [`operation::conf_change`] | membership changes, proposed and applied; change type mappings |
//! | [`operation::pd_report`] | region heartbeats, membership checks, PD's operator steps |
//! | [`fsm::raft_poller`] | the raft poller: dispatch, one synced write per round, then sends and apply |
//! | [`worker::region`], [`worker::split_check`], [`worker::pd`] | snapshot, split-check and PD workers |
//! | [`router`] | [`RaftRouter`], the handle the rest of the node uses to reach regions |
//! | [`bootstrap`] | store identity, data format, the first region's states |
//! | [`fsm::store`] | wiring: pollers, workers, the store thread, the ticker ([`RaftStore`]) |
//! | `test_support`, `tests` (tests only) | a store over the memory engine with a recording transport, driven round by round by hand; the unit tests of the core |
//!
//! The `operation` modules add behaviour to the state types of `raft::peer`, `fsm::peer` and
//! `fsm::apply` in `impl` blocks of their own; calling a method needs no `use`, so the feature
//! modules call each other's methods without import edges between them.
//!
//! Invariants:
//! - raft entries and hard states of one poll round are persisted with **one** synced write
//!   before any message that depends on them is sent, and before their commit is applied;
//! - the apply side writes data and the applied index atomically (unsynced: the raft log is
//!   the durable record);
//! - a region's peers never overlap on one store: a peer for a new range is created only when
//!   no local region covers any of it;
//! - no thread, task or timer exists per region; idle regions hibernate (no ticks).

pub mod batch;
pub mod bootstrap;
pub mod config;
pub mod errors;
pub mod failpoints;
pub mod fsm;
pub mod ids;
pub mod liveness;
pub mod meta;
pub mod metrics;
pub mod msg;
pub mod observer;
pub mod operation;
pub mod raft;
pub mod router;
pub mod snap;
pub mod task;
#[cfg(test)]
pub(crate) mod test_support;
#[cfg(test)]
mod tests;
pub mod transport;
pub mod util;
pub mod worker;

pub use config::Config;
pub use errors::{Error, Result};
pub use fsm::store::{RaftStore, StoreDeps};
pub use ids::{PeerId, RegionId, StoreId};
pub use msg::{RegionSnapshot, WriteResponse};
pub use router::RaftRouter;
pub use transport::Transport;
