//! Messages between the parts of a store, and the callbacks that answer requests.

use crate::{Error, Result};
use atoll_engine::KvEngine;
use atoll_proto::raft_cmdpb::{RaftCmdRequest, RaftRequestHeader};
use atoll_proto::raft_serverpb::RaftMessage;
use atoll_proto::{metapb, pdpb};
use std::sync::Arc;

/// A consistent view of one region's data, valid for reads at or after a linearization point.
pub struct RegionSnapshot<S> {
    pub snap: S,
    pub region: Arc<metapb::Region>,
    /// Applied index the snapshot includes.
    pub applied_index: u64,
    /// Raft term of the leader that served it.
    pub term: u64,
}

impl<S: Clone> Clone for RegionSnapshot<S> {
    fn clone(&self) -> Self {
        RegionSnapshot {
            snap: self.snap.clone(),
            region: self.region.clone(),
            applied_index: self.applied_index,
            term: self.term,
        }
    }
}

/// Outcome of a proposed command once applied (or refused).
#[derive(Debug, Clone, Default)]
pub struct WriteResponse {
    /// Regions produced by an admin command (a split's results, a conf change's region).
    pub regions: Vec<metapb::Region>,
    pub index: u64,
    pub term: u64,
}

pub type WriteResult = Result<WriteResponse>;
pub type WriteCallback = Box<dyn FnOnce(WriteResult) + Send>;
pub type ReadCallback<S> = Box<dyn FnOnce(Result<RegionSnapshot<S>>) + Send>;

/// Results of applying entries, sent from the apply side back to the raft side.
#[derive(Debug)]
pub enum ExecResult {
    ChangePeer {
        cc: raft::eraftpb::ConfChange,
        region: metapb::Region,
        /// The peer removed this store's own peer.
        remove_self: bool,
    },
    Split {
        derived: metapb::Region,
        new_regions: Vec<metapb::Region>,
    },
    CompactLog {
        index: u64,
        term: u64,
    },
}

#[derive(Debug, Default)]
pub struct ApplyRes {
    pub applied_index: u64,
    pub applied_term: u64,
    pub exec_results: Vec<ExecResult>,
    pub written_bytes: u64,
    pub written_keys: u64,
}

/// Occasional messages to a peer from workers, PD and tests.
pub enum CasualMessage {
    /// The split checker found the region past its thresholds.
    SplitCheckResult {
        epoch: metapb::RegionEpoch,
        split_keys: Vec<Vec<u8>>,
        size: u64,
        keys: u64,
    },
    /// The region's measured size (from a split check that found no need to split).
    RegionStats { size: u64, keys: u64 },
    /// Split at these user keys (asks PD for ids first). From clients, PD or tests.
    SplitRegion {
        epoch: metapb::RegionEpoch,
        split_keys: Vec<Vec<u8>>,
        cb: Option<WriteCallback>,
    },
    /// PD gave ids for a split: propose it.
    ProposeSplit {
        epoch: metapb::RegionEpoch,
        split_keys: Vec<Vec<u8>>,
        ids: Vec<pdpb::SplitId>,
        cb: Option<WriteCallback>,
    },
    /// An operator step from PD.
    PdOperator(Box<pdpb::RegionHeartbeatResponse>),
    /// PD says this peer is no longer a member of the region (as of `region`).
    StalePeer { region: metapb::Region },
    /// Propose a log compaction up to `index` now (tests and admin).
    CompactLog { index: u64 },
    /// Send a region heartbeat to PD now.
    HeartbeatPd,
    /// The periodic check: report to PD if the region changed since the last report (or
    /// the last one is older than `pd-heartbeat-max-interval`).
    PeriodicHeartbeatPd,
    /// The last region heartbeat did not reach PD: report at the next periodic check.
    PdReportLost,
    /// Start an election now, as if the election timeout had passed (tests and operators).
    Campaign,
}

pub enum PeerMsg<E: KvEngine> {
    RaftMessage(Box<RaftMessage>),
    RaftCommand {
        cmd: Box<RaftCmdRequest>,
        cb: WriteCallback,
    },
    /// A linearizable read: answered with a snapshot once the read index is applied.
    ReadIndex {
        header: Box<RaftRequestHeader>,
        cb: ReadCallback<E::Snapshot>,
    },
    Tick,
    ApplyRes(Box<ApplyRes>),
    /// The snapshot being applied on this peer is in (or failed).
    SnapshotApplied {
        ok: bool,
    },
    /// A snapshot this peer generated is ready (retry sending).
    SnapshotGenerated,
    /// The transport finished (or failed) sending a snapshot to `to_peer_id`.
    SnapshotStatus {
        to_peer_id: u64,
        ok: bool,
    },
    /// The transport could not reach the store of `to_peer_id`.
    Unreachable {
        to_peer_id: u64,
    },
    /// Leave hibernation and tick again.
    Wake,
    /// First message after creation.
    Start,
    Casual(CasualMessage),
    /// Destroy this peer (it was removed, or replaced).
    Destroy,
    /// The apply side stopped for good: finish destroying.
    ApplyDestroyed,
}

impl<E: KvEngine> PeerMsg<E> {
    /// Answers the request this message carries, if any, with `err`: it was not delivered.
    pub fn refuse(self, err: Error) {
        match self {
            PeerMsg::RaftCommand { cb, .. } => cb(Err(err)),
            PeerMsg::ReadIndex { cb, .. } => cb(Err(err)),
            PeerMsg::Casual(
                CasualMessage::SplitRegion { cb: Some(cb), .. }
                | CasualMessage::ProposeSplit { cb: Some(cb), .. },
            ) => cb(Err(err)),
            _ => {}
        }
    }
}

pub enum StoreMsg {
    /// A raft message for a region this store has no peer of (yet).
    RaftMessage(Box<RaftMessage>),
    /// A store turned down (silent or unreachable; see [`crate::liveness`]).
    StoreDown {
        store_id: u64,
    },
    /// A peer was destroyed; retry messages that were waiting for its range.
    PeerDestroyed {
        region_id: u64,
    },
    Stop,
}
