//! Snapshots on the raft side: a received snapshot is accepted only if its range overlaps no
//! other region here; once its states are persisted (the Ready cycle) the region worker
//! applies its data, retried with back-off on failure (raft already counts it as applied, so
//! the peer holds its committed entries until the data is in). A requested snapshot is
//! captured by the apply side at its applied index and built by the region worker.

use crate::fsm::apply::ApplyFsm;
use crate::fsm::apply::ApplyMsg;
use crate::fsm::apply_poller::ApplyPoller;
use crate::fsm::context::StoreContext;
use crate::fsm::peer::PeerFsm;
use crate::msg::{CasualMessage, PeerMsg};
use crate::raft::peer::Peer;
use crate::raft::storage::GenSnapRequest;
use crate::task::RegionTask;
use atoll_engine::KvEngine;
use atoll_proto::raft_serverpb::{RaftApplyState, SnapshotMeta};
use raft::eraftpb;
use std::time::Instant;

impl<E: KvEngine> Peer<E> {
    /// A snapshot may only be accepted if its range overlaps no other region of this store.
    pub(crate) fn check_snapshot(&mut self, ctx: &StoreContext<E>, m: &eraftpb::Message) -> bool {
        let snap = m.get_snapshot();
        let Ok(meta) =
            prost::Message::decode(snap.get_data()) as std::result::Result<SnapshotMeta, _>
        else {
            tracing::warn!(tag = %self.tag, "dropping snapshot with undecodable metadata");
            return false;
        };
        let Some(region) = meta.region else {
            return false;
        };
        if region.id != self.region_id {
            return false;
        }
        let overlaps =
            ctx.meta
                .lock()
                .overlapping(&region.start_key, &region.end_key, self.region_id);
        if !overlaps.is_empty() {
            tracing::info!(tag = %self.tag, ?overlaps, "snapshot overlaps other regions; dropped until they move");
            for id in overlaps {
                let _ = ctx
                    .router
                    .force_send(id, PeerMsg::Casual(CasualMessage::HeartbeatPd));
            }
            ctx.metrics.on_dropped("snapshot_overlap");
            return false;
        }
        true
    }
}

impl<E: KvEngine> PeerFsm<E> {
    /// The round persisted a received snapshot's states: have its data applied.
    pub(crate) fn start_snapshot_apply(&mut self, ctx: &StoreContext<E>, meta: SnapshotMeta) {
        let state = self.peer.raft_group.store().apply_state;
        self.peer.applying_snap = Some((meta.clone(), state));
        self.peer.snap_apply_failures = 0;
        self.schedule_snapshot_apply(ctx, meta, state, None);
    }

    fn schedule_snapshot_apply(
        &self,
        ctx: &StoreContext<E>,
        meta: SnapshotMeta,
        apply_state: RaftApplyState,
        not_before: Option<Instant>,
    ) {
        let task = RegionTask::ApplySnapshot {
            region: self.peer.region().clone(),
            meta,
            apply_state,
            not_before,
        };
        if ctx.region_tx.send(task).is_err() {
            tracing::error!(tag = %self.peer.tag, "region worker gone; snapshot not applied");
        }
    }

    pub(crate) fn on_snapshot_applied(&mut self, ctx: &StoreContext<E>, ok: bool) {
        if !ok {
            // Raft already counts the snapshot as applied (its states are persisted, the
            // region is marked `Applying` on disk): the data must go in before anything else
            // does. The received file is kept until an apply succeeds; try it again, backing
            // off, and keep holding the committed entries meanwhile.
            ctx.metrics.on_snapshot("apply_failed");
            self.retry_snapshot_apply(ctx);
            return;
        }
        self.peer.applying_snapshot = false;
        self.peer.applying_snap = None;
        self.peer.snap_apply_failures = 0;
        ctx.metrics.on_snapshot("applied");
        let region = self.peer.region().clone();
        for p in &region.peers {
            self.peer.peer_cache.insert(p.id, *p);
        }
        ctx.meta.lock().set_region(&region);
        let state = self.peer.raft_group.store().apply_state;
        self.peer.applied_index = state.applied_index;
        self.peer.applied_term = state.applied_term;
        self.peer.last_sent_to_apply = state.applied_index;
        self.peer.clear_apply_pending(ctx);
        self.peer.raft_group.advance_apply_to(state.applied_index);
        let _ = ctx.apply_router.force_send(
            self.region_id(),
            ApplyMsg::Reset {
                region: region.clone(),
                apply_state: state,
            },
        );
        let pending = std::mem::take(&mut self.peer.pending_committed);
        self.send_to_apply(ctx, pending);
        self.peer.republish(ctx);
        ctx.deliver_parked(self.region_id());
    }

    /// Schedules the apply of the pending snapshot again, after a back-off (the region worker
    /// holds it until then; no tick is needed, the region may well be hibernating).
    fn retry_snapshot_apply(&mut self, ctx: &StoreContext<E>) {
        self.peer.snap_apply_failures += 1;
        let n = self.peer.snap_apply_failures;
        let delay = std::time::Duration::from_millis(100u64 << (n.min(7) - 1))
            .min(std::time::Duration::from_secs(5));
        if self.peer.pending_remove {
            return;
        }
        let Some((meta, apply_state)) = self.peer.applying_snap.clone() else {
            tracing::error!(tag = %self.peer.tag, "snapshot apply failed, and there is nothing to retry");
            return;
        };
        tracing::warn!(tag = %self.peer.tag, failures = n, ?delay, "snapshot apply failed; trying again");
        self.schedule_snapshot_apply(ctx, meta, apply_state, Some(Instant::now() + delay));
    }
}

impl<E: KvEngine> ApplyFsm<E> {
    pub(crate) fn gen_snapshot(&mut self, ctx: &mut ApplyPoller<E>, request: GenSnapRequest) {
        // The snapshot must include everything applied so far.
        if self.dirty {
            self.write_apply_state(ctx);
        }
        ctx.flush();
        let task = RegionTask::GenSnapshot {
            region: self.region.clone(),
            snap: ctx.ctx.engine.snapshot(),
            index: self.apply_state.applied_index,
            term: self.apply_state.applied_term,
            request,
        };
        if ctx.ctx.region_tx.send(task).is_err() {
            tracing::warn!(tag = %self.tag, "region worker gone; snapshot not generated");
        }
    }
}
