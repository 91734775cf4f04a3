//! The Ready cycle, split in two halves around the poll round's single write:
//!
//! 1. [`Peer::collect_ready`] (during the round): take the `Ready`, send the messages that may
//!    precede persistence (a leader's appends), and put entries, hard state and any received
//!    snapshot's states into the round's shared `WriteBatch`;
//! 2. the raft poller writes that batch once, with one fsync, for every region of the round;
//! 3. [`Peer::post_ready`] (after the write): send the messages that depended on it, advance
//!    raft, and hand committed entries to the apply side (bounded by apply flow control).
//!
//! Raft messages in ([`Peer::step`]) and apply results back ([`PeerFsm::on_apply_res`]) are
//! the two ends of the cycle and live here too.

use crate::fsm::apply::ApplyMsg;
use crate::fsm::context::StoreContext;
use crate::fsm::peer::PeerFsm;
use crate::msg::{ApplyRes, ExecResult, WriteCallback};
use crate::raft::peer::Peer;
use crate::{Error, Result};
use atoll_engine::KvEngine;
use atoll_proto::raft_serverpb::{RaftMessage, SnapshotMeta};
use protobuf::Message as PbMessage;
use raft::eraftpb::{self, Entry, MessageType};
use std::sync::atomic::Ordering;
use std::time::Instant;

impl<E: KvEngine> Peer<E> {
    /// Part 1: take the ready and stage its persistent parts into the round's write batch.
    /// Returns whether anything was staged, and whether it must be synced (a commit index
    /// alone need not be: it can be recovered from the log and the leader).
    pub fn collect_ready(
        &mut self,
        ctx: &StoreContext<E>,
        wb: &mut E::WriteBatch,
    ) -> Result<(bool, bool)> {
        if self.applying_snapshot || self.pending_remove || !self.raft_group.has_ready() {
            return Ok((false, false));
        }
        // A snapshot replaces the data: let the apply side finish earlier entries first.
        if self.raft_group.snap().is_some() && self.last_sent_to_apply > self.applied_index {
            return Ok((false, false));
        }
        let budget = self.apply_budget(ctx);
        self.apply_held = budget == 0;
        self.raft_group
            .raft
            .set_max_committed_size_per_ready(budget.max(1));
        // Held: this ready fetches no committed entry (see `PeerStorage::entries`).
        self.raft_group.mut_store().hold_committed = self.apply_held;
        let mut ready = self.raft_group.ready();
        self.raft_group.mut_store().hold_committed = false;
        let must_sync = ready.must_sync() || !ready.snapshot().is_empty();
        // A leader may send appends before persisting its own copy (raft thesis §10.2.1).
        let msgs = ready.take_messages();
        self.send_raft_messages(ctx, msgs);
        if !ready.snapshot().is_empty() {
            let snap = ready.snapshot().clone();
            let meta = self.raft_group.mut_store().apply_snapshot_meta(&snap, wb)?;
            self.pending_snapshot = Some(meta);
        }
        let mut dirty = !ready.snapshot().is_empty();
        if !ready.entries().is_empty() {
            let bytes: u64 = ready
                .entries()
                .iter()
                .map(|e| e.data.len() as u64 + 16)
                .sum();
            self.raft_log_size_hint += bytes;
            self.raft_group.mut_store().append(ready.entries(), wb)?;
            dirty = true;
        }
        if let Some(hs) = ready.hs() {
            let hs = hs.clone();
            self.raft_group.mut_store().set_hard_state(&hs);
            dirty = true;
        }
        if dirty {
            self.raft_group.store().save_raft_state(wb)?;
        }
        self.pending_ready = Some(ready);
        Ok((dirty, dirty && must_sync))
    }

    /// Part 3: after the round's write, send what depended on it and hand committed entries on.
    /// Returns the committed entries for the apply side (empty while a snapshot applies).
    pub fn post_ready(&mut self, ctx: &StoreContext<E>) -> (Vec<Entry>, Option<SnapshotMeta>) {
        let Some(mut ready) = self.pending_ready.take() else {
            return (vec![], None);
        };
        let role_changed = ready.ss().is_some();
        for rs in ready.take_read_states() {
            self.on_read_state(ctx, &rs.request_ctx, rs.index);
        }
        let persisted = ready.take_persisted_messages();
        self.send_raft_messages(ctx, persisted);
        let mut committed = ready.take_committed_entries();
        // Held: the light ready fetches no committed entry either (appends a leader sends
        // from here are not held back: see `PeerStorage::entries`).
        self.raft_group.mut_store().hold_committed = self.apply_held;
        let mut light = self.raft_group.advance_append(ready);
        self.raft_group.mut_store().hold_committed = false;
        let msgs = light.take_messages();
        self.send_raft_messages(ctx, msgs);
        committed.extend(light.take_committed_entries());
        let snap = self.pending_snapshot.take();
        if snap.is_some() {
            self.applying_snapshot = true;
        }
        if role_changed {
            self.on_role_changed(ctx);
        }
        if self.applying_snapshot {
            self.pending_committed.extend(committed);
            return (vec![], snap);
        }
        (committed, snap)
    }

    pub fn on_role_changed(&mut self, ctx: &StoreContext<E>) {
        if self.is_leader() {
            self.wake(ctx);
            let now = Instant::now();
            let ids: Vec<u64> = self.region().peers.iter().map(|p| p.id).collect();
            for id in ids {
                self.peer_heartbeats.insert(id, now);
            }
            tracing::debug!(tag = %self.tag, term = self.term(), "became leader");
        } else {
            let err = self.not_leader();
            self.fail_reads(&err);
        }
        self.publish(ctx);
        if self.is_leader() {
            self.heartbeat_pd(ctx);
        }
    }

    /// Pulls the entries to hand to the apply side, with the callbacks of their proposals.
    pub fn take_apply_callbacks(
        &mut self,
        ctx: &StoreContext<E>,
        entries: &[Entry],
    ) -> Vec<(u64, u64, WriteCallback)> {
        let Some(last) = entries.last().map(|e| e.index) else {
            return vec![];
        };
        self.note_sent_to_apply(ctx, entries);
        self.last_sent_to_apply = self.last_sent_to_apply.max(last);
        let mut cbs = vec![];
        let mut confirmed_at = None;
        let term = self.term();
        while let Some(p) = self.proposals.front() {
            if p.index > last {
                break;
            }
            let p = self.proposals.pop_front().expect("front exists");
            if p.term == term {
                // Committed in this term: a quorum appended it after it was proposed.
                confirmed_at = Some(p.proposed_at);
            }
            cbs.push((p.index, p.term, p.cb));
        }
        if let Some(at) = confirmed_at {
            self.renew_lease(ctx, at);
        }
        cbs
    }

    /// How many bytes of committed entries this peer may fetch for the apply side now: none
    /// while its own hand-overs pending exceed `apply-max-pending-size`, or the store's total
    /// exceeds `apply-pending-memory-limit` (a peer with nothing pending may always fetch, so
    /// every held peer has an apply result coming that schedules it again). Entries left
    /// behind stay in the raft log (on disk) until then: a follower whose apply lags does not
    /// queue the log in memory.
    fn apply_budget(&self, ctx: &StoreContext<E>) -> u64 {
        let per_region = ctx.cfg.apply_max_pending_size.0;
        if self.apply_pending_bytes == 0 {
            return per_region.max(1);
        }
        let store_total = ctx.apply_pending_bytes.load(Ordering::Relaxed);
        if store_total >= ctx.cfg.apply_pending_memory_limit.0 {
            return 0;
        }
        per_region.saturating_sub(self.apply_pending_bytes)
    }

    fn note_sent_to_apply(&mut self, ctx: &StoreContext<E>, entries: &[Entry]) {
        let Some(last) = entries.last().map(|e| e.index) else {
            return;
        };
        let bytes: u64 = entries.iter().map(|e| e.compute_size() as u64).sum();
        self.apply_pending.push_back((last, bytes));
        self.apply_pending_bytes += bytes;
        ctx.apply_pending_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The apply side reached `applied`.
    pub fn on_applied(&mut self, ctx: &StoreContext<E>, applied: u64) {
        let mut freed = 0;
        while let Some((last, bytes)) = self.apply_pending.front().copied() {
            if last > applied {
                break;
            }
            self.apply_pending.pop_front();
            freed += bytes;
        }
        self.apply_pending_bytes -= freed;
        ctx.apply_pending_bytes.fetch_sub(freed, Ordering::Relaxed);
    }

    /// Nothing handed to the apply side is pending any more (a snapshot replaced it, or the
    /// peer is being destroyed).
    pub fn clear_apply_pending(&mut self, ctx: &StoreContext<E>) {
        self.apply_pending.clear();
        ctx.apply_pending_bytes.fetch_sub(
            std::mem::take(&mut self.apply_pending_bytes),
            Ordering::Relaxed,
        );
    }

    pub fn step(&mut self, ctx: &StoreContext<E>, msg: RaftMessage) -> Result<()> {
        let from = msg.from_peer.unwrap_or_default();
        let m = eraftpb::Message::parse_from_bytes(&msg.message)?;
        if m.get_msg_type() == MessageType::MsgSnapshot && !self.check_snapshot(ctx, &m) {
            return Ok(());
        }
        if self.holds_vote(ctx, &m) {
            tracing::debug!(tag = %self.tag, from = m.from, term = m.term, msg = ?m.get_msg_type(),
                "vote request ignored: this store restarted less than an election timeout ago");
            return Ok(());
        }
        self.peer_cache.insert(from.id, from);
        self.peer_heartbeats.insert(from.id, Instant::now());
        if self.hibernating && !self.is_hibernation_safe(&m) {
            tracing::trace!(tag = %self.tag, msg = ?m.get_msg_type(), from = m.from, "woken by a message");
            self.wake(ctx);
        }
        if let Err(e) = self.raft_group.step(m) {
            tracing::debug!(tag = %self.tag, error = %e, "step failed");
        }
        Ok(())
    }

    /// A restarted store has forgotten which leader it heard from last, and so whether it
    /// promised (by acknowledging) that leader's lease. Until an election timeout has passed
    /// since the start it grants no vote that a lease would have stopped: the same rule raft
    /// applies to a follower that knows its leader (`check_quorum`), applied to one that forgot.
    fn holds_vote(&self, ctx: &StoreContext<E>, m: &eraftpb::Message) -> bool {
        matches!(
            m.get_msg_type(),
            MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
        ) && !ctx.cfg.max_leader_lease().is_zero()
            && m.term > self.term()
            && m.context.as_ref() != raft::CAMPAIGN_TRANSFER
            && self.raft_group.raft.leader_id == raft::INVALID_ID
            && ctx.started_at.elapsed() < ctx.cfg.election_timeout()
    }

    pub fn send_raft_messages(&mut self, ctx: &StoreContext<E>, msgs: Vec<eraftpb::Message>) {
        if msgs.is_empty() {
            return;
        }
        if msgs
            .iter()
            .any(|m| m.get_msg_type() == MessageType::MsgTimeoutNow)
        {
            self.forbid_lease();
        }
        for m in msgs {
            let Some(to_peer) = self.peer_cache.get(&m.to).cloned() else {
                tracing::debug!(tag = %self.tag, to = m.to, "no address for peer; message dropped");
                ctx.metrics.on_dropped("unknown_peer");
                continue;
            };
            let is_snap = m.get_msg_type() == MessageType::MsgSnapshot;
            let snap_meta = if is_snap {
                prost::Message::decode(m.get_snapshot().get_data()).ok()
            } else {
                None
            };
            let bytes = match m.write_to_bytes() {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(tag = %self.tag, error = %e, "encode raft message");
                    continue;
                }
            };
            let rm = RaftMessage {
                message: bytes,
                ..self.raft_message_to(to_peer)
            };
            match snap_meta {
                Some(meta) => {
                    if !ctx.trans.send_snapshot(rm, meta) {
                        self.raft_group
                            .report_snapshot(m.to, raft::SnapshotStatus::Failure);
                    }
                }
                None if is_snap => {
                    self.raft_group
                        .report_snapshot(m.to, raft::SnapshotStatus::Failure);
                }
                None => {
                    if !ctx.trans.send(rm) {
                        ctx.metrics.on_dropped("transport_full");
                    }
                }
            }
        }
    }
}

impl<E: KvEngine> PeerFsm<E> {
    pub(crate) fn on_apply_res(
        &mut self,
        ctx: &StoreContext<E>,
        wb: &mut E::WriteBatch,
        res: ApplyRes,
    ) {
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

    pub(crate) fn send_to_apply(&mut self, ctx: &StoreContext<E>, entries: Vec<Entry>) {
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
}
