//! What the raftstore needs from the network. The gRPC implementation lives in
//! `atoll-transport`; tests use an in-process one with filters (`atoll-test-cluster`).

use atoll_proto::raft_serverpb::{RaftMessage, SnapshotMeta};

pub trait Transport: Send + Sync + 'static {
    /// Queues `msg` for its destination store. Never blocks: when the queue toward that store
    /// is full the message is dropped (raft retransmits) and `false` is returned.
    fn send(&self, msg: RaftMessage) -> bool;

    /// Sends a raft snapshot message whose data is the generated file described by `meta`
    /// (see [`SnapManager`](crate::snap::SnapManager)), on its own chunked stream. The result is
    /// reported back to the region with `RaftRouter::report_snapshot_status`.
    fn send_snapshot(&self, msg: RaftMessage, meta: SnapshotMeta) -> bool;

    /// Pushes out everything queued so far, one batch per destination store. Called once or
    /// twice per poll round.
    fn flush(&self);
}
