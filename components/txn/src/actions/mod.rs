//! Percolator actions: each reads one key through an [`MvccReader`] and buffers its effect in
//! an [`MvccTxn`] (on behalf of transaction `txn.start_ts`). A command runs several actions over
//! one snapshot, under latches on its keys, then applies `txn.into_modifies()` atomically.
//!
//! Rules kept here (TiKV's semantics):
//! - A transaction's fate is decided on its primary key: a commit record there means committed,
//!   a rollback record (or an overlapped rollback) means rolled back.
//! - A rollback leaves a record at `commit_ts == start_ts` so that a late prewrite of the same
//!   transaction fails. Unprotected rollbacks may be collapsed (deleted) when a newer rollback is
//!   written on the key; protected ones (written when the lock is missing, or for the primary of a
//!   pessimistic transaction) are kept until GC.
//! - If another transaction's write already sits where the rollback record would go, the
//!   rollback is recorded as a flag on that write (`has_overlapped_rollback`), or, while a lock of
//!   another transaction is on the key, in that lock's `rollback_ts` to be carried at its commit.
//! - Pessimistic locks never commit: prewrite converts them; commit refuses them.

use atoll_engine::Snapshot;
use atoll_proto::kvrpcpb::{Action, LockInfo, Op};

use crate::errors::{Error, Result};
use crate::reader::{MvccReader, TxnCommitRecord};
use crate::txn::MvccTxn;
use crate::types::{is_short_value, Lock, LockType, Write, WriteType};

/// Failpoint hit at the start of [`prewrite`]; configured with a message, it fails the prewrite
/// with [`Error::Other`].
pub const FP_PREWRITE: &str = "txn::prewrite";
/// Failpoint hit at the start of [`commit`]; configured with a message, it fails the commit with
/// [`Error::Other`].
pub const FP_COMMIT: &str = "txn::commit";

/// What a prewrite knows about its transaction (shared by all its mutations).
#[derive(Clone, Debug, Default)]
pub struct PrewriteParams {
    /// The primary key.
    pub primary: Vec<u8>,
    /// The transaction's start timestamp (must equal `txn.start_ts`).
    pub start_ts: u64,
    /// Lock TTL in ms.
    pub lock_ttl: u64,
    /// Number of keys in the transaction.
    pub txn_size: u64,
    /// Non-zero for a pessimistic transaction.
    pub for_update_ts: u64,
    /// Async commit: the primary lock lists the secondaries and the transaction is committed
    /// once every lock is written, at the maximum of their `min_commit_ts`.
    pub use_async_commit: bool,
    /// Async commit: the secondary keys (stored on the primary lock only).
    pub secondaries: Vec<Vec<u8>>,
    /// Lower bound for the locks' `min_commit_ts`. For async commit and one-phase commit the
    /// caller must fold in `ConcurrencyManager::max_ts() + 1`, read after locking the keys in
    /// memory (see `concurrency.rs`).
    pub min_commit_ts: u64,
    /// Async commit / one-phase commit: fail with [`Error::CommitTsTooLarge`] if the computed
    /// `min_commit_ts` exceeds this (0 = no limit).
    pub max_commit_ts: u64,
    /// One-phase commit: keep the locks in the `MvccTxn` instead of `CF_LOCK`; the caller then
    /// calls `MvccTxn::commit_one_pc` at the maximum returned `min_commit_ts`.
    pub one_pc: bool,
}

impl PrewriteParams {
    fn is_pessimistic(&self) -> bool {
        self.for_update_ts != 0
    }
}

fn check_start_ts(txn: &MvccTxn, start_ts: u64) -> Result<()> {
    if txn.start_ts != start_ts {
        return Err(Error::Other(format!(
            "MvccTxn of txn {} used for txn {start_ts}",
            txn.start_ts
        )));
    }
    Ok(())
}

fn write_conflict(
    start_ts: u64,
    key: &[u8],
    primary: &[u8],
    commit_ts: u64,
    write: &Write,
) -> Error {
    Error::WriteConflict {
        start_ts,
        conflict_start_ts: write.start_ts,
        conflict_commit_ts: commit_ts,
        key: key.to_vec(),
        primary: primary.to_vec(),
    }
}

/// Prewrites one mutation `(op, key, value)` of transaction `params.start_ts`.
///
/// Returns this key's `min_commit_ts` for async-commit and one-phase prewrites (0 otherwise).
/// - A lock of another transaction: [`Error::KeyIsLocked`] (or [`Error::PessimisticLockNotFound`]
///   when `is_pessimistic_lock`).
/// - Our own prewrite lock already there: idempotent success.
/// - Our own pessimistic lock: converted (required when `is_pessimistic_lock`).
/// - Keys not pessimistically locked are checked for newer writes: a write committed after
///   `start_ts`, or our own rollback, is a [`Error::WriteConflict`]; our own commit record
///   means the prewrite is a late duplicate: [`Error::Committed`] (callers may treat it as
///   success).
/// - `Op::CheckNotExists` writes nothing and fails with [`Error::AlreadyExist`] on a live value.
pub fn prewrite<S: Snapshot>(
    txn: &mut MvccTxn,
    reader: &MvccReader<S>,
    params: &PrewriteParams,
    mutation: (Op, &[u8], &[u8]),
    is_pessimistic_lock: bool,
) -> Result<u64> {
    prewrite_with_lease(txn, reader, params, mutation, 0, is_pessimistic_lock)
}

/// [`prewrite`] of a `Put` that attaches the key to `lease` (etcd's leases) when it commits.
pub fn prewrite_with_lease<S: Snapshot>(
    txn: &mut MvccTxn,
    reader: &MvccReader<S>,
    params: &PrewriteParams,
    mutation: (Op, &[u8], &[u8]),
    lease: u64,
    is_pessimistic_lock: bool,
) -> Result<u64> {
    fail::fail_point!(FP_PREWRITE, |msg| Err(Error::Other(format!(
        "failpoint {FP_PREWRITE}: {}",
        msg.unwrap_or_default()
    ))));
    let (op, key, value) = mutation;
    let start_ts = params.start_ts;
    check_start_ts(txn, start_ts)?;
    let lock_type = match op {
        Op::Put => Some(LockType::Put),
        Op::Del => Some(LockType::Delete),
        Op::Lock => Some(LockType::Lock),
        Op::CheckNotExists => None,
        Op::Rollback | Op::PessimisticLock => {
            return Err(Error::Other(format!("op {op:?} cannot be prewritten")))
        }
    };
    if is_pessimistic_lock && !params.is_pessimistic() {
        return Err(Error::Other(format!(
            "txn {start_ts}: pessimistic lock expected in an optimistic prewrite"
        )));
    }
    if lock_type.is_none() && params.is_pessimistic() {
        return Err(Error::Other(
            "CheckNotExists is not supported in a pessimistic prewrite".into(),
        ));
    }

    let mut ttl = params.lock_ttl;
    let mut min_commit_ts = params.min_commit_ts;
    let mut rollback_ts = Vec::new();
    let mut has_pessimistic_lock = false;
    match reader.load_lock(key)? {
        Some(lock) if lock.start_ts != start_ts => {
            if is_pessimistic_lock {
                return Err(Error::PessimisticLockNotFound {
                    start_ts,
                    key: key.to_vec(),
                });
            }
            return Err(Error::KeyIsLocked(lock.into_lock_info(key.to_vec())));
        }
        Some(lock) if lock.lock_type == LockType::Pessimistic => {
            if !params.is_pessimistic() {
                return Err(Error::LockTypeNotMatch {
                    start_ts,
                    key: key.to_vec(),
                    pessimistic: true,
                });
            }
            // TTL and min_commit_ts may have been pushed since the lock was taken.
            ttl = ttl.max(lock.ttl);
            min_commit_ts = min_commit_ts.max(lock.min_commit_ts);
            rollback_ts = lock.rollback_ts;
            has_pessimistic_lock = true;
        }
        Some(lock) => {
            // Already prewritten: a duplicate request.
            if params.one_pc {
                return Err(Error::Other(format!(
                    "txn {start_ts}: one-phase prewrite found its own two-phase lock on {key:?}"
                )));
            }
            return Ok(if lock.use_async_commit {
                lock.min_commit_ts
            } else {
                0
            });
        }
        None if is_pessimistic_lock => {
            if let Some(commit_ts) = reader.get_txn_commit_record(key, start_ts)?.committed_ts() {
                return Err(Error::Committed {
                    start_ts,
                    commit_ts,
                    key: key.to_vec(),
                });
            }
            return Err(Error::PessimisticLockNotFound {
                start_ts,
                key: key.to_vec(),
            });
        }
        None => {}
    }

    if !has_pessimistic_lock {
        check_for_newer_version(reader, params, key)?;
    }

    let needs_min_commit_ts = params.use_async_commit || params.one_pc;
    let final_min_commit_ts = if needs_min_commit_ts {
        let m = min_commit_ts
            .max(start_ts.saturating_add(1))
            .max(params.for_update_ts.saturating_add(1));
        if params.max_commit_ts != 0 && m > params.max_commit_ts {
            return Err(Error::CommitTsTooLarge {
                start_ts,
                min_commit_ts: m,
                max_commit_ts: params.max_commit_ts,
            });
        }
        m
    } else {
        min_commit_ts.max(start_ts.saturating_add(1))
    };

    let Some(lock_type) = lock_type else {
        // CheckNotExists: a read, nothing to write.
        if let Some((commit_ts, _)) = reader.get_write(key, u64::MAX)? {
            tracing::debug!(start_ts, commit_ts, "check-not-exists found a live value");
            return Err(Error::AlreadyExist { key: key.to_vec() });
        }
        return Ok(if needs_min_commit_ts {
            final_min_commit_ts
        } else {
            0
        });
    };

    let mut lock = Lock::new(lock_type, params.primary.clone(), start_ts, ttl);
    lock.for_update_ts = params.for_update_ts;
    lock.txn_size = params.txn_size;
    lock.min_commit_ts = final_min_commit_ts;
    lock.rollback_ts = rollback_ts;
    if lock_type == LockType::Put {
        lock.lease = lease;
    }
    if params.use_async_commit {
        lock.use_async_commit = true;
        if key == params.primary.as_slice() {
            lock.secondaries = params.secondaries.clone();
        }
    }
    if lock_type == LockType::Put {
        if is_short_value(value) {
            lock.short_value = Some(value.to_vec());
        } else {
            txn.put_value(key, start_ts, value.to_vec());
        }
    }

    if params.one_pc {
        if has_pessimistic_lock {
            txn.unlock(key);
        }
        txn.put_one_pc_lock(key.to_vec(), lock);
    } else {
        txn.put_lock(key, &lock);
    }
    Ok(if needs_min_commit_ts {
        final_min_commit_ts
    } else {
        0
    })
}

/// Conflict check of a key that is not protected by our pessimistic lock.
fn check_for_newer_version<S: Snapshot>(
    reader: &MvccReader<S>,
    params: &PrewriteParams,
    key: &[u8],
) -> Result<()> {
    let start_ts = params.start_ts;
    let Some((commit_ts, write)) = reader.seek_write(key, u64::MAX)? else {
        return Ok(());
    };
    if commit_ts > start_ts {
        // A late duplicate of a prewrite whose transaction has since committed?
        if let Some(own) = reader.get_txn_commit_record(key, start_ts)?.committed_ts() {
            return Err(Error::Committed {
                start_ts,
                commit_ts: own,
                key: key.to_vec(),
            });
        }
        return Err(write_conflict(
            start_ts,
            key,
            &params.primary,
            commit_ts,
            &write,
        ));
    }
    if commit_ts == start_ts
        && (write.write_type == WriteType::Rollback || write.has_overlapped_rollback)
    {
        // We were rolled back here: the prewrite must not succeed.
        return Err(write_conflict(
            start_ts,
            key,
            &params.primary,
            commit_ts,
            &write,
        ));
    }
    Ok(())
}

/// Commits `key` of transaction `txn.start_ts` at `commit_ts`.
///
/// Needs the transaction's lock; without it, an existing commit record makes this an
/// idempotent success, otherwise [`Error::TxnLockNotFound`]. `commit_ts` below the lock's
/// `min_commit_ts` is [`Error::CommitTsExpired`]; a pessimistic lock (never prewritten) is
/// [`Error::LockTypeNotMatch`].
pub fn commit<S: Snapshot>(
    txn: &mut MvccTxn,
    reader: &MvccReader<S>,
    key: &[u8],
    commit_ts: u64,
) -> Result<()> {
    fail::fail_point!(FP_COMMIT, |msg| Err(Error::Other(format!(
        "failpoint {FP_COMMIT}: {}",
        msg.unwrap_or_default()
    ))));
    let start_ts = txn.start_ts;
    match reader.load_lock(key)? {
        Some(lock) if lock.start_ts == start_ts => {
            let Some(write_type) = lock.lock_type.to_write_type() else {
                return Err(Error::LockTypeNotMatch {
                    start_ts,
                    key: key.to_vec(),
                    pessimistic: true,
                });
            };
            if commit_ts < lock.min_commit_ts || commit_ts <= start_ts {
                return Err(Error::CommitTsExpired {
                    start_ts,
                    commit_ts,
                    key: key.to_vec(),
                    min_commit_ts: lock.min_commit_ts.max(start_ts + 1),
                });
            }
            let prev = data_predecessor(reader, key, write_type)?;
            let mut write = Write::new(write_type, start_ts, lock.short_value).with_meta(
                prev.as_ref(),
                commit_ts,
                lock.lease,
            );
            write.has_overlapped_rollback = lock.rollback_ts.contains(&commit_ts);
            txn.put_write(key, commit_ts, &write);
            txn.unlock(key);
            Ok(())
        }
        _ => match reader.get_txn_commit_record(key, start_ts)?.committed_ts() {
            Some(_) => Ok(()),
            None => Err(Error::TxnLockNotFound {
                start_ts,
                commit_ts,
                key: key.to_vec(),
            }),
        },
    }
}

/// Rolls back `key` of transaction `txn.start_ts` (no TTL check): see [`cleanup`].
pub fn rollback<S: Snapshot>(
    txn: &mut MvccTxn,
    reader: &MvccReader<S>,
    key: &[u8],
    protect: bool,
) -> Result<()> {
    cleanup(txn, reader, key, 0, protect)
}

/// Rolls back `key` of transaction `txn.start_ts`: removes its lock (and long value) and leaves
/// a rollback record, protected if `protect` (or if the key is the primary of a pessimistic
/// transaction). With `current_ts != 0`, a lock whose TTL has not expired at `current_ts` is
/// left alone and reported as [`Error::KeyIsLocked`].
///
/// Already rolled back: success. Committed: [`Error::Committed`]. No lock and no record: a
/// rollback record is written anyway so that a late prewrite fails.
pub fn cleanup<S: Snapshot>(
    txn: &mut MvccTxn,
    reader: &MvccReader<S>,
    key: &[u8],
    current_ts: u64,
    protect: bool,
) -> Result<()> {
    let start_ts = txn.start_ts;
    match reader.load_lock(key)? {
        Some(lock) if lock.start_ts == start_ts => {
            if current_ts != 0 && !lock.is_expired(current_ts) {
                return Err(Error::KeyIsLocked(lock.into_lock_info(key.to_vec())));
            }
            rollback_lock(txn, reader, key, &lock, protect, !protect)
        }
        other => match rollback_missing_lock(txn, reader, key, other, protect)? {
            MissingLock::Committed(commit_ts) => Err(Error::Committed {
                start_ts,
                commit_ts,
                key: key.to_vec(),
            }),
            MissingLock::RolledBack | MissingLock::RollbackWritten => Ok(()),
        },
    }
}

/// Removes `lock` (of `txn.start_ts`, on `key`) and records the rollback.
fn rollback_lock<S: Snapshot>(
    txn: &mut MvccTxn,
    reader: &MvccReader<S>,
    key: &[u8],
    lock: &Lock,
    protect: bool,
    collapse: bool,
) -> Result<()> {
    let start_ts = txn.start_ts;
    let overlapped_write = match reader.get_txn_commit_record(key, start_ts)? {
        TxnCommitRecord::None { overlapped_write } => overlapped_write,
        TxnCommitRecord::SingleRecord { commit_ts, write }
            if write.write_type != WriteType::Rollback =>
        {
            return Err(Error::Other(format!(
                "txn {start_ts} has both a lock and a commit record (at {commit_ts}) on {key:?}"
            )));
        }
        // Already rolled back: only the lock is left to remove.
        _ => {
            txn.unlock(key);
            return Ok(());
        }
    };
    if lock.lock_type == LockType::Put && lock.short_value.is_none() {
        txn.delete_value(key, start_ts);
    }
    let protected = protect || (lock.is_pessimistic_txn() && key == lock.primary.as_slice());
    write_rollback(txn, key, start_ts, protected, overlapped_write);
    if collapse {
        collapse_prev_rollback(txn, reader, key, start_ts)?;
    }
    txn.unlock(key);
    Ok(())
}

/// Writes the rollback record of `start_ts`, or marks the overlapped write when one occupies
/// its key (only needed when protected: an unprotected rollback may simply be dropped).
fn write_rollback(
    txn: &mut MvccTxn,
    key: &[u8],
    start_ts: u64,
    protected: bool,
    overlapped_write: Option<Write>,
) {
    match overlapped_write {
        Some(mut write) => {
            if protected && !write.has_overlapped_rollback {
                write.has_overlapped_rollback = true;
                txn.put_write(key, start_ts, &write);
            }
        }
        None => txn.put_write(key, start_ts, &Write::new_rollback(start_ts, protected)),
    }
}

/// Deletes the newest rollback record below `start_ts` if it is not protected.
fn collapse_prev_rollback<S: Snapshot>(
    txn: &mut MvccTxn,
    reader: &MvccReader<S>,
    key: &[u8],
    start_ts: u64,
) -> Result<()> {
    if let Some((commit_ts, write)) = reader.seek_write(key, start_ts.saturating_sub(1))? {
        if write.write_type == WriteType::Rollback && !write.is_protected() {
            txn.delete_write(key, commit_ts);
        }
    }
    Ok(())
}

enum MissingLock {
    Committed(u64),
    RolledBack,
    RollbackWritten,
}

/// The transaction's lock is not on `key` (`other` is whatever lock is): decide from the commit
/// record, writing a rollback record when there is none.
fn rollback_missing_lock<S: Snapshot>(
    txn: &mut MvccTxn,
    reader: &MvccReader<S>,
    key: &[u8],
    other: Option<Lock>,
    protect: bool,
) -> Result<MissingLock> {
    let start_ts = txn.start_ts;
    match reader.get_txn_commit_record(key, start_ts)? {
        TxnCommitRecord::SingleRecord { commit_ts, write } => {
            if write.write_type == WriteType::Rollback {
                Ok(MissingLock::RolledBack)
            } else {
                Ok(MissingLock::Committed(commit_ts))
            }
        }
        TxnCommitRecord::OverlappedRollback { .. } => Ok(MissingLock::RolledBack),
        TxnCommitRecord::None { overlapped_write } => {
            if !protect {
                collapse_prev_rollback(txn, reader, key, start_ts)?;
            }
            if let (Some(mut lock), None, true) = (other, overlapped_write.as_ref(), protect) {
                // The lock holder might later commit exactly at our start_ts, overwriting our
                // rollback record: make it carry the rollback.
                if !lock.rollback_ts.contains(&start_ts) {
                    lock.rollback_ts.push(start_ts);
                    txn.put_lock(key, &lock);
                }
            }
            write_rollback(txn, key, start_ts, protect, overlapped_write);
            Ok(MissingLock::RollbackWritten)
        }
    }
}

/// The state of a transaction as seen on its primary key.
#[derive(Clone, Debug, PartialEq)]
pub enum TxnStatus {
    /// Still locked (alive, or async commit which is resolved via its secondaries).
    Locked {
        /// The lock's TTL (ms).
        ttl: u64,
        /// The primary lock.
        lock_info: LockInfo,
        /// The lock's `min_commit_ts` (after any push).
        min_commit_ts: u64,
        /// Whether the caller may now ignore the transaction's locks (its `min_commit_ts` is
        /// above `caller_start_ts`, or the caller reads at `u64::MAX`).
        min_commit_ts_pushed: bool,
    },
    /// Committed.
    Committed {
        /// Its commit timestamp.
        commit_ts: u64,
    },
    /// Already rolled back.
    RolledBack,
    /// The lock's TTL had expired; it was rolled back now.
    TtlExpire,
    /// No lock and no record: a protected rollback record was written now.
    LockNotExistRollback,
}

impl TxnStatus {
    /// The protocol's description of what check_txn_status did.
    pub fn action(&self) -> Action {
        match self {
            TxnStatus::Locked {
                min_commit_ts_pushed: true,
                ..
            } => Action::MinCommitTsPushed,
            TxnStatus::TtlExpire => Action::TtlExpireRollback,
            TxnStatus::LockNotExistRollback => Action::LockNotExistRollback,
            _ => Action::NoAction,
        }
    }
}

/// Checks transaction `lock_ts` (which must equal `txn.start_ts`) on its primary key, on behalf
/// of a reader or writer (`caller_start_ts`, 0 = none) that met one of its locks.
///
/// - Lock present, TTL expired at `current_ts` (and not async commit): rolled back now
///   ([`TxnStatus::TtlExpire`]).
/// - Lock present and alive: if `caller_start_ts` is set (not `u64::MAX`) and the lock is not
///   async commit, its `min_commit_ts` is pushed above `caller_start_ts` (and to at least
///   `current_ts`) so that the caller need not wait.
/// - Lock absent: the commit record decides; with none, `rollback_if_not_exist` writes a
///   protected rollback ([`TxnStatus::LockNotExistRollback`]), otherwise [`Error::TxnNotFound`].
///
/// The caller should first raise the concurrency manager's `max_ts` to `lock_ts` so that no
/// one-phase or async commit can later pick the rolled back start_ts as its commit_ts.
pub fn check_txn_status<S: Snapshot>(
    txn: &mut MvccTxn,
    reader: &MvccReader<S>,
    primary_key: &[u8],
    lock_ts: u64,
    caller_start_ts: u64,
    current_ts: u64,
    rollback_if_not_exist: bool,
) -> Result<TxnStatus> {
    check_start_ts(txn, lock_ts)?;
    match reader.load_lock(primary_key)? {
        Some(mut lock) if lock.start_ts == lock_ts => {
            if lock.use_async_commit {
                // Async-commit transactions are resolved with check_secondary_locks.
                return Ok(locked_status(lock, primary_key, false));
            }
            if lock.is_expired(current_ts) {
                rollback_lock(txn, reader, primary_key, &lock, false, true)?;
                return Ok(TxnStatus::TtlExpire);
            }
            if caller_start_ts != 0
                && caller_start_ts != u64::MAX
                && lock.min_commit_ts <= caller_start_ts
            {
                lock.min_commit_ts = (caller_start_ts + 1).max(current_ts);
                txn.put_lock(primary_key, &lock);
            }
            let pushed = caller_start_ts != 0
                && (caller_start_ts == u64::MAX || lock.min_commit_ts > caller_start_ts);
            Ok(locked_status(lock, primary_key, pushed))
        }
        other => match reader.get_txn_commit_record(primary_key, lock_ts)? {
            TxnCommitRecord::SingleRecord { commit_ts, write } => {
                if write.write_type == WriteType::Rollback {
                    Ok(TxnStatus::RolledBack)
                } else {
                    Ok(TxnStatus::Committed { commit_ts })
                }
            }
            TxnCommitRecord::OverlappedRollback { .. } => Ok(TxnStatus::RolledBack),
            TxnCommitRecord::None { .. } => {
                if !rollback_if_not_exist {
                    return Err(Error::TxnNotFound {
                        start_ts: lock_ts,
                        key: primary_key.to_vec(),
                    });
                }
                rollback_missing_lock(txn, reader, primary_key, other, true)?;
                Ok(TxnStatus::LockNotExistRollback)
            }
        },
    }
}

fn locked_status(lock: Lock, key: &[u8], pushed: bool) -> TxnStatus {
    TxnStatus::Locked {
        ttl: lock.ttl,
        min_commit_ts: lock.min_commit_ts,
        lock_info: lock.into_lock_info(key.to_vec()),
        min_commit_ts_pushed: pushed,
    }
}

/// The combined state of an async-commit transaction's secondaries.
#[derive(Clone, Debug, PartialEq)]
pub enum SecondaryLocksStatus {
    /// Every key checked is still locked by the transaction (its locks are listed).
    Locked(Vec<LockInfo>),
    /// Some key is committed at this timestamp: the whole transaction is.
    Committed(u64),
    /// Some key was not prewritten (it now carries a protected rollback) or was rolled back:
    /// the transaction can never commit.
    RolledBack,
}

/// Checks the secondary `keys` of async-commit transaction `start_ts` (which must equal
/// `txn.start_ts`; TiKV semantics):
/// a prewrite lock of the transaction is reported; a pessimistic lock of it (never prewritten)
/// is rolled back; with no lock, the commit record decides, and a key with no record gets a
/// protected rollback so that the transaction can never commit. Stops at the first key that
/// decides the outcome.
pub fn check_secondary_locks<S: Snapshot>(
    txn: &mut MvccTxn,
    reader: &MvccReader<S>,
    keys: &[Vec<u8>],
    start_ts: u64,
) -> Result<SecondaryLocksStatus> {
    check_start_ts(txn, start_ts)?;
    let mut locks = Vec::new();
    for key in keys {
        match reader.load_lock(key)? {
            Some(lock) if lock.start_ts == start_ts => {
                if lock.lock_type == LockType::Pessimistic {
                    rollback_lock(txn, reader, key, &lock, true, false)?;
                    return Ok(SecondaryLocksStatus::RolledBack);
                }
                locks.push(lock.into_lock_info(key.clone()));
            }
            other => match rollback_missing_lock(txn, reader, key, other, true)? {
                MissingLock::Committed(commit_ts) => {
                    return Ok(SecondaryLocksStatus::Committed(commit_ts))
                }
                MissingLock::RolledBack | MissingLock::RollbackWritten => {
                    return Ok(SecondaryLocksStatus::RolledBack)
                }
            },
        }
    }
    Ok(SecondaryLocksStatus::Locked(locks))
}

/// Resolves `key` for transaction `start_ts` (which must equal `txn.start_ts`) once its fate is
/// known: commits it at
/// `commit_ts`, or rolls it back when `commit_ts == 0`. A leftover pessimistic lock of a
/// committed transaction (a key it locked but never wrote) is simply removed.
pub fn resolve_lock<S: Snapshot>(
    txn: &mut MvccTxn,
    reader: &MvccReader<S>,
    key: &[u8],
    start_ts: u64,
    commit_ts: u64,
) -> Result<()> {
    check_start_ts(txn, start_ts)?;
    if commit_ts == 0 {
        return rollback(txn, reader, key, false);
    }
    if let Some(lock) = reader.load_lock(key)? {
        if lock.start_ts == txn.start_ts && lock.lock_type == LockType::Pessimistic {
            txn.unlock(key);
            return Ok(());
        }
    }
    commit(txn, reader, key, commit_ts)
}

/// Extends the TTL of transaction `start_ts`'s primary lock to `advise_ttl` if that is longer
/// (`start_ts` must equal `txn.start_ts`); returns the TTL in force. No lock of the transaction: [`Error::TxnNotFound`].
pub fn txn_heart_beat<S: Snapshot>(
    txn: &mut MvccTxn,
    reader: &MvccReader<S>,
    primary_key: &[u8],
    start_ts: u64,
    advise_ttl: u64,
) -> Result<u64> {
    check_start_ts(txn, start_ts)?;
    match reader.load_lock(primary_key)? {
        Some(mut lock) if lock.start_ts == txn.start_ts => {
            if lock.ttl < advise_ttl {
                lock.ttl = advise_ttl;
                txn.put_lock(primary_key, &lock);
            }
            Ok(lock.ttl)
        }
        _ => Err(Error::TxnNotFound {
            start_ts: txn.start_ts,
            key: primary_key.to_vec(),
        }),
    }
}

/// Takes a pessimistic lock on `key` for transaction `start_ts` (which must equal
/// `txn.start_ts`) at `for_update_ts`, with a TTL of `ttl` ms.
///
/// Another transaction's lock: [`Error::KeyIsLocked`]. Our own pessimistic lock: refreshed
/// (a larger `for_update_ts`/`ttl` wins). Our own prewrite lock: [`Error::LockTypeNotMatch`].
/// A write committed after `for_update_ts`: [`Error::WriteConflict`]. Our own rollback:
/// [`Error::PessimisticLockRolledBack`]. With `return_value`, returns the latest value.
#[allow(clippy::too_many_arguments)]
pub fn acquire_pessimistic_lock<S: Snapshot>(
    txn: &mut MvccTxn,
    reader: &MvccReader<S>,
    key: &[u8],
    primary: &[u8],
    start_ts: u64,
    for_update_ts: u64,
    ttl: u64,
    return_value: bool,
) -> Result<Option<Vec<u8>>> {
    check_start_ts(txn, start_ts)?;
    if for_update_ts < start_ts {
        return Err(Error::Other(format!(
            "for_update_ts {for_update_ts} below start_ts {start_ts}"
        )));
    }
    let read_value = |reader: &MvccReader<S>| -> Result<Option<Vec<u8>>> {
        if !return_value {
            return Ok(None);
        }
        match reader.get_write(key, u64::MAX)? {
            Some((_, w)) => Ok(Some(reader.load_data(key, &w)?)),
            None => Ok(None),
        }
    };
    if let Some(mut lock) = reader.load_lock(key)? {
        if lock.start_ts != start_ts {
            return Err(Error::KeyIsLocked(lock.into_lock_info(key.to_vec())));
        }
        if lock.lock_type != LockType::Pessimistic {
            return Err(Error::LockTypeNotMatch {
                start_ts,
                key: key.to_vec(),
                pessimistic: false,
            });
        }
        if for_update_ts > lock.for_update_ts || ttl > lock.ttl {
            lock.for_update_ts = lock.for_update_ts.max(for_update_ts);
            lock.ttl = lock.ttl.max(ttl);
            txn.put_lock(key, &lock);
        }
        return read_value(reader);
    }

    if let Some((commit_ts, write)) = reader.seek_write(key, u64::MAX)? {
        if commit_ts > for_update_ts {
            return Err(write_conflict(start_ts, key, primary, commit_ts, &write));
        }
        if commit_ts == start_ts
            && (write.write_type == WriteType::Rollback || write.has_overlapped_rollback)
        {
            return Err(Error::PessimisticLockRolledBack {
                start_ts,
                key: key.to_vec(),
            });
        }
        if commit_ts > start_ts {
            match reader.get_txn_commit_record(key, start_ts)? {
                r if r.is_rolled_back() => {
                    return Err(Error::PessimisticLockRolledBack {
                        start_ts,
                        key: key.to_vec(),
                    })
                }
                r => {
                    if let Some(own) = r.committed_ts() {
                        return Err(Error::Committed {
                            start_ts,
                            commit_ts: own,
                            key: key.to_vec(),
                        });
                    }
                }
            }
        }
    }

    let mut lock = Lock::new(LockType::Pessimistic, primary.to_vec(), start_ts, ttl);
    lock.for_update_ts = for_update_ts;
    txn.put_lock(key, &lock);
    read_value(reader)
}

/// Removes transaction `start_ts`'s pessimistic lock on `key` (`start_ts` must equal
/// `txn.start_ts`) if it was taken at or below `for_update_ts`; anything else is left alone
/// (success).
pub fn pessimistic_rollback<S: Snapshot>(
    txn: &mut MvccTxn,
    reader: &MvccReader<S>,
    key: &[u8],
    start_ts: u64,
    for_update_ts: u64,
) -> Result<()> {
    check_start_ts(txn, start_ts)?;
    if let Some(lock) = reader.load_lock(key)? {
        if lock.start_ts == txn.start_ts
            && lock.lock_type == LockType::Pessimistic
            && lock.for_update_ts <= for_update_ts
        {
            txn.unlock(key);
        }
    }
    Ok(())
}

/// A plain (non-transactional) write of `key` at `commit_ts`: `Some(value)` puts, `None`
/// deletes. Any lock on the key is [`Error::KeyIsLocked`].
///
/// The caller guarantees `commit_ts > reader.latest_commit_ts(key)` and `commit_ts >
/// txn.start_ts`, and that `txn.start_ts` is not the start_ts of another version of this key
/// (e.g. `commit_ts - 1`): a long value is stored in `CF_DEFAULT` at `txn.start_ts`.
pub fn plain_write<S: Snapshot>(
    txn: &mut MvccTxn,
    reader: &MvccReader<S>,
    key: &[u8],
    value: Option<Vec<u8>>,
    lease: u64,
    commit_ts: u64,
) -> Result<()> {
    if let Some(lock) = reader.load_lock(key)? {
        return Err(Error::KeyIsLocked(lock.into_lock_info(key.to_vec())));
    }
    let start_ts = txn.start_ts;
    if commit_ts <= start_ts {
        return Err(Error::Other(format!(
            "plain write: commit_ts {commit_ts} must exceed start_ts {start_ts}"
        )));
    }
    let write = match value {
        Some(v) if is_short_value(&v) => Write::new(WriteType::Put, start_ts, Some(v)),
        Some(v) => {
            txn.put_value(key, start_ts, v);
            Write::new(WriteType::Put, start_ts, None)
        }
        None => Write::new(WriteType::Delete, start_ts, None),
    };
    let prev = data_predecessor(reader, key, write.write_type)?;
    txn.put_write(
        key,
        commit_ts,
        &write.with_meta(prev.as_ref(), commit_ts, lease),
    );
    Ok(())
}

/// The newest data record a new write of `key` follows, when that write needs its metadata
/// (a `Put`). The caller holds the key (its lock or latch), so no other write can commit
/// between that record and the new one.
pub fn data_predecessor<S: Snapshot>(
    reader: &MvccReader<S>,
    key: &[u8],
    write_type: WriteType,
) -> Result<Option<Write>> {
    if write_type != WriteType::Put {
        return Ok(None);
    }
    Ok(reader.latest_data_write(key, u64::MAX)?.map(|(_, w)| w))
}

#[cfg(test)]
mod tests;
