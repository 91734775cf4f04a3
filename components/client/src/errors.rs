//! Client errors: what a caller can act on.

use atoll_proto::{errorpb, kvrpcpb};

#[derive(Debug, thiserror::Error, Clone)]
pub enum Error {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("request timed out after {0:?}: {1}")]
    Timeout(std::time::Duration, String),
    #[error("PD: {0}")]
    Pd(#[from] atoll_pd_client::Error),
    /// An optimistic transaction lost to another: restart it with a new timestamp.
    #[error("write conflict on key {key:?}: transaction {start_ts} lost to {conflict_start_ts} (committed at {conflict_commit_ts}); retry the transaction")]
    WriteConflict {
        key: Vec<u8>,
        start_ts: u64,
        conflict_start_ts: u64,
        conflict_commit_ts: u64,
    },
    #[error("key {0:?} already exists")]
    AlreadyExists(Vec<u8>),
    #[error("transaction {0} was rolled back (its locks expired or it was resolved)")]
    TxnRolledBack(u64),
    #[error("transaction aborted: {0}")]
    TxnAborted(String),
    /// The commit timestamp is below the transaction's (pushed) minimum: commit again later.
    #[error("commit timestamp below the minimum {min_commit_ts}")]
    CommitTsExpired { min_commit_ts: u64 },
    /// The write may or may not have happened (its outcome was lost in transit); the
    /// client retried until the deadline without learning it.
    #[error("outcome unknown: {0}")]
    Undetermined(String),
    #[error("server: {0}")]
    Server(String),
    #[error("region error: {0}")]
    Region(String),
    /// Refused by authentication or authorization (`PermissionDenied`, `Unauthenticated`), with
    /// the server's message (etcd's: `etcdserver: permission denied`, ...).
    #[error("{1}")]
    Auth(tonic::Code, String),
}

impl Error {
    /// Whether retrying the whole operation may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::WriteConflict { .. }
                | Error::Timeout(..)
                | Error::Undetermined(_)
                | Error::Region(_)
                | Error::TxnRolledBack(_)
        )
    }
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn describe_region_error(e: &errorpb::Error) -> String {
    if e.message.is_empty() {
        format!("{e:?}")
    } else {
        e.message.clone()
    }
}

pub(crate) fn key_error(e: kvrpcpb::KeyError) -> Error {
    if let Some(c) = e.conflict {
        return Error::WriteConflict {
            key: c.key,
            start_ts: c.start_ts,
            conflict_start_ts: c.conflict_ts,
            conflict_commit_ts: c.conflict_commit_ts,
        };
    }
    if let Some(a) = e.already_exist {
        return Error::AlreadyExists(a.key);
    }
    if let Some(t) = e.txn_not_found {
        return Error::TxnRolledBack(t.start_ts);
    }
    if !e.abort.is_empty() {
        return Error::TxnAborted(e.abort);
    }
    if !e.retryable.is_empty() {
        return Error::Server(format!("retryable: {}", e.retryable));
    }
    Error::Server(format!("{e:?}"))
}
