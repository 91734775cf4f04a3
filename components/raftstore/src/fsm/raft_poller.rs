//! The raft poller: drives a batch of `PeerFsm`s per round. Messages in (dispatched here to the
//! features), each peer's Ready staged into the round's one `WriteBatch`, then one write (synced
//! if anything needs it) for every region of the round, and only after it the messages that
//! depend on it and the committed entries for the apply side.

use crate::batch::PollHandler;
use crate::fsm::apply::ApplyMsg;
use crate::fsm::context::StoreContext;
use crate::fsm::peer::PeerFsm;
use crate::msg::{CasualMessage, PeerMsg};
use crate::util;
use atoll_engine::{KvEngine, WriteBatch};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

impl<E: KvEngine> PeerFsm<E> {
    fn on_msg(&mut self, ctx: &StoreContext<E>, wb: &mut E::WriteBatch, msg: PeerMsg<E>) {
        if self.stopped {
            return;
        }
        match msg {
            PeerMsg::RaftMessage(m) => self.on_raft_message(ctx, *m),
            PeerMsg::RaftCommand { cmd, cb } => self.peer.propose(ctx, *cmd, cb),
            PeerMsg::ReadIndex { header, cb } => self.peer.read_index(ctx, &header, cb),
            PeerMsg::Tick => self.peer.on_tick(ctx),
            PeerMsg::ApplyRes(res) => self.on_apply_res(ctx, wb, *res),
            PeerMsg::SnapshotApplied { ok } => self.on_snapshot_applied(ctx, ok),
            PeerMsg::SnapshotGenerated => self.peer.wake(ctx),
            PeerMsg::SnapshotStatus { to_peer_id, ok } => {
                let status = if ok {
                    raft::SnapshotStatus::Finish
                } else {
                    raft::SnapshotStatus::Failure
                };
                self.peer.raft_group.report_snapshot(to_peer_id, status);
            }
            PeerMsg::Unreachable { to_peer_id } => {
                self.peer.raft_group.report_unreachable(to_peer_id)
            }
            PeerMsg::Wake => {
                if self.peer.is_leader() {
                    self.peer.wake(ctx);
                } else if self.peer.hibernating {
                    self.peer.wake_group(ctx);
                }
            }
            PeerMsg::Start => self.on_start(ctx),
            PeerMsg::Casual(c) => self.on_casual(ctx, c),
            PeerMsg::Destroy => self.start_destroy(ctx),
            PeerMsg::ApplyDestroyed => self.finish_destroy(ctx, wb),
        }
    }

    fn on_start(&mut self, ctx: &StoreContext<E>) {
        ctx.set_awake(self.region_id(), true);
        let single_voter = self.peer.is_initialized()
            && self
                .peer
                .region()
                .peers
                .iter()
                .filter(|p| !util::is_learner(p))
                .count()
                == 1
            && util::find_peer_by_id(self.peer.region(), self.peer.meta.id)
                .is_some_and(|p| !util::is_learner(p));
        if self.peer.campaign_on_start || single_voter {
            let _ = self.peer.raft_group.campaign();
        }
        self.peer.publish(ctx);
    }

    fn on_casual(&mut self, ctx: &StoreContext<E>, c: CasualMessage) {
        match c {
            CasualMessage::SplitCheckResult {
                epoch,
                split_keys,
                size,
                keys,
            } => self.on_split_check_result(ctx, epoch, split_keys, size, keys),
            CasualMessage::RegionStats { size, keys } => self.on_region_stats(size, keys),
            CasualMessage::SplitRegion {
                epoch,
                split_keys,
                cb,
            } => self.ask_split(ctx, &epoch, split_keys, cb),
            CasualMessage::ProposeSplit {
                epoch,
                split_keys,
                ids,
                cb,
            } => self.propose_split(ctx, epoch, split_keys, ids, cb),
            CasualMessage::PdOperator(resp) => self.on_pd_operator(ctx, *resp),
            CasualMessage::StalePeer { region } => self.on_stale_peer(ctx, region),
            CasualMessage::CompactLog { index } => {
                let idx = index.min(self.peer.applied_index);
                self.peer.propose_compact_log(ctx, idx);
            }
            CasualMessage::Campaign => {
                self.peer.wake(ctx);
                if let Err(e) = self.peer.raft_group.campaign() {
                    tracing::debug!(tag = %self.peer.tag, error = %e, "campaign failed");
                }
            }
            CasualMessage::HeartbeatPd => self.on_heartbeat_pd(ctx, true),
            CasualMessage::PeriodicHeartbeatPd => self.on_heartbeat_pd(ctx, false),
            CasualMessage::PdReportLost => self.peer.last_pd_report = None,
        }
    }
}

/// Per-thread state of a raft poller.
pub struct RaftPoller<E: KvEngine> {
    pub ctx: Arc<StoreContext<E>>,
    wb: E::WriteBatch,
    dirty_regions: u64,
    must_sync: bool,
}

impl<E: KvEngine> RaftPoller<E> {
    pub fn new(ctx: Arc<StoreContext<E>>) -> Self {
        let wb = ctx.engine.write_batch();
        RaftPoller {
            ctx,
            wb,
            dirty_regions: 0,
            must_sync: false,
        }
    }
}

impl<E: KvEngine> PollHandler<PeerFsm<E>> for RaftPoller<E> {
    fn begin(&mut self, _batch_len: usize) {
        self.dirty_regions = 0;
        self.must_sync = false;
    }

    fn handle(&mut self, fsm: &mut PeerFsm<E>, msgs: &mut VecDeque<PeerMsg<E>>) {
        let ctx = self.ctx.clone();
        for m in msgs.drain(..) {
            fsm.on_msg(&ctx, &mut self.wb, m);
        }
        if fsm.stopped {
            return;
        }
        fsm.peer.maybe_issue_reads(&ctx);
        if let Some(req) = fsm.peer.raft_group.store().take_gen_request() {
            let _ = ctx
                .apply_router
                .force_send(fsm.region_id(), ApplyMsg::GenSnapshot { request: req });
        }
        match fsm.peer.collect_ready(&ctx, &mut self.wb) {
            Ok((true, sync)) => {
                self.dirty_regions += 1;
                self.must_sync |= sync;
            }
            Ok((false, _)) => {}
            Err(e) => tracing::error!(tag = %fsm.peer.tag, error = %e, "collect ready"),
        }
    }

    fn end(&mut self, batch: &mut [Box<PeerFsm<E>>]) {
        let ctx = self.ctx.clone();
        // Leaders' appends go out while the local fsync runs.
        ctx.trans.flush();
        if !self.wb.is_empty() {
            fail::fail_point!(crate::failpoints::BEFORE_PERSIST);
            let wb = std::mem::replace(&mut self.wb, ctx.engine.write_batch());
            let start = Instant::now();
            // Destroys and log compactions staged here ride along; they need no sync of their own.
            let sync = self.must_sync;
            if let Err(e) = ctx.engine.write(wb, sync) {
                // Raft state that cannot be persisted cannot be acknowledged: stop here rather
                // than answer anything that depends on it.
                panic!("store {}: failed to persist raft state: {e}", ctx.store_id);
            }
            if sync {
                ctx.metrics.on_synced_batch(start.elapsed().as_secs_f64());
            }
            fail::fail_point!(crate::failpoints::AFTER_PERSIST);
        }
        ctx.metrics.on_poll_round(self.dirty_regions);
        for fsm in batch.iter_mut() {
            if fsm.stopped {
                fsm.complete_destroy(&ctx);
                continue;
            }
            let (committed, snap) = fsm.peer.post_ready(&ctx);
            if let Some(meta) = snap {
                fsm.start_snapshot_apply(&ctx, meta);
            }
            fsm.send_to_apply(&ctx, committed);
            fsm.peer.maybe_issue_reads(&ctx);
            fsm.peer.serve_reads(&ctx);
            fsm.peer.publish(&ctx);
        }
        ctx.trans.flush();
        // Raft log deletions staged while handling apply results go with the next round.
    }
}
