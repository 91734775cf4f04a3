//! Store-to-store transport over gRPC.
//!
//! - One long-lived client stream per destination store carries batches of raft messages: the
//!   raftstore queues messages during a poll round ([`Transport::send`]) and pushes them with
//!   one flush per round; a background task per connection turns each flush into one
//!   `BatchRaftMessage`. Sending never blocks a poller: a full queue drops the message (raft
//!   retransmits) and counts it.
//! - Idle connections carry a keep-alive batch every second. The receiver counts every batch
//!   as a sign of life of its sender (store-level liveness, `atoll_raftstore::liveness`), so
//!   a store that goes silent — dead, or cut off without its connection breaking — is noticed
//!   even while every region it shares sleeps; a connection that fails is reported too.
//! - Snapshots travel on their own client stream, in chunks read from the generated file.
//! - [`RaftService`] is the receiving side of both.
//!
//! Failpoints (set with `return(STORE_IDS)`, e.g. `transport::send_drop=return(2,3)`):
//! [`FP_SEND_DROP`], [`FP_RECV_DROP`] drop messages (keep-alives included) to/from the listed
//! stores (all stores if empty), as a network partition would; [`FP_SEND_DELAY`] (`return(MS)`) delays each flush by `MS` milliseconds.

mod client;
mod resolve;
mod server;

pub use client::{GrpcTransport, TransportConfig};
pub use resolve::{PdStoreResolver, StaticResolver, StoreResolver};
pub use server::RaftService;

use atoll_proto::raft_serverpb::RaftMessage;
use atoll_raftstore::snap::SnapManager;
use atoll_raftstore::{PeerId, RegionId, StoreId};

pub const FP_SEND_DROP: &str = "transport::send_drop";
pub const FP_RECV_DROP: &str = "transport::recv_drop";
pub const FP_SEND_DELAY: &str = "transport::send_delay";

/// Where received messages go, and who hears about delivery problems. Implemented by the
/// raftstore's router.
pub trait RaftSink: Send + Sync + 'static {
    fn store_id(&self) -> u64;
    fn send_raft_message(&self, msg: RaftMessage);
    /// A batch (or keep-alive) arrived from `store_id`: it is alive.
    fn on_store_heard(&self, store_id: u64);
    fn report_unreachable(&self, store_id: u64);
    fn report_snapshot_status(&self, region_id: u64, to_peer_id: u64, ok: bool);
    fn snap_mgr(&self) -> &SnapManager;
    fn on_snapshot_received(&self);
}

impl<E: atoll_engine::KvEngine> RaftSink for atoll_raftstore::RaftRouter<E> {
    fn store_id(&self) -> u64 {
        atoll_raftstore::RaftRouter::store_id(self).get()
    }
    fn send_raft_message(&self, msg: RaftMessage) {
        atoll_raftstore::RaftRouter::send_raft_message(self, msg)
    }
    fn on_store_heard(&self, store_id: u64) {
        atoll_raftstore::RaftRouter::on_store_heard(self, StoreId(store_id))
    }
    fn report_unreachable(&self, store_id: u64) {
        atoll_raftstore::RaftRouter::report_unreachable(self, StoreId(store_id))
    }
    fn report_snapshot_status(&self, region_id: u64, to_peer_id: u64, ok: bool) {
        let (region, to) = (RegionId(region_id), PeerId(to_peer_id));
        atoll_raftstore::RaftRouter::report_snapshot_status(self, region, to, ok)
    }
    fn snap_mgr(&self) -> &SnapManager {
        atoll_raftstore::RaftRouter::snap_mgr(self)
    }
    fn on_snapshot_received(&self) {
        atoll_raftstore::RaftRouter::on_snapshot_received(self)
    }
}

/// Whether a store-list failpoint value names `store_id` (an empty list names every store).
pub fn failpoint_names_store(value: Option<&str>, store_id: u64) -> bool {
    match value.map(str::trim) {
        None | Some("") => true,
        Some(list) => list
            .split(',')
            .any(|s| s.trim().parse::<u64>().ok() == Some(store_id)),
    }
}

/// The value of an active failpoint, if it is configured (only in failpoint builds).
#[allow(unused_variables)]
pub(crate) fn failpoint_value(name: &str) -> Option<Option<String>> {
    #[cfg(feature = "failpoints")]
    {
        fail::eval(name, |v| v)
    }
    #[cfg(not(feature = "failpoints"))]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn store_lists() {
        assert!(super::failpoint_names_store(None, 3));
        assert!(super::failpoint_names_store(Some("1, 3"), 3));
        assert!(!super::failpoint_names_store(Some("1,2"), 3));
    }
}
