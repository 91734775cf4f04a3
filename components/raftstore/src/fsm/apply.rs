//! `ApplyFsm`: one region's apply side as a batch-system FSM, and the messages the raft side
//! sends it. The state only; the apply poller ([`crate::fsm::apply_poller`]) drives it and the
//! features in [`crate::operation`] execute the entries (commands, conf changes, splits, log
//! compactions).

use crate::batch::Fsm;
use crate::msg::{ExecResult, WriteCallback};
use crate::raft::storage::GenSnapRequest;
use atoll_engine::KvEngine;
use atoll_proto::metapb;
use atoll_proto::raft_serverpb::RaftApplyState;
use raft::eraftpb::Entry;
use std::collections::VecDeque;

pub enum ApplyMsg {
    Apply {
        term: u64,
        entries: Vec<Entry>,
        cbs: Vec<(u64, u64, WriteCallback)>,
    },
    /// A snapshot replaced the region's data and state.
    Reset {
        region: metapb::Region,
        apply_state: RaftApplyState,
    },
    /// Capture a consistent engine snapshot at the current applied index.
    GenSnapshot {
        request: GenSnapRequest,
    },
    Destroy,
}

pub struct ApplyFsm<E: KvEngine> {
    pub region_id: u64,
    pub peer_id: u64,
    pub(crate) region: metapb::Region,
    pub(crate) apply_state: RaftApplyState,
    pub(crate) tag: String,
    pub(crate) cbs: VecDeque<(u64, u64, WriteCallback)>,
    pub(crate) stopped: bool,
    // This round.
    pub(crate) dirty: bool,
    pub(crate) exec_results: Vec<ExecResult>,
    pub(crate) written_bytes: u64,
    pub(crate) written_keys: u64,
    pub(crate) _e: std::marker::PhantomData<E>,
}

impl<E: KvEngine> Fsm for ApplyFsm<E> {
    type Message = ApplyMsg;
    fn is_stopped(&self) -> bool {
        self.stopped
    }
}

impl<E: KvEngine> ApplyFsm<E> {
    pub fn new(region: metapb::Region, peer_id: u64, apply_state: RaftApplyState) -> Box<Self> {
        Box::new(ApplyFsm {
            region_id: region.id,
            peer_id,
            tag: format!("[region {}] apply {}", region.id, peer_id),
            region,
            apply_state,
            cbs: VecDeque::new(),
            stopped: false,
            dirty: false,
            exec_results: vec![],
            written_bytes: 0,
            written_keys: 0,
            _e: std::marker::PhantomData,
        })
    }

    pub(crate) fn applied_index(&self) -> u64 {
        self.apply_state.applied_index
    }
}
