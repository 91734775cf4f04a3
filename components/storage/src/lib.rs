//! Request semantics on one store: every key is MVCC (Percolator) data, reached through the
//! raftstore's regions. The storage node's gRPC service is a thin shell over [`Storage`]; the
//! etcd API builds on it too.
//!
//! | module | owns |
//! | --- | --- |
//! | [`storage`] | [`Storage`] itself and what every command shares: validation, linearizable and leader snapshots, the rule for answers that write nothing (`decide_on_leader`), proposals, timestamps |
//! | [`read`] | plain reads at a timestamp |
//! | [`write`] | plain writes in one phase, compare-and-swap, delete-range, splits |
//! | [`txn`] | Percolator commands |
//! | [`atomic`] | atomic commands on one region at one timestamp (etcd's Put, DeleteRange, Txn) |
//! | [`etcd`] | etcd's KV on one region (range with metadata; put, delete-range and txn as one atomic command), and etcd's semantics in [`etcd::eval`] |
//! | [`changes`] | the change feed's leader side: changes of a range since a version, complete up to a resolved version (etcd's Watch) |
//! | [`gc`] | collecting versions below PD's safe point |
//! | [`config`] | the `[storage]` configuration |
//!
//! Invariants:
//!
//! - **Reads** at a timestamp raise `max_ts` first, wait out in-memory locks of one-phase
//!   writes in flight, then read a linearizable snapshot (ReadIndex on the leader). A read at
//!   version 0 reads the latest committed data.
//! - **Plain writes** (put, delete, compare-and-swap, delete-range) commit in one phase on the
//!   leader: under per-key latches and in-memory locks, at `commit_ts = start_ts + 1` (which
//!   the client reserved from PD with the start timestamp) when that is above `max_ts` and the
//!   keys' newest versions, else at a fresh timestamp from PD: so no read already served at
//!   a timestamp misses them, no two commands anywhere share a commit timestamp, and every
//!   commit timestamp was handed out by PD before the commit was chosen (no later timestamp
//!   from PD is below it). The same holds for atomic (etcd) commands.
//!   A write carries a unique start timestamp; a retry of an applied write is recognised and
//!   answered without applying it twice.
//! - **Transaction commands** (prewrite, commit, ...) run the `atoll-txn` actions under latches
//!   on a leader snapshot and propose the resulting mutations through raft.
//! - A new leader fetches a fresh timestamp into `max_ts` before its first one-phase commit.
//! - **GC** drops versions below PD's safe point in bounded batches, leader by leader.

pub mod atomic;
pub mod changes;
pub mod config;
pub mod etcd;
pub mod gc;
pub mod lease;
pub mod read;
pub mod storage;
pub mod txn;
pub mod write;

pub use atomic::{Atomic, AtomicView, AtomicWrite};
pub use config::StorageConfig;
pub use storage::{abort, Fail, Permit, Storage, FP_AFTER_WRITE_APPLIED, FP_BEFORE_PLAIN_WRITE};

#[cfg(test)]
mod tests;
