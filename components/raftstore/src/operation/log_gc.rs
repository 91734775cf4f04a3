//! Raft log GC: the leader proposes a compaction once enough is applied and replicated to
//! every peer (or the log grew past its limits: lagging peers then catch up by snapshot); the
//! apply side moves the truncated state with the data; the raft side then drops the entries
//! from its cache and stages their deletion into the next round's write.

use crate::fsm::apply::ApplyFsm;
use crate::fsm::context::StoreContext;
use crate::fsm::peer::PeerFsm;
use crate::msg::{ExecResult, WriteResponse};
use crate::raft::peer::Peer;
use crate::raft::storage;
use crate::{Error, Result};
use atoll_engine::KvEngine;
use atoll_proto::raft_cmdpb::{AdminCmdType, AdminRequest, CompactLogRequest, RaftCmdRequest};
use atoll_proto::raft_serverpb::RaftTruncatedState;

impl<E: KvEngine> Peer<E> {
    /// Proposes a log compaction when enough is replicated everywhere, or when the log grew
    /// past its limits (lagging peers will then catch up by snapshot).
    pub fn maybe_compact_log(&mut self, ctx: &StoreContext<E>, eager: bool) {
        if !self.is_leader() {
            return;
        }
        let truncated = self.raft_group.store().truncated_index();
        let applied = self.applied_index;
        if applied <= truncated {
            return;
        }
        let replicated = self
            .raft_group
            .raft
            .prs()
            .iter()
            .map(|(_, p)| p.matched)
            .min()
            .unwrap_or(0);
        let threshold = if eager {
            1
        } else {
            ctx.cfg.raft_log_gc_threshold
        };
        let idx = if replicated > truncated && replicated.min(applied) - truncated >= threshold {
            replicated.min(applied)
        } else if applied - truncated >= ctx.cfg.raft_log_gc_count_limit
            || self.raft_log_size_hint >= ctx.cfg.raft_log_gc_size_limit.0
        {
            applied
        } else {
            return;
        };
        self.propose_compact_log(ctx, idx);
    }

    pub fn propose_compact_log(&mut self, ctx: &StoreContext<E>, idx: u64) {
        let Ok(term) = self.raft_group.raft.raft_log.term(idx) else {
            return;
        };
        if idx <= self.raft_group.store().truncated_index() {
            return;
        }
        let cmd = RaftCmdRequest {
            header: Some(self.header()),
            requests: vec![],
            admin_request: Some(AdminRequest {
                cmd_type: AdminCmdType::CompactLog as i32,
                compact_log: Some(CompactLogRequest {
                    compact_index: idx,
                    compact_term: term,
                }),
                ..Default::default()
            }),
        };
        let data = prost::Message::encode_to_vec(&cmd);
        if self.raft_group.propose(vec![], data).is_ok() {
            ctx.metrics.on_proposal("compact_log");
        }
    }
}

impl<E: KvEngine> ApplyFsm<E> {
    pub(crate) fn exec_compact_log(&mut self, cmd: &RaftCmdRequest) -> Result<WriteResponse> {
        let c = cmd
            .admin_request
            .as_ref()
            .and_then(|a| a.compact_log)
            .ok_or_else(|| Error::InvalidRequest("compact log without body".into()))?;
        let truncated = self.apply_state.truncated_state.unwrap_or_default();
        if c.compact_index <= truncated.index {
            return Ok(WriteResponse::default());
        }
        if c.compact_index > self.applied_index() {
            return Err(Error::InvalidRequest(
                "compaction past the applied index".into(),
            ));
        }
        self.apply_state.truncated_state = Some(RaftTruncatedState {
            index: c.compact_index,
            term: c.compact_term,
        });
        self.exec_results.push(ExecResult::CompactLog {
            index: c.compact_index,
            term: c.compact_term,
        });
        Ok(WriteResponse::default())
    }
}

impl<E: KvEngine> PeerFsm<E> {
    pub(crate) fn on_compact_log(&mut self, wb: &mut E::WriteBatch, index: u64, term: u64) {
        let first = self.peer.raft_group.store().truncated_index() + 1;
        self.peer.raft_group.mut_store().compact_to(index, term);
        let region_id = self.region_id();
        if first <= index {
            let _ = storage::delete_log(wb, region_id, first, index + 1);
        }
        let total = self
            .peer
            .raft_group
            .raft
            .raft_log
            .last_index()
            .saturating_sub(first)
            .max(1);
        let removed = index + 1 - first.min(index + 1);
        self.peer.raft_log_size_hint = self
            .peer
            .raft_log_size_hint
            .saturating_sub(self.peer.raft_log_size_hint * removed / total.max(removed));
    }
}
