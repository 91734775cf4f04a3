//! atoll-txn: Percolator transactions over MVCC, on any [`atoll_engine::KvEngine`].
//!
//! | module | owns | invariants |
//! | --- | --- | --- |
//! | [`types`] | [`Lock`], [`Write`], [`Modify`], their versioned binary encodings, key helpers | a decoder rejects unknown versions, flags and trailing bytes ([`Error::Codec`]); values over [`SHORT_VALUE_MAX_LEN`] bytes live in `CF_DEFAULT`, shorter ones inline |
//! | [`errors`] | [`Error`], [`Result`], the single mapping to `kvrpcpb::KeyError` | variants carry keys and timestamps; typed protocol fields where the protocol has them |
//! | [`txn`] | [`MvccTxn`]: the mutations one command buffers | actions never write the engine directly; one-phase locks never reach `CF_LOCK` |
//! | [`reader`] | [`MvccReader`]: point reads, scans, lock and commit-record lookups on a snapshot | a read at `ts` sees the newest `Put`/`Delete` with `commit_ts <= ts`, after the lock rule (see the module) |
//! | [`actions`] | prewrite, commit, rollback/cleanup, check_txn_status, check_secondary_locks, resolve_lock, heart beat, pessimistic locks, plain writes | a transaction's fate is decided on its primary key; every rollback leaves a record (or an overlapped-rollback flag) at `start_ts` |
//! | [`gc`] | removal of versions below a safe point, in bounded passes | a read at the safe point or above returns the same before and after any pass |
//! | [`concurrency`] | [`ConcurrencyManager`]: `max_ts` and in-memory locks of writes in flight | writers lock keys in memory before reading `max_ts`; readers raise `max_ts` before checking memory locks and before taking their snapshot |
//! | [`latch`] | [`Latches`]: per-key serialization of write commands | slots taken in ascending order (no deadlock), FIFO per slot, released on drop |
//!
//! Storage layout (TiKV's): `CF_LOCK`: `data_key(k)` -> [`Lock`]; `CF_WRITE`:
//! `append_ts(data_key(k), commit_ts)` -> [`Write`] (rollbacks at `commit_ts == start_ts`);
//! `CF_DEFAULT`: `append_ts(data_key(k), start_ts)` -> long values. Timestamps are
//! `physical_ms << 18 | logical`; `u64::MAX` as a read timestamp means "latest".
//!
//! How a command runs: take [`Latches`] on its keys, take a snapshot, build an [`MvccReader`]
//! and an [`MvccTxn`] for the transaction, run the [`actions`] for each key, then apply
//! `txn.into_modifies()` atomically (through raft) and release the latches.

#![warn(missing_docs)]

pub mod actions;
pub mod concurrency;
pub mod errors;
pub mod gc;
pub mod latch;
pub mod reader;
pub mod txn;
pub mod types;

#[cfg(test)]
mod test_util;

pub use actions::{
    acquire_pessimistic_lock, check_secondary_locks, check_txn_status, cleanup, commit,
    data_predecessor, pessimistic_rollback, plain_write, prewrite, prewrite_with_lease,
    resolve_lock, rollback, txn_heart_beat, PrewriteParams, SecondaryLocksStatus, TxnStatus,
};
pub use concurrency::{ConcurrencyManager, MemoryLockGuard};
pub use errors::{Error, Result};
pub use gc::gc_key_range;
pub use latch::{LatchGuard, Latches};
pub use reader::{MvccReader, TxnCommitRecord};
pub use txn::MvccTxn;
pub use types::{
    compose_ts, physical, KeyMeta, Lock, LockType, Modify, Write, WriteType, SHORT_VALUE_MAX_LEN,
};
