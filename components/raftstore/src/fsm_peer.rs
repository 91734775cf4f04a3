//! `PeerFsm`: one region's peer as a batch-system FSM, and the raft poller that drives many of
//! them: messages in, one synced write per round, messages and committed entries out.

use crate::apply::ApplyMsg;
use crate::batch::{Fsm, PollHandler};
use crate::msg::{ApplyRes, CasualMessage, ExecResult, PeerMsg, StoreMsg, WriteCallback};
use crate::pd_worker::PdTask;
use crate::peer::Peer;
use crate::storage::write_region_state;
use crate::store::StoreContext;
use crate::worker::{RegionTask, SplitCheckMsg, SplitCheckTask};
use crate::{util, Error, Result};
use atoll_engine::{KvEngine, WriteBatch, CF_RAFT, DATA_CFS};
use atoll_proto::metapb;
use atoll_proto::raft_cmdpb::{
    AdminCmdType, AdminRequest, BatchSplitRequest, RaftCmdRequest, RaftRequestHeader, SplitRequest,
};
use atoll_proto::raft_serverpb::{PeerState, RaftMessage};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

pub struct PeerFsm<E: KvEngine> {
    pub peer: Peer<E>,
    stopped: bool,
    /// A destroy is staged in the round's write batch; completed after the write.
    destroy_staged: bool,
}

impl<E: KvEngine> Fsm for PeerFsm<E> {
    type Message = PeerMsg<E>;
    fn is_stopped(&self) -> bool {
        self.stopped
    }
    fn needs_poll(&self) -> bool {
        self.peer.needs_poll()
    }
}

impl<E: KvEngine> PeerFsm<E> {
    /// A peer from persisted (or freshly written) states.
    pub fn create(
        ctx: &StoreContext<E>,
        region: metapb::Region,
        meta: metapb::Peer,
    ) -> Result<Box<Self>> {
        Ok(Box::new(PeerFsm {
            peer: Peer::new(ctx, region, meta)?,
            stopped: false,
            destroy_staged: false,
        }))
    }

    /// A peer that exists only because a message named it; it waits for a snapshot.
    pub fn create_uninitialized(
        ctx: &StoreContext<E>,
        region_id: u64,
        meta: metapb::Peer,
    ) -> Result<Box<Self>> {
        let region = metapb::Region {
            id: region_id,
            ..Default::default()
        };
        Self::create(ctx, region, meta)
    }

    pub fn region_id(&self) -> u64 {
        self.peer.region_id
    }

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

    fn on_raft_message(&mut self, ctx: &StoreContext<E>, msg: RaftMessage) {
        let to = msg.to_peer.unwrap_or_default();
        let from = msg.from_peer.unwrap_or_default();
        if to.id != self.peer.meta.id {
            // A newer peer of this region was placed on this store: this one is stale. Only a
            // sender that knows a newer membership than ours can say so (a stale member still
            // addressing an old peer of this store must not make the current one go away).
            let newer_epoch = msg.region_epoch.unwrap_or_default().conf_ver
                > util::epoch(self.peer.region()).conf_ver;
            if to.id > self.peer.meta.id && newer_epoch {
                tracing::info!(tag = %self.peer.tag, newer = to.id, "replaced by a newer peer; destroying");
                self.start_destroy(ctx);
            } else {
                ctx.metrics.on_dropped("stale_target_peer");
            }
            return;
        }
        let msg_epoch = msg.region_epoch.unwrap_or_default();
        if msg.is_tombstone {
            // The sender (with a newer epoch) says this peer was removed.
            let cur = util::epoch(self.peer.region());
            if !self.peer.is_initialized() || msg_epoch.conf_ver > cur.conf_ver {
                tracing::info!(tag = %self.peer.tag, "told it is removed; destroying");
                self.start_destroy(ctx);
            }
            return;
        }
        if self.peer.is_initialized()
            && util::find_peer_by_id(self.peer.region(), from.id).is_none()
        {
            let cur = util::epoch(self.peer.region());
            if util::is_epoch_stale(&msg_epoch, &cur) {
                // The sender was removed and does not know it: tell it.
                self.send_tombstone(ctx, &msg);
                return;
            }
        }
        if msg.extra != 0 {
            self.peer.on_extra_message(ctx, &msg);
            return;
        }
        if let Err(e) = self.peer.step(ctx, msg) {
            tracing::warn!(tag = %self.peer.tag, error = %e, "bad raft message");
        }
    }

    fn send_tombstone(&self, ctx: &StoreContext<E>, msg: &RaftMessage) {
        let region = self.peer.region();
        let gc = RaftMessage {
            region_id: self.region_id(),
            from_peer: Some(self.peer.meta),
            to_peer: msg.from_peer,
            region_epoch: region.region_epoch,
            start_key: region.start_key.clone(),
            end_key: region.end_key.clone(),
            is_tombstone: true,
            ..Default::default()
        };
        ctx.trans.send(gc);
    }

    fn on_casual(&mut self, ctx: &StoreContext<E>, c: CasualMessage) {
        match c {
            CasualMessage::SplitCheckResult {
                epoch,
                split_keys,
                size,
                keys,
            } => {
                self.peer.split_check_pending = false;
                self.peer.approximate_size = Some(size);
                self.peer.approximate_keys = Some(keys);
                if split_keys.is_empty() || !self.peer.is_leader() {
                    return;
                }
                if util::epoch(self.peer.region()) != epoch {
                    return;
                }
                ctx.schedule_pd(PdTask::AskSplit {
                    region: self.peer.region().clone(),
                    split_keys,
                    cb: None,
                });
            }
            CasualMessage::RegionStats { size, keys } => {
                self.peer.split_check_pending = false;
                self.peer.approximate_size = Some(size);
                self.peer.approximate_keys = Some(keys);
            }
            CasualMessage::SplitRegion {
                epoch,
                split_keys,
                cb,
            } => {
                let res = self.check_split_request(&epoch, &split_keys);
                match res {
                    Ok(()) => ctx.schedule_pd(PdTask::AskSplit {
                        region: self.peer.region().clone(),
                        split_keys,
                        cb,
                    }),
                    Err(e) => {
                        if let Some(cb) = cb {
                            cb(Err(e));
                        }
                    }
                }
            }
            CasualMessage::ProposeSplit {
                epoch,
                split_keys,
                ids,
                cb,
            } => {
                let cb: WriteCallback = cb.unwrap_or_else(|| Box::new(|_| {}));
                if let Err(e) = self.check_split_request(&epoch, &split_keys) {
                    return cb(Err(e));
                }
                if ids.len() != split_keys.len() {
                    return cb(Err(Error::Other(
                        "PD gave the wrong number of split ids".into(),
                    )));
                }
                let requests = split_keys
                    .into_iter()
                    .zip(ids)
                    .map(|(k, id)| SplitRequest {
                        split_key: k,
                        new_region_id: id.new_region_id,
                        new_peer_ids: id.new_peer_ids,
                    })
                    .collect();
                let cmd = RaftCmdRequest {
                    header: Some(self.header()),
                    requests: vec![],
                    admin_request: Some(AdminRequest {
                        cmd_type: AdminCmdType::BatchSplit as i32,
                        splits: Some(BatchSplitRequest { requests }),
                        ..Default::default()
                    }),
                };
                self.peer.propose(ctx, cmd, cb);
            }
            CasualMessage::PdOperator(resp) => self.on_pd_operator(ctx, *resp),
            CasualMessage::StalePeer { region } => {
                let cur = util::epoch(self.peer.region());
                let theirs = util::epoch(&region);
                let member = util::find_peer_by_id(&region, self.peer.meta.id).is_some();
                if !member && (theirs.conf_ver > cur.conf_ver || !self.peer.is_initialized()) {
                    tracing::info!(tag = %self.peer.tag, "PD says this peer is stale; destroying");
                    self.start_destroy(ctx);
                }
            }
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
            CasualMessage::HeartbeatPd => {
                if self.peer.is_leader() {
                    self.peer.heartbeat_pd(ctx);
                } else {
                    // Asked by the store: this peer blocks a range; is it still a member?
                    self.peer.request_validation(ctx);
                }
            }
        }
    }

    fn header(&self) -> RaftRequestHeader {
        RaftRequestHeader {
            region_id: self.region_id(),
            peer: Some(self.peer.meta),
            region_epoch: self.peer.region().region_epoch,
            keys: vec![],
        }
    }

    fn check_split_request(&self, epoch: &metapb::RegionEpoch, keys: &[Vec<u8>]) -> Result<()> {
        if !self.peer.is_leader() {
            return Err(self.peer.not_leader());
        }
        let region = self.peer.region();
        util::check_epoch(region, Some(epoch), true, true)?;
        if keys.is_empty() {
            return Err(Error::InvalidRequest("no split keys".into()));
        }
        let mut prev: &[u8] = &region.start_key;
        for k in keys {
            util::check_key_in_region(k, region)?;
            if k.as_slice() <= prev {
                return Err(Error::InvalidRequest(
                    "split keys must be sorted, distinct and inside the region (not its start)"
                        .into(),
                ));
            }
            prev = k;
        }
        Ok(())
    }

    fn on_pd_operator(
        &mut self,
        ctx: &StoreContext<E>,
        resp: atoll_proto::pdpb::RegionHeartbeatResponse,
    ) {
        if !self.peer.is_leader() {
            return;
        }
        let epoch = util::epoch(self.peer.region());
        if let Some(e) = &resp.region_epoch {
            if util::is_epoch_stale(e, &epoch) {
                return;
            }
        }
        let noop: WriteCallback = Box::new(|_| {});
        if let Some(cp) = resp.change_peer {
            let change_type = match atoll_proto::pdpb::ConfChangeType::try_from(cp.change_type) {
                Ok(atoll_proto::pdpb::ConfChangeType::AddNode) => {
                    atoll_proto::raft_cmdpb::ConfChangeType::AddNode
                }
                Ok(atoll_proto::pdpb::ConfChangeType::RemoveNode) => {
                    atoll_proto::raft_cmdpb::ConfChangeType::RemoveNode
                }
                Ok(atoll_proto::pdpb::ConfChangeType::AddLearnerNode) => {
                    atoll_proto::raft_cmdpb::ConfChangeType::AddLearnerNode
                }
                Err(_) => return,
            };
            let peer = cp.peer.unwrap_or_default();
            // Removing the leader itself: hand leadership to another voter first.
            if change_type == atoll_proto::raft_cmdpb::ConfChangeType::RemoveNode
                && peer.id == self.peer.meta.id
            {
                if let Some(target) = self.pick_transfer_target() {
                    self.peer.raft_group.transfer_leader(target);
                }
                return;
            }
            let cmd = RaftCmdRequest {
                header: Some(self.header()),
                requests: vec![],
                admin_request: Some(AdminRequest {
                    cmd_type: AdminCmdType::ChangePeer as i32,
                    change_peer: Some(atoll_proto::raft_cmdpb::ChangePeerRequest {
                        change_type: change_type as i32,
                        peer: Some(peer),
                    }),
                    ..Default::default()
                }),
            };
            self.peer.propose(ctx, cmd, noop);
        } else if let Some(tl) = resp.transfer_leader {
            if let Some(p) = tl.peer {
                if p.id != self.peer.meta.id
                    && util::find_peer_by_id(self.peer.region(), p.id).is_some()
                {
                    self.peer.wake(ctx);
                    self.peer.raft_group.transfer_leader(p.id);
                }
            }
        } else if let Some(sr) = resp.split_region {
            if sr.keys.is_empty() {
                self.schedule_split_check(ctx, true);
            } else {
                let epoch = util::epoch(self.peer.region());
                if self.check_split_request(&epoch, &sr.keys).is_ok() {
                    ctx.schedule_pd(PdTask::AskSplit {
                        region: self.peer.region().clone(),
                        split_keys: sr.keys,
                        cb: None,
                    });
                }
            }
        }
    }

    fn pick_transfer_target(&self) -> Option<u64> {
        let last = self.peer.raft_group.raft.raft_log.last_index();
        self.peer
            .region()
            .peers
            .iter()
            .filter(|p| p.id != self.peer.meta.id && !util::is_learner(p))
            .max_by_key(|p| {
                self.peer
                    .raft_group
                    .raft
                    .prs()
                    .get(p.id)
                    .map_or(0, |pr| pr.matched.min(last))
            })
            .map(|p| p.id)
    }

    fn schedule_split_check(&mut self, ctx: &StoreContext<E>, force: bool) {
        if self.peer.split_check_pending || !self.peer.is_leader() || !self.peer.is_initialized() {
            return;
        }
        self.peer.split_check_pending = true;
        self.peer.size_diff_hint = 0;
        self.peer.keys_diff_hint = 0;
        let task = SplitCheckTask {
            region: self.peer.region().clone(),
            snap: ctx.engine.snapshot(),
            split_size: ctx.cfg.region_split_size.0,
            split_keys: ctx.cfg.region_split_keys,
            force,
        };
        if ctx.split_tx.try_send(SplitCheckMsg::Check(task)).is_err() {
            self.peer.split_check_pending = false;
        }
    }

    fn maybe_split_check(&mut self, ctx: &StoreContext<E>) {
        let diff = ctx.cfg.split_check_diff();
        let p = &self.peer;
        if p.size_diff_hint < diff && p.keys_diff_hint < (ctx.cfg.region_split_keys / 8).max(1) {
            return;
        }
        let due = match (p.approximate_size, p.approximate_keys) {
            (Some(s), Some(k)) => {
                s + p.size_diff_hint >= ctx.cfg.region_split_size.0
                    || k + p.keys_diff_hint >= ctx.cfg.region_split_keys
            }
            _ => true,
        };
        if due {
            self.schedule_split_check(ctx, false);
        } else {
            // Fold the estimate forward and wait for more writes.
            let p = &mut self.peer;
            p.approximate_size = p.approximate_size.map(|s| s + p.size_diff_hint);
            p.approximate_keys = p.approximate_keys.map(|k| k + p.keys_diff_hint);
            p.size_diff_hint = 0;
            p.keys_diff_hint = 0;
        }
    }

    fn on_apply_res(&mut self, ctx: &StoreContext<E>, wb: &mut E::WriteBatch, res: ApplyRes) {
        if self.peer.pending_remove {
            return;
        }
        self.peer.applied_index = res.applied_index;
        self.peer.applied_term = res.applied_term;
        self.peer.on_applied(ctx, res.applied_index);
        self.peer
            .raft_group
            .mut_store()
            .set_applied(res.applied_index, res.applied_term);
        self.peer.raft_group.advance_apply_to(res.applied_index);
        self.peer.size_diff_hint += res.written_bytes;
        self.peer.keys_diff_hint += res.written_keys;
        self.peer.written_bytes += res.written_bytes;
        self.peer.written_keys += res.written_keys;
        for r in res.exec_results {
            match r {
                ExecResult::ChangePeer {
                    cc,
                    region,
                    remove_self,
                } => self.on_conf_change(ctx, cc, region, remove_self),
                ExecResult::Split {
                    derived,
                    new_regions,
                } => self.on_split(ctx, derived, new_regions),
                ExecResult::CompactLog { index, term } => self.on_compact_log(wb, index, term),
            }
            if self.peer.pending_remove {
                return;
            }
        }
        if self.peer.is_leader() {
            self.maybe_split_check(ctx);
        }
        self.peer.publish(ctx);
        self.peer.serve_reads(ctx);
    }

    fn on_conf_change(
        &mut self,
        ctx: &StoreContext<E>,
        cc: raft::eraftpb::ConfChange,
        region: metapb::Region,
        remove_self: bool,
    ) {
        if let Err(e) = self.peer.raft_group.apply_conf_change(&cc) {
            tracing::error!(tag = %self.peer.tag, error = %e, "raft refused an applied conf change");
        }
        for p in &region.peers {
            self.peer.peer_cache.insert(p.id, *p);
            self.peer
                .peer_heartbeats
                .entry(p.id)
                .or_insert_with(Instant::now);
        }
        self.peer.raft_group.mut_store().region = region.clone();
        ctx.meta.lock().set_region(&region);
        self.peer.republish(ctx);
        if remove_self {
            tracing::info!(tag = %self.peer.tag, "removed from the region; destroying");
            self.start_destroy(ctx);
            return;
        }
        if self.peer.is_leader() {
            self.peer.heartbeat_pd(ctx);
        }
    }

    fn on_compact_log(&mut self, wb: &mut E::WriteBatch, index: u64, term: u64) {
        let first = self.peer.raft_group.store().truncated_index() + 1;
        self.peer.raft_group.mut_store().compact_to(index, term);
        let region_id = self.region_id();
        if first <= index {
            let _ = wb.delete_range_cf(
                CF_RAFT,
                &atoll_keys::raft_log_key(region_id, first),
                &atoll_keys::raft_log_key(region_id, index + 1),
            );
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

    fn on_split(
        &mut self,
        ctx: &StoreContext<E>,
        derived: metapb::Region,
        new_regions: Vec<metapb::Region>,
    ) {
        let was_leader = self.peer.is_leader();
        self.peer.raft_group.mut_store().region = derived.clone();
        let parts = new_regions.len() as u64 + 1;
        self.peer.approximate_size = self.peer.approximate_size.map(|s| s / parts);
        self.peer.approximate_keys = self.peer.approximate_keys.map(|k| k / parts);
        // The derived range and the new regions go into the store's map under one lock: a
        // message for a new region that arrives meanwhile (on the store thread) then finds the
        // region known and waits for its peer, instead of creating an empty peer that would
        // take the split's place (and apply entries with no range: data lost on this store).
        let mut creating = vec![];
        {
            let mut meta = ctx.meta.lock();
            meta.set_region(&derived);
            for region in &new_regions {
                let Some(my) = util::find_peer(region, ctx.store_id).cloned() else {
                    continue;
                };
                // A peer already exists. If initialized, it was created some other way (a
                // snapshot); if not, the split initializes it (replaced below).
                if meta.regions.contains_key(&region.id) && ctx.router.mailbox(region.id).is_some()
                {
                    continue;
                }
                if !meta
                    .overlapping(&region.start_key, &region.end_key, region.id)
                    .is_empty()
                {
                    tracing::warn!(tag = %self.peer.tag, new = region.id, "split range overlaps an existing region; not creating its peer");
                    continue;
                }
                meta.set_region(region);
                creating.push((region.clone(), my));
            }
        }
        self.peer.republish(ctx);
        for (region, my) in creating {
            if let Some(mb) = ctx.router.mailbox(region.id) {
                mb.close();
                ctx.router.unregister(region.id, &mb);
                if let Some(m) = ctx.apply_router.mailbox(region.id) {
                    m.close();
                    ctx.apply_router.unregister(region.id, &m);
                }
            }
            match ctx.create_peer(region.clone(), my, was_leader) {
                Ok(()) => {}
                Err(e) => {
                    tracing::error!(tag = %self.peer.tag, error = %e, new = region.id, "create split peer")
                }
            }
        }
        if was_leader {
            self.peer.heartbeat_pd(ctx);
            let mut all = vec![derived];
            all.extend(new_regions);
            ctx.schedule_pd(PdTask::ReportSplit { regions: all });
        }
    }

    fn on_snapshot_applied(&mut self, ctx: &StoreContext<E>, ok: bool) {
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
        for m in ctx.meta.lock().take_parked(self.region_id()) {
            let _ = ctx
                .router
                .force_send(self.region_id(), PeerMsg::RaftMessage(Box::new(m)));
        }
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
        let task = RegionTask::ApplySnapshot {
            region: self.peer.region().clone(),
            meta,
            apply_state,
            not_before: Some(Instant::now() + delay),
        };
        if ctx.region_tx.send(task).is_err() {
            tracing::error!(tag = %self.peer.tag, "region worker gone; snapshot not applied");
        }
    }

    fn send_to_apply(&mut self, ctx: &StoreContext<E>, entries: Vec<raft::eraftpb::Entry>) {
        if entries.is_empty() {
            return;
        }
        let cbs = self.peer.take_apply_callbacks(ctx, &entries);
        let msg = ApplyMsg::Apply {
            term: self.peer.term(),
            entries,
            cbs,
        };
        if let Err(e) = ctx.apply_router.force_send(self.region_id(), msg) {
            if let ApplyMsg::Apply { cbs, .. } = e.into_inner() {
                for (_, _, cb) in cbs {
                    cb(Err(Error::RegionNotFound(self.region_id())));
                }
            }
        }
    }

    // ---------------- destroy ----------------

    fn start_destroy(&mut self, ctx: &StoreContext<E>) {
        if self.peer.pending_remove {
            return;
        }
        self.peer.pending_remove = true;
        self.peer.clear_apply_pending(ctx);
        let err = Error::RegionNotFound(self.region_id());
        self.peer.fail_proposals(&err);
        self.peer.fail_reads(&err);
        ctx.set_awake(self.region_id(), false);
        ctx.meta.lock().readers.remove(&self.region_id());
        if ctx
            .apply_router
            .force_send(self.region_id(), ApplyMsg::Destroy)
            .is_err()
        {
            let _ = ctx
                .router
                .force_send(self.region_id(), PeerMsg::ApplyDestroyed);
        }
    }

    /// Stages the tombstone, the raft state's deletion and (if no other region here covers
    /// any of it) the data's deletion into the round's write batch. The range stays claimed in
    /// the store's meta until [`Self::complete_destroy`], after that batch is written: a
    /// snapshot of an overlapping region can only be accepted once the deletion is on disk,
    /// never be wiped by it.
    fn finish_destroy(&mut self, ctx: &StoreContext<E>, wb: &mut E::WriteBatch) {
        if self.stopped {
            return;
        }
        let region = self.peer.region().clone();
        let region_id = self.region_id();
        let initialized = self.peer.is_initialized();
        let res: atoll_engine::Result<()> = (|| {
            let mut tomb = region.clone();
            if !initialized {
                tomb.id = region_id;
            }
            write_region_state(wb, &tomb, PeerState::Tombstone)?;
            crate::storage::delete_raft_state(wb, region_id)?;
            let meta = ctx.meta.lock();
            if initialized
                && meta
                    .overlapping(&region.start_key, &region.end_key, region_id)
                    .is_empty()
            {
                let (s, e) = util::data_bounds(&region);
                for cf in DATA_CFS {
                    wb.delete_range_cf(cf, &s, &e)?;
                }
            }
            Ok(())
        })();
        if let Err(e) = res {
            tracing::error!(tag = %self.peer.tag, error = %e, "stage destroy");
        }
        self.stopped = true;
        self.destroy_staged = true;
    }

    /// After the round's write: frees the range, forgets the peer, and lets the store retry
    /// messages that waited for the range.
    fn complete_destroy(&mut self, ctx: &StoreContext<E>) {
        if !std::mem::take(&mut self.destroy_staged) {
            return;
        }
        let region_id = self.region_id();
        {
            let mut meta = ctx.meta.lock();
            if meta.regions.contains_key(&region_id) {
                meta.remove_region(region_id);
            }
            meta.readers.remove(&region_id);
        }
        if let Some(mb) = ctx.router.mailbox(region_id) {
            ctx.router.unregister(region_id, &mb);
        }
        ctx.send_store_msg(StoreMsg::PeerDestroyed { region_id });
        tracing::info!(tag = %self.peer.tag, "destroyed");
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
                let region = fsm.peer.region().clone();
                let state = fsm.peer.raft_group.store().apply_state;
                fsm.peer.applying_snap = Some((meta.clone(), state));
                fsm.peer.snap_apply_failures = 0;
                let task = RegionTask::ApplySnapshot {
                    region,
                    meta,
                    apply_state: state,
                    not_before: None,
                };
                if ctx.region_tx.send(task).is_err() {
                    tracing::error!(tag = %fsm.peer.tag, "region worker gone; snapshot not applied");
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::TestStore;
    use atoll_engine::{CF_DEFAULT, CF_WRITE};

    /// The range of a destroyed peer stays claimed until its deletion is written: a snapshot
    /// of an overlapping region accepted in between would be wiped by that write. Its data is
    /// deleted up to a true bound: keys of long runs of 0xff included.
    #[test]
    fn destroy_frees_the_range_only_after_its_deletion_is_written() {
        let mut s = TestStore::new(1);
        let mut fsm = s.create_region(10, b"", b"", &[(11, 1), (12, 2), (13, 3)]);
        let long = atoll_keys::append_ts(atoll_keys::data_key(&[0xff; 100]), 5);
        let short = atoll_keys::append_ts(atoll_keys::data_key(b"a"), 5);
        s.put(CF_WRITE, &long, b"w");
        s.put(CF_DEFAULT, &short, b"v");
        s.handle(&mut fsm, vec![PeerMsg::Destroy, PeerMsg::ApplyDestroyed]);
        assert!(s.ctx.meta.lock().regions.contains_key(&10));
        assert_eq!(s.ctx.meta.lock().overlapping(b"m", b"n", 0), vec![10]);
        assert!(
            s.has(CF_DEFAULT, &short),
            "nothing is written before the round ends"
        );
        s.end(&mut fsm);
        assert!(s.ctx.meta.lock().regions.is_empty());
        assert!(s.ctx.meta.lock().overlapping(b"", b"", 0).is_empty());
        assert!(!s.has(CF_DEFAULT, &short));
        assert!(
            !s.has(CF_WRITE, &long),
            "a key of 100 0xff bytes escaped the deletion"
        );
        let st = crate::storage::load_region_state(s.engine(), 10)
            .unwrap()
            .unwrap();
        assert_eq!(st.state, PeerState::Tombstone as i32);
        assert!(crate::storage::load_raft_state(s.engine(), 10)
            .unwrap()
            .is_none());
        assert!(matches!(
            s.receivers.store_rx.try_recv(),
            Ok(StoreMsg::PeerDestroyed { region_id: 10 })
        ));
    }
}
