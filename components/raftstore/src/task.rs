//! The tasks a store's pollers hand to its workers: snapshots to the region worker, regions to
//! measure to the split checker, and conversations with PD to the PD worker. Only the types live
//! here (a leaf: no user of these tasks is imported), so that the shared context can name the
//! queues and the workers can be written against it.

use crate::msg::WriteCallback;
use crate::raft::storage::GenSnapRequest;
use atoll_engine::KvEngine;
use atoll_proto::raft_serverpb::{RaftApplyState, SnapshotMeta};
use atoll_proto::{metapb, pdpb};
use std::time::Instant;

/// Work for the region worker ([`crate::worker::region`]).
pub enum RegionTask<E: KvEngine> {
    GenSnapshot {
        region: metapb::Region,
        snap: E::Snapshot,
        index: u64,
        term: u64,
        request: GenSnapRequest,
    },
    ApplySnapshot {
        region: metapb::Region,
        meta: SnapshotMeta,
        apply_state: RaftApplyState,
        /// A retry after a failed apply: not before then (the worker holds it meanwhile).
        not_before: Option<Instant>,
    },
    Stop,
}

/// Work for the split checker ([`crate::worker::split_check`]).
pub enum SplitCheckMsg<E: KvEngine> {
    Check(SplitCheckTask<E>),
    Stop,
}

pub struct SplitCheckTask<E: KvEngine> {
    pub region: metapb::Region,
    pub snap: E::Snapshot,
    pub split_size: u64,
    pub split_keys: u64,
    /// Split at the middle even below the thresholds (PD asked).
    pub force: bool,
}

/// Work for the PD worker ([`crate::worker::pd`]).
pub enum PdTask {
    Heartbeat(Box<pdpb::RegionHeartbeatRequest>),
    AskSplit {
        region: metapb::Region,
        split_keys: Vec<Vec<u8>>,
        cb: Option<WriteCallback>,
    },
    ReportSplit {
        regions: Vec<metapb::Region>,
    },
    ValidatePeer {
        region: metapb::Region,
        peer: metapb::Peer,
    },
}
