//! etcd's `ResponseHeader` as Atoll fills it:
//!
//! | field | value |
//! | --- | --- |
//! | `cluster_id` | PD's cluster id |
//! | `member_id` | this store's id |
//! | `revision` | given by the caller: for a read its read timestamp, for a write its commit timestamp (both PD timestamps), for Status and Alarm a fresh PD timestamp, 0 where etcd leaves it 0 (member calls) |
//! | `raft_term` | the largest raft term among this store's regions (at least 1), refreshed at most once a second |
//!
//! etcd has one raft group, so one term; Atoll has one per region. The largest local term only
//! grows while the store keeps its regions, and it changes whenever one of them elects, which
//! is what a client watching `raft_term` for leader changes expects.

use crate::context::EtcdContext;
use atoll_proto::etcdserverpb::ResponseHeader;
use parking_lot::Mutex;
use std::time::{Duration, Instant};

/// How long a computed term is served before it is computed again.
const TERM_TTL: Duration = Duration::from_secs(1);

/// The header's `raft_term`, computed from the local peers' hard states at most once per
/// [`TERM_TTL`].
#[derive(Default)]
pub(crate) struct TermCache {
    last: Mutex<Option<(Instant, u64)>>,
}

impl TermCache {
    fn get(&self, compute: impl FnOnce() -> u64) -> u64 {
        let now = Instant::now();
        let mut last = self.last.lock();
        if let Some((at, term)) = *last {
            if now.duration_since(at) < TERM_TTL {
                return term;
            }
        }
        let term = compute().max(1);
        *last = Some((now, term));
        term
    }

    /// Records a freshly computed term (a Status call computes it anyway).
    fn put(&self, term: u64) -> u64 {
        let term = term.max(1);
        *self.last.lock() = Some((Instant::now(), term));
        term
    }
}

/// A header from its four values.
pub fn make_header(
    cluster_id: u64,
    member_id: u64,
    revision: i64,
    raft_term: u64,
) -> ResponseHeader {
    ResponseHeader {
        cluster_id,
        member_id,
        revision,
        raft_term,
    }
}

impl EtcdContext {
    /// The header of a response of this store at `revision`.
    pub fn header(&self, revision: i64) -> ResponseHeader {
        make_header(self.cluster_id(), self.store_id, revision, self.raft_term())
    }

    /// The `raft_term` of this store's headers (cached; see the module doc).
    pub fn raft_term(&self) -> u64 {
        self.term.get(|| self.local.raft_status().term)
    }

    /// Records a term just computed from [`LocalStore::raft_status`](crate::LocalStore::raft_status)
    /// and returns it as headers will show it.
    pub(crate) fn refresh_raft_term(&self, term: u64) -> u64 {
        self.term.put(term)
    }

    /// A revision for a response that reads no keys (Status, Alarm): a fresh PD timestamp, so
    /// that it is at least every revision committed before the call. 0 if PD cannot be reached,
    /// as etcd answers a header with no revision.
    pub async fn current_revision(&self) -> i64 {
        match tokio::time::timeout(Duration::from_secs(3), self.pd.get_tso()).await {
            Ok(Ok(ts)) => ts as i64,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "no timestamp for a response header");
                0
            }
            Err(_) => {
                tracing::debug!("no timestamp for a response header: PD timed out");
                0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn term_is_cached_and_never_zero() {
        let c = TermCache::default();
        assert_eq!(c.get(|| 0), 1, "a store with no regions reports term 1");
        assert_eq!(c.get(|| panic!("cached")), 1);
        assert_eq!(c.put(7), 7);
        assert_eq!(c.get(|| panic!("cached")), 7);
        let h = make_header(1, 2, 3, 4);
        assert_eq!(
            (h.cluster_id, h.member_id, h.revision, h.raft_term),
            (1, 2, 3, 4)
        );
    }
}
