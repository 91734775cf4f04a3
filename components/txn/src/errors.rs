//! The transaction layer's errors, and their one mapping to the protocol's `KeyError`.

use atoll_proto::kvrpcpb::{
    AlreadyExist, CommitTsExpired, KeyError, LockInfo, TxnLockNotFound, TxnNotFound, WriteConflict,
};

/// Everything an MVCC read or a transaction action can fail with.
///
/// Keys in variants are user keys (not engine-encoded).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// The key is locked by another transaction; resolve the lock (after its TTL) and retry.
    #[error("key is locked: {0:?}")]
    KeyIsLocked(LockInfo),

    /// An optimistic conflict (another transaction committed after our start_ts), or our own
    /// transaction was already rolled back on this key (then `conflict_start_ts == start_ts`).
    #[error(
        "write conflict on key {key:?}: txn {start_ts} vs txn {conflict_start_ts} committed at \
         {conflict_commit_ts} (primary {primary:?})"
    )]
    WriteConflict {
        /// Our transaction.
        start_ts: u64,
        /// The transaction that won.
        conflict_start_ts: u64,
        /// Where it committed.
        conflict_commit_ts: u64,
        /// The key.
        key: Vec<u8>,
        /// Our primary key.
        primary: Vec<u8>,
    },

    /// `CheckNotExists` found a live value.
    #[error("key {key:?} already exists")]
    AlreadyExist {
        /// The key.
        key: Vec<u8>,
    },

    /// Neither a lock nor a commit record of the transaction exists on its primary key.
    #[error("transaction {start_ts} not found on primary {key:?}")]
    TxnNotFound {
        /// The transaction.
        start_ts: u64,
        /// Its primary key.
        key: Vec<u8>,
    },

    /// Commit found neither the transaction's lock nor its commit record (it was rolled back,
    /// or never prewritten).
    #[error("lock of txn {start_ts} not found on key {key:?} when committing at {commit_ts}")]
    TxnLockNotFound {
        /// The transaction.
        start_ts: u64,
        /// The attempted commit timestamp.
        commit_ts: u64,
        /// The key.
        key: Vec<u8>,
    },

    /// The commit timestamp is below the lock's `min_commit_ts` (it was pushed by a reader);
    /// commit again with a newer timestamp.
    #[error(
        "commit_ts {commit_ts} of txn {start_ts} on key {key:?} is below min_commit_ts \
         {min_commit_ts}"
    )]
    CommitTsExpired {
        /// The transaction.
        start_ts: u64,
        /// The attempted commit timestamp.
        commit_ts: u64,
        /// The key.
        key: Vec<u8>,
        /// The lock's minimum commit timestamp.
        min_commit_ts: u64,
    },

    /// A pessimistic prewrite did not find the pessimistic lock it requires.
    #[error("pessimistic lock of txn {start_ts} not found on key {key:?}")]
    PessimisticLockNotFound {
        /// The transaction.
        start_ts: u64,
        /// The key.
        key: Vec<u8>,
    },

    /// Acquiring a pessimistic lock found the transaction already rolled back on this key.
    #[error("txn {start_ts} was already rolled back on key {key:?}")]
    PessimisticLockRolledBack {
        /// The transaction.
        start_ts: u64,
        /// The key.
        key: Vec<u8>,
    },

    /// The transaction is already committed on this key (returned by rollback/cleanup, and by a
    /// prewrite or pessimistic lock that arrives after the commit: callers of those may treat it
    /// as success).
    #[error("txn {start_ts} is already committed at {commit_ts} on key {key:?}")]
    Committed {
        /// The transaction.
        start_ts: u64,
        /// Its commit timestamp.
        commit_ts: u64,
        /// The key.
        key: Vec<u8>,
    },

    /// The transaction's own lock on the key is not of the kind the command expects
    /// (`pessimistic`: the lock found is a pessimistic one).
    #[error(
        "lock type mismatch for txn {start_ts} on key {key:?} (pessimistic lock: {pessimistic})"
    )]
    LockTypeNotMatch {
        /// The transaction.
        start_ts: u64,
        /// The key.
        key: Vec<u8>,
        /// Whether the existing lock is pessimistic.
        pessimistic: bool,
    },

    /// Async commit / one-phase commit: the minimum commit timestamp exceeds the caller's limit;
    /// fall back to ordinary two-phase commit.
    #[error(
        "min_commit_ts {min_commit_ts} of txn {start_ts} exceeds max_commit_ts {max_commit_ts}"
    )]
    CommitTsTooLarge {
        /// The transaction.
        start_ts: u64,
        /// The computed minimum commit timestamp.
        min_commit_ts: u64,
        /// The caller's limit.
        max_commit_ts: u64,
    },

    /// A write record points at a value in `CF_DEFAULT` that is missing (corruption, or GC
    /// raced with a reader below the safe point).
    #[error(
        "value of key {key:?} written by txn {start_ts} is missing from the default column family"
    )]
    DefaultNotFound {
        /// The key.
        key: Vec<u8>,
        /// The writing transaction.
        start_ts: u64,
    },

    /// An in-memory lock (a one-phase or plain write in flight) still blocks the read; retry.
    #[error("key {key:?} is locked in memory by a write committing at {commit_ts}")]
    MemoryLocked {
        /// The key.
        key: Vec<u8>,
        /// The writer's commit timestamp (0 = not chosen yet).
        commit_ts: u64,
    },

    /// The storage engine failed.
    #[error("engine: {0}")]
    Engine(String),

    /// A stored key or record could not be decoded.
    #[error("codec: {0}")]
    Codec(String),

    /// Anything else (invalid arguments, broken invariants).
    #[error("{0}")]
    Other(String),
}

/// Result of the transaction layer.
pub type Result<T> = std::result::Result<T, Error>;

impl From<atoll_engine::Error> for Error {
    fn from(e: atoll_engine::Error) -> Self {
        Error::Engine(e.to_string())
    }
}

impl From<atoll_keys::CodecError> for Error {
    fn from(e: atoll_keys::CodecError) -> Self {
        Error::Codec(e.to_string())
    }
}

impl Error {
    /// The protocol form of this error (see the `From<&Error>` impl).
    pub fn to_key_error(&self) -> KeyError {
        KeyError::from(self)
    }
}

impl From<&Error> for KeyError {
    /// Each variant with a typed field in `KeyError` maps to it; `MemoryLocked` is `retryable`;
    /// everything else is `abort` with the error's message.
    fn from(e: &Error) -> Self {
        let mut ke = KeyError::default();
        match e {
            Error::KeyIsLocked(info) => ke.locked = Some(info.clone()),
            Error::WriteConflict {
                start_ts,
                conflict_start_ts,
                conflict_commit_ts,
                key,
                primary,
            } => {
                ke.conflict = Some(WriteConflict {
                    start_ts: *start_ts,
                    conflict_ts: *conflict_start_ts,
                    key: key.clone(),
                    primary: primary.clone(),
                    conflict_commit_ts: *conflict_commit_ts,
                })
            }
            Error::AlreadyExist { key } => {
                ke.already_exist = Some(AlreadyExist { key: key.clone() })
            }
            Error::TxnNotFound { start_ts, key } => {
                ke.txn_not_found = Some(TxnNotFound {
                    start_ts: *start_ts,
                    primary_key: key.clone(),
                })
            }
            Error::TxnLockNotFound { key, .. } => {
                ke.txn_lock_not_found = Some(TxnLockNotFound { key: key.clone() })
            }
            Error::CommitTsExpired {
                start_ts,
                commit_ts,
                key,
                min_commit_ts,
            } => {
                ke.commit_ts_expired = Some(CommitTsExpired {
                    start_ts: *start_ts,
                    attempted_commit_ts: *commit_ts,
                    key: key.clone(),
                    min_commit_ts: *min_commit_ts,
                })
            }
            Error::MemoryLocked { .. } => ke.retryable = e.to_string(),
            _ => ke.abort = e.to_string(),
        }
        ke
    }
}

impl From<Error> for KeyError {
    fn from(e: Error) -> Self {
        KeyError::from(&e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_to_typed_key_errors() {
        let info = LockInfo {
            key: b"k".to_vec(),
            lock_version: 5,
            ..Default::default()
        };
        assert_eq!(
            Error::KeyIsLocked(info.clone()).to_key_error().locked,
            Some(info)
        );

        let ke = Error::WriteConflict {
            start_ts: 1,
            conflict_start_ts: 2,
            conflict_commit_ts: 3,
            key: b"k".to_vec(),
            primary: b"p".to_vec(),
        }
        .to_key_error();
        let c = ke.conflict.unwrap();
        assert_eq!((c.start_ts, c.conflict_ts, c.conflict_commit_ts), (1, 2, 3));
        assert_eq!(
            (c.key.as_slice(), c.primary.as_slice()),
            (&b"k"[..], &b"p"[..])
        );

        let ke = KeyError::from(Error::AlreadyExist { key: b"a".to_vec() });
        assert_eq!(ke.already_exist.unwrap().key, b"a");

        let ke = Error::TxnNotFound {
            start_ts: 9,
            key: b"p".to_vec(),
        }
        .to_key_error();
        let t = ke.txn_not_found.unwrap();
        assert_eq!((t.start_ts, t.primary_key.as_slice()), (9, &b"p"[..]));

        let ke = Error::TxnLockNotFound {
            start_ts: 1,
            commit_ts: 2,
            key: b"x".to_vec(),
        }
        .to_key_error();
        assert_eq!(ke.txn_lock_not_found.unwrap().key, b"x");

        let ke = Error::CommitTsExpired {
            start_ts: 1,
            commit_ts: 2,
            key: b"x".to_vec(),
            min_commit_ts: 3,
        }
        .to_key_error();
        let c = ke.commit_ts_expired.unwrap();
        assert_eq!(
            (c.start_ts, c.attempted_commit_ts, c.min_commit_ts),
            (1, 2, 3)
        );

        let ke = Error::MemoryLocked {
            key: b"m".to_vec(),
            commit_ts: 0,
        }
        .to_key_error();
        assert!(!ke.retryable.is_empty() && ke.abort.is_empty());

        for e in [
            Error::Committed {
                start_ts: 1,
                commit_ts: 2,
                key: b"c".to_vec(),
            },
            Error::Engine("disk".into()),
            Error::Codec("bad".into()),
            Error::Other("x".into()),
            Error::PessimisticLockNotFound {
                start_ts: 1,
                key: b"k".to_vec(),
            },
        ] {
            let ke = e.to_key_error();
            assert_eq!(ke.abort, e.to_string());
            assert!(ke.locked.is_none() && ke.conflict.is_none());
        }
    }

    #[test]
    fn converts_lower_errors() {
        let e: Error = atoll_engine::Error::Corruption("x".into()).into();
        assert!(matches!(e, Error::Engine(_)));
        let e: Error = atoll_keys::CodecError::Truncated.into();
        assert!(matches!(e, Error::Codec(_)));
    }
}
